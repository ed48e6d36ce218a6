"""MLflow: the experiment, one parent run per pipeline run, one child run per variant.

Runs are addressed by id through `MlflowClient` (never the fluent "active run"), because each
Airflow task may run in another process or on another worker. Creation is idempotent: the parent
run is found by its `pipeline_run_id` tag (the Airflow run id) and a child run by parent + variant,
so a retried task never duplicates runs.
"""
from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import PROJECT_ROOT
from pipeline.errors import without_credentials

LOCAL_STORE = PROJECT_ROOT / ".mlflow"
CONTRACT_METRICS = ("accuracy", "accuracy_delta_pts", "size_bytes", "gzip_size_bytes",
                    "compression_ratio", "gzip_compression_ratio", "latency_ms_p50",
                    "latency_ms_p90", "peak_memory_mb")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store in the project's git-ignored .mlflow/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    LOCAL_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{LOCAL_STORE / 'mlflow.db'}"


class TrackingServerUnreachable(ConnectionError):
    """MLFLOW_TRACKING_URI names a server that does not answer: the message says which and what
    to start."""


def require_server() -> None:
    """Check that the tracking server answers (when MLFLOW_TRACKING_URI names one)."""
    uri = tracking_uri()
    if uri.startswith("http") and not _server_healthy(uri.rstrip("/")):
        raise TrackingServerUnreachable(
            f"the MLflow tracking server {without_credentials(uri)} (MLFLOW_TRACKING_URI) cannot "
            "be reached: start it (make up starts one on 127.0.0.1:5000), or unset "
            "MLFLOW_TRACKING_URI to use the local store .mlflow/")



def client():
    # MLflow's HTTP client retries each request 7 times over ~4 minutes by default; with our own
    # retry on top and Airflow's task retries above that, an outage would stall a task for many
    # minutes before anyone hears of it. A few quick retries here, Airflow's backoff for the rest.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    import mlflow
    from mlflow.tracking import MlflowClient
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(name: str) -> str:
    """Get or create the experiment. With the local store its artifacts go to .mlflow/artifacts;
    with a tracking server they go wherever the server proxies them (e.g. S3)."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        # Beside the database, not MLflow's default ./mlruns in whatever the working directory is.
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another task: use theirs
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_parent_run(experiment: str, pipeline_run_id: str, params: dict[str, Any],
                     tags: dict[str, str]) -> str:
    mlflow_client = client()
    exp_id = experiment_id(experiment)
    found = mlflow_client.search_runs(
        [exp_id], filter_string=f"tags.pipeline_run_id = '{_quote(pipeline_run_id)}' "
                                "and tags.run_role = 'parent'", max_results=1)
    if found:
        return found[0].info.run_id
    run = mlflow_client.create_run(exp_id, run_name=f"pipeline {pipeline_run_id}", tags={
        "pipeline_run_id": pipeline_run_id, "run_role": "parent", **tags})
    log_params(run.info.run_id, params)
    return run.info.run_id


def fail_parent_run(experiment: str, pipeline_run_id: str, error: str) -> str | None:
    """Close the pipeline run's parent run as FAILED with the error (when it exists and is not
    closed yet): a run that stopped half-way never stays RUNNING. Returns its id or None."""
    mlflow_client = client()
    found_experiment = mlflow_client.get_experiment_by_name(experiment)
    if found_experiment is None:
        return None
    found = mlflow_client.search_runs(
        [found_experiment.experiment_id],
        filter_string=f"tags.pipeline_run_id = '{_quote(pipeline_run_id)}' "
                      "and tags.run_role = 'parent'", max_results=1)
    if not found or found[0].info.status != "RUNNING":
        return None
    fail_run(found[0].info.run_id, error)
    return found[0].info.run_id


def child_run(parent_run_id: str, variant_tags: dict[str, str], *, key: str = "variant",
              role: str = "variant") -> str:
    """The child run of `parent_run_id` for one variant (or, with key="search_trial", one trial
    of a search), created once: found again by its tag `key`."""
    mlflow_client = client()
    parent = mlflow_client.get_run(parent_run_id)
    variant = variant_tags[key]
    found = mlflow_client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.{key} = '{_quote(variant)}'",
        max_results=1)
    if found:
        run_id = found[0].info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        if "error" in found[0].data.tags:  # a retry after a failure: start clean
            mlflow_client.delete_tag(run_id, "error")
        return run_id
    run = mlflow_client.create_run(parent.info.experiment_id, run_name=variant, tags={
        "mlflow.parentRunId": parent_run_id, "run_role": role,
        "pipeline_run_id": parent.data.tags.get("pipeline_run_id", ""), **variant_tags})
    return run.info.run_id


def log_params(run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if v is not None]
    if items:
        retry(lambda: client().log_batch(run_id, params=items))


# MLflow takes at most this many metrics in one log_batch call.
METRICS_PER_BATCH = 1000


def log_metrics(run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
    """Log the metrics that have a value (None: not measured); `step`: e.g. the epoch."""
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    for start in range(0, len(items), METRICS_PER_BATCH):
        batch = items[start:start + METRICS_PER_BATCH]
        retry(lambda: client().log_batch(run_id, metrics=batch))


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag
    items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
    if items:
        retry(lambda: client().log_batch(run_id, tags=items))


# The run's description in the MLflow UI is this tag (markdown); MLflow keeps up to 8000 chars.
NOTE_TAG = "mlflow.note.content"
NOTE_CHARS = 8000


def set_description(run_id: str, markdown: str, full_text_at: str | None = None) -> None:
    """The run's description (the markdown shown at the top of its page in the MLflow UI). A
    text over MLflow's limit is cut at a line, saying where the whole text is (`full_text_at`,
    an artifact of the run)."""
    if len(markdown) > NOTE_CHARS:
        ending = f"\n\n… (cut; the whole text: `{full_text_at or 'not stored'}`)"
        markdown = markdown[:NOTE_CHARS - len(ending)].rsplit("\n", 1)[0] + ending
    retry(lambda: client().set_tag(run_id, NOTE_TAG, markdown))


class system_metrics:
    """Around a stage's heavy work: MLflow's system metrics monitor (CPU, memory, disk, network)
    logs `system/<node>/...` metrics to `run_id` every `interval` seconds
    (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it), and stops when the block ends, however
    it ends. `node` names the stage, so stages sharing the parent run (train, the optimize tasks,
    concurrently on several workers) keep their own series. Without psutil, or if the monitor
    cannot start, the stage runs unmonitored (a warning says so)."""

    def __init__(self, run_id: str, node: str, interval: float = 5.0):
        self.run_id, self.node, self.interval = run_id, node, interval
        self._monitor: Any = None

    def __enter__(self):
        import logging
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval,
                                                 node_id=self.node, tracking_uri=tracking_uri())
            self._monitor.start()
        except Exception as error:  # ImportError without psutil; the stage matters more
            logging.getLogger("pipeline").warning(
                "no system metrics for %s: %s", self.node, f"{type(error).__name__}: {error}")
            self._monitor = None
        return self

    def __exit__(self, kind, error, tb):
        if self._monitor is not None:
            self._monitor.finish()  # joins the sampling thread and flushes what it sampled
        return False


class ArtifactStoreError(RuntimeError):
    """An artifact could not be stored; the message says where it failed and what to check."""


def log_artifact(run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
    target = "/".join(p for p in (artifact_path, Path(local_path).name) if p)
    with explain_artifact_errors(target, run_id):
        retry(lambda: client().log_artifact(run_id, str(local_path), artifact_path))


def log_artifacts(run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    with explain_artifact_errors(artifact_path, run_id):
        retry(lambda: client().log_artifacts(run_id, str(local_dir), artifact_path))


def list_artifacts(run_id: str, folder: str | None = None) -> list:
    return retry(lambda: client().list_artifacts(run_id, folder))


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    with explain_artifact_errors(artifact_file, run_id):
        retry(lambda: client().log_dict(run_id, data, artifact_file))


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    with explain_artifact_errors(artifact_file, run_id):
        retry(lambda: client().log_text(run_id, text, artifact_file))


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    retry(lambda: client().set_terminated(run_id, status=status))


def fail_run(run_id: str, error: str) -> None:
    set_tags(run_id, {"error": error, "status": "failed"})
    finish_run(run_id, "FAILED")


def child_runs(parent_run_id: str) -> list:
    mlflow_client = client()
    parent = mlflow_client.get_run(parent_run_id)
    return mlflow_client.search_runs([parent.info.experiment_id],
                                     filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                     max_results=1000)


def run_url(run_id: str) -> str | None:
    """A link to the run in the MLflow UI when tracking goes to a server."""
    uri = tracking_uri()
    if not uri.startswith("http"):
        return None
    run = client().get_run(run_id)
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


class explain_artifact_errors:
    """Around an artifact upload through a tracking server: an error left after the retries
    becomes an ArtifactStoreError naming the failing part. The server proxies artifacts to its
    store (e.g. S3); when that store is down the server answers the upload with HTTP 500 and no
    detail, or resets the connection, so the server and then its store are checked directly."""

    def __init__(self, artifact: str, run_id: str, action: str = "store"):
        self.artifact, self.run_id, self.action = artifact, run_id, action

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        uri = tracking_uri()
        if not isinstance(error, (MlflowException, RequestException)) or not uri.startswith("http"):
            return False  # no error, a local file problem, or no server in between
        server = uri.rstrip("/")
        what = f"could not {self.action} artifact {self.artifact} of run {self.run_id}"
        transfer = "upload" if self.action == "store" else "download"
        reason = _failure_reason(str(error))
        if not _server_healthy(server):
            message = f"{what}: the tracking server {server} is unreachable ({reason})"
        elif (store := _artifact_store_failure(server)) is not None:
            message = (f"{what}: the tracking server {server} is up but its artifact store is "
                       f"unreachable or failing ({store}; the {transfer}: {reason}): check the store "
                       "the server proxies artifacts to (e.g. S3 at the server's "
                       "MLFLOW_S3_ENDPOINT_URL) and the tracking server's log")
        else:
            message = f"{what} through the tracking server {server} ({reason})"
        raise ArtifactStoreError(message) from error


def _failure_reason(text: str) -> str:
    """A few words from MLflow's REST error text, e.g. 'HTTP 500 after retries'."""
    retried = re.search(r"too many (\d{3}) error responses", text)
    if retried:
        return f"HTTP {retried.group(1)} after retries"
    status = re.search(r"\b([45]\d\d) (?:Client|Server) Error", text)
    if status:
        return f"HTTP {status.group(1)}"
    for needle, reason in (("Connection refused", "connection refused"),
                           ("Connection reset", "connection reset by the server"),
                           ("Connection aborted", "connection aborted"),
                           ("timed out", "timed out")):
        if needle in text:
            return reason
    lines = text.strip().splitlines()
    return (lines[0] if lines else "no detail")[:300]


def _server_healthy(server: str) -> bool:
    try:
        with urllib.request.urlopen(f"{server}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _artifact_store_failure(server: str) -> str | None:
    """How listing the top of the server's artifact store fails ('listing it answers HTTP 500'),
    or None when it works or the answer says nothing about the store (e.g. 401, 403)."""
    try:
        with urllib.request.urlopen(f"{server}/api/2.0/mlflow-artifacts/artifacts",
                                    timeout=15) as response:
            return None if response.status == 200 else f"listing it answers HTTP {response.status}"
    except urllib.error.HTTPError as answer:
        return f"listing it answers HTTP {answer.code}" if answer.code >= 500 else None
    except (urllib.error.URLError, OSError) as failure:
        return f"listing it failed: {getattr(failure, 'reason', failure)}"


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def retry(action, attempts: int = 3, delay: float = 2.0):
    """Ride out a brief tracking-server hiccup; a longer outage surfaces to Airflow's retries."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(delay * (attempt + 1))


def log_dataset_lineage(run_id: str, manifest: dict[str, Any]) -> None:
    """The run's dataset in MLflow's Datasets: one input per split (context train / validation
    / test), named after the source, with the content digest, the source URI and the split's
    size and classes as its profile. Metadata only: no pixels are logged."""
    import hashlib
    import json

    from mlflow.entities import Dataset as DatasetEntity, DatasetInput, InputTag
    source = manifest["source"]
    name = source.rstrip("/").rsplit("/", 1)[-1] or source
    source_type = "s3" if source.startswith("s3://") else \
        "code" if manifest["kind"] == "fashion-mnist" else "local"
    inputs = []
    for split, context in (("train", "train"), ("val", "validation"), ("test", "test")):
        ids = manifest["splits"][split]
        digest = hashlib.sha256(f"{manifest['digest']}:{split}:{json.dumps(ids)}".encode())
        profile = {"images": len(ids), "classes": len(manifest["class_names"]),
                   "image_shape": manifest["image_shape"], "content_digest": manifest["digest"],
                   "split_rule": manifest.get("split_rule"), "skipped_files": manifest.get("skipped", 0)}
        entity = DatasetEntity(name=name, digest=digest.hexdigest()[:16], source_type=source_type,
                               source=json.dumps({"uri": source}), profile=json.dumps(profile))
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)]))
    retry(lambda: client().log_inputs(run_id, datasets=inputs))
