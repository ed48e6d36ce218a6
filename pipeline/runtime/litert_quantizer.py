"""Quantization of any float32 .tflite through LiteRT Quantizer (`litert_quantizer`).

The TF converter (pipeline.runtime.quantize) needs a Keras model or a SavedModel; this module needs only
the converter's float32 output, so it serves every model source, a user's bare .tflite included:

- `quantize_tflite(mode, ...)`: `int4` (int4 weights, float activations) and, for a model whose
  only source is a .tflite, the converter's modes `dynamic`, `int8`, `int16x8`, `float16`.
- `sensitivity(...)`: one row per weighted op: its output error and the model's output error
  (SNR in dB, cosine similarity, from the quantizer's per-tensor validation) when that op alone
  is quantized, on calibration images.
- `quantize_mixed(...)`: int4 everywhere except the most sensitive ops, kept at int8 (or float),
  the fewest that bring the accuracy within a budget of the float32 reference.

int4 is dynamic-range: int4 weights, float activations that the kernel quantizes on the fly.
Only FULLY_CONNECTED and EMBEDDING_LOOKUP get int4 by default; every other weighted op gets int8
(or float16 where the pipeline measured int8 slower, below), so no weight stays float32. The
choices, measured on the default CNN (3 epochs on the full Fashion-MNIST training set; full test
set; `pipeline.runtime.benchmark.measure`, batch 1, one thread, CompiledModel on XNNPACK; one run
on one machine, compare within it only):

                               bytes    gzip B   accuracy  p50 ms
  float32 (converter)      1,689,772 1,565,627    0.9118   0.053
  int8 (converter)           431,624   378,986    0.9117   0.018
  int4 channelwise [chosen]  227,016   172,226    0.9113   0.021
  int4 blockwise (32)        250,776   221,055    0.9112   0.021
  int4 + CONV_2D int4        217,656   162,042    0.9094   0.069
  weight-only int4           218,112   162,155    0.9098   0.216

- Channelwise (one scale per output channel) over blockwise (one per 32 inputs; the quantizer
  offers blocks for FULLY_CONNECTED only): blocks cost 10 % more bytes (28 % gzipped) for no
  accuracy here. `block_size=` selects them.
- CONV_2D stays int8: XNNPACK leaves an int4 CONV_2D to LiteRT's built-in hybrid kernel (the
  graph splits into XNNPACK partitions around it), so int4 convolutions made the CNN 3.3x
  slower (and slower than float32) for 4 % fewer bytes; on a conv-only net (8 convs, 64x64x3)
  they halved the size but ran 4.2x slower than int8 convs (1.76 vs 0.42 ms; float32 1.42 ms).
  `int4_ops=INT4_CAPABLE_OPS` opts in.
- Dynamic over weight-only int4 (a DEQUANTIZE before float kernels): 10x slower at a similar
  size.

Whether hybrid (int4 or int8 weights, float activations) kernels pay depends on the model, so the
pipeline times them: `int4_placement` gives each weighted op kind the smallest precision whose
model is not slower than float32 beyond the latency gate: int4, int8 (hybrid), int8 weight-only
(a DEQUANTIZE before the float kernel, which XNNPACK folds when the model loads: float32's speed
at int8's size), else float16. `make bench` (section int4; untrained weights: size and speed
only; medians of 3 interleaved rounds; one run on a loaded 2-core machine):

  model                        variant                             gzip B   p50 ms  / float32
  default CNN (28x28x1)        float32                          1,560,891   0.134   1.00
                               int8 (static)                      424,292   0.065   0.48
                               int4 fixed (FC int4, CONV int8)    218,403   0.081   0.61
                               int4 placed: the same              218,403   0.079   0.59
  MobileNetV2 0.35 (96x96x3)   float32                          1,436,170   0.407   1.00
                               int8 (static)                      447,993   0.484   1.19
                               int4 fixed (FC int4, rest int8)    416,651   1.297   3.19
                               int4 placed: FC int4, CONV and     418,000   0.414   1.02
                                 DEPTHWISE int8 weight-only

  On MobileNetV2, DEPTHWISE_CONV_2D with hybrid int8 weights is no XNNPACK kernel: the graph
  splits into 18 XNNPACK partitions around the 17 depthwise convolutions, which the built-in
  kernels run (int4 with float depthwise weights: 0.58 ms, one partition); hybrid CONV_2D stays
  on XNNPACK but quantizes its input at every invoke, which its 35 small convolutions do not win
  back (float CONV_2D, hybrid depthwise: 0.88 ms; float32 0.36 ms in that run). Weight-only
  weights cost memory instead: XNNPACK holds them unpacked to float32 (peak 6.1 against
  float32's 4.9 MiB).
"""
from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.files import atomic_path

MODES = ("dynamic", "float16", "int8", "int16x8", "int4")
# Ops with a weight operand (input 1 of each), by the quantizer's names (the interpreter says
# TRANSPOSE_CONV).
WEIGHTED_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE",
                "BATCH_MATMUL", "EMBEDDING_LOOKUP")
INTERPRETER_OP_NAMES = {"TRANSPOSE_CONV": "CONV_2D_TRANSPOSE"}
# Ops the quantizer can give int4 dynamic weights.
INT4_CAPABLE_OPS = ("FULLY_CONNECTED", "EMBEDDING_LOOKUP", "CONV_2D")
# The ones `int4` mode does (others get int8; see the module docstring for CONV_2D).
INT4_OPS = ("FULLY_CONNECTED", "EMBEDDING_LOOKUP")
# Weights stored small and dequantized to float before float kernels (the int4 modes' choice for
# op kinds whose hybrid kernel is slower: XNNPACK dequantizes them once, when the model loads):
# precision name -> bits.
WEIGHT_ONLY = {"int8-weight-only": 8, "float16": 16}
# int8 weight-only is kept over float16 unless its model is this many times slower (see
# `int4_placement`).
WEIGHT_ONLY_SLOWDOWN = 1.5
# Blockwise int4 exists for these only.
INT4_BLOCKWISE_OPS = ("FULLY_CONNECTED", "EMBEDDING_LOOKUP")
BLOCK_SIZES = (32, 64, 128, 256)
# Images fed to each validation in `sensitivity` (one batch: two interpreters per op, which
# keep every intermediate tensor), fewer for large inputs: at most this many input values.
SENSITIVITY_IMAGES = 64
SENSITIVITY_INPUT_VALUES = 1_000_000
# Threads for the quantizer's calibration and validation interpreters (its default is 16).
NUM_THREADS = 2


class QuantizerError(RuntimeError):
    """LiteRT Quantizer cannot produce a runnable model for this mode (the message names the
    mode, the model and the cause)."""


@dataclass
class WeightedOp:
    """One op with a constant weight operand. `scope` is the quantizer's name for the op (its
    output tensor names, each followed by ';'), used to address it in a recipe."""
    name: str
    op: str
    weights: int
    scope: str


@dataclass
class MixedResult:
    """What `quantize_mixed` made: `layers` maps each weighted op's name to the precision of its
    weights (`int4`, `int8` or `float32`); `kept` names the int4-capable ops kept at higher
    precision, most sensitive first; `trials` lists every model evaluated ({kept, accuracy,
    drop_pts}), in order."""
    path: Path
    layers: dict[str, str]
    kept: list[str]
    accuracy: float
    reference_accuracy: float
    max_drop_pts: float
    within_budget: bool
    trials: list[dict[str, Any]] = field(default_factory=list)

    @property
    def drop_pts(self) -> float:
        return (self.reference_accuracy - self.accuracy) * 100.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "drop_pts": self.drop_pts}


@dataclass
class Int4Placement:
    """What `int4_placement` chose: the op kinds given int4 weights (`int4_ops`), those whose
    weights are dequantized before float kernels (`weight_only`: kind -> a WEIGHT_ONLY precision;
    the other weighted kinds get int8 hybrid kernels), the latency limit it held them to and every
    model it timed (`trials`: {kind, precision, latency_ms_p50, fits}), in order."""
    int4_ops: tuple[str, ...]
    weight_only: dict[str, str]
    latency_limit_ms: float
    trials: list[dict[str, Any]] = field(default_factory=list)

    def kinds(self) -> dict[str, str]:
        """Op kind -> the weight precision it got, for the kinds that were timed."""
        return {trial["kind"]: ("int4" if trial["kind"] in self.int4_ops
                                else self.weight_only.get(trial["kind"], "int8"))
                for trial in self.trials}

    def options(self) -> dict[str, Any]:
        """The keyword arguments that make this placement (`quantize_tflite`, `sensitivity`,
        `quantize_mixed`)."""
        return {"int4_ops": self.int4_ops, "weight_only": self.weight_only}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kinds": self.kinds()}


def int4_placement(float_tflite_path: str | Path, work_dir: str | Path, *,
                   latency_of: Callable[[Path], float], latency_limit_ms: float,
                   int4_ops: tuple[str, ...] = INT4_OPS) -> Int4Placement:
    """Per weighted op kind, the smallest weight precision whose model is not slower than
    `latency_limit_ms` (`latency_of(path)`: the caller's p50 at batch 1): int4 (kinds in
    `int4_ops`), else int8 (hybrid kernel), else int8 weight-only, else float16; weight-only
    weights are dequantized by XNNPACK when the model loads, so they run float32's kernels.

    Why: int4 and int8 weights with float activations are hybrid kernels, and whether they pay
    depends on the model. On the default CNN (most weights in one Dense layer) int4
    FULLY_CONNECTED and int8 CONV_2D run 2x faster than float32. On MobileNetV2 (alpha 0.35,
    96x96) hybrid DEPTHWISE_CONV_2D is not an XNNPACK kernel: the graph splits into 18 XNNPACK
    partitions around the 17 depthwise convolutions, which LiteRT's built-in kernels run, and
    the model was 3.1x slower than float32 (1.09 vs 0.36 ms); hybrid CONV_2D stays on XNNPACK but
    quantizes its input at every invoke, which 35 small pointwise convolutions pay for (0.58 ms
    with depthwise at float16). int8 weight-only convolutions there: one XNNPACK partition,
    float32's speed, int8's size. Kinds are decided largest (most weights) first, each trial the
    whole model with the kinds decided so far and the rest at float16; the last model that fit
    is the result, so the chosen placement itself was measured within the limit.

    Between the two weight-only precisions the limit does not decide: both run float32's
    kernels once XNNPACK has dequantized them, so when int8 weight-only misses the limit the
    float16 model is timed too (the trial's `float16_latency_ms_p50`), and int8 weight-only
    stays unless it is more than WEIGHT_ONLY_SLOWDOWN times slower than that (a kind XNNPACK
    cannot take at int8 leaves its partition: 3x, not noise). On a 0.1 ms model the timer's
    noise alone had put one run's convolutions at float16 and another's at int8 (0.142 against
    0.101 ms for the same model), a 1.6x larger file for no speed."""
    float_tflite_path = Path(float_tflite_path)
    ops = _read_ops(float_tflite_path, "int4")
    weights: dict[str, int] = {}
    for op in ops:
        weights[op.op] = weights.get(op.op, 0) + op.weights
    kinds = sorted(weights, key=lambda kind: (-weights[kind], kind))
    decided: dict[str, str] = {}
    trials: list[dict[str, Any]] = []
    candidate = Path(work_dir) / f"{float_tflite_path.stem}.int4-placement.tflite"

    def timed(kind: str, precision: str) -> float:
        """p50 of the model with the kinds decided so far, `kind` at `precision`, the rest at
        float16."""
        placement = {k: "float16" for k in kinds} | decided | {kind: precision}
        quantize_tflite("int4", float_tflite_path, candidate,
                        int4_ops=_kinds_at(placement, "int4"),
                        weight_only=_weight_only(placement))
        return float(latency_of(candidate))
    try:
        for kind in kinds:
            for precision in (["int4"] if kind in int4_ops else []) + ["int8", "int8-weight-only"]:
                latency = timed(kind, precision)
                trial: dict[str, Any] = {"kind": kind, "precision": precision,
                                         "latency_ms_p50": latency,
                                         "fits": latency <= latency_limit_ms}
                if not trial["fits"] and precision == "int8-weight-only":
                    trial["float16_latency_ms_p50"] = timed(kind, "float16")
                    trial["fits"] = latency <= WEIGHT_ONLY_SLOWDOWN * trial["float16_latency_ms_p50"]
                trials.append(trial)
                if trial["fits"]:
                    decided[kind] = precision
                    break
            else:
                decided[kind] = "float16"
    finally:
        candidate.unlink(missing_ok=True)
    return Int4Placement(int4_ops=_kinds_at(decided, "int4"), weight_only=_weight_only(decided),
                         latency_limit_ms=latency_limit_ms, trials=trials)


def _kinds_at(placement: dict[str, str], precision: str) -> tuple[str, ...]:
    return tuple(kind for kind, chosen in placement.items() if chosen == precision)


def _weight_only(placement: dict[str, str]) -> dict[str, str]:
    return {kind: chosen for kind, chosen in placement.items() if chosen in WEIGHT_ONLY}


def quantize_tflite(mode: str, float_tflite_path: str | Path, out_path: str | Path, *,
                    calibration=None, block_size: int | None = None,
                    int4_ops: tuple[str, ...] = INT4_OPS,
                    weight_only: dict[str, str] | None = None) -> Path:
    """Quantize a float32 .tflite with `mode` and write `out_path` atomically; returns the path.

    `calibration` (needed by `int8` and `int16x8`): float32 input batches (N, H, W, C) from the
    dataset, as one array, an iterable of them or a function returning one; items may also be
    [batch] lists, as the converter's representative datasets yield. `block_size` (int4 only):
    blockwise int4 with that many weights per scale on the ops that have it (default:
    channelwise, see the module docstring); `int4_ops`: the op kinds given int4 weights (among
    INT4_CAPABLE_OPS; the other weighted ops get int8, or a WEIGHT_ONLY precision for the kinds
    in `weight_only`: see `int4_placement`). `int8` has int8 input and output, the
    other modes float ones, as from the converter. Raises QuantizerError if the quantizer or
    the runtime refuses the model, or (int8, int16x8) an op would stay float.
    """
    if mode == "mixed":
        raise ValueError("mixed mode needs an accuracy callback: call quantize_mixed()")
    if mode not in MODES:
        raise ValueError(f"unknown quantizer mode {mode!r}; one of {', '.join(MODES)}")
    if block_size is not None and (mode != "int4" or block_size not in BLOCK_SIZES):
        raise ValueError(f"block_size applies to int4 only, one of {BLOCK_SIZES}")
    if not set(int4_ops) <= set(INT4_CAPABLE_OPS):
        raise ValueError(f"int4_ops must be among {', '.join(INT4_CAPABLE_OPS)}")
    float_tflite_path = Path(float_tflite_path)
    ops = _read_ops(float_tflite_path, mode)
    return _quantize(mode, float_tflite_path, out_path, calibration,
                     lambda qt: _add_mode(qt, mode, block_size=block_size, int4_ops=int4_ops,
                                          weight_only=weight_only), ops)


def sensitivity(float_tflite_path: str | Path, mode: str = "int4", calibration=None, *,
                int4_ops: tuple[str, ...] = INT4_OPS,
                weight_only: dict[str, str] | None = None) -> list[dict]:
    """Per weighted op: how much quantizing that op alone (as `mode` would) disturbs its own
    output and the model's output, on a batch of calibration images (SENSITIVITY_IMAGES).

    Rows, in graph order: `layer` (the op's output tensor name), `op`, `weights` (element count
    of its weight tensor), `quantization` (what `mode` gives it), `layer_snr_db`,
    `layer_cosine`, `output_snr_db`, `output_cosine`. Lower SNR = more sensitive. Needs
    `calibration` (see quantize_tflite)."""
    from litert_quantizer import quantizer as lq
    if mode not in MODES:
        raise ValueError(f"unknown quantizer mode {mode!r}; one of {', '.join(MODES)}")
    float_tflite_path = Path(float_tflite_path)
    ops = _read_ops(float_tflite_path, mode)  # a readable model first, then its signature
    signature, input_name, output_names = _signature(float_tflite_path, mode)
    batch = _calibration_batch(calibration, mode, float_tflite_path)
    test_data = {signature: [{input_name: batch}]}
    metrics = [lq.ValidationErrorMetric.SNR, lq.ValidationErrorMetric.COSINE_SIMILARITY]
    rows = []
    for op in ops:
        qt = _quantizer(float_tflite_path, mode)
        _add_mode(qt, mode, regex=_exact(op.scope), op_name=op.op, int4_ops=int4_ops,
                  weight_only=weight_only)
        with _refusals(mode, float_tflite_path, op.name):
            qt.quantize(_calibrate(qt, test_data), enable_progress_report=False)
            errors = qt.validate(test_data=test_data, error_metrics=metrics,
                                 num_threads=NUM_THREADS).get_all_tensor_results()
        layer = errors.get(op.name, {})
        output = errors.get(output_names[0], {})
        rows.append({
            "layer": op.name, "op": op.op, "weights": op.weights,
            "quantization": _op_precision(mode, op, int4_ops, weight_only),
            "layer_snr_db": _db(layer.get("snr")),
            "layer_cosine": _finite(layer.get("cosine_similarity")),
            "output_snr_db": _db(output.get("snr")),
            "output_cosine": _finite(output.get("cosine_similarity")),
        })
    return rows


def quantize_mixed(float_tflite_path: str | Path, out_path: str | Path, *,
                   accuracy_of: Callable[[Path], float], max_drop_pts: float, calibration=None,
                   table: list[dict] | None = None, reference_accuracy: float | None = None,
                   keep: str = "int8", int4_ops: tuple[str, ...] = INT4_OPS,
                   weight_only: dict[str, str] | None = None) -> MixedResult:
    """int4 everywhere except the most sensitive int4 ops, kept at `keep` (`int8` or `float32`):
    the fewest, taken in order of sensitivity (lowest output SNR first), that bring the accuracy
    within `max_drop_pts` percentage points of the float32 reference.

    `accuracy_of(tflite_path) -> float` is the caller's measure, a 0..1 fraction (e.g.
    evaluate_tflite(...).accuracy on the validation split, so the test set stays unbiased);
    `reference_accuracy` is the float32 reference's by the same measure (if not given,
    `accuracy_of(float_tflite_path)`). `table` is `sensitivity(path, "int4", ...)`'s
    result (computed from `calibration` if not given). The number kept is searched by bisection
    (every model evaluated is listed in `trials`); if even all kept misses the budget, that model
    is written and `within_budget` is False. Writes `out_path` atomically."""
    if keep not in ("int8", "float32"):
        raise ValueError("keep must be 'int8' or 'float32'")
    float_tflite_path, out_path = Path(float_tflite_path), Path(out_path)
    ops = _read_ops(float_tflite_path, "mixed")
    if table is None:
        table = sensitivity(float_tflite_path, "int4", calibration, int4_ops=int4_ops,
                            weight_only=weight_only)
    by_name = {op.name: op for op in ops}
    ranked = [by_name[row["layer"]] for row in sorted(table, key=_sensitivity_key)
              if row["layer"] in by_name and row["quantization"] == "int4"]
    if reference_accuracy is None:
        reference_accuracy = float(accuracy_of(float_tflite_path))
    trials: list[dict[str, Any]] = []
    tried: dict[int, float] = {}
    candidate = out_path.with_name(out_path.name + ".candidate.tflite")

    def accuracy_keeping(count: int) -> float:
        if count not in tried:
            kept = ranked[:count]
            _quantize("mixed", float_tflite_path, candidate, None,
                      lambda qt: _add_mixed(qt, kept, keep, int4_ops, weight_only), ops)
            tried[count] = float(accuracy_of(candidate))
            trials.append({"kept": [op.name for op in kept], "accuracy": tried[count],
                           "drop_pts": (reference_accuracy - tried[count]) * 100.0})
        return tried[count]

    def passes(count: int) -> bool:
        return (reference_accuracy - accuracy_keeping(count)) * 100.0 <= max_drop_pts

    try:
        if passes(0):
            chosen = 0
        elif not ranked or not passes(len(ranked)):
            chosen = len(ranked)
        else:  # passes(high) holds throughout; the smallest passing count is in (low, high]
            low, high = 0, len(ranked)
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if passes(middle) else (middle, high)
            chosen = high
        accuracy_keeping(chosen)  # evaluated already: rebuild its file only if another came last
        if trials[-1]["kept"] != [op.name for op in ranked[:chosen]]:
            _quantize("mixed", float_tflite_path, candidate, None,
                      lambda qt: _add_mixed(qt, ranked[:chosen], keep, int4_ops, weight_only),
                      ops)
        os.replace(candidate, out_path)
    finally:
        candidate.unlink(missing_ok=True)
    kept_names = {op.name for op in ranked[:chosen]}
    int4_names = {op.name for op in ranked}
    layers = {op.name: (keep if op.name in kept_names else "int4" if op.name in int4_names
                        else _fixed_precision(op, int4_ops, weight_only)) for op in ops}
    accuracy = tried[chosen]
    return MixedResult(path=out_path, layers=layers, kept=[op.name for op in ranked[:chosen]],
                       accuracy=accuracy, reference_accuracy=reference_accuracy,
                       max_drop_pts=max_drop_pts,
                       within_budget=(reference_accuracy - accuracy) * 100.0 <= max_drop_pts,
                       trials=trials)


def weighted_ops(tflite_path: str | Path) -> list[WeightedOp]:
    """The ops with a constant weight tensor, in graph order."""
    from pipeline.runtime.litert import TFLiteGraph
    graph = TFLiteGraph(tflite_path, builtin_kernels=True)
    tensors = graph.tensors
    found = []
    for op in graph.ops:
        name = INTERPRETER_OP_NAMES.get(op["op_name"], op["op_name"])
        weight = graph.weight_index(op)
        if name not in WEIGHTED_OPS or weight is None:
            continue  # no weights, or a runtime tensor (e.g. BATCH_MATMUL of two activations)
        outputs = [tensors[i]["name"] for i in op["outputs"] if i >= 0 and tensors[i]["name"]]
        found.append(WeightedOp(name=outputs[0] if outputs else f"op{op['index']}", op=name,
                                weights=int(np.prod(tensors[weight]["shape"])),
                                scope="".join(f"{n};" for n in outputs)))
    return found


# --- recipes -------------------------------------------------------------------------------------

def _add_mode(qt, mode: str, regex: str = ".*", op_name: str | None = None,
              block_size: int | None = None, int4_ops: tuple[str, ...] = INT4_OPS,
              weight_only: dict[str, str] | None = None) -> None:
    """Add `mode`'s configuration for ops matching `regex` (all kinds, or only `op_name`); in
    `int4` mode the kinds in `weight_only` get that WEIGHT_ONLY precision instead of int8."""
    from litert_quantizer import qtyping
    from litert_quantizer.algorithm_manager import AlgorithmName
    every = qtyping.TFLOperationName.ALL_SUPPORTED
    target = op_name or every
    if mode == "dynamic":
        qt.add_dynamic_config(regex, target, 8)
    elif mode == "float16":
        qt.add_weight_only_config(regex, target, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)
    elif mode in ("int8", "int16x8"):
        qt.add_static_config(regex, target, 8 if mode == "int8" else 16, 8)
        if mode == "int16x8" and op_name is None:
            # Float input and output, as the converter's int16x8 (LiteRT's Python TensorBuffer has
            # no int16, so the CompiledModel could not be fed); int8 keeps int8 ones, as there.
            for io_op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
                qt.update_quantization_recipe(regex, io_op, algorithm_key=AlgorithmName.NO_QUANTIZE)
    elif mode == "int4":
        if op_name is None or op_name not in int4_ops:
            qt.add_dynamic_config(regex, target, 8)  # later entries win: int4 where it applies
        for name, precision in (weight_only or {}).items():
            if op_name in (None, name) and name not in int4_ops:
                bits = WEIGHT_ONLY[precision]
                qt.add_weight_only_config(regex, name, bits, **(
                    {"algorithm_key": AlgorithmName.FLOAT_CASTING} if bits == 16 else {}))
        for name in [name for name in int4_ops if op_name in (None, name)]:
            granularity = qtyping.QuantGranularity.CHANNELWISE
            if block_size is not None and name in INT4_BLOCKWISE_OPS:
                granularity = qtyping.QuantGranularity(f"BLOCKWISE_{block_size}")
            qt.add_dynamic_config(regex, name, 4, granularity)
    else:
        raise ValueError(f"unknown quantizer mode {mode!r}")


def _add_mixed(qt, kept: list[WeightedOp], keep: str, int4_ops: tuple[str, ...] = INT4_OPS,
               weight_only: dict[str, str] | None = None) -> None:
    """int4 everywhere, then `kept` ops at int8 or float (later recipe entries win)."""
    from litert_quantizer.algorithm_manager import AlgorithmName
    _add_mode(qt, "int4", int4_ops=int4_ops, weight_only=weight_only)
    for op in kept:
        if keep == "int8":
            qt.add_dynamic_config(_exact(op.scope), op.op, 8)
        else:
            qt.update_quantization_recipe(_exact(op.scope), op.op,
                                          algorithm_key=AlgorithmName.NO_QUANTIZE)


def _exact(scope: str) -> str:
    return "^" + re.escape(scope) + "$"


def _fixed_precision(op: WeightedOp, int4_ops: tuple[str, ...] = INT4_OPS,
                     weight_only: dict[str, str] | None = None) -> str:
    """What `int4` mode gives an op: int4 for the kinds in `int4_ops`, the WEIGHT_ONLY precision
    of those in `weight_only`, else int8."""
    return "int4" if op.op in int4_ops else (weight_only or {}).get(op.op, "int8")


def _op_precision(mode: str, op: WeightedOp, int4_ops: tuple[str, ...] = INT4_OPS,
                  weight_only: dict[str, str] | None = None) -> str:
    """The weight precision `mode` gives `op` (as the report names it)."""
    return _fixed_precision(op, int4_ops, weight_only) if mode == "int4" else mode


# --- running the quantizer -----------------------------------------------------------------------

def _read_ops(path: Path, mode: str) -> list[WeightedOp]:
    try:
        return weighted_ops(path)
    except ValueError as error:  # the interpreter's word for a file that is not a .tflite
        raise QuantizerError(f"{mode} quantization of {path.name} failed: cannot read the model "
                             f"({_last_line(error)})") from error


def _quantizer(float_tflite_path: Path, mode: str):
    from litert_quantizer import Quantizer
    with _refusals(mode, float_tflite_path):
        return Quantizer(str(float_tflite_path))


def _quantize(mode: str, float_tflite_path: Path, out_path, calibration, configure,
              ops: list[WeightedOp]) -> Path:
    from litert_quantizer.utils import tfl_flatbuffer_utils
    out_path = Path(out_path)
    if not ops:
        raise QuantizerError(f"{mode} quantization of {float_tflite_path.name}: the model has no "
                             f"weighted op ({', '.join(WEIGHTED_OPS)}) to quantize")
    qt = _quantizer(float_tflite_path, mode)
    if not tfl_flatbuffer_utils.is_float_model(qt._float_model):  # noqa: SLF001 (parsed already)
        raise QuantizerError(f"{mode} quantization of {float_tflite_path.name}: the model is "
                             f"already quantized; give the float32 .tflite")
    configure(qt)
    with atomic_path(out_path) as tmp:  # only a model that passed the checks lands there
        with _refusals(mode, float_tflite_path):
            test_data = None
            if qt.need_calibration:
                signature, input_name, _ = _signature(float_tflite_path, mode)
                batches = _batches(calibration, mode, float_tflite_path)
                test_data = {signature: [{input_name: batch} for batch in batches]}
            result = qt.quantize(_calibrate(qt, test_data), enable_progress_report=False)
            result.export_model(str(tmp), overwrite=True)
        _check_runs(tmp, mode, float_tflite_path)
        if mode in ("int8", "int16x8"):
            _check_integer(tmp, mode, float_tflite_path)
    return out_path


def _calibrate(qt, test_data):
    if not qt.need_calibration:
        return None
    return qt.calibrate(test_data, num_threads=NUM_THREADS)


@contextmanager
def _refusals(mode: str, path: Path, op: str | None = None):
    """Turn the quantizer's exceptions into one-line QuantizerErrors naming mode, model, op."""
    try:
        yield
    except QuantizerError:
        raise
    except Exception as error:
        where = f"{mode} quantization of {path.name}" + (f" (op {op})" if op else "")
        raise QuantizerError(f"{where} failed: {_last_line(error)}") from error


def _check_runs(path: Path, mode: str, source: Path) -> None:
    """Load and invoke the result once (batch 1, zeros): a model the quantizer writes but the
    LiteRT runtime refuses must fail here, not in evaluation."""
    from ai_edge_litert.interpreter import Interpreter
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=1)
        detail = interpreter.get_input_details()[0]
        shape = [1, *detail["shape"][1:]]
        interpreter.resize_tensor_input(detail["index"], shape, strict=False)
        interpreter.allocate_tensors()
        interpreter.set_tensor(detail["index"], np.zeros(shape, detail["dtype"]))
        interpreter.invoke()
    except Exception as error:
        raise QuantizerError(f"{mode} quantization of {source.name}: the LiteRT runtime cannot run "
                             f"the result ({_last_line(error)})") from error


def _check_integer(path: Path, mode: str, source: Path) -> None:
    """int8 and int16x8 are full-integer modes (as the converter's): an op the quantizer has no
    integer recipe for stays float between a DEQUANTIZE and a QUANTIZE, which an integer-only
    accelerator cannot run, so the mode does not apply."""
    from pipeline.runtime.litert import TFLiteGraph
    graph = TFLiteGraph(path)
    floating = sorted({op["op_name"] for op in graph.ops
                       if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")
                       and any(i in graph.tensors and graph.tensors[i]["dtype"] == np.float32
                               for i in op["outputs"])})
    if floating:
        raise QuantizerError(f"{mode} quantization of {source.name}: LiteRT Quantizer has no "
                             f"{mode} recipe for {', '.join(floating)} (they would stay float); "
                             f"use dynamic or int4, or convert from the Keras model")


def _signature(path: Path, mode: str) -> tuple[str, str, list[str]]:
    """(signature key, its single input's name, its outputs' tensor names) of the model."""
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path))
    signatures = interpreter.get_signature_list()
    if not signatures:
        raise QuantizerError(f"{mode} quantization of {path.name}: the model has no signature "
                             f"(the quantizer calibrates and validates through one); re-export it "
                             f"with the TF converter")
    key = next(iter(signatures))
    runner = interpreter.get_signature_runner(key)
    inputs = list(runner.get_input_details())
    if len(inputs) != 1:
        raise QuantizerError(f"{mode} quantization of {path.name}: {len(inputs)} inputs; a "
                             f"classifier has one")
    outputs = [detail["name"] for detail in runner.get_output_details().values()]
    return key, inputs[0], outputs


def _batches(calibration, mode: str, path: Path) -> list[np.ndarray]:
    """The calibration data as a list of float32 (N, ...) batches (the quantizer walks its
    dataset twice, so a generator is materialised)."""
    if calibration is None:
        raise QuantizerError(f"{mode} quantization of {path.name} needs calibration data "
                             f"(float32 input batches from the dataset)")
    if callable(calibration):
        calibration = calibration()
    if isinstance(calibration, np.ndarray):
        calibration = [calibration]  # one batch of images
    batches = []
    for item in calibration:
        if isinstance(item, dict):
            item = next(iter(item.values()))
        elif isinstance(item, (list, tuple)):
            item = item[0]
        batches.append(np.asarray(item, dtype=np.float32))
    if not batches:
        raise QuantizerError(f"{mode} quantization of {path.name}: the calibration data is empty")
    return batches


def _calibration_batch(calibration, mode: str, path: Path) -> np.ndarray:
    """Some calibration images as one batch (see SENSITIVITY_IMAGES)."""
    images = np.concatenate(_batches(calibration, mode, path))
    per_image = max(1, int(np.prod(images.shape[1:])))
    return images[:max(4, min(SENSITIVITY_IMAGES, SENSITIVITY_INPUT_VALUES // per_image))]


def _sensitivity_key(row: dict) -> float:
    """Sort key, most sensitive first: the output SNR (unmeasured counts as most sensitive)."""
    value = row.get("output_snr_db")
    return value if value is not None and math.isfinite(value) else -math.inf


def _db(ratio) -> float:
    """A power ratio in decibels (floored at -120 dB for a silent signal)."""
    if ratio is None or not math.isfinite(ratio):
        return float("nan")
    return 10.0 * math.log10(max(float(ratio), 1e-12))


def _finite(value) -> float:
    return float(value) if value is not None else float("nan")


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
