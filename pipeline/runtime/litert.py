"""Running a .tflite classifier on LiteRT: the one runtime the pipeline evaluates, benchmarks and
serves with.

The runtime is LiteRT's CompiledModel on the XNNPACK CPU accelerator (`runtime="compiled"`), the
API LiteRT recommends for apps. A model it refuses (e.g. int16 inputs, which its Python tensor
buffers cannot be written with) runs on the classic `Interpreter` instead (`runtime="interpreter"`),
and one whose weights XNNPACK cannot prepare (sparse tensors) on the interpreter's built-in
kernels. Every `Runner` says which one runs it (`runtime`, `kernels`, `fallback_reason`), so the
evaluation, the benchmark and the served model record it.

Imports only numpy, pandas and ai_edge_litert (no TensorFlow). The input tensor is resized once
per batch size (not one image per invoke); int8/int16 inputs are quantized with the model's own
scale and zero point and outputs dequantized, so callers pass and get floats.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from pipeline.errors import PipelineInputError, first_line

# Images per call: bounds the memory of one large request.
MAX_BATCH = 256
RUNTIMES = ("compiled", "interpreter")


@contextlib.contextmanager
def _native_logs_quiet():
    """LiteRT's C++ side logs a dozen INFO/WARNING lines to stderr for every environment and
    model it sets up (accelerator and vendor plugin discovery), with no API to lower its level:
    hold them back while it does, unless PIPELINE_LITERT_LOGS=1. A failure still raises, with
    its message, in Python."""
    if os.environ.get("PIPELINE_LITERT_LOGS") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        _flush_c_streams()  # what the C++ side buffered goes to /dev/null too
        os.dup2(saved, 2)
        os.close(saved)


def _flush_c_streams() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=1)
def compiled_environment():
    """LiteRT's runtime environment (accelerator registry, shared libraries, the CompiledModel's
    library): once per process."""
    from ai_edge_litert import compiled_model  # noqa: F401 (its library, loaded with the rest)
    from ai_edge_litert.environment import Environment
    with _native_logs_quiet():
        return Environment.create()


class BatchResizeUnsupported(RuntimeError):
    """The model runs on the CompiledModel one image at a time only."""


class _Compiled:
    """A CompiledModel on XNNPACK: resize(batch), run(array) -> raw output array."""

    def __init__(self, path: str, num_threads: int | None, weight_cache: str | None):
        from ai_edge_litert import compiled_model as litert
        cpu = litert.CpuOptions(num_threads=num_threads or 0,
                                **({"xnnpack_weight_cache_path": weight_cache} if weight_cache else {}))
        environment = compiled_environment()
        with _native_logs_quiet():
            self._model = litert.CompiledModel.from_file(
                path, options=litert.Options(cpu_options=cpu), environment=environment)
        self.fully_accelerated = bool(self._model.is_fully_accelerated())
        self._inputs: list | None = None
        self._outputs: list | None = None

    def resize(self, shape: list[int]) -> None:
        with _native_logs_quiet():  # the first buffers set up LiteRT's runtime once more
            self._model.resize_input_tensor(0, shape, strict=False)
            self._inputs = self._model.create_input_buffers(0)
            self._outputs = self._model.create_output_buffers(0)
        # Some graphs (those only partly on XNNPACK) keep their output at the old batch size:
        # running them would write past the output buffer. Refuse, and stay at batch 1.
        if int(self._outputs[0].get_tensor_details()["shape"][0]) != shape[0]:
            self.resize([1, *shape[1:]])
            raise BatchResizeUnsupported(f"the CompiledModel cannot run this graph at batch {shape[0]}")

    def write(self, batch: np.ndarray) -> None:
        assert self._inputs is not None, "resize() first"
        self._inputs[0].write(np.ascontiguousarray(batch))

    def invoke(self) -> None:
        self._model.run_by_index(0, self._inputs, self._outputs)

    def run(self, batch: np.ndarray, output_shape: tuple[int, ...], output_dtype) -> np.ndarray:
        self.write(batch)
        self.invoke()
        assert self._outputs is not None
        count = int(np.prod(output_shape))
        return np.asarray(self._outputs[0].read(count, output_dtype)).reshape(output_shape)


class _Interpreted:
    """The classic interpreter: XNNPACK first (the default delegate); a model XNNPACK refuses to
    prepare (e.g. sparse weights) runs on the built-in kernels."""

    def __init__(self, path: str, num_threads: int | None):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        self.kernels = "xnnpack"
        self._interpreter = Interpreter(model_path=path, num_threads=num_threads)
        try:
            self._interpreter.allocate_tensors()
        except RuntimeError as error:
            if "failed to prepare" not in str(error) and "delegate" not in str(error).lower():
                raise
            self.kernels = "builtin"
            self._interpreter = Interpreter(
                model_path=path, num_threads=num_threads,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]

    def resize(self, shape: list[int]) -> None:
        self._interpreter.resize_tensor_input(self._input, shape, strict=False)
        self._interpreter.allocate_tensors()

    def write(self, batch: np.ndarray) -> None:
        self._interpreter.set_tensor(self._input, batch)

    def invoke(self) -> None:
        self._interpreter.invoke()

    def run(self, batch: np.ndarray, output_shape: tuple[int, ...], output_dtype) -> np.ndarray:
        self.write(batch)
        self.invoke()
        return self._interpreter.get_tensor(self._output).copy()


class TFLiteRunner:
    """Batched inference of a one-input, one-output .tflite model with float inputs and outputs,
    on the CompiledModel (or the interpreter where the CompiledModel refuses the model)."""

    def __init__(self, tflite_path: str | Path, num_threads: int | None = 1,
                 max_batch: int = MAX_BATCH, runtime: str = "compiled",
                 weight_cache: str | None = None):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
        path = str(tflite_path)
        # The tensors' shapes, types and quantization, read without allocating anything.
        from ai_edge_litert.interpreter import Interpreter
        details = Interpreter(model_path=path)
        inputs, outputs = details.get_input_details(), details.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise PipelineInputError(f"{Path(tflite_path).name} has {len(inputs)} inputs and "
                                     f"{len(outputs)} outputs: a classifier has one of each")
        self._input, self._output = inputs[0], outputs[0]
        self.image_shape = tuple(int(d) for d in self._input["shape"][1:])
        self.input_dtype = np.dtype(self._input["dtype"]).name
        self.feature_count = int(np.prod(self.image_shape))
        self.output_shape = tuple(int(d) for d in self._output["shape"][1:])
        self.fallback_reason: str | None = None
        self.fully_accelerated: bool | None = None
        self._backend: _Compiled | _Interpreted
        self.max_batch = max_batch
        self._batch: int | None = None  # the batch size the backend is resized to
        if runtime == "compiled":
            try:
                self._backend = _Compiled(path, num_threads, weight_cache)
                self.fully_accelerated = self._backend.fully_accelerated
                try:
                    self._backend.resize([min(2, max_batch), *self.image_shape])
                    self._batch = min(2, max_batch)
                except BatchResizeUnsupported:
                    # A graph only partly on XNNPACK keeps batch-1 outputs: one image per run
                    # is still this runtime, only less batched.
                    self.max_batch, self._batch = 1, 1
            except Exception as error:  # the CompiledModel refused it: the interpreter runs it
                runtime, self.fallback_reason = "interpreter", first_line(error, with_type=True)
        if runtime == "interpreter":
            self._backend = _Interpreted(path, num_threads)
            self._batch = None
        self.runtime = runtime
        # Which kernels run the model: XNNPACK (all or part of the graph) or LiteRT's built-in ones.
        self.kernels = (self._backend.kernels if isinstance(self._backend, _Interpreted) else
                        "xnnpack" if self.fully_accelerated else "xnnpack+builtin")
        self._lock = threading.Lock()  # one model, possibly many server threads

    def describe(self) -> dict[str, Any]:
        """Which runtime and kernels run this model (for tags and logs)."""
        return {"runtime": self.runtime, "kernels": self.kernels,
                "runtime_fallback_reason": self.fallback_reason}

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
            if self._batch != chunk:
                self._backend.resize([chunk, *self.image_shape])
                self._batch = chunk
            for start in range(0, count, chunk):
                batch = quantized[start:start + chunk]
                if len(batch) < chunk:  # pad the last chunk instead of resizing again
                    padding = np.zeros((chunk - len(batch), *batch.shape[1:]), batch.dtype)
                    batch = np.concatenate([batch, padding])
                output = self._backend.run(batch, (chunk, *self.output_shape), self._output["dtype"])
                results.append(output[:count - start])
        raw = np.concatenate(results) if results else np.zeros((0, *self.output_shape))
        return self._dequantize(raw)

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


class TFLiteGraph:
    """A .tflite's graph as the interpreter reads it: its ops in execution order, its tensors by
    index, and the constant weight tensor behind an op (the one walk of a graph the runtime
    modules share). `builtin_kernels`: the interpreter's own kernels, no default delegate."""

    def __init__(self, path: str | Path, builtin_kernels: bool = False):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        options = ({"experimental_op_resolver_type":
                    OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES} if builtin_kernels else {})
        self.interpreter = Interpreter(model_path=str(path), **options)
        self.tensors = {t["index"]: t for t in self.interpreter.get_tensor_details()}
        self.ops: list[dict[str, Any]] = self.interpreter._get_ops_details()  # noqa: SLF001 (the only way to walk the graph)
        self.producers = {out: op for op in self.ops for out in op["outputs"]}
        self.graph_inputs = {d["index"] for d in self.interpreter.get_input_details()}

    def is_constant(self, index: int) -> bool:
        """Stored in the file: neither a graph input nor an op's output."""
        return index >= 0 and index not in self.producers and index not in self.graph_inputs

    def weight_index(self, op: dict[str, Any], through_dequantize: bool = False) -> int | None:
        """The constant tensor of `op`'s weights (its second input; with `through_dequantize`,
        what a DEQUANTIZE op feeds it from), or None when that input is computed at run time."""
        if len(op["inputs"]) < 2:
            return None
        index = op["inputs"][1]
        while (through_dequantize and index in self.producers
               and self.producers[index]["op_name"] == "DEQUANTIZE"):
            index = self.producers[index]["inputs"][0]
        return index if self.is_constant(index) else None

    def dtype_names(self) -> set[str]:
        """The element types of the file's tensors ('float32', 'int8', ...)."""
        return {np.dtype(t["dtype"]).name for t in self.tensors.values()}


def input_signature(model_path: str) -> tuple[list[int], np.dtype]:
    """(batch-1 input shape, input dtype) of a model, read without allocating its tensors."""
    from ai_edge_litert.interpreter import Interpreter
    detail = Interpreter(model_path=model_path).get_input_details()[0]
    return [1, *(int(d) for d in detail["shape"][1:])], np.dtype(detail["dtype"])


def open_for_benchmark(model_path: str, shape: list[int], runtime: str, num_threads: int,
                       weight_cache: str | None) -> tuple[Callable, Callable]:
    """(write(array), invoke()) for the measuring child: the same backends as `TFLiteRunner`,
    without its batching and float conversion."""
    backend: _Compiled | _Interpreted = (_Compiled(model_path, num_threads, weight_cache)
                                         if runtime == "compiled" else
                                         _Interpreted(model_path, num_threads))
    backend.resize(shape)
    return backend.write, backend.invoke

