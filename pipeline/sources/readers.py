"""Where a dataset's images are read from, one item at a time: the readers behind
`pipeline.sources.data.Dataset`.

- `ArrayReader`: arrays held by the source itself (Fashion-MNIST's IDX files, an .npz): small
  enough to sit in memory as their stored 8-bit pixels, converted to float one batch at a time.
- `FileReader`: image files under a root (an image folder, or an `s3://` prefix whose objects are
  downloaded on first read into this worker's cache and reused after).
- `TFRecordReader`: `tf.train.Example` records in TFRecord shards, read by offset (indexed once by
  the manifest), the encoded image decoded like a file.

Every reader answers `read(locators) -> uint8 or float32 (N, H, W, C)` for the images the
manifest locates; decoding and resizing is one function, `decode_image`, for all of them.
"""
from __future__ import annotations

import io
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import PipelineInputError

log = logging.getLogger("pipeline.sources.readers")

# Feature keys of the image and its label in a tf.train.Example, in the order we look for them
# (TF-Slim / TFDS image-classification records, then the short names).
IMAGE_KEYS = ("image/encoded", "image", "image_raw", "encoded")
LABEL_KEYS = ("image/class/label", "label", "class", "image/label")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")


class UnreadableImage(ValueError):
    """One file or record that is not a decodable image (skipped and counted)."""


def decode_image(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, C) at `shape`, bilinear resize. JPEGs much larger
    than the target are decoded at a reduced DCT scale first (PIL's draft mode): a 4000x3000
    photo for a 96x96 model costs a fraction of a full decode."""
    from PIL import Image, UnidentifiedImageError
    height, width, channels = shape
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.draft("L" if channels == 1 else "RGB", (width, height))
            opened.load()  # raises on truncated files
            image = opened.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) \
            as error:
        raise UnreadableImage(str(error)) from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)


def image_geometry(data: bytes) -> tuple[int, int, int]:
    """(H, W, C) of an encoded image as it is stored (grey modes are 1 channel, others 3)."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as opened:
        channels = 1 if opened.mode in ("L", "1", "I;16", "I", "F") else 3
        return opened.size[1], opened.size[0], channels


class ArrayReader:
    """Images of an in-memory array (uint8 pixels, or floats in [0, 1])."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def read(self, locators: list[Any]) -> np.ndarray:
        return self.images[np.asarray(locators, dtype=np.int64)]

    def read_one(self, locator: Any) -> np.ndarray:
        return self.images[int(locator)]


class FileReader:
    """Image files under `root`: a local folder, or an `s3://bucket/prefix/` whose files are
    fetched into `cache` on first read (atomically, so parallel readers never see half a file)."""

    def __init__(self, root: str, shape: tuple[int, int, int], cache: Path | None = None):
        self.root, self.cache = root, cache
        self.shape: tuple[int, ...] = shape
        self._s3 = None
        self._lock = threading.Lock()

    def path(self, relative: str) -> Path:
        if not self.root.startswith("s3://"):
            return Path(self.root) / relative
        assert self.cache is not None
        target = self.cache / relative
        if not target.exists():
            from pipeline.files import atomic_path
            from pipeline.store.s3 import parse_s3_uri
            bucket, prefix = parse_s3_uri(self.root)
            with atomic_path(target) as tmp:
                self.s3().download_file(bucket, f"{prefix}/{relative}" if prefix else relative,
                                        str(tmp))
        return target

    def s3(self):
        with self._lock:  # one boto3 client per reader; clients are thread-safe, sessions not
            if self._s3 is None:
                from pipeline.store.s3 import Endpoint
                self._s3 = Endpoint().client
            return self._s3

    def read_bytes(self, relative: str) -> bytes:
        return self.path(relative).read_bytes()

    def read_one(self, locator: Any) -> np.ndarray:
        return decode_image(self.read_bytes(str(locator)), self.shape)


class TFRecordReader:
    """Records of TFRecord shards, by (shard index, offset) from the manifest's index."""

    def __init__(self, shards: list[str], shape: tuple[int, int, int],
                 fetch: Callable[[str], Path]):
        self.shards, self.fetch = shards, fetch
        self.shape: tuple[int, ...] = shape
        self._local: dict[int, Path] = {}
        self._lock = threading.Lock()

    def _shard(self, index: int) -> Path:
        with self._lock:
            if index not in self._local:
                self._local[index] = self.fetch(self.shards[index])
            return self._local[index]

    def read_bytes(self, locator: Any) -> bytes:
        """The encoded image of the record at (shard index, offset)."""
        shard, offset = int(locator[0]), int(locator[1])
        with open(self._shard(shard), "rb") as handle:
            handle.seek(offset)
            record = _read_record(handle)
        if record is None:
            raise UnreadableImage(f"no record at offset {offset} of {self.shards[shard]}")
        return parse_example(record)[0]

    def read_one(self, locator: Any) -> np.ndarray:
        return decode_image(self.read_bytes(locator), self.shape)


def _read_record(handle) -> bytes | None:
    """One TFRecord record (length, length CRC, data, data CRC); None at the end of the file."""
    header = handle.read(12)
    if len(header) < 12:
        return None
    (length,) = struct.unpack("<Q", header[:8])
    data = handle.read(length)
    handle.read(4)
    if len(data) < length:
        raise UnreadableImage("truncated TFRecord record")
    return data


def index_tfrecord(path: Path) -> list[tuple[int, int, int]]:
    """Every record of one shard: (offset, size, label), reading each record's label once."""
    entries: list[tuple[int, int, int]] = []
    with open(path, "rb") as handle:
        while True:
            offset = handle.tell()
            try:
                record = _read_record(handle)
            except UnreadableImage:
                log.warning("%s: truncated after %d records", path.name, len(entries))
                break
            if record is None:
                break
            try:
                _, label = parse_example(record)
            except UnreadableImage:
                entries.append((offset, len(record), -1))  # counted as skipped
                continue
            entries.append((offset, len(record), label))
    return entries


def parse_example(record: bytes) -> tuple[bytes, int]:
    """(encoded image, label) of a serialized tf.train.Example."""
    from tensorflow.core.example import example_pb2  # protobuf only: no TensorFlow runtime
    try:
        features = example_pb2.Example.FromString(record).features.feature
    except Exception as error:  # google.protobuf.message.DecodeError
        raise UnreadableImage(f"not a tf.train.Example: {error}") from None
    image_key = next((k for k in IMAGE_KEYS if k in features and features[k].bytes_list.value), None)
    label_key = next((k for k in LABEL_KEYS if k in features and features[k].int64_list.value), None)
    if image_key is None or label_key is None:
        raise PipelineInputError(
            f"TFRecord examples need an encoded image ({' or '.join(IMAGE_KEYS)}) and an integer "
            f"label ({' or '.join(LABEL_KEYS)}); this one has {', '.join(sorted(features)) or 'none'}")
    return features[image_key].bytes_list.value[0], int(features[label_key].int64_list.value[0])


def is_tfrecord(name: str) -> bool:
    lowered = name.lower()
    return any(lowered.endswith(s) or f"{s}-" in lowered for s in TFRECORD_SUFFIXES)


def decode_workers() -> int:
    """Threads that decode images (PIL releases the GIL while it decodes)."""
    return max(2, min(8, os.cpu_count() or 2))
