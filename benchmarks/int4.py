"""Bench section `int4`: where int4 weights pay, on the default CNN and on a MobileNet-class model
side by side (issue 23).

Both models are built here with untrained weights (sizes and speed do not depend on training;
accuracy is the pipeline's business): the default CNN (`pipeline.sources.models.build_cnn`,
28x28x1, 10 classes) and Keras 3's `keras.applications.MobileNetV2(alpha=0.35,
input_shape=(96, 96, 3), weights=None, classes=5)`, converted to float32 .tflite. Each is
quantized with the pipeline's own functions: static int8, the int4 mode's fixed placement (int4
fully-connected, int8 everything else), and `litert_quantizer.int4_placement` as the pipeline runs
it when the latency gate is on (per op kind int4, else int8, else int8 weight-only, else float16,
timed against float32's p50 x `max_latency_ratio` + slack), for the int4 mode and for the mixed mode's candidates (CONV_2D
int4 too). Latency and memory: `benchmarks.measure.litert_rounds`, medians over interleaved
rounds; the XNNPACK partitions column counts the delegate's nodes (1 = the whole graph on XNNPACK).

MobileNetV2 is built in a child process (`python -m benchmarks.int4 --mobilenet OUT`) without
TF_USE_LEGACY_KERAS, which this process sets for TF-MOT.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, progress

MOBILENET = {"alpha": 0.35, "input_shape": (96, 96, 3), "classes": 5}
CALIBRATION_IMAGES = 32
LEGACY_KERAS = "TF_USE_LEGACY_KERAS"


def section(bench) -> dict:
    from benchmarks.measure import litert_rounds
    from benchmarks.run import columns, goal
    from pipeline.config import PipelineConfig
    from pipeline.runtime import litert_quantizer as lq
    from pipeline.runtime.benchmark import gzip_size, measure
    from pipeline.selection.select import LATENCY_SLACK_MS
    s = bench.settings["int4"]
    ratio = PipelineConfig().max_latency_ratio or 1.0
    out = bench.runs_dir / "int4"
    out.mkdir(parents=True, exist_ok=True)
    sources = {"default CNN": _default_cnn(out / "cnn.tflite"),
               "MobileNetV2 0.35": _mobilenet(out / "mobilenet.tflite")}

    def p50(path: Path) -> float:
        return measure(path, runs=s["runs"], warmup=s["warmup"]).latency_ms_p50

    paths: dict[str, Path] = {}
    placements: dict[str, str] = {}
    for model, source in sources.items():
        stem = out / source.stem
        shape = _input_shape(source)
        calibration = np.random.default_rng(0).random((CALIBRATION_IMAGES, *shape),
                                                      dtype=np.float32)
        paths[f"{model}: float32"] = source
        progress("int4", f"{model}: int8, int4")
        paths[f"{model}: int8"] = lq.quantize_tflite("int8", source, f"{stem}.int8.tflite",
                                                     calibration=calibration)
        paths[f"{model}: int4 fixed"] = lq.quantize_tflite("int4", source, f"{stem}.int4.tflite")
        limit = p50(source) * ratio + LATENCY_SLACK_MS
        for name, int4_ops in (("int4 placed", lq.INT4_OPS),
                               ("int4+conv placed", lq.INT4_CAPABLE_OPS)):
            progress("int4", f"{model}: {name} (p50 limit {limit:.3f} ms)")
            placement = lq.int4_placement(source, out, latency_of=p50, latency_limit_ms=limit,
                                          int4_ops=int4_ops)
            key = f"{model}: {name}"
            paths[key] = lq.quantize_tflite("int4", source,
                                            f"{stem}.{name.replace(' ', '-')}.tflite",
                                            **placement.options())
            placements[key] = ", ".join(f"{kind} {precision}"
                                        for kind, precision in placement.kinds().items())
    measured = litert_rounds(paths, threads=(1,), rounds=s["rounds"], runs=s["runs"],
                             warmup=s["warmup"], section="int4")
    rows = []
    for key, path in paths.items():
        model, variant = key.split(": ")
        figures, reference = measured[(key, 1)], measured[(f"{model}: float32", 1)]
        rows.append({
            "model": model, "variant": variant, "size_bytes": path.stat().st_size,
            "gzip_size_bytes": gzip_size(path),
            "gzip_ratio": gzip_size(sources[model]) / gzip_size(path),
            "latency_ms_p50": figures["latency_ms_p50"],
            "latency_ratio": _ratio(figures["latency_ms_p50"], reference["latency_ms_p50"]),
            "peak_memory_mb": figures["peak_memory_mb"],
            "xnnpack_partitions": _xnnpack_partitions(path),
            "placement": placements.get(key, ""),
        })
    goals = []
    for model in sources:
        placed = next(r for r in rows if r["model"] == model and r["variant"] == "int4 placed")
        reference = next(r for r in rows if r["model"] == model and r["variant"] == "float32")
        limit = reference["latency_ms_p50"] * ratio + LATENCY_SLACK_MS
        goals.append(goal(f"{model}: int4 (placed) p50 within {ratio:g} x float32 + "
                          f"{LATENCY_SLACK_MS:g} ms", f"<= {limit:.3f} ms",
                          placed["latency_ms_p50"], placed["latency_ms_p50"] <= limit,
                          f"{placed['gzip_ratio']:.2f}x smaller gzipped than float32"))
    return {
        "title": "int4 where it pays: the default CNN and MobileNetV2 side by side",
        "notes": [
            "Untrained weights (size and speed only). Latency: batch 1, one thread, "
            f"{s['rounds']} round(s) x {s['runs']} runs, medians; ratios against the same "
            "model's float32. Placed: `litert_quantizer.int4_placement`, as the quantize stage "
            f"runs it with the default latency gate ({ratio:g} x float32's p50 + "
            f"{LATENCY_SLACK_MS:g} ms), timed in this run.",
            "XNNPACK partitions > 1: some ops run on LiteRT's built-in kernels between XNNPACK "
            "partitions (int8-weight depthwise convolutions have no XNNPACK hybrid kernel).",
        ],
        "goals": goals,
        "tables": [{"id": "int4", "title": "int4 placements against float32 and int8",
                    "columns": columns([("model", "model", "text"), ("variant", "variant", "code"),
                                        ("size_bytes", "size (MB)", "mb"),
                                        ("gzip_size_bytes", "gzip (MB)", "mb"),
                                        ("gzip_ratio", "gzip ratio", "x"),
                                        ("latency_ms_p50", "p50 ms", "ms"),
                                        ("latency_ratio", "p50 / float32", "x"),
                                        ("peak_memory_mb", "peak MiB", "mib"),
                                        ("xnnpack_partitions", "XNNPACK partitions", "int"),
                                        ("placement", "weights per op kind", "text")]),
                    "rows": rows}],
    }


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def _default_cnn(path: Path) -> Path:
    from pipeline.runtime.quantize import convert
    from pipeline.sources.models import build_cnn, tf_keras
    tf_keras().utils.set_random_seed(0)
    return convert("float32", path, model=build_cnn((28, 28, 1), 10))


def _mobilenet(path: Path) -> Path:
    env = {k: v for k, v in os.environ.items() if k != LEGACY_KERAS}
    done = subprocess.run([sys.executable, "-m", "benchmarks.int4", "--mobilenet", str(path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"building MobileNetV2 failed: {tail[0]}")
    return path


def _input_shape(path: Path) -> tuple[int, ...]:
    from ai_edge_litert.interpreter import Interpreter
    return tuple(int(d) for d in Interpreter(model_path=str(path)).get_input_details()[0]["shape"][1:])


def _xnnpack_partitions(path: Path) -> int:
    """How many XNNPACK delegate nodes the classic interpreter makes of the model."""
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    return sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())  # noqa: SLF001


def _build_mobilenet(path: Path) -> None:
    """Keras 3's MobileNetV2 (no download with weights=None) as a float32 .tflite."""
    if os.environ.get(LEGACY_KERAS):
        raise SystemExit(f"{LEGACY_KERAS} is set: keras.applications would not be Keras 3")
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, **MOBILENET)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int4",
                                     description="Build the int4 section's MobileNetV2 .tflite.")
    parser.add_argument("--mobilenet", required=True, help="where to write its float32 .tflite")
    _build_mobilenet(Path(parser.parse_args(argv).mobilenet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
