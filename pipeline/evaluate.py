"""Accuracy of a .tflite model through the LiteRT interpreter, batched, over the whole test set.

The interpreter's input tensor is resized once to the batch size (not one image per invoke);
int8/int16 inputs are quantized with the model's own scale and zero point.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


def make_interpreter(model_path: str, num_threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter
    return Interpreter(model_path=str(model_path), num_threads=num_threads)


def quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer):
        scale, zero_point = detail["quantization"]
        info = np.iinfo(dtype)
        q = np.round(x / scale + zero_point) if scale else np.round(x)
        return np.clip(q, info.min, info.max).astype(dtype)
    return x.astype(dtype)


def dequantize_output(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.issubdtype(detail["dtype"], np.integer):
        scale, zero_point = detail["quantization"]
        return (y.astype(np.float32) - zero_point) * (scale or 1.0)
    return y.astype(np.float32)


class BatchedRunner:
    """Runs a .tflite classifier on batches of images with one resize of the input tensor."""

    def __init__(self, model_path: str, batch_size: int = 256, num_threads: int | None = None):
        self.interpreter = make_interpreter(model_path, num_threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch_size = batch_size
        shape = list(self.input["shape"])
        self.interpreter.resize_tensor_input(self.input["index"], [batch_size] + shape[1:], strict=False)
        self.interpreter.allocate_tensors()
        # Details change after resizing (shape); quantization parameters do not.
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def scores(self, x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), self.batch_size):
            batch = x[start:start + self.batch_size]
            count = len(batch)
            if count < self.batch_size:  # pad the last batch rather than resize again
                pad = np.zeros((self.batch_size - count,) + batch.shape[1:], dtype=batch.dtype)
                batch = np.concatenate([batch, pad])
            self.interpreter.set_tensor(self.input["index"], quantize_input(batch, self.input))
            self.interpreter.invoke()
            result = self.interpreter.get_tensor(self.output["index"])[:count]
            out.append(dequantize_output(result, self.output))
        return np.concatenate(out)

    def predict_classes(self, x: np.ndarray) -> np.ndarray:
        return self.scores(x).argmax(axis=-1)


@dataclass
class Evaluation:
    accuracy: float
    per_class_accuracy: dict[str, float]
    keras_agreement: float | None
    test_images: int
    input_dtype: str
    confusion: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_tflite(model_path: str, x_test: np.ndarray, y_test: np.ndarray, class_names: list[str],
                    keras_predictions: np.ndarray | None = None, batch_size: int = 256) -> Evaluation:
    """Accuracy, per-class accuracy (recall) and agreement with the source Keras model."""
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

    runner = BatchedRunner(model_path, batch_size=batch_size)
    predicted = runner.predict_classes(x_test)
    labels = list(range(len(class_names)))
    recalls = recall_score(y_test, predicted, labels=labels, average=None, zero_division=0)
    agreement = None
    if keras_predictions is not None:
        agreement = float(accuracy_score(keras_predictions, predicted))
    return Evaluation(
        accuracy=float(accuracy_score(y_test, predicted)),
        per_class_accuracy={name: float(r) for name, r in zip(class_names, recalls)},
        keras_agreement=agreement,
        test_images=int(len(y_test)),
        input_dtype=np.dtype(runner.input["dtype"]).name,
        confusion=confusion_matrix(y_test, predicted, labels=labels).tolist(),
    )
