"""The graph rewrite TF-MOT's techniques start from: `fuse_layers` splits SeparableConv2D into its
depthwise and 1x1 convolutions, folds BatchNorm into the Dense layer before it and fuses plain ReLU
layers into the activation of the layer before them.
"""
from __future__ import annotations

import numpy as np

from pipeline.sources.models import tf_keras


def fuse_layers(model):
    """The model TF-MOT's techniques work on: the same function (exact at inference), with
     - each SeparableConv2D split into the DepthwiseConv2D and the 1x1 Conv2D it computes (the
       Conv2D keeps the layer's name, bias and activation; the depthwise is `<name>_depthwise`),
     - each BatchNormalization fed only by a linear Dense layer folded into that layer, and
     - each plain ReLU layer fed only by a linear Conv2D/DepthwiseConv2D/Dense layer fused into
       that layer's activation.
    Other layers keep their weights; Conv2D+BatchNorm pairs are kept (they convert correctly).
    Returns the model itself when there is nothing to fuse or it is not Sequential/functional.

    Why, with TF-MOT 0.8.1 and TF 2.21: after QAT, the TFLite converter mis-quantizes a Dense
    layer followed by BatchNorm (in our check a small CNN with one such pair scored 9% as int8
    against 86% for its QAT Keras model; 98% agreement once folded); and QAT gives a conv/dense
    layer followed by a separate ReLU layer no weight quantizer (its LayerReLUQuantize transform),
    so cluster/prune-preserving QAT cannot keep that kernel's clusters and zeros. TF-MOT prunes
    and clusters no SeparableConv2D kernel that QAT keeps: its QAT transform splits the layer
    into a depthwise and a 1x1 Conv2D and trains the pointwise kernel's zeros and clusters away
    (a 2,048-weight pointwise kernel pruned to 50 % had none left after prune+cluster+qat), and
    the LiteRT converter splits it the same way, so the split model is the deployed graph. On
    the bench's Keras 3 residual CNN the SeparableConv2D's pointwise kernel holds 18,432 of its
    32,640 weights; left whole it stayed dense float in every pruned and clustered variant.
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
    changed = _split_separable(config, weights)
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


def _split_separable(config: dict, weights: dict) -> bool:
    """Replace each SeparableConv2D entry of a functional `config` by a DepthwiseConv2D
    (`<name>_depthwise`, no bias, linear) feeding a 1x1 Conv2D named like the layer (so its
    consumers need no rewiring); `weights` (layer name -> weights) follows. True if any."""
    layers = []
    taken = {entry["name"] for entry in config["layers"]}
    for entry in config["layers"]:
        if entry["class_name"] != "SeparableConv2D":
            layers.append(entry)
            continue
        name, conf = entry["name"], entry["config"]
        depthwise_name = name + "_depthwise"
        while depthwise_name in taken:
            depthwise_name += "_"
        taken.add(depthwise_name)
        shared = {key: conf[key] for key in ("trainable", "dtype", "data_format") if key in conf}
        depthwise = {"class_name": "DepthwiseConv2D",
                     "config": shared | {
                         "name": depthwise_name, "kernel_size": conf["kernel_size"],
                         "strides": conf["strides"], "padding": conf["padding"],
                         "dilation_rate": conf.get("dilation_rate", (1, 1)),
                         "depth_multiplier": conf.get("depth_multiplier", 1),
                         "activation": "linear", "use_bias": False,
                         "depthwise_initializer": conf.get("depthwise_initializer"),
                         "depthwise_regularizer": conf.get("depthwise_regularizer"),
                         "depthwise_constraint": conf.get("depthwise_constraint")},
                     "name": depthwise_name, "inbound_nodes": entry["inbound_nodes"]}
        pointwise = {"class_name": "Conv2D",
                     "config": shared | {
                         "name": name, "filters": conf["filters"], "kernel_size": (1, 1),
                         "strides": (1, 1), "padding": "valid", "dilation_rate": (1, 1),
                         "activation": conf.get("activation", "linear"),
                         "use_bias": conf.get("use_bias", True),
                         "kernel_initializer": conf.get("pointwise_initializer"),
                         "bias_initializer": conf.get("bias_initializer"),
                         "kernel_regularizer": conf.get("pointwise_regularizer"),
                         "bias_regularizer": conf.get("bias_regularizer"),
                         "activity_regularizer": conf.get("activity_regularizer"),
                         "kernel_constraint": conf.get("pointwise_constraint"),
                         "bias_constraint": conf.get("bias_constraint")},
                     "name": name, "inbound_nodes": [[[depthwise_name, 0, 0, {}]]]}
        for part in (depthwise, pointwise):  # absent initializers etc.: the layer's defaults
            part["config"] = {k: v for k, v in part["config"].items() if v is not None}
        depthwise_kernel, pointwise_kernel, *bias = weights.pop(name)
        weights[depthwise_name] = [depthwise_kernel]
        weights[name] = [pointwise_kernel, *bias]
        layers += [depthwise, pointwise]
    if len(layers) == len(config["layers"]):
        return False
    config["layers"] = layers
    return True


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
