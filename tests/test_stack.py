"""`make up` / `make status` / `make down` (scripts/stack.py) for real: MLflow's server and
Airflow's components on loopback, a DAG run triggered through Airflow's REST API as a client
would, its runs found in the MLflow server, and nothing left behind after `down`.

The stack is shared with test_browser.py (see conftest_stack.py); the last test here stops it.
"""
from __future__ import annotations

import contextlib
import socket

import psutil
import pytest

from conftest_stack import API_RUN_CONF, DAG_ID, Stack, free_port, port_listening

pytestmark = pytest.mark.stack

AIRFLOW_COMPONENTS = ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
                      "airflow-triggerer")
SERVICES = ("mlflow", *AIRFLOW_COMPONENTS)


def carrying_stack_dir(stack: Stack) -> list[psutil.Process]:
    """Processes whose environment names this stack's folder: whatever the stack started,
    even one that left its process group and parent."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("STACK_DIR") == str(stack.stack_dir) \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def test_up_starts_every_service_and_says_where(stack):
    assert set(stack.recorded_pids()) == set(SERVICES)
    for name, pid in stack.recorded_pids().items():
        assert psutil.pid_exists(pid), f"{name} (pid {pid}) is not running"
        assert (stack.stack_dir / f"{name}.log").exists()
    out = stack.up_output
    assert stack.mlflow_url in out and stack.airflow_url in out
    assert "simple_auth_manager_passwords.json.generated" in out


def test_up_again_starts_no_duplicates(stack):
    before = stack.recorded_pids()
    result = stack.script("up")
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stdout
    assert stack.recorded_pids() == before
    # Every process started for this stack (they all carry its STACK_DIR) is supervisord or one
    # of its programs or their descendants: nothing was started a second time beside them.
    recorded = {p.pid for p in stack.processes()}
    assert {p.pid for p in carrying_stack_dir(stack)} <= recorded


def test_status_shows_each_process_pid_and_url(stack):
    result = stack.script("status")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for name, pid in stack.recorded_pids().items():
        assert "running" in lines[name] and str(pid) in lines[name], lines[name]
    assert stack.mlflow_url in lines["mlflow"]
    assert stack.airflow_url in lines["airflow-api-server"]


def test_servers_listen_on_loopback_only(stack):
    ours = {p.pid for p in stack.processes()}
    listening = [c for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    ports = {c.laddr.port for c in listening}
    assert {stack.mlflow_port, stack.airflow_port} <= ports
    assert all(c.laddr.ip == "127.0.0.1" for c in listening), \
        [(c.laddr, c.pid, psutil.Process(c.pid).name()) for c in listening]
    # Airflow's log servers (ports 8793/8794 on every interface under `airflow standalone`)
    # are not started.
    assert ports == {stack.mlflow_port, stack.airflow_port}


def test_mlflow_runs_without_job_consumers(stack):
    commands = [" ".join(p.cmdline()) for p in stack.processes()]
    assert not [c for c in commands if "huey" in c or "_job_runner" in c], commands


def test_airflow_api_and_ui_require_a_login(stack):
    for method, path in (("GET", "/api/v2/dags"), ("GET", f"/api/v2/dags/{DAG_ID}"),
                         ("POST", f"/api/v2/dags/{DAG_ID}/dagRuns")):
        status, _ = stack.request(method, path, body={} if method == "POST" else None,
                                  auth=False)
        assert status in (401, 403), f"{method} {path} without a token answered {status}"
    status, body = stack.request("POST", "/auth/token",
                                 {"username": "admin", "password": "not-the-password"}, auth=False)
    assert status in (401, 403), (status, body)
    status, _ = stack.request("GET", "/api/v2/dags")
    assert status == 200


def test_a_dag_run_triggered_through_the_api_logs_to_the_mlflow_server(stack):
    # The stack fixture waited for the DAG to be parsed, unpaused it (PATCH /api/v2/dags/...)
    # and triggered this run (POST .../dagRuns) as soon as the stack was up.
    assert stack.api_run_id, "the stack fixture triggered no run"
    status, errors = stack.request("GET", "/api/v2/importErrors")
    assert status == 200 and errors["total_entries"] == 0, errors
    assert stack.request("GET", f"/api/v2/dags/{DAG_ID}")[1]["is_paused"] is False
    run_id = stack.api_run_id
    run = stack.wait_for_run(run_id)
    assert run["conf"] == API_RUN_CONF
    assert run["triggered_by"] == "rest_api"
    # Nothing but the runs the tests trigger (no scheduled run: see conftest_stack.quiet_schedule).
    assert {r["run_type"] for r in stack.dag_runs()} == {"manual"}

    parent = stack.parent_run("stack-test", run_id)
    assert parent.info.status == "FINISHED"
    client = stack.mlflow_client()
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["variant"] for c in children} == {"float32", "dynamic"}
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags
        assert 0.0 <= child.data.metrics["accuracy"] <= 1.0
        assert child.data.metrics["size_bytes"] > 0
    # Artifacts went through the server's proxy into the stack's artifact folder.
    reports = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/summary.md" in reports
    assert list((stack.base / "mlflow" / "artifacts").rglob("summary.md"))


def test_port_in_use_is_reported_before_anything_starts(stack, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = dict(stack.env, STACK_DIR=str(tmp_path / "stack"), AIRFLOW_HOME=str(tmp_path / "af"),
                   MLFLOW_PORT=str(free_port({port})), AIRFLOW_PORT=str(port))
        result = stack.script("up", env=env, timeout=120)
    assert result.returncode == 1
    assert f"port {port} is in use by another program" in result.stderr
    assert "set AIRFLOW_PORT=" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "stack").glob("*.pid")), "supervisord was started"


def test_down_stops_every_process_and_frees_the_ports(stack: Stack):
    pids = {p.pid for p in stack.processes()}
    assert len(pids) >= len(SERVICES) + 1  # and supervisord
    result = stack.down()
    assert result.returncode == 0, result.stderr
    for name in SERVICES:
        assert f"{name}" in result.stdout
    assert not stack.processes(), "processes of the stack left behind"
    assert not carrying_stack_dir(stack), "processes started for the stack left behind"
    assert not [pid for pid in pids if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not port_listening(stack.mlflow_port)
    assert not port_listening(stack.airflow_port)
    assert not list(stack.stack_dir.glob("*.pid"))
    assert not (stack.stack_dir / "supervisor.sock").exists()
    status = stack.script("status")
    assert status.stdout.count("stopped") == len(SERVICES), status.stdout
    again = stack.script("down")
    assert again.returncode == 0 and "was not running" in again.stdout


if __name__ == "__main__":
    pytest.main([__file__, "-v"])
