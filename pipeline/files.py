"""Atomic writes: a crash never leaves a half-written file under its final name."""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in `path`'s folder for a writer that needs a name (np.savez, savefig,
    Keras `model.save`); it ends with `path`'s name, so writers that go by the suffix work. It
    becomes `path` when the block succeeds; a failed block leaves `path` as it was and removes
    the temporary. `path` may be a directory (a SavedModel): an old one is replaced whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}.{path.name}")
    try:
        yield tmp
        if tmp.is_dir() and path.exists():  # os.replace cannot replace a non-empty directory
            old = tmp.with_name(f"{tmp.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str))


def save_array(path: str | Path, array) -> Path:
    """One array as .npy (np.save's format, whatever `path`'s suffix)."""
    import numpy as np
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
    return Path(path)
