"""What the techniques read of the dataset themselves (fitting aside): how many training images
there are, and a model's accuracy on the validation split. One place each, so the dataset's
storage can change without touching the techniques."""
from __future__ import annotations

import numpy as np

from pipeline.sources.models import predict_classes


def training_image_count(dataset) -> int:
    """Images in the training split (the rules that size fine-tuning start from it)."""
    return dataset.train_count


def validation_accuracy(model, dataset) -> float:
    """Share of the validation images `model` classifies right (never the test split: the
    techniques decide on it), streamed a batch at a time."""
    labels = dataset.labels("val")
    if not len(labels):
        return float("nan")
    return float(np.mean(predict_classes(model, dataset.batches("val")) == labels))
