"""Datasets, streamed: Fashion-MNIST, image folders (one subfolder per class), `s3://` prefixes
of images, TFRecord shards of `tf.train.Example`s, and .npz archives.

`load_dataset` reads a source's index once (file names, sizes, labels; each image decoded once
to check it, unreadable ones skipped and counted), splits it deterministically into train /
validation / test from the index and the seed, and returns a `Dataset`: a view that reads images
a batch at a time, never the whole set. Its `manifest` (the source URI, the files, the splits,
a content digest; no pixels) is what travels between tasks: `Dataset.save` writes it as a small
JSON file and `Dataset.load` opens the same view on another worker, which reads the source again
(an `s3://` source through its own cache, keyed by the digest).

Images come out as float32 (N, H, W, C) in the model's pixel range (0..1 unless the model takes
0..255 or -1..1), resized to the model's input, with int64 labels.
"""
from __future__ import annotations

import copy

import gzip
import hashlib
import json
import logging
import os
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineInputError, unreadable_file_errors, without_credentials
from pipeline.files import write_text
from pipeline.sources.readers import (ArrayReader, FileReader, TFRecordReader, UnreadableImage,
                                      decode_workers, image_geometry, index_tfrecord,
                                      is_tfrecord)

log = logging.getLogger("pipeline.sources.data")

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
# An image folder may hold a few stray or broken files; past this share we refuse the folder.
MAX_UNREADABLE_FRACTION = 0.05
# Image folders and unsplit TFRecords hold out this share of each class as the test split.
TEST_FRACTION = 0.2
SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1


class Dataset:
    """A dataset's index and splits (the manifest) and a reader of its images."""

    def __init__(self, manifest: dict[str, Any], reader):
        self.manifest = manifest
        self.reader = reader
        self._labels = np.asarray(manifest["labels"], dtype=np.int64)
        self._locators = manifest.get("locators")
        self._ids = {split: np.asarray(manifest["splits"][split], dtype=np.int64) for split in SPLITS}
        low, high = manifest["pixel_range"]
        self._low, self._scale = np.float32(low), np.float32(high - low)

    # -- what it is
    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["image_shape"])

    @property
    def source(self) -> str:
        return self.manifest["source"]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def skipped_files(self) -> int:
        return int(self.manifest.get("skipped", 0))

    @property
    def notes(self) -> list[str]:
        return list(self.manifest.get("notes", []))

    def count(self, split: str) -> int:
        return len(self._ids[split])

    @property
    def train_count(self) -> int:
        return self.count("train")

    @property
    def val_count(self) -> int:
        return self.count("val")

    @property
    def test_count(self) -> int:
        return self.count("test")

    def sample_train(self, count: int, seed: int = 0) -> "Dataset":
        """A view with `count` of the training images (chosen by `seed`, kept in order; the
        validation and test splits unchanged), or this dataset when it has no more."""
        if count <= 0 or count >= self.train_count:
            return self
        view = copy.copy(self)
        chosen = np.random.default_rng(seed).choice(len(self._ids["train"]), count, replace=False)
        view._ids = {**self._ids, "train": self._ids["train"][np.sort(chosen)]}
        return view

    def labels(self, split: str) -> np.ndarray:
        """The split's labels, in the order `batches` gives its images (no image is read)."""
        return self._labels[self._ids[split]]

    # -- reading
    @property
    def inference_batch_size(self) -> int:
        """Images per batch when a model only reads them (evaluation, predictions): 256, fewer
        for large images, so a batch holds at most 4M float32 values (16 MB; 27 images at 224 x
        224 x 3) and the runtime's activations for it stay small."""
        return int(max(8, min(256, 4 * 2 ** 20 // int(np.prod(self.input_shape)))))

    def batches(self, split: str, batch_size: int | None = None, *, shuffle: bool = False,
                seed: int = 0,
                flips: bool = False, limit: int | None = None,
                ids: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images, labels) batches of a split (or of the item `ids` given), in order or shuffled
        by `seed`; `flips` mirrors a random half of the images left-right. Decoding runs ahead on
        a few threads, at most two batches in flight: memory does not grow with the dataset.
        `batch_size` defaults to `inference_batch_size`."""
        batch_size = batch_size or self.inference_batch_size
        chosen = self._ids[split] if ids is None else np.asarray(ids, dtype=np.int64)
        if limit is not None:
            chosen = chosen[:limit]
        rng = np.random.default_rng(seed)
        if shuffle:
            chosen = chosen[rng.permutation(len(chosen))]
        chunks = [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
        if isinstance(self.reader, ArrayReader):
            for chunk in chunks:
                yield self._finish(self.reader.read(self._locate(chunk)), self._labels[chunk],
                                   rng if flips else None)
            return
        with ThreadPoolExecutor(decode_workers(), thread_name_prefix="decode") as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append((chunk, [pool.submit(self._read_one, i) for i in chunk]))
                if len(pending) > 2:
                    yield self._gather(pending.popleft(), rng if flips else None)
            while pending:
                yield self._gather(pending.popleft(), rng if flips else None)

    def arrays(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first `limit` images of a split as arrays: for small takes (a parity check, a
        served example, tests), not for whole splits of a large dataset."""
        parts = list(self.batches(split, limit=limit))
        if not parts:
            return np.zeros((0, *self.input_shape), np.float32), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def tf_dataset(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                   flips: bool = False):
        """A `tf.data.Dataset` of (images, labels) batches for Keras' fit/evaluate: each pass
        (epoch) reshuffles with the next seed. Its cardinality is known, so Keras shows progress."""
        import tensorflow as tf
        epochs = iter(range(seed, 2 ** 31))

        def generate():
            yield from self.batches(split, batch_size, shuffle=shuffle, seed=next(epochs),
                                    flips=flips)
        signature = (tf.TensorSpec((None, *self.input_shape), tf.float32),
                     tf.TensorSpec((None,), tf.int64))
        steps = -(-self.count(split) // batch_size)
        return (tf.data.Dataset.from_generator(generate, output_signature=signature)
                .apply(tf.data.experimental.assert_cardinality(steps)).prefetch(1))

    def calibration_batches(self, samples: int = 500, seed: int = 0):
        """Representative-data generator for int8/int16x8 calibration: `samples` training images
        chosen by `seed`, one per yield, read as they are consumed."""
        train = self._ids["train"]
        chosen = np.random.default_rng(seed).choice(len(train), size=min(samples, len(train)),
                                                    replace=False)

        def generator():
            for x, _ in self.batches("train", 32, ids=train[chosen]):
                for i in range(len(x)):
                    yield [x[i:i + 1]]
        return generator

    # Whole splits as arrays, for tests and small data; pipeline code streams with `batches`.
    x_train = property(lambda self: self.arrays("train")[0])
    y_train = property(lambda self: self.labels("train"))
    x_val = property(lambda self: self.arrays("val")[0])
    y_val = property(lambda self: self.labels("val"))
    x_test = property(lambda self: self.arrays("test")[0])
    y_test = property(lambda self: self.labels("test"))

    def limited(self, *, train: int | None = None, val: int | None = None,
                test: int | None = None) -> "Dataset":
        """The same dataset with the first N images of some splits (quick fine-tunings, tests)."""
        manifest = dict(self.manifest)
        manifest["splits"] = {split: self.manifest["splits"][split][:limit]
                              for split, limit in zip(SPLITS, (train, val, test))}
        return Dataset(manifest, self.reader)

    # -- persistence: the manifest only
    def save(self, path: str | Path) -> Path:
        """The manifest as compact JSON (atomic): what another task opens with `Dataset.load`."""
        return write_text(path, json.dumps(self.manifest, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> "Dataset":
        manifest = json.loads(Path(path).read_text())
        if manifest.get("version") != MANIFEST_VERSION:
            raise PipelineInputError(f"{path} is not a dataset manifest of this pipeline")
        return cls(manifest, _reader(manifest))

    @classmethod
    def from_arrays(cls, x_train, y_train, x_val, y_val, x_test, y_test, class_names,
                    source: str = "arrays") -> "Dataset":
        """An in-memory dataset with given splits (tests, the Python API's arrays)."""
        parts = [_as_images(x, n) for x, n in ((x_train, "x_train"), (x_val, "x_val"),
                                               (x_test, "x_test"))]
        labels = [_as_labels(y, n, len(x)) for y, x, n in
                  ((y_train, parts[0], "y_train"), (y_val, parts[1], "y_val"), (y_test, parts[2], "y_test"))]
        ends = np.cumsum([0] + [len(x) for x in parts])
        manifest = _manifest("arrays", source, "", list(class_names), parts[0].shape[1:],
                             np.concatenate(labels), None,
                             {split: list(range(int(ends[i]), int(ends[i + 1])))
                              for i, split in enumerate(SPLITS)},
                             digest=_digest_arrays(parts, labels))
        return cls(manifest, ArrayReader(np.concatenate(parts)))

    # -- internals
    def _locate(self, ids: np.ndarray) -> list[Any]:
        if self._locators is None:
            return ids.tolist()
        return [self._locators[i] for i in ids]

    def _read_one(self, item: int):
        try:
            return self.reader.read_one(self._locate(np.array([item]))[0])
        except UnreadableImage as error:
            log.warning("dataset %s: skipping item %s, now unreadable: %s", self.source,
                        self._locate(np.array([item]))[0], error)
            return None
        except FileNotFoundError:
            raise PipelineInputError(
                f"dataset {self.source} changed since the run indexed it (a file is gone): run "
                "again on the current data") from None

    def _gather(self, submitted: tuple[np.ndarray, list], rng) -> tuple[np.ndarray, np.ndarray]:
        chunk, futures = submitted
        images = [f.result() for f in futures]
        kept = [i for i, image in enumerate(images) if image is not None]
        x = np.stack([images[i] for i in kept]) if kept else \
            np.zeros((0, *self.input_shape), np.uint8)
        return self._finish(x, self._labels[chunk[kept]], rng)

    def _finish(self, x: np.ndarray, y: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """Pixels -> float32 in the model's range; optional random left-right flips."""
        x = x.astype(np.float32)
        if self.manifest.get("pixels") == "uint8":
            x /= np.float32(255)
        x = x * self._scale + self._low if (self._low, self._scale) != (0, 1) else x
        if rng is not None:
            flip = rng.random(len(x)) < 0.5
            x[flip] = x[flip][:, :, ::-1]  # (N, H, W, C): reverse the width
        return x.astype(np.float32, copy=False), y


# ------------------------------------------------------------------------------ load_dataset
def load_dataset(spec: str, *, input_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None, train_limit: int | None = None,
                 test_limit: int | None = None, validation_fraction: float = 0.1,
                 seed: int = 42, pixel_range: tuple[float, float] = (0.0, 1.0),
                 origin: str | None = None) -> Dataset:
    """Index `spec` ('fashion-mnist', an image folder, TFRecord shards or an .npz; a local path or
    `s3://`), validate it and split it.

    `input_shape` (H, W, C) is the model's input: images from files are resized to it; arrays
    must already match it. `num_classes` is the model's output width, checked against the labels.
    `origin`: the MLflow URI `spec` was downloaded from; a worker without that copy downloads it.
    """
    if spec in ("fashion-mnist", "fashion_mnist"):
        dataset = _index_fashion_mnist()
    elif spec.startswith("s3://"):
        dataset = _index_s3(spec, input_shape, num_classes)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise PipelineInputError(
                f"dataset not found: {spec} (give 'fashion-mnist', an image folder with one "
                "subfolder per class, TFRecord shards, or an .npz with x_train, y_train, x_test, "
                "y_test)")
        if path.suffix == ".npz":
            dataset = _index_npz(path, str(path.resolve()))
        elif is_tfrecord(path.name) or (path.is_dir() and _tfrecord_shards(path)):
            shards = [path] if path.is_file() else _tfrecord_shards(path)
            root = str(path.resolve() if path.is_dir() else path.resolve().parent)
            dataset = _index_tfrecords(spec, root, [s.name for s in shards], lambda n: Path(root) / n,
                                       input_shape, num_classes, _listing_digest(
                                           [(s.name, s.stat().st_size) for s in shards]))
        elif path.is_dir():
            dataset = _index_folder(spec, str(path.resolve()), _local_files(path), input_shape,
                                    class_names=sorted(d.name for d in path.iterdir() if d.is_dir()
                                                       and not d.name.startswith(".")))
        else:
            raise PipelineInputError(
                f"dataset {spec} is neither a folder, TFRecord shards nor an .npz file: give an "
                "image folder (one subfolder per class), .tfrecord files or an .npz with x_train, "
                "y_train, x_test, y_test")
    if origin:
        dataset.manifest["origin"] = origin
    return _finalise(dataset, input_shape=input_shape, num_classes=num_classes,
                     train_limit=train_limit, test_limit=test_limit,
                     validation_fraction=validation_fraction, seed=seed, pixel_range=pixel_range)


def _finalise(dataset: Dataset, *, input_shape, num_classes, train_limit, test_limit,
              validation_fraction, seed, pixel_range) -> Dataset:
    """Check the labels and shape against the model, apply the limits, carve the validation
    split, set the pixel range: the manifest every task then reads."""
    manifest = dataset.manifest
    labels = dataset._labels
    train_ids = np.asarray(manifest["splits"]["train"], dtype=np.int64)
    test_ids = np.asarray(manifest["splits"]["test"], dtype=np.int64)
    source = manifest["source"]
    if len(train_ids) == 0:
        raise PipelineInputError(f"x_train is empty: the dataset {source} needs training and test images")
    if len(test_ids) == 0:
        raise PipelineInputError(f"x_test is empty: the dataset {source} needs training and test images")
    if manifest["class_names"] is None:  # arrays without names: the model's width, else max + 1
        count = num_classes or int(labels.max()) + 1
        manifest["class_names"] = [str(i) for i in range(max(count, 1))]
    _check_labels(labels[train_ids], labels[test_ids], len(manifest["class_names"]), source)
    if input_shape is not None and tuple(manifest["image_shape"]) != tuple(input_shape):
        raise PipelineInputError(
            f"the model takes inputs of shape {tuple(input_shape)} but the dataset {source} has "
            f"images of shape {tuple(manifest['image_shape'])}: use a model built for this data, "
            "or an image folder (which is resized to the model's input)")
    if num_classes is not None and num_classes != len(manifest["class_names"]):
        raise PipelineInputError(
            f"the model has {num_classes} outputs but the dataset {source} has "
            f"{len(manifest['class_names'])} classes: use a model with one output per class")
    if train_limit:
        train_ids = train_ids[:train_limit]
    if test_limit:
        test_ids = test_ids[:test_limit]
    train_ids, val_ids = _split_validation(train_ids, validation_fraction, seed)
    manifest["splits"] = {"train": train_ids.tolist(), "val": val_ids.tolist(),
                          "test": test_ids.tolist()}
    manifest["split_rule"] = {"seed": seed, "validation_fraction": validation_fraction,
                              "train_limit": train_limit, "test_limit": test_limit}
    manifest["pixel_range"] = [float(pixel_range[0]), float(pixel_range[1])]
    if manifest.get("skipped"):
        manifest.setdefault("notes", []).append(
            f"skipped {manifest['skipped']} unreadable or non-image files")
    return Dataset(manifest, dataset.reader)


def _manifest(kind: str, source: str, root: str, class_names, image_shape, labels, locators,
              splits: dict[str, list[int]], *, digest: str, skipped: int = 0,
              pixels: str = "float", extra: dict | None = None) -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "kind": kind, "source": without_credentials(source), "root": root,
            "digest": digest, "class_names": class_names,
            "image_shape": [int(v) for v in image_shape], "pixels": pixels,
            "pixel_range": [0.0, 1.0], "labels": np.asarray(labels, dtype=np.int64).tolist(),
            "locators": locators, "splits": splits, "skipped": skipped, "notes": [],
            **(extra or {})}


def _reader(manifest: dict[str, Any]):
    """The reader of a manifest's images on this worker."""
    kind, root = manifest["kind"], manifest["root"]
    shape = tuple(manifest["image_shape"])
    if manifest.get("origin") and not Path(root).exists():  # downloaded from MLflow elsewhere
        from pipeline.sources.inputs import fetch_input
        fetched = fetch_input(manifest["origin"], _cache(manifest["digest"]) / "origin", "dataset")
        root = str(fetched if fetched.is_dir() or kind == "npz" else fetched.parent)
    if kind == "fashion-mnist":
        return ArrayReader(_fashion_mnist_images())
    if kind == "npz":
        path = _local_copy(root, manifest["digest"])
        if _file_digest(path) != manifest["digest"]:
            raise PipelineInputError(f"dataset {manifest['source']} changed since the run indexed "
                                     "it: run again on the current file")
        return ArrayReader(_npz_images(path)[0])
    if kind == "folder":
        return FileReader(root, shape, _cache(manifest["digest"]) if root.startswith("s3://") else None)
    if kind == "tfrecord":
        cache = _cache(manifest["digest"])
        return TFRecordReader(manifest["shards"], shape,
                              lambda name: _local_copy(f"{root.rstrip('/')}/{name}", manifest["digest"],
                                                       cache / name))
    raise PipelineInputError(f"dataset kind {kind!r} cannot be read by this version of the pipeline "
                             "(an in-memory dataset does not travel between tasks)")


def _cache(digest: str) -> Path:
    """This worker's cache of a dataset's files (what it has read), keyed by the digest."""
    from pipeline.config import work_dir
    return work_dir() / "datasets" / digest[:16]


def _local_copy(location: str, digest: str, target: Path | None = None) -> Path:
    """A local path for a file: itself, or an `s3://` object fetched once into the cache."""
    if not location.startswith("s3://"):
        return Path(location)
    target = target or _cache(digest) / Path(location).name
    if not target.exists():
        from pipeline.files import atomic_path
        from pipeline.store.s3 import Endpoint, parse_s3_uri
        bucket, key = parse_s3_uri(location)
        with atomic_path(target) as tmp:
            Endpoint().client.download_file(bucket, key, str(tmp))
    return target


# ------------------------------------------------------------------------------------ sources
def _index_fashion_mnist() -> Dataset:
    labels = np.concatenate([_fashion_mnist_file("train", "labels"), _fashion_mnist_file("t10k", "labels")])
    train = len(_fashion_mnist_file("train", "labels"))
    digest = hashlib.sha256()
    for prefix in ("train", "t10k"):
        for stem in ("images", "labels"):
            digest.update(_file_digest(_fashion_mnist_path(prefix, stem)).encode())
    manifest = _manifest("fashion-mnist", "fashion-mnist", str(FASHION_MNIST_DIR),
                         list(FASHION_MNIST_CLASSES), (28, 28, 1), labels, None,
                         {"train": list(range(train)), "val": [], "test": list(range(train, len(labels)))},
                         digest=digest.hexdigest(), pixels="uint8")
    return Dataset(manifest, ArrayReader(_fashion_mnist_images()))


def _fashion_mnist_images() -> np.ndarray:
    return np.concatenate([_fashion_mnist_file("train", "images"),
                           _fashion_mnist_file("t10k", "images")])[..., None]


def _fashion_mnist_path(prefix: str, kind: str) -> Path:
    stem = "images-idx3-ubyte" if kind == "images" else "labels-idx1-ubyte"
    for candidate in (FASHION_MNIST_DIR / f"{prefix}-{stem}.gz", FASHION_MNIST_DIR / f"{prefix}-{stem}"):
        if candidate.exists():
            return candidate
    raise PipelineInputError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: install it with "
                             "'apt-get install dataset-fashion-mnist' (or set FASHION_MNIST_DIR)")


def _fashion_mnist_file(prefix: str, kind: str) -> np.ndarray:
    return _read_idx(_fashion_mnist_path(prefix, kind))


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


def _index_npz(path: Path, root: str, source: str | None = None) -> Dataset:
    x, labels, train_count = _npz_images(path)
    pixels = "uint8" if x.dtype == np.uint8 else "float"
    manifest = _manifest("npz", source or str(path), root, None, x.shape[1:], labels, None,
                         {"train": list(range(train_count)), "val": [],
                          "test": list(range(train_count, len(labels)))},
                         digest=_file_digest(path), pixels=pixels)
    return Dataset(manifest, ArrayReader(x))


def _npz_images(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(x_train ++ x_test as uint8 or float32 in [0, 1], their labels, the training count)."""
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
    x_train, x_test = _as_images(x_train, "x_train"), _as_images(x_test, "x_test")
    y_train = _as_labels(y_train, "y_train", len(x_train))
    y_test = _as_labels(y_test, "y_test", len(x_test))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise PipelineInputError(f"{path}: x_train images are {x_train.shape[1:]} but x_test "
                                 f"images are {x_test.shape[1:]}: they must have one shape")
    x = np.concatenate([x_train, x_test])
    if x.dtype != np.uint8 and x.size and float(np.nanmax(x)) > 1.5:
        x = x.astype(np.float32) / np.float32(255)  # 0..255 pixels: scale like the other sources
    return x, np.concatenate([y_train, y_test]), len(x_train)


def _local_files(root: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file under `root`, hidden ones aside, sorted."""
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        files.append((relative.as_posix(), path.stat().st_size))
    return files


def _index_folder(spec: str, root: str, files: list[tuple[str, int]], input_shape,
                  etags: dict[str, str] | None = None,
                  class_names: list[str] | None = None) -> Dataset:
    """An image folder (local or `s3://`): class = first folder level (a local folder's
    subfolders, empty ones too); every image decoded once (on a few threads) to skip unreadable
    ones; a stratified 20 % test split."""
    class_names = class_names or sorted({f.split("/")[0] for f, _ in files if "/" in f})
    if len(class_names) < 2:
        raise PipelineInputError(
            f"image folder {spec} has {len(class_names)} class subfolder(s): a classifier needs at "
            "least 2 (one subfolder per class, images inside)")
    digest = _listing_digest([(f, size, (etags or {}).get(f, "")) for f, size in files])
    reader = FileReader(root, (0, 0, 0), _cache(digest) if root.startswith("s3://") else None)
    candidates = [(f, size) for f, size in files if "/" in f]
    images = [(f, size) for f, size in candidates if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    skipped = len(candidates) - len(images)
    if not images:
        raise PipelineInputError(f"image folder {spec} holds no images (.png, .jpg, .jpeg, .bmp, "
                                 ".gif, .webp) in its class subfolders")
    shape = tuple(input_shape) if input_shape is not None else _first_geometry(reader, images)
    reader.shape = shape
    readable = _readable(lambda f: reader.read_one(f), [f for f, _ in images])
    skipped += len(images) - sum(readable)
    kept = [f for (f, _), ok in zip(images, readable) if ok]
    labels = np.array([class_names.index(f.split("/")[0]) for f in kept], dtype=np.int64)
    empty = [name for i, name in enumerate(class_names) if not np.any(labels == i)]
    if empty:
        raise PipelineInputError(f"image folder {spec}: class folder(s) {', '.join(empty)} hold no "
                                 "readable images: add images or remove the folder")
    total = len(candidates)
    if total and skipped / total > MAX_UNREADABLE_FRACTION:
        raise PipelineInputError(
            f"image folder {spec}: {skipped} of {total} files are unreadable or not images "
            f"(more than {MAX_UNREADABLE_FRACTION:.0%}): remove them or fix the folder")
    train, test = _stratified_holdout(labels, spec)
    manifest = _manifest("folder", spec, root, class_names, shape, labels, kept,
                         {"train": train, "val": [], "test": test}, digest=digest,
                         skipped=skipped, pixels="uint8")
    log.info("dataset %s: %d images in %d classes indexed (%d skipped)", without_credentials(spec), len(kept),
             len(class_names), skipped)
    return Dataset(manifest, reader)


def _first_geometry(reader: FileReader, images: list[tuple[str, int]]) -> tuple[int, int, int]:
    """The model-less case (the default CNN on a folder): the first readable image's size."""
    for relative, _ in images:
        try:
            return image_geometry(reader.read_bytes(relative))
        except (OSError, ValueError, SyntaxError):
            continue
    return (32, 32, 3)  # nothing readable: the unreadable-share check refuses the folder next


def _readable(read_one, items: list) -> list[bool]:
    """Decode every item once (a few threads); True where it decoded."""
    def check(item) -> bool:
        try:
            read_one(item)
            return True
        except UnreadableImage:
            return False
    with ThreadPoolExecutor(decode_workers(), thread_name_prefix="index") as pool:
        return list(pool.map(check, items, chunksize=64))


def _stratified_holdout(labels: np.ndarray, spec: str) -> tuple[list[int], list[int]]:
    """Deterministic from the index: a fifth of each class (at least one image) to the test
    split, both splits in a seeded random order (so a limit takes a random subset)."""
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        test_mask[idx[:max(1, int(len(idx) * TEST_FRACTION))]] = True
    if (~test_mask).sum() == 0:
        raise PipelineInputError(f"image folder {spec} is too small to split into train and test")
    train, test = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    return train[rng.permutation(len(train))].tolist(), test[rng.permutation(len(test))].tolist()


def _tfrecord_shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_tfrecord(p.name))


def _index_tfrecords(spec: str, root: str, shards: list[str], local, input_shape, num_classes,
                     digest: str) -> Dataset:
    """TFRecord shards: each record's offset and label indexed once, each image decoded once.
    Shards named *test* (or *validation*) are the test split; else a stratified 20 % holdout."""
    cache = _cache(digest)
    if root.startswith("s3://"):
        def fetch(name: str) -> Path:
            return _local_copy(f"{root.rstrip('/')}/{name}", digest, cache / name)
    else:
        fetch = local
    locators, labels, in_test = [], [], []
    unparsable = 0
    for index, name in enumerate(shards):
        held_out = any(word in name.lower() for word in ("test", "validation", "valid"))
        for offset, _, label in index_tfrecord(fetch(name)):
            if label < 0:
                unparsable += 1
                continue
            locators.append([index, offset])
            labels.append(label)
            in_test.append(held_out)
    if not locators:
        raise PipelineInputError(f"TFRecord dataset {spec} holds no readable examples")
    reader = TFRecordReader(shards, (0, 0, 0), fetch)
    reader.shape = tuple(input_shape) if input_shape is not None else \
        image_geometry(reader.read_bytes(locators[0]))
    readable = _readable(reader.read_one, locators)
    total = len(locators) + unparsable
    skipped = total - sum(readable)
    if skipped / total > MAX_UNREADABLE_FRACTION:
        raise PipelineInputError(f"TFRecord dataset {spec}: {skipped} of {total} records are "
                                 f"unreadable (more than {MAX_UNREADABLE_FRACTION:.0%}): fix or "
                                 "remove them")
    keep = np.flatnonzero(readable)
    locators = [locators[i] for i in keep]
    label_array = np.asarray(labels, dtype=np.int64)[keep]
    test_flags = np.asarray(in_test, dtype=bool)[keep]
    if test_flags.any() and (~test_flags).any():
        rng = np.random.default_rng(0)
        train_ids, test_ids = np.flatnonzero(~test_flags), np.flatnonzero(test_flags)
        train = train_ids[rng.permutation(len(train_ids))].tolist()
        test = test_ids[rng.permutation(len(test_ids))].tolist()
    else:
        train, test = _stratified_holdout(label_array, spec)
    manifest = _manifest("tfrecord", spec, root, _labels_file(root), reader.shape, label_array,
                         locators, {"train": train, "val": [], "test": test}, digest=digest,
                         skipped=skipped, pixels="uint8", extra={"shards": shards})
    log.info("dataset %s: %d records in %d shards indexed (%d skipped)", without_credentials(spec),
             len(locators), len(shards), skipped)
    return Dataset(manifest, reader)


def _labels_file(root: str) -> list[str] | None:
    """Class names from a `labels.txt` beside local shards (one per line), if there is one."""
    if root.startswith("s3://"):
        return None
    path = Path(root) / "labels.txt"
    if not path.exists():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _index_s3(uri: str, input_shape, num_classes) -> Dataset:
    """An `s3://` dataset: an .npz object, TFRecord shards, or an image folder under a prefix.
    Only the listing is read here; images are fetched (and cached) as they are read."""
    from botocore.exceptions import ClientError

    from pipeline.store.s3 import Endpoint, parse_s3_uri, translated_errors
    bucket, key = parse_s3_uri(uri)
    endpoint = Endpoint()
    objects: list[tuple[str, int, str]] = []
    with translated_errors(endpoint, bucket):
        if key.endswith(".npz") and not uri.endswith("/"):
            try:
                head = endpoint.client.head_object(Bucket=bucket, Key=key)
            except ClientError:
                raise PipelineInputError(f"dataset {without_credentials(uri)} does not exist on the S3 endpoint "
                                         f"{endpoint.display_url}") from None
            digest_hint = _listing_digest([(key, head["ContentLength"], head.get("ETag", ""))])
            path = _local_copy(uri, digest_hint)
            return _index_npz(path, uri, uri)
        prefix = f"{key}/" if key else ""
        try:
            for page in endpoint.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                  Prefix=prefix):
                for item in page.get("Contents", []):
                    relative = item["Key"][len(prefix):]
                    if relative and not relative.endswith("/") and not any(
                            part.startswith(".") for part in relative.split("/")):
                        objects.append((relative, int(item["Size"]), item.get("ETag", "")))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "NoSuchBucket":
                raise PipelineInputError(f"dataset {without_credentials(uri)} does not exist on the S3 "
                                         f"endpoint {endpoint.display_url} (no such bucket)") from None
            raise
    if not objects:
        raise PipelineInputError(f"dataset {without_credentials(uri)} holds no objects on the S3 endpoint "
                                 f"{endpoint.display_url}: check the prefix")
    root = f"s3://{bucket}/{prefix}"
    digest = _listing_digest(objects)
    shards = sorted(name for name, _, _ in objects if "/" not in name and is_tfrecord(name))
    if shards:
        return _index_tfrecords(uri, root, shards, None, input_shape, num_classes, digest)
    return _index_folder(uri, root, [(name, size) for name, size, _ in objects], input_shape,
                         etags={name: etag for name, _, etag in objects})


# ------------------------------------------------------------------------------------ checks
def _as_images(x, name: str) -> np.ndarray:
    """uint8 pixels stay uint8 (a quarter of the memory); anything else becomes float32."""
    x = np.asarray(x)
    if x.size == 0 or len(x) == 0:
        raise PipelineInputError(f"{name} is empty: the dataset needs training and test images")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise PipelineInputError(f"{name} has dtype {x.dtype}: images must be numeric arrays")
    if x.ndim == 3:
        x = x[..., None]  # (N, H, W) grayscale
    if x.ndim != 4:
        raise PipelineInputError(f"{name} has shape {x.shape}: expected (N, H, W) or (N, H, W, C) images")
    if x.dtype == np.uint8:
        return x
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


def _split_validation(train_ids: np.ndarray, fraction: float, seed: int):
    count = len(train_ids)
    val_count = int(round(count * fraction))
    if count - val_count < 1 or val_count < 1:
        # Too small to split: validate on the training data rather than fail.
        return train_ids, train_ids[:max(1, count // 10)]
    order = np.random.default_rng(seed).permutation(count)
    return train_ids[order[val_count:]], train_ids[order[:val_count]]


# ------------------------------------------------------------------------------------ digests
def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _listing_digest(entries: list[tuple]) -> str:
    """The digest of a file listing (names, sizes, ETags where the store gives them)."""
    return hashlib.sha256(json.dumps(sorted(entries), separators=(",", ":")).encode()).hexdigest()


def _digest_arrays(images: list[np.ndarray], labels: list[np.ndarray]) -> str:
    sha = hashlib.sha256()
    for array in (*images, *labels):
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()

