"""Training-time compression techniques (TF Model Optimization; qat4 is our own small Keras
wrapper, TF-MOT's QAT being int8 only), one module each, one interface:

    NAME: str
    apply(model, dataset, config, *, applied: tuple[str, ...]) -> model

`model` is a tf_keras classifier; `applied` names the techniques already applied to it, in order,
so clustering can keep pruning's zeros and QAT can keep both. `apply` returns the fine-tuned model
ready for TFLite conversion: TF-MOT's training wrappers are stripped, except QAT's, which the
converter needs to produce int8 kernels.

`apply_recipe` runs a recipe such as "prune+cluster+qat" on a fresh copy of the base model (or
continues from a saved shorter recipe, e.g. the "prune+cluster" model), saves the result and
returns small JSON-able figures. `TECHNIQUES` maps recipe names to modules: a new
technique is one module plus one line there (and its place in variants.OPTIMIZATION_ORDER).

TensorFlow and TF-MOT are imported inside functions: importing this package stays cheap (the
Airflow DAG processor imports the DAG files every few seconds).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from pipeline.files import atomic_path, save_array
from pipeline.sources.models import flat_layers, load_model, model_kind, predict_classes, tf_keras
from pipeline.techniques import sizing
from pipeline.techniques.train import compile_classifier, cosine_schedule, fit, set_seed
from pipeline.techniques.validation import training_image_count, validation_accuracy
from pipeline.variants import OPTIMIZATION_ORDER, qat_problem


class TechniqueError(ValueError):
    """A technique cannot be applied to this model; the message names the technique, the layer or
    format at fault, and what to do instead."""


# Shared by the technique modules (defined before they are imported below).

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


def fuse_layers(model):
    """The model TF-MOT's techniques work on: the same function (exact at inference), with
     - each BatchNormalization fed only by a linear Dense layer folded into that layer, and
     - each plain ReLU layer fed only by a linear Conv2D/DepthwiseConv2D/Dense layer fused into
       that layer's activation.
    Other layers keep their weights; Conv2D+BatchNorm pairs are kept (they convert correctly).
    Returns the model itself when there is nothing to fuse or it is not Sequential/functional.

    Why, with TF-MOT 0.8.1 and TF 2.21: after QAT, the TFLite converter mis-quantizes a Dense
    layer followed by BatchNorm (in our check a small CNN with one such pair scored 9% as int8
    against 86% for its QAT Keras model; 98% agreement once folded); and QAT gives a conv/dense
    layer followed by a separate ReLU layer no weight quantizer (its LayerReLUQuantize transform),
    so cluster/prune-preserving QAT cannot keep that kernel's clusters and zeros.
    Pruning and clustering start from the fused model too, so they shape the deployed kernels.
    """
    keras = tf_keras()
    graph = model
    if isinstance(model, keras.Sequential):  # its functional view has the config to rewire
        graph = keras.Model(model.inputs, model.outputs, name=model.name)
    try:
        config = graph.get_config()
    except NotImplementedError:  # subclassed model: TF-MOT refuses it later, with a clear error
        return model
    weights = {layer.name: layer.get_weights() for layer in graph.layers}
    batchnorms = {layer.name: layer for layer in graph.layers
                  if isinstance(layer, keras.layers.BatchNormalization)}

    def fold_batchnorm(entry, source) -> bool:
        bn = batchnorms.get(entry["name"])
        if bn is None or source["class_name"] != "Dense" or not _is_linear(source):
            return False
        if list(bn.axis) not in ([-1], [len(bn.input_shape) - 1]):
            return False
        mean, variance = bn.moving_mean.numpy(), bn.moving_variance.numpy()
        gamma = bn.gamma.numpy() if bn.gamma is not None else np.ones_like(mean)
        beta = bn.beta.numpy() if bn.beta is not None else np.zeros_like(mean)
        scale = gamma / np.sqrt(variance + bn.epsilon)
        kernel, *bias = weights[source["name"]]
        bias = bias[0] if bias else np.zeros_like(mean)
        weights[source["name"]] = [kernel * scale, (bias - mean) * scale + beta]
        source["config"]["use_bias"] = True
        return True

    def fuse_relu(entry, source) -> bool:
        plain_relu = (entry["class_name"] == "ReLU"
                      and entry["config"].get("max_value") is None
                      and not entry["config"].get("negative_slope")
                      and not entry["config"].get("threshold"))
        relu_activation = (entry["class_name"] == "Activation"
                           and entry["config"].get("activation") == "relu")
        if not (plain_relu or relu_activation) or not _is_linear(source) or \
                source["class_name"] not in ("Conv2D", "DepthwiseConv2D", "Dense"):
            return False
        source["config"]["activation"] = "relu"
        return True

    changed = False
    for fuse in (fold_batchnorm, fuse_relu):  # BatchNorm first: Dense -> BN -> ReLU fuses fully
        entries = {entry["name"]: entry for entry in config["layers"]}
        consumers: dict[str, list[str]] = {}
        for entry in config["layers"]:
            for source in _node_names(entry["inbound_nodes"]):
                consumers.setdefault(source, []).append(entry["name"])
        outputs = set(_node_names(config["output_layers"]))
        renames = {}  # removed layer -> the layer it was fused into
        for entry in config["layers"]:
            sources = _node_names(entry["inbound_nodes"])
            if len(sources) != 1 or consumers.get(sources[0]) != [entry["name"]] \
                    or sources[0] in outputs:
                continue
            if fuse(entry, entries[sources[0]]):
                renames[entry["name"]] = sources[0]
        if renames:
            changed = True
            config["layers"] = [entry for entry in config["layers"] if entry["name"] not in renames]
            for entry in config["layers"]:
                entry["inbound_nodes"] = _rename_nodes(entry["inbound_nodes"], renames)
            config["output_layers"] = _rename_nodes(config["output_layers"], renames)
    if not changed:
        return model
    fused = keras.Model.from_config(config)
    for layer in fused.layers:
        layer.set_weights(weights[layer.name])
    return fused


def _is_linear(entry) -> bool:
    return entry["config"].get("activation", "linear") == "linear"


def _node_names(nodes) -> list[str]:
    """Layer names referenced by a functional config's node list ([name, node, tensor, ...])."""
    if isinstance(nodes, list) and nodes and isinstance(nodes[0], str):
        return [nodes[0]]
    if isinstance(nodes, list):
        return [name for node in nodes for name in _node_names(node)]
    return []


def _rename_nodes(nodes, renames: dict[str, str]):
    if isinstance(nodes, list) and nodes and isinstance(nodes[0], str):
        return [renames.get(nodes[0], nodes[0]), *nodes[1:]]
    if isinstance(nodes, list):
        return [_rename_nodes(node, renames) for node in nodes]
    return nodes


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


# The registry. Imported here, after the shared helpers above that the modules use.
from pipeline.techniques import backoff, clustering, distillation, pruning, qat, qat4  # noqa: E402

TECHNIQUES = {"distill": distillation, "prune": pruning, "cluster": clustering, "qat": qat,
              "qat4": qat4}


def parse_recipe(recipe: str) -> tuple[str, ...]:
    """'cluster+prune' -> ('prune', 'cluster'): validated names in OPTIMIZATION_ORDER."""
    names = [name.strip() for name in recipe.split("+") if name.strip()]
    if not names:
        raise TechniqueError(f"empty recipe {recipe!r}: name techniques joined by '+', e.g. "
                             "'prune+cluster+qat'")
    unknown = [name for name in names if name not in TECHNIQUES]
    if unknown:
        raise TechniqueError(f"unknown technique {unknown[0]!r} in recipe {recipe!r}; known: "
                             f"{', '.join(TECHNIQUES)}")
    if len(set(names)) != len(names):
        raise TechniqueError(f"recipe {recipe!r} repeats a technique")
    problem = qat_problem(names)
    if problem:
        raise TechniqueError(f"recipe {recipe!r}: {problem}")
    return tuple(sorted(names, key=OPTIMIZATION_ORDER.index))


def apply_recipe(recipe: str, base_model_path: str, dataset, config, out_dir, *,
                 start: tuple[str, str] | None = None) -> dict:
    """Apply the recipe's techniques in order to a fresh copy of the base model and save it.

    `start` = (prefix recipe, its saved model path) continues from an earlier result instead:
    'prune+cluster' started from ('prune', path) only clusters, so collaborative recipes do not
    redo the techniques they share with shorter recipes of the same run.

    Each technique checks its result on the validation split and backs off within
    `config.technique_retries` retries when it fell far below the budget (`backoff`).

    Returns {recipe, model_path, params, macs, sparsity, unique_weights_max,
    unique_weights_per_channel_max, val_accuracy, keras_test_accuracy, keras_predictions_path,
    base_val_accuracy, budget_val_accuracy, fits_budget, settings, attempts}: kernel figures as
    in `kernel_stats` (through QAT's wrappers), params as in `keras_params`, accuracies of the
    Keras model, its predicted test classes saved as .npy; the base model's validation accuracy
    and the lowest an attempt may reach; per technique of this call, the settings it kept and
    every attempt's settings and validation accuracy; `fits_budget` False when a technique's
    best attempt stayed under the budget.
    """
    from sklearn.metrics import accuracy_score

    techniques = parse_recipe(recipe)
    name = "+".join(techniques)
    applied: tuple[str, ...] = ()
    if start is None:
        model = _load_base(base_model_path, name, config)
    else:
        applied = parse_recipe(start[0])
        if techniques[:len(applied)] != applied or applied == techniques:
            raise ValueError(f"{start[0]!r} is not a shorter prefix of recipe {name!r}")
        model = load_optimized(start[1])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_accuracy = validation_accuracy(
        _load_base(base_model_path, name, config) if start else model, dataset)
    budget = backoff.accuracy_budget(base_accuracy, config, dataset.num_classes)
    settings, attempts, fits = {}, {}, True
    for technique in techniques[len(applied):]:
        outcome = _apply_within_budget(technique, model, dataset, config, applied, budget,
                                       out_dir / f"{name}.{technique}-input")
        model = outcome.model
        settings[technique], attempts[technique] = outcome.settings, outcome.attempts
        fits = fits and outcome.fits
        applied += (technique,)

    model_path = save_optimized(model, out_dir / name)
    test_predictions = predict_classes(model, dataset.batches("test"))
    predictions_path = str(save_array(out_dir / f"{name}.test-predictions.npy", test_predictions))
    stats = kernel_stats(model)
    return {
        "recipe": name,
        "model_path": model_path,
        "params": keras_params(model),
        "macs": stats["macs"],
        "sparsity": stats["sparsity"],
        "unique_weights_max": stats["unique_weights_max"],
        "unique_weights_per_channel_max": stats["unique_weights_per_channel_max"],
        "val_accuracy": float(accuracy_score(dataset.labels("val"),
                                             predict_classes(model, dataset.batches("val")))),
        "keras_test_accuracy": float(accuracy_score(dataset.labels("test"), test_predictions)),
        "keras_predictions_path": predictions_path,
        "base_val_accuracy": base_accuracy,
        "budget_val_accuracy": budget,
        "fits_budget": fits,
        "settings": settings,
        "attempts": attempts,
    }


def _apply_within_budget(technique: str, model, dataset, config, applied: tuple[str, ...],
                         budget: float, scratch: Path) -> backoff.Outcome:
    """`technique` applied to `model` through `backoff.fit_within_budget`. Each attempt starts
    from its own copy of `model` (TF-MOT's wrappers change the model they are given), reloaded
    from `scratch` when there may be a retry."""
    module = TECHNIQUES[technique]
    source = save_optimized(model, scratch) if config.technique_retries else None

    def attempt(settings: dict):
        set_seed(config.seed)
        given = load_optimized(source) if source else model
        return module.apply(given, dataset, backoff.configured(config, settings),
                            applied=applied)

    return backoff.fit_within_budget(
        attempt, module.settings(model, dataset, config), module.relax,
        score=lambda tuned: validation_accuracy(tuned, dataset), budget=budget,
        retries=config.technique_retries,
        settle=lambda settings: module.settings(model, dataset,
                                                backoff.configured(config, settings)))


def _load_base(path, recipe: str, config):
    kind = model_kind(path)
    if kind != "tf_keras":
        what = "a Keras 3 model" if kind == "keras3" else "a SavedModel without Keras metadata"
        raise TechniqueError(
            f"{recipe}: needs a tf_keras (Keras 2) model, because TF Model Optimization only "
            f"works with Keras 2, but {Path(path).name} is {what}. Save the model with tf_keras "
            "(TF_USE_LEGACY_KERAS=1), or choose variants without optimizations (e.g. int8)")
    # A fresh copy on every call: TF-MOT's wrappers change the model they are given.
    return load_model(path, allow_unsafe=config.allow_unsafe_model)


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


def kernel_stats(model) -> dict:
    """Figures over the conv/dense kernels, seen through TF-MOT wrappers: `sparsity` (share of
    zero weights), `unique_weights_max` (most distinct values in one kernel),
    `unique_weights_per_channel_max` (most distinct values in one output channel of a kernel) and
    `macs` (multiply-adds of one forward pass, zeros included).

    The per-channel figure is what cluster-preserving QAT keeps: it lets each Conv2D output
    channel's centroids move on their own, so a kernel clustered to k values comes out with up to
    k per channel (int8 conv kernels are quantized per channel anyway)."""
    zeros = total = unique_max = per_channel_max = macs = 0
    for outer, kernel in _kernels(model):
        zeros += int(np.count_nonzero(kernel == 0))
        total += kernel.size
        unique_max = max(unique_max, int(np.unique(kernel).size))
        channels = kernel.reshape(-1, kernel.shape[-1]).T
        per_channel_max = max(per_channel_max, max(int(np.unique(c).size) for c in channels))
        shape = outer.output_shape
        spatial = int(np.prod([d for d in shape[1:-1] if d])) if len(shape) > 2 else 1
        macs += spatial * kernel.size
    return {"sparsity": zeros / total if total else 0.0, "unique_weights_max": unique_max,
            "unique_weights_per_channel_max": per_channel_max,
            "macs": macs}


def keras_params(model) -> int:
    """Parameters of the Keras layers, without TF-MOT's training variables (quantization ranges,
    masks, cluster-preserving copies), so a QAT model counts like the model it wraps."""
    return sum(int(np.prod(w.shape)) for layer in flat_layers(model) for w in _own_weights(layer))


def _kernels(model):
    """(layer as it sits in the model, kernel as an array) for conv/dense layers."""
    keras = tf_keras()
    kinds = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
             keras.layers.DepthwiseConv2D, keras.layers.Dense)
    for layer in flat_layers(model):
        inner = _unwrap(layer)
        if isinstance(inner, kinds):
            # The variable, not `inner.kernel`: QAT's wrapper replaces that attribute with the
            # fake-quantized tensor of its graph.
            kernel = next(w for w in _own_weights(layer)
                          if w.name.split("/")[-1].split(":")[0] in ("kernel", "depthwise_kernel"))
            yield layer, kernel.numpy()


def _own_weights(layer) -> list:
    """The variables of the Keras layer itself, without those a TF-MOT wrapper adds. (QAT's
    wrapper takes over the variables of the layer it wraps, but they keep its name scope.)"""
    inner = _unwrap(layer)
    if inner is layer:
        return [] if _from_tfmot(layer) else list(layer.weights)  # QAT's input QuantizeLayer
    return [w for w in layer.weights if w.name.startswith(inner.name + "/")]


def _unwrap(layer):
    """The Keras layer inside TF-MOT's wrappers (PruneLowMagnitude, ClusterWeights,
    QuantizeWrapper)."""
    while _from_tfmot(layer) and hasattr(layer, "layer"):
        layer = layer.layer
    return layer


def _from_tfmot(layer, package: str = "") -> bool:
    return type(layer).__module__.startswith(f"tensorflow_model_optimization.python.core.{package}")


def _is_quantized(model) -> bool:
    return any(_from_tfmot(layer, "quantization") for layer in flat_layers(model))
