"""Quantization-aware training (TF-MOT): fine-tune with int8 fake-quantization so the int8
TFLite conversion loses little accuracy. Returns the quantize-wrapped model: convert it with
optimizations DEFAULT, a representative dataset and int8 builtins to get int8 kernels.

After pruning and/or clustering, collaborative optimization keeps their work through QAT:
prune-preserving (PQAT), cluster-preserving (CQAT) or both (PCQAT) quantization schemes.
QAT works on `optimize.fuse_layers(model)`: without it, Dense+BatchNorm pairs convert to a broken
int8 model and kernels followed by a ReLU layer get no weight quantizer (see there).
"""
from __future__ import annotations

from pipeline import optimize

NAME = "qat"
# QAT starts from a trained model and only adapts it to int8 rounding: a small rate.
LEARNING_RATE_SCALE = 0.01


def apply(model, dataset, config, *, applied: tuple[str, ...] = ()):
    import tensorflow_model_optimization as tfmot

    quantization = tfmot.quantization.keras
    model = optimize.fuse_layers(model)
    from_logits = not optimize.outputs_probabilities(model)  # before wrapping hides the activation
    with optimize.tfmot_errors(NAME):
        annotated = quantization.quantize_annotate_model(model)
        quantized = quantization.quantize_apply(annotated, scheme(applied))
    optimize.finetune(quantized, dataset, config,
                      learning_rate=config.learning_rate * LEARNING_RATE_SCALE,
                      from_logits=from_logits)
    return quantized


def scheme(applied: tuple[str, ...]):
    """The quantization scheme that preserves what the earlier techniques did."""
    import tensorflow_model_optimization as tfmot
    # Only the prune-preserving scheme is exported under tfmot.quantization.keras.collab_opts.
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve.default_8bit_cluster_preserve_quantize_scheme import (  # noqa: E501
        Default8BitClusterPreserveQuantizeScheme,
    )

    quantization = tfmot.quantization.keras
    if "cluster" in applied:
        return Default8BitClusterPreserveQuantizeScheme(preserve_sparsity="prune" in applied)
    if "prune" in applied:
        return quantization.collab_opts.Default8BitPrunePreserveQuantizeScheme()
    return quantization.default_8bit.Default8BitQuantizeScheme()
