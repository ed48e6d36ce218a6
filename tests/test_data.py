import numpy as np
import pytest
from PIL import Image

from pipeline.sources.data import Dataset, load_dataset
from pipeline.errors import PipelineInputError


def test_fashion_mnist_loads_whole_and_splits_validation():
    ds = load_dataset("fashion-mnist", validation_fraction=0.1)
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert len(ds.x_train) == 54000 and len(ds.x_val) == 6000 and len(ds.x_test) == 10000
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.y_test)) == set(range(10))


def test_limits_and_round_trip(tmp_path):
    ds = load_dataset("fashion-mnist", train_limit=300, test_limit=50)
    assert len(ds.x_train) + len(ds.x_val) == 300 and len(ds.x_test) == 50
    back = Dataset.load(ds.save(tmp_path / "d.npz"))
    assert np.array_equal(back.x_test, ds.x_test) and back.class_names == ds.class_names


def test_calibration_generator_yields_training_images():
    ds = load_dataset("fashion-mnist", train_limit=300, test_limit=50)
    batches = list(ds.calibration_batches(40)())
    assert len(batches) == 40 and batches[0][0].shape == (1, 28, 28, 1)


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


def test_pixel_range_rescales_every_split_and_the_file_keeps_it_exactly(tmp_path):
    """A model built for [0, 255] or [-1, 1] inputs gets every split in its range; the saved
    dataset (uint8 on disk: a quarter of the bytes between workers) loads back bit for bit."""
    ds = load_dataset("fashion-mnist", train_limit=300, test_limit=50)
    for low, high in ((0.0, 255.0), (-1.0, 1.0)):
        scaled = ds.in_range(low, high)
        for x, original in ((scaled.x_train, ds.x_train), (scaled.x_test, ds.x_test)):
            np.testing.assert_allclose(x, original * (high - low) + low, rtol=1e-6)
        assert scaled.x_test.min() == low and scaled.x_test.max() == high
        path = scaled.save(tmp_path / "scaled.npz")
        again = Dataset.load(path)
        assert np.array_equal(again.x_val, scaled.x_val) and again.x_val.dtype == np.float32
        assert path.stat().st_size < 0.3 * scaled.x_train.nbytes + 0.3 * scaled.x_test.nbytes + 1e5
    odd = Dataset(ds.x_train * 0.5 + 0.001, ds.y_train, ds.x_val, ds.y_val, ds.x_test, ds.y_test,
                  ds.class_names)  # not 8-bit pixels: stored as float32, unchanged
    assert np.array_equal(Dataset.load(odd.save(tmp_path / "odd.npz")).x_train, odd.x_train)
