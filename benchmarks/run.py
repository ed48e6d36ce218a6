"""`python -m benchmarks.run [--quick] [--out DIR]`: the pipeline's performance side by side.

Writes DIR/results.md and DIR/results.json (default: benchmarks/), with figures measured in this
one run: medians over interleaved rounds, ratios, the limits beside them, and the machine. Sections:

1. ResNet50 brought in through the pipeline's bring-your-own-model command line, in float32,
   dynamic, float16 and int8, and which LiteRT loading/delegate options keep its weights once.
2. The default CNN on Fashion-MNIST: every variant of the suite, with ratios to float32.
3. Time per stage of that run (as the stages recorded it in MLflow), before and after.
4. Sparse storage of its pruned models against dense.
5. int4 where it pays: the default CNN and MobileNetV2 quantized int8, int4 and int4 placed by
   measured latency, side by side (benchmarks/int4.py).
6. Evaluation throughput: the batched runner against one image per invoke.
7. A peer runtime: the same Keras model through ONNX (tf2onnx) and ONNX Runtime, fp32 and int8.
8. Orchestration overhead: the same small pipeline through the Airflow DAG and the command line.
9. Cost against dataset and model size (benchmarks/scaling.py).
10. The accuracy-aware search (auto-int4) against the fixed settings of the same chain, on the
    default CNN and a MobileNetV2 (benchmarks/search.py).

`--quick` (for tests/test_bench.py: the tables' shape, not their timings) uses a small stand-in
for ResNet50, a reduced training budget and fewer variants, rounds and runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks import common, limits
from benchmarks.common import ROOT, SECTIONS, median, progress

RESNET_VARIANTS = ("float32", "dynamic", "float16", "int8")
MIB = 1024 * 1024

FULL = {
    "resnet": {"architecture": "resnet50", "images_per_class": 40, "rounds": 3, "runs": 30,
               "warmup": 3, "probe_runs": 5, "pipeline_latency_runs": 30},
    "cnn": {"variants": None,  # None = the suite's defaults, like every other setting
            "args": [], "rounds": 3, "runs": 200, "warmup": 20},
    "sparse": {"rounds": 3, "runs": 200, "warmup": 20},
    "int4": {"rounds": 3, "runs": 200, "warmup": 20},
    "throughput": {"rounds": 3},
    "peer": {"rounds": 3, "runs": 200, "warmup": 20},
    "orchestration": {"rounds": 2,
                      "args": ["--epochs", "1", "--train-limit", "2000", "--test-limit", "1000",
                               "--variants", "float32,int8", "--set", "latency_runs=50",
                               "--set", "latency_warmup=5"]},
}
QUICK = {
    "resnet": {"architecture": "mobilenet-0.25", "images_per_class": 10, "rounds": 1, "runs": 10,
               "warmup": 2, "probe_runs": 3, "pipeline_latency_runs": 10},
    "cnn": {"variants": ["float32", "dynamic", "float16", "int8", "int16x8", "int4", "prune-int8"],
            "args": ["--epochs", "1", "--train-limit", "2000", "--test-limit", "2000",
                     "--set", "finetune_epochs=1", "--set", "calibration_samples=64",
                     "--set", "latency_runs=20", "--set", "latency_warmup=2"],
            "rounds": 1, "runs": 50, "warmup": 5},
    "sparse": {"rounds": 1, "runs": 50, "warmup": 5},
    "int4": {"rounds": 1, "runs": 20, "warmup": 2},
    "throughput": {"rounds": 1},
    "peer": {"rounds": 1, "runs": 50, "warmup": 5},
    "orchestration": {"rounds": 1,
                      "args": ["--epochs", "1", "--train-limit", "500", "--test-limit", "200",
                               "--variants", "float32", "--set", "latency_runs=5",
                               "--set", "latency_warmup=1"]},
}


class Bench:
    """Settings, folders and what earlier sections produced for later ones."""

    def __init__(self, args):
        self.quick = args.quick
        self.settings = QUICK if args.quick else FULL
        self.out = Path(args.out)
        self.cache = Path(args.cache_dir)
        self.runs_dir = self.cache / "runs"  # the pipeline runs of this bench run (wiped first)
        self.reuse_run = Path(args.reuse_run).resolve() if args.reuse_run else None
        self.search_models = tuple(args.search_models.split(",")) if args.search_models else None
        self.cnn_run: Path | None = None
        self.cnn_pipeline_seconds: float | None = None
        self.cnn_rows: dict[str, dict] = {}
        self.cnn_champion: str | None = None
        self.pipeline_failures: dict[str, str] = {}  # pipeline run name -> how it ended
        # This process reads the runs' records from the same MLflow store as the pipeline's: the
        # bench's own, or for a reused run, the store that run used (MLFLOW_TRACKING_URI or the
        # project's default).
        if self.reuse_run is None:
            os.environ["MLFLOW_TRACKING_URI"] = self.env()["MLFLOW_TRACKING_URI"]

    def env(self, **extra) -> dict:
        return common.bench_env(self.cache, **extra)

    def pipeline_run(self, name: str, args: list[str], section: str) -> tuple[Path, float]:
        """`python -m pipeline run ARGS` in its own work folder; returns (run folder, seconds)."""
        work = self.runs_dir / name
        shutil.rmtree(work, ignore_errors=True)
        command = [sys.executable, "-m", "pipeline", "run", "--experiment", f"bench-{name}",
                   "--registered-model-name", f"bench-{name}", *args]
        progress(section, "python -m pipeline run " + " ".join(args))
        status, seconds = common.run_logged(command, env=self.env(PIPELINE_WORK_DIR=str(work)),
                                            log_path=self.runs_dir / f"{name}.log", section=section)
        if status != 0:  # the variants it produced are still worth measuring: say so, go on
            last = common.last_lines(self.runs_dir / f"{name}.log", 1)
            self.pipeline_failures[name] = f"python -m pipeline run exited {status}: {last}"
            progress(section, self.pipeline_failures[name])
        return common.find_run_dir(work), seconds


# ------------------------------------------------------------------------------- shared parts
def variant_paths(run_dir: Path, names) -> dict[str, Path]:
    return {name: run_dir / "variants" / name / "model.tflite" for name in names}


def accuracy_of(path: Path, dataset) -> float:
    from pipeline.runtime.evaluate import evaluate_tflite
    return evaluate_tflite(str(path), dataset.batches("test"), dataset.class_names).accuracy


def variant_rows(paths: dict[str, Path], dataset, *, rounds: int, runs: int, warmup: int,
                 section: str) -> tuple[list[dict], dict]:
    """One row per variant: accuracy, sizes, latency (1 and 2 threads), peak memory, floors, and
    ratios to float32. Returns (rows, the float32 graph analysis)."""
    from benchmarks.measure import litert_rounds
    from pipeline.runtime.benchmark import gzip_size
    present = {n: p for n, p in paths.items() if p.exists()}
    progress(section, f"accuracy and graph limits of {len(present)} variant(s)")
    graphs = {n: limits.graph_memory(p) for n, p in present.items()}
    accuracies = {n: accuracy_of(p, dataset) for n, p in present.items()}
    timed = litert_rounds(present, threads=(1, 2), rounds=rounds, runs=runs, warmup=warmup,
                          section=section)
    reference = graphs.get("float32")
    rows = []
    for name, path in paths.items():
        if name not in present:
            rows.append({"variant": name, "status": "failed", "error": "the pipeline produced no model"})
            continue
        mode = name.rsplit("-", 1)[-1]
        one, two = timed[(name, 1)], timed[(name, 2)]
        row = {
            "variant": name, "status": "ok" if not (one["error"] or two["error"]) else "failed",
            "error": one["error"] or two["error"],
            "accuracy": accuracies[name],
            "size_bytes": path.stat().st_size, "gzip_size_bytes": gzip_size(path),
            "latency_ms_p50_1t": one["latency_ms_p50"], "latency_ms_p90_1t": one["latency_ms_p90"],
            "latency_ms_p50_2t": two["latency_ms_p50"], "latency_ms_p90_2t": two["latency_ms_p90"],
            "peak_memory_mb_1t": one["peak_memory_mb"], "peak_memory_mb_2t": two["peak_memory_mb"],
            "runtime": one["runtime"],
            "weights_stored_bytes": graphs[name]["weights_stored_bytes"],
            "weights_executed_bytes": graphs[name]["weights_executed_bytes"],
            "activation_live_peak_bytes": graphs[name]["activation_live_peak_bytes"],
            "activation_upper_bound_bytes": graphs[name]["activation_upper_bound_bytes"],
            "rounds_1t": one["rounds"], "rounds_2t": two["rounds"],
        }
        floors = limits.floors(mode, graphs[name])
        row["size_floor_bytes"] = floors["size_floor_bytes"]
        row["memory_floor_mb"] = floors["memory_floor_bytes"] / MIB
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "float32" and r["status"] == "ok"), None)
    if base is None:
        progress(section, "no float32 variant measured: ratios to float32 left out")
    for row in rows:
        if base is None or row["status"] != "ok":
            continue
        row["size_ratio"] = base["size_bytes"] / row["size_bytes"]
        row["gzip_ratio"] = base["size_bytes"] / row["gzip_size_bytes"]
        row["speedup_1t"] = _ratio(base["latency_ms_p50_1t"], row["latency_ms_p50_1t"])
        row["memory_ratio_1t"] = _ratio(base["peak_memory_mb_1t"], row["peak_memory_mb_1t"])
    return rows, reference


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


VARIANT_COLUMNS = [
    ("variant", "variant", "code"), ("accuracy", "accuracy", "pct"),
    ("size_bytes", "size MB", "mb"), ("gzip_size_bytes", "gzip MB", "mb"),
    ("size_ratio", "size ratio", "x"), ("gzip_ratio", "gzip ratio", "x"),
    ("size_floor_bytes", "size floor MB", "mb"),
    ("latency_ms_p50_1t", "p50 ms 1T", "ms"), ("latency_ms_p90_1t", "p90 ms 1T", "ms"),
    ("latency_ms_p50_2t", "p50 ms 2T", "ms"), ("latency_ms_p90_2t", "p90 ms 2T", "ms"),
    ("speedup_1t", "speed-up 1T", "x"),
    ("peak_memory_mb_1t", "peak MiB 1T", "mib"), ("peak_memory_mb_2t", "peak MiB 2T", "mib"),
    ("memory_ratio_1t", "memory ratio 1T", "x"), ("memory_floor_mb", "memory floor MiB", "mib"),
]


def columns(spec) -> list[dict]:
    return [{"key": key, "label": label, "format": fmt} for key, label, fmt in spec]


def goal(name: str, target: str, measured, met: bool | None, note: str = "") -> dict:
    return {"goal": name, "target": target, "measured": measured, "met": met, "note": note}


# --------------------------------------------------------------------------- 1. ResNet50
def section_resnet(bench: Bench) -> dict:
    from benchmarks import inputs, memory
    from pipeline.sources.data import Dataset
    s = bench.settings["resnet"]
    architecture = s["architecture"]
    stand_in = architecture != "resnet50"
    name = "resnet" if not stand_in else "resnet-stand-in"
    progress("resnet", f"building {architecture} (weights=None) as .h5 and a synthetic image folder")
    model_path = inputs.model_file(bench.cache, architecture)
    side = inputs.ARCHITECTURES[architecture][1]
    images = inputs.image_folder(bench.cache, side, s["images_per_class"])
    run_dir, pipeline_seconds = bench.pipeline_run(name, [
        "--model", str(model_path), "--dataset", str(images), "--variants", ",".join(RESNET_VARIANTS),
        "--set", f"latency_runs={s['pipeline_latency_runs']}", "--set", "latency_warmup=2",
        "--set", "calibration_samples=64",
        # Random weights on synthetic images: this section measures size, latency and memory;
        # the pipeline's accuracy floor would (rightly) stop a model at chance.
        "--set", "min_accuracy=0"], "resnet")
    dataset = Dataset.load(run_dir / "dataset.json")
    paths = variant_paths(run_dir, RESNET_VARIANTS)
    rows, reference = variant_rows(paths, dataset, rounds=s["rounds"], runs=s["runs"],
                                   warmup=s["warmup"], section="resnet")
    progress("resnet", "memory: loading, interpreter and delegate options, one process each")
    probes = memory.investigate({n: p for n, p in paths.items() if p.exists()}, runs=s["probe_runs"],
                                on_progress=lambda m: progress("resnet", m))
    by_name = {r["variant"]: r for r in rows}
    goals = _resnet_goals(by_name, stand_in)
    title = ("ResNet50 (keras.applications, weights=None, 224x224, 2 classes)" if not stand_in else
             "Quick-mode STAND-IN for ResNet50: MobileNet alpha=0.25, 64x64, weights=None "
             "(not ResNet50; goals not applicable)")
    notes = [
        f"Model file {model_path.name}: {model_path.stat().st_size / 1e6:.1f} MB (.h5, tf_keras); "
        f"{reference['weight_elements'] if reference else 'n/a'} weights in the float32 .tflite "
        "(batch-norm folded).",
        f"Brought in with `python -m pipeline run --model {model_path.name} --dataset "
        f"{images.name}/ --variants {','.join(RESNET_VARIANTS)}` ({pipeline_seconds / 60:.1f} min: "
        f"load, convert, evaluate, benchmark, select, register); dataset: {s['images_per_class']} "
        f"synthetic PNGs per class, {len(dataset.y_test)} held out for accuracy (untrained "
        "weights: accuracy is chance level and only shows the variants agree).",
        f"Latency and memory: {s['rounds']} round(s) x {s['runs']} runs, batch 1, medians over "
        "rounds; LiteRT CompiledModel, XNNPACK with a warm weight cache (the pipeline's benchmark "
        "stage). Memory: peak resident-set growth of a fresh process (MiB = 2^20 bytes); sizes "
        "in MB = 10^6 bytes.",
        "Size floor: the model's weights x bytes per weight of its mode (4/2/1/1), dense. Memory floor: "
        "weights as executed (float16 is unpacked to float32 on this CPU) + the largest "
        "simultaneously live activation set (estimate; kernel scratch and runtime code excluded).",
    ]
    notes += [f"`{r['variant']}` failed: {r['error']}" for r in rows if r["status"] != "ok"]
    if name in bench.pipeline_failures:
        notes.append(f"The pipeline run did not end cleanly ({bench.pipeline_failures[name]}); "
                     "the variants it produced are measured.")
    return {
        "title": title, "stand_in": stand_in, "model_file_bytes": model_path.stat().st_size,
        "pipeline_seconds": pipeline_seconds, "notes": notes, "goals": goals,
        "tables": [
            {"id": "resnet-variants", "title": "Variants", "columns": columns(VARIANT_COLUMNS),
             "rows": rows},
            {"id": "resnet-memory-options", "title": "Memory by loading, interpreter and delegate option",
             "columns": columns([
                 ("variant", "variant", "code"), ("config", "configuration", "code"),
                 ("threads", "threads", "int"), ("peak_memory_mb", "peak MiB", "mib"),
                 ("model_file_mb", "model file MiB", "mib"), ("cache_file_mb", "weight cache MiB", "mib"),
                 ("anonymous_mb", "anonymous MiB", "mib"), ("libraries_mb", "libraries MiB", "mib"),
                 ("latency_ms_p50", f"p50 ms ({s['probe_runs']} runs)", "ms"),
                 ("first_invoke_s", "load + 1st run s", "s"), ("error", "error", "text")]),
             "rows": probes},
        ],
        "configurations": memory.CONFIGS,
        "conclusion": _memory_conclusion(probes, by_name),
    }


def _resnet_goals(rows: dict[str, dict], stand_in: bool) -> list[dict]:
    applies = None if stand_in else True
    goals = []
    for name in ("dynamic", "int8"):
        ratio = rows.get(name, {}).get("size_ratio")
        goals.append(goal(f"size ratio float32/{name}", ">= 3.9", ratio,
                          (ratio is not None and ratio >= 3.9) if applies else None))
    for name, limit in (("dynamic", 30), ("float32", 110)):
        for threads in (1, 2):
            value = rows.get(name, {}).get(f"peak_memory_mb_{threads}t")
            floor = rows.get(name, {}).get("memory_floor_mb")
            goals.append(goal(f"peak memory {name}, {threads} thread(s)", f"<= {limit} MiB", value,
                              (value is not None and value <= limit) if applies else None,
                              f"floor {floor:.1f} MiB" if floor is not None else ""))
    return goals


def _memory_conclusion(probes: list[dict], rows: dict[str, dict]) -> list[str]:
    """What the probes show, in sentences computed from them."""
    get = {(p["variant"], p["config"], p["threads"]): p for p in probes if "error" not in p}
    lines = []
    for name in RESNET_VARIANTS:
        before = get.get((name, "interpreter", 2))
        after = get.get((name, "compiled-cache-warm", 2))
        builtin = get.get((name, "interpreter-no-delegate", 1))
        if before and after:
            lines.append(
                f"{name}: {before['peak_memory_mb']:.0f} MiB with the interpreter's default XNNPACK "
                f"delegate (anonymous {before['anonymous_mb']:.0f} MiB beside the mapped model "
                f"{before['model_file_mb']:.0f} MiB) -> {after['peak_memory_mb']:.0f} MiB with the "
                f"XNNPACK weight cache (model file {after['model_file_mb']:.1f} MiB resident, cache "
                f"{after['cache_file_mb']:.0f} MiB, anonymous {after['anonymous_mb']:.0f} MiB); p50 "
                f"{before['latency_ms_p50']:.1f} -> {after['latency_ms_p50']:.1f} ms (2 threads, "
                "indicative)" + (f"; TFLite's own kernels, 1 thread: {builtin['peak_memory_mb']:.0f} "
                                 f"MiB at {builtin['latency_ms_p50']:.0f} ms" if builtin else "") + ".")
    content = get.get(("float32", "interpreter-model-content", 2))
    if content and get.get(("float32", "interpreter", 2)):
        lines.append(
            f"model_content instead of model_path: float32 {content['peak_memory_mb']:.0f} MiB, the "
            "same total (the bytes move from the mapped file to the heap): loading is not the "
            "duplicate.")
    one, two = get.get(("float32", "interpreter-no-delegate", 1)), get.get(("float32", "interpreter-no-delegate", 2))
    if one and two:
        lines.append(
            f"Without any delegate, float32 takes {one['peak_memory_mb']:.0f} MiB on 1 thread but "
            f"{two['peak_memory_mb']:.0f} MiB on 2: TFLite's multithreaded float conv kernel keeps a "
            "transposed copy of the filters, so 'no delegate' only helps single-threaded, at "
            f"{one['latency_ms_p50']:.0f} ms a run.")
    cold, warm = get.get(("float16", "compiled-cache-cold", 2)), get.get(("float16", "compiled-cache-warm", 2))
    if cold and warm:
        lines.append(
            f"float16 cannot gain memory on this CPU: XNNPACK runs it in float32, so its cache holds "
            f"{warm['cache_file_mb']:.0f} MiB of float32 weights, and a warm load still maps the "
            f"{warm['model_file_mb']:.0f} MiB float16 file ({warm['peak_memory_mb']:.0f} MiB; first "
            f"load {cold['peak_memory_mb']:.0f} MiB).")
    floor = rows.get("dynamic", {}).get("memory_floor_mb")
    live = rows.get("dynamic", {}).get("activation_live_peak_bytes")
    weights = rows.get("dynamic", {}).get("weights_executed_bytes")
    if floor is not None:
        lines.append(
            f"dynamic floor: weights {weights / MIB:.1f} MiB (int8) + largest live float32 activation "
            f"set {live / MIB:.1f} MiB = {floor:.1f} MiB before any runtime, kernel scratch or code: "
            "dynamic-range quantization keeps activations in float32, so <= 30 MiB cannot be met "
            "by this model at 224x224; full int8 (int8 activations) can approach it.")
    return lines


# ------------------------------------------------------------------------- 2. default CNN
def section_cnn(bench: Bench) -> dict:
    from pipeline.store import artifacts
    from pipeline import stages
    from pipeline.sources.data import Dataset
    s = bench.settings["cnn"]
    if bench.reuse_run is not None:
        run_dir, pipeline_seconds = bench.reuse_run, None
        progress("cnn", f"reusing the pipeline run in {run_dir}")
    else:
        args = ["--dataset", "fashion-mnist", *s["args"]]
        if s["variants"]:
            args += ["--variants", ",".join(s["variants"])]
        run_dir, pipeline_seconds = bench.pipeline_run("cnn", args, "cnn")
    context = json.loads((run_dir / "context.json").read_text())
    variants = context["config"]["variants"]
    selected = common.read_json(run_dir / "select.json") or {}
    bench.cnn_champion = (selected.get("selection") or {}).get("champion")
    bench.cnn_run = run_dir
    bench.cnn_pipeline_seconds = pipeline_seconds
    dataset = Dataset.load(run_dir / "dataset.json")
    rows, _ = variant_rows(variant_paths(run_dir, variants), dataset, rounds=s["rounds"],
                           runs=s["runs"], warmup=s["warmup"], section="cnn")
    for row in rows:  # why the pipeline produced no model, when its optimization says
        if row["status"] != "ok" and "-" in row["variant"]:
            record = artifacts.load_json(context["parent_run_id"], stages._recipe_record(
                row["variant"].rsplit("-", 1)[0])) or {}
            row["error"] = record.get("error", row["error"])
    bench.cnn_rows = {r["variant"]: r for r in rows}
    config = context["config"]
    budget = (f"epochs {config['epochs']}, fine-tuning {config['finetune_epochs']}, distillation "
              f"{config['distill_epochs']}, train limit {config['train_limit'] or 'none'}, "
              f"{len(dataset.y_train)} training and {len(dataset.y_test)} test images")
    notes = [
        ("Reused pipeline run " + Path(run_dir).name if pipeline_seconds is None else
         f"`python -m pipeline run --dataset fashion-mnist {' '.join(s['args'])}` "
         f"({pipeline_seconds / 60:.1f} min)") + f"; training budget: {budget}.",
        f"Variants: {_variants_words(variants)}; "
        f"champion chosen by the pipeline: {bench.cnn_champion or 'none'}.",
        f"Latency and memory: {s['rounds']} round(s) x {s['runs']} runs, batch 1, medians; ratios "
        "are float32 / variant (size ratio uses the float32 .tflite bytes, as the pipeline's "
        "compression_ratio; speed-up and memory ratio at 1 thread).",
    ]
    notes += [f"`{r['variant']}` failed: {r['error']}" for r in rows if r["status"] != "ok"]
    if "cnn" in bench.pipeline_failures:
        notes.append(f"The pipeline run did not end cleanly ({bench.pipeline_failures['cnn']}); "
                     "the variants it produced are measured.")
    return {"title": "Default CNN on Fashion-MNIST: every variant", "notes": notes,
            "pipeline_seconds": pipeline_seconds, "champion": bench.cnn_champion, "goals": [],
            "tables": [{"id": "cnn-variants", "title": "Variants", "columns": columns(VARIANT_COLUMNS),
                        "rows": rows}]}


# ---------------------------------------------------------------------- 3. throughput
def section_throughput(bench: Bench) -> dict:
    from ai_edge_litert.interpreter import Interpreter
    from pipeline.sources.data import Dataset
    from pipeline.runtime.litert import TFLiteRunner
    run_dir = _cnn_run(bench)
    dataset = Dataset.load(run_dir / "dataset.json")
    x = dataset.arrays("test")[0]
    names = [n for n in ("float32", "int8") if (run_dir / "variants" / n / "model.tflite").exists()]
    timings: dict[tuple[str, str], list[float]] = {}
    predictions: dict[tuple[str, str], np.ndarray] = {}

    def batched(path):
        return TFLiteRunner(path, num_threads=1).predict_classes(x)

    def one_by_one(path):
        """The common loop: one image per set_tensor/invoke/get_tensor, quantizing each input."""
        interpreter = Interpreter(model_path=str(path), num_threads=1)
        interpreter.allocate_tensors()
        detail, output = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        scale, zero_point = detail["quantization"]
        predicted = np.empty(len(x), dtype=np.int64)
        for i, image in enumerate(x):
            sample = image[None]
            if np.issubdtype(detail["dtype"], np.integer):
                info = np.iinfo(detail["dtype"])
                sample = np.clip(np.round(sample / scale + zero_point), info.min, info.max).astype(detail["dtype"])
            interpreter.set_tensor(detail["index"], sample)
            interpreter.invoke()
            predicted[i] = interpreter.get_tensor(output["index"])[0].argmax()
        return predicted

    def invoke_only(path):
        """Batch-1 invokes alone, one per image, input set once: what any one-image loop costs at
        least (the runtime's compute and per-invoke overhead, no Python work per image)."""
        interpreter = Interpreter(model_path=str(path), num_threads=1)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        for _ in range(len(x)):
            interpreter.invoke()
        return None

    methods = {"batched (TFLiteRunner, 256 per invoke)": batched, "one image per invoke": one_by_one,
               "batch-1 invoke alone (bound of any one-image loop)": invoke_only}
    batched_label, loop_label, bound_label = methods
    rounds = bench.settings["throughput"]["rounds"]
    for round_index in range(rounds):
        for name in names:
            path = run_dir / "variants" / name / "model.tflite"
            for method, function in (list(methods.items())[::-1] if round_index % 2 else methods.items()):
                progress("throughput", f"round {round_index + 1}/{rounds}: {name}, {method}, {len(x)} images")
                started = time.perf_counter()
                predictions[(name, method)] = function(path)
                timings.setdefault((name, method), []).append(time.perf_counter() - started)
    rows, goals, notes = [], [], []
    for name in names:
        loop_seconds = median(timings[(name, loop_label)])
        for method in methods:
            seconds = median(timings[(name, method)])
            predicted = predictions[(name, method)]
            rows.append({"variant": name, "method": method, "images": int(len(x)), "threads": 1,
                         "seconds": seconds, "images_per_second": len(x) / seconds,
                         "ms_per_image": seconds * 1e3 / len(x), "speedup": loop_seconds / seconds,
                         "agreement": None if predicted is None else
                         float((predicted == predictions[(name, batched_label)]).mean()),
                         "rounds_seconds": timings[(name, method)]})
        speedup = loop_seconds / median(timings[(name, batched_label)])
        bound = loop_seconds / median(timings[(name, bound_label)])
        notes.append(f"{name}: batched evaluation is {speedup:.1f}x the one-image loop; invoke alone "
                     f"is {bound:.1f}x faster than the loop (no goal: on a model this small the "
                     "gain is bounded by the invoke time, not by the runner).")
        notes.append(f"{name}: the one-image loop spends {loop_seconds * 1e3 / len(x):.3f} ms per image, "
                     f"{median(timings[(name, bound_label)]) * 1e3 / len(x):.3f} ms of it in the batch-1 invoke "
                     f"itself; batching removes the rest and amortizes per-invoke overhead, so its gain "
                     f"is bounded by how small the model's compute per image is against that overhead.")
    return {
        "title": f"Evaluation throughput over the {len(x)} test images",
        "notes": [f"All methods on one thread, {rounds} round(s), order flipped each round; medians. "
                  "Speed-up: the one-image loop's time / the method's time. Agreement: share of "
                  "predictions identical to the batched runner's.", *notes],
        "goals": goals,
        "tables": [{"id": "throughput", "title": "Batched interpreter against one image per invoke",
                    "columns": columns([("variant", "variant", "code"), ("method", "method", "text"),
                                        ("images", "images", "int"), ("seconds", "seconds", "s"),
                                        ("ms_per_image", "ms/image", "ms"),
                                        ("images_per_second", "images/s", "int"),
                                        ("speedup", "speed-up", "x"), ("agreement", "agreement", "pct")]),
                    "rows": rows}],
    }


def _variants_words(variants: list[str]) -> str:
    from pipeline.variants import DEFAULT_VARIANTS
    if list(variants) == list(DEFAULT_VARIANTS):
        return f"all {len(variants)} of the suite's defaults (pipeline.variants.DEFAULT_VARIANTS)"
    return f"a subset of {len(variants)} ({', '.join(variants)})"


def _cnn_run(bench: Bench) -> Path:
    if bench.cnn_run is None:
        raise RuntimeError("needs the default CNN's run (section cnn) first")
    return bench.cnn_run


# ------------------------------------------------------------------------ stage times
# The default run's per-stage wall times before this work, as measured for issue #14 on a quiet
# 2-core machine (fresh clone, 16 default variants, full Fashion-MNIST): the reference row.
STAGES_BEFORE = {"train": 248.0, "optimize": 528.0, "per-variant": 182.0, "pipeline": 972.0}
STAGES_GOAL_SECONDS = 600.0  # the default pipeline in at most 10 minutes


def _run_seconds(parent_run_id: str) -> float | None:
    """A finished pipeline run's wall time: its MLflow parent run, from start to end."""
    from pipeline.store import tracking
    info = tracking.client().get_run(parent_run_id).info
    return (info.end_time - info.start_time) / 1000.0 if info.end_time else None


def section_stages(bench: Bench) -> dict:
    """Where the default run's time goes, stage by stage, read from the wall times every stage
    records in MLflow (`stage_seconds_*` on the parent run and on each variant's child run)."""
    from pipeline.store import tracking
    run_dir = _cnn_run(bench)
    context = json.loads((run_dir / "context.json").read_text())
    parent = tracking.client().get_run(context["parent_run_id"]).data.metrics
    children = [run.data.metrics for run in tracking.child_runs(context["parent_run_id"])]
    optimize = {k.removeprefix("stage_seconds_optimize_"): v for k, v in parent.items()
                if k.startswith("stage_seconds_optimize_")}
    per_stage = {stage: sum(c.get(f"stage_seconds_{stage}", 0.0) for c in children)
                 for stage in ("quantize", "evaluate", "benchmark")}
    measured = {"train": parent.get("stage_seconds_train"), "optimize": sum(optimize.values()),
                "per-variant": sum(per_stage.values())}
    pipeline_seconds = bench.cnn_pipeline_seconds or _run_seconds(context["parent_run_id"])
    measured["pipeline"] = pipeline_seconds
    rows = []
    for stage, what in (("train", "train: data, the baseline CNN, the float32 reference"),
                        ("optimize", f"optimize: {len(optimize)} recipes"),
                        ("per-variant", f"quantize + evaluate + benchmark of {len(children)} variants"),
                        ("pipeline", "the whole pipeline")):
        now = measured.get(stage)
        rows.append({"stage": what, "before_s": STAGES_BEFORE[stage], "now_s": now,
                     "ratio": STAGES_BEFORE[stage] / now if now else None})
    for stage, seconds in per_stage.items():
        rows.append({"stage": f"of which {stage}", "before_s": None, "now_s": seconds,
                     "ratio": None})
    for recipe, seconds in sorted(optimize.items(), key=lambda item: -item[1]):
        rows.append({"stage": f"optimize {recipe}", "before_s": None, "now_s": seconds,
                     "ratio": None})
    full_default = not bench.quick and bench.settings["cnn"]["variants"] is None
    notes = [
        "Now: this bench's default CNN run (section 2), each stage's wall time as it recorded "
        "it in MLflow (`stage_seconds_*` metrics), the stages one after another as `make run` "
        "and `python -m pipeline run` run them. Before: the same measurement for issue #14 "
        "(16 default variants then, " f"{len(children)} now), so the per-variant row is not like "
        "for like. The whole pipeline: the pipeline command's wall time, or for a reused run its "
        "MLflow parent run from start to end (training onwards: without the interpreter start).",
    ]
    if not full_default:
        notes.append("Quick mode: a reduced budget, so the goal is not judged.")
    return {
        "title": "Time per stage of the default run, before and after",
        "notes": notes,
        "goals": [goal("default pipeline wall time", f"<= {STAGES_GOAL_SECONDS / 60:.0f} min",
                       f"{pipeline_seconds / 60:.1f} min" if pipeline_seconds else None,
                       (pipeline_seconds <= STAGES_GOAL_SECONDS) if full_default and pipeline_seconds
                       else None)],
        "tables": [{"id": "stages", "title": "Seconds per stage",
                    "columns": columns([("stage", "stage", "text"), ("before_s", "before (s)", "s"),
                                        ("now_s", "now (s)", "s"), ("ratio", "before / now", "x")]),
                    "rows": rows}],
    }


# -------------------------------------------------------------------- sparse storage
SPARSE_RECIPES = ("prune", "prune+cluster")


def section_sparse(bench: Bench) -> dict:
    """Pruned models stored dense and with LiteRT's sparsity encoding, side by side: raw and gzip
    size, accuracy, latency and peak memory, and which runtime could run each."""
    from benchmarks.measure import litert_rounds
    from pipeline import import_tensorflow_quietly
    from pipeline.config import PipelineConfig
    from pipeline.runtime.evaluate import evaluate_tflite
    from pipeline.runtime.quantize import convert
    from pipeline.sources.data import Dataset
    from pipeline.stages import _recipe_record
    from pipeline.store import artifacts
    from pipeline.techniques.persistence import load_optimized
    s = bench.settings["sparse"]
    run_dir = _cnn_run(bench)
    context = json.loads((run_dir / "context.json").read_text())
    config = PipelineConfig.from_mapping(context["config"], use_env=False)
    dataset = Dataset.load(run_dir / "dataset.json")
    reference_bytes = context["reference"]["size_bytes"]
    import_tensorflow_quietly()
    out = bench.runs_dir / "sparse"
    paths, accuracy = {}, {}
    for recipe in SPARSE_RECIPES:
        record = artifacts.load_json(context["parent_run_id"], _recipe_record(recipe)) or {}
        if "model_uri" not in record:
            continue
        model = load_optimized(artifacts.fetch(record["model_uri"]))
        for mode in ("dynamic", "int8"):
            calibration = dataset.calibration_batches(config.calibration_samples, config.seed) \
                if mode == "int8" else None
            for storage in ("dense", "sparse"):
                name = f"{recipe}-{mode} {storage}"
                progress("sparse", f"converting {name}")
                paths[name] = convert(mode, out / f"{recipe}-{mode}-{storage}.tflite", model=model,
                                      representative_data=calibration, sparse=storage == "sparse")
                accuracy[name] = evaluate_tflite(str(paths[name]), dataset.batches("test"),
                                                 dataset.class_names).accuracy
    if not paths:
        raise RuntimeError("the CNN run has no prune or prune+cluster model (add prune-int8 to "
                           "its variants)")
    measured = litert_rounds(paths, threads=(1,), rounds=s["rounds"], runs=s["runs"],
                             warmup=s["warmup"], section="sparse")
    from pipeline.runtime.benchmark import gzip_size
    rows = []
    for name, path in paths.items():
        figures = measured[(name, 1)]
        rows.append({"variant": name, "size_bytes": path.stat().st_size,
                     "gzip_size_bytes": gzip_size(path),
                     "size_ratio": reference_bytes / path.stat().st_size,
                     "accuracy": accuracy[name], "latency_ms_p50": figures["latency_ms_p50"],
                     "peak_memory_mb": figures["peak_memory_mb"],
                     "runtime": figures["runtime"] or figures["error"]})
    by_name = {r["variant"]: r for r in rows}
    sparse_rows = [r for r in rows if r["variant"].endswith("sparse")]
    best = max(sparse_rows, key=lambda r: r["size_ratio"])
    dense = by_name[best["variant"].replace("sparse", "dense")]
    notes = [f"The float32 .tflite of the same run: {reference_bytes:,} bytes. Latency: batch 1, "
             f"one thread, {s['rounds']} round(s) x {s['runs']} runs, medians; runtime: the one "
             "that ran it (the CompiledModel with XNNPACK, or the interpreter's built-in kernels "
             "when XNNPACK refuses the sparse tensors)."]
    for row in sparse_rows:
        twin = by_name[row["variant"].replace("sparse", "dense")]
        notes.append(f"{row['variant']}: {twin['size_bytes'] / row['size_bytes']:.1f}x smaller raw, "
                     f"{row['gzip_size_bytes'] / twin['gzip_size_bytes']:.2f}x the gzip size, "
                     f"{row['latency_ms_p50'] / twin['latency_ms_p50']:.1f}x the latency "
                     f"({row['runtime']} against {twin['runtime']}).")
    return {
        "title": "Sparse storage of pruned models (LiteRT EXPERIMENTAL_SPARSITY) against dense",
        "notes": notes,
        "goals": [goal("pruned variant raw size ratio (float32 / variant), sparse storage",
                       ">= 8x", best["size_ratio"], best["size_ratio"] >= 8,
                       f"{best['variant']}; its latency is "
                       f"{best['latency_ms_p50'] / dense['latency_ms_p50']:.1f}x the dense one's")],
        "tables": [{"id": "sparse", "title": "Dense against sparse storage",
                    "columns": columns([("variant", "variant", "code"),
                                        ("size_bytes", "size (MB)", "mb"),
                                        ("gzip_size_bytes", "gzip size (MB)", "mb"),
                                        ("size_ratio", "raw ratio", "x"),
                                        ("accuracy", "accuracy", "pct"),
                                        ("latency_ms_p50", "p50 ms", "ms"),
                                        ("peak_memory_mb", "peak MiB", "mib"),
                                        ("runtime", "runtime", "text")]),
                    "rows": rows}],
    }


# ------------------------------------------------------------------ int4 where it pays
def section_int4(bench: Bench) -> dict:
    from benchmarks import int4
    return int4.section(bench)


# -------------------------------------------------------------------------- 4. peer runtime
def section_peer(bench: Bench) -> dict:
    from benchmarks import peer
    from benchmarks.measure import litert_rounds
    from pipeline.store import artifacts
    from pipeline import import_tensorflow_quietly
    from pipeline.config import PipelineConfig
    from pipeline.sources.data import Dataset
    from pipeline.sources.models import load_model
    s = bench.settings["peer"]
    run_dir = _cnn_run(bench)
    context = json.loads((run_dir / "context.json").read_text())
    config = PipelineConfig.from_mapping(context["config"], use_env=False)
    dataset = Dataset.load(run_dir / "dataset.json")
    onnx_dir = bench.runs_dir / "onnx"
    shutil.rmtree(onnx_dir, ignore_errors=True)
    onnx_dir.mkdir(parents=True)
    progress("peer", "exporting the Keras baseline to ONNX with tf2onnx, quantizing with ONNX Runtime")
    import_tensorflow_quietly()
    baseline = artifacts.fetch(context["base_model_uri"])
    float_path = peer.export(load_model(baseline), onnx_dir / "float32.onnx")
    generator = dataset.calibration_batches(config.calibration_samples, config.seed)
    calibration = np.concatenate([batch[0] for batch in generator()])
    onnx_paths = peer.quantize_variants(float_path, calibration, onnx_dir)
    ours = [n for n in dict.fromkeys(["float32", "int8", bench.cnn_champion]) if n and
            (run_dir / "variants" / n / "model.tflite").exists()]
    litert_paths = {n: run_dir / "variants" / n / "model.tflite" for n in ours}
    samples: dict[str, list[dict]] = {n: [] for n in onnx_paths}
    litert = litert_rounds(litert_paths, threads=(1,), rounds=s["rounds"], runs=s["runs"],
                           warmup=s["warmup"], section="peer")
    for round_index in range(s["rounds"]):
        for name, path in (list(onnx_paths.items())[::-1] if round_index % 2 else onnx_paths.items()):
            progress("peer", f"round {round_index + 1}/{s['rounds']}: ONNX Runtime {name}")
            samples[name].append(peer.measure(path, runs=s["runs"], warmup=s["warmup"]))
    rows = []
    for name in ours:
        row = bench.cnn_rows.get(name, {})
        figures = litert[(name, 1)]
        rows.append({"runtime": "LiteRT", "variant": name + (" (champion)" if name == bench.cnn_champion else ""),
                     "accuracy": row.get("accuracy") if row else accuracy_of(litert_paths[name], dataset),
                     "size_bytes": litert_paths[name].stat().st_size,
                     "latency_ms_p50": figures["latency_ms_p50"], "latency_ms_p90": figures["latency_ms_p90"],
                     "peak_memory_mb": figures["peak_memory_mb"]})
    for name, path in onnx_paths.items():
        progress("peer", f"accuracy of ONNX Runtime {name} on {len(dataset.y_test)} images")
        rows.append({"runtime": "ONNX Runtime", "variant": name,
                     "accuracy": peer.accuracy(path, *dataset.arrays("test")),
                     "size_bytes": path.stat().st_size,
                     "latency_ms_p50": median(f["latency_ms_p50"] for f in samples[name]),
                     "latency_ms_p90": median(f["latency_ms_p90"] for f in samples[name]),
                     "peak_memory_mb": median(f["peak_memory_mb"] for f in samples[name])})
    goals, notes = _peer_goal(rows, config.max_accuracy_drop_pts, bench.cnn_champion)
    notes = [f"Same Keras baseline ({baseline.name}) for both; ONNX opset "
             f"{peer.OPSET}; static int8 calibrated on the pipeline's own {len(calibration)} calibration "
             f"images; accuracy on the same {len(dataset.y_test)} test images as section 2.",
             f"Latency: batch 1, one thread (LiteRT num_threads=1; ONNX Runtime intra_op_num_threads=1, "
             f"sequential), fresh process each, {s['rounds']} round(s) x {s['runs']} runs, medians.",
             *notes]
    return {"title": "Peer runtime: ONNX Runtime on the same model", "notes": notes, "goals": goals,
            "tables": [{"id": "peer", "title": "LiteRT variants beside ONNX Runtime",
                        "columns": columns([("runtime", "runtime", "text"), ("variant", "variant", "code"),
                                            ("accuracy", "accuracy", "pct"), ("size_bytes", "size MB", "mb"),
                                            ("latency_ms_p50", "p50 ms", "ms"), ("latency_ms_p90", "p90 ms", "ms"),
                                            ("peak_memory_mb", "peak MiB", "mib")]),
                        "rows": rows}]}


def _peer_goal(rows: list[dict], budget_pts: float, champion: str | None) -> tuple[list[dict], list[str]]:
    """ONNX Runtime's best: its fastest mode within the pipeline's accuracy budget of its own
    float32. Met when the champion is at least as fast at equal or better accuracy."""
    ort = [r for r in rows if r["runtime"] == "ONNX Runtime" and r["latency_ms_p50"] is not None]
    ort_float = next((r for r in ort if r["variant"] == "float32"), None)
    mine = next((r for r in rows if r["runtime"] == "LiteRT" and r["variant"].endswith("(champion)")), None)
    if not ort or ort_float is None or mine is None or mine["latency_ms_p50"] is None:
        return [goal("champion vs ONNX Runtime's best", "faster or equal, accuracy >=", None, None,
                     f"not measured (champion: {champion or 'none'})")], []
    eligible = [r for r in ort if (ort_float["accuracy"] - r["accuracy"]) * 100 <= budget_pts + 1e-9]
    best = min(eligible, key=lambda r: r["latency_ms_p50"])
    faster = mine["latency_ms_p50"] <= best["latency_ms_p50"]
    accurate = mine["accuracy"] >= best["accuracy"]
    measured = (f"{mine['latency_ms_p50']:.3f} ms vs {best['latency_ms_p50']:.3f} ms; accuracy "
                f"{mine['accuracy'] * 100:.2f} % vs {best['accuracy'] * 100:.2f} %")
    note = f"ONNX Runtime's best within {budget_pts:g} pt of its float32: {best['variant']}"
    return ([goal(f"champion ({champion}) vs ONNX Runtime's best", "p50 <= and accuracy >=", measured,
                  faster and accurate, note)], [note + "."])


# -------------------------------------------------------------------- 5. orchestration
def section_orchestration(bench: Bench) -> dict:
    s = bench.settings["orchestration"]
    home = Path(tempfile.mkdtemp(prefix="bench-airflow-"))
    try:
        airflow_env = {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                       "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
                       "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        progress("orchestration", f"airflow db migrate (temporary AIRFLOW_HOME {home})")
        status, migrate_seconds = common.run_logged(
            [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
            env=bench.env(**airflow_env), log_path=bench.runs_dir / "airflow-migrate.log",
            section="orchestration", show=())
        if status != 0:
            raise RuntimeError("airflow db migrate failed: "
                               + common.last_lines(bench.runs_dir / "airflow-migrate.log", 3))
        launchers = {"command line (python -m pipeline run)": [sys.executable, "-m", "pipeline", "run"],
                     "Airflow DAG (python -m pipeline.airflow_adapter.launch, dag.test)": [sys.executable, "-m", "pipeline.airflow_adapter.launch"]}
        seconds: dict[str, list[float]] = {name: [] for name in launchers}
        for round_index in range(s["rounds"]):
            for label, command in (list(launchers.items())[::-1] if round_index % 2 else launchers.items()):
                key = "dag" if "launch" in command[-1] else "cli"
                work = bench.runs_dir / f"orchestration-{key}-{round_index}"
                shutil.rmtree(work, ignore_errors=True)
                progress("orchestration", f"round {round_index + 1}/{s['rounds']}: {label}")
                log = bench.runs_dir / f"orchestration-{key}-{round_index}.log"
                status, wall = common.run_logged(
                    [*command, *s["args"], "--experiment", f"bench-orchestration-{key}",
                     "--registered-model-name", f"bench-orchestration-{key}"],
                    env=bench.env(PIPELINE_WORK_DIR=str(work), **airflow_env), log_path=log,
                    section="orchestration", show=("DAG run", "Pipeline time", "error:"))
                if status != 0:
                    raise RuntimeError(f"{label} exited {status}: {common.last_lines(log, 3)}")
                seconds[label].append(wall)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    cli, dag = (median(v) for v in seconds.values())
    ratio, extra = dag / cli, dag - cli
    variants = s["args"][s["args"].index("--variants") + 1].split(",")
    # plan, recipes, train, select, register, one optimize per recipe, three tasks per variant
    tasks = 5 + len({v.rpartition("-")[0] for v in variants} - {""}) + 3 * len(variants)
    per_task = extra / tasks
    rows = [{"launcher": label, "runs": len(values), "median_seconds": median(values),
             "rounds_seconds": values, "ratio_to_cli": median(values) / cli}
            for label, values in seconds.items()]
    return {
        "title": "Orchestration overhead: the same small pipeline through Airflow and the command line",
        "notes": [f"Pipeline: `{' '.join(s['args'])}`; {s['rounds']} round(s), order flipped each "
                  "round; wall time of the whole command (interpreter start, imports, every stage); "
                  f"one-off `airflow db migrate` of the temporary home: {migrate_seconds:.1f} s "
                  "(not counted).",
                  f"Airflow adds {extra:.0f} s to this run (importing Airflow, parsing the DAG folder, "
                  "dag.test's bookkeeping per task); a fixed cost, so the ratio falls as the pipeline "
                  f"grows: for a {cli:.0f} s pipeline it is {ratio:.2f}, for a 20-minute one it would be "
                  f"about {(1200 + extra) / 1200:.2f}."],
        # A fixed cost per run and per task, whatever the pipeline does (a ratio to a short
        # pipeline's wall time would measure the pipeline's length, not Airflow).
        "goals": [goal("Airflow overhead per task instance (dag.test)", "<= 3 s", per_task,
                       per_task <= 3.0, f"{extra:.1f} s per run over {tasks} task instances")],
        "tables": [{"id": "orchestration", "title": "Wall time",
                    "columns": columns([("launcher", "launcher", "text"), ("runs", "runs", "int"),
                                        ("median_seconds", "median s", "s"),
                                        ("ratio_to_cli", "ratio to command line", "x")]),
                    "rows": rows}],
        "migrate_seconds": migrate_seconds, "dag_extra_seconds": extra,
        "dag_extra_seconds_per_task": per_task, "task_instances": tasks,
    }


# ------------------------------------------------------------------------------ scaling
def section_scaling(bench: Bench) -> dict:
    from benchmarks import scaling
    return scaling.section(bench.cache / "scaling", bench.runs_dir, bench.env, bench.quick,
                           progress)


# ------------------------------------------------------------------------------- search
def section_search(bench: Bench) -> dict:
    from benchmarks import search
    return search.section(bench.cache / "scaling", bench.runs_dir, bench.env, bench.quick,
                          progress, only=bench.search_models)


# ----------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and fast: checks the tables, not the timings")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"), help="folder for results.md and results.json")
    parser.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / ".cache"),
                        help="generated inputs and this run's pipeline runs (git-ignored)")
    parser.add_argument("--reuse-run", help="a finished `python -m pipeline run` folder (with "
                        "context.json) to measure in section 2 instead of training the CNN again")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list of sections to run (default: all: {','.join(SECTIONS)})")
    parser.add_argument("--search-models", default="",
                        help="comma list of the models section `search` runs on, among cnn, "
                        "keras3, mobilenet (default: all three; --quick: cnn, mobilenet)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    from benchmarks.search import MODELS as SEARCH_MODELS
    odd = [m for m in filter(None, args.search_models.split(",")) if m not in SEARCH_MODELS]
    if odd:
        print(f"error: unknown --search-models {', '.join(odd)}; known: "
              f"{', '.join(SEARCH_MODELS)}", file=sys.stderr)
        return 2
    if args.reuse_run and not (Path(args.reuse_run) / "context.json").exists():
        print(f"error: --reuse-run {args.reuse_run} holds no context.json (a pipeline run folder "
              "under .work/)", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    bench = Bench(args)
    shutil.rmtree(bench.runs_dir, ignore_errors=True)
    bench.runs_dir.mkdir(parents=True)
    started = time.perf_counter()
    results = {
        "schema": 1, "mode": "quick" if args.quick else "full",
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": common.machine(), "load_average_start": common.load_average(),
        "settings": bench.settings, "sections": {},
    }
    progress("bench", f"{results['mode']} mode on {results['machine']['cpu_model']}, "
                      f"{results['machine']['cores']} cores, load {results['load_average_start']}")
    functions = {"resnet": section_resnet, "cnn": section_cnn, "stages": section_stages,
                 "sparse": section_sparse, "int4": section_int4,
                 "throughput": section_throughput,
                 "peer": section_peer, "orchestration": section_orchestration,
                 "scaling": section_scaling, "search": section_search}
    for name in SECTIONS:
        if name not in wanted:
            continue
        section_started = time.perf_counter()
        load = common.load_average()
        try:
            result = functions[name](bench)
        except Exception as error:  # one failed section must not lose the others' figures
            progress(name, f"FAILED: {type(error).__name__}: {error}")
            result = {"title": name, "error": f"{type(error).__name__}: {str(error)[:1000]}",
                      "goals": [], "tables": [], "notes": []}
        result["seconds"] = time.perf_counter() - section_started
        result["load_average_before"] = load
        results["sections"][name] = result
        progress(name, f"done in {result['seconds'] / 60:.1f} min")
    results["load_average_end"] = common.load_average()
    results["wall_seconds"] = time.perf_counter() - started
    from benchmarks.render import markdown
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    (out / "results.md").write_text(markdown(json.loads((out / "results.json").read_text())))
    progress("bench", f"wrote {out / 'results.md'} and results.json in {results['wall_seconds'] / 60:.1f} min")
    failed = [n for n, s in results["sections"].items() if s.get("error")]
    return 1 if failed else 0


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
