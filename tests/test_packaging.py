"""The package as other people install it: built from a copy of the project (pyproject.toml,
README.md, pipeline/) into fresh virtualenvs with pip, from PyPI through pip's cache.

- Into a virtualenv that already holds Airflow, `pip install <project>` changes no installed
  package's version (Airflow's included) and registers the MLflow-link plugin's entry point.
- Without Airflow, `pip install <project> -c constraints.txt` gives a working `compress()`: 300
  Fashion-MNIST images as an .npz, float32 and int8, one epoch.

Slow (several minutes: each virtualenv installs TensorFlow, MLflow and, for the first, Airflow),
so in `make test-slow`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.slow

COMPRESS_WITHOUT_AIRFLOW = """
import gzip, importlib.util, sys
import numpy as np
assert importlib.util.find_spec("airflow") is None, "Airflow is installed here"
root = sys.argv[1]
def read(name, count, offset, shape):
    with gzip.open(f"{root}/{name}") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)[:count * int(np.prod(shape))].reshape(count, *shape)
np.savez("small.npz", x_train=read("train-images-idx3-ubyte.gz", 240, 16, (28, 28)),
         y_train=read("train-labels-idx1-ubyte.gz", 240, 8, ()),
         x_test=read("t10k-images-idx3-ubyte.gz", 60, 16, (28, 28)),
         y_test=read("t10k-labels-idx1-ubyte.gz", 60, 8, ()))
from pipeline.api import compress
results = compress(None, "small.npz", variants=["float32", "int8"], epochs=1, min_accuracy=None,
                   max_accuracy_drop_pts=100, experiment="packaging", latency_runs=5,
                   latency_warmup=1, calibration_samples=32)
print("variants:", sorted(results.table["variant"]))
print("champion:", results.champion)
"""


def project_copy(tmp_path: Path) -> Path:
    """What an sdist holds: the build is made from this copy, so no .egg-info lands in the
    project folder (where Airflow would find the plugin's entry point a second time)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "pipeline", source / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return source


def virtualenv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    return path / "bin" / "python"


def pip_install(python: Path, *args: str) -> None:
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args],
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]


def installed(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all"], capture_output=True,
                         text=True, check=True, timeout=300).stdout
    return dict(line.lower().split("==", 1) for line in out.splitlines() if "==" in line)


def constraint(name: str) -> str:
    return next(line.split("==", 1)[1].strip() for line in CONSTRAINTS.read_text().splitlines()
                if line.lower().startswith(f"{name}=="))


def test_installs_into_an_existing_airflow_without_changing_it(tmp_path):
    python = virtualenv(tmp_path / "venv")
    pip_install(python, f"apache-airflow=={constraint('apache-airflow')}", "-c", str(CONSTRAINTS))
    before = installed(python)
    pip_install(python, str(project_copy(tmp_path)))
    after = installed(python)
    changed = {name: (version, after.get(name)) for name, version in before.items()
               if after.get(name) != version}
    assert changed == {}, f"pip install of the project changed installed packages: {changed}"
    assert "model-compression-pipeline" in after and after["apache-airflow"] == constraint("apache-airflow")
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout
    points = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                             "print([p.value for p in m.entry_points(group='airflow.plugins')])"],
                            capture_output=True, text=True, check=True, timeout=300, cwd=tmp_path).stdout
    assert "pipeline.airflow_adapter.mlflow_link:MLflowLinkPlugin" in points


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST is not installed (make dataset)")
def test_compress_works_without_airflow(tmp_path):
    python = virtualenv(tmp_path / "venv")
    pip_install(python, str(project_copy(tmp_path)), "-c", str(CONSTRAINTS))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TF_USE_LEGACY_KERAS": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PIPELINE_WORK_DIR": str(tmp_path / "work")}
    result = subprocess.run([str(python), "-c", COMPRESS_WITHOUT_AIRFLOW, str(FASHION_MNIST)],
                            capture_output=True, text=True, timeout=1800, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "variants: ['float32', 'int8']" in result.stdout
    assert "champion: " in result.stdout
