"""Quality gates, Pareto front and the choice of the champion: pure functions of the benchmark
results (plain dicts, one per variant) and the config. No MLflow, no TensorFlow.

A variant passes when it ran, lost at most `max_accuracy_drop_pts` of accuracy against the float32
TFLite baseline, is not slower nor hungrier than the run's float32 variant beyond
`max_latency_ratio` / `max_memory_ratio` (plus a noise slack), and meets the optional absolute
compression, latency and memory gates. The champion is the passing variant with the lowest
objective value; ties go to higher accuracy, then to the name (`size_within_latency`: to lower
latency first).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config import accuracy_floor
from pipeline.errors import PipelineInputError

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

# objective -> (result metric, unit, words for the selection reason). Lower is better for all.
OBJECTIVE_METRICS = {
    # The default: what users deploy for is a smaller model that runs no slower than the float32
    # one; gzip size alone once crowned an int4 MobileNet 3.6x slower than float32 (issue 23).
    "size_within_latency": ("gzip_size_bytes", "bytes",
                            "smallest gzip size not slower than float32"),
    "gzip_size": ("gzip_size_bytes", "bytes", "smallest gzip size"),
    "latency": ("latency_ms_p50", "ms", "lowest p50 latency"),
    "memory": ("peak_memory_mb", "MB", "lowest peak memory"),
}
PARETO_METRICS = ("accuracy", "gzip_size_bytes", "latency_ms_p50")
# The variant the relative gates compare against (the same run, the same machine).
REFERENCE_VARIANT = "float32"
# Absolute slack on top of the relative gates, from repeated measurements of one file
# (`benchmark.measure`, 6 child processes each): the default CNN's int8 p50 spread 0.048-0.063 ms
# and its float32 0.124-0.131 ms, so a ratio alone would flap between equal-speed tiny models;
# its float32 peak memory read 3.0 MB in one process and 4.0 MB in another (MobileNetV2-0.35:
# 4.4 and 5.7 MB).
LATENCY_SLACK_MS = 0.02
MEMORY_SLACK_MB = 1.5
# metric -> (ratio setting, absolute slack, words, unit) of the gates relative to float32.
RELATIVE_GATES = {
    "latency_ms_p50": ("max_latency_ratio", LATENCY_SLACK_MS, "p50", "ms"),
    "peak_memory_mb": ("max_memory_ratio", MEMORY_SLACK_MB, "peak memory", "MB"),
}
# Measurements compared against a threshold are allowed this much float noise.
_EPSILON = 1e-9


@dataclass
class Selection:
    champion: str | None
    passed: list[str]                   # best first (objective, then accuracy, then name)
    rejected: dict[str, list[str]]      # variant -> why it failed the gates (or failed to run)
    pareto: list[str]                   # non-dominated variants, smallest gzip size first
    objective: str
    reason: str
    # Gates that could not apply, and why (e.g. no float32 variant to compare latency with).
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Selection":
        return cls(champion=data.get("champion"), passed=list(data.get("passed", [])),
                   rejected={k: list(v) for k, v in data.get("rejected", {}).items()},
                   pareto=list(data.get("pareto", [])), objective=data["objective"],
                   reason=data.get("reason", ""), notes=list(data.get("notes", [])))


def objective_value(result: dict[str, Any], objective: str) -> float | None:
    """The result's value for `objective` (lower is better), or None when it was not measured."""
    if objective not in OBJECTIVE_METRICS:
        raise PipelineInputError(
            f"objective must be one of {', '.join(OBJECTIVE_METRICS)}, got {objective!r}")
    return finite_number(result.get(OBJECTIVE_METRICS[objective][0]))


def reference_result(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's float32 variant when it ran: what the relative gates compare against."""
    return next((r for r in results
                 if r.get("variant") == REFERENCE_VARIANT and r.get("status") == "ok"), None)


def relative_limit(reference: dict[str, Any] | None, metric: str, ratio: float | None) -> float | None:
    """The largest `metric` a variant may have: the reference's x `ratio` + the metric's slack;
    None when the gate is off (`ratio` None or 0) or the reference did not measure it."""
    base = finite_number((reference or {}).get(metric))
    if not ratio or base is None:
        return None
    return base * ratio + RELATIVE_GATES[metric][1]


def unapplied_gates(results: list[dict[str, Any]], config: "PipelineConfig") -> list[str]:
    """One sentence per relative gate that is on but cannot apply to these results."""
    reference = reference_result(results)
    notes = []
    for metric, (setting, _, _, _) in RELATIVE_GATES.items():
        if not getattr(config, setting) or not results:
            continue
        if reference is None:
            notes.append(f"{setting} could not apply: no {REFERENCE_VARIANT} variant ran in this "
                         f"run to compare with (add {REFERENCE_VARIANT} to the variants)")
        elif finite_number(reference.get(metric)) is None:
            notes.append(f"{setting} could not apply: the {REFERENCE_VARIANT} variant has no "
                         f"{metric} measured")
    return notes


def gate_failures(result: dict[str, Any], config: "PipelineConfig",
                  num_classes: int | None = None,
                  reference: dict[str, Any] | None = None) -> list[str]:
    """Why `result` fails the quality gates, one human sentence each; [] when it passes.
    `reference` is the run's float32 result (`reference_result`): without it the relative gates
    do not apply (`unapplied_gates` says so)."""
    if result.get("status") != "ok":
        status = "skipped" if result.get("status") == "skipped" else "failed"
        return [f"{status}: {result.get('error') or 'unknown error'}"]
    reasons = []
    accuracy = finite_number(result.get("accuracy"))
    floor = accuracy_floor(config, num_classes)
    if accuracy is None:
        reasons.append("no accuracy measured")
    elif accuracy < floor - _EPSILON:
        reasons.append(f"accuracy {accuracy:.4f} < {floor:.4f} required (min_accuracy)")
    delta = finite_number(result.get("accuracy_delta_pts"))
    if delta is None:
        reasons.append("no accuracy_delta_pts measured")
    elif -delta > config.max_accuracy_drop_pts + _EPSILON:
        reasons.append(f"accuracy drop {_fmt(-delta)} pts > "
                       f"{_fmt(config.max_accuracy_drop_pts)} allowed")
    gates = (
        # (metric, threshold, lower bound?, words, unit)
        ("compression_ratio", config.min_compression_ratio, True, "compression ratio", ""),
        ("latency_ms_p50", config.max_latency_ms, False, "latency p50", " ms"),
        ("peak_memory_mb", config.max_peak_memory_mb, False, "peak memory", " MB"),
    )
    for metric, threshold, is_minimum, words, unit in gates:
        if threshold is None:
            continue
        value = finite_number(result.get(metric))
        if value is None:
            reasons.append(f"no {metric} measured")
        elif is_minimum and value < threshold - _EPSILON:
            reasons.append(f"{words} {_fmt(value)}{unit} < {_fmt(threshold)}{unit} required")
        elif not is_minimum and value > threshold + _EPSILON:
            reasons.append(f"{words} {_fmt(value)}{unit} > {_fmt(threshold)}{unit} allowed")
    for metric, (setting, slack, words, unit) in RELATIVE_GATES.items():
        ratio = getattr(config, setting)
        base = finite_number((reference or {}).get(metric))
        if not ratio or base is None:
            continue
        value = finite_number(result.get(metric))
        if value is None:
            if f"no {metric} measured" not in reasons:
                reasons.append(f"no {metric} measured")
        elif value > base * ratio + slack + _EPSILON:
            digits = 3 if unit == "ms" else 1
            reasons.append(f"{words} {value:.{digits}f} {unit} > {ratio:g} x {REFERENCE_VARIANT}'s "
                           f"{base:.{digits}f} {unit} + {slack:g} {unit} ({setting})")
    metric = OBJECTIVE_METRICS[config.objective][0]
    if finite_number(result.get(metric)) is None and f"no {metric} measured" not in reasons:
        reasons.append(f"no {metric} measured (needed by the objective {config.objective})")
    return reasons


def pareto_front(results: list[dict[str, Any]]) -> list[str]:
    """Names of the ok variants no other ok variant dominates on (accuracy max, gzip size min,
    p50 latency min), smallest gzip size first. Variants missing one of these are left out."""
    points: dict[str, tuple[float, float, float]] = {}
    for result in results:
        accuracy, size, latency = (finite_number(result.get(k)) for k in PARETO_METRICS)
        if (result.get("status") == "ok" and accuracy is not None and size is not None
                and latency is not None):
            points[result["variant"]] = (-accuracy, size, latency)  # all "lower is better"

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and a != b

    front = [name for name, p in points.items()
             if not any(dominates(q, p) for other, q in points.items() if other != name)]
    return sorted(front, key=lambda name: (points[name][1], points[name][0], name))


def choose(results: list[dict[str, Any]], config: "PipelineConfig",
           num_classes: int | None = None) -> Selection:
    """Apply the gates, compute the Pareto front, and pick the champion by `config.objective`."""
    names = [r.get("variant") for r in results]
    duplicates = sorted({n for n in names if names.count(n) > 1}, key=str)  # may hold None
    if duplicates:
        raise PipelineInputError(f"duplicate variant results: {', '.join(map(str, duplicates))}")
    reference = reference_result(results)
    notes = unapplied_gates(results, config)
    rejected = {}
    passing = []
    for result in results:
        failures = gate_failures(result, config, num_classes, reference)
        if failures:
            rejected[result["variant"]] = failures
        else:
            passing.append(result)
    rank, objective_note = _ranking(config, reference)
    if objective_note and results:
        notes.append(objective_note)
    passing.sort(key=rank)
    passed = [r["variant"] for r in passing]
    _, unit, words = OBJECTIVE_METRICS[config.objective]
    if passing:
        best = passing[0]
        champion = best["variant"]
        best_value = objective_value(best, config.objective)
        assert best_value is not None  # gate_failures rejects a result without its objective metric
        reason = (f"{champion}: {words} ({_fmt(best_value)} {unit}) "
                  f"among {len(passing)} of {len(results)} variants passing the gates; accuracy "
                  f"{best['accuracy']:.4f} ({_fmt(best['accuracy_delta_pts'])} pts vs float32)")
        if rank(best)[0]:
            reason += f"; no passing variant is as fast as {REFERENCE_VARIANT}"
    else:
        champion = None
        if not results:
            reason = "no variant results to choose from"
        else:
            first = next(iter(rejected))
            reason = (f"no variant passed the gates ({len(rejected)} rejected; e.g. {first}: "
                      f"{'; '.join(rejected[first])})")
    return Selection(champion=champion, passed=passed, rejected=rejected,
                     pareto=pareto_front(results), objective=config.objective, reason=reason,
                     notes=notes)


def _ranking(config: "PipelineConfig", reference: dict[str, Any] | None):
    """(sort key of passing results, best first; a note when the objective cannot see float32's
    latency). `size_within_latency` puts the variants within float32's p50 x
    `max_latency_ratio` (x 1 when that gate is off) plus the slack first, then orders by gzip
    size, then latency; the other objectives order by their metric, then accuracy."""
    objective = config.objective
    if objective != "size_within_latency":
        return (lambda r: (0, objective_value(r, objective), -r["accuracy"], r["variant"])), None
    limit = relative_limit(reference, "latency_ms_p50", config.max_latency_ratio or 1.0)
    note = None if limit is not None else (
        f"{objective} ranked by gzip size alone: no {REFERENCE_VARIANT} p50 latency to compare with")

    def key(r):
        latency = finite_number(r.get("latency_ms_p50"))
        slower = limit is not None and (latency is None or latency > limit + _EPSILON)
        return (int(slower), objective_value(r, objective),
                math.inf if latency is None else latency, -r["accuracy"], r["variant"])
    return key, note


def finite_number(value: Any) -> float | None:
    """A finite float, or None for missing/NaN values (failed measurements)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt(value: float) -> str:
    """Short human number: 1.4, 1.04, 1.0, 12345."""
    if float(value).is_integer() and abs(value) >= 100:
        return str(int(value))
    text = f"{value:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text
