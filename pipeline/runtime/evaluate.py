"""Accuracy of a .tflite model over the whole test set, batched, on the runtime the benchmark
measures and the served model runs (`pipeline.runtime.litert.TFLiteRunner`: LiteRT's CompiledModel
on XNNPACK, one resize of the input tensor, not one image per invoke)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Evaluation:
    accuracy: float
    per_class_accuracy: dict[str, float]
    keras_agreement: float | None
    test_images: int
    input_dtype: str
    # Which LiteRT runtime and kernels ran it (pipeline.runtime.litert.TFLiteRunner.describe()).
    runtime: dict = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_tflite(model_path: str, data, class_names: list[str],
                    keras_predictions: np.ndarray | None = None, batch_size: int = 256) -> Evaluation:
    """Accuracy, per-class accuracy (recall) and agreement with the source Keras model.

    `data`: `(images, labels)` arrays, or an iterable of such batches (a streamed split,
    `Dataset.batches`): the model runs batch by batch, only the predicted classes are kept."""
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

    from pipeline.runtime.litert import TFLiteRunner
    runner = TFLiteRunner(model_path, num_threads=None, max_batch=batch_size)
    batches = [data] if isinstance(data, tuple) else data
    predictions, truths = [], []
    for images, labels in batches:
        if len(images):
            predictions.append(runner.predict_classes(images))
            truths.append(np.asarray(labels))
    predicted = np.concatenate(predictions) if predictions else np.zeros(0, np.int64)
    y_test = np.concatenate(truths) if truths else np.zeros(0, np.int64)
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
        runtime=runner.describe(),
        confusion=confusion_matrix(y_test, predicted, labels=labels).tolist(),
    )
