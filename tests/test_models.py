"""Model building and safe loading of users' models in every supported format."""
import json
import zipfile

import numpy as np
import pytest

from pipeline.sources import models
from pipeline.errors import PipelineInputError


def test_default_cnn_and_student_macs():
    teacher = models.build_cnn((28, 28, 1), 10)
    student = models.build_cnn((28, 28, 1), 10, width=0.5)
    assert teacher.output_shape == (None, 10)
    ratio = models.count_macs(student) / models.count_macs(teacher)
    assert 0.2 < ratio < 0.32, ratio


def test_larger_inputs_get_more_pooling_blocks():
    model = models.build_cnn((96, 96, 3), 4)
    assert model.layers[-1].output_shape == (None, 4)
    flatten = next(layer for layer in model.layers if type(layer).__name__ == "Flatten")
    assert flatten.output_shape[1] <= 8 * 8 * 256


def _keras3_model(lambda_layer=False):
    import keras
    layers = [keras.Input((8, 8, 1)), keras.layers.Flatten()]
    if lambda_layer:
        layers.append(keras.layers.Lambda(lambda t: t * 2.0))
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def test_loads_keras3_and_tf_keras_files(tmp_path, tiny_model_path):
    k3 = _keras3_model()
    k3.save(tmp_path / "k3.keras")
    assert models.model_kind(tmp_path / "k3.keras") == "keras3"
    loaded = models.load_model(tmp_path / "k3.keras")
    assert models.io_shape(loaded) == ((8, 8, 1), 3)

    assert models.model_kind(tiny_model_path) == "tf_keras"
    tf_model = models.load_model(tiny_model_path)
    tf_model.save(str(tmp_path / "legacy.h5"))
    assert models.model_kind(tmp_path / "legacy.h5") == "tf_keras"
    assert models.io_shape(models.load_model(tmp_path / "legacy.h5")) == ((28, 28, 1), 10)


def test_saved_model_with_and_without_signature(tmp_path):
    import tensorflow as tf
    k3 = _keras3_model()
    k3.export(str(tmp_path / "exported"))
    wrapped = models.load_model(tmp_path / "exported")
    assert models.io_shape(wrapped) == ((8, 8, 1), 3)
    x = np.random.default_rng(0).random((5, 8, 8, 1)).astype(np.float32)
    assert np.allclose(wrapped.predict(x), k3.predict(x, verbose=0), atol=1e-5)

    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path / "bare"))
    with pytest.raises(PipelineInputError, match="no 'serving_default' signature"):
        models.load_model(tmp_path / "bare")


def test_lambda_layers_refused_unless_allowed(tmp_path):
    model = _keras3_model(lambda_layer=True)
    model.save(tmp_path / "lam.keras")
    with pytest.raises(PipelineInputError, match="Lambda"):
        models.load_model(tmp_path / "lam.keras")

    # Prove the refusal happens before deserialization: the stored code is a trap that leaves a
    # file behind when it runs (rebuilding the model calls the Lambda).
    import tf_keras
    trap = tmp_path / "the-model-code-ran"
    legacy = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Lambda(
        lambda t, marker=str(trap): (__import__("pathlib").Path(marker).touch(), t + 1)[1]),
        tf_keras.layers.Dense(2)])
    legacy.save(str(tmp_path / "lam.h5"))
    trap.unlink()  # building the model above ran it once
    with pytest.raises(PipelineInputError, match="allow-unsafe-model"):
        models.load_model(tmp_path / "lam.h5")
    assert not trap.exists()  # refused before any stored code ran
    assert models.load_model(tmp_path / "lam.h5", allow_unsafe=True).output_shape == (None, 2)
    assert trap.exists()  # the trap is real: loading it does run the stored code


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_model_files_give_one_clear_error(tmp_path, tiny_model_path, damage):
    target = tmp_path / "broken.keras"
    data = tiny_model_path.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        target.write_bytes(b"not a model at all")
    with pytest.raises(PipelineInputError, match="model"):
        models.load_model(target)


def test_h5_weights_only_is_refused_clearly(tmp_path, tiny_model_path):
    model = models.load_model(tiny_model_path)
    model.save_weights(str(tmp_path / "w.h5"))
    with pytest.raises(PipelineInputError, match="no model config"):
        models.load_model(tmp_path / "w.h5")


def test_keras_archive_metadata_is_read_not_executed(tmp_path):
    path = tmp_path / "fake.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", json.dumps({"class_name": "Lambda", "config": {}}))
    with pytest.raises(PipelineInputError, match="Lambda"):
        models.load_model(path)
