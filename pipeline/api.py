"""The Python API: the whole pipeline in this process, no Airflow needed.

    from pipeline import compress
    results = compress("my_model.keras", "my_images/", variants=["int8", "prune-int8"],
                       max_accuracy_drop_pts=0.5)
    print(results.table)                 # one row per variant, best first (a pandas DataFrame)
    results.champion                     # e.g. "prune-int8", registered as @champion
    results.model_file("prune-int8")     # a local copy of that variant's .tflite

`compress` runs the same stages as the DAG (`pipeline.stages`), in the DAG's order; the command
line (`python -m pipeline run`) and `make run` are thin layers over the same functions. Settings
are `PipelineConfig`'s (validated before anything heavy starts).
"""
from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")


@dataclass
class Results:
    """What a pipeline run produced: the per-variant results, the selection, the registration,
    and where everything is in MLflow."""
    pipeline_run_id: str
    parent_run_id: str
    experiment: str
    variants: list[dict[str, Any]]
    selection: dict[str, Any]
    registered: dict[str, Any]
    summary_markdown: str
    context: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def champion(self) -> str | None:
        return self.selection.get("champion")

    @property
    def table(self):
        """One row per variant (status, error, tags and every metric), best first."""
        import pandas as pd
        from pipeline.selection.report import ordered
        from pipeline.selection.select import Selection
        rows = ordered(self.variants, Selection.from_dict(self.selection))
        columns = ["variant", "status", "accuracy", "accuracy_delta_pts", "size_bytes",
                   "gzip_size_bytes", "compression_ratio", "gzip_compression_ratio",
                   "latency_ms_p50", "latency_ms_p90", "peak_memory_mb"]
        frame = pd.DataFrame(rows)
        first = [c for c in columns if c in frame.columns]
        return frame[first + [c for c in frame.columns if c not in first]]

    @property
    def run_ids(self) -> dict[str, str]:
        """MLflow run id of every variant's child run (those that started)."""
        return {r["variant"]: r["child_run_id"] for r in self.variants if r.get("child_run_id")}

    @property
    def model_uris(self) -> dict[str, str]:
        """The artifact URI of every produced variant's .tflite (runs:/<child run>/model/...)."""
        return {r["variant"]: r["tflite_uri"] for r in self.variants if r.get("tflite_uri")}

    def model_file(self, variant: str) -> Path:
        """A local copy of `variant`'s .tflite."""
        from pipeline.store import artifacts
        if variant not in self.model_uris:
            raise KeyError(f"no model for variant {variant!r} (produced: "
                           f"{', '.join(self.model_uris) or 'none'})")
        return artifacts.fetch(self.model_uris[variant])


def compress(model: Any = None, dataset: Any = "fashion-mnist", *,
             variants: list[str] | str | None = None, pipeline_run_id: str | None = None,
             **settings: Any) -> Results:
    """Compress `model` every requested way on `dataset`, measure each variant through LiteRT,
    choose the champion under the accuracy budget and register it in MLflow.

    `model`: None (train the default CNN), a path or URI (.keras, .h5, SavedModel folder, float32
    .tflite; s3://, models:/NAME@ALIAS, runs:/...) or an in-memory Keras model (tf_keras or
    Keras 3). `dataset`: 'fashion-mnist', an image folder, an .npz, a URI of those, or arrays
    `(x_train, y_train, x_test, y_test)`. `settings`: any PipelineConfig setting, e.g.
    `epochs=5, max_accuracy_drop_pts=0.5, experiment="mine"`."""
    from pipeline.config import PipelineConfig
    with tempfile.TemporaryDirectory(prefix="compress-inputs-") as staging:
        values = {**settings, "model_path": _as_model_path(model, Path(staging)),
                  "dataset": _as_dataset_spec(dataset, Path(staging))}
        if variants is not None:
            values["variants"] = variants
        config = PipelineConfig.from_mapping(values)  # validates before anything heavy starts
        run_id = pipeline_run_id or f"api-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        return run_stages(config.to_dict(), run_id, launcher="api")


def run_stages(config_values: dict, pipeline_run_id: str, launcher: str = "cli") -> Results:
    """train, optimize, the per-variant stages, select, register: the DAG's order in one
    process. A failed optimization or variant is recorded and the others go on; an error that
    stops the run closes its MLflow parent run as FAILED, then propagates."""
    from pipeline import progress, stages
    from pipeline.config import PipelineConfig
    from pipeline.contract import RunContext
    from pipeline.store import tracking
    try:
        ctx = RunContext.of(stages.train(config_values, pipeline_run_id, {"launcher": launcher}))
        config = ctx.config
        recipes = stages.recipes(config.variants)
        plan = progress.Plan(len(recipes), len(config.variants))
        for recipe in recipes:
            started, ended = time.perf_counter(), "trained"
            try:
                stages.optimize(ctx, recipe)
            except Exception as error:  # recorded; its variants fail with the reason
                log.error("optimization %s failed: %s", recipe, error)
                ended = "failed"
            plan.done("optimize", recipe, time.perf_counter() - started, ended)
        for name in config.variants:
            started, ended = time.perf_counter(), "measured"
            try:
                stages.benchmark(ctx, stages.evaluate(ctx, stages.quantize(ctx, name)))
            except stages.VariantSkipped as reason:
                log.info("variant %s skipped: %s", name, reason)
                ended = "skipped"
            except Exception as error:
                log.error("variant %s failed: %s", name, error)
                ended = "failed"
            plan.done("variant", name, time.perf_counter() - started, ended)
        selected = stages.select(ctx)
        outcome = stages.register(ctx, selected)
    except BaseException as error:  # the parent run ends FAILED, never left RUNNING
        experiment = config_values.get("experiment") or PipelineConfig().experiment
        try:
            tracking.fail_parent_run(experiment, pipeline_run_id, stages.one_line(error))
        except Exception as tracking_error:  # the original error matters more
            log.error("could not close the MLflow run: %s", tracking_error)
        raise
    return Results(pipeline_run_id=pipeline_run_id, parent_run_id=ctx.parent_run_id,
                   experiment=ctx.experiment, variants=stages.results_of(ctx),
                   selection=selected["selection"], registered=outcome,
                   summary_markdown=selected["summary_markdown"], context=ctx.to_dict())


def _as_model_path(model: Any, staging: Path) -> str | None:
    if model is None or isinstance(model, (str, Path)):
        return None if model is None else str(model)
    if hasattr(model, "save") and hasattr(model, "layers"):  # a Keras model in memory
        path = staging / "model.keras"
        model.save(str(path))
        return str(path)
    raise TypeError(f"model must be None, a path or URI, or a Keras model, not {type(model).__name__}")


def _as_dataset_spec(dataset: Any, staging: Path) -> str:
    if isinstance(dataset, (str, Path)):
        return str(dataset)
    if isinstance(dataset, (tuple, list)) and len(dataset) == 4:
        import numpy as np
        path = staging / "dataset.npz"
        np.savez(path, **dict(zip(("x_train", "y_train", "x_test", "y_test"), dataset)))
        return str(path)
    raise TypeError("dataset must be 'fashion-mnist', a path or URI, or (x_train, y_train, "
                    f"x_test, y_test) arrays, not {type(dataset).__name__}")
