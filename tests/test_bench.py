"""`python -m benchmarks.run --quick`: the tables exist, have every section, row and column, their
ratios follow from the raw figures beside them, and the markdown says what the JSON says.
No timing thresholds: the quick mode checks the tables' shape, not the machine's speed.

The quick bench is a dozen pipeline runs (35 min on 2 cores): its tests are in make test-slow.
make test checks the published tables (benchmarks/*results.json and .md: the markdown says what
the JSON says) and the graph limits, which need no bench run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import limits, memory, run
from benchmarks.render import SECTION_NUMBERS, cell

# The committed results of full bench runs (JSON, markdown).
PUBLISHED = [("results.json", "results.md"), ("scaling-results.json", "scaling-results.md"),
             ("search-results.json", "search-results.md")]

ROOT = Path(__file__).resolve().parent.parent


def quick_bench(test):
    """Marks a test of the whole quick bench run (fixture `quick`): make test-slow."""
    return pytest.mark.bench(pytest.mark.slow(test))

VARIANT_KEYS = {"variant", "accuracy", "size_bytes", "gzip_size_bytes", "size_ratio", "gzip_ratio",
                "size_floor_bytes", "latency_ms_p50_1t", "latency_ms_p90_1t", "latency_ms_p50_2t",
                "latency_ms_p90_2t", "speedup_1t", "peak_memory_mb_1t", "peak_memory_mb_2t",
                "memory_ratio_1t", "memory_floor_mb"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("tf2onnx", reason="make bench's requirements (the bench extra: pip install -e .[bench])")
    pytest.importorskip("onnxruntime", reason="make bench's requirements (the bench extra: pip install -e .[bench])")
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out),
                           "--cache-dir", str(out / "cache")], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^\[\d\d:\d\d\] resnet: ", done.stderr, re.M), "no progress lines on stderr"
    results = json.loads((out / "results.json").read_text())
    return results, (out / "results.md").read_text()


def _table(results: dict, table_id: str) -> dict:
    for section in results["sections"].values():
        for spec in section["tables"]:
            if spec["id"] == table_id:
                return spec
    raise AssertionError(f"no table {table_id}")


@quick_bench
def test_every_section_ran_with_its_tables(quick):
    results, _ = quick
    assert results["mode"] == "quick"
    assert list(results["sections"]) == list(run.SECTIONS)
    for name, section in results["sections"].items():
        assert not section.get("error"), (name, section.get("error"))
        assert section["tables"] and section["title"]
    ids = [t["id"] for s in results["sections"].values() for t in s["tables"]]
    assert ids == ["resnet-variants", "resnet-memory-options", "cnn-variants", "stages", "sparse",
                   "int4", "throughput", "peer", "orchestration", "scaling-data",
                   "scaling-models", "scaling-epochs", "search"]
    assert results["sections"]["resnet"]["stand_in"] is True
    assert "STAND-IN" in results["sections"]["resnet"]["title"]


@quick_bench
def test_machine_is_described(quick):
    results, markdown = quick
    machine = results["machine"]
    assert machine["cpu_model"] and machine["cores"] >= 1 and machine["cpu_flags"]
    assert machine["versions"]["ai-edge-litert"]
    assert machine["cpu_model"] in markdown and "Key CPU flags" in markdown


@quick_bench
def test_variant_tables_have_every_row_and_column(quick):
    results, _ = quick
    resnet = _table(results, "resnet-variants")
    assert [r["variant"] for r in resnet["rows"]] == list(run.RESNET_VARIANTS)
    cnn = _table(results, "cnn-variants")
    assert [r["variant"] for r in cnn["rows"]] == run.QUICK["cnn"]["variants"]
    for spec in (resnet, cnn):
        assert {c["key"] for c in spec["columns"]} == VARIANT_KEYS
        for row in spec["rows"]:
            assert row["status"] == "ok", row
            assert all(row.get(key) is not None for key in VARIANT_KEYS), row
            assert 0 <= row["accuracy"] <= 1 and row["size_floor_bytes"] <= row["size_bytes"]


@quick_bench
def test_latency_figures_are_medians_over_rounds(quick):
    """Each table's latency is the median of its rounds (noisy machines: never one sample), and
    the float32 row is its own reference."""
    results, _ = quick
    for table_id in ("resnet-variants", "cnn-variants"):
        rows = {r["variant"]: r for r in _table(results, table_id)["rows"]}
        assert rows["float32"]["size_ratio"] == pytest.approx(1.0)
        for row in rows.values():
            assert len(row["rounds_1t"]) >= 1
            assert row["latency_ms_p50_1t"] == pytest.approx(
                np.median([r["latency_ms_p50"] for r in row["rounds_1t"]]), rel=1e-3, abs=1e-4)  # stored to 4 decimals

@quick_bench
def test_memory_investigation_covers_every_option(quick):
    results, markdown = quick
    rows = _table(results, "resnet-memory-options")["rows"]
    for variant in run.RESNET_VARIANTS:
        configs = {(r["config"], r["threads"]) for r in rows if r["variant"] == variant}
        assert {c for c, _ in configs} == set(memory.CONFIGS)
        assert {(c, 1) for c in memory.BOTH_THREAD_COUNTS} <= configs
    warm = [r for r in rows if r["config"] == "compiled-cache-warm"]
    assert all(r.get("cache_file_mb", 0) > 0 for r in warm), warm  # the weights come from the cache
    assert results["sections"]["resnet"]["conclusion"]
    assert "### Conclusion" in markdown


@quick_bench
def test_peer_section_sets_onnx_runtime_beside_litert(quick):
    results, _ = quick
    rows = _table(results, "peer")["rows"]
    runtimes = {(r["runtime"], r["variant"].split(" (")[0]) for r in rows}
    assert {("LiteRT", "float32"), ("LiteRT", "int8"), ("ONNX Runtime", "float32"),
            ("ONNX Runtime", "int8 dynamic")} <= runtimes
    assert any(r["runtime"] == "ONNX Runtime" and r["variant"].startswith("int8 static") for r in rows)
    assert all(0 <= r["accuracy"] <= 1 and r["latency_ms_p50"] > 0 for r in rows)


def _markdown_tables(markdown: str) -> dict[str, list[list[str]]]:
    tables, current = {}, None
    for line in markdown.splitlines():
        marker = re.match(r"<!-- table: (\S+) -->", line)
        if marker:
            current = tables.setdefault(marker.group(1), [])
        elif current is not None and line.startswith("|"):
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current is not None and not line.strip():
            current = None
    return {k: v[2:] for k, v in tables.items()}  # drop the header and rule lines


@quick_bench
def test_markdown_says_what_the_json_says(quick):
    _check_markdown(*quick)


@pytest.mark.parametrize("json_name,markdown_name", PUBLISHED)
def test_published_markdown_says_what_the_published_json_says(json_name, markdown_name):
    """The committed results of full bench runs: the tables and goals in the markdown are the
    JSON's figures rendered by today's code (a renumbered or re-formatted section shows here)."""
    results = json.loads((ROOT / "benchmarks" / json_name).read_text())
    assert results["mode"] == "full"
    _check_markdown(results, (ROOT / "benchmarks" / markdown_name).read_text())


def _check_markdown(results: dict, markdown: str) -> None:
    tables = _markdown_tables(markdown)
    for section in results["sections"].values():
        for spec in section["tables"]:
            lines = tables[spec["id"]]
            assert len(lines) == len(spec["rows"]), spec["id"]
            for row, cells in zip(spec["rows"], lines):
                assert len(cells) == len(spec["columns"])
                for column, text in zip(spec["columns"], cells):
                    value = row.get(column["key"])
                    assert text == cell(value, column["format"]), (spec["id"], column["key"])
                    if column["format"] in ("mb", "mib", "ms", "s", "x", "pct") and value is not None:
                        number = float(re.sub(r"[^0-9.eE+-]", "", text))
                        scale = {"mb": 1e6, "pct": 0.01}.get(column["format"], 1.0)
                        decimals = len(text.split(".")[1].rstrip("x %")) if "." in text else 0
                        assert abs(number * scale - value) <= 0.5 * 10 ** -decimals * scale + 1e-9
    for key, section in results["sections"].items():
        assert f"## {SECTION_NUMBERS[key]}. {section['title']}" in markdown
        for g in section["goals"]:
            assert re.search(rf"^\| +{SECTION_NUMBERS[key]} \| {re.escape(g['goal'])} +\| "
                             rf"{re.escape(g['target'])} +\|", markdown, re.M), g


def test_graph_limits_of_a_small_dense_model(tmp_path):
    """Weights counted once, activations by their live ranges (independent of the bench run)."""
    import tf_keras

    from pipeline.runtime.quantize import convert
    # non-zero biases: the converter drops all-zero ones
    model = tf_keras.Sequential([tf_keras.Input((64,)),
                                 tf_keras.layers.Dense(32, activation="relu", bias_initializer="ones"),
                                 tf_keras.layers.Dense(8, bias_initializer="ones")])
    path = convert("float32", tmp_path / "dense.tflite", model=model)
    graph = limits.graph_memory(path)
    assert graph["weight_elements"] == model.count_params()
    assert graph["weights_stored_bytes"] == graph["weights_executed_bytes"] == 4 * model.count_params()
    # the widest moment: the 64-float input and the 32-float hidden layer, or hidden and output
    assert graph["activation_live_peak_bytes"] == 4 * (64 + 32)
    assert limits.floors("int8", graph)["size_floor_bytes"] == model.count_params()


@quick_bench
def test_stage_times_come_from_the_run_and_add_up(quick):
    """Every stage of the quick CNN run recorded its wall time; the parts sum to their rows and
    stay within the pipeline's own wall time."""
    results, _ = quick
    rows = {r["stage"].strip(): r for r in _table(results, "stages")["rows"]}
    train = rows["train: data, the baseline CNN, the float32 reference"]
    optimize = next(r for name, r in rows.items() if name.startswith("optimize: "))
    per_variant = next(r for name, r in rows.items() if name.startswith("quantize + evaluate"))
    whole = rows["the whole pipeline"]
    assert train["now_s"] > 0 and optimize["now_s"] > 0 and per_variant["now_s"] > 0
    parts = [rows[f"of which {stage}"]["now_s"] for stage in ("quantize", "evaluate", "benchmark")]
    assert all(p > 0 for p in parts) and abs(sum(parts) - per_variant["now_s"]) < 1e-6
    recipes = [r["now_s"] for name, r in rows.items() if name.startswith("optimize ")
               and not name.startswith("optimize: ")]
    assert recipes and abs(sum(recipes) - optimize["now_s"]) < 1e-6
    assert train["now_s"] + optimize["now_s"] + per_variant["now_s"] < whole["now_s"]


@quick_bench
def test_sparse_storage_is_measured_beside_dense(quick):
    """The quick CNN run's prune model, dense and sparse, dynamic and int8: the sparse file is
    smaller raw, and each row says which runtime ran it."""
    results, _ = quick
    rows = {r["variant"]: r for r in _table(results, "sparse")["rows"]}
    assert set(rows) == {f"prune-{mode} {storage}" for mode in ("dynamic", "int8")
                         for storage in ("dense", "sparse")}
    for mode in ("dynamic", "int8"):
        dense, sparse = rows[f"prune-{mode} dense"], rows[f"prune-{mode} sparse"]
        assert sparse["size_bytes"] < dense["size_bytes"]
        assert sparse["runtime"] and dense["runtime"]
        assert abs(sparse["accuracy"] - dense["accuracy"]) < 0.01


@quick_bench
def test_search_section_sets_the_search_beside_the_fixed_settings_on_two_models(quick):
    results, markdown = quick
    rows = _table(results, "search")["rows"]
    models = sorted({r["model"] for r in rows})
    assert len(models) == 2 and any("MobileNetV2" in m for m in models), models
    for model in models:
        variants = {r["variant"]: r for r in rows if r["model"] == model}
        assert set(variants) == {"prune+cluster+qat4-int4", "auto-int4"}
        for row in variants.values():
            assert row["status"] == "ok", row
            assert 0 <= row["accuracy"] <= 1 and row["gzip_ratio"] > 1
        assert "prune_sparsity" in variants["auto-int4"]["settings"], variants["auto-int4"]
    assert "Accuracy-aware search against the fixed settings" in markdown


def test_an_unknown_search_model_is_named_before_anything_runs(capsys):
    assert run.main(["--sections", "search", "--search-models", "cnn,resnet"]) == 2
    assert "unknown --search-models resnet; known: cnn, keras3, mobilenet" in capsys.readouterr().err
