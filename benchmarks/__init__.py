"""`make bench`: the pipeline's performance measured side by side in one run (see README.md)."""
