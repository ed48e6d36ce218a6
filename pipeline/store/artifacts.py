"""The run's artifact store: how a file one task makes reaches a task on another worker.

A task that makes a file a later task needs (the prepared dataset, the baseline model, an
optimized model, predictions, a variant's .tflite) stores it as an MLflow artifact of a run of
this pipeline and hands on its URI, `runs:/<run id>/<path>#sha256=<digest>`; the task that needs
it calls `fetch(uri)` and gets a local copy. The store is the MLflow artifact store: proxied by
the MLflow server to S3 (workers hold no S3 credentials) or, on the embedded default, a local
folder beside the SQLite store. No task ever reads a path another task wrote on its own disk.

A worker's copies live in its cache, `<work dir>/cache/<run id>/<path>`. The digest in the URI
says which content is meant: a cached copy with that digest is used as is, anything else is
downloaded again, so deleting a worker's cache costs only time.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pipeline.store import tracking
from pipeline.config import work_dir

log = logging.getLogger("pipeline.store.artifacts")

EXCHANGE = "exchange"  # the parent run's folder of files handed from task to task
_DIGEST = "#sha256="


class ArtifactMissing(RuntimeError):
    """A URI handed on by an earlier task names nothing in the artifact store."""


def cache_dir() -> Path:
    return work_dir() / "cache"


def store(run_id: str, local_path: str | Path, folder: str) -> str:
    """Upload a file (or a directory, e.g. a SavedModel) into `folder` of run `run_id`'s
    artifacts and return its URI. Files carry their SHA-256 in the URI."""
    local = Path(local_path)
    artifact_path = f"{folder.strip('/')}/{local.name}"
    if local.is_dir():
        tracking.log_artifacts(run_id, local, artifact_path)
        return f"runs:/{run_id}/{artifact_path}"
    tracking.log_artifact(run_id, local, folder.strip("/"))
    return f"runs:/{run_id}/{artifact_path}{_DIGEST}{sha256(local)}"


def fetch(uri: str) -> Path:
    """A local copy of the artifact at `uri` (a file or a directory), from this worker's cache
    when it holds the same content, else downloaded into it."""
    run_id, path, digest = parse(uri)
    local_root = _local_artifact_root(run_id)
    if local_root is not None:  # the embedded default: the store is a folder on this machine
        found = local_root / path
        if not found.exists():
            raise ArtifactMissing(f"artifact {path} of run {run_id} is missing from the artifact "
                                  f"store ({local_root}): did the task that made it finish?")
        _check_digest(found, digest, uri)
        return found
    target = cache_dir() / run_id / path
    if target.exists() and (digest is None or sha256(target) == digest):
        return target
    _download(run_id, path, target)
    _check_digest(target, digest, uri)
    return target


def store_json(run_id: str, data: Any, artifact_file: str) -> None:
    """A small record (JSON) in run `run_id`'s artifacts; records may be rewritten, so they are
    never cached (`load_json`)."""
    tracking.log_dict(run_id, data, artifact_file)


def load_json(run_id: str, artifact_file: str) -> Any | None:
    """The record `artifact_file` of run `run_id`, or None when there is none."""
    if not exists(run_id, artifact_file):
        return None
    import mlflow
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")


def exists(run_id: str, artifact_path: str) -> bool:
    folder, _, name = artifact_path.rpartition("/")
    return name in {Path(f.path).name for f in tracking.list_artifacts(run_id, folder or None)}


def uri_of(run_id: str, artifact_path: str) -> str:
    """The URI of an artifact already in the store (for a file, with its digest)."""
    uri = f"runs:/{run_id}/{artifact_path}"
    local = fetch(uri)
    return f"{uri}{_DIGEST}{sha256(local)}" if local.is_file() else uri


def parse(uri: str) -> tuple[str, str, str | None]:
    """`runs:/<run id>/<path>[#sha256=<digest>]` -> (run id, path, digest or None)."""
    text, _, digest = uri.partition(_DIGEST)
    if not text.startswith("runs:/"):
        raise ValueError(f"not a run artifact URI: {uri!r}")
    run_id, _, path = text[len("runs:/"):].strip("/").partition("/")
    if not run_id or not path:
        raise ValueError(f"not a run artifact URI: {uri!r}")
    return run_id, path, digest or None


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(path: Path, digest: str | None, uri: str) -> None:
    if digest is not None and path.is_file() and sha256(path) != digest:
        raise ArtifactMissing(f"{uri.partition(_DIGEST)[0]} does not hold the content the "
                              "earlier task stored (it was overwritten): re-run the pipeline")


def _local_artifact_root(run_id: str) -> Path | None:
    """The run's artifact folder when the store is a local folder (file:// or a plain path)."""
    artifact_uri = tracking.client().get_run(run_id).info.artifact_uri
    parts = urlsplit(artifact_uri)
    if parts.scheme == "file":
        return Path(url2pathname(parts.path))
    if parts.scheme == "" and artifact_uri.startswith("/"):
        return Path(artifact_uri)
    return None


def _download(run_id: str, path: str, target: Path) -> None:
    """Download into a private temporary folder, then rename into place: a concurrent task on
    this worker or a crash never sees a half-written copy under the final name."""
    import mlflow
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.download-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tracking.explain_artifact_errors(path, run_id, action="fetch"):
            downloaded = Path(tracking.retry(lambda: mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(staging),
                tracking_uri=tracking.tracking_uri())))
        if target.exists():  # a stale copy (other digest) or a concurrent download
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(downloaded, target)
        log.info("fetched %s of run %s (%s)", path, run_id, _size(target))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _size(path: Path) -> str:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return f"{sum(p.stat().st_size for p in files) / 1e6:.1f} MB"
