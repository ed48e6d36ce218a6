"""Quality gates, Pareto front and the choice of the champion: pure functions of the benchmark
results (plain dicts, one per variant) and the config. No MLflow, no TensorFlow.

A variant passes when it ran, lost at most `max_accuracy_drop_pts` of accuracy against the float32
TFLite baseline, and meets the optional compression, latency and memory gates. The champion is the
passing variant with the lowest objective value; ties go to higher accuracy, then to the name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineInputError

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

# objective -> (result metric, unit, words for the selection reason). Lower is better for all.
OBJECTIVE_METRICS = {
    "gzip_size": ("gzip_size_bytes", "bytes", "smallest gzip size"),
    "latency": ("latency_ms_p50", "ms", "lowest p50 latency"),
    "memory": ("peak_memory_mb", "MB", "lowest peak memory"),
}
PARETO_METRICS = ("accuracy", "gzip_size_bytes", "latency_ms_p50")
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Selection":
        return cls(champion=data.get("champion"), passed=list(data.get("passed", [])),
                   rejected={k: list(v) for k, v in data.get("rejected", {}).items()},
                   pareto=list(data.get("pareto", [])), objective=data["objective"],
                   reason=data.get("reason", ""))


def objective_value(result: dict[str, Any], objective: str) -> float | None:
    """The result's value for `objective` (lower is better), or None when it was not measured."""
    if objective not in OBJECTIVE_METRICS:
        raise PipelineInputError(
            f"objective must be one of {', '.join(OBJECTIVE_METRICS)}, got {objective!r}")
    return finite_number(result.get(OBJECTIVE_METRICS[objective][0]))


def accuracy_floor(config: "PipelineConfig", num_classes: int | None) -> float:
    """The lowest accuracy any model may have: `min_accuracy`, else clearly above chance
    (1.5 / classes): relative gates alone would pass every variant of a broken baseline."""
    if config.min_accuracy is not None:
        return config.min_accuracy
    return 1.5 / num_classes if num_classes else 0.0


def gate_failures(result: dict[str, Any], config: "PipelineConfig",
                  num_classes: int | None = None) -> list[str]:
    """Why `result` fails the quality gates, one human sentence each; [] when it passes."""
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
    rejected = {}
    passing = []
    for result in results:
        failures = gate_failures(result, config, num_classes)
        if failures:
            rejected[result["variant"]] = failures
        else:
            passing.append(result)
    passing.sort(key=lambda r: (objective_value(r, config.objective), -r["accuracy"], r["variant"]))
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
    else:
        champion = None
        if not results:
            reason = "no variant results to choose from"
        else:
            first = next(iter(rejected))
            reason = (f"no variant passed the gates ({len(rejected)} rejected; e.g. {first}: "
                      f"{'; '.join(rejected[first])})")
    return Selection(champion=champion, passed=passed, rejected=rejected,
                     pareto=pareto_front(results), objective=config.objective, reason=reason)


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
