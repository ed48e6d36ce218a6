"""MLflow: the experiment, one parent run per pipeline run, one child run per variant.

Runs are addressed by id through `MlflowClient` (never the fluent "active run"), because each
Airflow task may run in another process or on another worker. Creation is idempotent: the parent
run is found by its `pipeline_run_id` tag (the Airflow run id) and a child run by parent + variant,
so a retried task never duplicates runs.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import PROJECT_ROOT

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


def client():
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
    if tracking_uri().startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (LOCAL_STORE / "artifacts").as_uri()
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


def child_run(parent_run_id: str, variant_tags: dict[str, str]) -> str:
    """The child run of `parent_run_id` for one variant, created once."""
    mlflow_client = client()
    parent = mlflow_client.get_run(parent_run_id)
    variant = variant_tags["variant"]
    found = mlflow_client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.variant = '{_quote(variant)}'",
        max_results=1)
    if found:
        run_id = found[0].info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        if "error" in found[0].data.tags:  # a retry after a failure: start clean
            mlflow_client.delete_tag(run_id, "error")
        return run_id
    run = mlflow_client.create_run(parent.info.experiment_id, run_name=variant, tags={
        "mlflow.parentRunId": parent_run_id, "run_role": "variant",
        "pipeline_run_id": parent.data.tags.get("pipeline_run_id", ""), **variant_tags})
    return run.info.run_id


def log_params(run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if v is not None]
    if items:
        _retry(lambda: client().log_batch(run_id, params=items))


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
    if items:
        _retry(lambda: client().log_batch(run_id, metrics=items))


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag
    items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
    if items:
        _retry(lambda: client().log_batch(run_id, tags=items))


def log_artifact(run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
    _retry(lambda: client().log_artifact(run_id, str(local_path), artifact_path))


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    _retry(lambda: client().log_dict(run_id, data, artifact_file))


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    _retry(lambda: client().set_terminated(run_id, status=status))


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


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _retry(action, attempts: int = 3, delay: float = 2.0):
    """Ride out a brief tracking-server hiccup; a longer outage surfaces to Airflow's retries."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(delay * (attempt + 1))
