"""Magnitude pruning (TF-MOT `prune_low_magnitude`): zero the smallest weights of the conv/dense
kernels while fine-tuning, then strip the wrappers.

Unstructured: each layer's sparsity rises from 0 to its target along a PolynomialDecay schedule
over the first RAMP_SHARE of the fine-tuning steps; the remaining steps recover accuracy at the
target. The largest kernel's target is `config.prune_sparsity`; a kernel r times smaller gets
`prune_sparsity * r ** -SIZE_EXPONENT` (a conv layer 20x smaller than the dense head: about half
the target). Small kernels hold few of the weights but much of the accuracy, so pruning them as
hard buys little size and costs the most accuracy (TF-MOT's guide: prune the large layers).
Dense kernels are pruned in blocks of `config.prune_block` consecutive input weights of one
output unit: LiteRT stores a fully-connected kernel as [out, in], so a block is a run of zero bytes
in the file, which gzip stores in a few bits where scattered zeros cost about one bit each, and
the nonzero weights between the runs come in longer literal strings. On the default CNN at 0.91,
runs of 16 against runs of 4 (4 pruning epochs each): the pruned model's int8 file 28.3x against
23.4x smaller gzipped than float32, at the same accuracy (-1.13 / -1.12 pts). Eight pruning epochs
instead of four won back 0.15 pts at runs of 16 (-0.98).
Structured (`config.prune_structured`): 2:4 sparsity (two zeros in every group of four
weights along the input-channel axis, the pattern sparse kernels accelerate), i.e. 50% sparsity
whatever `prune_sparsity` says.

Which layers: the top-level Conv1D/2D/3D and Dense layers (what TF-MOT prunes), except
 - the first one when it holds under SKIP_FIRST_LAYER_BELOW of those weights: it sees the raw
   pixels through few channels, so pruning it saves almost nothing and costs the most accuracy
   (TF-MOT's guide: prune later layers first).
 - for 2:4, layers whose input-channel count is not a multiple of 4 (no whole groups of four).
Other layers (and layers inside nested models) are left as they are. Pruning works on
`techniques.fuse_layers(model)` (Dense+BatchNorm and conv/dense+ReLU fused; see there why).
"""
from __future__ import annotations

import math

from pipeline import techniques
from pipeline.sources.models import tf_keras

NAME = "prune"
SKIP_FIRST_LAYER_BELOW = 0.01
RAMP_SHARE = 0.7
MASK_UPDATES = 20           # how many times the mask is recomputed while sparsity rises
STRUCTURED_M_BY_N = (2, 4)
SIZE_EXPONENT = 0.25
# Fine-tuning rate relative to config.learning_rate: the other weights need a real step size to
# make up for the pruned ones (in two epochs at 80% sparsity 0.25 lost 0.6 pts more than 1.0),
# but restarting at the full rate costs accuracy by itself (-0.6 pts in two epochs, no pruning).
LEARNING_RATE_SCALE = 0.5


def apply(model, dataset, config, *, applied: tuple[str, ...] = ()):
    import tensorflow_model_optimization as tfmot

    sparsity = tfmot.sparsity.keras
    model = techniques.fuse_layers(model)
    targets = layers_to_prune(model, structured=config.prune_structured)
    if not targets:
        raise techniques.TechniqueError(
            f"{NAME}: model {model.name!r} has no Conv/Dense layer worth pruning"
            + (" (2:4 needs input channels in multiples of 4)" if config.prune_structured else ""))
    epochs = config.prune_epochs  # validated: at least 1
    steps = epochs * math.ceil(len(dataset.x_train) / config.batch_size)
    targets_by_layer = layer_sparsity(model, targets, config)

    def wrap(layer):
        params = {"pruning_schedule": _schedule(config, steps, targets_by_layer[layer.name])}
        if config.prune_structured:
            params["sparsity_m_by_n"] = STRUCTURED_M_BY_N
        elif config.prune_block > 1 and len(layer.kernel.shape) == 2 \
                and layer.kernel.shape[0] % config.prune_block == 0:
            params["block_size"] = (config.prune_block, 1)  # [in, out]: along the inputs
        return sparsity.prune_low_magnitude(layer, **params)

    pruned = techniques.wrap_and_finetune(
        model, targets, wrap, NAME, dataset, config,
        learning_rate=config.learning_rate * LEARNING_RATE_SCALE, epochs=epochs,
        callbacks=[sparsity.UpdatePruningStep()])  # also re-applies masks per epoch
    return sparsity.strip_pruning(pruned)


def layer_sparsity(model, targets: set[str], config) -> dict[str, float]:
    """Target sparsity of each layer `apply` prunes (see the module docstring)."""
    sizes = {layer.name: int(layer.kernel.shape.num_elements())
             for layer in techniques.tfmot_kernel_layers(model) if layer.name in targets}
    largest = max(sizes.values())
    return {name: round(config.prune_sparsity * (size / largest) ** SIZE_EXPONENT, 4)
            for name, size in sizes.items()}


def layers_to_prune(model, *, structured: bool) -> set[str]:
    """Names of the layers `apply` prunes (see the module docstring)."""
    candidates = techniques.tfmot_kernel_layers(model)
    if structured:
        keras = tf_keras()
        candidates = [layer for layer in candidates
                      if type(layer) in (keras.layers.Conv2D, keras.layers.Dense)
                      and layer.kernel.shape[-2] % STRUCTURED_M_BY_N[1] == 0]
    sizes = [int(layer.kernel.shape.num_elements()) for layer in candidates]
    if candidates and sizes[0] < SKIP_FIRST_LAYER_BELOW * sum(sizes):
        candidates = candidates[1:]
    return {layer.name for layer in candidates}


def _schedule(config, steps: int, target: float):
    import tensorflow_model_optimization as tfmot

    sparsity = tfmot.sparsity.keras
    ramp = int(steps * RAMP_SHARE)
    frequency = max(1, ramp // MASK_UPDATES)
    if config.prune_structured:
        # 2:4 masks follow the pattern, not a target: recompute them as weights move.
        return sparsity.ConstantSparsity(0.5, begin_step=0, frequency=frequency)
    if ramp < 1:  # a single step: prune to the target at once
        return sparsity.ConstantSparsity(target, begin_step=0, frequency=1)
    # end_step on a multiple of `frequency`, so the last update lands exactly on the target.
    return sparsity.PolynomialDecay(initial_sparsity=0.0, final_sparsity=target,
                                    begin_step=0, end_step=ramp // frequency * frequency,
                                    frequency=frequency)
