"""Atomic writes: a crash never leaves a half-written file under its final name."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str))


def save_array(path: str | Path, array) -> Path:
    import io

    import numpy as np
    buffer = io.BytesIO()
    np.save(buffer, array)
    return write_bytes(path, buffer.getvalue())
