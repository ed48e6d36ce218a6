import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.sources.data import Dataset, load_dataset
from pipeline.errors import PipelineInputError
from tests.servers import moto_credentials_env, moto_s3  # noqa: F401  (a fixture)


def test_fashion_mnist_indexes_whole_and_splits_validation():
    ds = load_dataset("fashion-mnist", validation_fraction=0.1)
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert (ds.train_count, ds.val_count, ds.test_count) == (54000, 6000, 10000)
    x, y = next(ds.batches("train", 500, shuffle=True))
    assert x.shape == (500, 28, 28, 1) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(ds.labels("test"))) == set(range(10))


def test_limits_and_round_trip_through_a_manifest_without_pixels(tmp_path):
    ds = load_dataset("fashion-mnist", train_limit=300, test_limit=50)
    assert ds.train_count + ds.val_count == 300 and ds.test_count == 50
    path = ds.save(tmp_path / "d.json")
    back = Dataset.load(path)
    assert np.array_equal(back.x_test, ds.x_test) and back.class_names == ds.class_names
    assert back.digest == ds.digest and back.manifest["splits"] == ds.manifest["splits"]
    # What travels between tasks is an index: the labels and split ids of 70,000 images, no pixels.
    assert path.stat().st_size < 70_000 * 12
    assert "x_train" not in json.loads(path.read_text())


def test_calibration_generator_yields_training_images():
    ds = load_dataset("fashion-mnist", train_limit=300, test_limit=50)
    batches = list(ds.calibration_batches(40)())
    assert len(batches) == 40 and batches[0][0].shape == (1, 28, 28, 1)
    train = {hashlib.sha1(x.tobytes()).hexdigest() for x in ds.x_train}
    assert all(hashlib.sha1(b[0][0].tobytes()).hexdigest() in train for b in batches)


def _folder(root, classes, per_class=6, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i}.png")
    return root


def test_image_folder_resized_to_model_input(tmp_path):
    root = _folder(tmp_path / "imgs", ["cat", "dog", "fox"])
    ds = load_dataset(str(root), input_shape=(16, 16, 1))
    assert ds.input_shape == (16, 16, 1) and ds.class_names == ["cat", "dog", "fox"]
    assert len(ds.x_train) + len(ds.x_val) + len(ds.x_test) == 18


def test_image_folder_skips_a_few_bad_files_and_refuses_many(tmp_path):
    root = _folder(tmp_path / "imgs", ["a", "b"], per_class=30)
    (root / "a" / "notes.txt").write_text("not an image")
    ds = load_dataset(str(root))
    assert ds.skipped_files == 1 and "skipped 1" in ds.notes[0]
    for i in range(10):
        (root / "b" / f"broken{i}.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(PipelineInputError, match="unreadable"):
        load_dataset(str(root))


@pytest.mark.parametrize("case, message", [
    ("single_class", "at least 2"),
    ("missing", "dataset not found"),
    ("labels_out_of_range", "labels out of range"),
    ("nan", "NaN or infinite"),
    ("empty_test", "x_test is empty"),
    ("missing_key", "lacks y_test"),
    ("label_count", "labels for"),
    ("wrong_shape", "model takes inputs"),
])
def test_bad_datasets_fail_with_one_clear_error(tmp_path, case, message):
    rng = np.random.default_rng(0)
    x = rng.random((20, 8, 8, 1)).astype(np.float32)
    y = np.arange(20) % 3
    arrays = {"x_train": x, "y_train": y, "x_test": x[:5], "y_test": y[:5]}
    spec = str(tmp_path / "d.npz")
    kwargs = {}
    if case == "single_class":
        spec = str(_folder(tmp_path / "imgs", ["only"]))
    elif case == "missing":
        spec = str(tmp_path / "nowhere")
    elif case == "labels_out_of_range":
        kwargs["num_classes"] = 3
        arrays["y_test"] = np.array([0, 1, 2, 7, -1])
    elif case == "nan":
        arrays["x_train"] = x.copy()
        arrays["x_train"][3, 0, 0, 0] = np.nan
    elif case == "empty_test":
        arrays["x_test"], arrays["y_test"] = x[:0], y[:0]
    elif case == "missing_key":
        del arrays["y_test"]
    elif case == "label_count":
        arrays["y_train"] = y[:10]
    elif case == "wrong_shape":
        kwargs["input_shape"] = (28, 28, 1)
    if case not in ("single_class", "missing"):
        np.savez(spec, **arrays)
    with pytest.raises(PipelineInputError, match=message):
        load_dataset(spec, **kwargs)


def test_a_stray_label_is_named_with_its_count(tmp_path):
    """Labels 0-9 and one stray 42 would make a 43-class model that scores nothing."""
    y = np.arange(200) % 10
    y[7] = 42
    x = np.random.default_rng(0).random((200, 8, 8, 1)).astype("float32")
    np.savez(tmp_path / "stray.npz", x_train=x, y_train=y, x_test=x[:20], y_test=np.arange(20) % 10)
    with pytest.raises(PipelineInputError, match=r"32 of 43 classes have none .*stray label\(s\) "
                                                 r"above the gap: 42 \(1 image\)"):
        load_dataset(str(tmp_path / "stray.npz"))


def test_pixel_range_rescales_every_split_as_it_is_read():
    """A model built for [0, 255] or [-1, 1] inputs gets every split in its range."""
    ds = load_dataset("fashion-mnist", train_limit=300, test_limit=50)
    for low, high in ((0.0, 255.0), (-1.0, 1.0)):
        scaled = load_dataset("fashion-mnist", train_limit=300, test_limit=50, pixel_range=(low, high))
        for x, original in ((scaled.x_train, ds.x_train), (scaled.x_test, ds.x_test)):
            np.testing.assert_allclose(x, original * (high - low) + low, rtol=1e-6, atol=1e-5)
        assert scaled.x_test.min() == low and scaled.x_test.max() == high


def _jpeg(pixels: np.ndarray) -> bytes:
    import io
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _photo_folder(root, classes=("cat", "dog", "fox"), per_class=20, size=(120, 90)):
    """JPEG 'photos' whose class is their dominant colour (learnable, like real data)."""
    rng = np.random.default_rng(1)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(size[1], size[0], 3), dtype=np.uint8)
            pixels[..., index % 3] += 150
            (root / name / f"{i:03d}.jpg").write_bytes(_jpeg(pixels))
    return root


def test_a_truncated_jpeg_is_skipped_and_counted_and_batches_stream(tmp_path):
    root = _photo_folder(tmp_path / "photos")
    whole = (root / "dog" / "000.jpg").read_bytes()
    (root / "dog" / "000.jpg").write_bytes(whole[:len(whole) // 3])  # truncated
    ds = load_dataset(str(root), input_shape=(32, 32, 3), pixel_range=(-1.0, 1.0))
    assert ds.skipped_files == 1 and "skipped 1" in ds.notes[0]
    assert ds.train_count + ds.val_count + ds.test_count == 59
    assert all("dog/000.jpg" != f for f in ds.manifest["locators"])
    # The stratified test split holds a fifth of every class.
    assert sorted(np.bincount(ds.labels("test"))) == [3, 4, 4]
    sizes = [len(y) for _, y in ds.batches("train", 8, shuffle=True, flips=True)]
    assert sum(sizes) == ds.train_count and max(sizes) == 8
    x, y = ds.arrays("test")
    assert x.shape == (11, 32, 32, 3) and -1.0 <= x.min() and x.max() <= 1.0
    # The class is the dominant colour channel: the labels travel with their images.
    assert np.array_equal(x.mean(axis=(1, 2)).argmax(axis=1), y % 3)


def test_an_empty_class_folder_is_named(tmp_path):
    root = _photo_folder(tmp_path / "photos", per_class=5)
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(PipelineInputError, match=r"class folder\(s\) empty hold no readable images"):
        load_dataset(str(root))


def _example(image: bytes, label: int) -> bytes:
    import tensorflow as tf
    feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
               "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_tfrecord_shards_stream_with_their_own_test_split(tmp_path):
    import tensorflow as tf
    rng = np.random.default_rng(2)
    folder = tmp_path / "records"
    folder.mkdir()
    expected = {"train": [], "test": []}
    for shard, split, count in (("train-00000-of-00002.tfrecord", "train", 30),
                                ("train-00001-of-00002.tfrecord", "train", 30),
                                ("test-00000-of-00001.tfrecord", "test", 12)):
        with tf.io.TFRecordWriter(str(folder / shard)) as writer:
            for i in range(count):
                label = i % 3
                pixels = rng.integers(0, 60, size=(48, 64, 3), dtype=np.uint8)
                pixels[..., label] += 150
                writer.write(_example(_jpeg(pixels), label))
                expected[split].append(label)
            if split == "test":
                writer.write(b"not an example")  # skipped and counted
    (folder / "labels.txt").write_text("red\ngreen\nblue\n")
    ds = load_dataset(str(folder), input_shape=(24, 24, 3))
    assert ds.class_names == ["red", "green", "blue"] and ds.skipped_files == 1
    assert ds.test_count == 12 and ds.train_count + ds.val_count == 60
    assert sorted(ds.labels("test").tolist()) == sorted(expected["test"])
    back = Dataset.load(ds.save(tmp_path / "manifest.json"))
    x, y = back.arrays("train")
    assert x.shape == (ds.train_count, 24, 24, 3)
    assert np.array_equal(x.mean(axis=(1, 2)).argmax(axis=1), y)


@pytest.mark.pipeline  # a moto_server process (tests/test_s3.py: S3 end to end); make test-stack
def test_an_s3_prefix_streams_through_each_workers_cache(tmp_path, moto_s3, monkeypatch):
    """An image folder under an s3:// prefix: `train` reads the listing and each image once;
    another worker opening the manifest fetches into its own cache what it reads, keyed by
    the digest; a prefix with no objects is one clear error."""
    import boto3
    for key, value in moto_credentials_env(moto_s3).items():
        monkeypatch.setenv(key, value)
    root = _photo_folder(tmp_path / "photos", per_class=10)
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket="photos")
    for path in sorted(root.rglob("*.jpg")):
        s3.upload_file(str(path), "photos", f"sets/pets/{path.relative_to(root).as_posix()}")
    monkeypatch.setenv("PIPELINE_WORK_DIR", str(tmp_path / "worker-1"))
    ds = load_dataset("s3://photos/sets/pets/", input_shape=(16, 16, 3))
    assert ds.num_classes == 3 and ds.train_count + ds.val_count + ds.test_count == 30
    manifest = ds.save(tmp_path / "manifest.json")
    monkeypatch.setenv("PIPELINE_WORK_DIR", str(tmp_path / "worker-2"))
    x, y = Dataset.load(manifest).arrays("test")
    cached = list((tmp_path / "worker-2" / "datasets" / ds.digest[:16]).rglob("*.jpg"))
    assert len(cached) == len(y) == ds.test_count  # only what this worker read
    assert np.array_equal(x, ds.arrays("test")[0])
    with pytest.raises(PipelineInputError, match=r"s3://photos/sets/none/ holds no objects"):
        load_dataset("s3://photos/sets/none/")
