"""Saving and loading optimized models: plain models as .keras files, QAT models (which the
.keras format cannot reload) as SavedModel directories.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.files import atomic_path
from pipeline.sources.models import tf_keras
from pipeline.techniques.stats import _is_quantized


def save_optimized(model, stem) -> str:
    """Save atomically and return the path written.

    Plain models go to `<stem>.keras`. QAT models go to the SavedModel directory
    `<stem>.savedmodel`: the .keras format cannot reload TF-MOT's QuantizeLayer and .h5 cannot
    reload cluster-preserving QAT (its quantizer rebuilds variables from the weights at load time).
    """
    quantized = _is_quantized(model)
    target = Path(stem).with_name(Path(stem).name + (".savedmodel" if quantized else ".keras"))
    with atomic_path(target) as tmp:
        if quantized:
            model.save(str(tmp), save_format="tf", include_optimizer=False)
        else:
            model.save(str(tmp))
    return str(target)


def load_optimized(path):
    """Load a model written by save_optimized, QAT (including PQAT/CQAT/PCQAT) models too."""
    import tensorflow_model_optimization as tfmot

    keras = tf_keras()
    with tfmot.quantization.keras.quantize_scope():
        return keras.models.load_model(str(path), compile=False)
