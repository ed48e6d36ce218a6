"""Quality gates, Pareto front and the champion choice: table-driven, no MLflow, no TensorFlow."""
import json

import pytest

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineInputError
from pipeline.selection.select import (LATENCY_SLACK_MS, MEMORY_SLACK_MB, Selection, choose,
                                       gate_failures, objective_value, pareto_front)


def result(variant, accuracy=0.90, delta=-0.2, gzip=10_000, latency=1.0, memory=20.0,
           ratio=4.0, status="ok", error=None, **extra):
    quantization = variant.rsplit("-", 1)[-1]
    return {"variant": variant, "quantization": quantization, "optimizations": "",
            "status": status, "error": error, "accuracy": accuracy, "accuracy_delta_pts": delta,
            "size_bytes": gzip * 2, "gzip_size_bytes": gzip, "compression_ratio": ratio,
            "gzip_compression_ratio": ratio * 2, "latency_ms_p50": latency,
            "latency_ms_p90": latency and latency * 1.2, "peak_memory_mb": memory, **extra}


def config(**overrides):
    return PipelineConfig.from_mapping(overrides, use_env=False)


@pytest.mark.parametrize("row, settings, expected", [
    (result("int8"), {}, []),
    (result("int8", delta=-1.0), {}, []),                        # exactly at the budget passes
    (result("int8", delta=-1.4), {}, ["accuracy drop 1.4 pts > 1.0 allowed"]),
    (result("int8", delta=0.3), {}, []),                         # better than the baseline
    (result("int8", ratio=2.0), {"min_compression_ratio": 4.0},
     ["compression ratio 2.0 < 4.0 required"]),
    (result("int8", latency=3.25), {"max_latency_ms": 2.0},
     ["latency p50 3.25 ms > 2.0 ms allowed"]),
    (result("int8", memory=45.0), {"max_peak_memory_mb": 40.0},
     ["peak memory 45.0 MB > 40.0 MB allowed"]),
    (result("int8", memory=45.0), {}, []),                       # no memory gate by default
    (result("int8", delta=-2.0, latency=5.0), {"max_latency_ms": 1.0},
     ["accuracy drop 2.0 pts > 1.0 allowed", "latency p50 5.0 ms > 1.0 ms allowed"]),
    ({"variant": "qat-int8", "status": "failed", "error": "conversion blew up"}, {},
     ["failed: conversion blew up"]),
    (result("int8", latency=None), {"max_latency_ms": 2.0}, ["no latency_ms_p50 measured"]),
    (result("int8", memory=float("nan")), {"objective": "memory"},
     ["no peak_memory_mb measured (needed by the objective memory)"]),
])
def test_gate_failures(row, settings, expected):
    assert gate_failures(row, config(**settings)) == expected


@pytest.mark.parametrize("rows, expected", [
    # b is smaller than a at equal accuracy and latency: a is dominated
    ([result("a", gzip=200), result("b", gzip=100)], ["b"]),
    # trade-off: a more accurate, b smaller -> both on the front, smallest first
    ([result("a", accuracy=0.92, gzip=200), result("b", accuracy=0.90, gzip=100)], ["b", "a"]),
    # c is only faster: still non-dominated
    ([result("a", gzip=100), result("c", gzip=300, latency=0.1), result("d", gzip=300)],
     ["a", "c"]),
    # identical points do not dominate each other
    ([result("a"), result("b")], ["a", "b"]),
    # failed variants and variants missing a metric are left out
    ([result("a", gzip=500), result("b", gzip=1, status="failed", error="x"),
      result("c", gzip=1, latency=None)], ["a"]),
    ([], []),
])
def test_pareto_front(rows, expected):
    assert pareto_front(rows) == expected


@pytest.mark.parametrize("objective, expected", [
    ("size_within_latency", 10_000), ("gzip_size", 10_000), ("latency", 1.0), ("memory", 20.0)])
def test_objective_value(objective, expected):
    assert objective_value(result("int8"), objective) == expected


def test_objective_value_rejects_unknown_objective():
    with pytest.raises(PipelineInputError, match="objective must be one of"):
        objective_value(result("int8"), "accuracy")


@pytest.mark.parametrize("rows, settings, champion, passed", [
    # smallest gzip size wins
    ([result("float32", gzip=400), result("dynamic", gzip=120), result("int8", gzip=100)],
     {}, "int8", ["int8", "dynamic", "float32"]),
    # the smallest breaks the accuracy budget: next smallest wins
    ([result("dynamic", gzip=120), result("int8", gzip=100, delta=-1.5)],
     {}, "dynamic", ["dynamic"]),
    # objective tie: higher accuracy wins
    ([result("a-int8", gzip=100, accuracy=0.90), result("b-int8", gzip=100, accuracy=0.91)],
     {}, "b-int8", ["b-int8", "a-int8"]),
    # objective and accuracy tie: name decides
    ([result("b-int8", gzip=100), result("a-int8", gzip=100)], {}, "a-int8", ["a-int8", "b-int8"]),
    # latency objective
    ([result("int8", gzip=100, latency=2.0), result("float16", gzip=300, latency=0.5)],
     {"objective": "latency"}, "float16", ["float16", "int8"]),
    # memory objective
    ([result("int8", memory=30.0), result("dynamic", memory=12.0)],
     {"objective": "memory"}, "dynamic", ["dynamic", "int8"]),
    # a failed variant never wins, even with the best numbers
    ([result("int8", gzip=1, status="failed", error="boom"), result("float32", gzip=400)],
     {}, "float32", ["float32"]),
])
def test_choose(rows, settings, champion, passed):
    selection = choose(rows, config(**settings))
    assert selection.champion == champion
    assert selection.passed == passed
    assert selection.objective == (settings.get("objective") or "size_within_latency")
    assert champion in selection.reason


def test_choose_all_failing_gives_no_champion_with_reasons():
    rows = [result("int8", delta=-3.0), result("float16", ratio=2.0),
            {"variant": "qat-int8", "status": "failed", "error": "out of memory"}]
    selection = choose(rows, config(min_compression_ratio=3.0))
    assert selection.champion is None
    assert selection.passed == []
    assert selection.rejected == {
        "int8": ["accuracy drop 3.0 pts > 1.0 allowed"],
        "float16": ["compression ratio 2.0 < 3.0 required"],
        "qat-int8": ["failed: out of memory"],
    }
    assert selection.reason.startswith("no variant passed the gates")
    assert selection.pareto == ["float16", "int8"]  # identical points: both, by name


def test_choose_rejects_duplicate_variants():
    with pytest.raises(PipelineInputError, match="duplicate"):
        choose([result("int8"), result("int8")], config())


def test_selection_round_trips_through_json():
    selection = choose([result("int8", gzip=100), result("float32", delta=-2.0)], config())
    restored = Selection.from_dict(json.loads(json.dumps(selection.to_dict())))
    assert restored == selection


def test_the_accuracy_floor_rejects_a_variant_of_a_broken_baseline():
    """Relative gates alone pass every variant of a model that cannot classify: the absolute
    floor (1.5 / classes by default, or min_accuracy) rejects them and nothing becomes champion."""
    broken = [result("float32", accuracy=0.0, delta=0.0), result("int8", accuracy=0.0, delta=0.0)]
    selection = choose(broken, config(), num_classes=43)
    assert selection.champion is None
    assert selection.rejected["int8"] == ["accuracy 0.0000 < 0.0349 required (min_accuracy)"]
    assert choose(broken, config(min_accuracy=0.0), num_classes=43).champion is not None
    good = [result("int8", accuracy=0.16)]
    assert choose(good, config(), num_classes=10).champion == "int8"   # 0.16 > 1.5 / 10
    assert choose(good, config(min_accuracy=0.5), num_classes=10).champion is None


def test_a_baseline_below_the_floor_stops_the_run():
    from pipeline.stages import _check_baseline
    with pytest.raises(PipelineInputError, match=r"reaches only 0\.1000 accuracy.*near chance"):
        _check_baseline(0.1, 10, config())
    _check_baseline(0.1, 10, config(min_accuracy=0.05))  # the user's own floor


FLOAT32 = result("float32", gzip=1_464_794, latency=0.269, memory=20.0)


@pytest.mark.parametrize("row, settings, expected", [
    (result("int8", latency=0.29), {}, []),                      # 1.08x float32: within 1.1x
    (result("int4", latency=0.957), {},
     ["p50 0.957 ms > 1.1 x float32's 0.269 ms + 0.02 ms (max_latency_ratio)"]),
    (result("int4", latency=0.957), {"max_latency_ratio": 4.0}, []),
    (result("int4", latency=0.957), {"max_latency_ratio": 0}, []),   # 0 = off, when asked
    (result("int8", latency=0.2, memory=26.4), {}, []),          # 20 x 1.25 + 1.5 MB slack
    (result("int8", latency=0.2, memory=26.6), {},
     ["peak memory 26.6 MB > 1.25 x float32's 20.0 MB + 1.5 MB (max_memory_ratio)"]),
    (result("int8", latency=None), {}, ["no latency_ms_p50 measured"]),
    (result("int8", latency=None), {"max_latency_ms": 2.0}, ["no latency_ms_p50 measured"]),
])
def test_gates_relative_to_float32(row, settings, expected):
    assert gate_failures(row, config(**settings), reference=FLOAT32) == expected


@pytest.mark.parametrize("reference_latency, latency, passes", [
    # a tiny model's p50s jitter by ~0.015 ms between measurements of one file: the slack keeps
    # equal-speed variants from flapping, and still rejects a real regression
    (0.020, 0.040, True), (0.020, 0.043, False), (0.269, 0.295 + LATENCY_SLACK_MS, True),
])
def test_latency_slack_is_absolute(reference_latency, latency, passes):
    reference = result("float32", latency=reference_latency)
    assert (gate_failures(result("int8", latency=latency), config(), reference=reference)
            == []) is passes


# The MobileNetV2 (alpha 0.35, 96x96) run of issue 23: the int4 chain was 7.2x smaller gzipped
# but 3.6x slower than float32, and became champion on gzip size alone.
MOBILENET = [FLOAT32,
             result("float16", gzip=732_000, latency=0.271),
             result("int8", gzip=472_684, latency=0.327),
             result("int4", gzip=445_328, latency=0.913),
             result("mixed", gzip=262_451, latency=1.085),
             result("prune+cluster+qat4-int4", gzip=203_443, latency=0.957)]


def test_a_slower_champion_is_not_chosen_by_default():
    selection = choose(MOBILENET, config())
    assert selection.objective == "size_within_latency"
    assert selection.champion == "float16"
    assert selection.passed == ["float16", "float32"]
    assert selection.rejected["prune+cluster+qat4-int4"] == [
        "p50 0.957 ms > 1.1 x float32's 0.269 ms + 0.02 ms (max_latency_ratio)"]
    assert selection.rejected["int8"] == [
        "p50 0.327 ms > 1.1 x float32's 0.269 ms + 0.02 ms (max_latency_ratio)"]
    assert "not slower than float32" in selection.reason
    assert selection.notes == []


def test_the_default_objective_prefers_speed_even_with_the_latency_gate_off():
    """Gate off: nothing is rejected for speed, but the objective still ranks the variants not
    slower than float32 first (x 1.0 + the slack); gzip_size alone is the old behaviour."""
    selection = choose(MOBILENET, config(max_latency_ratio=0))
    assert selection.champion == "float16"
    assert selection.passed[:2] == ["float16", "float32"]
    assert selection.passed[2:] == ["prune+cluster+qat4-int4", "mixed", "int4", "int8"]
    assert choose(MOBILENET, config(max_latency_ratio=0, objective="gzip_size")).champion \
        == "prune+cluster+qat4-int4"


def test_a_slower_variant_wins_only_when_none_is_fast_enough():
    rows = [result("float32", gzip=1000, latency=0.2), result("int4", gzip=100, latency=0.9)]
    gates_off = config(max_latency_ratio=0, max_memory_ratio=0)
    assert choose(rows, gates_off).champion == "float32"
    rows[0]["status"], rows[0]["error"] = "failed", "boom"
    selection = choose(rows, gates_off)
    assert selection.champion == "int4"
    assert selection.notes == ["size_within_latency ranked by gzip size alone: no float32 p50 "
                               "latency to compare with"]


def test_size_ties_go_to_the_faster_variant():
    rows = [FLOAT32, result("a-int8", gzip=100, latency=0.25, accuracy=0.91),
            result("b-int8", gzip=100, latency=0.20, accuracy=0.90)]
    assert choose(rows, config()).passed[:2] == ["b-int8", "a-int8"]
    assert choose(rows, config(objective="gzip_size")).passed[:2] == ["a-int8", "b-int8"]


def test_gates_that_cannot_apply_say_so():
    """Without a float32 variant the relative gates neither pass nor fail silently: the selection
    carries a note for each, and the report shows it."""
    from pipeline.selection.report import summary_markdown
    rows = [result("int8", gzip=100, latency=5.0), result("int4", gzip=50, latency=9.0)]
    selection = choose(rows, config())
    assert selection.champion == "int4"
    assert selection.notes == [
        "max_latency_ratio could not apply: no float32 variant ran in this run to compare with "
        "(add float32 to the variants)",
        "max_memory_ratio could not apply: no float32 variant ran in this run to compare with "
        "(add float32 to the variants)",
        "size_within_latency ranked by gzip size alone: no float32 p50 latency to compare with"]
    assert "max_latency_ratio could not apply" in summary_markdown(rows, selection)
    off = choose(rows, config(max_latency_ratio=0, max_memory_ratio=0, objective="gzip_size"))
    assert off.notes == []


def test_the_default_champion_is_never_slower_than_float32_and_the_smallest_that_is_not():
    """Issue 23's promise, over many random runs: the champion is within float32's p50 x
    max_latency_ratio (+ slack), and no variant within the gates is smaller."""
    import random
    generator = random.Random(23)
    settings = config()
    for _ in range(300):
        float32 = result("float32", gzip=1_000_000, latency=generator.uniform(0.02, 2.0),
                         memory=generator.uniform(2, 40))
        rows = [float32] + [
            result(f"v{i}-int8", gzip=generator.randrange(50_000, 1_200_000),
                   latency=float32["latency_ms_p50"] * generator.uniform(0.3, 4.0),
                   memory=float32["peak_memory_mb"] * generator.uniform(0.3, 1.6),
                   delta=generator.uniform(-2.0, 0.5))
            for i in range(generator.randrange(1, 12))]
        selection = choose(rows, settings)
        limit = float32["latency_ms_p50"] * settings.max_latency_ratio + LATENCY_SLACK_MS
        champion = next(r for r in rows if r["variant"] == selection.champion)
        assert champion["latency_ms_p50"] <= limit + 1e-9
        meeting = [r for r in rows if r["latency_ms_p50"] <= limit + 1e-9
                   and r["accuracy_delta_pts"] >= -settings.max_accuracy_drop_pts
                   and r["peak_memory_mb"] <= float32["peak_memory_mb"] * settings.max_memory_ratio
                   + MEMORY_SLACK_MB]
        assert champion["gzip_size_bytes"] == min(r["gzip_size_bytes"] for r in meeting)


def test_a_selection_file_without_notes_still_loads():
    data = choose([result("int8")], config()).to_dict()
    del data["notes"]
    assert Selection.from_dict(data).notes == []
