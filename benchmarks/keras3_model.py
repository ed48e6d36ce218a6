"""A Keras 3 image classifier trained on the full Fashion-MNIST training set, for measuring every
default variant of a Keras 3 model at full size (benchmarks/keras3.md, issue #13):

    .venv/bin/python -m benchmarks.keras3_model --out DIR [--epochs N] [--width W] [--seed S]

writes DIR/keras3_model.keras (Keras 3 format: the pipeline sees `base_model_kind` keras3 and
translates it to tf_keras for the training-time techniques) and DIR/keras3_model.json (layers,
parameters, float32 test accuracy, training time, versions).

The architecture is tests/test_keras3.py's `residual_cnn` (Rescaling [0, 1] -> [-1, 1], a strided
conv, a residual branch DepthwiseConv2D -> 1x1 Conv2D joined by Add, BatchNormalization,
SeparableConv2D, global average pooling, Dropout, Dense softmax) with its channel counts
multiplied by `--width` (default 6: 96/192 channels, 88.6% after 3 epochs; the test's 16/32 are
sized for a quick test, not for the full set). It takes pixels in [0, 1], the pipeline's default
`pixel_range`.

Keras 3 only: importing `pipeline` sets TF_USE_LEGACY_KERAS=1 (tf.keras -> tf_keras), so this
process (which uses the pipeline's Fashion-MNIST loader) trains in a child process whose
environment lacks that variable, and the child refuses to run if it is set or Keras is not 3.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_FILE = "keras3_model.keras"
INFO_FILE = "keras3_model.json"
LEGACY_KERAS = "TF_USE_LEGACY_KERAS"


def residual_cnn(width: int = 6, num_classes: int = 10, bn_momentum: float = 0.9):
    """tests/test_keras3.py's residual_cnn, `width` times its channels (width=1 is the test's)."""
    import keras
    layers = keras.layers
    c1, c2 = 16 * width, 32 * width
    inputs = keras.Input((28, 28, 1), name="image")
    x = layers.Rescaling(2.0, offset=-1.0)(inputs)  # [0, 1] pixels -> [-1, 1]
    x = layers.Conv2D(c1, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=bn_momentum)(x)
    x = layers.ReLU(6.0)(x)
    branch = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    branch = layers.BatchNormalization(momentum=bn_momentum)(branch)
    branch = layers.ReLU(6.0)(branch)
    branch = layers.Conv2D(c1, 1, use_bias=False)(branch)
    branch = layers.BatchNormalization(momentum=bn_momentum)(branch)
    x = layers.Add()([x, branch])
    x = layers.SeparableConv2D(c2, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="residual_cnn")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.keras3_model",
                                     description="Train the Keras 3 classifier of benchmarks/keras3.md "
                                     "on the full Fashion-MNIST training set.")
    parser.add_argument("--out", required=True, help="folder for keras3_model.keras and .json")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=6,
                        help="channel multiplier of the test's residual_cnn (16/32 channels)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data", help=argparse.SUPPRESS)  # internal: the child's .npz
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.child:
        return _train(args)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    # The pipeline's own loader (validated, [0, 1] float32); its validation split is part of the
    # training set, so train on both: the full 60,000 training images. The test split stays unseen.
    import numpy as np

    from pipeline.sources.data import load_dataset
    from pipeline.sources.models import model_kind
    data = load_dataset("fashion-mnist")
    x_train = np.concatenate([data.x_train, data.x_val])
    y_train = np.concatenate([data.y_train, data.y_val])
    print(f"fashion-mnist: {len(x_train)} training images, {len(data.x_test)} test images, "
          f"pixels in [{x_train.min():g}, {x_train.max():g}]", flush=True)

    env = {k: v for k, v in os.environ.items() if k != LEGACY_KERAS}
    with tempfile.TemporaryDirectory(prefix="keras3-data-") as tmp:
        npz = Path(tmp) / "fashion-mnist.npz"
        # [0, 1] pixels are k/255: uint8 keeps the file small and decodes to the same floats.
        np.savez(npz, x_train=np.round(x_train * 255).astype(np.uint8), y_train=y_train,
                 x_test=np.round(data.x_test * 255).astype(np.uint8), y_test=data.y_test,
                 class_names=np.array(data.class_names))
        command = [sys.executable, "-m", "benchmarks.keras3_model", "--child", "--out", str(out),
                   "--data", str(npz), "--epochs", str(args.epochs), "--width", str(args.width),
                   "--batch-size", str(args.batch_size), "--learning-rate",
                   str(args.learning_rate), "--seed", str(args.seed)]
        result = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1])
    if result.returncode:
        print(f"training failed (exit code {result.returncode})", file=sys.stderr)
        return result.returncode

    kind = model_kind(out / MODEL_FILE)
    if kind != "keras3":
        print(f"{out / MODEL_FILE} is a {kind} model, not Keras 3", file=sys.stderr)
        return 1
    info = json.loads((out / INFO_FILE).read_text())
    print(f"saved {out / MODEL_FILE} ({kind}): {info['parameters']} parameters, float32 test "
          f"accuracy {info['test_accuracy']:.4f}, trained in {info['train_seconds']:.0f} s")
    return 0


def _train(args) -> int:
    """The child: Keras 3 only, never tf_keras."""
    if LEGACY_KERAS in os.environ:
        print(f"{LEGACY_KERAS} is set: refusing to train (this must be a Keras 3 process)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    if not keras.__version__.startswith("3"):
        print(f"keras {keras.__version__} is not Keras 3", file=sys.stderr)
        return 2
    import tensorflow as tf

    with np.load(args.data, allow_pickle=False) as f:
        x_train = f["x_train"].astype(np.float32) / np.float32(255)
        x_test = f["x_test"].astype(np.float32) / np.float32(255)
        y_train, y_test = f["y_train"], f["y_test"]
        num_classes = len(f["class_names"])

    keras.utils.set_random_seed(args.seed)
    model = residual_cnn(args.width, num_classes)
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.summary(line_length=120)
    start = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
                        shuffle=True, verbose=2)
    train_seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)

    out = Path(args.out)
    model.save(out / MODEL_FILE)
    info = {
        "model_file": str(out / MODEL_FILE),
        "name": model.name,
        "architecture": "tests/test_keras3.py residual_cnn, channels x width",
        "width": args.width,
        "input_shape": list(model.input_shape[1:]),
        "pixel_range": "0:1",
        "parameters": int(model.count_params()),
        "trainable_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "layers": [{"name": layer.name, "class": type(layer).__name__,
                    "parameters": int(layer.count_params())} for layer in model.layers],
        "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "schedule": "cosine decay to 5%", "seed": args.seed,
        "train_images": int(len(x_train)), "test_images": int(len(x_test)),
        "train_accuracy_last_epoch": float(history.history["accuracy"][-1]),
        "test_accuracy": float(accuracy),
        "train_seconds": round(train_seconds, 1),
        "keras": keras.__version__, "tensorflow": tf.__version__,
        "backend": keras.backend.backend(),
        f"{LEGACY_KERAS}_set": LEGACY_KERAS in os.environ,
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    print(f"test accuracy {accuracy:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
