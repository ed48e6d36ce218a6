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
OBJECTIVES = ("gzip_size", "latency", "memory")
# "auto" flips Fashion-MNIST (clothes are left-right symmetric) and nothing else: a flipped digit
# or letter is another class or none.
AUGMENTATIONS = ("auto", "flip", "none")


def work_dir() -> Path:
    """This machine's scratch and cache folder (`PIPELINE_WORK_DIR`, default .work/). A setting of
    the worker, not of the run: each worker has its own, and no task reads another's."""
    return Path(os.environ.get("PIPELINE_WORK_DIR") or PROJECT_ROOT / ".work")


@dataclass
class PipelineConfig:
    # Data and model
    dataset: str = "fashion-mnist"          # fashion-mnist | image folder | .npz
    model_path: str | None = None          # bring your own model: skips training
    allow_unsafe_model: bool = False       # allow Lambda layers (runs the model file's code)
    epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 2e-3
    train_limit: int | None = None         # use the first N training images (quick runs)
    test_limit: int | None = None          # use the first N test images (tests only)
    validation_fraction: float = 0.1
    augment: str = "auto"                  # auto | flip | none: flips in baseline training
    calibration_samples: int = 500         # representative data for int8 / int16x8
    seed: int = 42
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    # Training-time techniques
    finetune_epochs: int = 2               # clustering and QAT fine-tuning
    prune_epochs: int = 4                  # pruning: ramp to the target, then recover
    prune_sparsity: float = 0.91           # of the largest kernel; smaller ones less (see pruning)
    prune_block: int = 4                   # dense weights pruned in runs of N inputs (1: single)
    prune_structured: bool = False         # 2:4 structured sparsity instead of unstructured
    cluster_count: int = 16
    distill_epochs: int = 12
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5             # weight of the hard-label loss; 1 - alpha on soft targets
    student_width: float = 0.5             # student filters = teacher filters * width
    # Measurement
    latency_runs: int = 200
    latency_warmup: int = 20
    # Selection and registry
    max_accuracy_drop_pts: float = 1.0
    min_compression_ratio: float | None = None
    max_latency_ms: float | None = None
    max_peak_memory_mb: float | None = None
    objective: str = "gzip_size"
    champion_accuracy_tolerance_pts: float = 0.1
    registered_model_name: str = "fashion-mnist-classifier"
    # Tracking
    experiment: str = "model-compression"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.variants, str):
            self.variants = [v for v in self.variants.split(",") if v.strip()]
        self.variants = [v.name for v in parse_variants(self.variants)]
        positive = ("epochs", "batch_size", "calibration_samples", "cluster_count",
                    "latency_runs", "distill_epochs", "prune_epochs", "prune_block")
        for name in positive:
            if getattr(self, name) < 1:
                raise PipelineInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PipelineInputError(f"{name} must be at least 1 (or unset), got {value}")
        if not 0.0 < self.prune_sparsity < 1.0:
            raise PipelineInputError(f"prune_sparsity must be between 0 and 1, got {self.prune_sparsity}")
        if not 0.0 < self.validation_fraction < 0.5:
            raise PipelineInputError("validation_fraction must be between 0 and 0.5")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise PipelineInputError("distill_alpha must be between 0 and 1")
        if self.augment not in AUGMENTATIONS:
            raise PipelineInputError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.objective not in OBJECTIVES:
            raise PipelineInputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.finetune_epochs < 0:
            raise PipelineInputError("finetune_epochs must be 0 or more")

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
