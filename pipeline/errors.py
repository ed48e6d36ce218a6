"""Errors the user can fix. Everything else is a bug or an outage."""


class PipelineInputError(ValueError):
    """Bad input (dataset, model, options): the message names the problem and the fix.

    The command line turns it into exit status 2 and one line on stderr; in Airflow the task
    fails with this message and is not retried (retrying cannot fix the input).
    """
