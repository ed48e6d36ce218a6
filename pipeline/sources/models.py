"""Model builders (the default CNN and its students) and safe loading of users' models.

Our own models are tf_keras (Keras 2) models, because TF Model Optimization needs Keras 2.
Users' models may be Keras 3 (.keras/.h5), tf_keras (.keras/.h5/SavedModel) or a plain SavedModel;
`load_model` tells them apart and never runs code stored in the file (Lambda layers) unless the
user explicitly allows unsafe models.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineInputError, first_line, unreadable_file_errors

# Batch-norm statistics settle within ~50 steps at 0.9 (Keras' 0.99 needs thousands, which left
# quick runs on small subsets with near-chance inference accuracy).
BN_MOMENTUM = 0.9
# Layers that carry Python code which deserialization would execute.
UNSAFE_LAYER_CLASSES = {"Lambda"}


def tf_keras():
    import tf_keras as keras  # noqa: PLC0415 (heavy import, deferred)
    return keras


def build_cnn(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
              dense_units: int = 128, name: str = "cnn"):
    """The default classifier: conv-BN-ReLU blocks with max pooling, dropout, a dense head.

    Two conv blocks (32, 64 filters) for 28x28 inputs; larger inputs get more pooled blocks so
    the flattened head stays small. `width` scales every layer (students use width < 1).
    """
    keras = tf_keras()
    layers = keras.layers
    height = input_shape[0]
    filters = [32, 64]
    while height / (2 ** len(filters)) > 8:
        filters.append(min(filters[-1] * 2, 256))
    model = keras.Sequential(name=name)
    model.add(keras.Input(shape=input_shape))
    for f in filters:
        model.add(layers.Conv2D(max(4, int(round(f * width))), 3, padding="same", use_bias=False))
        model.add(layers.BatchNormalization(momentum=BN_MOMENTUM))
        model.add(layers.ReLU())
        model.add(layers.MaxPooling2D())
        model.add(layers.Dropout(0.1))
    model.add(layers.Flatten())
    model.add(layers.Dense(max(8, int(round(dense_units * width))), use_bias=False))
    model.add(layers.BatchNormalization(momentum=BN_MOMENTUM))
    model.add(layers.ReLU())
    model.add(layers.Dropout(0.3))
    model.add(layers.Dense(num_classes))  # logits; losses use from_logits=True
    return model


def count_macs(model) -> int:
    """Multiply-accumulates of one forward pass through the Conv2D, DepthwiseConv2D,
    SeparableConv2D (depthwise + pointwise kernels) and Dense layers, zeros included."""
    total = 0
    for layer in flat_layers(model):
        if type(layer).__name__ not in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense"):
            continue
        kernels = [w for w in layer.get_weights() if w.ndim >= 2]
        out_shape = layer.output_shape if hasattr(layer, "output_shape") else layer.output.shape
        spatial = int(np.prod([d for d in out_shape[1:-1] if d])) if len(out_shape) > 2 else 1
        total += spatial * sum(int(np.prod(k.shape)) for k in kernels)
    return total


def flat_layers(model):
    """Every leaf layer, nested models flattened."""
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from flat_layers(layer)
        else:
            yield layer


@dataclass
class ModelInfo:
    """What the pipeline needs to know about a model file, read without running its code."""
    path: str
    kind: str                  # "tf_keras" | "keras3" | "saved_model"
    input_shape: tuple[int, ...]
    num_classes: int


def inspect_model(path: str | Path, allow_unsafe: bool = False) -> ModelInfo:
    """Identify the format, refuse unsafe layers, and read the input shape and class count."""
    model = load_model(path, allow_unsafe=allow_unsafe)
    return ModelInfo(str(path), model_kind(path), *io_shape(model, path))


def model_kind(path: str | Path) -> str:
    path = Path(path).expanduser()
    if not path.exists():
        raise PipelineInputError(f"model not found: {path} (give a .keras or .h5 file or a "
                                 "SavedModel directory)")
    if path.is_dir():
        if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
            raise PipelineInputError(f"{path} is a folder without saved_model.pb: give a .keras or "
                                     ".h5 file or a SavedModel directory")
        return "tf_keras" if (path / "keras_metadata.pb").exists() else "saved_model"
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return "keras3" if _keras_zip_version(path).startswith("3") else "tf_keras"
    if suffix in (".h5", ".hdf5"):
        return "keras3" if _h5_attrs(path)[0].startswith("3") else "tf_keras"
    if suffix == ".tflite":
        return "tflite"
    raise PipelineInputError(f"unsupported model file {path.name}: give a .keras, .h5 or float32 "
                             ".tflite file or a SavedModel directory")


def load_model(path: str | Path, allow_unsafe: bool = False):
    """Load a user's model safely. Returns a Keras model (tf_keras or Keras 3) or, for a plain
    SavedModel, a `SavedModelClassifier` with `predict`."""
    path = Path(path).expanduser()
    kind = model_kind(path)
    if not allow_unsafe:
        unsafe = _unsafe_layers(path, kind)
        if unsafe:
            raise PipelineInputError(
                f"model {path.name} contains {', '.join(sorted(unsafe))} layer(s), whose code would "
                "run when loaded: refused. Rebuild it without Lambda layers, or pass "
                "--allow-unsafe-model if you trust the file")
    try:
        if kind == "keras3":
            import keras  # Keras 3 stays importable beside tf_keras
            return keras.saving.load_model(str(path), compile=False, safe_mode=not allow_unsafe)
        if kind == "tf_keras":
            keras = tf_keras()
            kwargs = {"compile": False}
            if path.suffix == ".keras":
                kwargs["safe_mode"] = not allow_unsafe
            return keras.models.load_model(str(path), **kwargs)
        if kind == "tflite":
            return TFLiteModel(path)
        return SavedModelClassifier(path)
    except PipelineInputError:
        raise
    except unreadable_file_errors() as error:  # corrupt/truncated files: many exception types
        raise PipelineInputError(f"cannot load model {path.name}: {first_line(error)} (is the file "
                                 "complete and saved by Keras?)") from None


def io_shape(model, path: str | Path = "model") -> tuple[tuple[int, ...], int]:
    """(input shape without batch, number of classes) of a single-input image classifier."""
    inputs = getattr(model, "inputs", None)
    if inputs is not None and len(inputs) != 1:
        raise PipelineInputError(f"model {Path(path).name} has {len(inputs)} inputs: the pipeline "
                                 "compresses single-input image classifiers")
    graph_only = isinstance(model, (SavedModelClassifier, TFLiteModel))  # shapes without batch
    in_shape = tuple(model.input_shape) if graph_only else tuple(model.input_shape[1:])
    out_shape = tuple(model.output_shape) if graph_only else tuple(model.output_shape[1:])
    if len(in_shape) != 3 or any(d is None for d in in_shape):
        raise PipelineInputError(f"model {Path(path).name} takes inputs of shape {in_shape}: the "
                                 "pipeline needs a fixed (height, width, channels) image input")
    if len(out_shape) != 1 or out_shape[0] is None or out_shape[0] < 2:
        raise PipelineInputError(f"model {Path(path).name} outputs shape {out_shape}: the pipeline "
                                 "needs one score per class (at least 2 classes)")
    return tuple(int(d) for d in in_shape), int(out_shape[0])


class SavedModelClassifier:
    """A SavedModel without Keras metadata: graph only (no Python code runs), via its serving
    signature."""

    def __init__(self, path: Path):
        import tensorflow as tf
        self.path = Path(path)
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures.get("serving_default")
        if signature is None:
            raise PipelineInputError(
                f"SavedModel {path} has no 'serving_default' signature: export it with "
                "model.export(path) (Keras 3) or tf.saved_model.save(model, path, signatures=...)")
        args, kwargs = signature.structured_input_signature
        specs = list(kwargs.values()) + list(args)
        if len(specs) != 1:
            raise PipelineInputError(f"SavedModel {path} takes {len(specs)} inputs: the pipeline "
                                     "compresses single-input image classifiers")
        self._input_name = next(iter(kwargs)) if kwargs else None
        self._signature = signature
        self._loaded = loaded  # keeps the variables alive
        self.input_shape = tuple(specs[0].shape[1:])
        outputs = signature.structured_outputs
        if len(outputs) != 1:
            raise PipelineInputError(f"SavedModel {path} has {len(outputs)} outputs: the pipeline "
                                     "needs one score per class")
        self._output_name = next(iter(outputs))
        self.output_shape = tuple(outputs[self._output_name].shape[1:])

    def predict(self, x: np.ndarray, batch_size: int = 256, verbose: int = 0) -> np.ndarray:
        import tensorflow as tf
        results = []
        for start in range(0, len(x), batch_size):
            batch = tf.constant(x[start:start + batch_size], dtype=tf.float32)
            out = self._signature(**{self._input_name: batch}) if self._input_name else self._signature(batch)
            results.append(out[self._output_name].numpy())
        return np.concatenate(results)


class TFLiteModel:
    """A float32 LiteRT model brought as is (e.g. converted from PyTorch with litert-torch or from
    JAX): run through the LiteRT interpreter; the post-training modes quantize the file itself."""

    def __init__(self, path: Path):
        from pipeline.runtime.litert import TFLiteRunner
        self.path = Path(path)
        self._runner = TFLiteRunner(path)
        quantized = _quantized_tensors(path)
        if quantized:
            raise PipelineInputError(
                f"{path.name} is already quantized ({quantized}): give the float32 .tflite the "
                "pipeline can quantize every way")
        self.input_shape = self._runner.image_shape
        self.output_shape = self._runner.output_shape

    def predict(self, x: np.ndarray, batch_size: int = 256, verbose: int = 0) -> np.ndarray:
        return self._runner.scores(np.asarray(x, np.float32))


def _quantized_tensors(path: Path) -> str:
    """'int8 weights' and the like when the .tflite holds integer or float16 tensors."""
    from pipeline.runtime.litert import TFLiteGraph
    found = sorted(TFLiteGraph(path).dtype_names() & {"int8", "uint8", "int16", "float16", "int4"})
    return ", ".join(f"{k} tensors" for k in found)


def predict_classes(model, images, batch_size: int = 512) -> np.ndarray:
    """Predicted classes of an array of images, or of an iterable of (images, labels) batches
    (a streamed split: `Dataset.batches`)."""
    if isinstance(images, np.ndarray):
        return np.asarray(model.predict(images, batch_size=batch_size, verbose=0)).argmax(axis=-1)
    run = getattr(model, "predict_on_batch", None) or (lambda x: model.predict(x, verbose=0))
    parts = [np.asarray(run(x)).argmax(axis=-1) for x, _ in images if len(x)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _keras_zip_version(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read("metadata.json"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as error:
        raise PipelineInputError(f"cannot load model {path.name}: not a valid .keras archive "
                                 f"({error}); is the file complete?") from None
    return str(metadata.get("keras_version", ""))


def _h5_attrs(path: Path) -> tuple[str, Any]:
    import h5py
    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get("keras_version", b"")
            config = f.attrs.get("model_config")
    except OSError as error:
        raise PipelineInputError(f"cannot load model {path.name}: not a readable HDF5 file "
                                 f"({error}); is the file complete?") from None
    if config is None:
        raise PipelineInputError(f"cannot load model {path.name}: the .h5 file holds no model "
                                 "config (weights only?): save the whole model")
    version = version.decode() if isinstance(version, bytes) else str(version)
    config = config.decode() if isinstance(config, bytes) else config
    return version, json.loads(config)


def _unsafe_layers(path: Path, kind: str) -> set[str]:
    if kind == "tflite":  # a graph of built-in ops: no Python code to run
        return set()
    if path.is_dir():
        metadata = path / "keras_metadata.pb"
        text = metadata.read_bytes().decode("utf-8", "ignore") if metadata.exists() else ""
        return {name for name in UNSAFE_LAYER_CLASSES if f'"class_name": "{name}"' in text}
    if path.suffix.lower() == ".keras":
        try:
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
        except (zipfile.BadZipFile, KeyError, OSError, ValueError) as error:
            raise PipelineInputError(f"cannot load model {path.name}: not a valid .keras archive "
                                     f"({error}); is the file complete?") from None
    else:
        config = _h5_attrs(path)[1]
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") in UNSAFE_LAYER_CLASSES:
                found.add(node["class_name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(config)
    return found
