"""The champion policy: register the selection's champion as a version of the registered model,
with its model card, and move the `champion` alias to it only when it beats the current champion
on the run's objective at equal-or-better accuracy.

Each version's description is its model card, the registered model's says what it classifies
(`pipeline.selection.model_card`, from the runs' records); the version's measurements are also
metrics of its logged model, numbers where its tags are text.

Registration is idempotent: a version is identified by its tags `parent_run_id` + `variant`; a
retried task finds the version it created and only finishes what the first attempt left undone.
The tag `champion_decision`, written last, marks a finished registration.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.selection.model_card import Lineage, registered_model_description, version_card
from pipeline.selection.select import OBJECTIVE_METRICS, Selection, finite_number
from pipeline.serving import PYFUNC_NAME, log_tflite_pyfunc
from pipeline.store.registry import (CHALLENGER, CHAMPION, alias_version, find_version,
                                     run_json, summary)

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

    from pipeline.config import PipelineConfig

# Copied from the variant's result onto its model version as tags (strings: the champion
# decision compares the current champion's), and as numbers onto its logged model (MLflow 3's
# metrics of a model, shown with the version's source model).
METRIC_TAGS = ("accuracy", "accuracy_delta_pts", "size_bytes", "gzip_size_bytes",
               "compression_ratio", "gzip_compression_ratio", "latency_ms_p50", "latency_ms_p90",
               "peak_memory_mb", "sparsity", "unique_weights_max")


def register_champion(selection: Selection | dict,
                      results: list[dict[str, Any]] | dict[str, dict[str, Any]],
                      config: "PipelineConfig", *, parent_run_id: str,
                      airflow_run_id: str | None = None, input_example: Any = None, class_names: list[str] | None = None,
                      extra_tags: dict[str, str] | None = None,
                      client: MlflowClient | None = None) -> dict[str, Any]:
    """Register the selection's champion variant as a new version of
    `config.registered_model_name`, alias it `challenger`, and move `champion` to it when there is
    no champion yet or it beats the current one on `config.objective` at equal-or-better accuracy
    (within `config.champion_accuracy_tolerance_pts`).

    `results`: the benchmark results, as a list or keyed by variant name. The pyfunc model is
    logged into the variant's child run (`child_run_id`) from `tflite_path`, or from the child
    run's `model/model.tflite` when that file is not on this machine (another worker wrote it).
    Its input example and class names are `input_example` (a few test images; default one black
    image) and `class_names`.
    `extra_tags` go onto the new version too (e.g. the URI of the float model it came from).
    `client` must talk to the same tracking server as the fluent API.

    Returns {"name", "version", "aliases", "champion_version", "decision", "model_uri", "reused"},
    or {"skipped": True, "reason"} when no variant passed the gates.
    """
    if isinstance(selection, dict):
        selection = Selection.from_dict(selection)
    if selection.champion is None:
        return {"skipped": True, "reason": selection.reason}
    rows = results.values() if isinstance(results, dict) else results
    result = next((r for r in rows if r.get("variant") == selection.champion), None)
    if result is None:
        raise ValueError(f"no result for the selected champion {selection.champion!r}")
    client = client or MlflowClient()
    name = config.registered_model_name

    version = find_version(client, name, parent_run_id, selection.champion)
    reused = version is not None
    if version is None:
        run_id = result.get("child_run_id") or parent_run_id
        tags = {"variant": result["variant"], "quantization": result.get("quantization", ""),
                "optimizations": result.get("optimizations", ""), "parent_run_id": parent_run_id,
                "child_run_id": run_id, "objective": selection.objective,
                "gates_passed": str(selection.champion in selection.passed).lower()}
        if airflow_run_id:
            tags["airflow_run_id"] = airflow_run_id
        tags.update(extra_tags or {})
        tags.update({k: str(result[k]) for k in METRIC_TAGS if result.get(k) is not None})
        model_info = _log_variant_model(result, run_id, input_example, class_names)
        _log_model_metrics(client, run_id, model_info.model_id, result)
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # Tags go in with the version in one call: a crash cannot leave an unidentified version.
        version = client.create_model_version(name, source=model_info.model_uri, run_id=run_id,
                                              tags=tags, model_id=model_info.model_id)
    elif "champion_decision" in version.tags:
        return summary(client, name, version, version.tags["champion_decision"], reused)

    if version.tags.get("gates_passed") == "true":
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    promote_it, decision = champion_decision(client, name, version, result, config)
    if promote_it:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    _write_model_cards(client, name, version, result, selection, config, decision, class_names)
    client.set_model_version_tag(name, version.version, "champion_decision", decision)
    return summary(client, name, version, decision, reused)


def _log_variant_model(result, run_id, input_example, class_names) -> "ModelInfo":
    with tempfile.TemporaryDirectory() as download_dir:
        tflite_path = result.get("tflite_path")
        if (not tflite_path or not Path(tflite_path).is_file()) and result.get("tflite_uri"):
            from pipeline.store import artifacts  # registration only; not shipped for serving
            tflite_path = str(artifacts.fetch(result["tflite_uri"]))
        if not tflite_path or not Path(tflite_path).is_file():
            tflite_path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="model/model.tflite", dst_path=download_dir)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            return log_tflite_pyfunc(tflite_path, input_example, PYFUNC_NAME, class_names)
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            return log_tflite_pyfunc(tflite_path, input_example, PYFUNC_NAME, class_names)


def _log_model_metrics(client, run_id: str, model_id: str | None, result) -> None:
    """The variant's measurements as metrics of its logged model (numbers, unlike tags)."""
    from mlflow.entities import Metric
    if not model_id:
        return
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(value), now, 0, model_id=model_id) for k in METRIC_TAGS
               if (value := finite_number(result.get(k))) is not None]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def _write_model_cards(client, name, version, result, selection, config, decision,
                       class_names) -> None:
    """The version's model card and the registered model's description (what it classifies),
    from what the pipeline run recorded (written before `champion_decision`: a retry rewrites
    them)."""
    tags = client.get_model_version(name, version.version).tags
    lineage = _lineage(client, tags.get("parent_run_id"))
    child_run_id = tags.get("child_run_id") or version.run_id
    child = client.get_run(child_run_id) if child_run_id else None
    run_tags = child.data.tags if child else {}
    evaluation = run_json(client, child_run_id, "evaluation.json") or {}
    per_class = evaluation.get("per_class_accuracy") or None
    card = version_card(result, selection, config, name=name, version=version.version,
                        decision=decision, lineage=lineage, run_tags=run_tags,
                        run_params=child.data.params if child else {},
                        per_class_accuracy=per_class,
                        float_model_uri=tags.get("float_model_uri"))
    client.update_model_version(name, version.version, description=card)
    client.update_registered_model(name, description=registered_model_description(
        name, class_names or (list(per_class) if per_class else None),
        lineage.params.get("input_shape"), lineage))


def _lineage(client, parent_run_id: str | None):
    """The parent run's params, tags, metrics and dataset inputs (empty when it is gone)."""
    if not parent_run_id:
        return Lineage()
    try:
        run = client.get_run(parent_run_id)
    except MlflowException:
        return Lineage()
    datasets = [{"name": item.dataset.name, "digest": item.dataset.digest,
                 "source": _dataset_source(item.dataset),
                 "context": next((t.value for t in item.tags if t.key == "mlflow.data.context"),
                                 "")}
                for item in (run.inputs.dataset_inputs if run.inputs else [])]
    return Lineage(params=dict(run.data.params), tags=dict(run.data.tags),
                   metrics=dict(run.data.metrics), datasets=datasets)


def _dataset_source(dataset) -> str:
    """Where a logged dataset came from: the URI or path in its source JSON, else its type."""
    try:
        source = json.loads(dataset.source)
    except (TypeError, ValueError):
        return str(dataset.source or dataset.source_type or "")
    if isinstance(source, dict):
        for key in ("uri", "url", "path"):
            if source.get(key):
                return str(source[key])
    return str(dataset.source_type or "")


def champion_decision(client, name, version, result, config) -> tuple[bool, str]:
    """(move champion to `version`?, why) against the current champion's version tags."""
    current = alias_version(client, name, CHAMPION)
    if current is None:
        return True, "champion: first champion of this registered model"
    if current.version == version.version:
        return True, "champion: already the champion"
    label = f"v{current.version} ({current.tags.get('variant', '?')})"
    if version.tags.get("gates_passed") != "true":
        return False, f"not champion: did not pass the gates; {label} stays champion"
    metric = OBJECTIVE_METRICS[config.objective][0]
    new_value, old_value = (finite_number(result.get(metric)),
                            finite_number(current.tags.get(metric)))
    new_acc, old_acc = (finite_number(result.get("accuracy")),
                        finite_number(current.tags.get("accuracy")))
    if new_value is None or new_acc is None:
        return False, f"not champion: this version has no {metric}/accuracy to compare; {label} stays champion"
    if old_value is None or old_acc is None:
        return True, f"champion: {label} has no {metric}/accuracy tags to compare against"
    accuracy_gap_pts = (new_acc - old_acc) * 100
    comparison = (f"{metric} {new_value:g} vs {old_value:g}, accuracy {new_acc:.4f} vs "
                  f"{old_acc:.4f}")
    if new_value >= old_value:
        return False, (f"not champion: {label} is at least as good on {config.objective} "
                       f"({comparison})")
    if accuracy_gap_pts < -config.champion_accuracy_tolerance_pts - 1e-9:
        return False, (f"not champion: {-accuracy_gap_pts:.2f} pts less accurate than {label}, "
                       f"tolerance {config.champion_accuracy_tolerance_pts:g} ({comparison})")
    return True, f"champion: beats {label} on {config.objective} ({comparison})"
