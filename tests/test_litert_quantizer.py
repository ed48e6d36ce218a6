"""LiteRT Quantizer modes on a float32 .tflite: int4, mixed int4/int8, sensitivity, and the
converter's modes for a model whose only source is a .tflite."""
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from pipeline.sources import models
from pipeline.runtime.benchmark import measure
from pipeline.runtime.evaluate import evaluate_tflite
from pipeline.runtime.litert import TFLiteRunner
from pipeline.runtime.litert_quantizer import (INT4_CAPABLE_OPS, WEIGHT_ONLY, QuantizerError,
                                       int4_placement, quantize_mixed, quantize_tflite,
                                       sensitivity, weighted_ops)
from pipeline.runtime.quantize import convert
from pipeline.selection.report import sensitivity_markdown


@pytest.fixture(scope="module")
def tflite(tiny_model_path, small_dataset, tmp_path_factory):
    """The tiny CNN's float32 and converter-dynamic .tflite files, and its quantizer int4 file."""
    out = tmp_path_factory.mktemp("litert-quantizer")
    model = models.load_model(tiny_model_path)
    paths = {mode: convert(mode, out / f"{mode}.tflite", model=model)
             for mode in ("float32", "dynamic")}
    paths["int4"] = quantize_tflite("int4", paths["float32"], out / "int4.tflite")
    return paths


@pytest.fixture(scope="module")
def calibration(small_dataset):
    return [small_dataset.x_train[i:i + 32] for i in range(0, 128, 32)]


def accuracy(path, dataset):
    return evaluate_tflite(str(path), dataset.batches("test"), dataset.class_names).accuracy


def int4_weight_tensors(path) -> int:
    """Tensors stored as INT4 in the flatbuffer (the interpreter reports them as int8)."""
    return weight_tensors(path, "INT4")


def weight_tensors(path, tensor_type: str) -> int:
    """Tensors of `tensor_type` (INT4, INT8, FLOAT16...) in the flatbuffer."""
    from litert_quantizer import qtyping
    from litert_quantizer.utils import tfl_flatbuffer_utils
    model = tfl_flatbuffer_utils.read_model(str(path))
    wanted = getattr(qtyping.TensorType, tensor_type)
    return sum(t.type == wanted for t in model.subgraphs[0].tensors)


def test_int4_is_much_smaller_than_int8_runs_and_keeps_accuracy(tflite, small_dataset):
    assert tflite["int4"].stat().st_size < 0.65 * tflite["dynamic"].stat().st_size
    assert int4_weight_tensors(tflite["int4"]) == 2  # both Dense kernels; convs stay int8
    assert accuracy(tflite["int4"], small_dataset) >= accuracy(tflite["float32"], small_dataset) - 0.03
    scores = TFLiteRunner(tflite["int4"]).scores(small_dataset.x_test[:40])
    assert scores.shape == (40, small_dataset.num_classes) and np.isfinite(scores).all()
    measured = measure(tflite["int4"], runs=5, warmup=1)
    assert measured.runtime == "compiled" and measured.fallback_reason is None


def test_measure_reports_the_runtime_it_fell_back_to(tflite, calibration, tmp_path):
    from litert_quantizer import Quantizer, recipe
    quantizer = Quantizer(str(tflite["float32"]))  # int16 input: the CompiledModel cannot be fed
    quantizer.load_quantization_recipe(recipe.static_wi8_ai16())
    (key, signature), = Interpreter(model_path=str(tflite["float32"])).get_signature_list().items()
    data = {key: [{signature["inputs"][0]: batch} for batch in calibration]}
    int16_io = tmp_path / "int16-io.tflite"
    quantizer.quantize(quantizer.calibrate(data, num_threads=1)).export_model(str(int16_io))
    measured = measure(int16_io, runs=3, warmup=1)
    assert measured.runtime == "interpreter" and "int16" in measured.fallback_reason
    assert measured.latency_ms_p50 > 0


def test_sensitivity_has_one_finite_row_per_weighted_op(tflite, calibration):
    rows = sensitivity(tflite["float32"], "int4", calibration)
    assert [row["op"] for row in rows] == ["CONV_2D", "CONV_2D", "FULLY_CONNECTED", "FULLY_CONNECTED"]
    assert [row["quantization"] for row in rows] == ["int8", "int8", "int4", "int4"]
    assert len({row["layer"] for row in rows}) == 4
    assert [row["weights"] for row in rows] == [op.weights for op in weighted_ops(tflite["float32"])]
    for row in rows:
        for key in ("layer_snr_db", "layer_cosine", "output_snr_db", "output_cosine"):
            assert np.isfinite(row[key]), (row["layer"], key)
        assert 0.9 < row["output_cosine"] <= 1.0 + 1e-6
    int4_snr = max(r["layer_snr_db"] for r in rows if r["quantization"] == "int4")
    assert int4_snr < min(r["layer_snr_db"] for r in rows if r["quantization"] == "int8")
    table = sensitivity_markdown(rows)
    assert table.count("\n") == 2 + len(rows) and "FULLY_CONNECTED" in table


def test_mixed_keeps_sensitive_layers_until_the_budget_holds(tflite, small_dataset, calibration,
                                                             tmp_path):
    table = sensitivity(tflite["float32"], "int4", calibration)

    def two_points_per_int4_tensor(path):  # deterministic: each int4 kernel costs 2 points
        return 0.9 - 0.02 * int4_weight_tensors(path)

    tight = quantize_mixed(tflite["float32"], tmp_path / "tight.tflite",
                           accuracy_of=two_points_per_int4_tensor, max_drop_pts=2.5, table=table)
    assert tight.within_budget and len(tight.kept) == 1
    most_sensitive = min((r for r in table if r["quantization"] == "int4"),
                         key=lambda r: r["output_snr_db"])["layer"]
    assert tight.kept == [most_sensitive] and tight.layers[most_sensitive] == "int8"
    assert int4_weight_tensors(tight.path) == 1
    size = tight.path.stat().st_size
    assert tflite["int4"].stat().st_size < size < tflite["dynamic"].stat().st_size

    huge = quantize_mixed(tflite["float32"], tmp_path / "huge.tflite", calibration=calibration,
                          accuracy_of=lambda path: accuracy(path, small_dataset), max_drop_pts=50)
    assert huge.kept == [] and len(huge.trials) == 1
    assert int4_weight_tensors(huge.path) == 2
    assert not list(tmp_path.glob("*.candidate*"))


def conv_weights_dequantized(path, *tensor_types: str) -> bool:
    """Whether every CONV_2D of `path` takes its weights from a DEQUANTIZE of one of
    `tensor_types` (weight-only: a float kernel), as the int4 modes store a kind whose hybrid
    kernel is slow."""
    from litert_quantizer import qtyping
    from litert_quantizer.utils import tfl_flatbuffer_utils
    model = tfl_flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    wanted = {getattr(qtyping.TensorType, name) for name in tensor_types}
    dequantized = {op.outputs[0] for op in graph.operators
                   if len(op.inputs) == 1 and graph.tensors[op.inputs[0]].type in wanted}
    convs = [op for op in graph.operators if len(op.inputs) >= 2
             and len(graph.tensors[op.inputs[1]].shape) == 4]
    return bool(convs) and all(op.inputs[1] in dequantized for op in convs)


@pytest.mark.parametrize("conv_latency, chosen, tried, fits", [
    # MobileNetV2's case: hybrid int4/int8 convolutions are slow, int8 weight-only ones are not
    ({"INT8": 0.1, "FLOAT16": 0.1}, "int8-weight-only", ["int4", "int8", "int8-weight-only"],
     [False, False, True]),
    # only float16 weights keep the speed: the last resort (what undecided kinds get)
    ({"FLOAT16": 0.1}, "float16", ["int4", "int8", "int8-weight-only"], [False, False, False]),
    # int8 weight-only misses the limit that float16 just makes, by less than the timer's noise
    # on a tiny model (the same float kernels run either way): the smaller weights stay
    ({"INT8": 0.6, "FLOAT16": 0.45}, "int8-weight-only", ["int4", "int8", "int8-weight-only"],
     [False, False, True]),
])
def test_int4_placement_keeps_the_smallest_weights_that_are_not_slower(
        tflite, small_dataset, calibration, tmp_path, conv_latency, chosen, tried, fits):
    """A kind whose int4 or int8 weights make the model slower than the limit gets the next
    smaller precision that fits, and int8 weight-only over float16 unless it is slower than
    float16; the others the smallest. Latency is a deterministic stand-in here."""
    def latency(path):
        return next((ms for stored, ms in conv_latency.items()
                     if conv_weights_dequantized(path, stored)), 1.0)

    placement = int4_placement(tflite["float32"], tmp_path, latency_limit_ms=0.5,
                               latency_of=latency, int4_ops=INT4_CAPABLE_OPS)
    assert placement.kinds() == {"FULLY_CONNECTED": "int4", "CONV_2D": chosen}
    assert placement.options() == {"int4_ops": ("FULLY_CONNECTED",),
                                   "weight_only": {"CONV_2D": chosen}}
    assert [(t["kind"], t["precision"]) for t in placement.trials] == [
        ("FULLY_CONNECTED", "int4"), *[("CONV_2D", precision) for precision in tried]]
    assert [t["fits"] for t in placement.trials] == [True, *fits]
    # float16 is timed beside int8 weight-only when that misses the limit
    assert placement.trials[-1].get("float16_latency_ms_p50") == (
        None if conv_latency.get("INT8", 1.0) <= 0.5 else conv_latency["FLOAT16"])
    assert placement.to_dict()["kinds"] == placement.kinds()
    assert not list(tmp_path.iterdir())  # the timed candidates are gone

    path = quantize_tflite("int4", tflite["float32"], tmp_path / "placed.tflite",
                           **placement.options())
    assert int4_weight_tensors(path) == 2
    assert conv_weights_dequantized(path, {"int8-weight-only": "INT8"}.get(chosen, "FLOAT16"))
    assert accuracy(path, small_dataset) >= accuracy(tflite["float32"], small_dataset) - 0.03
    rows = sensitivity(tflite["float32"], "int4", calibration, **placement.options())
    assert [row["quantization"] for row in rows] == [chosen, chosen, "int4", "int4"]


def test_a_tflite_alone_gives_dynamic_int8_and_int4(tflite, small_dataset, calibration, tmp_path):
    float_accuracy = accuracy(tflite["float32"], small_dataset)
    for mode in ("dynamic", "int8", "int4"):
        path = quantize_tflite(mode, tflite["float32"], tmp_path / f"{mode}.tflite",
                               calibration=calibration if mode == "int8" else None)
        assert path.stat().st_size < 0.3 * tflite["float32"].stat().st_size, mode
        assert accuracy(path, small_dataset) >= float_accuracy - 0.03, mode
    assert Interpreter(model_path=str(tmp_path / "int8.tflite")).get_input_details()[0]["dtype"] == np.int8


def test_refusals_are_one_line_quantizer_errors(tflite, small_dataset, calibration, tmp_path):
    import tf_keras
    with pytest.raises(QuantizerError, match="^int8 quantization of float32.tflite needs calibration"):
        quantize_tflite("int8", tflite["float32"], tmp_path / "a.tflite")
    with pytest.raises(QuantizerError, match="already quantized"):
        quantize_tflite("int4", tflite["dynamic"], tmp_path / "b.tflite")
    (tmp_path / "junk.tflite").write_bytes(b"\x00" * 64)
    with pytest.raises(QuantizerError, match="^int4 quantization of junk.tflite failed: cannot read"):
        quantize_tflite("int4", tmp_path / "junk.tflite", tmp_path / "b.tflite")
    layers = tf_keras.layers
    leaky = tf_keras.Sequential([tf_keras.Input(small_dataset.input_shape), layers.Conv2D(4, 3),
                                 layers.LeakyReLU(), layers.Flatten(), layers.Dense(10)])
    source = convert("float32", tmp_path / "leaky.tflite", model=leaky)
    with pytest.raises(QuantizerError, match="LEAKY_RELU") as refused:
        quantize_tflite("int8", source, tmp_path / "c.tflite", calibration=calibration)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "c.tflite").exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="quantize_mixed"):
        quantize_tflite("mixed", tflite["float32"], tmp_path / "d.tflite")


def test_int4_and_mixed_variant_names():
    from pipeline.errors import PipelineInputError
    from pipeline.runtime.quantize import configure
    from pipeline.variants import parse_variant
    for name in ("int4", "cluster-int4", "prune+cluster-int4", "distill-int4", "mixed",
                 "prune+cluster+qat4-int4", "qat4-int4"):
        assert parse_variant(name).name == name
    assert parse_variant("prune+cluster-int4").quantization == "int4"
    assert parse_variant("prune+cluster+qat4-int4").recipe == "prune+cluster+qat4"
    with pytest.raises(PipelineInputError, match="use qat-int8$"):
        parse_variant("qat-int4")
    with pytest.raises(PipelineInputError, match="use prune\\+qat4-int4$"):
        parse_variant("prune+qat4-int8")
    with pytest.raises(PipelineInputError, match="trained for one of them"):
        parse_variant("qat+qat4-int4")
    with pytest.raises(ValueError, match="litert_quantizer"):
        configure(object(), "int4")  # the TF converter must not mistake int4 for dynamic


# ------------------------------------------------------------- through the pipeline's stages
@pytest.mark.pipeline  # a whole run of eight variants; make test-stack
def test_a_tflite_input_runs_the_post_training_variants_and_skips_the_others(
        tflite, tiny_model_path, small_dataset, tmp_path):
    """`--model model.tflite` (e.g. converted from PyTorch): the post-training variants, int4 and
    mixed included, are produced and measured; the training-time ones are `skipped` with the
    reason, in the child runs' tags and the report; int4/int8/mixed carry a sensitivity table."""
    from mlflow import MlflowClient

    from pipeline.store import artifacts
    from pipeline import stages
    from pipeline.api import run_stages
    post_training = ["float32", "dynamic", "float16", "int8", "int4", "mixed"]
    variants = post_training + ["prune-int8", "distill-int4"]
    config = {"model_path": str(tflite["float32"]), "variants": variants, "train_limit": 1200,
              "test_limit": 300, "latency_runs": 10, "latency_warmup": 2,
              "calibration_samples": 32, "experiment": "tflite-input",
              "registered_model_name": "tflite-input"}
    run = run_stages(config, "tflite-input-run")
    ctx, outcome = run.context, run.registered
    selected = {"summary_markdown": run.summary_markdown,
                "failed_variants": [r["variant"] for r in run.variants if r["status"] == "failed"]}
    results = {r["variant"]: r for r in stages.results_of(ctx)}
    assert {n: results[n]["status"] for n in post_training} == dict.fromkeys(post_training, "ok"), \
        {n: r.get("error") for n, r in results.items()}
    for name in ("prune-int8", "distill-int4"):
        assert results[name]["status"] == "skipped"
        assert "a .tflite model (a graph, no layers to train)" in results[name]["error"]
    runs = {r.data.tags["variant"]: r for r in
            MlflowClient().search_runs([MlflowClient().get_run(ctx["parent_run_id"]).info.experiment_id],
                                       f"tags.mlflow.parentRunId = '{ctx['parent_run_id']}'")}
    assert runs["prune-int8"].data.tags["status"] == "skipped"
    assert "2 skipped" in selected["summary_markdown"] and "skipped: " in selected["summary_markdown"]
    assert selected["failed_variants"] == []
    # The float32 variant is the input itself; int4 is smaller than int8 and as accurate.
    assert results["float32"]["accuracy_delta_pts"] == 0.0
    assert results["int4"]["size_bytes"] < 0.65 * results["int8"]["size_bytes"]
    assert results["int4"]["accuracy_delta_pts"] > -3.0
    for name in ("int8", "int4", "mixed"):
        table = artifacts.load_json(results[name]["child_run_id"], "sensitivity.json")
        assert len(table) == len(weighted_ops(tflite["float32"])), name
    # The latency gate is on by default: each int4 mode timed its op kinds and says what it chose.
    for name in ("int4", "mixed"):
        placement = artifacts.load_json(results[name]["child_run_id"], "int4_placement.json")
        assert set(placement["kinds"]) == {"CONV_2D", "FULLY_CONNECTED"}, name
        assert all(trial["latency_ms_p50"] > 0 for trial in placement["trials"]), name
        assert runs[name].data.tags["int4_placement"] == ",".join(
            f"{kind}={precision}" for kind, precision in placement["kinds"].items())
    int4_table = artifacts.load_json(results["int4"]["child_run_id"], "sensitivity.json")
    int4_kinds = artifacts.load_json(results["int4"]["child_run_id"], "int4_placement.json")["kinds"]
    assert [row["quantization"] for row in int4_table] == [int4_kinds[row["op"]] for row in int4_table]
    mixed = artifacts.load_json(results["mixed"]["child_run_id"], "mixed.json")
    assert set(mixed["layers"].values()) <= {"int4", "int8", "float32", *WEIGHT_ONLY}
    assert "## Per-layer sensitivity: `int8`" in selected["summary_markdown"]
    assert outcome.get("version") or outcome.get("skipped")
