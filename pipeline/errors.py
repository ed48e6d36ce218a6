"""Errors the user can fix (everything else is a bug or an outage), and how errors and addresses
are shown to people: one line, no credentials."""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


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


def first_line(error: BaseException, *, with_type: bool = False, limit: int = 300) -> str:
    """The first line of an error's message (its type's name when it has none; with `with_type`,
    `Type: line`), cut at `limit` characters: what a one-line report shows."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if with_type:
        text = f"{type(error).__name__}: {text}"
    return (text or type(error).__name__)[:limit]


def without_credentials(uri: str) -> str:
    """`uri` without the user and password of its host part (`https://user:secret@host/x` ->
    `https://host/x`), for messages and logs; other URIs and plain paths unchanged."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
