"""A whole run on a folder of JPEG photos, streamed: progress a person can follow on the terminal,
learning curves and dataset lineage in MLflow, and no pixels in the artifact store."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from benchmarks.scaling import make_photos

pytestmark = pytest.mark.pipeline  # a whole CLI run, minutes on 2 cores; make test-stack

ROOT = Path(__file__).resolve().parent.parent


def test_a_photo_folder_run_shows_progress_curves_and_lineage(tmp_path):
    photos = make_photos(tmp_path / "photos", 150, size=64)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PIPELINE_WORK_DIR": str(tmp_path / "work"), "MLFLOW_TRACKING_URI": store}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--dataset", str(photos), "--epochs", "2",
         "--variants", "float32,int8,prune-int8", "--experiment", "streaming-run",
         "--registered-model-name", "streaming-run", "--set", "prune_epochs=1",
         "--set", "latency_runs=5", "--set", "calibration_samples=16"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stderr
    # One line per stage, per epoch (with the time left in it) and per variant, with an estimate
    # of what is left in the run.
    assert "[data] 108 train / 12 validation / 30 test images, 5 classes, 64x64x3" in log, log[-3000:]
    assert "[baseline] epoch 2/2: loss " in log and "s left" in log
    assert "[optimize_prune] epoch 1/" in log
    assert "[variant] int8: accuracy " in log and "pts)" in log
    assert "1 variant(s) left, ~" in log

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("streaming-run")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.run_role = 'parent'")
    curve = client.get_metric_history(parent.info.run_id, "baseline/loss")
    assert [point.step for point in curve] == [0, 1]
    assert client.get_metric_history(parent.info.run_id, "baseline/val_accuracy")
    assert client.get_metric_history(parent.info.run_id, "optimize_prune/loss")
    # The settings pruning chose for this model and data, on the variant's child run.
    (pruned,) = client.search_runs([experiment.experiment_id], "tags.variant = 'prune-int8'")
    assert float(pruned.data.params["technique.prune.prune_sparsity"]) > 0
    assert int(pruned.data.params["technique.prune.prune_epochs"]) >= 1
    assert "technique_settings.json" in {f.path for f in client.list_artifacts(pruned.info.run_id)}
    # The dataset in MLflow's Datasets: one input per split, with the source and sizes.
    inputs = {tag.value: entry.dataset for entry in parent.inputs.dataset_inputs
              for tag in entry.tags if tag.key == "mlflow.data.context"}
    assert set(inputs) == {"train", "validation", "test"}
    assert str(photos) in inputs["train"].source and '"images": 30' in inputs["test"].profile
    # No pixels in the artifact store: the dataset travelled as its manifest.
    store = Path(parent.info.artifact_uri.removeprefix("file://"))
    files = [p for p in store.rglob("*") if p.is_file()]
    assert (store / "exchange" / "train" / "dataset.json").exists()
    assert not [p for p in files if p.suffix in (".npz", ".jpg", ".tfrecord")]
    pixels = 150 * 64 * 64 * 3
    assert (store / "exchange" / "train" / "dataset.json").stat().st_size < pixels / 100
