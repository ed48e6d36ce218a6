"""Conversion in every mode, batched LiteRT evaluation, and the subprocess benchmark."""
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from pipeline.sources import models
from pipeline.runtime.benchmark import gzip_size, measure, weight_stats
from pipeline.runtime.evaluate import evaluate_tflite
from pipeline.runtime.litert import TFLiteRunner
from pipeline.runtime.quantize import convert


@pytest.fixture(scope="module")
def converted(tiny_model_path, small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite")
    model = models.load_model(tiny_model_path)
    calibration = small_dataset.calibration_batches(64)
    paths = {}
    for mode in ("float32", "dynamic", "float16", "int8", "int16x8"):
        paths[mode] = convert(mode, out / f"{mode}.tflite", model=model,
                              representative_data=calibration if mode in ("int8", "int16x8") else None)
    return model, paths


def test_every_mode_converts_with_expected_sizes_and_types(converted):
    _, paths = converted
    sizes = {mode: path.stat().st_size for mode, path in paths.items()}
    assert sizes["float32"] / sizes["dynamic"] >= 3.5
    assert 1.8 <= sizes["float32"] / sizes["float16"] <= 2.1
    assert sizes["float32"] / sizes["int8"] >= 3.5
    int8 = Interpreter(model_path=str(paths["int8"]))
    assert int8.get_input_details()[0]["dtype"] == np.int8
    assert int8.get_output_details()[0]["dtype"] == np.int8
    int16 = Interpreter(model_path=str(paths["int16x8"]))
    assert any(d["dtype"] == np.int16 for d in int16.get_tensor_details())


def test_batched_evaluation_matches_one_image_per_invoke(converted, small_dataset):
    _, paths = converted
    x = small_dataset.x_test[:70]
    runner = TFLiteRunner(str(paths["int8"]), max_batch=32)
    assert runner.runtime == "compiled" and runner.max_batch == 32  # it really batches
    batched = runner.predict_classes(x)
    single = TFLiteRunner(str(paths["int8"]), max_batch=1).predict_classes(x)
    assert np.array_equal(batched, single)


def test_tflite_accuracy_agrees_with_keras(converted, small_dataset):
    model, paths = converted
    keras_pred = models.predict_classes(model, small_dataset.batches("test", 64))
    for mode in ("float32", "dynamic", "int8"):
        evaluation = evaluate_tflite(str(paths[mode]), small_dataset.batches("test", 64),
                                     small_dataset.class_names, keras_pred)
        keras_accuracy = float((keras_pred == small_dataset.y_test).mean())
        assert evaluation.test_images == len(small_dataset.y_test)
        assert evaluation.keras_agreement >= (0.999 if mode == "float32" else 0.95), mode
        assert abs(evaluation.accuracy - keras_accuracy) <= (0.001 if mode == "float32" else 0.03)
        assert set(evaluation.per_class_accuracy) == set(small_dataset.class_names)
        assert evaluation.runtime["runtime"] == "compiled", evaluation.runtime


def test_the_compiled_model_and_the_interpreter_agree(converted, small_dataset):
    """Evaluation, benchmark and serving run on the CompiledModel; the interpreter is the
    fallback. Both must give the same scores, for every mode they both run."""
    _, paths = converted
    x = small_dataset.x_test[:50]
    for mode, path in paths.items():
        compiled = TFLiteRunner(path, max_batch=16)
        interpreter = TFLiteRunner(path, max_batch=16, runtime="interpreter")
        assert interpreter.runtime == "interpreter"
        if compiled.runtime == "compiled":
            np.testing.assert_allclose(compiled.scores(x), interpreter.scores(x), atol=1e-3,
                                       err_msg=mode)
        else:  # a fallback says why
            assert compiled.fallback_reason, mode
    assert TFLiteRunner(paths["float32"]).runtime == "compiled"
    assert TFLiteRunner(paths["int8"]).runtime == "compiled"


def test_benchmark_measures_in_a_subprocess(converted):
    _, paths = converted
    result = measure(paths["dynamic"], runs=15, warmup=2)
    assert result.size_bytes == paths["dynamic"].stat().st_size
    assert 0 < result.gzip_size_bytes < result.size_bytes
    assert 0 < result.latency_ms_p50 <= result.latency_ms_p90
    assert result.peak_memory_mb > 0


def test_benchmark_failure_names_the_model(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(RuntimeError, match="bad.tflite"):
        measure(bad, runs=2, warmup=1)


def test_weight_stats_reads_sparsity_and_unique_values(tmp_path):
    import tf_keras
    model = tf_keras.Sequential([tf_keras.Input((16,)), tf_keras.layers.Dense(8)])
    kernel, bias = model.get_weights()
    kernel = np.where(np.arange(kernel.size).reshape(kernel.shape) % 4 == 0, 0.5, 0.0)
    model.set_weights([kernel.astype(np.float32), bias])
    path = convert("float32", tmp_path / "m.tflite", model=model)
    stats = weight_stats(path)
    assert stats["sparsity"] == pytest.approx(0.75)
    assert stats["unique_weights_max"] == 2
    assert gzip_size(path) < path.stat().st_size


def test_a_graph_only_partly_on_xnnpack_runs_one_image_at_a_time(tmp_path, small_dataset):
    """LayerNormalization keeps part of the graph off XNNPACK; the CompiledModel then resizes the
    input but not the output, so a batch would overrun the output buffer. The runner notices,
    runs one image per call on the same runtime, and agrees with the interpreter."""
    from tests.conftest import layernorm_classifier
    path = convert("float32", tmp_path / "layernorm.tflite",
                   model=layernorm_classifier(small_dataset))
    runner = TFLiteRunner(path)
    assert runner.runtime == "compiled" and runner.kernels == "xnnpack+builtin"
    assert runner.max_batch == 1
    x = small_dataset.x_test[:40]
    np.testing.assert_allclose(runner.scores(x), TFLiteRunner(path, runtime="interpreter").scores(x),
                               atol=1e-4)
    assert TFLiteRunner(path, runtime="interpreter").max_batch > 1


def test_sparse_storage_shrinks_a_pruned_model_and_it_still_runs(tmp_path, small_dataset):
    """EXPERIMENTAL_SPARSITY on a model with zeroed weights: a smaller raw file, the same
    predictions, run on the built-in kernels because XNNPACK refuses sparse tensors."""
    import numpy as np

    from pipeline.runtime.litert import TFLiteRunner
    from pipeline.runtime.quantize import convert
    from pipeline.sources.models import build_cnn
    model = build_cnn(small_dataset.input_shape, small_dataset.num_classes)
    weights = model.get_weights()
    dense = max(range(len(weights)), key=lambda i: weights[i].size)  # the big Dense kernel
    mask = np.zeros_like(weights[dense])
    inputs = np.arange(mask.shape[0])
    mask[(inputs // 4) % 10 == 0] = 1.0  # 9 of 10 runs of 4 consecutive inputs zeroed, as pruning does
    weights[dense] = weights[dense] * mask
    model.set_weights(weights)
    plain = convert("dynamic", tmp_path / "dense.tflite", model=model)
    sparse = convert("dynamic", tmp_path / "sparse.tflite", model=model, sparse=True)
    assert sparse.stat().st_size < 0.6 * plain.stat().st_size
    x = small_dataset.x_test[:64]
    runner = TFLiteRunner(sparse)
    assert runner.kernels == "builtin" and TFLiteRunner(plain).kernels == "xnnpack"
    np.testing.assert_allclose(runner.scores(x), TFLiteRunner(plain).scores(x), atol=0.05)
