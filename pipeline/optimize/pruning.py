"""Magnitude pruning (TF-MOT `prune_low_magnitude`): zero the smallest weights of the conv/dense
kernels while fine-tuning, then strip the wrappers.

Unstructured: sparsity rises from 0 to `config.prune_sparsity` along a PolynomialDecay schedule
over the first RAMP_SHARE of the fine-tuning steps; the remaining steps recover accuracy at the
target. Structured (`config.prune_structured`): 2:4 sparsity (two zeros in every group of four
weights along the input-channel axis, the pattern sparse kernels accelerate), i.e. 50% sparsity
whatever `prune_sparsity` says.

Which layers: the top-level Conv1D/2D/3D and Dense layers (what TF-MOT prunes), except
 - the first one when it holds under SKIP_FIRST_LAYER_BELOW of those weights: it sees the raw
   pixels through few channels, so pruning it saves almost nothing and costs the most accuracy
   (TF-MOT's guide: prune later layers first). The model's sparsity stays within 1% of target.
 - for 2:4, layers whose input-channel count is not a multiple of 4 (no whole groups of four).
Other layers (and layers inside nested models) are left as they are. Pruning works on
`optimize.fuse_layers(model)` (Dense+BatchNorm and conv/dense+ReLU fused; see there why).
"""
from __future__ import annotations

import math

from pipeline import optimize
from pipeline.models import tf_keras

NAME = "prune"
SKIP_FIRST_LAYER_BELOW = 0.01
RAMP_SHARE = 0.7
MASK_UPDATES = 20           # how many times the mask is recomputed while sparsity rises
STRUCTURED_M_BY_N = (2, 4)
LEARNING_RATE_SCALE = 0.25  # fine-tuning rate relative to config.learning_rate


def apply(model, dataset, config, *, applied: tuple[str, ...] = ()):
    import tensorflow_model_optimization as tfmot

    sparsity = tfmot.sparsity.keras
    model = optimize.fuse_layers(model)
    targets = layers_to_prune(model, structured=config.prune_structured)
    if not targets:
        raise optimize.TechniqueError(
            f"{NAME}: model {model.name!r} has no Conv/Dense layer worth pruning"
            + (" (2:4 needs input channels in multiples of 4)" if config.prune_structured else ""))
    steps = optimize.finetune_epochs(config) * math.ceil(len(dataset.x_train) / config.batch_size)
    params = {"pruning_schedule": _schedule(config, steps)}
    if config.prune_structured:
        params["sparsity_m_by_n"] = STRUCTURED_M_BY_N

    pruned = optimize.wrap_and_finetune(
        model, targets, lambda layer: sparsity.prune_low_magnitude(layer, **params), NAME,
        dataset, config, learning_rate=config.learning_rate * LEARNING_RATE_SCALE,
        callbacks=[sparsity.UpdatePruningStep()])  # also re-applies masks per epoch
    return sparsity.strip_pruning(pruned)


def layers_to_prune(model, *, structured: bool) -> set[str]:
    """Names of the layers `apply` prunes (see the module docstring)."""
    candidates = optimize.tfmot_kernel_layers(model)
    if structured:
        keras = tf_keras()
        candidates = [layer for layer in candidates
                      if type(layer) in (keras.layers.Conv2D, keras.layers.Dense)
                      and layer.kernel.shape[-2] % STRUCTURED_M_BY_N[1] == 0]
    sizes = [int(layer.kernel.shape.num_elements()) for layer in candidates]
    if candidates and sizes[0] < SKIP_FIRST_LAYER_BELOW * sum(sizes):
        candidates = candidates[1:]
    return {layer.name for layer in candidates}


def _schedule(config, steps: int):
    import tensorflow_model_optimization as tfmot

    sparsity = tfmot.sparsity.keras
    ramp = int(steps * RAMP_SHARE)
    frequency = max(1, ramp // MASK_UPDATES)
    if config.prune_structured:
        # 2:4 masks follow the pattern, not a target: recompute them as weights move.
        return sparsity.ConstantSparsity(0.5, begin_step=0, frequency=frequency)
    if ramp < 1:  # a single step: prune to the target at once
        return sparsity.ConstantSparsity(config.prune_sparsity, begin_step=0, frequency=1)
    # end_step on a multiple of `frequency`, so the last update lands exactly on the target.
    return sparsity.PolynomialDecay(initial_sparsity=0.0, final_sparsity=config.prune_sparsity,
                                    begin_step=0, end_step=ramp // frequency * frequency,
                                    frequency=frequency)
