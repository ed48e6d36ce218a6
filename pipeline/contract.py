"""The stage contract: what one stage hands the next, typed, and its JSON form for XCom.

`train` creates the run context (`RunContext`): the ids, the settings (parsed once), the URIs of
the run's files. Every later stage receives it, as the object or as its JSON (`to_dict()`, what
Airflow keeps in XCom), and reads it with `RunContext.of(ctx)`. The per-variant stages hand each
other a `VariantResult`, a JSON dict whose keys are typed here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, TypedDict

from pipeline.config import PipelineConfig


@dataclass(frozen=True)
class Reference:
    """The float32 LiteRT model every variant is compared with."""
    tflite_uri: str
    accuracy: float
    size_bytes: int
    keras_accuracy: float


@dataclass(frozen=True)
class RunContext:
    pipeline_run_id: str           # the Airflow run id (or cli-..., api-...): names the parent run
    parent_run_id: str             # the MLflow parent run
    experiment: str
    config: PipelineConfig
    num_classes: int
    dataset_uri: str               # the prepared dataset (.npz) in the artifact store
    base_model_uri: str            # the model the run starts from (trained or the user's)
    base_model_kind: str           # tf_keras, keras3, saved_model or tflite
    reference: Reference
    baseline_predictions_uri: str  # the base model's test-set classes (.npy)
    # The tf_keras model TF-MOT's techniques start from (a Keras 3 model's translation), or why
    # they cannot apply to this model (their variants are skipped).
    technique_base_uri: str | None = None
    techniques_unavailable: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (XCom): ids, settings and URIs, never a local path."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["config"] = self.config.to_dict()
        values["reference"] = asdict(self.reference)
        return values

    @classmethod
    def of(cls, ctx: RunContext | Mapping[str, Any]) -> RunContext:
        """The context from either form; the settings were validated when the run started."""
        if isinstance(ctx, RunContext):
            return ctx
        values = {name: ctx[name] for name in cls.__dataclass_fields__ if name in ctx}
        values["config"] = PipelineConfig.from_mapping(ctx["config"], use_env=False)
        values["reference"] = Reference(**ctx["reference"])
        return cls(**values)


class VariantResult(TypedDict, total=False):
    """What quantize -> evaluate -> benchmark hand on for one variant (each adds its figures)."""
    variant: str
    quantization: str
    optimizations: str
    child_run_id: str
    tflite_uri: str
    keras_predictions_uri: str
    # evaluate
    accuracy: float
    accuracy_delta_pts: float
    keras_agreement: float | None
    # benchmark
    size_bytes: int
    gzip_size_bytes: int
    compression_ratio: float
    gzip_compression_ratio: float
    latency_ms_p50: float
    latency_ms_p90: float
    peak_memory_mb: float
    sparsity: float
    unique_weights_max: float
    status: str
    error: str | None
