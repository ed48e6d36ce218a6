"""The benchmark's inputs, made here (nothing is downloaded) and kept in benchmarks/.cache/:
ResNet50 (or the quick mode's small stand-in) with untrained weights saved as .h5, and a small
synthetic two-class image folder at the model's input size."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.files import atomic_path

# name -> (builder of the tf_keras application, input side, extra keyword arguments)
ARCHITECTURES = {
    "resnet50": ("ResNet50", 224, {}),
    # Quick mode's stand-in: the same bring-your-own-model path in seconds, not ResNet50.
    "mobilenet-0.25": ("MobileNet", 64, {"alpha": 0.25}),
}
CLASSES = ("horizontal", "vertical")


def model_file(cache_dir: Path, architecture: str) -> Path:
    """The architecture with `weights=None`, 2 classes, saved by tf_keras as .h5 (made once)."""
    builder, side, kwargs = ARCHITECTURES[architecture]
    path = cache_dir / f"{architecture}-{side}-2classes.h5"
    if path.exists():
        return path
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from pipeline import import_tensorflow_quietly
    import_tensorflow_quietly()
    import tf_keras
    model = getattr(tf_keras.applications, builder)(weights=None, input_shape=(side, side, 3),
                                                     classes=2, **kwargs)
    with atomic_path(path) as tmp:
        model.save(str(tmp), save_format="h5")
    return path


def image_folder(cache_dir: Path, side: int, per_class: int, seed: int = 0) -> Path:
    """`per_class` PNGs per class: sinusoidal gratings (horizontal or vertical stripes) of random
    frequency, phase and colours, plus noise; one subfolder per class (made once)."""
    from PIL import Image
    root = cache_dir / f"images-{side}px-{per_class}per-class"
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    coords = np.arange(side, dtype=np.float32)
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            wave = np.sin(2 * np.pi * rng.uniform(3, 12) * coords / side + rng.uniform(0, 2 * np.pi))
            pattern = np.tile(wave[:, None] if label == 0 else wave[None, :], (1, side) if label == 0 else (side, 1))
            low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            image = low + (high - low) * (pattern[..., None] + 1) / 2 + rng.normal(0, 12, (side, side, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    done.touch()
    return root
