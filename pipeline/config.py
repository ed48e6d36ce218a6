"""One typed configuration: defaults here, `PIPELINE_<FIELD>` environment overrides, and the DAG's
Params / the command line's options mapped onto the same fields (`PipelineConfig.from_mapping`)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from pipeline.errors import PipelineInputError
from pipeline.variants import DEFAULT_VARIANTS, parse_variants

PROJECT_ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ("size_within_latency", "gzip_size", "latency", "memory")
# "auto" flips Fashion-MNIST (clothes are left-right symmetric) and nothing else: a flipped digit
# or letter is another class or none.
AUGMENTATIONS = ("auto", "flip", "none")
# Pixel ranges a model may expect: name -> (low, high); the loaders give 0..1.
PIXEL_RANGES = {"0:1": (0.0, 1.0), "0:255": (0.0, 255.0), "-1:1": (-1.0, 1.0)}


def work_dir() -> Path:
    """This machine's scratch and cache folder (`PIPELINE_WORK_DIR`, default .work/). A setting of
    the worker, not of the run: each worker has its own, and no task reads another's."""
    return Path(os.environ.get("PIPELINE_WORK_DIR") or PROJECT_ROOT / ".work")


def setting(default: Any = None, description: str = "", *, factory=None, **schema: Any):
    """A setting: its default, a one-line description (the trigger form and --help show it) and
    its JSON-schema constraints (minimum, maximum, exclusiveMinimum, exclusiveMaximum, enum),
    checked by `PipelineConfig.validate` and by the DAG's Params alike."""
    metadata = {"description": description, "schema": schema}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class PipelineConfig:
    """Every setting of a run, defined once: defaults, types, ranges, descriptions."""
    # Data and model
    dataset: str = setting("fashion-mnist", "'fashion-mnist', an image folder (one subfolder per "
                           "class), an .npz, or s3://... / runs:/... URIs of those")
    model_path: str | None = setting(None, "Your model: .keras, .h5, SavedModel dir, or s3://, "
                                     "models:/NAME@ALIAS, runs:/ URI; empty = train the default CNN")
    allow_unsafe_model: bool = setting(False, "Allow Lambda layers (runs code stored in the model "
                                       "file)")
    epochs: int = setting(12, "Baseline training epochs", minimum=1, maximum=500)
    batch_size: int = setting(128, "Training batch size", minimum=1, maximum=8192)
    learning_rate: float = setting(2e-3, "Baseline training learning rate (Adam)",
                                   exclusiveMinimum=0, maximum=1)
    train_limit: int | None = setting(None, "Use only the first N training images (quick runs)",
                                      minimum=1)
    test_limit: int | None = setting(None, "Use only the first N test images (quick checks; not "
                                     "for decisions)", minimum=1)
    validation_fraction: float = setting(0.1, "Share of the training split held out for "
                                         "validation", exclusiveMinimum=0, exclusiveMaximum=0.5)
    pixel_range: str = setting("0:1", "The pixel range the model takes: 0:1 (the default CNN), "
                               "0:255 or -1:1 (many keras.applications / Keras Hub models, whose "
                               "preprocessing is outside the model); evaluation, calibration and "
                               "the served model use it", enum=list(PIXEL_RANGES))
    augment: str = setting("auto", "Random horizontal flips in baseline training: auto = only "
                           "for fashion-mnist", enum=list(AUGMENTATIONS))
    calibration_samples: int = setting(500, "Training images used to calibrate int8 / int16x8",
                                       minimum=1, maximum=100000)
    seed: int = setting(42, "Random seed of data splits, training and calibration", minimum=0)
    variants: list[str] = setting(description="Variants to produce: optimizations joined by '+', "
                                  "a dash, the quantization mode", factory=lambda: list(DEFAULT_VARIANTS))
    # Training-time techniques
    finetune_epochs: int = setting(2, "Clustering and QAT fine-tuning epochs", minimum=1,
                                   maximum=100)
    prune_epochs: int = setting(8, "Pruning epochs: sparsity ramps up, then the model recovers",
                                minimum=1, maximum=100)
    prune_sparsity: float = setting(0.91, "Pruning target of the largest kernel (smaller kernels "
                                    "get less)", exclusiveMinimum=0, exclusiveMaximum=1)
    prune_size_exponent: float = setting(0.25, "A kernel r times smaller than the largest is "
                                         "pruned to prune_sparsity * r^-exponent (0 = the "
                                         "same target for every kernel)", minimum=0, maximum=2)
    prune_block: int = setting(16, "Dense weights are pruned in runs of this many inputs (1 = one "
                               "by one)", minimum=1, maximum=64)
    prune_block_pointwise: bool = setting(False, "Prune 1x1 convolutions in runs of prune_block "
                                          "inputs too (smaller gzipped files; cost accuracy on "
                                          "MobileNetV2)")
    prune_structured: bool = setting(False, "2:4 structured sparsity instead of unstructured")
    sparse_storage: bool = setting(False, "Store pruned variants' weights sparse (converter "
                                   "modes): about 3x smaller raw files, but larger gzipped, and "
                                   "XNNPACK refuses them, so they run ~4-5x slower on the "
                                   "built-in kernels (make bench, section sparse)")
    cluster_count: int = setting(16, "Weight-clustering centroids per kernel", minimum=2,
                                 maximum=256)
    distill_epochs: int = setting(12, "Distillation epochs of the student", minimum=1,
                                  maximum=500)
    distill_temperature: float = setting(2.0, "Distillation softmax temperature",
                                         exclusiveMinimum=0, maximum=100)
    distill_alpha: float = setting(0.5, "Weight of the hard-label loss (1 - alpha on the "
                                   "teacher's soft targets)", minimum=0, maximum=1)
    student_width: float = setting(0.5, "Student filters = teacher filters x width",
                                   exclusiveMinimum=0, exclusiveMaximum=1)
    student_init: str = setting("teacher", "The student's first weights: 'teacher' = the "
                                "teacher's own, cut to the student's width (its first filters "
                                "and units in every layer), 'scratch' = random",
                                enum=["teacher", "scratch"])
    size_to_data: bool = setting(True, "Training-time techniques: smaller batches and more "
                                 "epochs when training images are few (enough optimizer steps), "
                                 "BatchNorm statistics refreshed, a student of at least 2,000 "
                                 "weights; off = batch_size and the epoch settings as given "
                                 "(quick test runs)")
    technique_retries: int = setting(2, "Retries of a training-time technique whose model falls "
                                     "far below the accuracy budget on the validation split, each "
                                     "more conservative (lower sparsity, more clusters, a wider "
                                     "student, longer recovery)", minimum=0, maximum=5)
    search_trials: int = setting(12, "Trials of each auto-* variant's search, in 3 "
                                 "rounds (one Airflow task per trial; the first round grows to "
                                 "hold the fixed settings' anchors)",
                                 minimum=2, maximum=200)
    search_train_images: int = setting(10000, "Training images a search trial fine-tunes on (a "
                                       "sample; 0 = all): the chosen settings are then trained "
                                       "once more on all of them and kept if they fit",
                                       minimum=0)
    # Measurement
    latency_runs: int = setting(200, "Timed invokes per latency measurement", minimum=1,
                                maximum=100000)
    latency_warmup: int = setting(20, "Untimed invokes before measuring latency", minimum=0,
                                  maximum=10000)
    # Selection and registry
    max_accuracy_drop_pts: float = setting(1.0, "Quality gate: largest accuracy drop vs the "
                                           "float32 model, in points", minimum=0, maximum=100)
    min_accuracy: float | None = setting(None, "Quality gate: the lowest accuracy (0..1) a "
                                         "model may have; unset = clearly above chance "
                                         "(1.5 / number of classes)", minimum=0, maximum=1)
    min_compression_ratio: float | None = setting(None, "Optional gate: the smallest float32 / "
                                                  "variant size ratio", exclusiveMinimum=0)
    max_latency_ms: float | None = setting(None, "Optional gate: the largest p50 latency in ms",
                                           exclusiveMinimum=0)
    max_peak_memory_mb: float | None = setting(None, "Optional gate: the largest peak memory in "
                                               "MB", exclusiveMinimum=0)
    max_latency_ratio: float | None = setting(1.1, "Gate: a variant's p50 latency (batch 1) may "
                                              "not exceed the float32 variant's x this (+0.02 "
                                              "ms of noise slack); 0 = off", minimum=0)
    max_memory_ratio: float | None = setting(1.25, "Gate: a variant's peak memory may not exceed "
                                             "the float32 variant's x this (+1.5 MB of noise "
                                             "slack); 0 = off", minimum=0)
    objective: str = setting("size_within_latency", "What the champion minimises among the "
                             "variants that pass the gates: size_within_latency = the smallest "
                             "gzip size among those not slower than float32 (ties: faster "
                             "first)", enum=list(OBJECTIVES))
    champion_accuracy_tolerance_pts: float = setting(
        0.1, "A new champion may be this many points less accurate than the current one",
        minimum=0, maximum=100)
    registered_model_name: str = setting("fashion-mnist-classifier", "MLflow registered model "
                                         "name")
    # Tracking
    experiment: str = setting("model-compression", "MLflow experiment name")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.variants, str):
            self.variants = [v for v in self.variants.split(",") if v.strip()]
        self.variants = [v.name for v in parse_variants(self.variants)]
        for f in fields(self):
            _check(f.name, getattr(self, f.name), f.metadata.get("schema", {}))
        for name in ("dataset", "registered_model_name", "experiment"):
            if not str(getattr(self, name)).strip():
                raise PipelineInputError(f"{name} must not be empty")

    @classmethod
    def describe(cls) -> dict[str, dict[str, Any]]:
        """Every setting: {name: {"default", "type" (JSON schema), "description", **schema}}."""
        hints = get_type_hints(cls)
        described = {}
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            described[f.name] = {"default": default, "type": _json_type(hints[f.name]),
                                 "description": f.metadata.get("description", ""),
                                 **f.metadata.get("schema", {})}
        return described

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None = None, *, use_env: bool = True) -> "PipelineConfig":
        """Defaults, then PIPELINE_* environment variables, then `values` (Params, CLI options).

        Unknown keys and values of the wrong type raise PipelineInputError; None means "default".
        """
        merged: dict[str, Any] = {}
        hints = get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        if use_env:
            for name in known:
                raw = os.environ.get(f"PIPELINE_{name.upper()}")
                if raw is not None and raw != "":
                    merged[name] = _coerce(name, raw, hints[name])
        for key, value in (values or {}).items():
            if key not in known:
                raise PipelineInputError(f"unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
            if value is None or value == "":
                continue
            merged[key] = _coerce(key, value, hints[key])
        return cls(**merged)

    @property
    def flips(self) -> bool:
        """Whether the baseline's training sees randomly flipped images."""
        if self.augment == "auto":
            return self.dataset == "fashion-mnist"
        return self.augment == "flip"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def accuracy_floor(config: PipelineConfig, num_classes: int | None) -> float:
    """The lowest accuracy any model may have: `min_accuracy`, else clearly above chance
    (1.5 / classes): relative gates alone would pass every variant of a broken baseline."""
    if config.min_accuracy is not None:
        return config.min_accuracy
    return 1.5 / num_classes if num_classes else 0.0


def _check(name: str, value: Any, schema: dict[str, Any]) -> None:
    """One clear line when `value` breaks the setting's schema (None = unset is always fine)."""
    if value is None:
        return
    bounds = (("minimum", lambda v, b: v >= b, "at least"), ("maximum", lambda v, b: v <= b, "at most"),
              ("exclusiveMinimum", lambda v, b: v > b, "more than"),
              ("exclusiveMaximum", lambda v, b: v < b, "less than"))
    for key, holds, words in bounds:
        if key in schema and not holds(value, schema[key]):
            raise PipelineInputError(f"setting {name!r} must be {words} {schema[key]}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise PipelineInputError(f"setting {name!r} must be one of {', '.join(map(str, schema['enum']))}, "
                                 f"got {value!r}")


def _json_type(hint: Any) -> str | list[str]:
    text = str(hint)
    base = ("array" if "list" in text else "boolean" if "bool" in text else
            "integer" if "int" in text and "float" not in text else
            "number" if "float" in text else "string")
    return ["null", base] if "None" in text else base


def _coerce(name: str, value: Any, hint: Any) -> Any:
    text = str(hint)
    try:
        if "list" in text:
            return [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
        if "bool" in text:
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "int" in text and "float" not in text:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in text:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise PipelineInputError(f"setting {name!r} has an invalid value {value!r} (expected {text})") from None
