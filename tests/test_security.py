"""Secrets in the environment stay out of everything a run writes.

A tiny DAG run (`python -m pipeline.airflow_adapter.launch`, i.e. `make run`: `dag.test` on the session's Airflow
metadata DB) runs with known secrets planted in its environment: S3 credentials, an MLflow
tracking token (sent to the tracking server with every request) and an Airflow connection with a
password. Its tracking server is a real `mlflow server` process (tests/servers.py) with its own
SQLite store and artifact folder. Afterwards no planted value may appear, byte for byte, in:
the run's captured stdout/stderr (with `dag.test` that is every task's log), the Airflow home
(metadata DB file with its XCom, DAG run and rendered-field tables, plus any log files), the
MLflow store (SQLite file bytes, artifact files), the tracking server's log, or the work folder.
Each place is first shown to hold this run's data, so an empty search means something.

Not repeated here (tests/test_stack.py, on `make up`'s stack): servers listen on 127.0.0.1 only,
and Airflow's API and UI refuse requests without a login. tests/test_s3.py checks that the S3
credentials given to the tracking server never reach the pipeline or what it wrote.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import running_mlflow_server

pytestmark = pytest.mark.pipeline  # a whole DAG run against an MLflow server process; make test-stack

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "planted-secret-7Hq2",
    "AWS_ACCESS_KEY_ID": "PLANTEDKEYID7Hq2",
    "MLFLOW_TRACKING_TOKEN": "planted-token-3Vx9",
    "AIRFLOW_CONN_PIPELINE_S3": json.dumps({
        "conn_type": "aws", "login": "planted-login-5Mw1", "password": "planted-conn-pass-R2d8",
        "extra": {"region_name": "us-east-1"}}),
}
PLANTED = ("planted-secret-7Hq2", "PLANTEDKEYID7Hq2", "planted-token-3Vx9", "planted-login-5Mw1",
           "planted-conn-pass-R2d8")
# What keeps the run small: the measurement settings are no DAG Params, so they go through the
# PIPELINE_* environment variables.
QUICK_ENV = {"PIPELINE_LATENCY_RUNS": "20", "PIPELINE_LATENCY_WARMUP": "3",
             "PIPELINE_CALIBRATION_SAMPLES": "64"}
RUN_ARGS = ["--epochs", "1", "--train-limit", "600", "--test-limit", "200",
            "--variants", "float32,dynamic", "--experiment", "security",
            "--registered-model-name", "security-model"]


def leaks(data: bytes) -> list[str]:
    return [secret for secret in PLANTED if secret.encode() in data]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def leaks_in_files(root: Path) -> dict[str, list[str]]:
    found = {}
    for path in files_under(root):
        hits = leaks(path.read_bytes())
        if hits:
            found[str(path)] = hits
    return found


@pytest.fixture(scope="module")
def planted_run(airflow_db, tmp_path_factory):
    """The tracking server (started before anything is planted: the secrets are the client's),
    then one DAG run with the secrets in its environment."""
    root = tmp_path_factory.mktemp("security")
    with running_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"),
                               {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                               root) as (url, server):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW_CONN_"))}
        env.update(SECRETS, **QUICK_ENV, MLFLOW_TRACKING_URI=url,
                   PIPELINE_WORK_DIR=str(root / "work"))
        result = subprocess.run([sys.executable, "-m", "pipeline.airflow_adapter.launch", *RUN_ARGS], cwd=ROOT,
                                env=env, capture_output=True, timeout=1800)
        server_log = server.log_path.read_bytes()
        from mlflow import MlflowClient
        client = MlflowClient(url)
        yield {"result": result, "root": root, "url": url, "client": client,
               "server_log": server_log}


def test_the_run_succeeded_with_the_secrets_in_its_environment(planted_run):
    result = planted_run["result"]
    stdout = result.stdout.decode(errors="replace")
    assert result.returncode == 0, (stdout[-3000:], result.stderr.decode(errors="replace")[-3000:])
    assert re.search(r"DAG run \S+: .*success", stdout), stdout[-2000:]


def airflow_run_id(planted_run) -> str:
    return re.search(r"DAG run (\S+): ", planted_run["result"].stdout.decode()).group(1)


def test_no_secret_in_the_captured_output(planted_run):
    result = planted_run["result"]
    output = result.stdout + result.stderr
    assert b"[DAG TEST] starting task_id=train" in output  # every task's log is in here
    assert b"[DAG TEST] starting task_id=register" in output
    assert leaks(output) == []


def test_no_secret_in_the_airflow_home_its_metadata_db_or_xcom(planted_run):
    home = Path(os.environ["AIRFLOW_HOME"])
    run_id = airflow_run_id(planted_run)
    database = home / "airflow.db"
    assert run_id.encode() in database.read_bytes()
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        xcoms = db.execute("SELECT task_id, value FROM xcom WHERE dag_id = 'model_compression' "
                           "AND run_id = ?", (run_id,)).fetchall()
        rendered = db.execute("SELECT rendered_fields FROM rendered_task_instance_fields WHERE "
                              "dag_id = 'model_compression' AND run_id = ?", (run_id,)).fetchall()
        conf = db.execute("SELECT conf FROM dag_run WHERE run_id = ?", (run_id,)).fetchall()
    assert {"train", "select", "register"} <= {task for task, _ in xcoms}
    for rows in (xcoms, rendered, conf):
        assert rows and leaks(repr(rows).encode()) == []
    # Byte for byte over the whole Airflow home: the DB file (free pages included), its journal,
    # the generated config and passwords, any log file.
    assert leaks_in_files(home) == {}


def test_no_secret_in_the_mlflow_store_or_the_server_log(planted_run):
    client, root = planted_run["client"], planted_run["root"]
    experiment = client.get_experiment_by_name("security")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # the parent and the two variants
    parent = next(r for r in runs if r.data.tags.get("run_role") == "parent")
    assert parent.data.tags["airflow_run_id"] == airflow_run_id(planted_run)
    database = [p for p in root.iterdir() if p.name.startswith("mlflow.db")]
    assert parent.info.run_id.encode() in (root / "mlflow.db").read_bytes()
    for path in database:
        assert leaks(path.read_bytes()) == [], path
    artifacts = files_under(root / "artifacts")
    # The files the tasks handed each other (exchange/), the variants, the parent run's records
    # and the registered model are all there.
    assert {"dataset.json", "baseline.keras", "float32.tflite", "baseline.npy", "model.tflite",
            "summary.md", "selection.json", "register.json", "MLmodel"} <= {p.name for p in artifacts}
    assert leaks_in_files(root / "artifacts") == {}
    assert client.search_model_versions("name = 'security-model'")
    for run in runs:  # the same through the API: params, tags, metrics
        assert leaks(json.dumps(run.to_dictionary()).encode()) == []
    assert b'"POST /api/2.0/mlflow/runs/create HTTP/1.1" 200' in planted_run["server_log"]
    assert leaks(planted_run["server_log"]) == []


def test_no_secret_in_the_work_folder(planted_run):
    work = planted_run["root"] / "work"
    (run_dir,) = [p for p in work.iterdir() if p.name != "cache"]
    assert (run_dir / "context.json").exists() and (run_dir / "register.json").exists()
    # The worker's cache holds what the tasks fetched from the tracking server: the parent run's
    # exchanged files and the variants' models.
    client = planted_run["client"]
    experiment = client.get_experiment_by_name("security")
    (parent,) = [r for r in client.search_runs([experiment.experiment_id])
                 if r.data.tags.get("run_role") == "parent"]
    cached = files_under(work / "cache" / parent.info.run_id)
    assert "dataset.json" in {p.name for p in cached}, cached
    assert "model.tflite" in {p.name for p in files_under(work / "cache")}
    assert leaks_in_files(work) == {}
