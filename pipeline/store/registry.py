"""The MLflow model registry: a servable pyfunc model around a .tflite file, the registered model's
versions, and its aliases (`champion`, `challenger`).

MLflow has no TFLite flavor, so `TFLiteClassifier` is a `mlflow.pyfunc.PythonModel` running the
file on LiteRT (`pipeline.runtime.litert`: the CompiledModel it was measured on). Its input is
a batch of images (N, H, W, C), float32, in the model's own input domain (this pipeline's
loaders scale pixels to [0, 1]), the shape every other part of the pipeline holds images in; its
signature says so, and its stored serving input example (`serving_input_example.json`) is a ready
request body. Integer models (int8/int16x8 inputs) get their inputs quantized and their outputs dequantized here, so
every variant takes and returns floats. The output is a pandas DataFrame, one row per image:
`class` (int, the argmax of the scores), `label` (str, only when class names were given), and
`score_0` .. `score_<K-1>` (float32, the model's dequantized outputs, softmax probabilities for the
pipeline's models). Served with `mlflow models serve`, it answers
`{"inputs": [[[[0.0], ...]]]}` (N x H x W x C nested lists) with
`{"predictions": [{"class": 3, "label": "Dress", "score_0": ..., ...}]}`.

The model ships its own code (this module, `pipeline.selection.select` and `pipeline.errors`, staged as
`code_paths`) and needs only ai-edge-litert, numpy and pandas at serving time, not TensorFlow.

Each version's description is its model card, the registered model's says what it classifies
(`pipeline.selection.model_card`, from the runs' records); the version's measurements are also
metrics of its logged model, numbers where its tags are text.

Registration is idempotent: a version is identified by its tags `parent_run_id` + `variant`; a
retried task finds the version it created and only finishes what the first attempt left undone.
The tag `champion_decision`, written last, marks a finished registration.
"""
from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.pyfunc.model import PythonModel
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineInputError
from pipeline.runtime.litert import TFLiteRunner
from pipeline.selection.select import OBJECTIVE_METRICS, Selection, finite_number

log = logging.getLogger("pipeline.store.registry")

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

    from pipeline.config import PipelineConfig

# Test images stored with the model as its input example (and in its serving example).
EXAMPLE_IMAGES = 3
# The modules the pyfunc model needs when it is loaded elsewhere (keep their imports light).
SERVING_MODULES = ("__init__.py", "errors.py", "selection/__init__.py", "selection/select.py",
                   "runtime/__init__.py", "runtime/litert.py", "store/__init__.py",
                   "store/registry.py")
SERVING_PACKAGES = ("ai-edge-litert", "numpy", "pandas")
PYFUNC_NAME = "tflite_pyfunc"
# Copied from the variant's result onto its model version as tags (strings: the champion
# decision compares the current champion's), and as numbers onto its logged model (MLflow 3's
# metrics of a model, shown with the version's source model).
METRIC_TAGS = ("accuracy", "accuracy_delta_pts", "size_bytes", "gzip_size_bytes",
               "compression_ratio", "gzip_compression_ratio", "latency_ms_p50", "latency_ms_p90",
               "peak_memory_mb", "sparsity", "unique_weights_max")
CHAMPION, CHALLENGER = "champion", "challenger"


class TFLiteClassifier(PythonModel):
    """A pyfunc classifier around the artifact `tflite` (see the module docstring for the I/O).

    `model_config={"num_threads": N}` (at logging or `mlflow.pyfunc.load_model` time) sets the
    runtime's threads; the default, 1, matches how the pipeline measured latency."""

    def __init__(self, class_names: list[str] | None = None):
        self.class_names = list(class_names) if class_names else None
        self._runner: TFLiteRunner | None = None

    def __getstate__(self):
        return {"class_names": self.class_names}  # the runtime is rebuilt by load_context

    def __setstate__(self, state):
        self.class_names = state["class_names"]
        self._runner = None

    def load_context(self, context):
        num_threads = int((context.model_config or {}).get("num_threads", 1))
        self._runner = TFLiteRunner(context.artifacts["tflite"], num_threads=num_threads)
        # The runtime the pipeline evaluated and benchmarked this model on (CompiledModel).
        log.info("serving on LiteRT %s", self._runner.describe())

    # Annotated np.ndarray (MLflow infers no schema from it): the logged signature validates.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        if self._runner is None:
            raise RuntimeError("the model's context is not loaded (mlflow.pyfunc.load_model does it)")
        return self.frame(self._runner.scores(self._runner.images(model_input)))

    def frame(self, scores: np.ndarray) -> pd.DataFrame:
        classes = scores.argmax(axis=1).astype(np.int64)
        columns: dict[str, Any] = {"class": classes}
        if self.class_names:
            if len(self.class_names) != scores.shape[1]:
                raise PipelineInputError(f"{len(self.class_names)} class names for a model with "
                                         f"{scores.shape[1]} outputs")
            columns["label"] = [self.class_names[c] for c in classes]
        for k in range(scores.shape[1]):
            columns[f"score_{k}"] = scores[:, k]
        return pd.DataFrame(columns)


def log_tflite_pyfunc(tflite_path: str | Path, input_example: Any = None, name: str = "model",
                      class_names: list[str] | None = None, num_threads: int = 1) -> "ModelInfo":
    """Log `tflite_path` as a servable pyfunc model in the active run.

    `input_example`: a few images (default: one black image); the signature is a float32 tensor
    (-1, H, W, C)."""
    runner = TFLiteRunner(tflite_path, num_threads=num_threads)
    if input_example is None:
        input_example = np.zeros((1, *runner.image_shape), np.float32)
    example = runner.images(input_example)
    model = TFLiteClassifier(class_names)
    with warnings.catch_warnings():
        # "integer columns cannot represent missing values": `class` is never missing.
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(example, model.frame(runner.scores(runner.images(example))))
    from pipeline.store.tracking import explain_artifact_errors  # not needed (nor shipped) for serving
    active = mlflow.active_run()
    with tempfile.TemporaryDirectory() as staging, explain_artifact_errors(
            "pyfunc model", active.info.run_id if active else ""):
        return mlflow.pyfunc.log_model(
            name=name, python_model=model, artifacts={"tflite": str(tflite_path)},
            code_paths=[_stage_serving_code(Path(staging))], signature=signature,
            input_example=example, pip_requirements=serving_requirements(),
            model_config={"num_threads": num_threads})


def serving_requirements() -> list[str]:
    """What the pyfunc model needs at serving time, pinned to the versions it was built with."""
    return [f"{package}=={importlib.metadata.version(package)}" for package in SERVING_PACKAGES]


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

    version = _find_version(client, name, parent_run_id, selection.champion)
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
        return _summary(client, name, version, version.tags["champion_decision"], reused)

    if version.tags.get("gates_passed") == "true":
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    promote_it, decision = _champion_decision(client, name, version, result, config)
    if promote_it:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    _write_model_cards(client, name, version, result, selection, config, decision, class_names)
    client.set_model_version_tag(name, version.version, "champion_decision", decision)
    return _summary(client, name, version, decision, reused)


def promote(name: str, version: str | int, alias: str = CHAMPION,
            client: MlflowClient | None = None) -> dict[str, Any]:
    """Point `alias` of registered model `name` at an existing `version` that passed its gates:
    the rollback path (`promote(name, 3, "champion")`). Raises PipelineInputError otherwise."""
    client = client or MlflowClient()
    try:
        model_version = client.get_model_version(name, str(version))
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        known = sorted((int(v.version) for v in _versions(client, name)))
        raise PipelineInputError(
            f"registered model {name!r} has no version {version} "
            f"(versions: {', '.join(map(str, known)) or 'none'})") from None
    if model_version.tags.get("gates_passed") != "true":
        raise PipelineInputError(
            f"version {version} of {name!r} did not pass the quality gates (tag gates_passed="
            f"{model_version.tags.get('gates_passed')!r}): refusing to make it {alias!r}")
    previous = _alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, model_version.version)
    return {"name": name, "version": model_version.version, "alias": alias,
            "previous_version": previous.version if previous else None}


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
    from pipeline.selection.model_card import registered_model_description, version_card
    tags = client.get_model_version(name, version.version).tags
    lineage = _lineage(client, tags.get("parent_run_id"))
    child_run_id = tags.get("child_run_id") or version.run_id
    run_tags = client.get_run(child_run_id).data.tags if child_run_id else {}
    evaluation = _run_json(client, child_run_id, "evaluation.json") or {}
    per_class = evaluation.get("per_class_accuracy") or None
    card = version_card(result, selection, config, name=name, version=version.version,
                        decision=decision, lineage=lineage, run_tags=run_tags,
                        per_class_accuracy=per_class,
                        float_model_uri=tags.get("float_model_uri"))
    client.update_model_version(name, version.version, description=card)
    client.update_registered_model(name, description=registered_model_description(
        name, class_names or (list(per_class) if per_class else None),
        lineage.params.get("input_shape"), lineage))


def _lineage(client, parent_run_id: str | None):
    """The parent run's params, tags, metrics and dataset inputs (empty when it is gone)."""
    from pipeline.selection.model_card import Lineage
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
    import json
    try:
        source = json.loads(dataset.source)
    except (TypeError, ValueError):
        return str(dataset.source or dataset.source_type or "")
    if isinstance(source, dict):
        for key in ("uri", "url", "path"):
            if source.get(key):
                return str(source[key])
    return str(dataset.source_type or "")


def _run_json(client, run_id: str | None, artifact_file: str) -> Any | None:
    """A JSON artifact of a run read through `client`, or None when the run has none."""
    import json
    if not run_id or artifact_file not in {f.path for f in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as download_dir:
        return json.loads(Path(client.download_artifacts(run_id, artifact_file, download_dir))
                          .read_text())


def _champion_decision(client, name, version, result, config) -> tuple[bool, str]:
    """(move champion to `version`?, why) against the current champion's version tags."""
    current = _alias_version(client, name, CHAMPION)
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


def _find_version(client, name, parent_run_id, variant):
    matches = [v for v in _versions(client, name)
               if v.tags.get("parent_run_id") == parent_run_id and v.tags.get("variant") == variant]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def _versions(client, name):
    """Every version of `name` (paged), [] when the registered model does not exist yet."""
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def _alias_version(client, name, alias):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _summary(client, name, version, decision, reused) -> dict[str, Any]:
    aliases = sorted(client.get_model_version(name, version.version).aliases)
    champion = _alias_version(client, name, CHAMPION)
    return {"name": name, "version": version.version, "aliases": aliases,
            "champion_version": champion.version if champion else None, "decision": decision,
            "model_uri": f"models:/{name}/{version.version}", "reused": reused}


def _stage_serving_code(staging: Path) -> str:
    """Copy the modules the model imports into `staging/pipeline` (a minimal package)."""
    package = Path(__file__).resolve().parent.parent
    target = staging / package.name
    for module in SERVING_MODULES:
        (target / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package / module, target / module)
    return str(target)


def write_serving_example(model_uri: str, out_path: str | Path) -> Path:
    """The request body stored with a registered model (its input example), written to
    `out_path` for `curl -d @out_path .../invocations`."""
    from pipeline.store import tracking  # the project's tracking store when none is set
    tracking.client()
    try:
        local = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/serving_input_example.json")
    except MlflowException as error:
        raise PipelineInputError(f"cannot read {model_uri} from MLflow at "
                                 f"{tracking.tracking_uri()}: {str(error).splitlines()[0]} (run "
                                 "make run first, or give MODEL=models:/NAME@ALIAS)") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local, out)
    return out


def main(argv=None) -> int:
    """`python -m pipeline.store.registry example MODEL_URI OUT.json`: a ready request body."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "example":
        print("usage: python -m pipeline.store.registry example MODEL_URI OUT.json", file=sys.stderr)
        return 2
    try:
        print(f"request body for {args[1]}: {write_serving_example(args[1], args[2])}")
    except PipelineInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
