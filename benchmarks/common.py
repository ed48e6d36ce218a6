"""What every section shares: progress lines, the machine's description, medians, and running the
pipeline's own command line in a subprocess with its output kept in a log."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The bench's sections in order (their numbers in results.md).
SECTIONS = ("resnet", "cnn", "stages", "sparse", "int4", "throughput", "peer", "orchestration", "scaling",
            "search")
# CPU features that decide which kernels run (int8 dot products, fp16, AMX tiles).
KEY_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                 "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
                 "amx_bf16")
PACKAGES = ("tensorflow", "tf-keras", "keras", "ai-edge-litert", "numpy", "onnxruntime", "tf2onnx",
            "onnx", "apache-airflow", "mlflow")

_started = time.monotonic()


def progress(section: str, message: str) -> None:
    """One line on stderr, prefixed by the time since the start: `make bench` shows it live."""
    elapsed = int(time.monotonic() - _started)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {section}: {message}", file=sys.stderr, flush=True)


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def load_average() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


def machine() -> dict:
    """CPU model and flags, cores, memory, load, OS and the versions that matter."""
    cpu_model, flags = None, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model is None:
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    cpu_model = cpu_model or platform.processor() or "unknown"
    memory_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": memory_gb,
        "key_cpu_flags": [f for f in KEY_CPU_FLAGS if f in flags],
        "cpu_flags": flags,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def bench_env(cache_dir: Path, **extra: str) -> dict:
    """The environment for the pipeline's subprocesses: the project importable, TF-MOT's Keras 2,
    quiet TensorFlow, and the bench's own MLflow store and work folder (never the user's)."""
    env = dict(os.environ)
    env.update({
        "TF_USE_LEGACY_KERAS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MLFLOW_TRACKING_URI": f"sqlite:///{cache_dir / 'runs' / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def run_logged(command: list[str], *, env: dict, log_path: Path, section: str,
               show=("Epoch ", "baseline:", "selection:", "Registered", "failed", "Error", "error:"),
               timeout: float = 3600.0) -> tuple[int, float]:
    """Run `command`, keep its whole output in `log_path` and echo the lines worth seeing as
    progress. Returns (exit status, wall seconds)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
        deadline = started + timeout
        for line in child.stdout:
            log.write(line)
            text = line.strip()
            native_log = text[:1] in "EWI" and text[1:5].isdigit()  # absl lines, e.g. a CUDA probe
            if text and not native_log and any(key in text for key in show):
                progress(section, text[-160:])
            if time.perf_counter() > deadline:
                child.kill()
                break
        status = child.wait()
    return status, time.perf_counter() - started


def last_lines(path: Path, count: int = 5) -> str:
    try:
        return "\n".join(path.read_text().strip().splitlines()[-count:])
    except OSError:
        return ""


def find_run_dir(work_dir: Path) -> Path:
    """The one pipeline run a fresh work folder holds (its `context.json` is written by `train`)."""
    found = sorted(work_dir.glob("*/context.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"no pipeline run found under {work_dir}")
    return found[-1].parent


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None
