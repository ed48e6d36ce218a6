"""Summary table and Pareto plot."""
import pytest

from pipeline.config import PipelineConfig
from pipeline.selection.report import pareto_plot, summary_markdown, terminal_table
from pipeline.selection.select import choose

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def result(variant, accuracy, delta, gzip, latency, status="ok", error=None):
    return {"variant": variant, "quantization": variant.rsplit("-", 1)[-1],
            "optimizations": variant.rsplit("-", 1)[0] if "-" in variant else "",
            "status": status, "error": error, "accuracy": accuracy, "accuracy_delta_pts": delta,
            "size_bytes": gzip * 2, "gzip_size_bytes": gzip,
            "compression_ratio": 400_000 / (gzip * 2),
            "gzip_compression_ratio": 400_000 / gzip, "latency_ms_p50": latency,
            "latency_ms_p90": latency * 1.3, "peak_memory_mb": 40.0 + latency}


@pytest.fixture
def results():
    return [
        result("float32", 0.910, 0.0, 380_000, 0.80),
        result("dynamic", 0.909, -0.1, 95_000, 0.95),
        result("int8", 0.897, -1.3, 90_000, 0.70),                     # rejected: accuracy
        result("prune-int8", 0.905, -0.5, 30_000, 0.72),               # champion (smallest)
        result("float16", 0.910, 0.0, 180_000, 0.85),
        {"variant": "qat-int8", "quantization": "int8", "optimizations": "qat",
         "status": "failed", "error": "ValueError: a very | long\nerror " + "x" * 200},
    ]


def rows(markdown):
    return [line for line in markdown.splitlines() if line.startswith("| `")]


def test_summary_has_one_row_per_variant_champion_first_failed_last(results):
    selection = choose(results, PipelineConfig())
    markdown = summary_markdown(results, selection)
    table = rows(markdown)
    names = [row.split("`")[1] for row in table]
    assert sorted(names) == sorted(r["variant"] for r in results)
    # champion, then passing by gzip size, then rejected, then failed
    assert names == ["prune-int8", "dynamic", "float16", "float32", "int8", "qat-int8"]
    assert "**champion**" in table[0] and table[0].count("**champion**") == 1
    assert "accuracy drop 1.3 pts > 1.0 allowed" in table[4]
    failed = table[5]
    assert "failed: ValueError: a very \\| long error" in failed and "…" in failed
    assert len(failed) < 400                                           # error shortened
    assert all(row.count(" | ") == table[0].count(" | ") for row in table)  # no broken cells
    assert "29.9 KB" not in markdown and "30.0 KB" in markdown          # decimal units
    assert "380.0 KB" in markdown
    assert "**Champion:** `prune-int8`" in markdown
    assert terminal_table(results, selection) in markdown


def test_summary_without_champion_says_none(results):
    bad = [dict(r, accuracy_delta_pts=-5.0) for r in results if r.get("status") == "ok"]
    markdown = summary_markdown(bad, choose(bad, PipelineConfig()))
    assert "**Champion:** none" in markdown
    assert "**champion**" not in markdown
    assert len(rows(markdown)) == len(bad)


def test_pareto_plot_writes_a_png_atomically(results, tmp_path):
    selection = choose(results, PipelineConfig())
    path = pareto_plot(results, selection, tmp_path / "report" / "pareto.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 20_000                    # a real figure, not an empty canvas
    assert [p.name for p in path.parent.iterdir()] == ["pareto.png"]   # no temp file left


def test_pareto_plot_without_measurements_still_writes_a_png(tmp_path):
    failed = [{"variant": "int8", "quantization": "int8", "status": "failed", "error": "x"}]
    path = pareto_plot(failed, choose(failed, PipelineConfig()), tmp_path / "pareto.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
