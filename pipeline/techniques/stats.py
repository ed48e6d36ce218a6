"""Weight figures of a model seen through TF-MOT's wrappers: kernel sparsity, distinct values,
MACs (`kernel_stats`) and parameter count (`keras_params`); `_unwrap` finds the Keras layer inside
a wrapper.
"""
from __future__ import annotations

import numpy as np

from pipeline.sources.models import flat_layers, tf_keras


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
