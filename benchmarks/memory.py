"""Which LiteRT loading, interpreter and delegate options keep a model's weights in memory once.

Each configuration runs in a fresh process (`python -m benchmarks.memory MODEL --config NAME`) that
reports its peak resident-set growth (as pipeline.runtime.benchmark does) and where the resident pages are
at the end, from /proc/self/smaps: the model file's mapped pages, the XNNPACK weight-cache file's,
shared libraries' (kernel code touched for the first time) and anonymous memory (heap: arena,
packed weights, copies).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT
from pipeline.runtime.benchmark import rss_kib

CONFIGS = {
    "interpreter": "Interpreter(model_path), default XNNPACK delegate (the pipeline until now)",
    "interpreter-no-delegate": "Interpreter, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES",
    "interpreter-model-content": "Interpreter(model_content=bytes read after the baseline)",
    "compiled": "CompiledModel, XNNPACK (CpuKernelMode.XNNPACK), no weight cache",
    "compiled-builtin": "CompiledModel, CpuKernelMode.BUILTIN (TFLite's own kernels)",
    "compiled-cache-cold": "CompiledModel, XNNPACK + weight cache file, first load (packs it)",
    "compiled-cache-warm": "CompiledModel, XNNPACK + weight cache file, later loads (maps it)",
}
# The configurations measured at both thread counts (the rest at the higher one only).
BOTH_THREAD_COUNTS = ("interpreter", "interpreter-no-delegate", "compiled-cache-warm")


def _resident_by_mapping(model_path: str, cache_path: str) -> dict[str, int]:
    """Resident KiB per kind of mapping: model file, cache file, shared libraries, the rest."""
    kinds = {"model_file": 0, "cache_file": 0, "libraries": 0, "anonymous": 0}
    kind = "anonymous"
    model_path, cache_path = os.path.realpath(model_path), os.path.realpath(cache_path) if cache_path else None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split(maxsplit=5)
                name = fields[5].strip() if len(fields) > 5 else ""
                if name == model_path:
                    kind = "model_file"
                elif cache_path and name == cache_path:
                    kind = "cache_file"
                elif ".so" in os.path.basename(name):
                    kind = "libraries"
                else:
                    kind = "anonymous"
            elif line.startswith("Rss:"):
                kinds[kind] += int(line.split()[1])
    return kinds


def _child(model_path: str, config: str, threads: int, runs: int, warmup: int, cache: str) -> dict:
    from ai_edge_litert import compiled_model as litert
    from ai_edge_litert.environment import Environment
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    environment = Environment.create() if config.startswith("compiled") else None
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak mark
    base_kib, base_by = rss_kib("VmRSS"), _resident_by_mapping(model_path, cache)
    started = time.perf_counter()
    if config.startswith("interpreter"):
        if config == "interpreter-model-content":
            interpreter = Interpreter(model_content=Path(model_path).read_bytes(), num_threads=threads)
        elif config == "interpreter-no-delegate":
            interpreter = Interpreter(model_path=model_path, num_threads=threads, experimental_op_resolver_type=
                                      OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        else:
            interpreter = Interpreter(model_path=model_path, num_threads=threads)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        sample = np.zeros(detail["shape"], detail["dtype"])
        interpreter.set_tensor(detail["index"], sample)
        invoke = interpreter.invoke
    else:
        cpu = litert.CpuOptions(num_threads=threads)
        if config == "compiled-builtin":
            cpu.kernel_mode = litert.CpuKernelMode.BUILTIN
        if config.startswith("compiled-cache"):
            cpu.xnnpack_weight_cache_path = cache
        model = litert.CompiledModel.from_file(model_path, options=litert.Options(cpu_options=cpu),
                                               environment=environment)
        inputs, outputs = model.create_input_buffers(0), model.create_output_buffers(0)
        signature = next(iter(model.get_signature_list()))
        detail = next(iter(model.get_input_tensor_details(signature).values()))
        inputs[0].write(np.zeros(detail["shape"], np.dtype(detail["dtype"])))

        def invoke():
            model.run_by_index(0, inputs, outputs)
    invoke()
    load_seconds = time.perf_counter() - started
    for _ in range(warmup):
        invoke()
    timings = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        invoke()
        timings.append((time.perf_counter_ns() - start) / 1e6)
    end_by = _resident_by_mapping(model_path, cache)
    result = {"peak_memory_mb": (rss_kib("VmHWM") - base_kib) / 1024,
              "latency_ms_p50": float(np.percentile(timings, 50)),
              "first_invoke_s": load_seconds}
    for kind in end_by:
        result[f"{kind}_mb"] = max(0, end_by[kind] - base_by[kind]) / 1024
    return result


def probe(model_path: Path, config: str, threads: int, *, runs: int, warmup: int, cache: str = "",
          timeout: float = 900.0) -> dict:
    """One configuration in a fresh process; {'error': ...} if it failed."""
    command = [sys.executable, "-m", "benchmarks.memory", str(model_path), "--config", config,
               "--threads", str(threads), "--runs", str(runs), "--warmup", str(warmup)]
    if cache:
        command += ["--cache", cache]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def investigate(models: dict[str, Path], *, threads=(1, 2), runs: int = 5, warmup: int = 1,
                on_progress=lambda message: None) -> list[dict]:
    """Every configuration for every model (mode -> .tflite): one row each."""
    rows = []
    for mode, path in models.items():
        with tempfile.TemporaryDirectory(prefix="xnnpack-weights-") as cache_dir:
            for count in sorted(threads):
                cache = os.path.join(cache_dir, f"{mode}-{count}.cache")
                for config in CONFIGS:
                    if count != max(threads) and config not in BOTH_THREAD_COUNTS:
                        continue
                    if config == "compiled-cache-warm" and not os.path.exists(cache):
                        probe(path, "compiled-cache-cold", count, runs=1, warmup=0, cache=cache)
                    on_progress(f"{mode}: {config}, {count} thread(s)")
                    result = probe(path, config, count, runs=runs, warmup=warmup,
                                   cache=cache if config.startswith("compiled-cache") else "")
                    rows.append({"variant": mode, "config": config, "threads": count, **result})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Peak memory of one .tflite under one configuration.")
    parser.add_argument("model")
    parser.add_argument("--config", choices=list(CONFIGS), required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cache", default="")
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.model, args.config, args.threads, args.runs, args.warmup, args.cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
