"""Reliability through Airflow: bad input, a technique that cannot handle a layer, injected
faults, and what is left afterwards: counts of DAG runs, task tries, MLflow runs and registry
versions, never a duplicate, never a half-written file taken for a whole one.

- Bad input: each case is one DAG run (`dag.test`, pipeline.airflow_adapter.launch.run_dag, on the session's
  Airflow DB) that fails in `train` at once (AirflowFailException: no retry) with the clear
  message, adds no MLflow run and no registry version. An unknown variant is refused by the
  trigger form's schema before a DAG run exists.
- A layer QAT cannot quantize: only the qat-int8 variant fails, its reason is in its MLflow child
  run and the summary, the DAG run succeeds.
- Faults, against a real `mlflow server` (tests/servers.py) that the test stops, kills and restarts
  on the same port with the same backend store: down when the run starts, killed in the middle of
  `variant.quantize` (after the child run exists) and of `register` (after the model version
  exists). Airflow's retries (which `dag.test` honours in 3.3.2: it waits for `retry_delay`, with
  the exponential backoff, then runs the next try) finish the run: one parent run, one child run
  per variant, one registry version.
- A `python -m pipeline run` process killed (SIGKILL) while quantizing, then the same stages re-run
  with the same pipeline run id: the baseline is reused, the result is the same, every file under
  its final name is whole.

`dag.test` logs to this process's stdout and writes no task log files; the tests read each task
attempt's exception from `dag.test`'s in-process task runner instead (fixture `attempts`).

Not repeated here: the command line on bad input (tests/test_cli.py); an S3 outage behind the
MLflow server (tests/test_s3.py: uploads fail naming the artifact store, nothing is registered).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import QUICK
from tests.servers import ServerProcess, running_mlflow_server, server_env

pytestmark = pytest.mark.pipeline  # DAG runs through Airflow with injected faults; make test-stack

ROOT = Path(__file__).resolve().parent.parent
TINY = {**QUICK, "variants": ["float32", "dynamic"]}
CONTRACT_METRICS = ("accuracy", "accuracy_delta_pts", "size_bytes", "gzip_size_bytes",
                    "compression_ratio", "gzip_compression_ratio", "latency_ms_p50",
                    "latency_ms_p90", "peak_memory_mb")


# ------------------------------------------------------------------------------------- helpers
def _state(value) -> str:
    return str(getattr(value, "value", value))


class Attempt:
    """One task attempt as `dag.test` ran it: its end state and what it raised."""

    def __init__(self, ti, result):
        self.task_id, self.map_index, self.try_number = ti.task_id, ti.map_index, ti.try_number
        self.state = _state(result.state) if result is not None else "failed"
        self.error = result.error if result is not None else None

    def __repr__(self):
        error = f" ({type(self.error).__name__}: {self.error})" if self.error else ""
        return f"{self.task_id}[{self.map_index}] try {self.try_number}: {self.state}{error}"


class Attempts(list):
    """The attempts so far; `after` callbacks run after each one (before dag.test goes on)."""

    def __init__(self):
        super().__init__()
        self.after = []

    def of(self, task_id: str) -> list[Attempt]:
        return [a for a in self if a.task_id == task_id]


@pytest.fixture
def attempts(monkeypatch) -> Attempts:
    """Every task attempt of the `dag.test` runs in this test, with its exception: dag.test runs
    each attempt through `airflow.sdk.definitions.dag._run_task`, which returns the in-process
    task run's result (state and exception)."""
    from airflow.sdk.definitions import dag as sdk_dag
    recorded = Attempts()
    original = sdk_dag._run_task

    def recording(*, ti, task, run_triggerer=False):
        result = original(ti=ti, task=task, run_triggerer=run_triggerer)
        attempt = Attempt(ti, result)
        recorded.append(attempt)
        for callback in recorded.after:
            callback(attempt)
        return result

    monkeypatch.setattr(sdk_dag, "_run_task", recording)
    return recorded


@pytest.fixture(autouse=True)
def restore_mlflow_tracking_uri():
    """Tests here point the pipeline at their own tracking stores, and pipeline.store.tracking sets
    MLflow's process-wide tracking URI: put it back for the tests that follow."""
    import mlflow
    previous = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(previous)


def task_instances(run_id: str) -> dict[str, list]:
    """task_id -> its task instances (one per map index) of one `model_compression` run."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session
    found: dict[str, list] = {}
    with create_session() as session:
        for ti in session.query(TaskInstance).filter_by(dag_id="model_compression", run_id=run_id):
            session.expunge(ti)
            found.setdefault(ti.task_id, []).append(ti)
    return found


def dag_run_count() -> int:
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    with create_session() as session:
        return session.query(DagRun).filter_by(dag_id="model_compression").count()


def registry_version_count(client) -> int:
    return len(client.search_model_versions(max_results=10_000))


def parent_runs(client, airflow_run_id: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.pipeline_run_id = '{airflow_run_id}'"
                                                         " and tags.run_role = 'parent'")


def children_of(client, parent_run_id: str) -> list:
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def _npz(path: Path, **override) -> str:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((40, 28, 28, 1), dtype=np.float32), "y_train": np.arange(40) % 10,
              "x_test": rng.random((20, 28, 28, 1), dtype=np.float32), "y_test": np.arange(20) % 10}
    arrays.update(override)
    np.savez(path, **arrays)
    return str(path)


def _image_folder(root: Path, classes: list[str], per_class: int = 3) -> str:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    return str(root)


MARKER_CODE = "lambda x: (__import__('pathlib').Path({marker!r}).write_text('ran'), x)[1]"


def lambda_model(path: Path, marker: Path) -> str:
    """A tf_keras model whose Lambda layer writes `marker` whenever its code runs (building the
    model here runs it: the marker is removed after saving)."""
    import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow is imported)
    import tf_keras
    function = eval(MARKER_CODE.format(marker=str(marker)))  # noqa: S307 (our own constant)
    model = tf_keras.Sequential([tf_keras.Input((28, 28, 1)), tf_keras.layers.Lambda(function),
                                 tf_keras.layers.Flatten(), tf_keras.layers.Dense(10)])
    model.save(str(path))
    marker.unlink(missing_ok=True)
    return str(path)


def saved_model_without_signature(path: Path) -> str:
    import pipeline  # noqa: F401
    import tensorflow as tf
    module = tf.Module()
    module.kernel = tf.Variable(tf.zeros((784, 10)))
    tf.saved_model.save(module, str(path))
    assert (path / "saved_model.pb").exists()
    return str(path)


# ------------------------------------------------------------------------------ bad input
# (case, the message `train` fails with)
BAD_INPUTS = [
    ("missing_dataset", "dataset not found"),
    ("corrupt_model", "cannot load model broken.h5"),
    ("single_class_folder", "has 1 class subfolder(s): a classifier needs at least 2"),
    ("labels_out_of_range", "labels out of range"),
    ("nan_pixels", "holds NaN or infinite values"),
    ("input_shape_mismatch", "the model takes inputs of shape (28, 28, 1)"),
    ("class_count_mismatch", "the model has 10 outputs but the dataset"),
    ("saved_model_without_signature", "has no 'serving_default' signature"),
    ("lambda_layer", "contains Lambda layer(s), whose code would run when loaded: refused"),
    ("empty_test_split", "x_test is empty"),
]


def bad_conf(case: str, tmp_path: Path, tiny_model_path: Path) -> dict:
    model = str(tiny_model_path)
    if case == "missing_dataset":
        return {"dataset": str(tmp_path / "nowhere")}
    if case == "corrupt_model":
        broken = tmp_path / "broken.h5"
        broken.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 300)  # an HDF5 signature, then nothing
        return {"model_path": str(broken)}
    if case == "single_class_folder":
        return {"dataset": _image_folder(tmp_path / "one-class", ["only"])}
    if case == "labels_out_of_range":
        return {"model_path": model, "dataset": _npz(tmp_path / "labels.npz",
                                                     y_test=np.arange(20) % 10 + 5)}
    if case == "nan_pixels":
        x_test = np.random.default_rng(1).random((20, 28, 28, 1), dtype=np.float32)
        x_test[3, 4, 5, 0] = np.nan
        return {"dataset": _npz(tmp_path / "nan.npz", x_test=x_test)}
    if case == "input_shape_mismatch":
        rng = np.random.default_rng(2)
        return {"model_path": model, "dataset": _npz(
            tmp_path / "rgb32.npz", x_train=rng.random((40, 32, 32, 3), dtype=np.float32),
            x_test=rng.random((20, 32, 32, 3), dtype=np.float32))}
    if case == "class_count_mismatch":
        return {"model_path": model,
                "dataset": _image_folder(tmp_path / "three-classes", ["a", "b", "c"])}
    if case == "saved_model_without_signature":
        return {"model_path": saved_model_without_signature(tmp_path / "no-signature")}
    if case == "lambda_layer":
        return {"model_path": lambda_model(tmp_path / "lambda.keras", tmp_path / "lambda-ran")}
    if case == "empty_test_split":
        return {"dataset": _npz(tmp_path / "empty-test.npz", x_test=np.zeros((0, 28, 28, 1), np.float32),
                                y_test=np.zeros((0,), np.int64))}
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_train_once_with_a_clear_message(airflow_db, tmp_path, tiny_model_path,
                                                        attempts, case, message):
    from airflow.sdk.exceptions import AirflowFailException
    from mlflow import MlflowClient

    from pipeline.airflow_adapter.launch import run_dag
    client = MlflowClient()
    versions_before = registry_version_count(client)
    conf = {**TINY, **bad_conf(case, tmp_path, tiny_model_path),
            "experiment": "reliability-bad-input", "registered_model_name": "reliability-bad-input"}
    dag_run, ctx = run_dag(conf)

    assert _state(dag_run.state) == "failed", (case, attempts)
    tis = task_instances(dag_run.run_id)
    (train,) = tis["train"]
    assert _state(train.state) == "failed"
    assert train.try_number == 1, f"{case}: train was retried: {attempts}"
    (attempt,) = attempts.of("train")
    # AirflowFailException: failed at once with the message, never up_for_retry.
    assert isinstance(attempt.error, AirflowFailException), attempts
    assert message in str(attempt.error), f"{case}: {attempt.error}"
    assert "Traceback" not in str(attempt.error) and len(str(attempt.error).splitlines()) == 1
    assert ctx is None  # train never completed
    # Nothing downstream ran or was retried: each task ran at most once, none succeeded after
    # train (plan and recipes need no training).
    assert all(a.try_number == 1 for a in attempts), attempts
    for name, instances in tis.items():
        for ti in instances:
            assert ti.try_number <= 1, (name, ti.try_number)
            if name not in ("plan", "recipes"):
                assert _state(ti.state) != "success", (name, ti.state)
    assert registry_version_count(client) == versions_before
    assert parent_runs(client, dag_run.run_id) == []  # input checks come before any MLflow run
    if case == "lambda_layer":
        marker = tmp_path / "lambda-ran"
        assert not marker.exists(), "the Lambda layer's code ran"
        # The marker does work: loading the model as an unsafe one runs the Lambda's code.
        from pipeline.sources.models import load_model
        load_model(conf["model_path"], allow_unsafe=True)
        assert marker.read_text() == "ran"


def test_unknown_variant_is_rejected_by_the_trigger_form_before_any_task(airflow_db):
    from airflow.sdk.exceptions import ParamValidationError

    from pipeline.airflow_adapter.launch import run_dag
    runs_before = dag_run_count()
    with pytest.raises(ParamValidationError, match="int9"):
        run_dag({**TINY, "variants": ["float32", "int9"], "experiment": "reliability-bad-input"})
    # dag.test raises before it creates the DAG run: no run, so no task (train included) ran.
    assert dag_run_count() == runs_before


# --------------------------------------------------------------- a layer QAT cannot quantize
@pytest.fixture(scope="module")
def layernorm_model_path(small_dataset, tmp_path_factory) -> str:
    """A small tf_keras classifier for Fashion-MNIST with a LayerNormalization layer, which
    TF-MOT's QAT has no quantize config for; trained one epoch."""
    from pipeline.techniques.train import compile_classifier, fit
    from tests.conftest import layernorm_classifier
    model = layernorm_classifier(small_dataset)
    compile_classifier(model, 2e-3)
    fit(model, small_dataset, epochs=1, batch_size=64)
    path = tmp_path_factory.mktemp("layernorm") / "layernorm.keras"
    model.save(str(path))
    return str(path)


def test_a_layer_qat_cannot_quantize_fails_only_that_variant(airflow_db, layernorm_model_path,
                                                           attempts):
    from airflow.sdk.exceptions import AirflowFailException
    from mlflow import MlflowClient

    from pipeline.airflow_adapter.launch import run_dag
    variants = ["float32", "dynamic", "qat-int8"]
    dag_run, ctx = run_dag({**TINY, "variants": variants, "model_path": layernorm_model_path,
                            "experiment": "reliability-qat",
                            "registered_model_name": "reliability-qat-model"})
    assert _state(dag_run.state) == "success", attempts

    # optimize (recipe qat) fails once, with the technique's reason; no retry.
    (optimized,) = attempts.of("optimize")
    assert isinstance(optimized.error, AirflowFailException), attempts
    reason = "qat: TF Model Optimization cannot handle layer 'layer_normalization' (LayerNormalization)"
    assert str(optimized.error).startswith(reason), optimized.error
    tis = task_instances(dag_run.run_id)
    qat_index = variants.index("qat-int8")
    for name in ("variant.quantize", "variant.evaluate", "variant.benchmark"):
        states = {ti.map_index: _state(ti.state) for ti in tis[name]}
        expected_qat = "failed" if name == "variant.quantize" else "upstream_failed"
        assert states == {0: "success", 1: "success", qat_index: expected_qat}, (name, states)
    for name in ("plan", "recipes", "train", "select", "register"):
        assert [_state(ti.state) for ti in tis[name]] == ["success"], (name, attempts)
    assert all(a.try_number == 1 for a in attempts), attempts  # nothing was retried

    client = MlflowClient()
    children = {run.data.tags["variant"]: run for run in children_of(client, ctx["parent_run_id"])}
    assert sorted(children) == sorted(variants)
    qat_run = children["qat-int8"]
    assert qat_run.info.status == "FAILED"
    assert qat_run.data.tags["error"].startswith("optimization 'qat' failed: ")
    assert reason in qat_run.data.tags["error"]
    for name in ("float32", "dynamic"):
        assert children[name].info.status == "FINISHED"
        assert set(CONTRACT_METRICS) <= set(children[name].data.metrics), name

    # What select and register recorded on the parent run (any worker may have run them).
    from pipeline.store import artifacts
    from pipeline import stages
    selected = artifacts.load_json(ctx["parent_run_id"], stages.SELECTION_RECORD)
    assert selected["failed_variants"] == ["qat-int8"]
    assert (selected["variants_ok"], selected["variants_total"]) == (2, 3)
    (qat_result,) = [r for r in selected["results"] if r["variant"] == "qat-int8"]
    assert qat_result["status"] == "failed" and reason in qat_result["error"], qat_result
    summary = artifacts.fetch(f"runs:/{ctx['parent_run_id']}/report/summary.md").read_text()
    assert summary == selected["summary_markdown"]
    assert "1 failed" in summary
    (qat_row,) = [line for line in summary.splitlines() if "qat-int8" in line and "|" in line]
    assert "failed: optimization 'qat' failed" in qat_row, qat_row
    registered = artifacts.load_json(ctx["parent_run_id"], stages.REGISTER_RECORD)
    assert registered["name"] == "reliability-qat-model" and registered["version"]
    version = client.get_model_version("reliability-qat-model", registered["version"])
    assert version.tags["parent_run_id"] == ctx["parent_run_id"]


# ------------------------------------------------------------------------------------ faults
def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class MlflowOutage:
    """A real `mlflow server` that the test stops or kills (SIGKILL, like a crash) and restarts
    on the same port with the same backend store and artifact folder, like an operator would."""

    ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runner: fewer processes

    def __init__(self, url: str, server: ServerProcess):
        self.url, self.server, self.down = url, server, False
        self.events: list[str] = []

    def kill(self, why: str) -> None:
        os.killpg(self.server.pgid, signal.SIGKILL)
        self.server.stop()  # reaps it; asserts no process of it is left
        assert not healthy(self.url)
        self.down = True
        self.events.append(f"killed {why}")

    def restart(self, why: str) -> None:
        self.server = ServerProcess(self.server.name, self.server.command, server_env(self.ENV),
                                    self.server.log_path)
        self.server.wait_until(lambda: healthy(self.url), 180, "answer after the restart")
        self.down = False
        self.events.append(f"restarted {why}")


@pytest.fixture
def mlflow_outage(tmp_path, monkeypatch):
    """A tracking server of this test's own (SQLite backend, local artifact folder) that every
    MLflow call of the pipeline goes to; MLflow's client retries a refused connection twice at
    once instead of 7 times over minutes, so an outage surfaces to Airflow's retries quickly."""
    with running_mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"),
                               MlflowOutage.ENV, tmp_path) as (url, server):
        outage = MlflowOutage(url, server)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
        monkeypatch.setenv("PIPELINE_WORK_DIR", str(tmp_path / "work"))
        try:
            yield outage
        finally:
            outage.server.stop()


def test_mlflow_outages_are_ridden_out_by_retries_without_duplicates(airflow_db, attempts,
                                                                     mlflow_outage, monkeypatch):
    """(a) the server is down when the run starts; (b) it is killed in the middle of
    `variant.quantize`, after the variant's child run was created; (c) it is killed in the middle
    of `register`, after the model version was created. Each time it comes back while the failed
    task waits for its retry. Then: the run succeeded, and MLflow holds one parent run, one child
    run per variant and one registry version: the retries found what the failed tries created."""
    from mlflow import MlflowClient

    from pipeline.selection import champion
    from pipeline.store import tracking
    from pipeline.airflow_adapter.launch import run_dag
    outage = mlflow_outage
    monkeypatch.setenv("PIPELINE_RETRY_DELAY_SECONDS", "1")  # read when the DAG is parsed

    crash_points = {"quantize": False, "register": False}
    log_artifact, champion_decision = tracking.log_artifact, champion.champion_decision

    def log_artifact_after_a_crash(run_id, local_path, artifact_path=None):
        if artifact_path == "model" and not crash_points["quantize"]:
            crash_points["quantize"] = True
            outage.kill("in variant.quantize, after its child run was created")
        return log_artifact(run_id, local_path, artifact_path)

    def champion_decision_after_a_crash(*args, **kwargs):
        if not crash_points["register"]:
            crash_points["register"] = True
            outage.kill("in register, after the model version was created")
        return champion_decision(*args, **kwargs)

    def restart_while_the_task_waits_for_its_retry(attempt: Attempt) -> None:
        if outage.down and attempt.state == "up_for_retry":
            outage.restart(f"after {attempt.task_id}[{attempt.map_index}] try "
                           f"{attempt.try_number} failed")

    monkeypatch.setattr(tracking, "log_artifact", log_artifact_after_a_crash)
    monkeypatch.setattr(champion, "champion_decision", champion_decision_after_a_crash)
    attempts.after.append(restart_while_the_task_waits_for_its_retry)

    outage.server.stop()  # (a): down before the run starts
    outage.down = True
    outage.events.append("stopped before the run")
    dag_run, ctx = run_dag({**TINY, "experiment": "reliability-outage",
                            "registered_model_name": "reliability-outage-model"})

    assert outage.events == [
        "stopped before the run", "restarted after train[-1] try 1 failed",
        "killed in variant.quantize, after its child run was created",
        outage.events[3],  # which of the two quantize tasks was hit first
        "killed in register, after the model version was created",
        "restarted after register[-1] try 1 failed"], attempts
    assert outage.events[3].startswith("restarted after variant.quantize[")
    assert _state(dag_run.state) == "success", attempts
    failed = [a for a in attempts if a.state not in ("success", "skipped")]  # skipped: no search
    assert [(a.task_id, a.state) for a in failed] == [
        ("train", "up_for_retry"), ("variant.quantize", "up_for_retry"),
        ("register", "up_for_retry")], attempts
    assert outage.url in str(failed[0].error) and "Connection refused" in str(failed[0].error)
    assert "tracking server" in str(failed[1].error) and "unreachable" in str(failed[1].error)
    tries = {(ti.task_id, ti.map_index): ti.try_number
             for instances in task_instances(dag_run.run_id).values() for ti in instances}
    retried = {key: n for key, n in tries.items() if n > 1}
    hit = failed[1].map_index
    assert retried == {("train", -1): 2, ("variant.quantize", hit): 2, ("register", -1): 2}

    client = MlflowClient(outage.url)
    experiment = client.get_experiment_by_name("reliability-outage")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_role") == "parent"]
    assert [p.info.run_id for p in parents] == [ctx["parent_run_id"]]
    assert parents[0].data.tags["pipeline_run_id"] == dag_run.run_id
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == ctx["parent_run_id"]]
    assert sorted(c.data.tags["variant"] for c in children) == ["dynamic", "float32"]
    assert len(runs) == 3  # nothing else: no duplicate of any run
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["status"] == "ok"
        assert "error" not in child.data.tags
        assert set(CONTRACT_METRICS) <= set(child.data.metrics)
        assert [a.path for a in client.list_artifacts(child.info.run_id, "model")] == [
            "model/model.tflite"]
    versions = client.search_model_versions("name = 'reliability-outage-model'")
    assert len(versions) == 1
    (version,) = versions
    assert version.tags["parent_run_id"] == ctx["parent_run_id"]
    assert version.tags["airflow_run_id"] == dag_run.run_id
    assert version.tags["champion_decision"]  # the retry finished the registration
    champion = client.get_model_version_by_alias("reliability-outage-model", "champion")
    assert champion.version == version.version

    # A retry of a task that had already succeeded changes nothing either.
    from pipeline.store import artifacts
    from pipeline import stages
    recorded = artifacts.load_json(ctx["parent_run_id"], stages.SELECTION_RECORD)
    selected = {k: v for k, v in recorded.items() if k != "results"}  # what select handed on
    assert selected["selection"]["champion"] == version.tags["variant"]
    again = stages.register(ctx, selected)
    assert again["version"] == version.version and again["reused"] is True
    assert len(client.search_model_versions("name = 'reliability-outage-model'")) == 1
    assert len(client.search_runs([experiment.experiment_id])) == 3


# ----------------------------------------------------------------------- a killed process
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_temporary(path: Path) -> bool:
    return ".tmp" in path.name


def assert_whole(run_dir: Path) -> list[str]:
    """Every file under a final name in `run_dir` is complete (it parses); returns the names of
    temporary files (left by a killed write) found beside them."""
    from ai_edge_litert.interpreter import Interpreter
    temporary = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        if any(_is_temporary(part) for part in [path, *path.relative_to(run_dir).parents]
               if part.name):
            temporary.append(str(path.relative_to(run_dir)))
            continue
        if path.suffix == ".tflite":
            Interpreter(model_path=str(path)).allocate_tensors()
        elif path.suffix in (".npz", ".npy"):
            loaded = np.load(path, allow_pickle=False)
            if hasattr(loaded, "close"):
                [loaded[k] for k in loaded.files]
                loaded.close()
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None, path
        elif path.suffix == ".md":
            assert path.read_text().startswith("# Model compression summary"), path
    return temporary


def test_a_run_killed_while_quantizing_resumes_with_the_same_result(tmp_path, monkeypatch,
                                                                   caplog):
    from mlflow import MlflowClient

    from pipeline.__main__ import run_pipeline
    work, store = tmp_path / "work", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, PIPELINE_WORK_DIR=str(work), MLFLOW_TRACKING_URI=store)
    command = [sys.executable, "-m", "pipeline", "run", "--epochs", "1", "--train-limit", "1200",
               "--test-limit", "500", "--variants", "float32,dynamic",
               "--experiment", "reliability-kill", "--registered-model-name", "reliability-kill",
               "--set", "latency_runs=20", "--set", "latency_warmup=3"]
    with open(tmp_path / "killed-run.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            # The first variant's .tflite is being written or was just written: quantizing.
            while not list(work.glob("*/variants")):
                assert process.poll() is None, (tmp_path / "killed-run.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the run never reached quantization"
                time.sleep(0.02)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    from pipeline.store import artifacts
    (run_dir,) = [p for p in work.iterdir() if p.name != "cache"]
    left_behind = assert_whole(run_dir)  # a kill leaves no half-written file under a final name
    ctx = json.loads((run_dir / "context.json").read_text())
    # This process reads the same store, and its stages use the same scratch folder.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("PIPELINE_WORK_DIR", str(work))
    # What train handed on is in the artifact store, whole (fetch checks each file's digest).
    stored_baseline = artifacts.fetch(ctx["base_model_uri"])
    reference = artifacts.fetch(ctx["reference"]["tflite_uri"])
    for uri in (ctx["dataset_uri"], ctx["baseline_predictions_uri"]):
        artifacts.fetch(uri)
    baseline = run_dir / "baseline.keras"
    assert _sha256(baseline) == _sha256(stored_baseline)
    before = {"baseline": _sha256(baseline), "baseline_mtime": baseline.stat().st_mtime_ns,
              "stored_baseline_mtime": stored_baseline.stat().st_mtime_ns,
              "reference": _sha256(reference)}
    # The worst a kill could leave: half-written files under every temporary name the stages
    # use (the killed process's pid in those that carry one). None of them may be taken for the
    # file it was meant to become. (temporary name -> (final name, content))
    pid = process.pid
    planted = {
        run_dir / "baseline.tmp.keras": (baseline, baseline.read_bytes()[:1000]),
        run_dir / f".dataset.json.tmp-{pid}": (run_dir / "dataset.json",
                                               (run_dir / "dataset.json").read_bytes()[:1000]),
        run_dir / f".context.json.tmp-{pid}": (run_dir / "context.json",
                                               b'{"pipeline_run_id": "trunc'),
        run_dir / "keras_predictions" / f".baseline.npy.tmp-{pid}": (
            run_dir / "keras_predictions" / "baseline.npy",
            (run_dir / "keras_predictions" / "baseline.npy").read_bytes()[:100]),
        run_dir / "reference" / "float32.tflite.tmp": (run_dir / "reference" / "float32.tflite",
                                                       reference.read_bytes()[:1000]),
        run_dir / "variants" / "dynamic" / "model.tflite.tmp": (
            run_dir / "variants" / "dynamic" / "model.tflite", reference.read_bytes()[:1000]),
        run_dir / f".select.json.tmp-{pid}": (run_dir / "select.json", b'{"selection": {"cha'),
    }
    for path, (_, data) in planted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    # The same stages again, with the same pipeline run id (what a retry does).
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert run_pipeline(ctx["config"], ctx["pipeline_run_id"]) == 0
    assert (f"reusing the baseline trained by an earlier attempt: {ctx['base_model_uri']}"
            in caplog.text)
    after = json.loads((run_dir / "context.json").read_text())
    assert after["base_model_uri"] == ctx["base_model_uri"]  # the same file, the same digest
    assert _sha256(baseline) == before["baseline"]
    assert baseline.stat().st_mtime_ns == before["baseline_mtime"]  # not trained again
    # nor stored again
    assert artifacts.fetch(after["base_model_uri"]).stat().st_mtime_ns == \
        before["stored_baseline_mtime"]
    assert _sha256(artifacts.fetch(after["reference"]["tflite_uri"])) == before["reference"]
    assert after["reference"] == ctx["reference"] and after["parent_run_id"] == ctx["parent_run_id"]
    assert not [v for v in json.dumps(after).split('"') if ".tmp" in v]

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("reliability-kill")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3, [(r.data.tags.get("run_role"), r.data.tags.get("variant")) for r in runs]
    parent = client.get_run(ctx["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["launcher"] == "cli"
    # The killed attempt and the re-run measured the same baseline.
    for metric in ("keras_accuracy", "reference_accuracy", "reference_size_bytes"):
        history = {m.value for m in client.get_metric_history(parent.info.run_id, metric)}
        assert len(history) == 1, (metric, history)
    children = {r.data.tags["variant"]: r for r in runs if r.info.run_id != parent.info.run_id}
    assert sorted(children) == ["dynamic", "float32"]
    for child in children.values():
        assert child.info.status == "FINISHED" and child.data.tags["status"] == "ok"
        assert set(CONTRACT_METRICS) <= set(child.data.metrics)
    assert children["float32"].data.metrics["accuracy"] == ctx["reference"]["accuracy"]
    assert children["float32"].data.metrics["accuracy_delta_pts"] == 0.0
    assert len(client.search_model_versions("name = 'reliability-kill'")) == 1

    still_temporary = assert_whole(run_dir)  # every final file whole after the re-run too
    for final, data in planted.values():  # and no planted half-file became a final one
        assert final.read_bytes() != data, final
    # Every file in the artifact store (what the tasks handed on, the registered model) is whole.
    assert not assert_whole(tmp_path / "artifacts")
    print(f"left behind by the kill: {left_behind}; temporary files after the re-run: "
          f"{still_temporary}")
