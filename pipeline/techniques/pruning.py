"""Magnitude pruning (TF-MOT `prune_low_magnitude`): zero the smallest weights of the conv/dense
kernels while fine-tuning, then strip the wrappers.

Unstructured: each layer's sparsity rises from 0 to its target along a PolynomialDecay schedule
over the first RAMP_SHARE of the fine-tuning steps; the remaining steps recover accuracy at the
target. The largest kernel's target is `config.prune_sparsity`; a kernel r times smaller gets
`prune_sparsity * r ** -prune_size_exponent` (default 0.25: a conv layer 20x smaller than the
dense head gets about half the target; 0: every kernel the same target). Small kernels hold few of the weights but much of the accuracy, so pruning them as
hard buys little size and costs the most accuracy (TF-MOT's guide: prune the large layers).
Sized to the layer (`layer_plan`): no layer keeps fewer than MIN_KEPT_PER_OUTPUT weights per
output unit on average (a 64x16 Dense kernel at 0.91 in runs of 8 had 8 of its 16 units cut off
from every input), and kernels under MIN_PRUNED_WEIGHTS weights are left alone (they are little
of the file and much of the accuracy).
Dense kernels (and 1x1 convolutions' with `prune_block_pointwise`) are pruned in blocks of
`config.prune_block` consecutive input weights of one output unit (shorter blocks when a unit
has under MIN_BLOCKS_PER_UNIT of them; TF-MOT fails on a kernel with a single block per unit,
"Input tensor must be rank 2"): LiteRT stores a fully-connected kernel as [out, in] (a 1x1
convolution's as [out, 1, 1, in]), so a block is a run of zero bytes in the file, which gzip
stores in a few bits where scattered zeros cost about one bit each, and the nonzero weights
between the runs come in longer literal strings. On the default CNN at 0.91,
runs of 16 against runs of 4 (4 pruning epochs each): the pruned model's int8 file 28.3x against
23.4x smaller gzipped than float32, at the same accuracy (-1.13 / -1.12 pts). Eight pruning epochs
instead of four won back 0.15 pts at runs of 16 (-0.98).
Structured (`config.prune_structured`): 2:4 sparsity (two zeros in every group of four
weights along the input-channel axis, the pattern sparse kernels accelerate), i.e. 50% sparsity
whatever `prune_sparsity` says.

Epochs and batch size follow the number of training images (`sizing.fine_tuning`: at least
MIN_STEPS["prune"] optimizer steps), and BatchNorm's moving averages are made to forget the
unpruned model's statistics within them (`finetune.finetune`).

Which layers: the top-level Conv1D/2D/3D and Dense layers (what TF-MOT prunes; MobileNet's 1x1
pointwise convolutions, most of its weights, are Conv2D layers), except
 - the first one when it holds under SKIP_FIRST_LAYER_BELOW of those weights: it sees the raw
   pixels through few channels, so pruning it saves almost nothing and costs the most accuracy
   (TF-MOT's guide: prune later layers first).
 - kernels under MIN_PRUNED_WEIGHTS weights, or that cannot keep MIN_KEPT_PER_OUTPUT weights per
   output unit at any sparsity worth having.
 - for 2:4, layers whose input-channel count is not a multiple of 4 (no whole groups of four).
Other layers (and layers inside nested models) are left as they are. Pruning works on
`graph.fuse_layers(model)` (SeparableConv2D split into its depthwise and 1x1 Conv2D, whose
pointwise kernel is then pruned like any 1x1 convolution; Dense+BatchNorm and conv/dense+ReLU
fused; see there why).
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

from pipeline.errors import TechniqueError
from pipeline.sources.models import tf_keras
from pipeline.techniques import sizing
from pipeline.techniques.backoff import configured
from pipeline.techniques.finetune import tfmot_kernel_layers, wrap_and_finetune
from pipeline.techniques.graph import fuse_layers
from pipeline.techniques.validation import training_image_count

NAME = "prune"
SKIP_FIRST_LAYER_BELOW = 0.01
RAMP_SHARE = 0.7
MASK_UPDATES = 20           # how many times the mask is recomputed while sparsity rises
STRUCTURED_M_BY_N = (2, 4)
MIN_PRUNED_WEIGHTS = 1024
MIN_KEPT_PER_OUTPUT = 16
MIN_BLOCKS_PER_UNIT = 8
MIN_LAYER_SPARSITY = 0.05   # below this a layer's pruning is not worth its accuracy
# Backing off: each retry keeps twice the weights of the last (0.91 -> 0.82 -> 0.64) and trains
# half as long again, down to RELAXED_SPARSITY_MIN.
RELAXED_SPARSITY_MIN = 0.3
RELAXED_EPOCHS_FACTOR = 1.5
# Fine-tuning rate relative to config.learning_rate: the other weights need a real step size to
# make up for the pruned ones (in two epochs at 80% sparsity 0.25 lost 0.6 pts more than 1.0),
# but restarting at the full rate costs accuracy by itself (-0.6 pts in two epochs, no pruning).
LEARNING_RATE_SCALE = 0.5


def settings(model, dataset, config) -> dict:
    """What `apply` uses on this model and data: the largest kernel's target, epochs and batch
    size (config fields) and, for the record, each pruned layer's sparsity and block."""
    plan = sizing.fine_tuning(NAME, config.prune_epochs, config.batch_size,
                              training_image_count(dataset), to_data=config.size_to_data)
    return {"prune_sparsity": config.prune_sparsity,
            "prune_size_exponent": config.prune_size_exponent,
            "prune_epochs": plan.epochs,
            "batch_size": plan.batch_size,
            "prune_layers": layer_plan(fuse_layers(model), config)}


def relax(settings: dict) -> dict | None:
    """Twice the weights kept and longer recovery; None below RELAXED_SPARSITY_MIN."""
    target = round(1 - 2 * (1 - settings["prune_sparsity"]), 4)
    if target < RELAXED_SPARSITY_MIN:
        return None
    return {"prune_sparsity": target,
            "prune_epochs": math.ceil(settings["prune_epochs"] * RELAXED_EPOCHS_FACTOR)}


def apply(model, dataset, config, *, applied: tuple[str, ...] = ()):
    import tensorflow_model_optimization as tfmot

    sparsity = tfmot.sparsity.keras
    config = configured(config, settings(model, dataset, config))
    model = fuse_layers(model)
    plan = layer_plan(model, config)
    if not plan:
        raise TechniqueError(
            f"{NAME}: model {model.name!r} has no Conv/Dense layer worth pruning (none holds "
            f"{MIN_PRUNED_WEIGHTS} weights or more with room to prune)"
            + (" (2:4 needs input channels in multiples of 4)" if config.prune_structured else ""))
    epochs = config.prune_epochs  # validated: at least 1
    steps = epochs * math.ceil(training_image_count(dataset) / config.batch_size)

    def wrap(layer):
        params = {"pruning_schedule": _schedule(config, steps, plan[layer.name]["sparsity"])}
        if config.prune_structured:
            params["sparsity_m_by_n"] = STRUCTURED_M_BY_N
        elif plan[layer.name]["block"] > 1:
            params["block_size"] = (plan[layer.name]["block"], 1)  # [in, out]: along the inputs
        return sparsity.prune_low_magnitude(layer, **params)

    with _pointwise_blocks() if config.prune_block_pointwise else nullcontext():
        pruned = wrap_and_finetune(
            model, set(plan), wrap, NAME, dataset, config,
            learning_rate=config.learning_rate * LEARNING_RATE_SCALE, epochs=epochs,
            callbacks=[sparsity.UpdatePruningStep()])  # also re-applies masks per epoch
        return sparsity.strip_pruning(pruned)


@contextmanager
def _pointwise_blocks():
    """Let TF-MOT prune 1x1 convolutions in runs along their inputs, as it does Dense kernels.

    TF-MOT's block masks squeeze the kernel to 2-D and reshape the mask back (its code keeps the
    squeeze for that, with a TODO), but its validation refuses any kernel that is not 2-D
    before the squeeze, so a 1x1 Conv2D kernel [1, 1, in, out] could only be pruned weight by
    weight. LiteRT stores that kernel as [out, 1, 1, in], the same bytes as a Dense kernel, so
    runs of zero inputs gzip as well there. Measured on a MobileNetV2 (alpha 0.35, 96 px, 5
    photo classes) pruned to 0.9 in every kernel: 9.0x gzip at -2.3 pts against 7.7x at -1.6
    weight by weight (prune+cluster-int8), so it is a setting (`prune_block_pointwise`), off by
    default: smaller files, at an accuracy cost on that model. This accepts kernels that
    squeeze to 2-D while pruning builds its wrappers; anything else is refused as before."""
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl

    original = pruning_impl.Pruning._validate_block  # noqa: SLF001

    def validate(self):
        if list(self._block_size) != [1, 1]:  # noqa: SLF001
            for weight, _, _ in self._pruning_vars:  # noqa: SLF001
                if len([d for d in weight.shape if d != 1]) > 2:
                    raise ValueError("Block Sparsity can only be used for layers which have "
                                     "2-dimensional (or 1x1 convolution) weights.")

    pruning_impl.Pruning._validate_block = validate  # noqa: SLF001
    try:
        yield
    finally:
        pruning_impl.Pruning._validate_block = original  # noqa: SLF001


def layer_plan(model, config) -> dict[str, dict]:
    """{layer name: {"weights", "sparsity", "block"}} of each layer `apply` prunes (see the module
    docstring): the largest kernel's target is `config.prune_sparsity`, a kernel r times smaller
    gets `prune_sparsity * r ** -config.prune_size_exponent`, capped so each output unit
    keeps MIN_KEPT_PER_OUTPUT weights on average; a layer whose cap leaves under MIN_LAYER_SPARSITY is
    not pruned."""
    candidates = _candidate_shapes(model, structured=config.prune_structured)
    shapes = {name: shape for name, shape in candidates.items()
              if _size(shape) >= MIN_PRUNED_WEIGHTS}
    if not shapes:
        return {}
    largest = max(_size(shape) for shape in shapes.values())
    plan = {}
    for name, shape in shapes.items():
        size = _size(shape)
        sparsity = config.prune_sparsity * (size / largest) ** config.prune_size_exponent
        sparsity = round(min(sparsity, 1 - MIN_KEPT_PER_OUTPUT * shape[-1] / size), 4)
        if sparsity >= MIN_LAYER_SPARSITY:
            plan[name] = {"weights": size, "sparsity": sparsity,
                          "block": 1 if config.prune_structured else _block(shape, config)}
    return plan


def _candidate_shapes(model, *, structured: bool) -> dict[str, tuple[int, ...]]:
    """Kernel shapes of the layers pruning may touch, in model order (for 2:4, Conv2D and Dense
    kernels with whole groups of four inputs), without the first layer when it holds under
    SKIP_FIRST_LAYER_BELOW of their weights."""
    keras = tf_keras()
    if structured:
        candidates = [layer for layer in tfmot_kernel_layers(model)
                      if type(layer) in (keras.layers.Conv2D, keras.layers.Dense)
                      and layer.kernel.shape[-2] % STRUCTURED_M_BY_N[1] == 0]
    else:
        candidates = tfmot_kernel_layers(model)
    shapes = {layer.name: tuple(int(d) for d in layer.kernel.shape) for layer in candidates}
    sizes = [_size(shape) for shape in shapes.values()]
    if shapes and sizes[0] < SKIP_FIRST_LAYER_BELOW * sum(sizes):
        del shapes[next(iter(shapes))]
    return shapes


def _size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _block(shape: tuple[int, ...], config) -> int:
    """Runs of `config.prune_block` inputs for a Dense ([in, out]) kernel, or a 1x1 convolution
    ([1, 1, in, out]) one when `config.prune_block_pointwise`, halved until each unit has
    MIN_BLOCKS_PER_UNIT of them and they tile the inputs; else 1 (weight by weight)."""
    if (len(shape) == 4 and shape[:2] == (1, 1) and min(shape[2:]) > 1
            and config.prune_block_pointwise):
        shape = shape[2:]  # a 1x1 convolution: stored like a Dense kernel (_pointwise_blocks)
    if len(shape) != 2:
        return 1
    block = config.prune_block
    while block > 1 and (shape[0] < MIN_BLOCKS_PER_UNIT * block or shape[0] % block):
        block //= 2
    return block


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
