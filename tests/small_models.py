"""Small models and learnable synthetic image sets for the technique tests (issue 22): models of a
few thousand weights on a few hundred images, the size where defaults measured on the default CNN
and Fashion-MNIST (1.7 MB, 54,000 images) stopped transferring."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = ("disc", "square", "cross", "ring", "bar", "triangle", "diamond", "dots", "frame", "plus")


def shape_images(path: Path, *, classes: int = 3, train: int = 480, test: int = 120,
                 size: int = 32, channels: int = 3, seed: int = 0) -> Path:
    """An .npz of `classes` shape classes (filled disc, square, cross...): each image one shape of
    random colour, size and position on a random-coloured background, plus pixel noise; pixels in
    0..1. Learnable by a small CNN, but not from colour or brightness alone."""
    rng = np.random.default_rng(seed)
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float32)

    def mask(kind: str, cy: float, cx: float, r: float) -> np.ndarray:
        dy, dx = grid_y - cy, grid_x - cx
        return {
            "disc": dy ** 2 + dx ** 2 <= r ** 2,
            "square": (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85),
            "cross": ((np.abs(dy - dx) <= 1.5) | (np.abs(dy + dx) <= 1.5)) & (np.abs(dy) <= r)
            & (np.abs(dx) <= r),
            "ring": np.abs(np.sqrt(dy ** 2 + dx ** 2) - r * 0.8) <= 1.5,
            "bar": (np.abs(dy) <= r) & (np.abs(dx) <= 2),
            "triangle": (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.55),
            "diamond": np.abs(dy) + np.abs(dx) <= r,
            "dots": ((dy - r / 2) ** 2 + (dx - r / 2) ** 2 <= 4) | ((dy + r / 2) ** 2
                                                                    + (dx + r / 2) ** 2 <= 4),
            "frame": (np.maximum(np.abs(dy), np.abs(dx)) <= r)
            & (np.maximum(np.abs(dy), np.abs(dx)) >= r - 2),
            "plus": ((np.abs(dy) <= 1.5) | (np.abs(dx) <= 1.5)) & (np.abs(dy) <= r)
            & (np.abs(dx) <= r),
        }[kind]

    def images(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(count) % classes
        rng.shuffle(labels)
        x = np.empty((count, size, size, channels), np.float32)
        for i, label in enumerate(labels):
            r = rng.uniform(size * 0.18, size * 0.3)
            cy, cx = rng.uniform(r + 1, size - r - 1, 2)
            background = rng.uniform(0.0, 0.5, channels)
            colour = rng.uniform(0.5, 1.0, channels)
            image = np.broadcast_to(background, (size, size, channels)).copy()
            image[mask(SHAPES[label], cy, cx, r)] = colour
            x[i] = np.clip(image + rng.normal(0, 0.08, image.shape), 0, 1)
        return x, labels.astype(np.int64)

    x_train, y_train = images(train)
    x_test, y_test = images(test)
    path = Path(path)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def keras3_residual_separable(input_shape, classes: int, *, dense_units: int = 16):
    """The issue's model: a Keras 3 functional model of about 5,000 weights: Rescaling to [-1, 1],
    conv + BatchNorm, a depthwise + pointwise residual block (Add), two separable convs, dropout
    and a small Dense head."""
    import keras
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = layers.Rescaling(2.0, offset=-1.0)(inputs)
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    branch = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    branch = layers.BatchNormalization()(branch)
    branch = layers.ReLU()(branch)
    branch = layers.Conv2D(16, 1, use_bias=False)(branch)
    branch = layers.BatchNormalization()(branch)
    x = layers.Add()([x, branch])
    x = layers.SeparableConv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.SeparableConv2D(64, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Dense(dense_units, activation="relu")(x)
    outputs = layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="residual_separable")


def tf_keras_plain_cnn(input_shape, classes: int):
    """A tf_keras Sequential CNN of about 10,000 weights: two conv + BatchNorm blocks, flatten,
    a tiny Dense head with logits."""
    import tf_keras
    layers = tf_keras.layers
    return tf_keras.Sequential([
        tf_keras.Input(input_shape),
        layers.Conv2D(12, 3, padding="same", use_bias=False), layers.BatchNormalization(),
        layers.ReLU(), layers.MaxPooling2D(),
        layers.Conv2D(24, 3, padding="same", use_bias=False), layers.BatchNormalization(),
        layers.ReLU(), layers.MaxPooling2D(4),
        layers.Flatten(), layers.Dropout(0.2),
        layers.Dense(classes)], name="plain_cnn")


def tf_keras_depthwise_residual(input_shape, classes: int):
    """A tf_keras functional MobileNet-like model of about 4,000 weights: depthwise + 1x1
    pointwise blocks with a residual Add, global pooling, Dense(8) then the class logits."""
    import tf_keras
    layers = tf_keras.layers
    inputs = tf_keras.Input(input_shape)
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    for filters, stride in ((32, 2), (32, 1)):
        y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(x)
        y = layers.BatchNormalization()(y)
        y = layers.ReLU(6.0)(y)
        y = layers.Conv2D(filters, 1, use_bias=False)(y)
        y = layers.BatchNormalization()(y)
        x = layers.Add()([x, y]) if stride == 1 else y
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(8, activation="relu")(x)
    outputs = layers.Dense(classes)(x)
    return tf_keras.Model(inputs, outputs, name="depthwise_residual")


# name: (builder, classes, image side, Keras 3?); 540 training images each (as in issue 22).
MODELS = {
    "keras3-residual-separable-3": (keras3_residual_separable, 3, 32, True),
    "tf-keras-depthwise-residual-10": (tf_keras_depthwise_residual, 10, 24, False),
    "tf-keras-plain-cnn-3": (tf_keras_plain_cnn, 3, 32, False),
}


def train_small_model(name: str, folder: Path, *, seed: int = 3):
    """(dataset, saved tf_keras model path, its test accuracy) for MODELS[name]: its synthetic
    shapes (540 training and 100 test images per class) and the model trained 40 epochs (a
    Keras 3 model is translated to tf_keras, as the pipeline does)."""
    import numpy as np

    import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
    from pipeline.sources.data import load_dataset
    from pipeline.sources.models import load_model, predict_classes
    from pipeline.techniques.train import set_seed

    builder, classes, side, keras3 = MODELS[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = load_dataset(str(shape_images(folder / "shapes.npz", classes=classes, train=540,
                                         test=100 * classes, size=side, seed=classes)))
    x_train, y_train = data.arrays("train")
    x_val, _ = data.arrays("val")
    set_seed(seed)
    if keras3:
        import keras
        keras.utils.set_random_seed(seed)
        model3 = builder(data.input_shape, classes)
        model3.compile(optimizer=keras.optimizers.Adam(3e-3),
                       loss="sparse_categorical_crossentropy")
        model3.fit(x_train, y_train, epochs=40, batch_size=32, verbose=0)
        model = translated(model3, x_val)
    else:
        import tf_keras
        model = builder(data.input_shape, classes)
        model.compile(optimizer=tf_keras.optimizers.Adam(3e-3),
                      loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x_train, y_train, epochs=40, batch_size=32, verbose=0)
    path = folder / "base.keras"
    model.save(path)
    base = load_model(path)
    accuracy = float(np.mean(predict_classes(base, data.batches("test")) == data.labels("test")))
    return data, str(path), accuracy


def translated(model3, x_check=None):
    """A Keras 3 model as the pipeline's tf_keras translation (checked on `x_check`)."""
    import numpy as np

    from pipeline.sources.keras3 import translate
    x = np.zeros((4, *model3.input_shape[1:]), np.float32) if x_check is None else x_check[:64]
    return translate(model3, x, tolerance=1e-4)[0]
