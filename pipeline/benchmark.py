"""Size, gzip size, latency percentiles and peak memory of a .tflite model.

Latency and memory are measured in a fresh Python subprocess (`python -m pipeline.benchmark
MODEL.tflite`), the way LiteRT's benchmark tool reports a footprint: the memory figure is the peak
resident-set growth caused by loading the model, allocating its tensors and running it, so no
earlier allocation in the pipeline's own process pollutes it.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

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

    def to_dict(self) -> dict:
        return asdict(self)


def gzip_size(path: str | Path) -> int:
    """Deployed size: the file compressed with gzip at its highest level (as served over HTTP or
    stored in an app bundle)."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9))


def weight_stats(model_path: str | Path) -> dict[str, float]:
    """Share of zero weights and the most distinct values in one kernel, read from the .tflite's
    conv/dense kernels (after any dequantize op), so the figures describe what ships."""
    from pipeline.evaluate import make_interpreter
    interpreter = make_interpreter(str(model_path))
    ops = interpreter._get_ops_details()  # noqa: SLF001 (the only way to walk the graph)
    producers = {out: op for op in ops for out in op["outputs"]}
    zeros = total = unique_max = 0
    for op in ops:
        if op["op_name"] not in KERNEL_OPS or len(op["inputs"]) < 2:
            continue
        index = op["inputs"][1]
        while index in producers and producers[index]["op_name"] == "DEQUANTIZE":
            index = producers[index]["inputs"][0]
        try:
            kernel = interpreter.get_tensor(index)
        except ValueError:
            continue  # not a constant tensor
        zeros += int((kernel == 0).sum())
        total += kernel.size
        unique_max = max(unique_max, len(np.unique(kernel)))
    return {"sparsity": zeros / total if total else 0.0, "unique_weights_max": float(unique_max)}


def measure(model_path: str | Path, *, runs: int = 200, warmup: int = 20, num_threads: int = 1,
            timeout: float = 600.0) -> Measurement:
    """Measure in a fresh subprocess; raises RuntimeError with the child's error if it fails."""
    command = [sys.executable, "-m", "pipeline.benchmark", str(model_path), "--runs", str(runs),
               "--warmup", str(warmup), "--threads", str(num_threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"benchmark of {Path(model_path).name} failed: {tail[0]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return Measurement(size_bytes=Path(model_path).stat().st_size,
                       gzip_size_bytes=gzip_size(model_path), runs=runs, num_threads=num_threads,
                       **figures)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(model_path: str, runs: int, warmup: int, num_threads: int) -> dict:
    from ai_edge_litert.interpreter import Interpreter
    rng = np.random.default_rng(0)
    try:  # reset the peak-RSS mark so only what follows counts (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    baseline_kib = _rss_kib("VmRSS")
    interpreter = Interpreter(model_path=model_path, num_threads=num_threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    shape = [1] + list(detail["shape"][1:])
    if list(detail["shape"]) != shape:
        interpreter.resize_tensor_input(detail["index"], shape, strict=False)
        interpreter.allocate_tensors()
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        sample = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        sample = rng.random(shape, dtype=np.float32).astype(dtype)
    for _ in range(warmup):
        interpreter.set_tensor(detail["index"], sample)
        interpreter.invoke()
    timings = np.empty(runs)
    for i in range(runs):
        interpreter.set_tensor(detail["index"], sample)
        start = time.perf_counter_ns()
        interpreter.invoke()
        timings[i] = (time.perf_counter_ns() - start) / 1e6
    peak_kib = _rss_kib("VmHWM")
    return {"latency_ms_p50": float(np.percentile(timings, 50)),
            "latency_ms_p90": float(np.percentile(timings, 90)),
            "peak_memory_mb": max(0, peak_kib - baseline_kib) / 1024.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Measure one .tflite model (latency, memory).")
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.model, args.runs, args.warmup, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
