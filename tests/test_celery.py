"""`make up EXECUTOR=celery WORKERS=2` for real: PostgreSQL, Redis, moto_server (S3), the MLflow
server and Airflow on the CeleryExecutor with two workers, `worker-1` on queue `training` and
`worker-2` on queue `default`, all under supervisord, on free loopback ports, in a temporary
folder (the stack's, its Airflow home); `make down` at the end, which must leave no process.

A DAG run triggered through the REST API must spread over both workers as the DAG's queues say,
hand files between them through the artifact store (the workers share no folder), put the
variants' models into the S3 bucket and register a champion. The slow test kills a worker in the
middle of a task: Airflow retries the task once supervisord has restarted the worker, and the run
completes without duplicate MLflow runs.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest

from conftest_stack import DAG_ID, ROOT, Stack, free_port, port_listening

pytestmark = [pytest.mark.celery, pytest.mark.stack]

EXPERIMENT = "model-compression"  # the default: the stack's MLflow store is new
MODEL_NAME = "fashion-mnist-classifier"
VARIANTS = ["float32", "dynamic", "int8", "prune-int8", "cluster-dynamic"]
RUN_CONF = {"epochs": 1, "train_limit": 1200, "test_limit": 300, "variants": VARIANTS,
            "prune_epochs": 1, "finetune_epochs": 1}
PROGRAMS = ("postgres", "redis", "s3", "mlflow", "airflow-api-server", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "worker-1", "worker-2")
TRAINING_TASKS = ("train", "optimize")
BUCKET = "mlflow"


class CeleryStack(Stack):
    """The Celery stack, started and stopped with `make` like a user would."""

    def __init__(self, base: Path):
        super().__init__(base)
        for name in ("MLFLOW_BACKEND_URI", "MLFLOW_ARTIFACTS_DESTINATION", "PIPELINE_WORK_DIR",
                     "MLFLOW_BUCKET"):
            self.env.pop(name, None)
        for name in [n for n in self.env if n.startswith(("AWS_", "MLFLOW_S3_"))]:
            del self.env[name]  # no endpoint given: the stack runs moto_server
        taken = {self.mlflow_port, self.airflow_port}
        self.postgres_port = free_port(taken)
        self.redis_port = free_port(taken | {self.postgres_port})
        self.s3_port = free_port(taken | {self.postgres_port, self.redis_port})
        self.env.update({
            "EXECUTOR": "celery", "WORKERS": "2",
            "POSTGRES_PORT": str(self.postgres_port), "REDIS_PORT": str(self.redis_port),
            "S3_PORT": str(self.s3_port),
            # A killed worker's task is noticed after a minute, not five; retried 5 s later.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
            "PIPELINE_RETRY_DELAY_SECONDS": "5",
        })

    def make(self, target: str, timeout: float = 900) -> subprocess.CompletedProcess:
        # AIRFLOW_HOME on make's command line: the Makefile's own assignment would win otherwise.
        command = ["make", "--no-print-directory", target, "EXECUTOR=celery", "WORKERS=2",
                   f"STACK_DIR={self.stack_dir}", f"AIRFLOW_HOME={self.base / 'airflow'}"]
        return subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)

    def up(self) -> None:
        result = self.make("up")
        assert result.returncode == 0, f"make up failed:\n{result.stdout}\n{result.stderr}"
        self.up_output = result.stdout

    def down(self):
        self.stopped = True
        return self.make("down", timeout=600)

    def program_env(self, name: str) -> dict[str, str]:
        """The environment supervisord gives a program: its own, plus the program's section of
        supervisord.conf as supervisord reads it. (Not the program's /proc/PID/environ: Airflow's
        and Celery's process titles overwrite it.)"""
        from supervisor.options import ServerOptions

        options = ServerOptions()
        options.realize(args=["-c", str(self.stack_dir / "supervisord.conf")])
        sections = {config.name: config.environment or {}
                    for group in options.process_group_configs for config in group.process_configs}
        supervisord = int((self.stack_dir / "supervisord.pid").read_text())
        return {**psutil.Process(supervisord).environ(), **sections[name]}

    def s3_client(self):
        import boto3
        # moto takes any credentials; the stack's own are the MLflow server's business.
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.s3_port}",
                            aws_access_key_id="test", aws_secret_access_key="test",
                            region_name="us-east-1")

    def task_instances(self, run_id: str) -> list[dict]:
        import urllib.parse
        status, body = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/"
                                           f"{urllib.parse.quote(run_id, safe='')}/taskInstances?limit=200")
        assert status == 200, (status, body)
        return body["task_instances"]


@pytest.fixture(scope="module")
def celery_stack():
    # Directly under the system temp folder, readable by others: PostgreSQL runs as the user
    # `postgres` (it refuses root), which must reach its data folder (the session's temporary
    # folder is private to this user).
    base = Path(tempfile.mkdtemp(prefix="celery-stack-"))
    base.chmod(0o755)
    stack = CeleryStack(base)
    try:
        stack.up()
        stack.wait_for_dag()
        stack.unpause()
        stack.processes_at_start = stack.processes()
        yield stack
    finally:
        before = {p.pid: p for p in stack.processes()}
        result = stack.down()
        with contextlib.suppress(psutil.Error):
            psutil.wait_procs(list(before.values()), timeout=10)
        left = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in stack.processes()]
        still = [pid for pid, p in before.items() if _alive(p)]
        shutil.rmtree(base, ignore_errors=True)
        assert result.returncode == 0, f"make down failed:\n{result.stdout}\n{result.stderr}"
        assert not left and not still, f"processes left after make down: {left} {still}"
        for port in (stack.mlflow_port, stack.airflow_port, stack.postgres_port, stack.redis_port,
                     stack.s3_port):
            assert not port_listening(port), f"port {port} still listening after make down"


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_every_process_runs_and_both_workers_serve_their_queue(celery_stack: CeleryStack):
    stack = celery_stack
    report = stack.status_json()
    assert report["executor"] == "celery"
    assert {name: p["state"] for name, p in report["programs"].items()} == \
        {name: "running" for name in PROGRAMS}
    queues = {name.split("@")[0]: q for name, q in report["workers"].items()}
    assert queues == {"worker-1": ["training"], "worker-2": ["default"]}

    text = stack.make("status")
    assert text.returncode == 0, text.stderr
    lines = {line.split()[0]: line for line in text.stdout.splitlines() if line.strip()}
    for name in PROGRAMS:
        assert "running" in lines[name] and str(report["programs"][name]["pid"]) in lines[name]
    assert stack.airflow_url in lines["airflow-api-server"] and stack.mlflow_url in lines["mlflow"]
    assert "queues training" in lines["worker-1"] and "queues default" in lines["worker-2"]
    for url in (stack.mlflow_url, stack.airflow_url, f"http://127.0.0.1:{stack.s3_port}"):
        assert url in stack.up_output

    status, health = stack.request("GET", "/api/v2/monitor/health", auth=False)
    assert status == 200
    assert {name: part["status"] for name, part in health.items() if isinstance(part, dict)} == \
        {"metadatabase": "healthy", "scheduler": "healthy", "triggerer": "healthy",
         "dag_processor": "healthy"}
    assert stack.request("GET", "/api/v2/importErrors")[1]["total_entries"] == 0


def test_servers_listen_on_loopback_only(celery_stack: CeleryStack):
    stack = celery_stack
    ours = {p.pid for p in stack.processes()}
    listening = [c for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert all(c.laddr.ip == "127.0.0.1" for c in listening), [(c.laddr, c.pid) for c in listening]
    assert {c.laddr.port for c in listening} == {
        stack.mlflow_port, stack.airflow_port, stack.postgres_port, stack.redis_port, stack.s3_port}


def test_each_worker_has_its_name_and_folder_and_no_s3_credentials(celery_stack: CeleryStack):
    stack = celery_stack
    folders = set()
    for name in ("worker-1", "worker-2"):
        env = stack.program_env(name)
        assert env["PIPELINE_WORKER_NAME"] == name
        assert env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] == "pipeline.airflow_adapter.worker_name.worker_name"
        assert Path(env["PIPELINE_WORK_DIR"]) == stack.stack_dir / "workers" / name
        folders.add(env["PIPELINE_WORK_DIR"])
        assert not [k for k in env if k.startswith(("AWS_", "MLFLOW_S3_"))], name
        # The callable Airflow calls for a task instance's hostname, in the worker's environment.
        named = subprocess.run([sys.executable, "-c", "from pipeline.airflow_adapter.worker_name import worker_name; "
                                "print(worker_name())"], env=env, capture_output=True, text=True,
                               cwd=ROOT)
        assert named.stdout.strip() == name, named.stderr
    assert len(folders) == 2
    mlflow_env = psutil.Process(stack.status_json()["programs"]["mlflow"]["pid"]).environ()
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{stack.s3_port}"
    assert mlflow_env["AWS_ACCESS_KEY_ID"] and "postgresql://" in mlflow_env["MLFLOW_BACKEND_STORE_URI"]
    assert stack.s3_client().head_bucket(Bucket=BUCKET)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_a_run_spreads_over_the_workers_by_queue_and_exchanges_files_through_s3(
        celery_stack: CeleryStack):
    stack = celery_stack
    run_id = stack.trigger(RUN_CONF)
    stack.wait_for_run(run_id, timeout=900)

    ran = [t for t in stack.task_instances(run_id) if t["state"] == "success"]
    hosts = {t["hostname"] for t in ran}
    assert hosts == {"worker-1", "worker-2"}, hosts
    for task in ran:
        expected = "worker-1" if task["task_id"] in TRAINING_TASKS else "worker-2"
        assert task["hostname"] == expected, (task["task_id"], task["map_index"], task["hostname"])
        assert task["queue"] == ("training" if task["task_id"] in TRAINING_TASKS else "default")
    assert {t["task_id"] for t in ran} >= {"train", "optimize", "variant.quantize",
                                           "variant.evaluate", "variant.benchmark", "select",
                                           "register"}

    client = stack.mlflow_client()
    parent = stack.parent_run(EXPERIMENT, run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["variant"] for c in children) == sorted(VARIANTS)
    keys = set()
    for page in stack.s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix="artifacts/"):
        keys.update(item["Key"] for item in page.get("Contents", []))
    for child in children:
        if child.data.tags.get("status") == "ok":
            assert any(re.search(rf"/{child.info.run_id}/artifacts/model/model\.tflite$", key)
                       for key in keys), (child.data.tags["variant"], sorted(keys)[:20])
    assert sum(key.endswith("/model/model.tflite") for key in keys) >= \
        sum(c.data.tags.get("status") == "ok" for c in children) >= 1

    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.run_id and champion.version


@pytest.mark.slow
def test_a_worker_killed_during_a_task_is_restarted_and_the_task_retried(celery_stack: CeleryStack):
    stack = celery_stack
    run_id = stack.trigger({**RUN_CONF, "experiment": "celery-kill"})
    deadline = time.monotonic() + 600
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, stack.task_states(run_id)
        for task in stack.task_instances(run_id):
            if task["task_id"] in TRAINING_TASKS and task["state"] == "running":
                victim = task
        time.sleep(1)
    worker = psutil.Process(stack.status_json()["programs"]["worker-1"]["pid"])
    tree = [worker, *worker.children(recursive=True)]
    killed_at = datetime.now(timezone.utc)
    for process in tree:  # the whole worker at once, as an out-of-memory kill or a lost host
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(tree, timeout=10)

    deadline = time.monotonic() + 120
    while True:  # supervisord starts it again
        program = stack.status_json()["programs"]["worker-1"]
        if program["state"] == "running" and program["pid"] != worker.pid and not program["note"]:
            break
        assert time.monotonic() < deadline, program
        time.sleep(2)

    stack.wait_for_run(run_id, timeout=1200)
    finished = stack.task_instances(run_id)
    tries = {(t["task_id"], t["map_index"]): t["try_number"] for t in finished}
    assert tries[(victim["task_id"], victim["map_index"])] >= 2, tries
    retried = next(t for t in finished if (t["task_id"], t["map_index"]) ==
                   (victim["task_id"], victim["map_index"]))
    recovered = datetime.fromisoformat(retried["end_date"].replace("Z", "+00:00")) - killed_at
    print(f"killed worker-1 during {victim['task_id']}: the task succeeded again (try "
          f"{retried['try_number']}) {recovered.total_seconds():.0f} s after the kill")
    parent = stack.parent_run("celery-kill", run_id)  # exactly one
    children = stack.mlflow_client().search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["variant"] for c in children) == sorted(VARIANTS), \
        "one child run per variant, none twice"


if __name__ == "__main__":
    pytest.main([__file__, "-v"])
