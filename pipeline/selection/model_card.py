"""Model cards: the markdown descriptions the registry shows for a registered model and for each of
its versions. Pure functions of the variant's result, the selection, the settings and what the
run recorded about its inputs (`Lineage`); `pipeline.selection.champion` gathers those and writes the
text with `MlflowClient.update_model_version` / `update_registered_model`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.selection.report import markdown_table
from pipeline.selection.select import OBJECTIVE_METRICS, Selection, accuracy_floor, finite_number

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

# What each quantization mode does to the weights and activations, in a few words.
QUANTIZATION_WORDS = {
    "float32": "none: the float32 LiteRT model",
    "dynamic": "dynamic range: int8 weights, float activations",
    "float16": "float16 weights, float activations",
    "int8": "full integer: int8 weights and activations, calibrated on training images",
    "int16x8": "int16 activations, int8 weights, calibrated on training images",
    "int4": "int4 weights on fully-connected layers, int8 on convolutions, float activations "
            "(LiteRT Quantizer)",
    "mixed": "int4 weights wherever LiteRT has an int4 kernel, the most sensitive layers kept "
             "at int8 within the accuracy budget (LiteRT Quantizer)",
}


@dataclass
class Lineage:
    """What the pipeline run recorded about where the model came from: the parent run's params,
    tags and metrics, and its dataset inputs (MLflow `run.inputs.dataset_inputs` as dicts with
    `name`, `digest`, `source`, `context`)."""
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    datasets: list[dict[str, str]] = field(default_factory=list)


def technique_settings(optimizations: list[str], config: "PipelineConfig") -> dict[str, str]:
    """Each training-time technique of the variant with the settings it ran with."""
    prune = (("2:4 structured" if config.prune_structured else
              f"target sparsity {config.prune_sparsity:g}, blocks of {config.prune_block}")
             + f", {config.prune_epochs} epochs" + (", stored sparse" if config.sparse_storage
                                                    else ""))
    described = {
        "prune": prune,
        "cluster": f"{config.cluster_count} centroids per kernel, {config.finetune_epochs} "
                   "fine-tuning epochs",
        "qat": f"int8 quantization-aware training, {config.finetune_epochs} epochs",
        "qat4": f"int4-aware training of the fully-connected kernels, {config.finetune_epochs} "
                "epochs",
        "distill": f"a student {config.student_width:g}x as wide (from "
                   f"{'the teacher' if config.student_init == 'teacher' else 'scratch'}), "
                   f"{config.distill_epochs} epochs, "
                   f"temperature {config.distill_temperature:g}, alpha {config.distill_alpha:g}",
    }
    return {name: described.get(name, "") for name in optimizations}


def version_card(result: dict[str, Any], selection: Selection, config: "PipelineConfig", *,
                 name: str, version: str | int, decision: str, lineage: Lineage,
                 run_tags: dict[str, str] | None = None,
                 run_params: dict[str, str] | None = None,
                 per_class_accuracy: dict[str, float] | None = None,
                 float_model_uri: str | None = None) -> str:
    """The markdown description of one registered version: where it comes from, what was done to
    it, how it measured, the gates, the champion decision, and how to serve it.

    `result`: the variant's metrics and tags (`pipeline.stages.results_of` rows); `run_tags`:
    its child run's tags (which runtimes measured it, the mixed placement); `decision`: the
    registry's champion decision."""
    variant = result["variant"]
    run_tags = run_tags or {}
    optimizations = [o for o in str(result.get("optimizations") or "").split(",") if o]
    sections = [f"# `{variant}`: version {version} of `{name}`\n",
                f"**Champion decision:** {decision}\n",
                _source_section(lineage, float_model_uri),
                _variant_section(result, optimizations, config, run_tags, run_params or {}),
                _measurements_section(result, lineage, run_tags),
                _gates_section(result, selection, config, lineage),
                _per_class_section(per_class_accuracy),
                _serving_section(name, version)]
    return "\n".join(s for s in sections if s)


def registered_model_description(name: str, class_names: list[str] | None,
                                 input_shape: str | None, lineage: Lineage) -> str:
    """What the registered model classifies: its classes, the input it takes, the data."""
    classes = (", ".join(f"`{c}`" for c in class_names) if class_names
               else lineage.params.get("classes", "?"))
    count = len(class_names) if class_names else lineage.params.get("classes", "?")
    shape = input_shape or lineage.params.get("input_shape", "?")
    return (f"# `{name}`\n\n"
            f"An image classifier compressed by the model compression pipeline: each version is "
            f"one compressed variant (a `.tflite` run on LiteRT), served as an MLflow pyfunc "
            f"model.\n\n"
            f"- **Classes ({count}):** {classes}\n"
            f"- **Input:** a batch of images `(N, {shape.replace('x', ', ')})`, float32, pixels "
            f"in the range the model was trained on; the output is each image's `class`, "
            f"`label` and `score_*`\n"
            f"- **Trained on:** {_dataset_words(lineage)}\n"
            f"- Alias `champion`: the best version so far; `challenger`: the latest that passed "
            f"the gates. Each version's description is its model card.\n")


def _source_section(lineage: Lineage, float_model_uri: str | None) -> str:
    params = lineage.params
    lines = ["## Source\n"]
    model = params.get("model", "?")
    lines.append(f"- **Model:** `{model}`" + (" (trained by the pipeline, "
                                                f"{params['epochs']} epochs)"
                                                if model == "default-cnn" and params.get("epochs")
                                                else ""))
    if float_model_uri:
        lines.append(f"- **Float model it was compressed from:** `{float_model_uri}`")
    lines.append(f"- **Dataset:** {_dataset_words(lineage)}")
    for dataset in lineage.datasets:
        lines.append(f"  - {dataset.get('context') or 'input'}: `{dataset.get('name', '?')}`, "
                     f"digest `{dataset.get('digest', '?')}`"
                     + (f", source `{dataset['source']}`" if dataset.get("source") else ""))
    run = lineage.tags.get("pipeline_run_id")
    if run:
        lines.append(f"- **Pipeline run:** `{run}`")
    return "\n".join(lines) + "\n"


def _dataset_words(lineage: Lineage) -> str:
    params = lineage.params
    words = f"`{params.get('dataset', '?')}`"
    details = [f"{params[k]} {label}" for k, label in (("train_images", "training images"),
                                                       ("validation_images", "validation images"),
                                                       ("test_images", "test images"))
               if params.get(k)]
    if params.get("dataset_digest"):
        details.append(f"digest `{params['dataset_digest']}`")
    return words + (f" ({', '.join(details)})" if details else "")


def _variant_section(result, optimizations, config, run_tags, run_params) -> str:
    mode = str(result.get("quantization", ""))
    lines = ["## Variant\n",
             f"- **Quantization:** `{mode}`: {QUANTIZATION_WORDS.get(mode, mode)}"]
    if mode == "mixed" and run_tags.get("mixed_kept"):
        lines.append(f"  - layers kept at int8: {run_tags['mixed_kept']}")
    searched = {key.removeprefix("technique.search."): value for key, value in run_params.items()
                if key.startswith("technique.search.")}
    if searched:  # an auto-* variant: the settings its search chose, not the configured ones
        found = ", ".join(f"{key} {value}" for key, value in sorted(searched.items())
                          if key not in ("trial", "trials"))
        lines.append(f"- **Settings found by the accuracy-aware search** (trial "
                     f"{searched.get('trial', '?')} of {searched.get('trials', '?')}, chosen on the "
                     f"validation split): {found}; techniques in order: "
                     + ", ".join(f"`{technique}`" for technique in optimizations))
    elif optimizations:
        lines.append("- **Training-time techniques**, in order:")
        lines.extend(f"  - `{technique}`: {words}" for technique, words
                     in technique_settings(optimizations, config).items())
    else:
        lines.append("- **Training-time techniques:** none (post-training quantization only)")
    return "\n".join(lines) + "\n"


def _measurements_section(result, lineage: Lineage, run_tags) -> str:
    reference_bytes = lineage.metrics.get("reference_size_bytes")
    rows = [
        ["accuracy (test set)", _fmt(result.get("accuracy"), "{:.4f}")],
        ["delta vs float32 (pts)", _fmt(result.get("accuracy_delta_pts"), "{:+.2f}")],
        ["size", _fmt(result.get("size_bytes"), "{:,.0f} B")],
        ["gzip size", _fmt(result.get("gzip_size_bytes"), "{:,.0f} B")],
        ["float32 / size", _fmt(result.get("compression_ratio"), "{:.2f}x")],
        ["float32 / gzip size", _fmt(result.get("gzip_compression_ratio"), "{:.2f}x")],
        ["latency p50 / p90 (ms, batch 1, 1 thread)",
         f"{_fmt(result.get('latency_ms_p50'), '{:.3f}')} / "
         f"{_fmt(result.get('latency_ms_p90'), '{:.3f}')}"],
        ["peak memory (MB)", _fmt(result.get("peak_memory_mb"), "{:.1f}")],
    ]
    table = markdown_table(["measure", "value"], rows, ["left", "right"])
    notes = []
    if reference_bytes:
        notes.append(f"Ratios against the float32 `.tflite` "
                     f"({_fmt(reference_bytes, '{:,.0f}')} B, accuracy "
                     f"{_fmt(lineage.metrics.get('reference_accuracy'), '{:.4f}')}).")
    if run_tags.get("evaluation_runtime"):
        notes.append(f"Accuracy computed on LiteRT `{run_tags['evaluation_runtime']}`"
                     + (f" ({run_tags['evaluation_kernels']})"
                        if run_tags.get("evaluation_kernels") else "") + ".")
    if run_tags.get("runtime"):
        notes.append(f"Latency and memory measured on LiteRT `{run_tags['runtime']}` in a fresh "
                     "process" + (f" (fell back: {run_tags['runtime_fallback_reason']})"
                                  if run_tags.get("runtime_fallback_reason") else "") + ".")
    return "## Measured\n\n" + table + ("\n" + " ".join(notes) + "\n" if notes else "")


def _gates_section(result, selection: Selection, config: "PipelineConfig",
                   lineage: Lineage) -> str:
    variant = result["variant"]
    classes = finite_number(lineage.params.get("classes"))
    gates = [f"accuracy drop at most {config.max_accuracy_drop_pts:g} pts",
             f"accuracy at least {accuracy_floor(config, int(classes) if classes else None):.4f}"]
    for value, words in ((config.min_compression_ratio, "compression ratio at least {:g}x"),
                         (config.max_latency_ms, "latency p50 at most {:g} ms"),
                         (config.max_peak_memory_mb, "peak memory at most {:g} MB")):
        if value is not None:
            gates.append(words.format(value))
    if variant in selection.passed:
        verdict = (f"passed, {selection.passed.index(variant) + 1} of {len(selection.passed)} "
                   f"passing variants by {OBJECTIVE_METRICS[selection.objective][2]}")
    else:
        verdict = "rejected: " + "; ".join(selection.rejected.get(variant, ["not evaluated"]))
    pareto = "on" if variant in selection.pareto else "not on"
    return ("## Gates\n\n"
            f"- **Gates:** {'; '.join(gates)}\n"
            f"- **This variant:** {verdict}; {pareto} the Pareto front (accuracy, gzip size, "
            f"latency)\n"
            f"- **The run's selection:** {selection.reason}\n")


def _per_class_section(per_class_accuracy: dict[str, float] | None) -> str:
    if not per_class_accuracy:
        return ""
    rows = [[f"`{name}`", f"{value:.4f}"] for name, value in per_class_accuracy.items()]
    return ("## Accuracy per class\n\n"
            + markdown_table(["class", "accuracy"], rows, ["left", "right"]))


def _serving_section(name: str, version: str | int) -> str:
    uri = f"models:/{name}/{version}"
    return ("## Serve it\n\n"
            f"```bash\nmake serve MODEL={uri}\n```\n\n"
            "then, with the request body stored with the model (three test images):\n\n"
            "```bash\ncurl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
            "-d @.work/serving_input_example.json\n```\n\n"
            f"From Python: `mlflow.pyfunc.load_model(\"{uri}\").predict(images)` with images "
            "`(N, H, W, C)`.\n")


def _fmt(value: Any, fmt: str) -> str:
    number = finite_number(value)
    return "-" if number is None else fmt.format(number)
