"""Datasets: Fashion-MNIST IDX files, image folders (one subfolder per class), .npz archives.

Every loader returns a validated `Dataset` of float32 images scaled to [0, 1] (N, H, W, C) and
int64 labels; a validation split is carved from the training split. Prepared datasets are saved as
one .npz so later stages reload them in a second instead of decoding images again.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineInputError, unreadable_file_errors
from pipeline.files import atomic_path

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
# An image folder may hold a few stray or broken files; past this share we refuse the folder.
MAX_UNREADABLE_FRACTION = 0.05


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    source: str = ""
    skipped_files: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def save(self, path: str | Path) -> Path:
        """One .npz (atomic). Images that are 8-bit pixels (k/255 of a range, as every loader
        gives) are stored as uint8 with their range: a quarter of the bytes to move between
        workers; `load` gives back the same float32 values."""
        splits = {"x_train": self.x_train, "x_val": self.x_val, "x_test": self.x_test}
        pixel_range = _byte_range(list(splits.values()))
        if pixel_range is not None:
            low, high = pixel_range
            splits = {k: np.round((v - low) / (high - low) * 255).astype(np.uint8)
                      for k, v in splits.items()}
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            arrays: dict[str, Any] = {
                **splits, "y_train": self.y_train, "y_val": self.y_val, "y_test": self.y_test,
                "class_names": np.array(self.class_names), "source": np.array(self.source),
                "byte_range": np.array(pixel_range if pixel_range else (), np.float32)}
            np.savez(handle, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Dataset":
        with np.load(path, allow_pickle=False) as f:
            byte_range = tuple(f["byte_range"]) if "byte_range" in f.files else ()
            x = {k: _from_bytes(f[k], byte_range) for k in ("x_train", "x_val", "x_test")}
            return cls(x["x_train"], f["y_train"], x["x_val"], f["y_val"], x["x_test"],
                       f["y_test"], [str(c) for c in f["class_names"]], str(f["source"]))

    def in_range(self, low: float, high: float) -> "Dataset":
        """The same images rescaled from [0, 1] to [low, high] (the range a model takes)."""
        if (low, high) == (0.0, 1.0):
            return self
        scale = np.float32(high - low)

        def rescale(x):
            return (x * scale + np.float32(low)).astype(np.float32)
        return Dataset(rescale(self.x_train), self.y_train, rescale(self.x_val), self.y_val,
                       rescale(self.x_test), self.y_test, self.class_names, self.source,
                       self.skipped_files, self.notes)

    def calibration_batches(self, samples: int = 500, seed: int = 0):
        """Representative-data generator for int8/int16x8 calibration (training split only)."""
        rng = np.random.default_rng(seed)
        count = min(samples, len(self.x_train))
        chosen = rng.choice(len(self.x_train), size=count, replace=False)

        def generator():
            for i in chosen:
                yield [self.x_train[i:i + 1].astype(np.float32)]
        return generator


def _byte_range(arrays: list[np.ndarray]) -> tuple[float, float] | None:
    """(low, high) when every value is low + k/255 * (high - low) for an integer k in 0..255
    (float32 exact after the round trip), for the ranges the pipeline uses; else None."""
    for low, high in ((0.0, 1.0), (0.0, 255.0), (-1.0, 1.0)):
        scale = np.float32(high - low)
        if all(_round_trips(x, np.float32(low), scale) for x in arrays):
            return low, high
    return None


def _round_trips(x: np.ndarray, low, scale) -> bool:
    if x.size == 0:
        return True
    q = np.round((x - low) / scale * 255)
    return bool(q.min() >= 0 and q.max() <= 255
                and np.array_equal(_decode(q.astype(np.uint8), low, scale), x))


def _decode(q: np.ndarray, low, scale) -> np.ndarray:
    return (q.astype(np.float32) / np.float32(255) * scale + low).astype(np.float32)


def _from_bytes(x: np.ndarray, byte_range: tuple) -> np.ndarray:
    if not byte_range:
        return x
    low, high = (np.float32(v) for v in byte_range)
    return _decode(x, low, np.float32(high - low))


def load_dataset(spec: str, *, input_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None, train_limit: int | None = None,
                 test_limit: int | None = None, validation_fraction: float = 0.1,
                 seed: int = 42) -> Dataset:
    """Load `spec` ('fashion-mnist', an image folder or an .npz) and validate it.

    `input_shape` (H, W, C) is the model's input: image folders are resized to it; other sources
    must already match it. `num_classes` is the model's output width, checked against the labels.
    """
    if spec in ("fashion-mnist", "fashion_mnist"):
        x_train, y_train, x_test, y_test = _load_fashion_mnist()
        class_names, source, skipped = list(FASHION_MNIST_CLASSES), "fashion-mnist", 0
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise PipelineInputError(
                f"dataset not found: {spec} (give 'fashion-mnist', an image folder with one "
                "subfolder per class, or an .npz with x_train, y_train, x_test, y_test)")
        if path.is_dir():
            x_train, y_train, x_test, y_test, class_names, skipped = _load_image_folder(path, input_shape)
        elif path.suffix == ".npz":
            x_train, y_train, x_test, y_test = _load_npz(path)
            class_names, skipped = None, 0
        else:
            raise PipelineInputError(
                f"dataset {spec} is neither a folder nor an .npz file: give an image folder "
                "(one subfolder per class) or an .npz with x_train, y_train, x_test, y_test")
        source = str(path)

    x_train = _as_images(x_train, "x_train")
    x_test = _as_images(x_test, "x_test")
    y_train = _as_labels(y_train, "y_train", len(x_train))
    y_test = _as_labels(y_test, "y_test", len(x_test))
    if class_names is None:  # .npz: the model's class count, else the largest label + 1
        count = num_classes or int(max(y_train.max(), y_test.max())) + 1
        class_names = [str(i) for i in range(max(count, 1))]
    _check_labels(y_train, y_test, len(class_names), source)

    if input_shape is not None and tuple(x_train.shape[1:]) != tuple(input_shape):
        raise PipelineInputError(
            f"the model takes inputs of shape {tuple(input_shape)} but the dataset {source} has "
            f"images of shape {tuple(x_train.shape[1:])}: use a model built for this data, or an "
            "image folder (which is resized to the model's input)")
    if num_classes is not None and num_classes != len(class_names):
        raise PipelineInputError(
            f"the model has {num_classes} outputs but the dataset {source} has "
            f"{len(class_names)} classes: use a model with one output per class")

    if train_limit:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    if test_limit:
        x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    x_train, y_train, x_val, y_val = _split_validation(x_train, y_train, validation_fraction, seed)
    dataset = Dataset(x_train, y_train, x_val, y_val, x_test, y_test, class_names, source, skipped)
    if skipped:
        dataset.notes.append(f"skipped {skipped} unreadable or non-image files")
    return dataset


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as error:
        raise PipelineInputError(f"cannot read IDX file {path}: {error} (reinstall the dataset: "
                                 "apt-get install --reinstall dataset-fashion-mnist)") from None


def _load_fashion_mnist():
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, stem in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
            candidates = [FASHION_MNIST_DIR / f"{prefix}-{stem}.gz", FASHION_MNIST_DIR / f"{prefix}-{stem}"]
            found = next((c for c in candidates if c.exists()), None)
            if found is None:
                raise PipelineInputError(
                    f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: install it with "
                    "'apt-get install dataset-fashion-mnist' (or set FASHION_MNIST_DIR)")
            files[(split, kind)] = _read_idx(found)
    x_train = files[("train", "images")][..., None].astype(np.float32) / 255.0
    x_test = files[("test", "images")][..., None].astype(np.float32) / 255.0
    return x_train, files[("train", "labels")], x_test, files[("test", "labels")]


def _load_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise PipelineInputError(
                    f"{path} lacks {', '.join(missing)}: an .npz dataset needs x_train, y_train, "
                    "x_test and y_test")
            arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except PipelineInputError:
        raise
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise PipelineInputError(f"{path} holds Python objects (pickled arrays), which are not "
                                     "loaded for safety: save plain numeric arrays") from None
        raise PipelineInputError(f"cannot read {path}: {error}") from None
    except unreadable_file_errors() as error:  # zipfile.BadZipFile, OSError, EOFError...
        raise PipelineInputError(f"cannot read {path} as an .npz archive: {error}") from None
    x_train, y_train, x_test, y_test = arrays
    if x_train.dtype == np.uint8 or (np.issubdtype(x_train.dtype, np.number) and x_train.size
                                      and np.nanmax(x_train) > 1.5):
        # 0..255 pixels: scale like the other loaders.
        x_train, x_test = x_train.astype(np.float32) / 255.0, x_test.astype(np.float32) / 255.0
    return x_train, y_train, x_test, y_test


def _load_image_folder(root: Path, input_shape):
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_dirs) < 2:
        raise PipelineInputError(
            f"image folder {root} has {len(class_dirs)} class subfolder(s): a classifier needs at "
            "least 2 (one subfolder per class, images inside)")
    height, width, channels = (input_shape if input_shape is not None else (None, None, None))
    images, labels, skipped, total = [], [], 0, 0
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.rglob("*")):
            if not file.is_file() or file.name.startswith("."):
                continue
            total += 1
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                skipped += 1
                continue
            try:
                with Image.open(file) as opened:
                    opened.load()
                    if channels is None:
                        channels = 1 if opened.mode in ("L", "1", "I;16", "I", "F") else 3
                    img = opened.convert("L" if channels == 1 else "RGB")
                    if height is None or width is None:
                        width, height = img.size
                    if img.size != (width, height):
                        img = img.resize((width, height), Image.Resampling.BILINEAR)
                    array = np.asarray(img, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
                skipped += 1
                continue
            images.append(array.reshape(height, width, channels))
            labels.append(label)
    if total and skipped / total > MAX_UNREADABLE_FRACTION:
        raise PipelineInputError(
            f"image folder {root}: {skipped} of {total} files are unreadable or not images "
            f"(more than {MAX_UNREADABLE_FRACTION:.0%}): remove them or fix the folder")
    counts: list[int] = (np.bincount(np.array(labels, dtype=np.int64),
                                     minlength=len(class_dirs)).tolist() if labels else [])
    empty = [d.name for d, n in zip(class_dirs, counts) if n == 0] if labels else [d.name for d in class_dirs]
    if empty:
        raise PipelineInputError(f"image folder {root}: class folder(s) {', '.join(empty)} hold no "
                                 "readable images")
    x = np.stack(images)
    y = np.array(labels, dtype=np.int64)
    # Hold out a stratified 20 % as the test split (folders have no predefined test split).
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(y), dtype=bool)
    for label in range(len(class_dirs)):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test_mask[idx[:max(1, len(idx) // 5)]] = True
    if (~test_mask).sum() == 0:
        raise PipelineInputError(f"image folder {root} is too small to split into train and test")
    return x[~test_mask], y[~test_mask], x[test_mask], y[test_mask], [d.name for d in class_dirs], skipped


def _as_images(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.size == 0 or len(x) == 0:
        raise PipelineInputError(f"{name} is empty: the dataset needs training and test images")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise PipelineInputError(f"{name} has dtype {x.dtype}: images must be numeric arrays")
    if x.ndim == 3:
        x = x[..., None]  # (N, H, W) grayscale
    if x.ndim != 4:
        raise PipelineInputError(f"{name} has shape {x.shape}: expected (N, H, W) or (N, H, W, C) images")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise PipelineInputError(f"{name} holds NaN or infinite values in {bad} image(s): clean or "
                                 "drop those images")
    return x


def _as_labels(y, name: str, count: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        y = y.argmax(axis=1)  # one-hot labels
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1:
        raise PipelineInputError(f"{name} has shape {y.shape}: expected one integer label per image")
    if len(y) != count:
        raise PipelineInputError(f"{name} has {len(y)} labels for {count} images: they must match")
    if y.size == 0:
        raise PipelineInputError(f"{name} is empty")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.all(np.equal(np.mod(y, 1), 0)):
            raise PipelineInputError(f"{name} holds non-integer labels: labels must be class indices 0..K-1")
    elif not np.issubdtype(y.dtype, np.integer):
        raise PipelineInputError(f"{name} has dtype {y.dtype}: labels must be integer class indices")
    return y.astype(np.int64)


def _check_labels(y_train, y_test, num_classes: int, source: str) -> None:
    low = int(min(y_train.min(), y_test.min()))
    high = int(max(y_train.max(), y_test.max()))
    if low < 0 or high >= num_classes:
        raise PipelineInputError(
            f"labels out of range in {source}: found {low}..{high}, expected 0..{num_classes - 1}")
    if len(np.unique(y_train)) < 2:
        raise PipelineInputError(f"the training split of {source} has a single class: a classifier "
                                 "needs at least 2")
    counts = np.bincount(y_train, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        # Labels above the first gap are the likely typos (a stray 42 among 0..9).
        strays = [f"{label} ({counts[label]} image{'s' if counts[label] > 1 else ''})"
                  for label in np.flatnonzero(counts) if label > missing[0]][:3]
        raise PipelineInputError(
            f"labels of {source} must be classes 0..K-1, each with training images: "
            f"{missing.size} of {num_classes} classes have none (e.g. "
            f"{', '.join(map(str, missing[:5]))})"
            + (f"; stray label(s) above the gap: {', '.join(strays)}" if strays else "")
            + ": fix the labels, or renumber the classes without gaps")


def _split_validation(x, y, fraction: float, seed: int):
    count = len(x)
    val_count = int(round(count * fraction))
    if count - val_count < 1 or val_count < 1:
        # Too small to split: validate on the training data rather than fail.
        return x, y, x[:max(1, count // 10)], y[:max(1, count // 10)]
    order = np.random.default_rng(seed).permutation(count)
    val_idx, train_idx = order[:val_count], order[val_count:]
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]
