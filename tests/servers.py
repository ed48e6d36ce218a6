"""Real server processes on loopback for tests: `moto_server` (an S3-protocol server) and
`mlflow server`.

Each server runs in its own session (so its own process group) on a free 127.0.0.1 port, with
its output in a log file. Stopping it sends SIGTERM to the group, then SIGKILL to the group and to
every descendant seen while it ran (MLflow's job runner restarts its huey consumers as they
die; a job subprocess may start its own session), and asserts that none of them is left. The
MLflow server's huey storage folder (created in /dev/shm) is removed too.

Credentials given to a server go into that subprocess's environment only, never os.environ.

    with moto_s3_server(log_dir) as s3_url:
        ...
    with mlflow_server(f"sqlite:///{db}", "s3://bucket/artifacts", env, log_dir) as tracking_url:
        ...
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

VENV_BIN = Path(sys.executable).parent
# Fake S3 credentials for moto (it accepts any), distinctive so that a test can look for leaks;
# set in server environments only.
MOTO_ACCESS_KEY_ID = "moto-key-Zq81"
MOTO_SECRET_ACCESS_KEY = "moto-secret-Zq81"
# The MLflow server's huey storage folder (see mlflow.server.constants.HUEY_STORAGE_PATH_ENV_VAR).
_HUEY_STORAGE_ENV = "_MLFLOW_HUEY_STORAGE_PATH"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without AWS_*/MLFLOW_S3_*/MLFLOW_TRACKING_URI, the venv's bin
    first on PATH (`mlflow server` execs uvicorn by name), then `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_S3_")) and k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.update(extra or {})
    return env


class ServerProcess:
    """A server started in its own process group; `stop()` leaves no process behind."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path):
        self.name, self.command, self.log_path = name, command, Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.pgid = self.popen.pid  # a new session's leader leads its process group
        self._seen: dict[int, float] = {}  # pid -> create_time, every descendant observed
        self._scratch: set[str] = set()
        self.stopped = False

    def log_tail(self, chars: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise ServerExited(f"{self.name} exited with status {self.popen.returncode} "
                                   f"before {what}; its log:\n{self.log_tail()}")
            self._observe()
            if ready():
                self._observe()
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{self.name}: no {what} after {timeout:.0f} s; its log:\n"
                           f"{self.log_tail()}")

    def _observe(self) -> None:
        """Remember every process of the group and every descendant (even one in a new session),
        and the scratch folders named in their environments."""
        procs = []
        with contextlib.suppress(psutil.Error):
            procs = psutil.Process(self.popen.pid).children(recursive=True)
        for proc in procs + self._group_members():
            with contextlib.suppress(psutil.Error):
                if proc.pid not in self._seen:
                    self._seen[proc.pid] = proc.create_time()
                    huey = proc.environ().get(_HUEY_STORAGE_ENV)
                    if huey:
                        self._scratch.add(huey)

    def _group_members(self) -> list[psutil.Process]:
        members = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid != self.popen.pid and os.getpgid(proc.pid) == self.pgid:
                    members.append(proc)
        return members

    def _alive(self) -> list[psutil.Process]:
        """Processes of this server still running (zombies count as gone: they are dead)."""
        alive = []
        candidates = {p.pid: p for p in self._group_members()}
        for pid, created in self._seen.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == created:  # not a recycled pid
                    candidates[pid] = proc
        if self.popen.poll() is None:
            candidates[self.popen.pid] = psutil.Process(self.popen.pid)
        for proc in candidates.values():
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the group, SIGKILL whatever is left after `grace` s, assert nothing is left.
        Stopping again does nothing (the group id may belong to someone else by then)."""
        if self.stopped:
            return
        self.stopped = True
        if self.popen.poll() is None:
            self._observe()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        deadline = time.monotonic() + 15
        while True:
            self._observe()
            left = self._alive()
            if not left:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self._log.close()
        for folder in self._scratch:
            shutil.rmtree(folder, ignore_errors=True)
        left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in self._alive()]
        assert not left, f"{self.name} left processes behind: {left}"
        assert self.popen.returncode is not None, f"{self.name} (pid {self.popen.pid}) not reaped"
        assert not any(Path(folder).exists() for folder in self._scratch)


class ServerExited(RuntimeError):
    """The server process ended before it was ready (e.g. its port was taken meanwhile)."""


def _log_dir(log_dir: Path | None) -> Path:
    return Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="server-logs-"))


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start(name: str, command_for_port: Callable[[int], list[str]], env: dict[str, str],
           log_path: Path, ready: Callable[[int], bool], timeout: float,
           attempts: int = 3) -> tuple[ServerProcess, int]:
    """Start on a free port; on the rare race where another process took it first, retry."""
    for attempt in range(attempts):
        port = free_port()
        server = ServerProcess(name, command_for_port(port), env, log_path)
        try:
            server.wait_until(lambda: ready(port), timeout, f"answer on port {port}")
            return server, port
        except ServerExited:
            server.stop()
            if attempt == attempts - 1 or not _port_open(port):
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def running_moto_s3(log_dir: Path | None = None,
                    timeout: float = 30) -> Iterator[tuple[str, ServerProcess]]:
    """`moto_server` on a free loopback port: yields (endpoint URL, the ServerProcess), so a test
    can stop it early (an outage); stopping twice is harmless."""
    server, port = _start(
        "moto_server", lambda p: [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(p)],
        server_env(), _log_dir(log_dir) / "moto_server.log",
        lambda p: _http_ok(f"http://127.0.0.1:{p}/moto-api/data.json"), timeout)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.stop()


@contextlib.contextmanager
def moto_s3_server(log_dir: Path | None = None, timeout: float = 30) -> Iterator[str]:
    """`moto_server` on a free loopback port; yields its endpoint URL."""
    with running_moto_s3(log_dir, timeout) as (url, _server):
        yield url


@pytest.fixture
def moto_s3(tmp_path) -> Iterator[str]:
    """A fresh moto_server for one test (import the fixture into the test module); yields its
    endpoint URL."""
    with moto_s3_server(tmp_path) as url:
        yield url


def moto_credentials_env(endpoint_url: str) -> dict[str, str]:
    """What an S3 client (e.g. the MLflow server) needs to use moto at `endpoint_url`."""
    return {"MLFLOW_S3_ENDPOINT_URL": endpoint_url, "AWS_ACCESS_KEY_ID": MOTO_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": MOTO_SECRET_ACCESS_KEY, "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def running_mlflow_server(backend_uri: str, artifacts_destination: str,
                          env: dict[str, str] | None = None, log_dir: Path | None = None,
                          timeout: float = 120) -> Iterator[tuple[str, ServerProcess]]:
    """`mlflow server` (one worker) proxying artifacts to `artifacts_destination`; `env` (e.g.
    MLFLOW_S3_ENDPOINT_URL and S3 credentials) goes to the server's environment only. Yields
    (tracking URL, the ServerProcess)."""
    def command(port: int) -> list[str]:
        return [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
                "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1"]

    server, port = _start("mlflow server", command, server_env(env),
                          _log_dir(log_dir) / "mlflow_server.log",
                          lambda p: _http_ok(f"http://127.0.0.1:{p}/health"), timeout)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.stop()


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts_destination: str, env: dict[str, str] | None = None,
                  log_dir: Path | None = None, timeout: float = 120) -> Iterator[str]:
    """`mlflow server` on a free loopback port; yields its tracking URL (see
    running_mlflow_server)."""
    with running_mlflow_server(backend_uri, artifacts_destination, env, log_dir, timeout) as (
            url, _server):
        yield url
