"""`make up` / `make down` / `make status`: the local service stack on 127.0.0.1, run by supervisord.

EXECUTOR=local (the default):
- the MLflow tracking server (SQLite store, artifacts proxied to a local folder or to S3);
- Airflow's api-server (UI + REST API), scheduler, dag-processor and triggerer, LocalExecutor on
  SQLite, with the project's dags/ and plugins/, tasks logging to that MLflow server.

EXECUTOR=celery (the production topology, as local processes):
- PostgreSQL, a private cluster in <stack>/postgres (run as user `postgres` when started as root:
  PostgreSQL refuses root), databases `airflow` (metadata, Celery results) and `mlflow`;
- Redis, the Celery broker (Debian's redis-server), with a password;
- an S3 endpoint: `moto_server` (in memory), unless MLFLOW_S3_ENDPOINT_URL (+ AWS_*) names one;
  the bucket is created when missing;
- MLflow on PostgreSQL, artifacts proxied to s3://BUCKET/artifacts: only it holds S3 credentials;
- Airflow's api-server, scheduler, dag-processor, triggerer (CeleryExecutor) and WORKERS Celery
  workers `worker-N`, each consuming its entry of WORKER_QUEUES, with its own PIPELINE_WORK_DIR
  (<stack>/workers/worker-N: workers share no folder) and its name as the hostname Airflow records
  for the task instances it runs (pipeline/airflow_adapter/worker_name.py).

supervisord runs every process from <stack>/supervisord.conf, which `up` generates from the
settings: each program's output goes to <stack>/NAME.log, and a program that dies is restarted.
`up` starts supervisord, then the programs in order (what the next ones need first), and waits
until they answer; `status` lists them (`supervisorctl -c <stack>/supervisord.conf` works too);
`down` shuts supervisord down, which stops the programs in reverse order, then ends any process it
had started that is still there (Airflow runs each task in a process group of its own): they all
carry supervisord's SUPERVISOR_SERVER_URL in their environment.

Airflow's log servers are not started (`--skip-serve-logs`; they would listen on every interface):
every component runs on this machine and the api-server reads task logs from AIRFLOW_HOME/logs.
MLflow's job runner (GenAI jobs, unused here) is off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false).

Settings, from the environment (defaults in brackets):
  EXECUTOR [local] (or celery), MLFLOW_PORT [5000], AIRFLOW_PORT [8080], STACK_DIR
  [<project>/.stack], AIRFLOW_HOME [<project>/.airflow], MLFLOW_BACKEND_URI [local: sqlite:///
  <project>/.mlflow/mlflow.db; celery: the stack's PostgreSQL], MLFLOW_ARTIFACTS_DESTINATION
  [s3://$MLFLOW_BUCKET/artifacts when MLFLOW_BUCKET is set (celery: bucket `mlflow` by default),
  else <project>/.mlflow/artifacts; S3 endpoint and credentials through MLFLOW_S3_ENDPOINT_URL and
  AWS_*], STACK_TIMEOUT [240 s to answer], STACK_STOP_TIMEOUT [30 s before SIGKILL];
  celery only: WORKERS [2, or as many as WORKER_QUEUES entries], WORKER_QUEUES [2 workers:
  "training default"; 1: "training,default"; N: training, then default], WORKER_CONCURRENCY [2],
  POSTGRES_PORT [5433], REDIS_PORT [6380], S3_PORT [9000] (moto_server's).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PROJECT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent  # the virtualenv's bin/: airflow, mlflow, supervisord
AIRFLOW_USER = "admin"
DEFAULT_QUEUE = "default"  # Airflow's [operators] default_queue: every task without queue=...
TRAINING_QUEUE = "training"  # train and optimize (DESIGN: Celery topology)
# The pool the DAG's train and optimize take a slot of, so concurrent runs take turns training.
TRAINING_POOL = "training"
TRAINING_POOL_DESCRIPTION = "model_compression's train and optimize: training at once across DAG runs"
# Start order, also supervisord's priority (it stops the programs in the reverse order).
INFRA, TRACKING, AIRFLOW, WORKERS = 100, 200, 300, 400
# What may hold S3 credentials: given to the MLflow server (and the bucket step) only.
S3_VARIABLES = re.compile(r"^(AWS_|MLFLOW_S3_|MLFLOW_BOTO_CLIENT_)")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class StackError(Exception):
    """A problem the user can act on: printed as one message, exit status 1."""


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    stack_dir: Path
    airflow_home: Path
    executor: str
    mlflow_port: int
    airflow_port: int
    mlflow_backend_uri: str | None  # None: the executor's default store
    mlflow_artifacts_destination: str
    timeout: float
    stop_timeout: float
    worker_queues: list[str] = field(default_factory=list)  # one comma list per worker (celery)
    worker_concurrency: int = 2
    postgres_port: int = 5433
    redis_port: int = 6380
    s3_port: int = 9000
    s3_endpoint: str | None = None  # celery: None runs moto_server when the artifacts go to S3

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        def number(name: str, default: int, low: int = 1, high: int = 65535) -> int:
            raw = env.get(name) or str(default)
            if not raw.isdigit() or not low <= int(raw) <= high:
                raise StackError(f"{name}={raw!r} is not a number from {low} to {high}")
            return int(raw)

        executor = (env.get("EXECUTOR") or "local").strip().lower().removesuffix("executor")
        if executor not in ("local", "celery"):
            raise StackError(f"EXECUTOR={env.get('EXECUTOR')!r}: use local or celery")
        celery = executor == "celery"
        bucket = env.get("MLFLOW_BUCKET") or ("mlflow" if celery else "")
        destination = env.get("MLFLOW_ARTIFACTS_DESTINATION") or (
            f"s3://{bucket}/artifacts" if bucket else str(PROJECT / ".mlflow" / "artifacts"))
        settings = cls(
            stack_dir=Path(env.get("STACK_DIR") or PROJECT / ".stack").resolve(),
            airflow_home=Path(env.get("AIRFLOW_HOME") or PROJECT / ".airflow").resolve(),
            executor=executor,
            mlflow_port=number("MLFLOW_PORT", 5000),
            airflow_port=number("AIRFLOW_PORT", 8080),
            mlflow_backend_uri=env.get("MLFLOW_BACKEND_URI") or None,
            mlflow_artifacts_destination=destination,
            timeout=float(env.get("STACK_TIMEOUT") or 240),
            stop_timeout=float(env.get("STACK_STOP_TIMEOUT") or 30),
        )
        if celery:
            settings.worker_queues = worker_queues(env.get("WORKERS"), env.get("WORKER_QUEUES"))
            settings.worker_concurrency = number("WORKER_CONCURRENCY", 2, high=64)
            settings.postgres_port = number("POSTGRES_PORT", 5433)
            settings.redis_port = number("REDIS_PORT", 6380)
            settings.s3_port = number("S3_PORT", 9000)
            settings.s3_endpoint = env.get("MLFLOW_S3_ENDPOINT_URL") or None
        ports = {name: port for name, port in settings.port_settings().items() if port}
        for name, port in ports.items():
            others = [other for other, p in ports.items() if p == port and other != name]
            if others:
                raise StackError(f"{name} and {others[0]} are both {port}: give them different ports")
        return settings

    @classmethod
    def from_state(cls, state: dict) -> "Settings | None":
        """The settings a running stack was started with (<stack>/stack.json)."""
        with contextlib.suppress(TypeError, KeyError):
            settings = cls(**state)
            settings.stack_dir, settings.airflow_home = Path(state["stack_dir"]), Path(state["airflow_home"])
            return settings
        return None

    def to_state(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @property
    def celery(self) -> bool:
        return self.executor == "celery"

    @property
    def moto(self) -> bool:
        return self.celery and self.s3_endpoint is None \
            and self.mlflow_artifacts_destination.startswith("s3://")

    def port_settings(self) -> dict[str, int]:
        ports = {"MLFLOW_PORT": self.mlflow_port, "AIRFLOW_PORT": self.airflow_port}
        if self.celery:
            ports.update(POSTGRES_PORT=self.postgres_port, REDIS_PORT=self.redis_port)
            if self.moto:
                ports["S3_PORT"] = self.s3_port
        return ports

    @property
    def socket_path(self) -> Path:
        return self.stack_dir / "supervisor.sock"

    @property
    def run_dir(self) -> Path:
        """The working folder of every program (which marks them as this stack's)."""
        return self.stack_dir / "run"

    @property
    def config_path(self) -> Path:
        return self.stack_dir / "supervisord.conf"

    @property
    def password_file(self) -> Path:
        return self.airflow_home / "simple_auth_manager_passwords.json.generated"


def worker_queues(workers: str | None, queues: str | None) -> list[str]:
    """One comma list of queues per worker, from WORKERS and WORKER_QUEUES."""
    entries = (queues or "").split()
    if workers and (not workers.isdigit() or not 1 <= int(workers) <= 32):
        raise StackError(f"WORKERS={workers!r} is not a number from 1 to 32")
    count = int(workers) if workers else (len(entries) or 2)
    if not entries:
        entries = [f"{TRAINING_QUEUE},{DEFAULT_QUEUE}"] if count == 1 else \
            [TRAINING_QUEUE] + [DEFAULT_QUEUE] * (count - 1)
    if len(entries) != count:
        raise StackError(f"WORKER_QUEUES has {len(entries)} entries for WORKERS={count}: give one "
                         "per worker, e.g. WORKER_QUEUES=\"training default\" (queues of one "
                         "worker joined by commas)")
    for entry in entries:
        if not all(QUEUE_NAME.match(q) for q in entry.split(",")):
            raise StackError(f"WORKER_QUEUES entry {entry!r}: queue names are letters, digits, "
                             "'_', '-' and '.', one worker's queues joined by commas")
    return entries


def unconsumed_queues(settings: Settings) -> list[str]:
    """The DAG's queues no worker of this stack consumes (fine when workers elsewhere do)."""
    consumed = {q for entry in settings.worker_queues for q in entry.split(",")}
    return [q for q in (TRAINING_QUEUE, DEFAULT_QUEUE) if settings.celery and q not in consumed]


# ---------------------------------------------------------------------------------------------
# What runs


@dataclass
class Program:
    name: str
    command: list[str]
    env: dict[str, str]  # on top of supervisord's environment
    order: int  # INFRA, TRACKING, AIRFLOW or WORKERS
    url: str | None = None
    port: int | None = None
    port_setting: str | None = None
    health_path: str | None = None
    user: str | None = None
    stopsignal: str = "TERM"
    queues: list[str] | None = None  # a Celery worker's


def load_secrets(settings: Settings, create: bool = False) -> dict[str, str]:
    """Passwords and keys of the stack, made once and kept in <stack>/secrets.json (mode 600):
    PostgreSQL's data outlives a `down`, so do its passwords."""
    path = settings.stack_dir / "secrets.json"
    names = ("postgres", "airflow_db", "mlflow_db", "redis", "jwt", "api_secret_key",
             "s3_access_key", "s3_secret_key")
    try:
        known = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        known = {}
    if create and any(name not in known for name in names):
        known = {name: known.get(name) or secrets.token_hex(24) for name in names}
        settings.stack_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(known, out, indent=1)
    return {name: known.get(name, "") for name in names}


def postgres_url(settings: Settings, secret: dict, user: str, scheme: str = "postgresql") -> str:
    return (f"{scheme}://{user}:{secret[user + '_db']}@{HOST}:{settings.postgres_port}/{user}")


def broker_url(settings: Settings, secret: dict) -> str:
    return f"redis://:{secret['redis']}@{HOST}:{settings.redis_port}/0"


def s3_environment(settings: Settings, secret: dict) -> dict[str, str]:
    """What the MLflow server needs to reach the S3 store (nothing else gets it)."""
    if settings.moto:
        return {"MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{settings.s3_port}",
                "AWS_ACCESS_KEY_ID": secret["s3_access_key"],
                "AWS_SECRET_ACCESS_KEY": secret["s3_secret_key"], "AWS_DEFAULT_REGION": "us-east-1"}
    return {k: v for k, v in os.environ.items() if S3_VARIABLES.match(k)}


def programs(settings: Settings, secret: dict | None = None) -> list[Program]:
    secret = secret or load_secrets(settings)
    listed: list[Program] = []
    if settings.celery:
        listed += infrastructure(settings, secret)

    backend = settings.mlflow_backend_uri or (
        postgres_url(settings, secret, "mlflow") if settings.celery
        else f"sqlite:///{PROJECT / '.mlflow' / 'mlflow.db'}")
    # The store's URI goes through the environment: with a password it must not show in `ps`.
    mlflow_env = {"MLFLOW_BACKEND_STORE_URI": backend, **s3_environment(settings, secret),
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION":
                      os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    listed.append(Program(
        "mlflow", [str(BIN / "mlflow"), "server",
                   "--artifacts-destination", settings.mlflow_artifacts_destination,
                   "--host", HOST, "--port", str(settings.mlflow_port), "--workers", "1"],
        mlflow_env, TRACKING, f"http://{HOST}:{settings.mlflow_port}", settings.mlflow_port,
        "MLFLOW_PORT", "/health"))

    env = airflow_environment(settings, secret)
    airflow = str(BIN / "airflow")
    listed += [
        Program("airflow-api-server",
                [airflow, "api-server", "--host", HOST, "--port", str(settings.airflow_port)], env,
                AIRFLOW, f"http://{HOST}:{settings.airflow_port}", settings.airflow_port,
                "AIRFLOW_PORT", "/api/v2/monitor/health"),
        Program("airflow-scheduler", [airflow, "scheduler", "--skip-serve-logs"], env, AIRFLOW),
        Program("airflow-dag-processor", [airflow, "dag-processor"], env, AIRFLOW),
        Program("airflow-triggerer", [airflow, "triggerer", "--skip-serve-logs"], env, AIRFLOW),
    ]
    for number, queues in enumerate(settings.worker_queues, start=1):
        name = f"worker-{number}"
        listed.append(Program(
            name, [airflow, "celery", "worker", "--queues", queues,
                   "--concurrency", str(settings.worker_concurrency),
                   "--celery-hostname", f"{name}@%h", "--skip-serve-logs",
                   "--without-mingle", "--without-gossip"],
            {**env, "PIPELINE_WORKER_NAME": name,
             "PIPELINE_WORK_DIR": str(settings.stack_dir / "workers" / name)},
            WORKERS, queues=queues.split(",")))
    return listed


def infrastructure(settings: Settings, secret: dict) -> list[Program]:
    postgres = Program(
        "postgres", [str(postgres_bin("postgres") or "postgres"),
                     "-D", str(settings.stack_dir / "postgres" / "data"),
                     "-p", str(settings.postgres_port), "-c", f"listen_addresses={HOST}",
                     "-c", "unix_socket_directories=", "-c", "max_connections=200"],
        {}, INFRA, f"postgresql://{HOST}:{settings.postgres_port}", settings.postgres_port,
        "POSTGRES_PORT", user="postgres" if os.geteuid() == 0 else None,
        stopsignal="INT")  # fast shutdown: SIGTERM would wait for every client to leave
    redis = Program(
        "redis", [shutil.which("redis-server") or "redis-server",
                  str(settings.stack_dir / "redis" / "redis.conf")],
        {}, INFRA, f"redis://{HOST}:{settings.redis_port}", settings.redis_port, "REDIS_PORT")
    listed = [postgres, redis]
    if settings.moto:
        listed.append(Program(
            "s3", [str(BIN / "moto_server"), "-H", HOST, "-p", str(settings.s3_port)], {}, INFRA,
            f"http://{HOST}:{settings.s3_port}", settings.s3_port, "S3_PORT"))
    return listed


def airflow_environment(settings: Settings, secret: dict) -> dict[str, str]:
    url = f"http://{HOST}:{settings.airflow_port}"
    env = {
        "AIRFLOW_HOME": str(settings.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__API__BASE_URL": url,
        # Tasks reach the api-server's execution API here (its default assumes port 8080).
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        # Every task process inherits this: runs go to the stack's MLflow server.
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{settings.mlflow_port}",
    }
    defaults = {
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # LocalExecutor forks `parallelism` workers up front (32 by default, ~150 MB each); the
        # tasks here are CPU-bound, so a few per core is plenty.
        "AIRFLOW__CORE__PARALLELISM": str(max(4, 2 * (os.cpu_count() or 2))),
        "TF_USE_LEGACY_KERAS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if not settings.celery:
        env["AIRFLOW__CORE__EXECUTOR"] = "LocalExecutor"
    else:
        env.update({
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_url(settings, secret, "airflow",
                                                                "postgresql+psycopg2"),
            "AIRFLOW__CELERY__BROKER_URL": broker_url(settings, secret),
            "AIRFLOW__CELERY__RESULT_BACKEND": postgres_url(settings, secret, "airflow",
                                                            "db+postgresql"),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": DEFAULT_QUEUE,
            # The scheduler signs the tokens workers present to the execution API: one secret.
            "AIRFLOW__API_AUTH__JWT_SECRET": secret["jwt"],
            "AIRFLOW__API__SECRET_KEY": secret["api_secret_key"],
            # A task instance's hostname is its worker's name (worker-1, ...), not the machine's.
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pipeline.airflow_adapter.worker_name.worker_name",
        })
        # A task waits in the broker until a worker of its queue is free; with a few slots for a
        # few dozen variant tasks that can exceed the 10 min after which Airflow fails it.
        defaults["AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT"] = "7200"
    for name, value in defaults.items():
        env[name] = os.environ.get(name, value)
    return env


def postgres_bin(name: str) -> Path | None:
    """A PostgreSQL server program: on PATH, else where Debian's postgresql-NN puts it."""
    found = shutil.which(name)
    if found:
        return Path(found).resolve()
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return folder / name
    return None


def require_servers() -> None:
    missing = [package for package, binary in (("postgresql", postgres_bin("initdb")),
                                               ("postgresql", postgres_bin("postgres")),
                                               ("redis-server", shutil.which("redis-server")))
               if binary is None]
    if missing:
        raise StackError(f"not installed: {', '.join(sorted(set(missing)))}: apt-get install "
                         f"{' '.join(sorted(set(missing)))} (`make up EXECUTOR=celery` does)")


# ---------------------------------------------------------------------------------------------
# supervisord


def supervisord_environment(settings: Settings) -> dict[str, str]:
    """What supervisord and so every program inherits: this environment without S3 credentials
    and without a tracking URI of the caller's, the virtualenv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k != "MLFLOW_TRACKING_URI" and not S3_VARIABLES.match(k)}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["STACK_DIR"] = str(settings.stack_dir)
    return env


def supervisor_config(settings: Settings, listed: list[Program]) -> str:
    def value(text) -> str:
        text = str(text)
        if '"' in text or "\n" in text:
            raise StackError(f"a setting holds a double quote or a line break: {text[:60]!r}")
        return text.replace("%", "%%")  # supervisord expands %(name)s

    stack = settings.stack_dir
    lines = [
        "; Generated by scripts/stack.py (`make up`) from its settings; rewritten at each fresh start.",
        "; supervisorctl -c THIS_FILE status|restart NAME|tail -f NAME",
        "[unix_http_server]", f"file={value(settings.socket_path)}", "chmod=0700", "",
        "[supervisord]", f"logfile={value(stack / 'supervisord.log')}", "logfile_maxbytes=10MB",
        "logfile_backups=2", f"pidfile={value(stack / 'supervisord.pid')}",
        f"childlogdir={value(stack)}", f"directory={value(settings.run_dir)}", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{value(settings.socket_path)}", "",
    ]
    for program in listed:
        lines += [f"[program:{program.name}]",
                  f"command={value(shlex.join(program.command))}"]
        if program.env:
            lines.append("environment=" + ",".join(
                f'{name}="{value(text)}"' for name, text in program.env.items()))
        if program.user:
            lines.append(f"user={program.user}")
        lines += [f"directory={value(settings.run_dir)}", f"priority={program.order}", "autostart=false",
                  "autorestart=true", f"startsecs={3 if program.order == INFRA else 5}",
                  "startretries=3", f"stopsignal={program.stopsignal}",
                  f"stopwaitsecs={int(settings.stop_timeout)}", "stopasgroup=true",
                  "killasgroup=true", "redirect_stderr=true",
                  f"stdout_logfile={value(stack / (program.name + '.log'))}",
                  "stdout_logfile_maxbytes=50MB", "stdout_logfile_backups=2", ""]
    return "\n".join(lines)


class Supervisor:
    """supervisord of one stack folder, through its XML-RPC interface on a unix socket."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @property
    def rpc(self):
        from supervisor.xmlrpc import SupervisorTransport
        transport = SupervisorTransport(None, None, f"unix://{self.settings.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def running(self) -> bool:
        try:
            return self.rpc.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def info(self) -> dict[str, dict]:
        """Program name -> supervisord's process info ({} when supervisord is not running)."""
        try:
            return {p["name"]: p for p in self.rpc.getAllProcessInfo()}
        except (OSError, xmlrpc.client.Error):
            return {}

    def start_daemon(self) -> None:
        result = subprocess.run([str(BIN / "supervisord"), "-c", str(self.settings.config_path)],
                                env=supervisord_environment(self.settings), cwd=PROJECT,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"supervisord did not start: {(result.stderr or result.stdout).strip()}"
                             f"\n{tail(self.settings.stack_dir / 'supervisord.log')}")
        deadline = time.monotonic() + 30
        while not self.running():
            if time.monotonic() > deadline:
                raise StackError("supervisord did not answer on "
                                 f"{self.settings.socket_path}: see {self.settings.stack_dir}/supervisord.log")
            time.sleep(0.2)

    def start(self, name: str) -> None:
        try:
            self.rpc.startProcess(name, False)
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" not in fault.faultString:
                raise StackError(f"supervisord could not start {name}: {fault.faultString}") from None

    def shutdown(self, timeout: float) -> None:
        """Stop every program (in reverse start order) and supervisord itself."""
        with contextlib.suppress(OSError, xmlrpc.client.Error, psutil.Error):
            pid = self.rpc.getPID()
            self.rpc.shutdown()
            psutil.Process(pid).wait(timeout)


def stack_processes(settings: Settings) -> list[psutil.Process]:
    """Every live process of this stack: supervisord, what it started and their descendants, and
    any of those that lost its parent (a task process whose worker was killed): they carry
    supervisord's server URL in their environment, or, when a new process title hides it
    (Airflow's components set one), work in <stack>/run (or PostgreSQL's folder)."""
    marker = f"unix://{settings.socket_path}"
    config = str(settings.config_path)
    run_dir, postgres_dir = str(settings.run_dir), str(settings.stack_dir / "postgres")
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid == os.getpid():
                continue
            cwd = process.cwd()
            if process.environ().get("SUPERVISOR_SERVER_URL") == marker or cwd == run_dir \
                    or cwd.startswith(postgres_dir + os.sep) or config in process.cmdline():
                found[process.pid] = process
                for child in process.children(recursive=True):
                    found.setdefault(child.pid, child)
    alive = []
    for process in found.values():
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def end_processes(processes: list[psutil.Process], timeout: float) -> list[int]:
    """SIGTERM, then SIGKILL after `timeout`; returns the PIDs that had to be killed."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


# ---------------------------------------------------------------------------------------------
# Preparing and checking


def prepare(settings: Settings, secret: dict) -> None:
    for folder in (settings.stack_dir, settings.run_dir, settings.airflow_home,
                   *(settings.stack_dir / "workers" / f"worker-{n}"
                     for n in range(1, len(settings.worker_queues) + 1))):
        folder.mkdir(parents=True, exist_ok=True)
    if not settings.mlflow_backend_uri and not settings.celery:
        (PROJECT / ".mlflow").mkdir(exist_ok=True)
    elif (settings.mlflow_backend_uri or "").startswith("sqlite:///"):
        Path(settings.mlflow_backend_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if "://" not in settings.mlflow_artifacts_destination:
        Path(settings.mlflow_artifacts_destination).mkdir(parents=True, exist_ok=True)
    if settings.celery:
        require_servers()
        init_postgres(settings, secret)
        redis_dir = settings.stack_dir / "redis"
        redis_dir.mkdir(exist_ok=True)
        fd = os.open(redis_dir / "redis.conf", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"bind {HOST}\nport {settings.redis_port}\nprotected-mode yes\n"
                      f"daemonize no\nlogfile \"\"\ndir \"{redis_dir}\"\nrequirepass {secret['redis']}\n")


def init_postgres(settings: Settings, secret: dict) -> None:
    """A cluster in <stack>/postgres/data (once), owned by `postgres` when we are root."""
    folder = settings.stack_dir / "postgres"
    data = folder / "data"
    as_user = {}
    if os.geteuid() == 0:
        as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
    folder.mkdir(exist_ok=True)
    if as_user:
        shutil.chown(folder, "postgres", "postgres")
        reach = subprocess.run(["test", "-w", str(folder)], **as_user)
        if reach.returncode != 0:
            raise StackError(f"PostgreSQL runs as user postgres, which cannot reach {folder}: make "
                             "every folder above it searchable by others (chmod o+x), or set "
                             "STACK_DIR to a folder it can reach")
    folder.chmod(0o700)
    if (data / "PG_VERSION").exists():
        return
    password_file = folder / "initdb-password"
    password_file.write_text(secret["postgres"] + "\n")
    password_file.chmod(0o600)
    if as_user:
        shutil.chown(password_file, "postgres", "postgres")
    try:
        result = subprocess.run(
            [str(postgres_bin("initdb")), "-D", str(data), "-U", "postgres", "--pwfile",
             str(password_file), "-A", "scram-sha-256", "-E", "UTF8", "--no-locale"],
            capture_output=True, text=True, cwd=folder, env={**os.environ, "LC_ALL": "C"}, **as_user)
    finally:
        password_file.unlink(missing_ok=True)
    if result.returncode != 0:
        raise StackError(f"initdb failed:\n{result.stdout[-1500:]}{result.stderr[-1500:]}")


def ensure_databases(settings: Settings, secret: dict) -> None:
    """The roles and databases `airflow` and `mlflow`, each owned by its own role."""
    import psycopg2
    from psycopg2 import sql

    deadline = time.monotonic() + settings.timeout
    while True:
        try:
            connection = psycopg2.connect(host=HOST, port=settings.postgres_port, user="postgres",
                                          password=secret["postgres"], dbname="postgres",
                                          connect_timeout=3)
            break
        except psycopg2.OperationalError as error:
            if "password authentication failed" in str(error):
                raise StackError(f"PostgreSQL in {settings.stack_dir / 'postgres'} does not take the "
                                 "password in secrets.json (deleted?): `make down`, then remove that "
                                 "folder to start from empty databases") from None
            if time.monotonic() > deadline:
                raise StackError(f"PostgreSQL did not accept connections on port "
                                 f"{settings.postgres_port}: {str(error).strip()}\n"
                                 f"{tail(settings.stack_dir / 'postgres.log')}") from None
            time.sleep(0.5)
    connection.autocommit = True  # CREATE DATABASE runs outside a transaction
    try:
        with connection.cursor() as cursor:
            for name in ("airflow", "mlflow"):
                password = secret[f"{name}_db"]
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
                verb = "ALTER" if cursor.fetchone() else "CREATE"
                cursor.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password)))
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if not cursor.fetchone():
                    cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name), sql.Identifier(name)))
    finally:
        connection.close()


def wait_for_redis(settings: Settings, secret: dict) -> None:
    import redis

    client = redis.Redis(host=HOST, port=settings.redis_port, password=secret["redis"],
                         socket_timeout=3)
    deadline = time.monotonic() + settings.timeout
    while True:
        try:
            client.ping()
            return
        except redis.RedisError as error:
            if time.monotonic() > deadline:
                raise StackError(f"Redis did not answer on port {settings.redis_port}: {error}\n"
                                 f"{tail(settings.stack_dir / 'redis.log')}") from None
            time.sleep(0.5)


def ensure_bucket(settings: Settings, secret: dict) -> None:
    if not settings.mlflow_artifacts_destination.startswith("s3://"):
        return
    env = {**supervisord_environment(settings), **s3_environment(settings, secret)}
    result = subprocess.run([sys.executable, "-m", "pipeline.store.s3", "ensure-bucket",
                             settings.mlflow_artifacts_destination, "--wait", "60"],
                            env=env, cwd=PROJECT, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise StackError(f"the artifacts bucket of {settings.mlflow_artifacts_destination} is not "
                         f"ready: {result.stderr.strip() or result.stdout.strip()}")


def migrate_airflow_db(settings: Settings, env: dict[str, str]) -> None:
    """Create or upgrade Airflow's metadata DB (and airflow.cfg) before the components start."""
    log = settings.stack_dir / "airflow-db-migrate.log"
    print(f"preparing Airflow's database ({'PostgreSQL' if settings.celery else settings.airflow_home}) ...",
          flush=True)
    with open(log, "w") as out:
        result = subprocess.run([str(BIN / "airflow"), "db", "migrate"],
                                env={**supervisord_environment(settings), **env}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=PROJECT)
    if result.returncode != 0:
        raise StackError(f"`airflow db migrate` failed: see {log}\n{tail(log)}")
    slots = training_pool_slots(settings)
    with open(log, "a") as out:
        result = subprocess.run([str(BIN / "airflow"), "pools", "set", TRAINING_POOL, str(slots),
                                 TRAINING_POOL_DESCRIPTION],
                                env={**supervisord_environment(settings), **env}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=PROJECT)
    if result.returncode != 0:
        raise StackError(f"`airflow pools set {TRAINING_POOL}` failed: see {log}\n{tail(log)}")


def training_pool_slots(settings: Settings) -> int:
    """Slots of the pool `training`: PIPELINE_TRAINING_POOL_SLOTS, else one per worker that
    consumes the queue `training` (Celery), else 1 (the LocalExecutor's one host)."""
    configured = os.environ.get("PIPELINE_TRAINING_POOL_SLOTS", "")
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise StackError(f"PIPELINE_TRAINING_POOL_SLOTS={configured!r} is not a positive number")
        return int(configured)
    if settings.celery:
        return max(1, sum(TRAINING_QUEUE in entry.split(",") for entry in settings.worker_queues))
    return 1


def check_ports(settings: Settings, listed: list[Program]) -> None:
    for program in listed:
        if program.port and (holder := port_holder(program.port)):
            suggestion = free_port_after(program.port, set(settings.port_settings().values()))
            raise StackError(
                f"port {program.port} is in use by another program ({holder}): set "
                f"{program.port_setting}={suggestion or '<another port>'}, e.g. "
                f"`make up {program.port_setting}={suggestion or '...'}`")


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


def free_port_after(port: int, taken: set[int]) -> int:
    for candidate in range(port + 1, min(port + 200, 65535)):
        if candidate not in taken and port_holder(candidate) is None:
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


def answering(program: Program) -> tuple[bool, str]:
    """Whether a program with a health endpoint answers healthy, and what it said."""
    reply = http_get(f"{program.url}{program.health_path}")
    if reply is None:
        return False, "no answer"
    status, body = reply
    if status != 200:
        return False, f"HTTP {status}"
    if program.name == "airflow-api-server":
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


def registered_workers(settings: Settings, secret: dict, timeout: float = 2.0) -> dict[str, list[str]]:
    """Celery worker name (worker-1@host) -> the queues it consumes, as the workers answer."""
    from celery import Celery

    app = Celery(broker=broker_url(settings, secret))
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception:  # the broker is down: nobody is registered
        replies = {}
    finally:
        app.close()
    return {name: sorted(q["name"] for q in queues) for name, queues in replies.items()}


def worker_registered(program: Program, workers: dict[str, list[str]]) -> bool:
    return any(name.startswith(program.name + "@") and queues == sorted(program.queues or [])
               for name, queues in workers.items())


# ---------------------------------------------------------------------------------------------
# Commands


@contextlib.contextmanager
def locked(settings: Settings):
    """One `up` or `down` at a time for a stack folder."""
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.stack_dir / "stack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_state(settings: Settings) -> dict:
    try:
        return json.loads((settings.stack_dir / "stack.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def running_settings(settings: Settings, supervisor: Supervisor) -> Settings:
    """The settings of the stack supervisord runs, or `settings` when it runs none."""
    if supervisor.running():
        return Settings.from_state(read_state(settings)) or settings
    return settings


def up(settings: Settings) -> int:
    with locked(settings):
        supervisor = Supervisor(settings)
        fresh = not supervisor.running()
        if fresh:
            leftovers = stack_processes(settings)
            if leftovers:  # a supervisord that was killed left its programs behind
                end_processes(leftovers, settings.stop_timeout)
            secret = load_secrets(settings, create=True)
            listed = programs(settings, secret)
            check_ports(settings, listed)
            prepare(settings, secret)
            fd = os.open(settings.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:  # it holds passwords
                out.write(supervisor_config(settings, listed))
            (settings.stack_dir / "stack.json").write_text(json.dumps(settings.to_state(), indent=1))
            supervisor.start_daemon()
            to_start = listed
        else:
            wanted = settings
            settings = supervisor.settings = running_settings(settings, supervisor)
            changed = [f"{k} {v}" for k, v in settings.to_state().items()
                       if k not in ("timeout", "stop_timeout") and wanted.to_state()[k] != v]
            if changed:
                print(f"the stack runs with earlier settings ({', '.join(changed)}): keeping them; "
                      "`make down` first to change them")
            secret = load_secrets(settings)
            listed = programs(settings, secret)
            info = supervisor.info()
            to_start = [p for p in listed
                        if info.get(p.name, {}).get("statename") not in ("RUNNING", "STARTING")]
            if not to_start:
                print("the stack is already running")
                print_summary(settings, listed)
                return 0
        try:
            start_in_order(settings, supervisor, listed, to_start, secret)
        except (StackError, KeyboardInterrupt):
            if fresh:
                supervisor.shutdown(settings.stop_timeout * 4)
                end_processes(stack_processes(settings), settings.stop_timeout)
                (settings.stack_dir / "stack.json").unlink(missing_ok=True)
            raise
    print("the stack is up")
    print_summary(settings, listed)
    return 0


def start_in_order(settings: Settings, supervisor: Supervisor, listed: list[Program],
                   to_start: list[Program], secret: dict) -> None:
    names = {p.name for p in to_start}
    migrated = False
    for order in (INFRA, TRACKING, AIRFLOW, WORKERS):
        batch = [p for p in to_start if p.order == order]
        if batch and order in (AIRFLOW, WORKERS) and not migrated:
            migrate_airflow_db(settings, batch[0].env)
            migrated = True
        if order == TRACKING and "mlflow" in names:
            ensure_bucket(settings, secret)  # idempotent; moto keeps buckets in memory only
        for program in batch:
            supervisor.start(program.name)
            print(f"started {program.name}, log {settings.stack_dir / (program.name + '.log')}",
                  flush=True)
        if order == INFRA:
            if "postgres" in names:
                ensure_databases(settings, secret)
            if "redis" in names:
                wait_for_redis(settings, secret)
    wait_until_answering(settings, supervisor, listed, to_start, secret)


def wait_until_answering(settings: Settings, supervisor: Supervisor, listed: list[Program],
                         started: list[Program], secret: dict) -> None:
    """Until every program runs, every health endpoint answers healthy (Airflow's also covers
    the components without one) and every worker is registered with its queues; fails at once
    when a program just started exits."""
    deadline = time.monotonic() + settings.timeout
    waiting = {p.name: p for p in listed}
    last: dict[str, str] = {}
    while True:
        info = supervisor.info()
        for program in started:
            state = info.get(program.name, {}).get("statename", "UNKNOWN")
            if state in ("BACKOFF", "EXITED", "FATAL", "STOPPED", "UNKNOWN"):
                log = settings.stack_dir / f"{program.name}.log"
                raise StackError(f"{program.name} exited during start-up ({state}): see {log}\n"
                                 f"{tail(log)}")
        workers = None
        for program in list(waiting.values()):
            if info.get(program.name, {}).get("statename") != "RUNNING":
                ok, last[program.name] = False, "starting"
            elif program.health_path:
                ok, last[program.name] = answering(program)
            elif program.queues is not None:
                if workers is None:
                    workers = registered_workers(settings, secret)
                ok = worker_registered(program, workers)
                last[program.name] = "registered" if ok else "not registered with the broker yet"
            else:
                ok = True
            if ok:
                del waiting[program.name]
        if not waiting:
            return
        if time.monotonic() > deadline:
            program = next(iter(waiting.values()))
            log = settings.stack_dir / f"{program.name}.log"
            raise StackError(
                f"{program.name} was not ready within {settings.timeout:.0f} s "
                f"({last.get(program.name)}): see the logs in {settings.stack_dir}, starting with "
                f"{log}\n{tail(log)}\n(a slow machine may need more time: STACK_TIMEOUT=600 make up)")
        time.sleep(1)


def down(settings: Settings) -> int:
    with locked(settings):
        supervisor = Supervisor(settings)
        settings = supervisor.settings = running_settings(settings, supervisor)
        info = supervisor.info()
        if info:
            supervisor.shutdown(settings.stop_timeout * 5 + 30)
        killed = end_processes(stack_processes(settings), settings.stop_timeout)
        (settings.stack_dir / "supervisord.pid").unlink(missing_ok=True)
        (settings.stack_dir / "stack.json").unlink(missing_ok=True)
        for program in programs(settings):
            ran = info.get(program.name, {}).get("statename") in ("RUNNING", "STARTING", "BACKOFF")
            print(f"{program.name:22} {'stopped' if ran else 'was not running'}")
        if killed:
            print(f"(still running after {settings.stop_timeout:.0f} s, killed: pids {killed})")
    return 0


def status(settings: Settings, as_json: bool = False) -> int:
    supervisor = Supervisor(settings)
    settings = supervisor.settings = running_settings(settings, supervisor)
    info = supervisor.info()
    secret = load_secrets(settings)
    listed = programs(settings, secret)
    workers = registered_workers(settings, secret) if info and settings.celery else {}
    report = {}
    for program in listed:
        state = info.get(program.name, {}).get("statename", "STOPPED").lower()
        pid = info.get(program.name, {}).get("pid") or None
        note = ""
        if state == "running" and program.health_path:
            ok, said = answering(program)
            note = "" if ok else said
        if state == "running" and program.queues is not None and not worker_registered(program, workers):
            note = "not registered with the broker"
        report[program.name] = {"state": state, "pid": pid, "url": program.url,
                                "queues": program.queues, "note": note}
    if as_json:
        print(json.dumps({"executor": settings.executor, "supervisord": bool(info),
                          "programs": report, "workers": workers}, indent=1))
        return 0
    print(f"{'program':22} {'state':9} {'pid':>8}  url / queues")
    for name, entry in report.items():
        where = entry["url"] or ("queues " + ",".join(entry["queues"]) if entry["queues"] else "-")
        note = f"  ({entry['note']})" if entry["note"] else ""
        print(f"{name:22} {entry['state']:9} {entry['pid'] or '-':>8}  {where}{note}")
    if info:
        print(f"supervisord: supervisorctl -c {settings.config_path} status")
    print(f"logs: {settings.stack_dir}/*.log")
    print(f"Airflow login: user {AIRFLOW_USER}, password in {settings.password_file}")
    return 0


def print_summary(settings: Settings, listed: list[Program]) -> None:
    by_name = {p.name: p for p in listed}
    print(f"  MLflow UI:   {by_name['mlflow'].url}")
    print(f"  Airflow UI:  {by_name['airflow-api-server'].url}   (DAG model_compression)")
    print(f"  Airflow login: user {AIRFLOW_USER}, password in {settings.password_file}")
    if settings.celery:
        for program in listed:
            if program.order == INFRA:
                print(f"  {program.name + ':':12} {program.url}")
        print(f"  artifacts:   {settings.mlflow_artifacts_destination}"
              + (f" at {settings.s3_endpoint}" if settings.s3_endpoint else ""))
        for program in listed:
            if program.queues is not None:
                print(f"  {program.name + ':':12} queues {','.join(program.queues)}, "
                      f"work folder {program.env['PIPELINE_WORK_DIR']}")
    for queue in unconsumed_queues(settings):
        print(f"  note: no worker here consumes the queue {queue!r}: its tasks wait for a worker "
              "on another machine")
    print(f"  logs: {settings.stack_dir}/*.log   stop: make down   check: make status")


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join("  | " + line for line in text.splitlines()[-lines:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--json", action="store_true", help="status: as JSON")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "status":
            return status(settings, args.json)
        return {"up": up, "down": down}[args.command](settings)
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
