"""A peer runtime on the same model: the Keras baseline exported to ONNX with tf2onnx and run with
ONNX Runtime in float32 and its own int8 modes (dynamic: `quantize_dynamic`; static: QDQ,
per-channel weights, calibrated on the pipeline's own calibration images by a
`CalibrationDataReader`).

Latency is measured like ours: batch 1, one thread (`intra_op_num_threads=1`), in a fresh process
(`python -m benchmarks.peer MODEL.onnx`) that also reports its peak resident-set growth.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.runtime.benchmark import rss_kib, run_measuring_child

OPSET = 17


def export(keras_model, out_path: Path) -> Path:
    """tf_keras model -> ONNX (float32), batch dimension left dynamic."""
    import tensorflow as tf
    import tf2onnx
    shape = (None, *keras_model.input_shape[1:])
    signature = (tf.TensorSpec(shape, tf.float32, name="images"),)
    tf2onnx.convert.from_keras(keras_model, input_signature=signature, opset=OPSET,
                               output_path=str(out_path))
    return out_path


def quantize_variants(float_path: Path, calibration: np.ndarray, out_dir: Path) -> dict[str, Path]:
    """ONNX Runtime's own int8 modes beside the float32 export."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray, input_name: str):
            self._batches = iter([{input_name: image[None].astype(np.float32)} for image in images])

        def get_next(self):
            return next(self._batches, None)

    import onnxruntime
    input_name = onnxruntime.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    prepared = out_dir / "float32.prepared.onnx"
    quant_pre_process(str(float_path), str(prepared))
    paths = {"float32": float_path,
             "int8 dynamic": out_dir / "int8-dynamic.onnx",
             "int8 static (QDQ, per-channel)": out_dir / "int8-static-qdq.onnx"}
    quantize_dynamic(str(prepared), str(paths["int8 dynamic"]), weight_type=QuantType.QInt8)
    quantize_static(str(prepared), str(paths["int8 static (QDQ, per-channel)"]), Reader(calibration, input_name),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return paths


def accuracy(onnx_path: Path, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predicted = np.concatenate([session.run(None, {name: x[i:i + batch_size].astype(np.float32)})[0].argmax(-1)
                                for i in range(0, len(x), batch_size)])
    return float((predicted == y).mean())


def measure(onnx_path: Path, *, runs: int, warmup: int, timeout: float = 600.0) -> dict:
    """Latency (batch 1, one thread) and peak memory in a fresh process."""
    return run_measuring_child("benchmarks.peer", [str(onnx_path), "--runs", str(runs),
                                                   "--warmup", str(warmup)],
                               f"ONNX Runtime benchmark of {onnx_path.name}", timeout)


def _child(onnx_path: str, runs: int, warmup: int) -> dict:
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    baseline = rss_kib("VmRSS")
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    detail = session.get_inputs()[0]
    shape = [1] + [int(d) for d in detail.shape[1:]]
    sample = {detail.name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, sample)
    timings = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter_ns()
        session.run(None, sample)
        timings[i] = (time.perf_counter_ns() - start) / 1e6
    return {"latency_ms_p50": float(np.percentile(timings, 50)),
            "latency_ms_p90": float(np.percentile(timings, 90)),
            "peak_memory_mb": max(0, rss_kib("VmHWM") - baseline) / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Latency and memory of one .onnx (batch 1, 1 thread).")
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.model, args.runs, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
