"""What the stages leave in MLflow for people to look at: the runs' descriptions (the summary on
the parent run, a verdict on each child run), per-class accuracy metrics and the confusion
matrix, the sensitivity chart, and system metrics around training. On the session's SQLite
tracking store (tests/conftest.py)."""
import logging
import sys
import threading
import time
import uuid

import pytest

from pipeline import stages
from pipeline.config import PipelineConfig
from pipeline.contract import Reference, RunContext
from pipeline.runtime.evaluate import Evaluation
from pipeline.store import tracking

EXPERIMENT = "run-notes-tests"


def new_parent() -> str:
    return tracking.start_parent_run(EXPERIMENT, f"test-{uuid.uuid4().hex[:8]}", params={},
                                     tags={})


def new_child(parent: str, variant: str) -> str:
    quantization = variant.rsplit("-", 1)[-1]
    optimizations = variant.rsplit("-", 1)[0] if "-" in variant else ""
    return tracking.child_run(parent, {"variant": variant, "quantization": quantization,
                                       "optimizations": optimizations})


def artifact_names(run_id: str) -> set[str]:
    return {item.path for item in tracking.list_artifacts(run_id)}


def test_evaluation_logs_per_class_accuracy_and_the_confusion_matrix():
    child = new_child(new_parent(), "int8")
    evaluation = Evaluation(accuracy=0.9, per_class_accuracy={"T-shirt/top": 0.8, "Bag": 1.0},
                            keras_agreement=None, test_images=20, input_dtype="int8",
                            confusion=[[8, 2], [0, 10]])
    stages._log_class_results(child, "int8", evaluation)
    metrics = tracking.client().get_run(child).data.metrics
    assert metrics["accuracy_class_t_shirt_top"] == 0.8 and metrics["accuracy_class_bag"] == 1.0
    assert "confusion_matrix.png" in artifact_names(child)


def test_sensitivity_table_comes_with_its_chart():
    child = new_child(new_parent(), "mixed")
    table = [{"layer": "dense", "op": "FULLY_CONNECTED", "weights": 100, "quantization": "int4",
              "output_snr_db": 20.0}]
    stages._log_sensitivity(child, table, {"dense": "int8"})
    assert {"sensitivity.json", "sensitivity.md", "sensitivity.png"} <= artifact_names(child)


def test_select_writes_the_summary_on_the_parent_and_a_verdict_on_each_child():
    parent = new_parent()
    figures = {"size_bytes": 4000, "gzip_size_bytes": 3000, "compression_ratio": 4.0,
               "gzip_compression_ratio": 5.0, "latency_ms_p50": 0.1, "latency_ms_p90": 0.2,
               "peak_memory_mb": 30.0}
    for variant, accuracy, delta in (("float32", 0.90, 0.0), ("int8", 0.85, -5.0)):
        child = new_child(parent, variant)
        tracking.log_metrics(child, {**figures, "accuracy": accuracy,
                                     "accuracy_delta_pts": delta})
        tracking.set_tags(child, {"status": "ok"})
        tracking.finish_run(child)
    failed = new_child(parent, "dynamic")
    tracking.fail_run(failed, "ValueError: conversion refused")
    config = PipelineConfig.from_mapping({"variants": ["float32", "int8", "dynamic"],
                                          "experiment": EXPERIMENT}, use_env=False)
    context = RunContext(pipeline_run_id=f"notes-{uuid.uuid4().hex[:8]}", parent_run_id=parent,
                         experiment=EXPERIMENT, config=config, num_classes=10,
                         dataset_uri="unused", base_model_uri="unused", base_model_kind="tf_keras",
                         reference=Reference(tflite_uri="unused", accuracy=0.9, size_bytes=16000,
                                             keras_accuracy=0.9),
                         baseline_predictions_uri="unused")
    stages.select(context)
    runs = {run.data.tags["variant"]: run for run in tracking.child_runs(parent)}
    notes = {name: run.data.tags[tracking.NOTE_TAG] for name, run in runs.items()}
    assert notes["float32"].startswith("passed the gates; champion of this run (float32:")
    assert notes["int8"] == "rejected: accuracy drop 5.0 pts > 1.0 allowed"
    assert notes["dynamic"] == "failed: ValueError: conversion refused"
    summary = tracking.client().get_run(parent).data.tags[tracking.NOTE_TAG]
    assert summary.startswith("# Model compression summary")
    assert "**Champion:** `float32`" in summary and "| `int8`" in summary


def test_a_description_over_mlflows_limit_is_cut_at_a_line_and_says_where_the_rest_is():
    run = new_parent()
    text = "\n".join(f"| row {i} | {'x' * 60} |" for i in range(300))
    tracking.set_description(run, text, "report/summary.md")
    stored = tracking.client().get_run(run).data.tags[tracking.NOTE_TAG]
    assert len(stored) <= tracking.NOTE_CHARS
    assert stored.endswith("(cut; the whole text: `report/summary.md`)")
    assert stored.split("\n\n…")[0].endswith("x |")         # whole lines only


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_system_metrics_are_recorded_per_stage_and_the_monitor_stops(monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    run = new_parent()
    with pytest.raises(RuntimeError, match="training broke"):
        with tracking.system_metrics(run, "optimize_prune"):
            assert monitor_threads()
            time.sleep(1.5)
            raise RuntimeError("training broke")
    assert not monitor_threads()                                # stopped, even on an error
    metrics = tracking.client().get_run(run).data.metrics
    assert "system/optimize_prune/cpu_utilization_percentage" in metrics
    assert "system/optimize_prune/system_memory_usage_megabytes" in metrics


def test_without_the_monitor_the_stage_runs_and_says_so(monkeypatch, caplog):
    # what a missing psutil does: MLflow's monitor module cannot be imported
    monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", None)
    ran = False
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        with tracking.system_metrics(new_parent(), "train"):
            ran = True
    assert ran and "no system metrics for train: ModuleNotFoundError" in caplog.text
