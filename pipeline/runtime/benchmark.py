"""Size, gzip size, latency percentiles and peak memory of a .tflite model.

Latency and memory are measured in a fresh Python subprocess (`python -m pipeline.runtime.benchmark
MODEL.tflite`), the way LiteRT's benchmark tool reports a footprint: the memory figure is the peak
resident-set growth caused by loading the model, allocating its tensors and running it, so no
earlier allocation in the pipeline's own process pollutes it.

The runtime is LiteRT's CompiledModel on XNNPACK with XNNPACK's weight cache, measured warm (a first
child packs the weights into a cache file, as an app's first launch does; the measured child loads
them from it). Without the cache XNNPACK keeps a packed copy of every weight beside the model's
own, so the footprint holds the weights twice (ResNet50 float32: 195 MiB instead of 107 MiB;
see benchmarks/results.md). `runtime="interpreter"` measures the classic
`ai_edge_litert.interpreter.Interpreter` (default XNNPACK delegate, no cache) instead, and is the
fallback for a model the CompiledModel refuses.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.runtime.litert import RUNTIMES

KERNEL_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}


@dataclass
class Measurement:
    size_bytes: int
    gzip_size_bytes: int
    latency_ms_p50: float
    latency_ms_p90: float
    peak_memory_mb: float
    num_threads: int
    runs: int
    runtime: str = "compiled"
    # Why the CompiledModel refused the model when `runtime` fell back to "interpreter".
    fallback_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def gzip_size(path: str | Path) -> int:
    """Deployed size: the file compressed with gzip at its highest level (as served over HTTP or
    stored in an app bundle)."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9))


def weight_stats(model_path: str | Path) -> dict[str, float]:
    """Share of zero weights and the most distinct values in one kernel, read from the .tflite's
    conv/dense kernels (after any dequantize op), so the figures describe what ships."""
    from pipeline.runtime.litert import TFLiteGraph
    graph = TFLiteGraph(model_path)
    zeros = total = unique_max = 0
    for op in graph.ops:
        index = graph.weight_index(op, through_dequantize=True)
        if op["op_name"] not in KERNEL_OPS or index is None:
            continue
        try:
            kernel = graph.interpreter.get_tensor(index)
        except ValueError:
            continue  # not a constant tensor
        zeros += int((kernel == 0).sum())
        total += kernel.size
        unique_max = max(unique_max, len(np.unique(kernel)))
    return {"sparsity": zeros / total if total else 0.0, "unique_weights_max": float(unique_max)}


def measure(model_path: str | Path, *, runs: int = 200, warmup: int = 20, num_threads: int = 1,
            timeout: float = 600.0, runtime: str = "compiled") -> Measurement:
    """Measure in a fresh subprocess; raises RuntimeError with the child's error if it fails.

    `runtime="compiled"` falls back to the interpreter for a model the CompiledModel refuses: the
    result's `runtime` says which one measured it and `fallback_reason` why (e.g. a model with an
    int16 input, which LiteRT's Python TensorBuffer cannot be written with)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    figures = fallback_reason = None
    if runtime == "compiled":
        with tempfile.TemporaryDirectory(prefix="xnnpack-weights-") as cache_dir:
            options = ["--runtime", "compiled", "--weight-cache", os.path.join(cache_dir, "weights.cache")]
            try:
                _run_child(model_path, 1, 0, num_threads, options, timeout)  # packs the weight cache
                figures = _run_child(model_path, runs, warmup, num_threads, options, timeout)
            except RuntimeError as error:
                runtime, fallback_reason = "interpreter", str(error)
    if figures is None:
        figures = _run_child(model_path, runs, warmup, num_threads, ["--runtime", "interpreter"], timeout)
    return Measurement(size_bytes=Path(model_path).stat().st_size,
                       gzip_size_bytes=gzip_size(model_path), runs=runs, num_threads=num_threads,
                       runtime=runtime, fallback_reason=fallback_reason, **figures)


def _run_child(model_path, runs: int, warmup: int, num_threads: int, options: list[str],
               timeout: float) -> dict:
    return run_measuring_child(
        "pipeline.runtime.benchmark", [str(model_path), "--runs", str(runs), "--warmup", str(warmup),
                               "--threads", str(num_threads), *options],
        f"benchmark of {Path(model_path).name}", timeout)


def run_measuring_child(module: str, args: list[str], label: str, timeout: float) -> dict:
    """Run `python -m module args` in a fresh process (the project importable); its last line of
    output is a JSON object of figures. Raises RuntimeError with the child's last error line."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{label} failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM...), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(model_path: str, runs: int, warmup: int, num_threads: int,
           runtime: str = "compiled", weight_cache: str = "") -> dict:
    from pipeline.runtime.litert import compiled_environment, input_signature, open_for_benchmark
    rng = np.random.default_rng(0)
    # The runtime's import and set-up happen before the baseline: a once-per-process cost.
    if runtime == "compiled":
        compiled_environment()
    shape, dtype = input_signature(model_path)
    try:  # reset the peak-RSS mark so only what follows counts (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    baseline_kib = rss_kib("VmRSS")
    set_input, invoke = open_for_benchmark(model_path, shape, runtime, num_threads,
                                           weight_cache or None)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        sample = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        sample = rng.random(shape, dtype=np.float32).astype(dtype)
    for _ in range(warmup):
        set_input(sample)
        invoke()
    timings = np.empty(runs)
    for i in range(runs):
        set_input(sample)
        start = time.perf_counter_ns()
        invoke()
        timings[i] = (time.perf_counter_ns() - start) / 1e6
    peak_kib = rss_kib("VmHWM")
    return {"latency_ms_p50": float(np.percentile(timings, 50)),
            "latency_ms_p90": float(np.percentile(timings, 90)),
            "peak_memory_mb": max(0, peak_kib - baseline_kib) / 1024.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Measure one .tflite model (latency, memory).")
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", choices=RUNTIMES, default="compiled")
    parser.add_argument("--weight-cache", default="",
                        help="XNNPACK weight cache file (compiled runtime): built if missing")
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.model, args.runs, args.warmup, args.threads, args.runtime,
                            args.weight_cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
