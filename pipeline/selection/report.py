"""The run's report: a markdown summary table (one row per variant, failed ones included) and a
Pareto plot (accuracy against gzip size). Both are pure functions of the benchmark results and the
Selection; the caller logs them as the parent run's `report/summary.md` and `report/pareto.png`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from tabulate import tabulate

from pipeline.files import atomic_path
from pipeline.selection.select import (OBJECTIVE_METRICS, PARETO_METRICS, Selection, finite_number,
                                       objective_value)

COLUMNS = ("variant", "accuracy", "delta (pts)", "size", "gzip size", "ratio", "gzip ratio",
           "latency p50 (ms)", "peak mem (MB)", "gates", "pareto", "champion")
TEXT_COLUMNS = {"variant", "gates", "pareto", "champion"}  # left-aligned; numbers to the right
ERROR_CHARS = 80
# One marker shape per quantization mode in the plot.
MARKERS = {"float32": "o", "dynamic": "s", "float16": "^", "int8": "D", "int16x8": "v", "int4": "X",
           "mixed": "*"}


def ordered(results: list[dict[str, Any]], selection: Selection) -> list[dict[str, Any]]:
    """Champion first, then the other passing variants by objective, then rejected, then failed."""
    rank = {name: i for i, name in enumerate(selection.passed)}

    def key(result):
        name = result["variant"]
        if name == selection.champion:
            return (0, 0, 0.0, name)
        if name in rank:
            return (1, rank[name], 0.0, name)
        if result.get("status") == "ok":
            value = objective_value(result, selection.objective)
            return (2, 0, value if value is not None else float("inf"), name)
        return (3, 0, 0.0, name)

    return sorted(results, key=key)


def terminal_table(results: list[dict[str, Any]], selection: Selection) -> str:
    """The summary table alone, as markdown (readable as is in a terminal or a task log)."""
    pareto = set(selection.pareto)
    rows = []
    for result in ordered(results, selection):
        name = result["variant"]
        if result.get("status") == "ok":
            reasons = selection.rejected.get(name)
            gates = "pass" if name in selection.passed else "; ".join(reasons or ["not evaluated"])
        else:
            status = "skipped" if result.get("status") == "skipped" else "failed"
            gates = f"{status}: " + _shorten(str(result.get("error") or "unknown error"))
        rows.append([
            f"`{name}`",
            _num(result.get("accuracy"), "{:.4f}"),
            _num(result.get("accuracy_delta_pts"), "{:+.2f}"),
            _size(result.get("size_bytes")),
            _size(result.get("gzip_size_bytes")),
            _num(result.get("compression_ratio"), "{:.2f}x"),
            _num(result.get("gzip_compression_ratio"), "{:.2f}x"),
            _num(result.get("latency_ms_p50"), "{:.3f}"),
            _num(result.get("peak_memory_mb"), "{:.1f}"),
            _escape(gates),
            "yes" if name in pareto else "",
            "**champion**" if name == selection.champion else "",
        ])
    return _markdown_table(COLUMNS, rows, TEXT_COLUMNS)


def summary_markdown(results: list[dict[str, Any]], selection: Selection) -> str:
    """The run's summary: the decision in one paragraph, then the table."""
    failed = sum(1 for r in results if r.get("status") == "failed")
    skipped = sum(1 for r in results if r.get("status") == "skipped")
    champion = f"`{selection.champion}`" if selection.champion else "none"
    return (
        "# Model compression summary\n\n"
        f"**Champion:** {champion} (objective: {selection.objective})  \n"
        f"**Why:** {_escape(selection.reason)}  \n"
        f"**Variants:** {len(results)} ({len(selection.passed)} passed the gates, "
        f"{len(selection.rejected) - failed - skipped} rejected, {failed} failed"
        + (f", {skipped} skipped: they cannot apply to this model" if skipped else "") + ")  \n"
        f"**Pareto front** (accuracy, gzip size, p50 latency): "
        f"{', '.join(f'`{n}`' for n in selection.pareto) or 'empty'}\n\n"
        + "".join(f"**Note:** {_escape(note)}  \n" for note in selection.notes)
        + ("\n" if selection.notes else "")
        + terminal_table(results, selection)
    )


SENSITIVITY_COLUMNS = ("rank", "layer", "op", "weights", "quantized as", "layer SNR (dB)",
                       "layer cosine", "output SNR (dB)", "output cosine")
# Fused op names join several tensor names; the table keeps both ends of a long one.
LAYER_CHARS = 60


def sensitivity_markdown(rows: list[dict[str, Any]],
                         placement: dict[str, str] | None = None) -> str:
    """The per-layer sensitivity table (`pipeline.runtime.litert_quantizer.sensitivity` rows) as
    markdown, in graph order; `rank` 1 is the most sensitive (lowest output SNR). `placement`
    (`MixedResult.layers`) adds the precision the mixed model gave each layer."""
    columns = SENSITIVITY_COLUMNS + (("mixed",) if placement is not None else ())
    def snr(row):  # unmeasured sorts first: unknown is treated as sensitive
        value = finite_number(row.get("output_snr_db"))
        return -math.inf if value is None else value

    ranks = {id(row): rank for rank, row in enumerate(sorted(rows, key=snr), start=1)}
    table = []
    for row in rows:
        cells = [str(ranks[id(row)]), f"`{_escape(_middle(str(row.get('layer', ''))))}`",
                 _escape(row.get("op", "")), _num(row.get("weights"), "{:,.0f}"),
                 _escape(row.get("quantization", "")),
                 _num(row.get("layer_snr_db"), "{:.1f}"), _num(row.get("layer_cosine"), "{:.4f}"),
                 _num(row.get("output_snr_db"), "{:.1f}"), _num(row.get("output_cosine"), "{:.4f}")]
        if placement is not None:
            cells.append(_escape(placement.get(str(row.get("layer", "")), "-")))
        table.append(cells)
    return _markdown_table(columns, table, {"layer", "op", "quantized as", "mixed"})


def markdown_table(headers, rows: list[list[str]], align: list[str]) -> str:
    """A markdown (pipe) table of cells already formatted as text, each column aligned "left" or
    "right" (the report's and the bench's tables)."""
    return tabulate(rows, headers=list(headers), tablefmt="pipe", disable_numparse=True,
                    colalign=align) + "\n"


def _markdown_table(columns, rows: list[list[str]], text_columns: set[str]) -> str:
    """`text_columns` left-aligned, the others (numbers) right-aligned."""
    return markdown_table(columns, rows, ["left" if name in text_columns else "right"
                                          for name in columns])


def _middle(text: str) -> str:
    """Both ends of a long name, the middle elided."""
    if len(text) <= LAYER_CHARS:
        return text
    half = (LAYER_CHARS - 1) // 2
    return text[:half] + "…" + text[-half:]


KEY_LEFT = 0.8  # share of the figure's width left of the Pareto plot's key


def pareto_plot(results: list[dict[str, Any]], selection: Selection, path: str | Path,
                gate_accuracy: float | None = None) -> Path:
    """Accuracy against gzip size (log x) as a PNG at `path`, written atomically.

    Marker shape = quantization mode, colour = p50 latency (log scale: one slow variant must not
    flatten the others' colours). Points are numbered, best first, with a key beside the plot
    (names would overlap). Pareto variants (accuracy, gzip size, latency) have a red edge and
    those that form the accuracy/size front are joined by a line; the champion is ringed;
    variants failing the gates are faded; `gate_accuracy` (the accuracy budget's lowest accuracy)
    is drawn as a line."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    path = Path(path)
    points = [r for r in results if r.get("status") == "ok"
              and all(finite_number(r.get(k)) is not None for k in PARETO_METRICS)]
    fig = Figure(figsize=(12, 6.5), dpi=110)
    ax = fig.add_subplot()
    ax.set_title("Compressed variants: accuracy vs gzip size")
    ax.set_xlabel("gzip size (log scale)")
    ax.set_ylabel("accuracy")
    ax.grid(True, which="both", alpha=0.3)
    if points:
        _draw_variants(fig, ax, ordered(points, selection), selection, gate_accuracy)
    else:
        ax.text(0.5, 0.5, "no variant produced measurements", ha="center", va="center",
                transform=ax.transAxes)
    fig.tight_layout(rect=(0, 0, KEY_LEFT, 1))  # the key of numbered points on the right
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _draw_variants(fig, ax, points, selection: Selection, gate_accuracy: float | None) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D

    ax.set_xscale("log")
    latencies = [max(r["latency_ms_p50"], 1e-6) for r in points]
    low, high = min(latencies), max(latencies)
    norm = LogNorm(vmin=low, vmax=high if high > low * 1.01 else low * 1.01)
    cmap = colormaps["viridis"]
    passed, pareto = set(selection.passed), set(selection.pareto)
    key = []
    for number, r in enumerate(points, start=1):
        on_front = r["variant"] in pareto
        ax.scatter([r["gzip_size_bytes"]], [r["accuracy"]], c=[max(r["latency_ms_p50"], 1e-6)],
                   cmap=cmap, norm=norm, marker=MARKERS.get(r.get("quantization"), "P"), s=80,
                   zorder=2, edgecolors="red" if on_front else "black",
                   linewidths=1.8 if on_front else 0.6,
                   alpha=0.95 if r["variant"] in passed else 0.35)
        # Numbers next to the points, alternating sides so that neighbours do not cover each other.
        ax.annotate(str(number), (r["gzip_size_bytes"], r["accuracy"]), fontsize=7,
                    xytext=(5, 3) if number % 2 else (-9, -9), textcoords="offset points")
        key.append(f"{number:>2}  {r['variant']}")
    fig.text(KEY_LEFT + 0.01, 0.95, "\n".join(key), va="top", ha="left", family="monospace",
             fontsize=7)
    if gate_accuracy is not None:
        ax.axhline(gate_accuracy, color="grey", linestyle=":", linewidth=1.2, zorder=1)
        ax.annotate("accuracy budget", (ax.get_xlim()[0], gate_accuracy), fontsize=7,
                    color="grey", xytext=(4, 3), textcoords="offset points")
    # The line joins the Pareto variants that are not beaten on accuracy by a smaller one.
    front, best = [], float("-inf")
    for r in sorted((r for r in points if r["variant"] in pareto),
                    key=lambda r: (r["gzip_size_bytes"], -r["accuracy"])):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    ax.plot([r["gzip_size_bytes"] for r in front], [r["accuracy"] for r in front],
            color="red", linestyle="--", linewidth=1.2, zorder=1)
    champion = next((r for r in points if r["variant"] == selection.champion), None)
    if champion:
        xy = (champion["gzip_size_bytes"], champion["accuracy"])
        ax.scatter(*xy, s=420, facecolors="none", edgecolors="crimson", linewidths=2.2, zorder=3)
    ax.xaxis.set_major_formatter(lambda value, _pos: _tick(value, minor=False))
    ax.xaxis.set_minor_formatter(lambda value, _pos: _tick(value, minor=True))
    ax.tick_params(axis="x", which="both", labelsize=7)
    modes = sorted({r.get("quantization") for r in points}, key=str)
    handles = [Line2D([], [], marker=MARKERS.get(m, "P"), color="grey", linestyle="", label=str(m))
               for m in modes]
    handles.append(Line2D([], [], color="red", linestyle="--", marker="o", markerfacecolor="none",
                          markeredgecolor="red", label="Pareto front"))
    if any(r["variant"] not in passed for r in points):
        handles.append(Line2D([], [], marker="o", color="grey", alpha=0.35, linestyle="",
                              label="failed the gates"))
    if champion:
        handles.append(Line2D([], [], marker="o", markersize=14, markerfacecolor="none",
                              markeredgecolor="crimson", linestyle="", label="champion"))
    ax.legend(handles=handles, loc="best", fontsize=8)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="latency p50 (ms, log scale)")


def _size(value: Any) -> str:
    """Bytes in decimal units: 812 B, 12.3 KB, 1.45 MB."""
    value = finite_number(value)
    if value is None:
        return "-"
    if value < 1000:
        return f"{value:.0f} B"
    if value < 1000 ** 2:
        return f"{value / 1000:.1f} KB"
    return f"{value / 1000 ** 2:.2f} MB"


def _tick(value: float, minor: bool) -> str:
    """Axis label for a byte count: "30 KB"; minor ticks only at 2, 3 and 5 (no crowding)."""
    if value <= 0:
        return ""
    lead = round(value / 10 ** math.floor(math.log10(value)))
    if minor and lead not in (2, 3, 5):
        return ""
    for unit, factor in (("MB", 1e6), ("KB", 1e3), ("B", 1)):
        if value >= factor:
            return f"{value / factor:g} {unit}"
    return f"{value:g} B"


def _num(value: Any, fmt: str) -> str:
    value = finite_number(value)
    return "-" if value is None else fmt.format(value)


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 1] + "…"


def _escape(text: str) -> str:
    """Keep a cell inside its table: no pipes, no newlines."""
    return " ".join(str(text).split()).replace("|", "\\|")


def verdict(result: dict[str, Any], selection: Selection) -> str:
    """One line on what became of a variant: the description of its child run."""
    name = result["variant"]
    status = result.get("status")
    if status in ("failed", "skipped"):
        return f"{status}: {' '.join(str(result.get('error') or 'unknown error').split())}"
    if name == selection.champion:
        return f"passed the gates; champion of this run ({selection.reason})"
    if name in selection.passed:
        place = selection.passed.index(name) + 1
        return (f"passed the gates ({place} of {len(selection.passed)} by "
                f"{OBJECTIVE_METRICS[selection.objective][2]}); not the champion")
    return "rejected: " + "; ".join(selection.rejected.get(name, ["not evaluated"]))


def class_metric_names(class_names: list[str]) -> list[str]:
    """`accuracy_class_<name>` per class, the name reduced to what MLflow metric keys allow
    (letters, digits, underscores); the class index is appended where two names would clash."""
    safe = [re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class" for name in class_names]
    return [f"accuracy_class_{s}" + (f"_{index}" if safe.count(s) > 1 else "")
            for index, s in enumerate(safe)]


# Largest class count whose names and counts are written on the confusion matrix's axes/cells.
CONFUSION_LABELLED_CLASSES = 40
CONFUSION_COUNTED_CLASSES = 20


def confusion_plot(confusion: list[list[int]], class_names: list[str], path: str | Path,
                   title: str = "Confusion matrix (test set)") -> Path:
    """The confusion matrix as a PNG at `path` (written atomically): true classes down, predicted
    across, each cell coloured by its share of the true class's images and labelled with its
    count (up to CONFUSION_COUNTED_CLASSES classes)."""
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)
    classes = len(class_names)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4.0 + 0.45 * classes, 16.0)
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if classes <= CONFUSION_LABELLED_CLASSES:
        ax.set_xticks(range(classes), labels=class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(classes), labels=class_names, fontsize=8)
    if classes <= CONFUSION_COUNTED_CLASSES:
        for true, predicted in np.ndindex(counts.shape):
            ax.text(predicted, true, str(counts[true, predicted]), ha="center", va="center",
                    fontsize=7, color="white" if shares[true, predicted] > 0.5 else "black")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


# Bar colours by the precision a layer's weights get.
PRECISION_COLOURS = {"int4": "tab:orange", "int8": "tab:blue", "int16x8": "tab:purple",
                     "float16": "tab:green", "float32": "tab:grey"}


def sensitivity_plot(rows: list[dict[str, Any]], path: str | Path, title: str,
                     placement: dict[str, str] | None = None) -> Path:
    """The per-layer sensitivity table as a bar chart (PNG at `path`, written atomically): each
    weighted layer's output SNR when quantized alone, in graph order (lower = more sensitive),
    bars coloured by the precision its weights get: the mixed model's `placement` when given,
    else what the mode gives the layer."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layers = [_middle(str(row.get("layer", ""))) for row in rows]
    values = [finite_number(row.get("output_snr_db")) for row in rows]
    precisions = [(placement or {}).get(str(row.get("layer", "")), row.get("quantization", ""))
                  for row in rows]
    fig = Figure(figsize=(10, 1.5 + 0.35 * max(len(rows), 1)), dpi=100)
    ax = fig.add_subplot()
    positions = list(range(len(rows)))
    ax.barh(positions, [v if v is not None else 0.0 for v in values],
            color=[PRECISION_COLOURS.get(str(p), "tab:red") for p in precisions])
    for position, value in zip(positions, values):
        ax.annotate("not measured" if value is None else f"{value:.1f}", (value or 0.0, position),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(positions, labels=layers, fontsize=7)
    ax.invert_yaxis()  # graph order, first layer on top
    ax.set_xlabel("model output SNR with this layer quantized alone (dB; lower = more sensitive)")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    shown = sorted({str(p) for p in precisions}, key=str)
    ax.legend(handles=[Patch(color=PRECISION_COLOURS.get(p, "tab:red"), label=p or "?")
                       for p in shown], loc="lower right", fontsize=8,
              title="mixed placement" if placement is not None else "weights")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
