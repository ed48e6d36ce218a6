"""Baseline training (the default CNN) and the shared fitting loop used by fine-tuning stages."""
from __future__ import annotations

import math

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.data import Dataset
from pipeline.models import build_cnn, tf_keras


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
    """Fit on the training split with validation; Keras prints one progress line per epoch."""
    if augment:
        data = _augmented(dataset, batch_size, seed)
        return model.fit(data, epochs=epochs, validation_data=(dataset.x_val, dataset.y_val),
                         callbacks=list(callbacks), verbose=verbose)
    return model.fit(dataset.x_train, dataset.y_train, batch_size=batch_size, epochs=epochs,
                     validation_data=(dataset.x_val, dataset.y_val), callbacks=list(callbacks),
                     verbose=verbose, shuffle=True)


def _augmented(dataset: Dataset, batch_size: int, seed: int):
    """Random horizontal flips, outside the model so the deployed graph holds no augmentation
    layers. (Random shifts as well made the small CNN underfit within its epoch budget.)"""
    import tensorflow as tf

    def augment(image, label):
        return tf.image.random_flip_left_right(image, seed=seed), label

    return (tf.data.Dataset.from_tensor_slices((dataset.x_train, dataset.y_train))
            .shuffle(len(dataset.x_train), seed=seed, reshuffle_each_iteration=True)
            .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def train_baseline(dataset: Dataset, config: PipelineConfig):
    """Train the default CNN on `dataset`; returns the tf_keras model (logits output)."""
    set_seed(config.seed)
    model = build_cnn(dataset.input_shape, dataset.num_classes, name="baseline_cnn")
    steps = math.ceil(len(dataset.x_train) / config.batch_size)
    compile_classifier(model, cosine_schedule(config.learning_rate, config.epochs, steps))
    fit(model, dataset, epochs=config.epochs, batch_size=config.batch_size,
        augment=config.flips, seed=config.seed)
    return model
