"""Batched inference of a .tflite classifier through the LiteRT interpreter.

Shared by the evaluation stage and the served pyfunc model, so it imports only numpy, pandas and
ai_edge_litert (no TensorFlow). The input tensor is resized once per batch size (not one image per
invoke); int8/int16 inputs are quantized with the model's own scale and zero point and outputs
dequantized, so callers pass and get floats.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import PipelineInputError

# Images per interpreter call: bounds the memory of one large request.
MAX_BATCH = 256


def open_interpreter(tflite_path: str | Path, num_threads: int | None = 1):
    """(LiteRT interpreter with its tensors allocated, which kernels run it). XNNPACK first (the
    default delegate); a model it refuses to prepare, e.g. with sparse weights, runs on the
    built-in kernels instead."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(tflite_path), num_threads=num_threads)
    try:
        interpreter.allocate_tensors()
        return interpreter, "xnnpack"
    except RuntimeError as error:
        if "failed to prepare" not in str(error) and "delegate" not in str(error).lower():
            raise
    interpreter = Interpreter(
        model_path=str(tflite_path), num_threads=num_threads,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    return interpreter, "builtin"


class TFLiteRunner:
    """Batched inference through the LiteRT interpreter with float inputs and outputs."""

    def __init__(self, tflite_path: str | Path, num_threads: int | None = 1,
                 max_batch: int = MAX_BATCH):
        self._interpreter, self.kernels = open_interpreter(tflite_path, num_threads)
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise PipelineInputError(f"{Path(tflite_path).name} has {len(inputs)} inputs and "
                                     f"{len(outputs)} outputs: a classifier has one of each")
        self._input, self._output = inputs[0], outputs[0]
        self.image_shape = tuple(int(d) for d in self._input["shape"][1:])
        self.input_dtype = np.dtype(self._input["dtype"]).name
        self.feature_count = int(np.prod(self.image_shape))
        self.output_shape = tuple(int(d) for d in self._output["shape"][1:])
        self._batch = None
        self.max_batch = max_batch
        self._lock = threading.Lock()  # one interpreter, possibly many server threads

    def predict_classes(self, images: np.ndarray) -> np.ndarray:
        return self.scores(images).argmax(axis=-1)

    def images(self, model_input: Any) -> np.ndarray:
        """Any accepted input form -> float32 (N, H, W, C)."""
        if isinstance(model_input, pd.DataFrame):
            x = model_input.to_numpy(dtype=np.float32)
        else:
            x = np.asarray(model_input, dtype=np.float32)
        if x.ndim == 1 or x.shape == self.image_shape:
            x = x[None]
        per_image = int(np.prod(x.shape[1:]))
        if x.ndim < 2 or per_image != self.feature_count:
            raise PipelineInputError(
                f"each row must hold one {'x'.join(map(str, self.image_shape))} image "
                f"({self.feature_count} values), got input of shape {x.shape}")
        return x.reshape((-1, *self.image_shape))

    def scores(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, H, W, C) -> float32 (N, K) model outputs, dequantized."""
        count = len(images)
        chunk = min(max(count, 1), self.max_batch)
        quantized = self._quantize(images)
        results = []
        with self._lock:
            self._resize(chunk)
            for start in range(0, count, chunk):
                batch = quantized[start:start + chunk]
                if len(batch) < chunk:  # pad the last chunk instead of resizing again
                    padding = np.zeros((chunk - len(batch), *batch.shape[1:]), batch.dtype)
                    batch = np.concatenate([batch, padding])
                self._interpreter.set_tensor(self._input["index"], batch)
                self._interpreter.invoke()
                output = self._interpreter.get_tensor(self._output["index"])
                results.append(output[:count - start].copy())
        raw = np.concatenate(results) if results else np.zeros((0, *self._output["shape"][1:]))
        return self._dequantize(raw)

    def _resize(self, batch: int) -> None:
        if self._batch != batch:
            self._interpreter.resize_tensor_input(self._input["index"], [batch, *self.image_shape],
                                                   strict=False)
            self._interpreter.allocate_tensors()
            self._batch = batch

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        dtype = self._input["dtype"]
        if not np.issubdtype(dtype, np.integer):
            return x.astype(dtype)
        scale, zero_point = self._input["quantization"]
        if scale:
            x = np.round(x / scale + zero_point)
        info = np.iinfo(dtype)
        return np.clip(x, info.min, info.max).astype(dtype)

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        scale, zero_point = self._output["quantization"]
        if np.issubdtype(y.dtype, np.integer) and scale:
            return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)
        return y.astype(np.float32)
