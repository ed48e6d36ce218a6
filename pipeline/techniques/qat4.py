"""int4 quantization-aware training (`qat4`): fine-tune with the Dense kernels fake-quantized
exactly as the `int4` mode will store them, then leave each kernel on that int4 grid, so the
quantizer's rounding costs nothing.

The `int4` mode (pipeline.runtime.litert_quantizer) gives FULLY_CONNECTED weights int4 with one
symmetric scale per output channel, `scale = max|w| / 7`, `q = clip(rint(w / scale), -8, 7)`.
Here every top-level Dense kernel ([in, out]) is seen through that function while training
(straight-through estimator: the forward pass uses the int4 values, the gradient updates the
float kernel as if there were no rounding), and is replaced by its int4 values at the end. The
quantizer then finds the same scale (the largest weight of a channel is exactly 7 * scale) and the
same integers: the int4 model computes what the fine-tuned Keras model computes.

The other weighted layers (convolutions, which the int4 mode stores in int8) keep what earlier
techniques made of them: after clustering they train their shared values only (each weight keeps
its cluster, so the kernel keeps its clusters and zeros), otherwise they are frozen. Trained
freely, a pruned and clustered convolution lost its zeros and clusters (its int8 weights gzipped
47 % larger); frozen, the model recovered 0.06-0.11 pts less than with its shared values training.

TF-MOT's QAT is int8 only, so this is not a TF-MOT wrapper but two small Keras ones. After
pruning, pruned weights stay zero (the mask is fixed when the wrapper is made). After clustering,
a Dense kernel's 16 shared values become up to 15 values per output channel on that channel's
grid: int4 holds 16 levels per channel anyway.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import TechniqueError
from pipeline.sources.models import tf_keras
from pipeline.techniques.backoff import configured
from pipeline.techniques.finetune import tfmot_kernel_layers, wrap_and_finetune
from pipeline.techniques.graph import fuse_layers
from pipeline.techniques.qat import relax, settings  # noqa: F401 (QAT's fine-tuning plan)

NAME = "qat4"
# Backing off: each retry trains twice as long (the rounding is fixed; only recovery can help).
# Int4 rounding moves weights much further than int8's, so the rest of the kernel needs a real
# step size to compensate: after prune+cluster on the default CNN, 0.2 recovered 0.04-0.09 pts
# more than 0.05 (QAT's int8 rate is 0.01).
LEARNING_RATE_SCALE = 0.2
LEVELS = (-8, 7)   # signed int4
MAX_LEVEL = 7      # symmetric: the largest magnitude maps to +-7


def apply(model, dataset, config, *, applied: tuple[str, ...] = ()):
    keras = tf_keras()
    config = configured(config, settings(model, dataset, config))
    model = fuse_layers(model)
    targets = {layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)}
    if not targets:
        raise TechniqueError(
            f"{NAME}: model {model.name!r} has no top-level Dense layer, the layers the int4 mode "
            "stores in int4; use int4 without qat4, or int8 with qat")
    keep_zeros = "prune" in applied
    # The other kernels train their shared values after clustering, else stay (module docstring).
    shared = {layer.name for layer in tfmot_kernel_layers(model)
              if layer.name not in targets and "cluster" in applied
              and type(layer).__name__ in ("Conv1D", "Conv2D", "Conv3D")}
    frozen = [layer for layer in model.layers if layer.name not in targets | shared
              and layer.trainable and any("kernel" in w.name for w in layer.weights)]
    for layer in frozen:
        layer.trainable = False
    int4_weights, shared_values = _wrapper_classes()

    def wrap(layer):
        if layer.name in targets:
            return int4_weights(layer, keep_zeros=keep_zeros)
        return shared_values(layer, keep_zeros=keep_zeros)

    wrapped = wrap_and_finetune(
        model, targets | shared, wrap, NAME, dataset, config,
        learning_rate=config.learning_rate * LEARNING_RATE_SCALE)
    for layer in frozen:
        layer.trainable = True
    # The wrappers trained the layers of `model` itself (clone_model kept them): write the
    # kernels they computed into those layers.
    for layer in wrapped.layers:
        if isinstance(layer, (int4_weights, shared_values)):
            layer.layer.kernel.assign(layer.kernel_value())
    return model


def _wrapper_classes():
    """The Keras wrapper classes (defined on first use: TensorFlow is imported lazily)."""
    global _WRAPPERS
    if _WRAPPERS is None:
        import tensorflow as tf

        keras = tf_keras()

        class KernelWrapper(keras.layers.Wrapper):  # type: ignore[name-defined]
            """Runs the wrapped layer with `kernel_tensor()` in place of its kernel."""

            def __init__(self, layer, keep_zeros: bool = False, **kwargs):
                super().__init__(layer, name=kwargs.pop("name", f"{NAME}_{layer.name}"), **kwargs)
                self._mask = (layer.kernel.numpy() != 0).astype(np.float32) if keep_zeros else None

            def kernel_tensor(self):
                raise NotImplementedError

            def kernel_value(self) -> np.ndarray:
                return self.kernel_tensor().numpy()

            def call(self, inputs):  # Dense and Conv calls take no `training`
                variable = self.layer.kernel
                kernel = self.kernel_tensor()
                if self._mask is not None:
                    kernel = kernel * tf.constant(self._mask)
                # As TF-MOT's wrappers do: the layer's own call, with the kernel swapped.
                object.__setattr__(self.layer, "kernel", kernel)
                try:
                    return self.layer.call(inputs)
                finally:
                    object.__setattr__(self.layer, "kernel", variable)

            def compute_output_shape(self, input_shape):
                return self.layer.compute_output_shape(input_shape)

        class Int4Weights(KernelWrapper):
            """The kernel seen through int4 rounding (straight-through)."""

            def rounded(self):
                """The kernel as the int4 mode stores it (tf.round, like np.rint, rounds half
                to even), in float32."""
                kernel = self.layer.kernel
                flat = tf.reshape(kernel, (-1, kernel.shape[-1]))
                scale = tf.maximum(tf.reduce_max(tf.abs(flat), axis=0), 1e-9) / MAX_LEVEL
                return tf.clip_by_value(tf.round(kernel / scale), *LEVELS) * scale

            def kernel_tensor(self):
                kernel = self.layer.kernel
                return kernel + tf.stop_gradient(self.rounded() - kernel)

            def kernel_value(self) -> np.ndarray:
                # The rounded values themselves: kernel + (rounded - kernel) may be 1 ulp off.
                value = self.rounded().numpy()
                return value * self._mask if self._mask is not None else value

        class SharedValues(KernelWrapper):
            """A clustered kernel whose distinct values train and whose indices stay."""

            def build(self, input_shape):
                super().build(input_shape)
                values, indices = np.unique(self.layer.kernel.numpy(), return_inverse=True)
                self._indices = indices.reshape(self.layer.kernel.shape).astype(np.int32)
                self.values = self.add_weight(
                    "values", shape=values.shape, trainable=True,
                    initializer=keras.initializers.Constant(values.astype(np.float32)))

            def kernel_tensor(self):
                return tf.gather(self.values, tf.constant(self._indices))

        _WRAPPERS = (Int4Weights, SharedValues)
    return _WRAPPERS


_WRAPPERS: tuple[Any, Any] | None = None
