"""Baseline training (the default CNN) and the shared fitting loop used by fine-tuning stages."""
from __future__ import annotations

import math

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.sources.data import Dataset
from pipeline.sources.models import build_cnn, tf_keras


def set_seed(seed: int) -> None:
    import random

    import tensorflow as tf
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def cosine_schedule(learning_rate: float, epochs: int, steps_per_epoch: int):
    keras = tf_keras()
    return keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=max(1, epochs * steps_per_epoch), alpha=0.01)


def compile_classifier(model, learning_rate, *, from_logits: bool = True) -> None:
    keras = tf_keras()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
                  metrics=["accuracy"])


def fit(model, dataset: Dataset, *, epochs: int, batch_size: int, callbacks=(),
        augment: bool = False, seed: int = 42, targets=None):
    """Fit on the training split, validated on the validation split, both streamed from the
    dataset a batch at a time (memory does not grow with the dataset); one progress line per
    epoch, and per-epoch metrics in MLflow inside `pipeline.progress.training`.

    `augment`: each epoch sees a random half of the images flipped left-right, outside the model
    so the deployed graph holds no augmentation layers. (Random shifts as well made the small CNN
    underfit within its epoch budget.) `targets`: a function of a batch (images, labels) giving
    what the loss compares with instead of the labels (distillation: the teacher's outputs)."""
    from pipeline import progress
    train = dataset.tf_dataset("train", batch_size, shuffle=True, seed=seed, flips=augment)
    validation = dataset.tf_dataset("val", max(batch_size, dataset.inference_batch_size))
    if targets is not None:
        train, validation = train.map(targets), validation.map(targets)
    return model.fit(train, validation_data=validation, epochs=epochs, verbose=0,
                     callbacks=[*callbacks, *progress.epoch_callbacks(epochs)])


def train_baseline(dataset: Dataset, config: PipelineConfig):
    """Train the default CNN on `dataset`; returns the tf_keras model (logits output)."""
    set_seed(config.seed)
    model = build_cnn(dataset.input_shape, dataset.num_classes, name="baseline_cnn")
    steps = math.ceil(dataset.train_count / config.batch_size)
    compile_classifier(model, cosine_schedule(config.learning_rate, config.epochs, steps))
    fit(model, dataset, epochs=config.epochs, batch_size=config.batch_size,
        augment=config.flips, seed=config.seed)
    return model
