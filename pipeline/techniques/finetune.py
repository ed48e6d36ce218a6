"""Fine-tuning shared by the technique modules: wrap layers with a TF-MOT verb and fine-tune the
clone (`wrap_and_finetune`, `finetune`), BatchNorm's momentum sized to the fit
(`batchnorm_momentum`), the model's output kind (`outputs_probabilities`), the layers TF-MOT
works on (`tfmot_kernel_layers`) and TF-MOT's refusals as TechniqueErrors (`tfmot_errors`).

TensorFlow is imported inside functions (through `tf_keras()`).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager, nullcontext

from pipeline.errors import TechniqueError
from pipeline.sources.models import flat_layers, tf_keras
from pipeline.techniques import sizing
from pipeline.techniques.stats import _unwrap
from pipeline.techniques.train import compile_classifier, cosine_schedule, fit
from pipeline.techniques.validation import training_image_count


def wrap_and_finetune(model, targets: set[str], wrap_layer, technique: str, dataset, config, *,
                      learning_rate: float, epochs: int | None = None, callbacks=()):
    """Clone `model` with `wrap_layer(layer)` (a TF-MOT verb) around the layers named in
    `targets`, then fine-tune the clone; TF-MOT's refusals become TechniqueErrors."""
    def wrap(layer):
        if layer.name not in targets:
            return layer
        with tfmot_errors(technique, layer):
            return wrap_layer(layer)

    with tfmot_errors(technique):
        wrapped = tf_keras().models.clone_model(model, clone_function=wrap)
    finetune(wrapped, dataset, config, learning_rate=learning_rate, epochs=epochs,
             from_logits=not outputs_probabilities(model), callbacks=callbacks)
    return wrapped


def finetune(model, dataset, config, *, learning_rate: float, from_logits: bool,
             epochs: int | None = None, callbacks=()):
    """Compile with a cosine-decayed rate and fit for `epochs` (default
    `config.finetune_epochs`) epochs, BatchNorm's moving averages forgetting the statistics of
    the model before the fine-tuning (`batchnorm_momentum`, with `config.size_to_data`)."""
    epochs = epochs or config.finetune_epochs
    steps = math.ceil(training_image_count(dataset) / config.batch_size)
    compile_classifier(model, cosine_schedule(learning_rate, epochs, steps),
                       from_logits=from_logits)
    with batchnorm_momentum(model, epochs * steps) if config.size_to_data else nullcontext():
        fit(model, dataset, epochs=epochs, batch_size=config.batch_size, callbacks=callbacks,
            seed=config.seed)  # no flips: they did not help these short fine-tunings


@contextmanager
def batchnorm_momentum(model, steps: int):
    """Within the block, each BatchNormalization layer of `model` (inside TF-MOT's wrappers
    too) has `sizing.batchnorm_momentum` for a fit of `steps` steps; its own afterwards, so the
    saved model keeps the user's setting. Set before `fit` traces the training step."""
    layers = [layer for layer in map(_unwrap, flat_layers(model))
              if type(layer).__name__ == "BatchNormalization"]
    own = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = sizing.batchnorm_momentum(layer.momentum, steps)
    try:
        yield
    finally:
        for layer, momentum in zip(layers, own):
            layer.momentum = momentum


def outputs_probabilities(model) -> bool:
    """True when the model's last layer applies softmax (its outputs are probabilities, not
    logits)."""
    last = _unwrap(model.layers[-1])
    if hasattr(last, "layers"):  # a nested model as the last layer
        return outputs_probabilities(last)
    if type(last).__name__ == "Softmax":
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def tfmot_kernel_layers(model) -> list:
    """Top-level Conv1D/2D/3D (and their transposes) and Dense layers: the kernels TF-MOT's pruning
    and clustering work on (it leaves depthwise kernels alone)."""
    keras = tf_keras()
    kinds = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense)
    return [layer for layer in model.layers if isinstance(layer, kinds)]


@contextmanager
def tfmot_errors(technique: str, layer=None):
    """Turn TF-MOT's refusal of a layer or model into a TechniqueError naming both."""
    try:
        yield
    except TechniqueError:
        raise
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as error:
        detail = " ".join(str(error).split())
        found = re.search(r"Layer (\S+?):<class '[\w.]*?(\w+)'>", detail)
        if layer is not None:
            where = f"layer {layer.name!r} ({type(layer).__name__})"
        elif found:
            where = f"layer {found.group(1)!r} ({found.group(2)})"
        else:
            where = "this model"
        raise TechniqueError(
            f"{technique}: TF Model Optimization cannot handle {where}: {detail[:400]} -- "
            f"replace that layer, or choose variants without {technique!r}") from error
