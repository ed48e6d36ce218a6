"""Progress a person can follow: one log line per stage, per training epoch (with the time left
in that training) and per finished variant (with its accuracy and size, and the time left in the
run when the launcher knows the plan). The lines go to the `pipeline.progress` logger, so the
command line, `compress()` and the Airflow task log show the same text.

Every Keras training inside `training(run_id, name)` also logs its per-epoch loss and accuracy
(and validation loss and accuracy) as MLflow metrics with the epoch as step, `<name>/loss`, ...:
the learning curves of the baseline and of every fine-tuning, in the MLflow UI.
"""
from __future__ import annotations

import contextvars
import logging
import re
import time
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("pipeline.progress")

# The current training: {"run_id", "prefix", "next_step"} (several fits in one training, e.g.
# pruning then clustering, continue the step count).
_training: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pipeline_training",
                                                                       default=None)


def stage(name: str, detail: str) -> None:
    log.info("[%s] %s", name, detail)


def variant_done(result: dict[str, Any]) -> None:
    """One line for a measured variant: accuracy, delta, size and ratio."""
    stage("variant", f"{result['variant']}: accuracy {result['accuracy']:.4f} "
                     f"({result['accuracy_delta_pts']:+.2f} pts), {result['size_bytes']:,} B "
                     f"({result['gzip_compression_ratio']:.1f}x gzip), p50 "
                     f"{result['latency_ms_p50']:.3f} ms")


def metric_prefix(name: str) -> str:
    """A training's name as an MLflow metric prefix (letters, digits, _ and - only)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "training"


@contextmanager
def training(run_id: str | None, name: str):
    """Trainings inside this block log their epochs to MLflow run `run_id` as `<name>/...`."""
    token = _training.set({"run_id": run_id, "prefix": metric_prefix(name), "next_step": 0})
    try:
        yield
    finally:
        _training.reset(token)


def epoch_callbacks(epochs: int) -> list:
    """The Keras callback for the current training (none outside `training`): per-epoch MLflow
    metrics and a progress line with the time left in this training."""
    current = _training.get()
    keras_callback = _keras_callback_class()
    return [keras_callback(current, epochs)] if keras_callback else []


def _keras_callback_class():
    from pipeline.sources.models import tf_keras
    base = tf_keras().callbacks.Callback

    class EpochProgress(base):  # type: ignore[misc, valid-type]
        def __init__(self, current, epochs: int):
            super().__init__()
            self.current = current or {"run_id": None, "prefix": "training", "next_step": 0}
            self.run_id, self.prefix = self.current["run_id"], self.current["prefix"]
            self.first_step = self.current["next_step"]
            self.epochs = epochs
            self.started = time.perf_counter()

        def on_train_end(self, logs=None):
            self.current["next_step"] = self.first_step + self.epochs

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
            done = epoch + 1
            elapsed = time.perf_counter() - self.started
            left = elapsed / done * max(self.epochs - done, 0)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items())
            stage(self.prefix, f"epoch {done}/{self.epochs}: {shown}; {elapsed:.0f} s, "
                               f"~{left:.0f} s left")
            if self.run_id:
                from pipeline.store import tracking
                try:
                    tracking.log_metrics(self.run_id, {f"{self.prefix}/{k}": v
                                                       for k, v in logs.items()},
                                         step=self.first_step + epoch)
                except Exception as error:  # a learning curve is not worth a failed training
                    log.warning("could not log epoch metrics: %s", error)
    return EpochProgress


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


class Plan:
    """The launcher's view of a whole run (command line, `compress()`): how many trainings and
    variants are left, and an estimate of the time they take from those already done."""

    def __init__(self, recipes: int, variants: int):
        self.recipes, self.variants = recipes, variants
        self.recipe_seconds: list[float] = []
        self.variant_seconds: list[float] = []

    def done(self, kind: str, name: str, seconds: float, outcome: str) -> None:
        (self.recipe_seconds if kind == "optimize" else self.variant_seconds).append(seconds)
        recipes_left = self.recipes - len(self.recipe_seconds)
        variants_left = self.variants - len(self.variant_seconds)
        estimate = _mean(self.recipe_seconds) * recipes_left + \
            _mean(self.variant_seconds) * variants_left
        left = f"{recipes_left} training(s) and {variants_left} variant(s) left"
        if (recipes_left and not self.recipe_seconds) or (variants_left and not self.variant_seconds):
            stage(kind, f"{name} {outcome} in {seconds:.0f} s; {left}")
        else:
            stage(kind, f"{name} {outcome} in {seconds:.0f} s; {left}, ~{estimate / 60:.1f} min")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
