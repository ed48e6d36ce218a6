"""The command line on bad input: exit 2, one line on stderr naming the problem, no traceback."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", "run", *args], capture_output=True,
                          text=True, cwd=ROOT, env=os.environ.copy(), timeout=timeout)


def _npz(path, **override):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((30, 28, 28, 1), dtype=np.float32), "y_train": np.arange(30) % 3,
              "x_test": rng.random((9, 28, 28, 1), dtype=np.float32), "y_test": np.arange(9) % 3}
    arrays.update(override)
    np.savez(path, **arrays)
    return str(path)


def _single_class_folder(root):
    (root / "only").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(root / "only" / f"{i}.png")
    return str(root)


# The cases that get past the argument checks start a process that loads TensorFlow, data or a
# model (15-30 s each on a loaded 2-core machine): make test-stack; the others are make test-fast.
LOADS = pytest.mark.pipeline


@pytest.mark.parametrize("case, expected", [
    pytest.param("missing_dataset", "dataset not found", marks=LOADS),
    pytest.param("single_class", "at least 2", marks=LOADS),
    pytest.param("labels_out_of_range", "labels out of range", marks=LOADS),
    pytest.param("nan_pixels", "NaN or infinite", marks=LOADS),
    pytest.param("corrupt_model", "cannot load model", marks=LOADS),
    pytest.param("missing_model", "model not found", marks=LOADS),
    ("unknown_variant", "unknown variant"),
    ("bad_epochs", "'epochs' must be at least 1"),
    ("bad_option", "invalid value"),
    ("bad_augment", "'augment' must be one of auto, flip, none"),
    ("unknown_setting", "unknown setting 'prune_sparsty'"),
])
def test_bad_input_exits_2_with_one_clear_line(tmp_path, tiny_model_path, case, expected):
    args = {
        "missing_dataset": ["--dataset", str(tmp_path / "nowhere")],
        "single_class": ["--dataset", _single_class_folder(tmp_path / "imgs")],
        "labels_out_of_range": ["--model", str(tiny_model_path), "--dataset",
                                _npz(tmp_path / "labels.npz", y_test=np.array([0, 1, 2, 3, 4, 5, 6, 7, 12]))],
        "nan_pixels": ["--dataset", _npz(tmp_path / "nan.npz", x_test=np.full((9, 28, 28, 1), np.nan, np.float32))],
        "corrupt_model": ["--model", str(tmp_path / "broken.h5")],
        "missing_model": ["--model", str(tmp_path / "absent.keras")],
        "unknown_variant": ["--variants", "float32,int9"],
        "bad_epochs": ["--epochs", "0"],
        "bad_option": ["--set", "prune_sparsity=lots"],
        "bad_augment": ["--set", "augment=rotate"],
        "unknown_setting": ["--set", "prune_sparsty=0.5"],
    }[case]
    if case == "corrupt_model":
        (tmp_path / "broken.h5").write_bytes(tiny_model_path.read_bytes()[:500])
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, done.stderr[-2000:]
    assert expected in error_lines[0]
    assert "Traceback" not in done.stderr


def test_usage_error_exits_2():
    done = run_cli("--epochs", "many")
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_an_unreachable_tracking_server_is_one_line_naming_it(tmp_path):
    """Nothing listens at the URL: one line naming it (without its credentials) and what to
    start, exit 1, the traceback in the work folder's log instead of on the terminal."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://someone:s3cret@127.0.0.1:{port}",
           "PIPELINE_WORK_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--variants", "float32"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 1
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"tracking server http://127.0.0.1:{port} (MLFLOW_TRACKING_URI) cannot be reached" \
        in lines[0] and "s3cret" not in done.stderr
    assert "Traceback" in (tmp_path / "last-error.log").read_text()
