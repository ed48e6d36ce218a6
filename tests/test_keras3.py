"""Keras 3 -> tf_keras translation: a trained Keras 3 model (saved, reloaded) becomes an equal
tf_keras model, untranslatable layers are named in the error, and TF-MOT's techniques work on the
translation, which converts to LiteRT and runs."""
from __future__ import annotations


import numpy as np
import pytest

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from pipeline.runtime import quantize
from pipeline.config import PipelineConfig
from pipeline.sources.keras3 import TranslationError, check_parity, to_tf_keras, translate
from pipeline.runtime.litert import TFLiteRunner
from pipeline.sources.models import load_model, model_kind, tf_keras
from pipeline.errors import TechniqueError
from pipeline.techniques import clustering, pruning, qat
from pipeline.techniques.graph import fuse_layers
from pipeline.techniques.stats import kernel_stats

PARITY = 1e-5
CLUSTERS = 8


def residual_cnn():
    """A small Keras 3 classifier with the layers the translation must get right."""
    import keras
    layers = keras.layers
    inputs = keras.Input((28, 28, 1), name="image")
    x = layers.Rescaling(2.0, offset=-1.0)(inputs)  # [0, 1] pixels -> [-1, 1]
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU(6.0)(x)
    branch = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    branch = layers.BatchNormalization(momentum=0.9)(branch)
    branch = layers.ReLU(6.0)(branch)
    branch = layers.Conv2D(16, 1, use_bias=False)(branch)
    branch = layers.BatchNormalization(momentum=0.9)(branch)
    x = layers.Add()([x, branch])
    x = layers.SeparableConv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="residual_cnn")


@pytest.fixture(scope="module")
def keras3_path(small_dataset, tmp_path_factory):
    import keras
    keras.utils.set_random_seed(7)
    model = residual_cnn()
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    model.fit(small_dataset.x_train, small_dataset.y_train, epochs=1, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("keras3") / "residual_cnn.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def translated_path(keras3_path, small_dataset, tmp_path_factory):
    import keras
    model2, _ = translate(keras.saving.load_model(keras3_path), small_dataset.x_test[:64],
                          tolerance=PARITY)
    path = tmp_path_factory.mktemp("translated") / "residual_cnn.keras"
    model2.save(path)
    return path


def test_a_trained_keras3_model_translates_with_equal_outputs(keras3_path, translated_path,
                                                              small_dataset):
    import keras
    assert model_kind(keras3_path) == "keras3"
    model3 = keras.saving.load_model(keras3_path)
    x = small_dataset.x_test[:64]
    model2, diff = translate(model3, x, tolerance=PARITY)
    assert diff < PARITY
    assert isinstance(model2, tf_keras().Model)
    assert [(layer.name, type(layer).__name__) for layer in model2.layers] == \
           [(layer.name, type(layer).__name__) for layer in model3.layers]
    assert model2.count_params() == model3.count_params()

    # The saved translation is a tf_keras model to the pipeline, and reloads equal.
    assert model_kind(translated_path) == "tf_keras"
    assert check_parity(model3, load_model(translated_path), x) < PARITY

    # The parity check sees a 1% change of one kernel.
    dense = model2.get_layer(model3.layers[-1].name)
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 1.01, bias])
    assert check_parity(model3, model2, x) > PARITY
    with pytest.raises(TranslationError, match="differ from the Keras 3 model's"):
        translate(model3, x, tolerance=-1.0)  # no difference is below a negative tolerance


def test_nested_models_are_flattened_and_mobilenet_v3_activations_translated():
    import keras
    layers = keras.layers
    backbone = keras.Sequential([keras.Input((12, 12, 3)), layers.Conv2D(8, 3, name="conv"),
                                 layers.BatchNormalization(), layers.Activation("hard_swish")],
                                name="backbone")
    inputs = keras.Input((12, 12, 3))
    x = backbone(inputs, training=False)
    x = layers.Conv2D(8, 1, name="conv")(x)  # named like the backbone's: renamed when flattened
    gate = layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)  # keras.ops with numbers: MobileNetV3's SE
    x = (2.0 - layers.Multiply()([x, gate])) / 4.0
    x = layers.Activation("hard_sigmoid")(layers.GlobalAveragePooling2D()(x))
    model3 = keras.Model(inputs, layers.Dense(4)(x))
    rng = np.random.default_rng(0)
    for layer in backbone.layers:  # non-trivial batch-norm statistics
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma * 1.5, beta + 0.1, mean + 0.2, variance * 2.0])

    model2, diff = translate(model3, rng.normal(size=(16, 12, 12, 3)).astype(np.float32),
                             tolerance=PARITY)
    assert diff < PARITY
    names = [layer.name for layer in model2.layers]
    assert "conv" in names and "backbone_conv" in names
    kinds = [type(layer).__name__ for layer in model2.layers]
    assert "Sequential" not in kinds and "Functional" not in kinds and "Model" not in kinds
    assert kinds.count("Rescaling") == 6  # + 3.0, * (1 / 6), 2.0 -, / 4.0, two hard activations
    # `backbone(inputs, training=False)` keeps its batch norm in inference mode when fine-tuned.
    batchnorm = next(layer for layer in model2.layers
                     if type(layer).__name__ == "BatchNormalization")
    assert batchnorm.inbound_nodes[0].call_kwargs.get("training") is False


@pytest.mark.parametrize("make_layer, name, kind", [
    (lambda keras: keras.layers.RandomFlip(name="flip"), "flip", "RandomFlip"),
    (lambda keras: keras.layers.LayerNormalization(name="norm"), "norm", "LayerNormalization"),
    (lambda keras: keras.layers.Dense(4, activation="celu", name="head"), "head", "Dense"),
    (lambda keras: _custom_dense()(4, name="mine"), "mine", "Dense"),
])
def test_an_untranslatable_layer_is_named(make_layer, name, kind):
    import keras
    model3 = keras.Sequential([keras.Input((8, 8, 1)), make_layer(keras),
                               keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.raises(TranslationError) as error:
        to_tf_keras(model3)
    message = str(error.value)
    assert f"layer '{name}' ({kind}) cannot be translated" in message
    assert "post-training variants" in message and "still run" in message
    assert isinstance(error.value, TechniqueError)


def _custom_dense():
    """A user's layer that happens to share a built-in's class name: not the built-in."""
    import keras

    @keras.saving.register_keras_serializable(package="tests")
    class Dense(keras.layers.Dense):
        pass

    return Dense


def test_fuse_layers_splits_a_separable_convolution_exactly(translated_path, small_dataset):
    """SeparableConv2D becomes its DepthwiseConv2D and a 1x1 Conv2D of the same name (which
    TF-MOT prunes and clusters like any convolution), computing the same outputs."""
    translated = load_model(translated_path)
    name = next(layer.name for layer in translated.layers  # Keras numbers names per process
                if type(layer).__name__ == "SeparableConv2D")
    fused = fuse_layers(translated)
    kinds = {layer.name: type(layer).__name__ for layer in fused.layers}
    assert "SeparableConv2D" not in kinds.values()
    assert kinds[f"{name}_depthwise"] == "DepthwiseConv2D"
    pointwise = fused.get_layer(name)
    assert type(pointwise).__name__ == "Conv2D" and pointwise.kernel.shape == (1, 1, 16, 32)
    assert pointwise.activation.__name__ == "relu" and pointwise.use_bias
    assert fused.get_layer(f"{name}_depthwise").strides == (2, 2)
    assert fused.count_params() == translated.count_params()
    np.testing.assert_allclose(fused.predict(small_dataset.x_test[:256], verbose=0),
                               translated.predict(small_dataset.x_test[:256], verbose=0),
                               rtol=1e-5, atol=1e-6)
    assert fuse_layers(fused) is fused


@pytest.mark.pipeline  # trains each technique on the translation (tests/test_optimize.py: on tf_keras)
@pytest.mark.parametrize("technique", ["prune", "cluster", "qat"])
def test_tfmot_techniques_work_on_the_translation_and_it_converts(technique, translated_path,
                                                                  small_dataset, tmp_path,
                                                                  monkeypatch):
    # This test model's kernels are all under the size pruning leaves alone by default.
    monkeypatch.setattr(pruning, "MIN_PRUNED_WEIGHTS", 64)
    config = PipelineConfig(finetune_epochs=1, prune_epochs=1, batch_size=64, seed=7,
                            cluster_count=CLUSTERS)
    module = {"prune": pruning, "cluster": clustering, "qat": qat}[technique]
    few = small_dataset.limited(train=384, val=64)  # 6 steps
    model = module.apply(load_model(translated_path), few, config, applied=())

    if technique == "prune":
        # the Dense head (32 inputs per output unit) keeps 16 of each unit's; the convolutions,
        # the separable's split-out pointwise kernel among them, have 16 inputs and stay whole
        head = next(layer for layer in model.layers if type(layer).__name__ == "Dense")
        assert np.mean(head.kernel.numpy() == 0) >= 0.4
        assert kernel_stats(model)["sparsity"] > 0.1
    elif technique == "cluster":
        kernels = [layer.kernel.numpy() for layer in model.layers
                   if type(layer).__name__ in ("Conv2D", "Dense")]  # what TF-MOT clusters
        # two Conv2D, the SeparableConv2D's pointwise kernel (split out) and the Dense head
        assert len(kernels) == 4 and all(np.unique(k).size <= CLUSTERS for k in kernels)
        assert [k.shape for k in kernels].count((1, 1, 16, 32)) == 1
    else:
        wrapped = {type(layer.layer).__name__ for layer in model.layers if hasattr(layer, "layer")}
        # Rescaling is quantized at its output; SeparableConv2D is split (graph.fuse_layers).
        assert {"Rescaling", "Conv2D", "DepthwiseConv2D", "Add", "Dense"} <= wrapped

    path = quantize.convert("int8", tmp_path / f"{technique}.tflite", model=model,
                            representative_data=small_dataset.calibration_batches(32),
                            qat=technique == "qat")
    scores = TFLiteRunner(path).scores(small_dataset.x_test[:16])
    assert scores.shape == (16, 10) and np.all(np.isfinite(scores))


# ------------------------------------------------- a Keras 3 model through the whole pipeline
def _image_folder(dataset, root, classes=3, per_class=120):
    """An image folder (one subfolder per class) of Fashion-MNIST PNGs."""
    from PIL import Image
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in np.flatnonzero(dataset.y_train == label)[:per_class]:
            Image.fromarray((dataset.x_train[i, :, :, 0] * 255).astype(np.uint8)).save(
                folder / f"{i}.png")
    return root


@pytest.mark.pipeline  # a whole run of six variants (minutes on 2 cores); make test-stack
def test_a_keras3_model_gets_every_technique(small_dataset, tmp_path, monkeypatch):
    """A Keras 3 model with a residual branch, BN, depthwise and separable convolutions and a
    Rescaling layer, trained on an image folder: the training-time variants run on its tf_keras
    translation (parity recorded as a metric)."""
    monkeypatch.setattr(pruning, "MIN_PRUNED_WEIGHTS", 64)  # a model under pruning's size floor
    import keras
    from mlflow import MlflowClient

    from pipeline import stages
    from pipeline.api import run_stages
    folder = _image_folder(small_dataset, tmp_path / "images")
    keras.utils.set_random_seed(3)
    model = residual_cnn()
    head = keras.layers.Dense(3, activation="softmax")(model.layers[-2].output)
    model = keras.Model(model.inputs, head)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    from pipeline.sources.data import load_dataset
    data = load_dataset(str(folder), input_shape=(28, 28, 1))
    model.fit(data.x_train, data.y_train, epochs=3, batch_size=32, verbose=0)
    model.save(tmp_path / "user.keras")

    variants = ["float32", "prune-int8", "cluster-dynamic", "qat-int8", "distill-dynamic",
                "cluster+qat4-int4"]
    config = {"model_path": str(tmp_path / "user.keras"), "dataset": str(folder),
              "variants": variants, "prune_epochs": 1, "finetune_epochs": 1, "distill_epochs": 1,
              "latency_runs": 10, "latency_warmup": 2, "calibration_samples": 32,
              "experiment": "keras3-pipeline", "registered_model_name": "keras3-pipeline"}
    results = run_stages(config, "keras3-pipeline-run")
    ctx = results.context
    results = {r["variant"]: r for r in stages.results_of(ctx)}
    assert {name: r["status"] for name, r in results.items()} == dict.fromkeys(variants, "ok"), \
        {name: r.get("error") for name, r in results.items()}
    parent = MlflowClient().get_run(ctx["parent_run_id"])
    assert parent.data.metrics["keras3_translation_max_abs_diff"] < 1e-4
    assert results["prune-int8"]["sparsity"] > 0.02  # small kernels are left alone (measured 0.042)
