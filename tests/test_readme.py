"""The commands a user copies from the README work as written: the Python API example, then
`make serve` and the `curl` that queries it (against this test session's MLflow store)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.pipeline  # the README's API example (a whole run) and make serve; make test-stack

README = (ROOT / "README.md").read_text()


def code_block(after: str, language: str) -> str:
    """The first ```language block after the text `after` in the README."""
    start = README.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(README, start)
    assert match, f"no {language} block after {after!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def api_example_run():
    """The README's Python API example, run as written with the project's interpreter."""
    code = code_block("From Python", "python")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ.copy(), timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_python_api_example_prints_the_table_and_the_champion(api_example_run):
    lines = api_example_run.strip().splitlines()
    assert any(re.search(r"\bint4\b.*\bok\b", line) for line in lines), api_example_run
    champion, path = lines[-1].split(" ", 1)
    assert champion in ("float32", "int8", "int4") and path.endswith("model.tflite")


def test_make_serve_and_the_readme_curl_answer(api_example_run, tmp_path):
    """`make serve` (the champion the example registered), then the README's curl verbatim
    (but for the port): one prediction per stored example image."""
    serve = code_block("In one terminal", "bash").strip()
    curl = code_block("and in another", "bash").strip()
    assert serve == "make serve"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(["make", "--no-print-directory", "serve", f"SERVE_PORT={port}"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        done = subprocess.run(curl.replace("127.0.0.1:5001", f"127.0.0.1:{port}"), shell=True,
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        predictions = json.loads(done.stdout)["predictions"]
        example = json.loads((ROOT / ".work" / "serving_input_example.json").read_text())
        assert len(predictions) == len(example["inputs"]) >= 1
        assert all(0 <= p["class"] < 10 and p["label"] for p in predictions), predictions
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
