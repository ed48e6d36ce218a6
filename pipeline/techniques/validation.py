"""What the techniques read of the dataset themselves (fitting aside): how many training images
there are, and a model's accuracy on the validation split. One place each, so the dataset's
storage can change without touching the techniques."""
from __future__ import annotations

import numpy as np

from pipeline.sources.models import predict_classes

BATCH_SIZE = 256


def training_image_count(dataset) -> int:
    """Images in the training split (the rules that size fine-tuning start from it)."""
    count = getattr(dataset, "train_count", None)
    return int(count) if count is not None else len(dataset.y_train)


def validation_accuracy(model, dataset) -> float:
    """Share of the validation images `model` classifies right (never the test split: the
    techniques decide on it)."""
    labels = np.asarray(dataset.y_val)
    if not len(labels):
        return float("nan")
    predicted = np.concatenate([predict_classes(model, dataset.x_val[start:start + BATCH_SIZE])
                                for start in range(0, len(labels), BATCH_SIZE)])
    return float(np.mean(predicted == labels))
