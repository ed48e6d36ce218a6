"""Quantization-aware training (TF-MOT): fine-tune with int8 fake-quantization so the int8
TFLite conversion loses little accuracy. Returns the quantize-wrapped model: convert it with
optimizations DEFAULT, a representative dataset and int8 builtins to get int8 kernels.

After pruning and/or clustering, collaborative optimization keeps their work through QAT:
prune-preserving (PQAT), cluster-preserving (CQAT) or both (PCQAT) quantization schemes.
QAT works on `graph.fuse_layers(model)`: without it, Dense+BatchNorm pairs convert to a broken
int8 model and kernels followed by a ReLU layer get no weight quantizer (see there).
Rescaling layers (pixel scaling inside the model, common in Keras 3 models translated by
pipeline.sources.keras3), which TF-MOT's QAT registry refuses, get their output quantized only.
"""
from __future__ import annotations

from contextlib import closing

from pipeline.sources.models import flat_layers, tf_keras
from pipeline.techniques import sizing
from pipeline.techniques.backoff import configured
from pipeline.techniques.finetune import finetune, outputs_probabilities, tfmot_errors
from pipeline.techniques.graph import fuse_layers
from pipeline.techniques.validation import training_image_count

NAME = "qat"
# Backing off: each retry trains twice as long (the rounding is fixed; only recovery can help).
RELAXED_EPOCHS_FACTOR = 2
# QAT starts from a trained model and only adapts it to int8 rounding: a small rate.
LEARNING_RATE_SCALE = 0.01
# Weightless layers outside TF-MOT's QAT registry that are quantized at their output only (TFLite
# runs a Rescaling as int8 MUL/ADD).
OUTPUT_ONLY_LAYERS = ("Rescaling", "Normalization")
# TF-MOT's activation quantizers (layer outputs, logits) start at [-6, 6] and move toward each
# training batch's range by 0.1 % a step (a moving average with decay 0.999): after a fine-tuning of
# a few hundred steps the ranges are still mostly the initial ones (a ReLU's output quantized over
# [-5.9, 6] wastes half its levels, logits are clipped at 6). `calibrate_ranges` first sets them to
# the mean range of this many training batches, the value the moving average converges to. On the
# 10-class test model of tests/test_small_models.py (3 base models) QAT's test accuracy went
# 0.920 / 0.890 / 0.837 without to 0.923 / 0.903 / 0.897 with.
CALIBRATION_BATCHES = 16


def settings(model, dataset, config) -> dict:
    """What `apply` uses on this model and data: epochs and batch size from the number of
    training images (`sizing.fine_tuning`)."""
    plan = sizing.fine_tuning("finetune", config.finetune_epochs, config.batch_size,
                              training_image_count(dataset), to_data=config.size_to_data)
    return {"finetune_epochs": plan.epochs, "batch_size": plan.batch_size}


def relax(settings: dict) -> dict | None:
    """Twice the recovery epochs."""
    return {"finetune_epochs": settings["finetune_epochs"] * RELAXED_EPOCHS_FACTOR}


def apply(model, dataset, config, *, applied: tuple[str, ...] = ()):
    import tensorflow_model_optimization as tfmot

    quantization = tfmot.quantization.keras
    config = configured(config, settings(model, dataset, config))
    model = fuse_layers(model)
    from_logits = not outputs_probabilities(model)  # before wrapping hides the activation
    # quantize_scope: quantize_apply clones the annotated model, output-only configs included.
    with tfmot_errors(NAME), quantization.quantize_scope():
        _reserve_layer_names(model)
        annotated = quantization.quantize_annotate_model(_annotate_output_only(model))
        quantized = quantization.quantize_apply(annotated, scheme(applied))
    calibrate_ranges(quantized, dataset, config.batch_size, seed=config.seed)
    finetune(quantized, dataset, config,
             learning_rate=config.learning_rate * LEARNING_RATE_SCALE,
             from_logits=from_logits)
    return quantized


def calibrate_ranges(model, dataset, batch_size: int, *, batches: int = CALIBRATION_BATCHES,
                     seed: int = 0) -> None:
    """Set the moving-average quantizers' ranges of the quantize-applied `model` to the mean of
    their per-batch ranges over up to `batches` training batches (CALIBRATION_BATCHES): the
    moving average's decay is 0 on the first batch, then k / (k + 1), a running mean. Runs the
    model in training mode (the only mode that updates the ranges), so BatchNorm's moving
    statistics take these batches in as fine-tuning would."""
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    moving_average = quant_ops.MovingAvgQuantize
    decay = [0.0]

    def running_mean(*args, **kwargs):
        return moving_average(*args, **{**kwargs, "ema_decay": decay[0]})

    quant_ops.MovingAvgQuantize = running_mean  # the quantizers look it up at each call
    try:
        with closing(dataset.batches("train", batch_size, shuffle=True, seed=seed)) as stream:
            for number, (images, _) in zip(range(batches), stream):
                decay[0] = number / (number + 1)
                model(images, training=True)
    finally:
        quant_ops.MovingAvgQuantize = moving_average


def _annotate_output_only(model):
    """`model` with its OUTPUT_ONLY_LAYERS annotated to quantize their output alone (the model
    itself when it has none)."""
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantize_configs import (  # noqa: E501
        Default8BitOutputQuantizeConfig,
    )

    def output_only(layer) -> bool:
        return type(layer).__name__ in OUTPUT_ONLY_LAYERS and not layer.weights

    if not any(output_only(layer) for layer in model.layers):
        return model

    def annotate(layer):
        if not output_only(layer):
            return layer
        return tfmot.quantization.keras.quantize_annotate_layer(
            layer, quantize_config=Default8BitOutputQuantizeConfig())

    return tf_keras().models.clone_model(model, clone_function=annotate)


def _reserve_layer_names(model) -> None:
    """Move tf_keras' automatic layer names past the names in `model`. TF-MOT's SeparableConv2D
    transform splits that layer into an automatically named DepthwiseConv2D and Conv2D
    ('conv2d', 'conv2d_1', ...) and then sets weights by layer name; in a model loaded from a file
    (or translated from Keras 3) the counter never saw the existing names, so a new 'conv2d' could
    take an existing layer's weights ("Shape mismatch")."""
    from tf_keras.src import backend

    uids = backend.get_default_graph_uid_map()
    for layer in flat_layers(model):
        base, _, number = layer.name.rpartition("_")
        if not (base and number.isdigit()):
            base, number = layer.name, "0"
        key = ("", base)  # (namespace, name), as backend.unique_object_name counts them
        uids[key] = max(uids[key], int(number) + 1)


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
