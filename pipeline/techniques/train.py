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


def fit(model, dataset: Dataset, *, epochs: int, batch_size: int, callbacks=(), verbose: int = 2,
        augment: bool = False, seed: int = 42):
    """Fit on the training split with validation; Keras prints one progress line per epoch.

    `augment`: each epoch sees a random half of the images flipped left-right, outside the model
    so the deployed graph holds no augmentation layers. (Random shifts as well made the small CNN
    underfit within its epoch budget.) The flips are drawn in NumPy, one epoch at a time: a
    tf.data pipeline with a whole-dataset shuffle buffer stalled 17-19 s between most epochs
    (150 s of 415 s over 12 epochs on Fashion-MNIST)."""
    common = {"batch_size": batch_size, "validation_data": (dataset.x_val, dataset.y_val),
              "callbacks": list(callbacks), "verbose": verbose, "shuffle": True}
    if not augment:
        return model.fit(dataset.x_train, dataset.y_train, epochs=epochs, **common)
    rng = np.random.default_rng(seed)
    history = None
    for epoch in range(epochs):
        x = dataset.x_train.copy()
        flip = rng.random(len(x)) < 0.5
        x[flip] = x[flip][:, :, ::-1]  # (N, H, W, C): reverse the width
        history = model.fit(x, dataset.y_train, epochs=epoch + 1, initial_epoch=epoch, **common)
    return history


def train_baseline(dataset: Dataset, config: PipelineConfig):
    """Train the default CNN on `dataset`; returns the tf_keras model (logits output)."""
    set_seed(config.seed)
    model = build_cnn(dataset.input_shape, dataset.num_classes, name="baseline_cnn")
    steps = math.ceil(len(dataset.x_train) / config.batch_size)
    compile_classifier(model, cosine_schedule(config.learning_rate, config.epochs, steps))
    fit(model, dataset, epochs=config.epochs, batch_size=config.batch_size,
        augment=config.flips, seed=config.seed)
    return model
