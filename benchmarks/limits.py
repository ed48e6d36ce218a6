"""The limits beside each figure: what a model's weights must occupy at a given bit width (the size
floor) and what its weights plus activations must occupy while it runs (the memory floor).

Read from the .tflite graph itself (the interpreter's tensor and op details, no delegate, so the
graph is the one the converter wrote):
- constants: tensors that ops read but no op writes and that are not graph inputs (weights, biases);
- unpacked weights: outputs of DEQUANTIZE ops on constants (float16 models), computed once at
  load and kept: the weights as the kernels execute them;
- activations: graph inputs and op outputs. The largest set alive at once, in execution order, is
  what any arena plan must hold for the graph as written (an estimate: runtimes may fuse ops or
  compute some in place); the sum of every non-constant tensor, kernel scratch included, is an
  upper bound of a plan without any reuse.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

# Bytes per weight at each mode's storage width (biases of int8 kernels are int32: small).
# int4 and mixed: half a byte where every weight could be int4 (the floor, not what is stored).
BYTES_PER_WEIGHT = {"float32": 4, "float16": 2, "dynamic": 1, "int8": 1, "int16x8": 1,
                    "int4": 0.5, "mixed": 0.5}


def _nbytes(detail: dict) -> int:
    shape = [int(d) for d in detail["shape"]]
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(detail["dtype"]).itemsize if shape else np.dtype(detail["dtype"]).itemsize


def _elements(detail: dict) -> int:
    return int(np.prod([int(d) for d in detail["shape"]], dtype=np.int64))


def graph_memory(tflite_path: str | Path) -> dict:
    """Weight and activation bytes of one .tflite at batch 1 (see the module docstring)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    interpreter = Interpreter(model_path=str(tflite_path), experimental_op_resolver_type=
                              OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()  # adds the kernels' scratch tensors to the details
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # noqa: SLF001 (the only way to walk the graph)
    graph_inputs = {d["index"] for d in interpreter.get_input_details()}
    graph_outputs = {d["index"] for d in interpreter.get_output_details()}

    produced_at: dict[int, int] = {}
    last_use: dict[int, int] = defaultdict(int)
    for position, op in enumerate(ops):
        for index in op["outputs"]:
            produced_at[index] = position
        for index in op["inputs"]:
            if index >= 0:
                last_use[index] = max(last_use[index], position)
    constants = {i for op in ops for i in op["inputs"]
                 if i >= 0 and i not in produced_at and i not in graph_inputs}
    unpacked = {out for op in ops if op["op_name"] == "DEQUANTIZE"
                and all(i in constants for i in op["inputs"] if i >= 0) for out in op["outputs"]}
    unpacked_sources = {i for op in ops if op["op_name"] == "DEQUANTIZE" and set(op["outputs"]) & unpacked
                        for i in op["inputs"] if i >= 0}

    stored = sum(_nbytes(details[i]) for i in constants)
    executed = stored - sum(_nbytes(details[i]) for i in unpacked_sources) + sum(
        _nbytes(details[i]) for i in unpacked)
    activations = (set(produced_at) | graph_inputs) - unpacked
    end = len(ops) - 1
    peak_live, peak_op = 0, None
    for position, op in enumerate(ops):
        live = sum(_nbytes(details[i]) for i in activations
                   if (0 if i in graph_inputs else produced_at[i]) <= position
                   <= (end if i in graph_outputs else last_use.get(i, produced_at.get(i, 0))))
        if live > peak_live:
            peak_live, peak_op = live, op["op_name"]
    non_constant = sum(_nbytes(d) for i, d in details.items() if i not in constants and i not in unpacked)
    return {
        "weight_elements": sum(_elements(details[i]) for i in constants),
        "weights_stored_bytes": int(stored),
        "weights_executed_bytes": int(executed),
        "activation_live_peak_bytes": int(peak_live),
        "activation_live_peak_op": peak_op,
        "activation_upper_bound_bytes": int(non_constant),
        "ops": len(ops),
    }


def floors(mode: str, graph: dict) -> dict:
    """Size floor (the model's weights x bytes per weight of `mode`, dense) and memory floor
    (weights as executed + the largest live activation set), both in bytes."""
    return {
        "size_floor_bytes": int(graph["weight_elements"] * BYTES_PER_WEIGHT[mode]),
        "memory_floor_bytes": int(graph["weights_executed_bytes"] + graph["activation_live_peak_bytes"]),
    }
