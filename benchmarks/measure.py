"""Side-by-side LiteRT measurements: every model, every thread count, several rounds, interleaved
(the order flips each round), so the machine's background load falls on all of them alike; the
tables report medians over rounds.

Each measurement is the pipeline's own benchmark child (`python -m pipeline.runtime.benchmark`, the same
code the `benchmark` stage runs) with its default runtime: LiteRT's CompiledModel on XNNPACK with
a warm weight cache. The cache of each (model, thread count) is packed once by a first child and
reused by every round, as `pipeline.runtime.benchmark.measure` does within one call.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, median, progress


def _child(model: Path, *, runs: int, warmup: int, threads: int, options: list[str]) -> dict:
    command = [sys.executable, "-m", "pipeline.runtime.benchmark", str(model), "--runs", str(runs),
               "--warmup", str(warmup), "--threads", str(threads), *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(tail[0][:300])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prepare(model: Path, threads: int, cache: str) -> list[str]:
    """Pack the model's weight cache (the first load); a model the CompiledModel refuses is
    measured with the interpreter instead, as `pipeline.runtime.benchmark.measure` does."""
    compiled = ["--runtime", "compiled", "--weight-cache", cache]
    try:
        _child(model, runs=1, warmup=0, threads=threads, options=compiled)
        return compiled
    except RuntimeError:
        return ["--runtime", "interpreter"]


def litert_rounds(models: dict[str, Path], *, threads: tuple[int, ...], rounds: int, runs: int,
                  warmup: int, section: str) -> dict[tuple[str, int], dict]:
    """(name, threads) -> medians over rounds of latency p50/p90 and peak memory, the per-round
    figures, and the runtime that measured them."""
    samples: dict[tuple[str, int], list[dict]] = {(n, t): [] for n in models for t in threads}
    options: dict[tuple[str, int], list[str]] = {}  # how each (model, threads) is measured
    errors: dict[tuple[str, int], str] = {}
    names = list(models)
    with tempfile.TemporaryDirectory(prefix="bench-xnnpack-") as cache_dir:
        for round_index in range(rounds):
            flip = round_index % 2 == 1
            for count in (tuple(reversed(threads)) if flip else threads):
                progress(section, f"round {round_index + 1}/{rounds}, {count} thread(s): "
                                  f"{len(names)} model(s) x {runs} runs")
                for name in (list(reversed(names)) if flip else names):
                    key = (name, count)
                    if key in errors:
                        continue
                    try:
                        if key not in options:
                            options[key] = _prepare(models[name], count,
                                                    os.path.join(cache_dir, f"{len(options)}.cache"))
                        samples[key].append(_child(models[name], runs=runs, warmup=warmup,
                                                   threads=count, options=options[key]))
                    except RuntimeError as error:
                        errors[key] = str(error)
                        progress(section, f"{name} ({count} thread(s)) failed: {error}")
    results = {}
    for key, figures in samples.items():
        results[key] = {
            "latency_ms_p50": median(f["latency_ms_p50"] for f in figures),
            "latency_ms_p90": median(f["latency_ms_p90"] for f in figures),
            "peak_memory_mb": median(f["peak_memory_mb"] for f in figures),
            "rounds": [{k: round(v, 4) for k, v in f.items()} for f in figures],
            "runtime": options[key][1] if key in options else None,
            "error": errors.get(key),
        }
    return results
