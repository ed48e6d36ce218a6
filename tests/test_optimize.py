"""Training-time techniques on a tiny CNN: figures measured on the Keras kernels and, for QAT,
on the int8 kernels of the converted LiteRT model (the honest check)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from pipeline.config import PipelineConfig
from pipeline.sources.data import load_dataset
from pipeline.sources.models import build_cnn, count_macs, load_model, predict_classes, tf_keras
from pipeline.errors import PipelineInputError, TechniqueError
from pipeline.techniques import clustering, distillation, pruning
from pipeline.techniques.finetune import outputs_probabilities
from pipeline.techniques.graph import fuse_layers
from pipeline.techniques.persistence import load_optimized, save_optimized
from pipeline.techniques.recipes import TECHNIQUES, apply_recipe, parse_recipe
from pipeline.techniques.stats import kernel_stats
from pipeline.techniques.train import compile_classifier, fit, set_seed
from pipeline.variants import OPTIMIZATION_ORDER

TARGET_SPARSITY = 0.75
CLUSTERS = 8


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("fashion-mnist", train_limit=600, test_limit=200)


@pytest.fixture(scope="module")
def config():
    """Quick settings taken as given: no sizing to the data, no retries (tests/test_small_models.py
    covers both)."""
    return PipelineConfig(finetune_epochs=1, prune_epochs=1, distill_epochs=1, batch_size=32, seed=7,
                          prune_sparsity=TARGET_SPARSITY, cluster_count=CLUSTERS,
                          size_to_data=False, technique_retries=0)


@pytest.fixture(scope="module")
def base_path(dataset, tmp_path_factory):
    """The default CNN trained one epoch (17 steps). BatchNorm momentum 0.5 so its moving
    variance settles within those steps: at Keras' 0.99 it stays near its initial 1.0, far above
    the real variances (~1e-3 after the first conv), and inference-mode accuracy is near chance."""
    import tf_keras
    tf_keras.backend.clear_session()  # layer names (conv2d, dense...) restart whatever ran before
    set_seed(7)
    model = build_cnn(dataset.input_shape, dataset.num_classes, name="teacher_cnn")
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            layer.momentum = 0.5
    compile_classifier(model, 2e-3)
    fit(model, dataset, epochs=1, batch_size=32)
    path = tmp_path_factory.mktemp("base") / "base.keras"
    model.save(path)
    return str(path)


def kernels(model) -> dict[str, np.ndarray]:
    """Conv/dense kernels of a plain tf_keras model, by layer name."""
    return {layer.name: layer.kernel.numpy() for layer in model.layers
            if type(layer).__name__ in ("Conv2D", "Dense")}


def convert_int8(model, dataset) -> bytes:
    import tensorflow as tf
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset.calibration_batches(100)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def litert_weights(tflite: bytes) -> list[np.ndarray]:
    """The rank-2/4 constant tensors (conv and fully-connected kernels, [out, ..., in]): unlike
    activations, constants hold data before any invoke."""
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    io = {d["index"] for d in interpreter.get_input_details() + interpreter.get_output_details()}
    weights = []
    for detail in interpreter.get_tensor_details():
        if detail["index"] in io or len(detail["shape"]) not in (2, 4):
            continue
        try:
            weights.append(interpreter.get_tensor(detail["index"]))
        except ValueError:  # an activation: no data yet
            continue
    return weights


def litert_predictions(tflite: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    classes = []
    for image in x:
        interpreter.set_tensor(inp["index"], image[None].astype(np.float32))
        interpreter.invoke()
        classes.append(int(interpreter.get_tensor(out["index"]).argmax()))
    return np.array(classes)


def test_registry_covers_the_optimization_order_and_recipes_are_ordered():
    assert set(TECHNIQUES) == set(OPTIMIZATION_ORDER)
    for name, module in TECHNIQUES.items():
        assert module.NAME == name and callable(module.apply)
    assert parse_recipe("qat+cluster+prune") == ("prune", "cluster", "qat")
    assert parse_recipe("distill+qat") == ("distill", "qat")
    with pytest.raises(TechniqueError, match="unknown technique 'quantize'"):
        parse_recipe("prune+quantize")
    with pytest.raises(TechniqueError, match="repeats"):
        parse_recipe("prune+prune")


def test_prune_reaches_the_target_sparsity(base_path, dataset, config, tmp_path):
    base = load_model(base_path)
    result = apply_recipe("prune", base_path, dataset, config, tmp_path)
    model = load_optimized(result["model_path"])

    plan = pruning.layer_plan(fuse_layers(base), config)
    pruned = set(plan)
    assert pruned == {"conv2d_1", "dense", "dense_1"}  # the 288-weight first conv stays dense
    targets = {name: layer["sparsity"] for name, layer in plan.items()}
    assert result["settings"]["prune"]["prune_layers"] == plan
    assert [attempt["settings"] for attempt in result["attempts"]["prune"]] == \
        [result["settings"]["prune"]]
    # The largest kernel (the dense head, 3136x128) gets the target; smaller ones less.
    assert targets["dense"] == TARGET_SPARSITY
    assert TARGET_SPARSITY > targets["conv2d_1"] > targets["dense_1"] > 0.1
    for name, kernel in kernels(model).items():
        sparsity = float(np.mean(kernel == 0))
        if name in pruned:
            assert abs(sparsity - targets[name]) <= 0.02, (name, sparsity)
        else:
            assert sparsity == 0.0, (name, sparsity)
    for name in ("dense", "dense_1"):  # dense kernels [in, out]: zeros in runs of prune_block inputs
        zeros = (kernels(model)[name] == 0).reshape(-1, config.prune_block, kernels(model)[name].shape[1])
        assert np.all(zeros.all(axis=1) | ~zeros.any(axis=1)), name
    assert result["sparsity"] >= 0.95 * TARGET_SPARSITY  # the dense head holds most weights
    assert result["macs"] == count_macs(base)
    assert result["params"] == model.count_params() == fuse_layers(base).count_params()

    saved = np.load(result["keras_predictions_path"])
    assert saved.shape == dataset.y_test.shape
    assert np.array_equal(saved, predict_classes(model, dataset.x_test))  # the saved model
    assert result["keras_test_accuracy"] == pytest.approx(float(np.mean(saved == dataset.y_test)))
    assert 0.0 <= result["val_accuracy"] <= 1.0


def test_fuse_layers_folds_dense_batchnorm_and_relu_exactly(base_path, dataset):
    base = load_model(base_path)
    fused = fuse_layers(base)
    names = [layer.name for layer in fused.layers]
    # dense -> batch_normalization_2 -> re_lu_2 became one Dense with a bias and a ReLU.
    assert "batch_normalization_2" not in names and "re_lu_2" not in names
    assert fused.get_layer("dense").use_bias
    assert fused.get_layer("dense").activation.__name__ == "relu"
    # conv -> BatchNorm -> ReLU is left to TF-MOT, which handles it.
    assert {"batch_normalization", "re_lu", "batch_normalization_1", "re_lu_1"} <= set(names)
    np.testing.assert_allclose(fused.predict(dataset.x_test, verbose=0),
                               base.predict(dataset.x_test, verbose=0), rtol=1e-4, atol=1e-4)
    assert fuse_layers(fused) is fused  # nothing left to fuse


def test_structured_pruning_leaves_two_zeros_in_every_group_of_four(base_path, dataset, config):
    structured = dataclasses.replace(config, prune_structured=True)
    model = pruning.apply(load_model(base_path), dataset, structured, applied=())
    checked = 0
    for name, kernel in kernels(model).items():
        in_channels = kernel.shape[-2]
        if in_channels % 4:
            assert not np.any(kernel == 0), name  # 1-channel first conv: no whole groups of four
            continue
        # Groups of four consecutive input channels for each output channel (and tap).
        groups = np.moveaxis(kernel, -1, 0).reshape(-1, 4)
        assert np.all(np.sum(groups == 0, axis=1) >= 2), name
        checked += 1
    assert checked == 3
    assert kernel_stats(model)["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_clustering_leaves_at_most_k_values_per_kernel(base_path, dataset, config):
    base = load_model(base_path)
    assert min(np.unique(k).size for k in kernels(base).values()) > CLUSTERS
    model = clustering.apply(base, dataset, config, applied=())
    for name, kernel in kernels(model).items():
        assert np.unique(kernel).size <= CLUSTERS, name
    assert kernel_stats(model)["unique_weights_max"] <= CLUSTERS


def test_qat_model_round_trips_and_converts_to_int8_kernels(base_path, dataset, config, tmp_path):
    result = apply_recipe("qat", base_path, dataset, config, tmp_path)
    model = load_optimized(result["model_path"])
    assert any(type(layer).__name__ == "QuantizeWrapperV2" for layer in model.layers)
    keras_classes = np.load(result["keras_predictions_path"])
    assert np.array_equal(predict_classes(model, dataset.x_test), keras_classes)
    # QAT's own variables are not counted.
    assert result["params"] == fuse_layers(load_model(base_path)).count_params()
    # The activations' int8 ranges were calibrated on the images: a ReLU's starts at 0, not near
    # TF-MOT's initial -6 (19 fine-tuning steps move its 0.999 moving average 2 % of the way).
    relu_minima = [float(w.numpy()) for w in model.weights
                   if "re_lu" in w.name and w.name.endswith("output_min:0")]
    assert relu_minima and max(map(abs, relu_minima)) < 0.1, relu_minima

    # Saving over an existing SavedModel directory replaces it and leaves no temporary files.
    assert save_optimized(model, tmp_path / "qat") == result["model_path"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat.savedmodel",
                                                          "qat.test-predictions.npy"]

    tflite = convert_int8(model, dataset)
    weights = litert_weights(tflite)
    assert len(weights) == 4 and all(w.dtype == np.int8 for w in weights)
    agreement = np.mean(litert_predictions(tflite, dataset.x_test) == keras_classes)
    assert agreement >= 0.9


def test_distilled_student_is_smaller_and_plain(base_path, dataset, config):
    teacher = load_model(base_path)
    # Three epochs (~50 steps): enough for the student's batch-norm statistics to settle.
    student = distillation.apply(teacher, dataset, dataclasses.replace(config, distill_epochs=3),
                                 applied=())
    keras = tf_keras()
    assert isinstance(student, keras.Sequential) and student.optimizer is None
    assert student.output_shape == (None, dataset.num_classes)
    assert student.layers[-1].activation.__name__ == "linear"  # logits
    assert student.count_params() < teacher.count_params()
    assert count_macs(student) <= 0.30 * count_macs(teacher)
    # It agrees with the teacher well above chance, and it trained: its weights moved away from
    # the teacher's cut to its width, where it started.
    agreement = np.mean(predict_classes(student, dataset.x_test)
                        == predict_classes(teacher, dataset.x_test))
    assert agreement > 0.3  # chance is 0.1
    start = build_cnn(dataset.input_shape, dataset.num_classes, width=config.student_width)
    assert distillation.inherit_weights(start, teacher) == 7  # 3 conv/dense + BatchNorm, 1 head
    moved = [np.abs(a - b).max() for a, b in zip(student.get_weights(), start.get_weights())]
    assert len(moved) == len(start.get_weights()) and min(moved) > 0


def test_a_softmax_teacher_contributes_log_probabilities(base_path, dataset):
    keras = tf_keras()
    logits_teacher = load_model(base_path)
    probability_teacher = keras.Model(logits_teacher.input,
                                      keras.layers.Softmax()(logits_teacher.output))
    x = dataset.x_test[:16]
    logits = distillation.teacher_logits(logits_teacher, x)
    from_probabilities = distillation.teacher_logits(probability_teacher, x)
    log_softmax = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    np.testing.assert_allclose(from_probabilities, np.maximum(log_softmax, np.log(1e-7)), atol=1e-4)


def test_a_softmax_teacher_gets_a_student_trained_on_logits_and_served_with_softmax():
    """A user's model that ends in softmax (keras.applications do): the student trains on
    logits (a softmax under the logits loss flattened the gradients and kept a MobileNetV2
    student near chance) and is handed back with the teacher's softmax, so it serves alike."""
    keras = tf_keras()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(12, activation="relu")(x)
    with_dense_softmax = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    with_softmax_layer = keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(4)(x)))
    for teacher in (with_dense_softmax, with_softmax_layer):
        training = distillation.scaled_copy(teacher, 0.5, logits=True)
        served = distillation.scaled_copy(teacher, 0.5)
        assert not outputs_probabilities(training) and outputs_probabilities(served)
        assert [w.shape for w in training.get_weights()] == [w.shape for w in served.get_weights()]
        assert training.layers[1].filters == 8 and training.output_shape == (None, 4)
        served.set_weights(training.get_weights())
        images = np.random.default_rng(0).random((5, 8, 8, 3), dtype=np.float32)
        np.testing.assert_allclose(served(images).numpy(), _softmax(training(images).numpy()),
                                   atol=1e-5)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@pytest.mark.pipeline  # three trainings and an int8 conversion, a minute or more; make test-stack
def test_prune_cluster_qat_keeps_sparsity_and_clusters_in_int8(base_path, dataset, config,
                                                               tmp_path):
    result = apply_recipe("prune+cluster+qat", base_path, dataset, config, tmp_path)
    assert result["recipe"] == "prune+cluster+qat"
    assert result["sparsity"] >= 0.9 * TARGET_SPARSITY
    assert result["unique_weights_per_channel_max"] <= CLUSTERS

    model = load_optimized(result["model_path"])  # a PCQAT model reloads
    assert np.array_equal(predict_classes(model, dataset.x_test),
                          np.load(result["keras_predictions_path"]))

    weights = litert_weights(convert_int8(model, dataset))
    assert len(weights) == 4 and all(w.dtype == np.int8 for w in weights)
    zeros = sum(int(np.sum(w == 0)) for w in weights)
    assert zeros / sum(w.size for w in weights) >= 0.9 * TARGET_SPARSITY
    for weight in weights:  # LiteRT layout [out, ..., in]: one row per output channel
        rows = weight.reshape(weight.shape[0], -1)
        assert max(np.unique(row).size for row in rows) <= CLUSTERS + 1


def test_a_keras3_model_is_refused_with_a_clear_error(dataset, config, tmp_path):
    import keras  # Keras 3, beside tf_keras
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.save(tmp_path / "k3.keras")
    with pytest.raises(TechniqueError) as error:
        apply_recipe("prune+qat", str(tmp_path / "k3.keras"), dataset, config, tmp_path / "out")
    message = str(error.value)
    assert "prune+qat" in message and "tf_keras (Keras 2)" in message and "Keras 3" in message
    assert not isinstance(error.value, PipelineInputError)
    assert not (tmp_path / "out").exists()


def test_an_unsupported_layer_is_named_in_the_error(dataset, config, tmp_path):
    keras = tf_keras()
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(16),
                              keras.layers.LayerNormalization(name="my_layer_norm"),
                              keras.layers.Dense(10)])
    model.save(tmp_path / "layer_norm.keras")
    with pytest.raises(TechniqueError, match=r"^qat: .*'my_layer_norm' \(LayerNormalization\)"):
        apply_recipe("qat", str(tmp_path / "layer_norm.keras"), dataset, config, tmp_path / "out")


def stage_context(name: str, base_model: str, dataset, config, tmp_path, monkeypatch) -> dict:
    """A run context as `stages.train` hands it on: a real parent run in the session's MLflow
    store, the baseline and the prepared dataset stored in its artifacts and named by URI, and
    this machine's scratch folder under `tmp_path`."""
    import uuid

    from pipeline import stages
    from pipeline.contract import Reference, RunContext
    from pipeline.store import artifacts, tracking
    monkeypatch.setenv("PIPELINE_WORK_DIR", str(tmp_path / "work"))
    pipeline_run_id = f"test-optimize-{name}-{uuid.uuid4().hex[:8]}"
    parent = tracking.start_parent_run("test-optimize", pipeline_run_id, params={}, tags={})
    base_model_uri = artifacts.store(parent, base_model, stages.BASELINE_FOLDER)
    return RunContext(
        pipeline_run_id=pipeline_run_id, parent_run_id=parent, experiment="test-optimize",
        config=config, num_classes=dataset.num_classes, base_model_uri=base_model_uri,
        base_model_kind="tf_keras",
        # What train hands on for a tf_keras model: the techniques start from it as it is.
        technique_base_uri=base_model_uri, techniques_unavailable=None,
        dataset_uri=artifacts.store(parent, dataset.save(tmp_path / "dataset.json"),
                                    stages.TRAIN_FOLDER),
        # optimize reads neither: no reference model or predictions in these tests
        reference=Reference(tflite_uri="", accuracy=0.0, size_bytes=0, keras_accuracy=0.0),
        baseline_predictions_uri="").to_dict()


@pytest.mark.pipeline  # two trainings (prune, cluster) through the stages and MLflow; make test-stack
def test_a_collaborative_recipe_continues_from_its_prefix_trained_once(base_path, dataset, config,
                                                                       tmp_path, monkeypatch):
    from pipeline.store import artifacts
    from pipeline import stages
    ctx = stage_context("collaborative", base_path, dataset, config, tmp_path, monkeypatch)
    calls = []
    real_prune = pruning.apply
    monkeypatch.setattr(pruning, "apply", lambda *a, **k: calls.append("prune") or real_prune(*a, **k))

    combined = stages.optimize(ctx, "prune+cluster")  # trains and records 'prune' first
    alone = stages.optimize(ctx, "prune")             # its own task finds that record
    assert calls == ["prune"]
    # Both records are on the parent run, and each is what its task handed on.
    parent = ctx["parent_run_id"]
    assert artifacts.load_json(parent, stages._recipe_record("prune")) == alone
    assert artifacts.load_json(parent, stages._recipe_record("prune+cluster")) == combined
    for record in (alone, combined):  # URIs into the artifact store, no local path
        assert "model_path" not in record and "keras_predictions_path" not in record
        for key in ("model_uri", "keras_predictions_uri"):
            assert artifacts.parse(record[key])[0] == parent, record[key]
    pruned = kernels(load_optimized(artifacts.fetch(alone["model_uri"])))
    clustered = kernels(load_optimized(artifacts.fetch(combined["model_uri"])))
    for name, kernel in pruned.items():  # clustering kept every zero pruning made
        assert np.all(clustered[name][kernel == 0] == 0), name
        assert np.unique(clustered[name]).size <= CLUSTERS, name
    assert combined["sparsity"] >= alone["sparsity"] > 0.5

    with pytest.raises(ValueError, match="not a shorter prefix"):
        apply_recipe("prune+cluster", base_path, dataset, config, tmp_path / "x",
                     start=("cluster", str(artifacts.fetch(combined["model_uri"]))))


def test_a_failed_prefix_fails_its_recipes_with_its_reason(dataset, config, tmp_path, monkeypatch):
    import keras  # Keras 3: pruning refuses it
    from pipeline.store import artifacts, tracking
    from pipeline import stages
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.save(tmp_path / "k3.keras")
    ctx = stage_context("failed-prefix", str(tmp_path / "k3.keras"), dataset, config, tmp_path,
                        monkeypatch)
    with pytest.raises(TechniqueError, match=r"^its first step 'prune' failed: TechniqueError: prune: needs a tf_keras"):
        stages.optimize(ctx, "prune+cluster+qat")
    parent = ctx["parent_run_id"]
    records = {Path(a.path).name for a in tracking.list_artifacts(parent, stages.OPTIMIZED_FOLDER)
               if a.path.endswith(".json")}
    assert records == {"prune.json", "prune+cluster.json", "prune+cluster+qat.json"}
    for recipe in ("prune", "prune+cluster", "prune+cluster+qat"):
        record = artifacts.load_json(parent, stages._recipe_record(recipe))
        assert record["recipe"] == recipe and "model_uri" not in record, record
        assert "prune: needs a tf_keras" in record["error"], record


def test_flips_only_where_they_keep_the_label():
    assert PipelineConfig().flips  # Fashion-MNIST: clothes are left-right symmetric
    assert not PipelineConfig(dataset="digits.npz").flips  # a flipped digit is another class
    assert PipelineConfig(dataset="my_photos", augment="flip").flips
    assert not PipelineConfig(augment="none").flips


def test_qat4_leaves_dense_kernels_on_the_grid_the_int4_mode_stores(base_path, dataset, config,
                                                                     tmp_path):
    """After qat4 the int4 mode's rounding is exact: the int4 file's integers times its scales
    are the Keras kernels, so the int4 model computes what the fine-tuned Keras model does."""
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.runtime.litert_quantizer import quantize_tflite
    from pipeline.runtime.quantize import convert
    def int4_grid(kernel):  # LiteRT Quantizer's int4 rule: max|w| -> 7 per output channel
        scale = np.maximum(np.abs(kernel).max(axis=0), 1e-9) / 7
        return (np.clip(np.rint(kernel / scale), -8, 7) * scale).astype(kernel.dtype)

    result = apply_recipe("prune+qat4", base_path, dataset, config, tmp_path)
    assert result["sparsity"] >= 0.9 * TARGET_SPARSITY  # pruned weights stay zero
    model = load_optimized(result["model_path"])
    dense = {k.T.shape: k for k in kernels(model).values() if k.ndim == 2}
    assert len(dense) == 2
    for kernel in dense.values():
        np.testing.assert_allclose(int4_grid(kernel), kernel, rtol=1e-6, atol=0)
        assert max(np.unique(column).size for column in kernel.T) <= 16

    float_path = convert("float32", tmp_path / "float32.tflite", model=model)
    int4_path = quantize_tflite("int4", float_path, tmp_path / "int4.tflite")
    interpreter = Interpreter(model_path=str(int4_path))
    checked = 0
    for detail in interpreter.get_tensor_details():
        scales = detail["quantization_parameters"]["scales"]
        if tuple(detail["shape"]) not in dense or scales.size <= 1:
            continue
        integers = interpreter.get_tensor(detail["index"]).astype(np.float32)
        assert integers.min() >= -8 and integers.max() <= 7
        np.testing.assert_allclose(integers * scales[:, None], dense[tuple(detail["shape"])].T,
                                   rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == 2
    agreement = np.mean(litert_predictions(int4_path.read_bytes(), dataset.x_test)
                        == predict_classes(model, dataset.x_test))
    assert agreement >= 0.98


@pytest.mark.pipeline  # three trainings (prune, cluster, QAT int4); make test-stack
def test_qat4_after_clustering_keeps_the_convolutions_clusters_and_zeros(base_path, dataset,
                                                                          config, tmp_path):
    """The convolutions (int8 in the int4 mode) train only their shared values: same zeros, no
    more distinct values than clustering left, but not frozen."""
    clustered = apply_recipe("prune+cluster", base_path, dataset, config, tmp_path)
    result = apply_recipe("prune+cluster+qat4", base_path, dataset, config, tmp_path,
                          start=("prune+cluster", clustered["model_path"]))
    before = kernels(load_optimized(clustered["model_path"]))
    after = kernels(load_optimized(result["model_path"]))
    convs = [name for name, kernel in before.items() if kernel.ndim == 4]
    assert convs
    for name in convs:
        np.testing.assert_array_equal(after[name] == 0, before[name] == 0)
        assert np.unique(after[name]).size <= np.unique(before[name]).size
    assert any(not np.array_equal(after[name], before[name]) for name in convs)


def test_qat_and_qat4_are_not_combined():
    with pytest.raises(TechniqueError, match="trained for one of them"):
        parse_recipe("qat+qat4")


def test_pointwise_convolutions_are_pruned_in_runs_along_their_inputs(tmp_path):
    """A 1x1 Conv2D kernel is stored like a Dense kernel ([out, 1, 1, in]): with
    prune_block_pointwise, pruning zeroes it in runs of inputs (gzip stores a run in a few bits);
    larger windows stay weight by weight."""
    from tests.small_models import shape_images
    keras = tf_keras()
    data = load_dataset(str(shape_images(tmp_path / "shapes.npz", classes=3, train=120, test=30,
                                         size=16)))
    inputs = keras.Input(data.input_shape)
    x = keras.layers.Conv2D(128, 3, activation="relu", name="window")(inputs)
    x = keras.layers.Conv2D(64, 1, activation="relu", name="pointwise")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    default = PipelineConfig(prune_sparsity=0.8, prune_size_exponent=0.0)
    assert pruning.layer_plan(model, default)["pointwise"]["block"] == 1  # off by default
    config = PipelineConfig(prune_sparsity=0.8, prune_size_exponent=0.0, prune_epochs=1,
                            size_to_data=False, batch_size=32, prune_block_pointwise=True)
    plan = pruning.layer_plan(model, config)
    assert plan["pointwise"]["block"] == 16 and plan["window"]["block"] == 1
    pruned = pruning.apply(model, data, config)
    kernel = pruned.get_layer("pointwise").get_weights()[0]  # [1, 1, in, out]
    zeros = (kernel[0, 0] == 0).reshape(128 // 16, 16, 64)   # runs of 16 inputs per output
    assert abs(float(np.mean(kernel == 0)) - plan["pointwise"]["sparsity"]) <= 0.02
    assert np.all(zeros.all(axis=1) | ~zeros.any(axis=1))
    window = pruned.get_layer("window").get_weights()[0]
    assert abs(float(np.mean(window == 0)) - plan["window"]["sparsity"]) <= 0.02
    # TF-MOT's own check is back once pruning has built its wrappers.
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl
    assert pruning_impl.Pruning._validate_block.__name__ == "_validate_block"
