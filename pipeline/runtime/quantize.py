"""TFLite/LiteRT conversion: float32, dynamic range, float16, full int8, int16x8.

The converter is `tf.lite.TFLiteConverter` (LiteRT's converter); every mode starts from a Keras
model (tf_keras or Keras 3) or a SavedModel directory.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.files import write_bytes
from pipeline.variants import CONVERTER_MODES


class ConversionError(RuntimeError):
    """The converter refused the model for this mode (the message says why)."""


def make_converter(model=None, saved_model_dir: str | None = None):
    import tensorflow as tf
    if saved_model_dir is not None:
        return tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    return tf.lite.TFLiteConverter.from_keras_model(model)


def configure(converter, mode: str, representative_data=None, *, qat: bool = False):
    """Set the converter up for `mode`. `representative_data` is a generator function yielding
    [batch] lists (needed by int8 and int16x8, except for QAT models which carry their ranges)."""
    import tensorflow as tf
    if mode not in CONVERTER_MODES:
        raise ValueError(f"{mode!r} is not a converter mode (one of {', '.join(CONVERTER_MODES)}); "
                         f"int4 and mixed come from pipeline.runtime.litert_quantizer")
    if mode == "float32":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        if representative_data is not None:
            converter.representative_dataset = representative_data
        elif not qat:
            raise ValueError("int8 needs representative data")
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif mode == "int16x8":
        if representative_data is None:
            raise ValueError("int16x8 needs representative data")
        converter.representative_dataset = representative_data
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return converter


def convert(mode: str, out_path: str | Path, *, model=None, saved_model_dir: str | None = None,
            representative_data=None, qat: bool = False, sparse: bool = False) -> Path:
    """Convert and write `out_path` atomically; returns the path. `sparse` stores pruned weights
    in LiteRT's sparse format (EXPERIMENTAL_SPARSITY): smaller raw files, but XNNPACK refuses
    them and the built-in kernels run them (see `make bench`, section sparse)."""
    converter = configure(make_converter(model, saved_model_dir), mode, representative_data, qat=qat)
    if sparse:
        import tensorflow as tf
        converter.optimizations = [*converter.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    try:
        flatbuffer = converter.convert()
    except Exception as error:  # the converter raises ConverterError and friends
        message = str(error).strip().splitlines()
        raise ConversionError(f"{mode} conversion failed: {message[-1] if message else type(error).__name__}") from error
    return write_bytes(out_path, flatbuffer)
