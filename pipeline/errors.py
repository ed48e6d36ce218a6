"""Errors the user can fix. Everything else is a bug or an outage."""


class PipelineInputError(ValueError):
    """Bad input (dataset, model, options): the message names the problem and the fix.

    The command line turns it into exit status 2 and one line on stderr; in Airflow the task
    fails with this message and is not retried (retrying cannot fix the input).
    """


class TechniqueError(ValueError):
    """A technique cannot be applied to this model; the message names the technique, the layer or
    format at fault, and what to do instead."""


# What a malformed input file raises while it is read (truncated, corrupt, wrong format). Anything
# else (MemoryError, a TensorFlow or driver bug, a lost connection) is not the user's input: it
# keeps its traceback and the task is retried.
def unreadable_file_errors() -> tuple[type[BaseException], ...]:
    import json
    import zipfile
    return (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError,
            UnicodeDecodeError)
