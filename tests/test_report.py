"""Summary table, Pareto plot, run verdicts, confusion matrix and sensitivity chart."""
import re

import pytest

from pipeline.config import PipelineConfig
from pipeline.selection.report import (class_metric_names, confusion_plot, pareto_plot,
                                       sensitivity_plot, summary_markdown, terminal_table,
                                       verdict)
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
        result("dynamic", 0.909, -0.1, 95_000, 0.85),                  # within 1.1 x float32
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


def test_verdicts_say_in_one_line_what_became_of_each_variant(results):
    selection = choose(results, PipelineConfig())
    verdicts = {r["variant"]: verdict(r, selection) for r in results}
    assert verdicts["prune-int8"].startswith("passed the gates; champion of this run (prune-int8:")
    assert verdicts["dynamic"] == ("passed the gates (2 of 4 by smallest gzip size not slower "
                                   "than float32); "
                                   "not the champion")
    assert verdicts["int8"] == "rejected: accuracy drop 1.3 pts > 1.0 allowed"
    assert verdicts["qat-int8"].startswith("failed: ValueError: a very | long error xxx")
    assert all("\n" not in v for v in verdicts.values())
    skipped = {"variant": "qat4-int4", "status": "skipped", "error": "a .tflite model"}
    assert verdict(skipped, selection) == "skipped: a .tflite model"


def test_class_metric_names_are_valid_mlflow_keys_and_unique():
    names = class_metric_names(["T-shirt/top", "Trouser", "t shirt top", "Ünïcode", "9"])
    assert names == ["accuracy_class_t_shirt_top_0", "accuracy_class_trouser",
                     "accuracy_class_t_shirt_top_2", "accuracy_class_n_code",
                     "accuracy_class_9"]
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)


def pixels(path):
    from matplotlib.image import imread
    return (imread(str(path))[..., :3] * 255).round().astype(int)


def has_colour(image, hex_colour):
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return bool((abs(image - rgb).sum(axis=-1) <= 3).any())


def test_confusion_plot_shows_the_matrix_with_its_classes(tmp_path):
    confusion = [[50, 0, 0], [5, 40, 5], [0, 0, 50]]
    path = confusion_plot(confusion, ["cat", "dog", "bird"], tmp_path / "confusion_matrix.png")
    image = pixels(path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in tmp_path.iterdir()] == ["confusion_matrix.png"]
    # the diagonal's full rows are the darkest blue of the colour map
    from matplotlib import colormaps
    darkest = "#" + "".join(f"{round(c * 255):02x}" for c in colormaps["Blues"](1.0)[:3])
    assert has_colour(image, darkest)
    many = confusion_plot([[1] * 60] * 60, [f"c{i}" for i in range(60)], tmp_path / "many.png")
    assert pixels(many).shape[0] > image.shape[0]   # the figure grows with the classes


def test_sensitivity_plot_colours_bars_by_placement(tmp_path):
    rows = [{"layer": "conv", "op": "CONV_2D", "quantization": "int8", "output_snr_db": 30.0},
            {"layer": "dense", "op": "FULLY_CONNECTED", "quantization": "int4",
             "output_snr_db": 12.5},
            {"layer": "dense_1", "op": "FULLY_CONNECTED", "quantization": "int4",
             "output_snr_db": None}]
    orange, blue = "#ff7f0e", "#1f77b4"           # int4 and int8 (PRECISION_COLOURS)
    int4 = pixels(sensitivity_plot(rows, tmp_path / "int4.png", "int4"))
    assert has_colour(int4, orange) and has_colour(int4, blue)
    all_int8 = [dict(r, quantization="int8") for r in rows]
    assert not has_colour(pixels(sensitivity_plot(all_int8, tmp_path / "int8.png", "int8")),
                          orange)
    # mixed: the placement decides, not what the int4 mode would give each layer
    kept = pixels(sensitivity_plot(rows, tmp_path / "mixed.png", "mixed",
                                   placement={"conv": "int8", "dense": "int8", "dense_1": "int8"}))
    assert has_colour(kept, blue) and not has_colour(kept, orange)
