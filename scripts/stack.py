"""`make up` / `make down` / `make status`: the local service stack, bound to 127.0.0.1.

- MLflow tracking server (UI + REST API, artifacts proxied to a local folder or S3), one worker.
- Airflow: api-server (UI + REST API), scheduler, dag-processor, triggerer, with the project's
  dags/ and plugins/, LocalExecutor on SQLite, tasks logging to that MLflow server.

Each process is started in its own process group; its PID (= process group id) goes to
`<stack dir>/<name>.pid` and its output to `<stack dir>/<name>.log`. `down` stops exactly those
groups, plus any descendant that moved to a group of its own (Airflow runs each task in one),
with SIGTERM, then SIGKILL after a timeout.

Airflow's components run one by one rather than through `airflow standalone`, because standalone
also starts two log servers (ports 8793 and 8794) bound to every interface; with LocalExecutor
the api-server reads task logs from disk, so they are not needed (`--skip-serve-logs`).

MLflow's job-execution feature (on by default in MLflow 3.17) would start a job runner and Huey
consumer processes; its jobs are GenAI ones (LLM-judge scoring, prompt optimization), which this
project does not use, so it is off (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`) unless set.

Settings, from the environment (defaults in brackets):
  MLFLOW_PORT [5000], AIRFLOW_PORT [8080], STACK_DIR [<project>/.stack],
  AIRFLOW_HOME [<project>/.airflow], MLFLOW_BACKEND_URI [sqlite:///<project>/.mlflow/mlflow.db],
  MLFLOW_ARTIFACTS_DESTINATION [s3://$MLFLOW_BUCKET/artifacts when MLFLOW_BUCKET is set, else
  <project>/.mlflow/artifacts; S3 endpoint and credentials through MLFLOW_S3_ENDPOINT_URL and
  AWS_*], STACK_TIMEOUT [240 s to answer], STACK_STOP_TIMEOUT [30 s before SIGKILL].
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PROJECT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent  # the virtualenv's bin/: airflow, mlflow
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
AIRFLOW_USER = "admin"
START_MARKER = "===== stack.py"  # opens each start's section of a log file


class StackError(Exception):
    """A problem the user can act on: printed as one message, exit status 1."""


@dataclass
class Settings:
    stack_dir: Path
    airflow_home: Path
    mlflow_port: int
    airflow_port: int
    mlflow_backend_uri: str
    mlflow_artifacts_destination: str
    timeout: float
    stop_timeout: float

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        def port(name: str, default: int) -> int:
            raw = env.get(name) or str(default)
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise StackError(f"{name}={raw!r} is not a port number")
            return int(raw)

        destination = env.get("MLFLOW_ARTIFACTS_DESTINATION") or (
            f"s3://{env['MLFLOW_BUCKET']}/artifacts" if env.get("MLFLOW_BUCKET")
            else str(PROJECT / ".mlflow" / "artifacts"))
        settings = cls(
            stack_dir=Path(env.get("STACK_DIR") or PROJECT / ".stack").resolve(),
            airflow_home=Path(env.get("AIRFLOW_HOME") or PROJECT / ".airflow").resolve(),
            mlflow_port=port("MLFLOW_PORT", 5000),
            airflow_port=port("AIRFLOW_PORT", 8080),
            mlflow_backend_uri=env.get("MLFLOW_BACKEND_URI")
            or f"sqlite:///{PROJECT / '.mlflow' / 'mlflow.db'}",
            mlflow_artifacts_destination=destination,
            timeout=float(env.get("STACK_TIMEOUT") or 240),
            stop_timeout=float(env.get("STACK_STOP_TIMEOUT") or 30),
        )
        if settings.mlflow_port == settings.airflow_port:
            raise StackError(f"MLFLOW_PORT and AIRFLOW_PORT are both {settings.mlflow_port}: "
                             "give them different ports")
        return settings

    @property
    def password_file(self) -> Path:
        return self.airflow_home / "simple_auth_manager_passwords.json.generated"


@dataclass
class Service:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int | None = None         # what it listens on, if anything
    port_setting: str | None = None  # the environment variable that changes that port
    health_path: str | None = None
    stack_dir: Path = field(default=Path("."))

    @property
    def url(self) -> str | None:
        return f"http://{HOST}:{self.port}" if self.port else None

    @property
    def pid_file(self) -> Path:
        return self.stack_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.stack_dir / f"{self.name}.log"

    def leader(self) -> psutil.Process | None:
        """The running process recorded in the PID file, or None. A PID reused by a process
        started after the file was written is not ours."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            process = psutil.Process(pid)
            if process.create_time() > self.pid_file.stat().st_mtime + 1 \
                    or process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except (FileNotFoundError, IndexError, ValueError, psutil.Error):
            return None

    def recorded_pgid(self) -> int | None:
        """The process group recorded in the PID file, while it can still be ours: a PID (and so
        a group id) is not reused while a group of that id has members, so when the PID now
        belongs to a process started after the file was written, our group is gone."""
        try:
            pgid = int(self.pid_file.read_text().split()[0])
            recorded_at = self.pid_file.stat().st_mtime
        except (FileNotFoundError, IndexError, ValueError):
            return None
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pgid).create_time() > recorded_at + 1:
                return None
        return pgid


# ---------------------------------------------------------------------------------------------
# What runs


def services(settings: Settings, state: dict | None = None) -> list[Service]:
    """MLflow first (Airflow's tasks log to it), then Airflow's components. Ports of a stack that
    is already running come from its state file, so a partial restart keeps them."""
    mlflow_port = (state or {}).get("mlflow_port", settings.mlflow_port)
    airflow_port = (state or {}).get("airflow_port", settings.airflow_port)
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    base["PATH"] = os.pathsep.join([str(BIN), base.get("PATH", "")])

    mlflow_env = dict(base)
    # GenAI job runner and Huey consumers: not used here (see the module docstring).
    mlflow_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    mlflow = Service(
        "mlflow",
        [str(BIN / "mlflow"), "server",
         "--backend-store-uri", settings.mlflow_backend_uri,
         "--artifacts-destination", settings.mlflow_artifacts_destination,
         "--host", HOST, "--port", str(mlflow_port), "--workers", "1"],
        mlflow_env, mlflow_port, "MLFLOW_PORT", "/health")

    airflow_env = airflow_environment(settings, base, mlflow_port, airflow_port)
    airflow = [
        Service("airflow-api-server",
                [str(BIN / "airflow"), "api-server", "--host", HOST, "--port", str(airflow_port)],
                airflow_env, airflow_port, "AIRFLOW_PORT", "/api/v2/monitor/health"),
        Service("airflow-scheduler", [str(BIN / "airflow"), "scheduler", "--skip-serve-logs"],
                airflow_env),
        Service("airflow-dag-processor", [str(BIN / "airflow"), "dag-processor"], airflow_env),
        Service("airflow-triggerer", [str(BIN / "airflow"), "triggerer", "--skip-serve-logs"],
                airflow_env),
    ]
    for service in [mlflow, *airflow]:
        service.stack_dir = settings.stack_dir
    return [mlflow, *airflow]


def airflow_environment(settings: Settings, base: dict, mlflow_port: int,
                        airflow_port: int) -> dict[str, str]:
    env = dict(base)
    url = f"http://{HOST}:{airflow_port}"
    env.update({
        "AIRFLOW_HOME": str(settings.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(airflow_port),
        "AIRFLOW__API__BASE_URL": url,
        # Tasks reach the api-server's execution API here (its default assumes port 8080).
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        # Every task process inherits this: runs go to the stack's MLflow server.
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{mlflow_port}",
        "PYTHONPATH": os.pathsep.join([str(PROJECT)] + [p for p in [base.get("PYTHONPATH")] if p]),
    })
    env.setdefault("AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "False")
    # LocalExecutor forks `parallelism` workers up front (32 by default, ~150 MB each); the
    # tasks here are CPU-bound, so a few per core is plenty.
    env.setdefault("AIRFLOW__CORE__PARALLELISM", str(max(4, 2 * (os.cpu_count() or 2))))
    env.setdefault("TF_USE_LEGACY_KERAS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


# ---------------------------------------------------------------------------------------------
# Processes


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def stack_processes(pgid: int) -> list[psutil.Process]:
    """Every live process of one service: its process group and all their descendants (which
    includes Airflow's task processes, each in a process group of its own)."""
    found = {p.pid: p for p in group_members(pgid)}
    for process in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in process.children(recursive=True):
                found.setdefault(child.pid, child)
    return [p for p in found.values() if _alive(p)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def signal_all(processes: list[psutil.Process], signum: int, whole_groups: bool = True) -> None:
    pids = {p.pid for p in processes}
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            pgid = os.getpgid(process.pid)
            if whole_groups and pgid in pids:  # a group one of ours leads: all of it at once
                os.killpg(pgid, signum)
            else:
                process.send_signal(signum)


def stop_groups(pgids: list[int], timeout: float) -> list[int]:
    """Stop every process of these groups and their descendants within about `timeout` seconds;
    returns the PIDs that had to be killed. The leaders get SIGTERM first, to shut their own
    children down in order; after a third of the time everything left gets SIGTERM (a second
    one tells Airflow's scheduler to stop waiting for its executor's workers), and at the end
    SIGKILL."""
    processes = [p for pgid in pgids for p in stack_processes(pgid)]
    if not processes:
        return []
    leaders = [p for p in processes if p.pid in pgids]
    signal_all(leaders, signal.SIGTERM, whole_groups=False)
    psutil.wait_procs(leaders, timeout=timeout / 3)
    remaining = _remaining(pgids, processes)
    signal_all(remaining, signal.SIGTERM)
    _, alive = psutil.wait_procs(remaining, timeout=timeout * 2 / 3)
    killed: list[int] = []
    for _ in range(5):  # SIGKILL until none is left (a component may fork while it stops)
        alive = _remaining(pgids, alive)
        if not alive:
            break
        killed.extend(p.pid for p in alive if p.pid not in killed)
        signal_all(alive, signal.SIGKILL)
        _, alive = psutil.wait_procs(alive, timeout=5)
    return killed


def _remaining(pgids: list[int], seen: list[psutil.Process]) -> list[psutil.Process]:
    found = {p.pid: p for pgid in pgids for p in stack_processes(pgid)}
    found.update({p.pid: p for p in seen if _alive(p)})
    return list(found.values())


def port_holder(port: int) -> str | None:
    """None when `port` is free on 127.0.0.1, else what holds it (as far as we may know)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            return None
        except OSError:
            pass
    with contextlib.suppress(psutil.Error, PermissionError):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return f"pid {conn.pid}, {psutil.Process(conn.pid).name()}"
    return "unknown pid"


def free_port_after(port: int) -> int:
    for candidate in range(port + 1, min(port + 200, 65535)):
        if port_holder(candidate) is None:
            return candidate
    return 0


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""
    except (OSError, ValueError):
        return None


def answering(service: Service) -> tuple[bool, str]:
    """Whether a service with a health endpoint answers healthy, and what it said."""
    reply = http_get(f"{service.url}{service.health_path}")
    if reply is None:
        return False, "no answer"
    status, body = reply
    if status != 200:
        return False, f"HTTP {status}"
    if service.name == "airflow-api-server":
        # Airflow's health covers the other components: wait until all of them heartbeat, so a
        # DAG triggered right after `make up` gets scheduled.
        try:
            health = json.loads(body)
        except ValueError:
            return False, "unreadable health answer"
        sick = [name for name, part in health.items()
                if isinstance(part, dict) and part.get("status") != "healthy"]
        if sick:
            return False, "not healthy yet: " + ", ".join(sick)
    return True, "healthy"


# ---------------------------------------------------------------------------------------------
# Commands


@contextlib.contextmanager
def locked(settings: Settings):
    """One `up` or `down` at a time for a stack directory."""
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.stack_dir / "stack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_state(settings: Settings) -> dict:
    try:
        return json.loads((settings.stack_dir / "stack.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def up(settings: Settings) -> int:
    with locked(settings):
        state = read_state(settings)
        listed = services(settings, state)
        if not any(s.leader() for s in listed):
            state = {}  # nothing of the old stack runs: the current settings apply
            listed = services(settings)
        to_start = [s for s in listed if s.leader() is None]
        if not to_start:
            print("the stack is already running")
            print_summary(settings, listed)
            return 0
        if state and (state.get("mlflow_port"), state.get("airflow_port")) != (
                settings.mlflow_port, settings.airflow_port):
            print(f"part of the stack runs on its earlier ports (MLflow {state['mlflow_port']}, "
                  f"Airflow {state['airflow_port']}): keeping them; `make down` first to change them")
        for service in to_start:  # a leftover group whose leader died: clear it first
            if (pgid := service.recorded_pgid()) is not None and stack_processes(pgid):
                stop_groups([pgid], settings.stop_timeout)
            service.pid_file.unlink(missing_ok=True)
        check_ports(to_start)
        prepare_folders(settings)
        (settings.stack_dir / "stack.json").write_text(json.dumps({
            "mlflow_port": listed[0].port, "airflow_port": listed[1].port,
            "airflow_home": str(settings.airflow_home)}, indent=1))
        try:
            migrated = False
            for service in to_start:  # MLflow first: it starts while Airflow's DB is migrated
                if service.name.startswith("airflow-") and not migrated:
                    migrate_airflow_db(settings, service.env)
                    migrated = True
                start(service)
            wait_until_answering(to_start, listed, settings.timeout)
        except StackError:
            stop_groups([s.recorded_pgid() for s in to_start if s.recorded_pgid()],
                        settings.stop_timeout)
            for service in to_start:
                service.pid_file.unlink(missing_ok=True)
            raise
    print("the stack is up")
    print_summary(settings, listed)
    return 0


def check_ports(to_start: list[Service]) -> None:
    for service in to_start:
        if service.port and (holder := port_holder(service.port)):
            suggestion = free_port_after(service.port)
            raise StackError(
                f"port {service.port} is in use by another program ({holder}): set "
                f"{service.port_setting}={suggestion or '<another port>'}, e.g. "
                f"`make up {service.port_setting}={suggestion or '...'}`")


def prepare_folders(settings: Settings) -> None:
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    if settings.mlflow_backend_uri.startswith("sqlite:///"):
        Path(settings.mlflow_backend_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if "://" not in settings.mlflow_artifacts_destination:
        Path(settings.mlflow_artifacts_destination).mkdir(parents=True, exist_ok=True)


def migrate_airflow_db(settings: Settings, env: dict[str, str]) -> None:
    """Create or upgrade Airflow's metadata DB (and airflow.cfg with its secrets) before the
    components start, so they share one configuration."""
    log = settings.stack_dir / "airflow-db-migrate.log"
    print(f"preparing Airflow's database in {settings.airflow_home} ...", flush=True)
    with open(log, "w") as out:
        result = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=PROJECT)
    if result.returncode != 0:
        raise StackError(f"`airflow db migrate` failed: see {log}\n{tail(log)}")


def start(service: Service) -> None:
    with open(service.log_file, "a") as log:
        log.write(f"\n{START_MARKER} {time.strftime('%Y-%m-%d %H:%M:%S')} starting: "
                  f"{' '.join(service.command)}\n")
        log.flush()
        process = subprocess.Popen(service.command, env=service.env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=PROJECT, start_new_session=True)
    service.pid_file.write_text(f"{process.pid}\n")
    print(f"started {service.name} (pid {process.pid}), log {service.log_file}", flush=True)


def wait_until_answering(started: list[Service], listed: list[Service], timeout: float) -> None:
    """Until every health endpoint of the stack answers healthy (Airflow's also covers the
    components without one); fails at once when a process just started exits."""
    deadline = time.monotonic() + timeout
    waiting = [s for s in listed if s.health_path]
    last = {}
    while True:
        for service in started:
            if service.leader() is None:
                raise StackError(f"{service.name} exited during start-up: see "
                                 f"{service.log_file}\n{tail(service.log_file)}")
        for service in list(waiting):
            ok, last[service.name] = answering(service)
            if ok:
                waiting.remove(service)
        if not waiting:
            return
        if time.monotonic() > deadline:
            service = waiting[0]
            raise StackError(
                f"{service.name} did not answer at {service.url}{service.health_path} within "
                f"{timeout:.0f} s ({last[service.name]}): see the logs in {service.stack_dir}, "
                f"starting with {service.log_file}\n{tail(service.log_file)}"
                "\n(a slow machine may need more time: STACK_TIMEOUT=600 make up)")
        time.sleep(1)


def down(settings: Settings) -> int:
    with locked(settings):
        listed = services(settings, read_state(settings))
        # All at once: a task still running dies with its scheduler anyway, and stopping one by
        # one would add up every component's shutdown time.
        pgids = {s.name: s.recorded_pgid() for s in listed}
        running = [name for name, pgid in pgids.items() if pgid and stack_processes(pgid)]
        killed = stop_groups([p for p in pgids.values() if p], settings.stop_timeout)
        for service in listed:
            service.pid_file.unlink(missing_ok=True)
            print(f"{service.name:22} {'stopped' if service.name in running else 'was not running'}")
        if killed:
            print(f"(still running after {settings.stop_timeout:.0f} s, killed: pids {killed})")
        (settings.stack_dir / "stack.json").unlink(missing_ok=True)
    return 0


def status(settings: Settings) -> int:
    listed = services(settings, read_state(settings))
    print(f"{'service':22} {'state':14} {'pid':>8}  url")
    for service in listed:
        process = service.leader()
        if process is None:
            state = "stale PID file" if service.pid_file.exists() else "stopped"
            print(f"{service.name:22} {state:14} {'-':>8}  {service.url or '-'}")
            continue
        note = ""
        if service.health_path:
            ok, said = answering(service)
            note = "" if ok else f"  ({said})"
        print(f"{service.name:22} {'running':14} {process.pid:>8}  {service.url or '-'}{note}")
    print(f"logs and PID files: {settings.stack_dir}")
    print(f"Airflow login: user {AIRFLOW_USER}, password in {settings.password_file}")
    return 0


def print_summary(settings: Settings, listed: list[Service]) -> None:
    mlflow, api = listed[0], listed[1]
    print(f"  MLflow UI:   {mlflow.url}")
    print(f"  Airflow UI:  {api.url}   (DAG model_compression)")
    print(f"  Airflow login: user {AIRFLOW_USER}, password in {settings.password_file}")
    print(f"  logs: {settings.stack_dir}/*.log   stop: make down   check: make status")


def tail(path: Path, lines: int = 20) -> str:
    """The last lines the latest start wrote to a log (earlier starts' lines are older news)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    latest = text[text.rfind(START_MARKER):] if START_MARKER in text else text
    return "\n".join("  | " + line for line in latest.splitlines()[-lines:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        return {"up": up, "down": down, "status": status}[args.command](settings)
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
