"""Fine-tuning sized to the data: batch size, epochs and BatchNorm momentum from the number of
training images, so a few hundred images get as many optimizer steps as the settings give
Fashion-MNIST's 54,000 (where they were measured) need.

Why: on a 5,500-weight model with 540 training images, batch 128 gave 5 steps an epoch; 8
pruning epochs were 40 steps and 12 distillation epochs 60. BatchNorm's moving averages
(momentum 0.99) then still held 67 % (pruning) and 55 % (distillation) of the statistics from
before the fine-tuning (or of the initial 0 / 1 for a student trained from scratch), so the
model that trained fine (pruning: 85 % on batch statistics) scored 53 % in inference mode, and
the student (64 % training accuracy, underfit in 60 steps) 33 %. The settings stay what they
are wherever the data gives enough steps: the default CNN on 54,000 images keeps batch 128,
8 pruning / 2 fine-tuning / 12 distillation epochs and its momentum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# An epoch of at least this many batches: smaller batches when the images are few.
MIN_STEPS_PER_EPOCH = 16
MIN_BATCH_SIZE = 8
# Optimizer steps a fine-tuning needs at least, by kind: pruning ramps sparsity up then recovers;
# clustering and QAT only adapt a trained model; a distillation student learns from scratch.
MIN_STEPS = {"prune": 300, "finetune": 100, "distill": 600}
MAX_EPOCHS = 200
# BatchNorm's moving averages keep at most this share of what they held before the fine-tuning.
STALE_STATISTICS_SHARE = 0.01


@dataclass(frozen=True)
class FineTuning:
    batch_size: int
    epochs: int
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def batch_size(configured: int, images: int) -> int:
    """`configured`, or the largest power of two that gives MIN_STEPS_PER_EPOCH batches."""
    if images // MIN_STEPS_PER_EPOCH >= configured:
        return configured
    fitting = max(1, images // MIN_STEPS_PER_EPOCH)
    return min(configured, max(MIN_BATCH_SIZE, 2 ** int(math.log2(fitting))))


def fine_tuning(kind: str, configured_epochs: int, configured_batch: int,
                images: int, *, to_data: bool = True) -> FineTuning:
    """Batch size and epochs for a fine-tuning of `kind` (a MIN_STEPS key): the configured
    figures, with a smaller batch and more epochs when they would give too few steps (unless
    `to_data` is off: `config.size_to_data`)."""
    if not to_data:
        return FineTuning(configured_batch, configured_epochs,
                          max(1, math.ceil(images / configured_batch)))
    batch = batch_size(configured_batch, images)
    steps_per_epoch = max(1, math.ceil(images / batch))
    epochs = max(configured_epochs, math.ceil(MIN_STEPS[kind] / steps_per_epoch))
    return FineTuning(batch, min(epochs, max(MAX_EPOCHS, configured_epochs)), steps_per_epoch)


def batchnorm_momentum(momentum: float, steps: int) -> float:
    """The moving-average momentum for a fine-tuning of `steps` steps: the layer's own, or lower
    so the statistics from before the fine-tuning weigh at most STALE_STATISTICS_SHARE at its end
    (momentum ** steps <= share)."""
    return min(momentum, STALE_STATISTICS_SHARE ** (1.0 / max(1, steps)))
