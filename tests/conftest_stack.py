"""The local service stack (`scripts/stack.py`, i.e. `make up`) for the end-to-end tests: a pytest
plugin (tests/conftest.py lists it in `pytest_plugins`), so every module sees one `stack` fixture.

`stack` hands each test the running stack: it starts once per test session, whichever test asks
first (starting Airflow is the slow part), and again for the next test that asks after one
stopped it, so no test depends on the order they run in. It runs on free ports, with its own
Airflow home, MLflow store, work folder and stack folder in the session's temporary directory,
so it never touches the user's .airflow/, .mlflow/ or .stack/ nor a stack they run. What it
knows about a stack's processes and ports comes from scripts/stack.py itself (`stack_script`).

As soon as the stack answers, the fixture triggers test_stack.py's DAG run through the REST API
(`Stack.api_run_id`), so that it runs while the browser test works through the UI: two small
runs side by side take less time than one after the other, and test_stack.py checks the outcome.

The stack is stopped by test_stack.py's last test (which checks that nothing is left) or, when
that test did not run, at the end of the session.

The browser is Debian's /usr/bin/chromium, which `make test` and `make test-stack` install
(`make chromium`); without it the browser tests are skipped with the command that installs it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
STACK_SCRIPT = ROOT / "scripts" / "stack.py"


def _load_stack_script():
    """scripts/stack.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("stack_script", STACK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


stack_script = _load_stack_script()
DAG_ID = "model_compression"
CHROMIUM = "/usr/bin/chromium"
# What keeps a DAG run small on 2 cores beyond its conf: the measurement settings are not DAG
# Params, so they go through PIPELINE_* environment variables that every task inherits.
QUICK_ENV = {"PIPELINE_LATENCY_RUNS": "20", "PIPELINE_LATENCY_WARMUP": "3",
             "PIPELINE_CALIBRATION_SAMPLES": "64", "PIPELINE_DISTILL_EPOCHS": "1",
             # dags/ does not change during the tests: parse it at start-up only, not every 30 s
             "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600"}
RUN_TIMEOUT = 600
# The run test_stack.py triggers through the REST API (see the module docstring).
API_RUN_CONF = {"epochs": 1, "train_limit": 600, "test_limit": 200,
                "variants": ["float32", "dynamic"], "finetune_epochs": 1, "experiment": "stack-test"}


def quiet_schedule() -> str:
    """A yearly cron for `model_compression` whose last and next firings are both about six
    months away. With the weekly default, a DAG unpaused within a tenth of a week after Monday
    03:00 UTC gets that (full-size) scheduled run at once: Airflow's CronTriggerTimetable runs
    the latest past firing when it is that recent, whatever run_immediately says."""
    month = (datetime.now(timezone.utc).month + 5) % 12 + 1
    return f"0 3 1 {month} *"


def free_port(avoid: set[int] = frozenset()) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def port_listening(port: int) -> bool:
    """Whether anything holds `port` on 127.0.0.1, as `make up` checks it before starting."""
    return stack_script.port_holder(port) is not None


class Stack:
    """A stack started by `scripts/stack.py up` in `base`, driven over HTTP like a user would."""

    def __init__(self, base: Path):
        self.base = base
        self.mlflow_port = free_port()
        self.airflow_port = free_port({self.mlflow_port})
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("MLFLOW_BUCKET", "MLFLOW_ARTIFACTS_DESTINATION")}
        self.env.update(QUICK_ENV)
        self.env.update({
            "STACK_DIR": str(base / "stack"),
            "AIRFLOW_HOME": str(base / "airflow"),
            "MLFLOW_BACKEND_URI": f"sqlite:///{base / 'mlflow' / 'mlflow.db'}",
            "MLFLOW_ARTIFACTS_DESTINATION": str(base / "mlflow" / "artifacts"),
            "PIPELINE_WORK_DIR": str(base / "work"),
            "MLFLOW_PORT": str(self.mlflow_port),
            "AIRFLOW_PORT": str(self.airflow_port),
            "STACK_TIMEOUT": "420",  # a shared 2-core machine can be slow to start Airflow
            "PIPELINE_SCHEDULE": quiet_schedule(),  # only the runs the tests trigger
        })
        self.stopped = False
        self.api_run_id: str | None = None
        self._token: str | None = None

    # -- the script -----------------------------------------------------------------------------

    def script(self, command: str, *args: str, env: dict | None = None, timeout: float = 600):
        return subprocess.run([sys.executable, str(STACK_SCRIPT), command, *args],
                              env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def up(self) -> None:
        result = self.script("up")
        assert result.returncode == 0, f"make up failed:\n{result.stdout}\n{result.stderr}"
        self.up_output = result.stdout

    def down(self):
        self.stopped = True
        return self.script("down")

    @property
    def stack_dir(self) -> Path:
        return self.base / "stack"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}"

    def status_json(self) -> dict:
        """`stack.py status --json`: each program's state, PID and URL, the Celery workers."""
        result = self.script("status", "--json", timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def recorded_pids(self) -> dict[str, int]:
        """Program name -> PID of each program supervisord runs."""
        return {name: program["pid"] for name, program in self.status_json()["programs"].items()
                if program["pid"]}

    def processes(self) -> list[psutil.Process]:
        """Every live process of the stack, as `stack.py down` finds them (its supervisord,
        what that started and their descendants, even one whose parent died)."""
        return stack_script.stack_processes(stack_script.Settings.from_env(self.env))

    # -- Airflow's REST API ---------------------------------------------------------------------

    @property
    def password(self) -> str:
        path = self.base / "airflow" / "simple_auth_manager_passwords.json.generated"
        return json.loads(path.read_text())["admin"]

    def request(self, method: str, path: str, body=None, auth: bool = True) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.airflow_url + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as error:
            raw = error.read()
            with contextlib.suppress(ValueError):
                return error.code, json.loads(raw)
            return error.code, {"raw": raw.decode(errors="replace")}

    def token(self) -> str:
        """A JWT from the simple auth manager (POST /auth/token), as the UI's login gets."""
        if self._token is None:
            status, body = self.request("POST", "/auth/token",
                                        {"username": "admin", "password": self.password},
                                        auth=False)
            assert status in (200, 201), f"login failed: HTTP {status} {body}"
            self._token = body["access_token"]
        return self._token

    def wait_for_dag(self, timeout: float = 240) -> dict:
        """The DAG as the API serves it, once the dag-processor has parsed dags/."""
        deadline = time.monotonic() + timeout
        while True:
            status, dag = self.request("GET", f"/api/v2/dags/{DAG_ID}")
            if status == 200:
                return dag
            if time.monotonic() > deadline:
                _, errors = self.request("GET", "/api/v2/importErrors")
                raise AssertionError(f"{DAG_ID} not parsed after {timeout:.0f} s; import "
                                     f"errors: {errors}; see {self.stack_dir}")
            time.sleep(2)

    def unpause(self) -> None:
        status, dag = self.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
        assert status == 200 and dag["is_paused"] is False, (status, dag)

    def trigger(self, conf: dict) -> str:
        status, run = self.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                                   {"logical_date": None, "conf": conf})
        assert status == 200, f"trigger failed: HTTP {status} {run}"
        return run["dag_run_id"]

    def dag_run(self, run_id: str) -> dict:
        status, run = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/"
                                          f"{urllib.parse.quote(run_id, safe='')}")
        assert status == 200, (status, run)
        return run

    def dag_runs(self) -> list[dict]:
        status, body = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100")
        assert status == 200, (status, body)
        return body["dag_runs"]

    def wait_for_run(self, run_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        """The finished DAG run; on failure or time-out, an error naming the failed tasks."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.dag_run(run_id)
            if run["state"] in ("success", "failed"):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(5)
        if run["state"] != "success":
            raise AssertionError(f"DAG run {run_id} ended {run['state']!r} (waited up to "
                                 f"{timeout:.0f} s); tasks: {self.task_states(run_id)}; logs "
                                 f"under {self.base / 'airflow' / 'logs'} and {self.stack_dir}")
        return run

    def task_states(self, run_id: str) -> dict[str, str]:
        _, body = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/"
                                      f"{urllib.parse.quote(run_id, safe='')}/taskInstances?limit=100")
        return {f"{t['task_id']}[{t['map_index']}]": t["state"]
                for t in body.get("task_instances", [])}

    # -- MLflow ---------------------------------------------------------------------------------

    def mlflow_client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(tracking_uri=self.mlflow_url, registry_uri=self.mlflow_url)

    def parent_run(self, experiment: str, dag_run_id: str):
        """The MLflow parent run of one DAG run (tagged with the Airflow run id)."""
        client = self.mlflow_client()
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None, f"no MLflow experiment {experiment!r} at {self.mlflow_url}"
        found = client.search_runs([exp.experiment_id],
                                   filter_string=f"tags.pipeline_run_id = '{dag_run_id}' "
                                                 "and tags.run_role = 'parent'")
        assert len(found) == 1, f"expected one parent run for {dag_run_id}, found {len(found)}"
        return found[0]


class RunningStack:
    """The session's stack: started on first use, and again after a test stopped it."""

    def __init__(self, session_dir: Path):
        self.session_dir = session_dir
        self.current: Stack | None = None

    def get(self) -> Stack:
        if self.current is None or self.current.stopped:
            base = self.session_dir / f"stack-{len(list(self.session_dir.glob('stack-*')))}"
            base.mkdir(parents=True)
            self.current = Stack(base)
            try:
                self.current.up()
                self.current.wait_for_dag()
                self.current.unpause()
                self.current.api_run_id = self.current.trigger(API_RUN_CONF)
            except BaseException:
                self.current.down()
                raise
        return self.current

    def stop(self) -> None:
        if self.current is not None and not self.current.stopped:
            result = self.current.down()
            assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def running_stack(session_dir):
    holder = RunningStack(session_dir)
    yield holder
    holder.stop()


@pytest.fixture
def stack(running_stack) -> Stack:
    """The running stack (started on first use; again if a test stopped it)."""
    return running_stack.get()


def chromium() -> str:
    """/usr/bin/chromium, else Playwright's own Chromium when installed (Ubuntu has no Chromium
    package, only a snap); the browser tests are skipped without either."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    managed = sorted(Path.home().glob(".cache/ms-playwright/chromium-*/chrome-linux*/chrome"))
    if managed:
        return str(managed[-1])
    pytest.skip(f"{CHROMIUM} is missing: `make chromium` installs it (Debian package chromium; "
                "make test and make test-stack do it first); on Ubuntu, install Playwright's "
                "own: .venv/bin/python -m playwright install chromium")
