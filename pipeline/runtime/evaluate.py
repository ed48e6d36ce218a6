"""Accuracy of a .tflite model through the LiteRT interpreter, batched, over the whole test set
(`pipeline.runtime.litert.TFLiteRunner`: one resize of the input tensor, not one image per invoke)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


def make_interpreter(model_path: str, num_threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter
    return Interpreter(model_path=str(model_path), num_threads=num_threads)


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

    from pipeline.runtime.litert import TFLiteRunner
    runner = TFLiteRunner(model_path, num_threads=None, max_batch=batch_size)
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
        input_dtype=runner.input_dtype,
        confusion=confusion_matrix(y_test, predicted, labels=labels).tolist(),
    )
