"""The pipeline's stages as plain functions of small JSON in, small JSON out.

Airflow tasks (dags/) and the command line (`python -m pipeline run`) call the same functions.
A stage receives the run context that `train` creates (`pipeline.contract.RunContext`: ids, the
settings, the URIs of the run's files; as the object or its JSON) and returns JSON-able dicts.
Files travel between stages through the run's artifact store (`pipeline.store.artifacts`: URIs
in, a local cached copy out), never as a path on the disk of the worker that wrote them: each
stage may run on another machine. A stage's own files
go to this machine's scratch folder, `local_run_dir(pipeline_run_id)`.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
import traceback
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import PipelineConfig, work_dir
from pipeline.contract import Reference, RunContext, VariantResult
from pipeline.files import atomic_path, save_array, write_bytes, write_json, write_text
from pipeline import progress
from pipeline.store import artifacts, tracking
from pipeline.errors import PipelineInputError, TechniqueError, first_line
from pipeline.variants import is_search, parse_variant, parse_variants

log = logging.getLogger("pipeline")

BASELINE_FOLDER = f"{artifacts.EXCHANGE}/baseline"
TRAIN_FOLDER = f"{artifacts.EXCHANGE}/train"
OPTIMIZED_FOLDER = f"{artifacts.EXCHANGE}/optimized"
SEARCH_FOLDER = f"{artifacts.EXCHANGE}/search"


class VariantFailed(RuntimeError):
    """One variant could not be produced or measured; the others go on."""
    failed_step: str | None = None  # the step of a combination at fault, when known


class VariantSkipped(RuntimeError):
    """The variant cannot apply to this model (the reason says why): recorded as `skipped`."""


def local_run_dir(pipeline_run_id: str) -> Path:
    """This machine's scratch folder for one pipeline run (a cache: nothing else reads it)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", pipeline_run_id)
    return work_dir() / safe


def open_dataset(run: RunContext):
    """The run's dataset as a streaming view, from the manifest `train` stored (no pixels)."""
    from pipeline.sources.data import Dataset
    return Dataset.load(artifacts.fetch(run.dataset_uri))


def recipes(variant_names: list[str]) -> list[str]:
    """The optimized Keras models the variants need, each trained once ('' = the baseline)."""
    unique: list[str] = []
    for variant in parse_variants(variant_names):
        if variant.recipe and variant.recipe not in unique:
            unique.append(variant.recipe)
    return unique


# --------------------------------------------------------------------------------------- train
def train(config_values: dict[str, Any], pipeline_run_id: str,
          tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Fetch and validate the input, train (or load) the model, and measure the float32 TFLite
    reference; every file later stages need goes to the run's artifact store."""
    from pipeline.sources import models
    from pipeline.sources.data import load_dataset
    from pipeline.runtime.evaluate import evaluate_tflite
    from pipeline.sources.inputs import fetch_input
    from pipeline.runtime.quantize import convert

    started = time.perf_counter()
    config = PipelineConfig.from_mapping(config_values)
    run_dir = local_run_dir(pipeline_run_id)
    inputs = run_dir / "input"
    shutil.rmtree(inputs, ignore_errors=True)  # a retry fetches the inputs afresh

    input_shape = num_classes = None
    kind: str = "tf_keras"
    user_model = model_file = None
    if config.model_path:
        model_file = fetch_input(config.model_path, inputs / "model", "model")
        kind = models.model_kind(model_file)
        user_model = models.load_model(model_file, allow_unsafe=config.allow_unsafe_model)
        input_shape, num_classes = models.io_shape(user_model, model_file)
    from pipeline.config import PIXEL_RANGES
    # Indexed, checked and split here; no pixels are copied: later stages open the manifest and
    # stream from the source (an s3:// source through their own cache). An MLflow URI (runs:/...)
    # is downloaded first; the manifest names it, so another worker downloads it too.
    from_mlflow = urlsplit(config.dataset).scheme not in ("", "s3", "file")
    dataset_source = str(fetch_input(config.dataset, inputs / "dataset", "dataset")) \
        if from_mlflow else config.dataset
    # Every later stage (training, calibration, evaluation, the served model's example) sees the
    # images in the range the model takes.
    dataset = load_dataset(dataset_source.removeprefix("file://"), input_shape=input_shape,
                           num_classes=num_classes, train_limit=config.train_limit,
                           test_limit=config.test_limit,
                           validation_fraction=config.validation_fraction, seed=config.seed,
                           pixel_range=PIXEL_RANGES[config.pixel_range],
                           origin=config.dataset if from_mlflow else None)
    for note in dataset.notes:
        log.warning("dataset: %s", note)
    dataset_path = dataset.save(run_dir / "dataset.json")
    progress.stage("data", f"{dataset.train_count} train / {dataset.val_count} validation / "
                   f"{dataset.test_count} test images, {dataset.num_classes} classes, "
                   f"{'x'.join(map(str, dataset.input_shape))} ({dataset.source})")

    parent_run_id = tracking.start_parent_run(
        config.experiment, pipeline_run_id,
        params={"dataset": config.dataset, "model": config.model_path or "default-cnn",
                "epochs": config.epochs if not config.model_path else None,
                "train_limit": config.train_limit, "test_limit": config.test_limit,
                "variants": ",".join(config.variants), "train_images": dataset.train_count,
                "validation_images": dataset.val_count, "test_images": dataset.test_count,
                "classes": dataset.num_classes, "dataset_digest": dataset.digest[:16],
                "input_shape": "x".join(map(str, dataset.input_shape)),
                "prune_sparsity": config.prune_sparsity, "cluster_count": config.cluster_count,
                "max_accuracy_drop_pts": config.max_accuracy_drop_pts,
                "objective": config.objective},
        tags={k: v for k, v in (tags or {}).items() if v})
    tracking.log_dataset_lineage(parent_run_id, dataset.manifest)

    with tracking.system_metrics(parent_run_id, "train"), \
            progress.training(parent_run_id, "baseline"):
        if user_model is None or model_file is None:
            model, base_model_uri = _train_or_reuse(dataset, config, run_dir, parent_run_id)
        else:
            model, base_model_uri = user_model, artifacts.store(parent_run_id, model_file,
                                                                BASELINE_FOLDER)
    technique_base_uri, techniques_unavailable = _technique_base(
        kind, model, base_model_uri, dataset, run_dir, parent_run_id)

    import numpy as np
    keras_predictions = models.predict_classes(model, dataset.batches("test"))
    predictions_path = run_dir / "keras_predictions" / "baseline.npy"
    save_array(predictions_path, keras_predictions)
    reference_path = run_dir / "reference" / "float32.tflite"
    if kind == "tflite" and model_file is not None:  # a float32 .tflite is its own reference
        write_bytes(reference_path, Path(model_file).read_bytes())
    else:
        source = {"saved_model_dir": str(model_file)} if kind == "saved_model" else {"model": model}
        convert("float32", reference_path, **source)
    reference = evaluate_tflite(str(reference_path), dataset.batches("test"), dataset.class_names,
                                keras_predictions)
    keras_accuracy = float(np.mean(keras_predictions == dataset.labels("test")))
    tracking.log_metrics(parent_run_id, {
        "keras_accuracy": keras_accuracy, "reference_accuracy": reference.accuracy,
        "reference_size_bytes": reference_path.stat().st_size,
        _stage_metric("train"): time.perf_counter() - started})
    log.info("baseline: Keras accuracy %.4f, float32 TFLite accuracy %.4f, %d bytes",
             keras_accuracy, reference.accuracy, reference_path.stat().st_size)
    _check_baseline(reference.accuracy, dataset.num_classes, config)
    context = RunContext(
        pipeline_run_id=pipeline_run_id, parent_run_id=parent_run_id,
        experiment=config.experiment, config=config, num_classes=dataset.num_classes,
        dataset_uri=artifacts.store(parent_run_id, dataset_path, TRAIN_FOLDER),
        base_model_uri=base_model_uri, base_model_kind=kind,
        technique_base_uri=technique_base_uri, techniques_unavailable=techniques_unavailable,
        reference=Reference(
            tflite_uri=artifacts.store(parent_run_id, reference_path, TRAIN_FOLDER),
            accuracy=reference.accuracy, size_bytes=reference_path.stat().st_size,
            keras_accuracy=keras_accuracy),
        baseline_predictions_uri=artifacts.store(parent_run_id, predictions_path, TRAIN_FOLDER))
    ctx = context.to_dict()
    write_json(run_dir / "context.json", ctx)  # for people and benchmarks on this machine
    return ctx


def _technique_base(kind: str, model, base_model_uri: str, dataset, run_dir: Path,
                    parent_run_id: str) -> tuple[str | None, str | None]:
    """(URI of the tf_keras model TF-MOT's techniques start from, None) or (None, why they cannot
    apply). A Keras 3 model is translated to tf_keras and checked numerically first."""
    if kind == "tf_keras":
        return base_model_uri, None
    if kind != "keras3":
        what = {"saved_model": "a SavedModel without Keras metadata (a graph, no layers to wrap)",
                "tflite": "a .tflite model (a graph, no layers to train)"}.get(kind, kind)
        return None, (f"the training-time techniques (prune, cluster, qat, qat4, distill) need a Keras "
                      f"model, and this is {what}; the post-training variants run")
    from pipeline.sources.keras3 import TranslationError, translate
    try:
        translated, max_abs_diff = translate(model, dataset.arrays("test", 64)[0])
    except TranslationError as error:
        return None, one_line(error)
    tracking.log_metrics(parent_run_id, {"keras3_translation_max_abs_diff": max_abs_diff})
    log.info("Keras 3 model translated to tf_keras for TF-MOT: outputs agree within %.2g on 64 "
             "test images", max_abs_diff)
    path = run_dir / "translated" / "model.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    translated.save(str(path))
    return artifacts.store(parent_run_id, path, f"{artifacts.EXCHANGE}/translated"), None


def _check_baseline(accuracy: float, num_classes: int, config: PipelineConfig) -> None:
    """Stop the run when the float32 model itself does not clear the accuracy floor: every
    variant of it would be measured against a broken reference."""
    from pipeline.config import accuracy_floor
    floor = accuracy_floor(config, num_classes)
    if accuracy < floor:
        chance = 1.0 / num_classes
        hint = (" — near chance: check that the labels match the model's classes and that the "
                f"model takes pixels in {config.pixel_range} (setting pixel_range: 0:1, 0:255 "
                "or -1:1)" if accuracy < 2 * chance else "")
        raise PipelineInputError(
            f"the float32 model reaches only {accuracy:.4f} accuracy on the test set, below the "
            f"floor {floor:.4f} (min_accuracy; chance is {chance:.4f}){hint}; train longer, fix "
            "the data, or lower min_accuracy")


def _train_or_reuse(dataset, config: PipelineConfig, run_dir: Path, parent_run_id: str):
    """Train the default CNN and store it, or reuse the one an earlier attempt of this run
    stored (a retry, possibly on another worker). Returns (model, its URI)."""
    from pipeline.sources.models import tf_keras
    from pipeline.techniques.train import train_baseline
    stored = f"{BASELINE_FOLDER}/baseline.keras"
    if artifacts.exists(parent_run_id, stored):
        uri = artifacts.uri_of(parent_run_id, stored)
        log.info("reusing the baseline trained by an earlier attempt: %s", uri)
        return tf_keras().models.load_model(str(artifacts.fetch(uri)), compile=False), uri
    model = train_baseline(dataset, config)
    path = run_dir / "baseline.keras"
    with atomic_path(path) as tmp:
        model.save(str(tmp))
    return model, artifacts.store(parent_run_id, path, BASELINE_FOLDER)


# ------------------------------------------------------------------------------------ optimize
def optimize(ctx: RunContext | dict, recipe: str) -> dict[str, Any]:
    """Train the optimized Keras model for `recipe` (e.g. 'prune+cluster') once per run.

    A collaborative recipe continues from its prefix's model ('prune+cluster' from 'prune'),
    training and recording that prefix first when no task has yet; the prefix's own task then
    finds its record and returns it. A failed prefix fails the recipe with the prefix's error.
    The record (`exchange/optimized/<recipe>.json` of the parent run) holds the URIs of the
    model and of its test-set predictions."""
    from pipeline.techniques.recipes import apply_recipe, parse_recipe

    run = RunContext.of(ctx)
    parent = run.parent_run_id
    record = _recipe_record(recipe)
    done = artifacts.load_json(parent, record)
    if done is not None and "error" not in done:
        return done
    if run.techniques_unavailable or not run.technique_base_uri:  # its variants are skipped
        skipped = {"recipe": recipe, "skipped": run.techniques_unavailable
                   or "no Keras model for the training-time techniques"}
        artifacts.store_json(parent, skipped, record)
        return skipped
    out_dir = local_run_dir(run.pipeline_run_id) / "optimized" / _safe(recipe)
    if is_search(recipe):
        return _finish_search(run, recipe, out_dir)
    try:
        techniques = parse_recipe(recipe)
        start = None
        if len(techniques) > 1:
            prefix = "+".join(techniques[:-1])
            try:
                start = (prefix, str(artifacts.fetch(optimize(run, prefix)["model_uri"])))
            except Exception as error:
                if getattr(error, "failed_step", None):  # it already names the step at fault
                    raise
                # Keep the kind: a TechniqueError is not worth a retry.
                kind = TechniqueError if isinstance(error, TechniqueError) else VariantFailed
                failed = kind(f"its first step {prefix!r} failed: {one_line(error)}")
                setattr(failed, "failed_step", prefix)
                raise failed from error
        started = time.perf_counter()  # this recipe's own training (a prefix times itself)
        dataset = open_dataset(run)
        progress.stage("optimize", f"{recipe}: fine-tuning on {dataset.train_count} images")
        with tracking.system_metrics(parent, _stage_name("optimize", recipe)), \
                progress.training(parent, f"optimize_{recipe}"):
            result = apply_recipe(recipe, str(artifacts.fetch(run.technique_base_uri)),
                                  dataset, run.config,
                                  str(out_dir), start=start)
    except Exception as error:
        artifacts.store_json(parent, {"recipe": recipe, "error": one_line(error)}, record)
        raise
    # A fresh folder per attempt: a URI, once handed on, always names the same files.
    folder = f"{OPTIMIZED_FOLDER}/{_safe(recipe)}/{uuid.uuid4().hex[:8]}"
    result["model_uri"] = artifacts.store(parent, result.pop("model_path"), folder)
    result["keras_predictions_uri"] = artifacts.store(
        parent, result.pop("keras_predictions_path"), folder)
    _publish_optimized(parent, recipe, result, started)
    return result


def _publish_optimized(parent: str, recipe: str, result: dict[str, Any], started: float) -> None:
    """The recipe's record for the variants (`exchange/optimized/<recipe>.json`), the settings
    each technique used and every attempt at them, readable in the MLflow UI beside the run
    (`optimize/<recipe>.json`), and the recipe's time."""
    artifacts.store_json(parent, result, _recipe_record(recipe))
    tracking.log_dict(parent, {key: result[key] for key in (
        "recipe", "settings", "attempts", "fits_budget", "base_val_accuracy",
        "budget_val_accuracy", "val_accuracy")}, f"optimize/{_safe(recipe)}.json")
    tracking.log_metrics(parent, {_stage_metric("optimize", recipe): time.perf_counter() - started})


# -------------------------------------------------------------------------------------- search
def search_ask(ctx: RunContext | dict, round_number: int) -> list[dict[str, Any]]:
    """The trials of one round of every `auto-*` variant's search (`techniques.search`), chosen
    by Optuna from the trials of the earlier rounds: [{recipe, trial, round, params, label}].
    Recorded in the parent run (`exchange/search/<recipe>/round-<n>.json`) for the next round."""
    from pipeline.techniques import search

    run = RunContext.of(ctx)
    if run.techniques_unavailable or not run.technique_base_uri:
        return []  # the auto-* variants are skipped with the reason (optimize records it)
    specs: list[dict[str, Any]] = []
    sampled: bool | None = None
    for recipe in (r for r in recipes(run.config.variants) if is_search(r)):
        folder = f"{SEARCH_FOLDER}/{_safe(recipe)}"
        asked = artifacts.load_json(run.parent_run_id, f"{folder}/round-{round_number}.json")
        if asked is None:
            if sampled is None:  # trials fine-tune on a sample when there are more images
                sampled = 0 < run.config.search_train_images < open_dataset(run).train_count
            history, first = _search_history(run, recipe, round_number)
            count = search.round_sizes(run.config.search_trials)[round_number]
            mode = parse_variant(recipe).quantization
            asked = [{"recipe": recipe, "trial": first + index, "round": round_number,
                      "params": trial["params"], "train_images": trial["train_images"],
                      "label": f"{recipe} trial {first + index}"}
                     for index, trial in enumerate(search.suggest(
                         mode, run.config, history, count, round_number, sampled=sampled))]
            artifacts.store_json(run.parent_run_id, asked, f"{folder}/round-{round_number}.json")
        specs.extend(asked)
    return specs


def _search_history(run: RunContext, recipe: str, rounds: int) -> tuple[list[dict], int]:
    """The trial records of a search's first `rounds` rounds (a trial that left no record
    counts as failed), and the number the next trial gets."""
    folder = f"{SEARCH_FOLDER}/{_safe(recipe)}"
    history: list[dict[str, Any]] = []
    for number in range(rounds):
        for spec in artifacts.load_json(run.parent_run_id, f"{folder}/round-{number}.json") or []:
            history.append(artifacts.load_json(run.parent_run_id, _trial_record(spec))
                           or {**spec, "error": "the trial left no record"})
    return history, len(history)


def _trial_record(spec: dict[str, Any]) -> str:
    return f"{SEARCH_FOLDER}/{_safe(spec['recipe'])}/trial-{spec['trial']}.json"


def search_trial(ctx: RunContext | dict, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one trial of a search: the chain with the trial's settings, converted and measured on
    the validation split, in an MLflow child run of its own (params, metrics, verdict). A failed
    trial is recorded (its error in the record and the run) and returned, not raised: the search
    goes on without it."""
    from pipeline.techniques import search

    run = RunContext.of(ctx)
    parent = run.parent_run_id
    done = artifacts.load_json(parent, _trial_record(spec))
    if done is not None:
        return done
    tags = {"search": spec["recipe"], "search_trial": spec["label"], "round": str(spec["round"])}
    run_id = tracking.child_run(parent, tags, key="search_trial", role="search_trial")
    tracking.log_params(run_id, spec["params"])
    record: dict[str, Any] = {**spec}
    try:
        if not run.technique_base_uri:
            raise TechniqueError(run.techniques_unavailable or "no Keras model to search on")
        dataset = open_dataset(run)
        progress.stage("search", f"{spec['label']} (round {spec['round'] + 1}): {spec['params']}")
        out_dir = local_run_dir(run.pipeline_run_id) / "search" / _safe(spec["recipe"]) / str(
            spec["trial"])
        with progress.training(run_id, "trial"):
            outcome = _fixed_anchor(run, spec, dataset, out_dir) or search.run_trial(
                parse_variant(spec["recipe"]).quantization,
                str(artifacts.fetch(run.technique_base_uri)), dataset, run.config,
                spec["params"], out_dir, train_images=spec.get("train_images"))
        record.update({key: value for key, value in outcome.items()
                       if key not in ("model_path", "tflite_path")},
                      model_uri=artifacts.store(parent, outcome["model_path"],
                                                _trial_record(spec).removesuffix(".json")))
        tracking.log_artifact(run_id, Path(outcome["tflite_path"]), "model")
        tracking.log_metrics(run_id, {key: float(outcome[key]) for key in (
            "val_accuracy", "base_val_accuracy", "budget_accuracy", "size_bytes",
            "gzip_size_bytes", "seconds", "train_images")})
        fidelity = (f"fine-tuned on a sample of {outcome['train_images']} images"
                    if outcome["sampled"] else "fine-tuned on all the images")
        verdict = (f"{outcome['val_accuracy']:.4f} validation accuracy (budget "
                   f"{outcome['budget_accuracy']:.4f}) at "
                   f"{outcome['gzip_size_bytes'] / 1024:.1f} KB gzipped, {fidelity}")
        tracking.set_tags(run_id, {"status": "ok", "sampled": str(outcome["sampled"]).lower(),
                                   "fits_budget": str(outcome["fits_budget"]).lower()})
        tracking.set_description(run_id, f"{spec['label']}: {verdict}")
        tracking.finish_run(run_id)
        progress.stage("search", f"{spec['label']}: {verdict}")
    except Exception as error:
        log.error("%s failed: %s", spec["label"], traceback.format_exc()[-2000:])
        record["error"] = one_line(error)
        tracking.fail_run(run_id, record["error"])
    artifacts.store_json(parent, record, _trial_record(spec))
    return record


def _fixed_anchor(run: RunContext, spec: dict[str, Any], dataset, out_dir: Path
                  ) -> dict[str, Any] | None:
    """The full-fidelity anchor (the configured settings on all the images) measured on the
    model the run's fixed variant of the same chain trained, when the run has that variant and
    none of the chain's techniques backed off from the configured settings: the same training,
    done once per run instead of twice. None otherwise (the trial trains its own)."""
    from pipeline.techniques import search

    variant = parse_variant(spec["recipe"])
    mode, chain = variant.quantization, variant.techniques  # auto-int4: int4, prune+cluster+qat4
    if "+".join(chain) not in recipes(run.config.variants) or not search.is_anchor(
            mode, run.config, spec):
        return None
    try:  # the chain and its prefixes, each trained once per run (or already by their tasks)
        records = [optimize(run, "+".join(chain[:length])) for length in range(1, len(chain) + 1)]
    except Exception as error:  # the trial trains the chain itself and records what happens
        log.warning("%s: the fixed %s model is unavailable (%s)", spec["label"], "+".join(chain),
                    one_line(error))
        return None
    if any("model_uri" not in record or any(
            record["settings"][technique] != attempts[0]["settings"]
            for technique, attempts in record.get("attempts", {}).items()) for record in records):
        return None  # a technique backed off: that model is not the configured settings'
    progress.stage("search", f"{spec['label']}: the fixed variant's {'+'.join(chain)} model "
                   "(the configured settings on all the images, trained once per run)")
    final = records[-1]
    return search.measure(mode, str(artifacts.fetch(final["model_uri"])), dataset, run.config,
                          out_dir, params=spec["params"],
                          base_accuracy=final["base_val_accuracy"])


def _finish_search(run: RunContext, recipe: str, out_dir: Path) -> dict[str, Any]:
    """optimize() of an `auto-*` recipe: the rounds the DAG has not run yet (all of them on the
    command line), then the best trial's model as the recipe's model, with the trial history and
    its picture (`search/<recipe>.png`, `.json`) on the parent run."""
    from pipeline.techniques import search
    from pipeline.techniques.persistence import load_optimized
    from pipeline.techniques.recipes import describe

    parent = run.parent_run_id
    try:
        started = time.perf_counter()
        for number in range(search.ROUNDS):
            for spec in search_ask(run, number):
                search_trial(run, spec)
        history, _ = _search_history(run, recipe, search.ROUNDS)
        dataset = open_dataset(run)

        def retrain(trial: dict[str, Any]) -> dict[str, Any]:
            assert run.technique_base_uri  # search_ask asks no trials without one
            progress.stage("search", f"{recipe}: training trial {trial['trial']}'s settings on "
                           f"all {dataset.train_count} training images")
            with progress.training(parent, f"optimize_{recipe}"):
                final = search.run_trial(
                    parse_variant(recipe).quantization,
                    str(artifacts.fetch(run.technique_base_uri)), dataset, run.config,
                    trial["params"], out_dir / f"final-{trial['trial']}",
                    train_images=search.ALL_IMAGES)
            progress.stage("search", f"{recipe}: trial {trial['trial']}'s settings on all the "
                           f"images: {final['val_accuracy']:.4f} validation accuracy (budget "
                           f"{final['budget_accuracy']:.4f})")
            retrained.append(trial["trial"])
            return final

        retrained: list[int] = []
        try:
            chosen, final = search.choose(history, retrain)
        except ValueError:
            raise TechniqueError(f"{recipe}: every trial of the search failed, the first with: "
                                 f"{history[0].get('error') if history else 'no trials'}"
                                 ) from None
        model_path = (str(artifacts.fetch(chosen["model_uri"])) if final is chosen
                      else final["model_path"])
        result = describe(load_optimized(model_path), dataset, out_dir, recipe, model_path)
    except Exception as error:
        artifacts.store_json(parent, {"recipe": recipe, "error": one_line(error)},
                             _recipe_record(recipe))
        raise
    folder = f"{OPTIMIZED_FOLDER}/{_safe(recipe)}/{uuid.uuid4().hex[:8]}"
    model_path = result.pop("model_path")
    result.update(
        model_uri=(chosen["model_uri"] if final is chosen
                   else artifacts.store(parent, model_path, folder)),
        keras_predictions_uri=artifacts.store(parent, result.pop("keras_predictions_path"), folder),
        base_val_accuracy=final["base_val_accuracy"], budget_val_accuracy=final["budget_accuracy"],
        fits_budget=final["fits_budget"],
        settings={"search": {**chosen["params"], "trial": chosen["trial"],
                             "trials": len(history),
                             "trial_train_images": chosen.get("train_images"),
                             "trial_val_accuracy": round(chosen["val_accuracy"], 4),
                             "fidelity_gap": round(search.fidelity_gap(history), 4),
                             "retrained": len(retrained),
                             "final_val_accuracy": round(final["val_accuracy"], 4)}},
        attempts={"search": [{"attempt": record["trial"] + 1, "round": record["round"] + 1,
                              "settings": record["params"],
                              "train_images": record.get("train_images"),
                              "val_accuracy": record.get("val_accuracy"),
                              "estimated_val_accuracy": record.get("estimated_val_accuracy"),
                              "gzip_size_bytes": record.get("gzip_size_bytes"),
                              "error": record.get("error")}
                             for record in search.estimated(history)]})
    _publish_optimized(parent, recipe, result, started)
    _log_picture(parent, f"{_safe(recipe)}.png", lambda path: search.plot_history(
        history, chosen, f"{recipe}: {len(history)} trials", path), "search")
    progress.stage("search", f"{recipe}: chose trial {chosen['trial']} of {len(history)} "
                   f"({chosen['params']}): {final['val_accuracy']:.4f} validation accuracy, "
                   f"{final['gzip_size_bytes'] / 1024:.1f} KB gzipped")
    return result


def _recipe_record(recipe: str) -> str:
    return f"{OPTIMIZED_FOLDER}/{_safe(recipe)}.json"


def _stage_metric(stage: str, recipe: str = "") -> str:
    """The metric with a stage's wall time: stage_seconds_train on the parent run,
    stage_seconds_optimize_prune_cluster there per recipe, stage_seconds_quantize/_evaluate/
    _benchmark on each variant's child run."""
    return f"stage_seconds_{_stage_name(stage, recipe)}"


def _stage_name(stage: str, recipe: str = "") -> str:
    """`train`, `optimize_prune_cluster`: a stage (and recipe) in metric names."""
    return "_".join([stage, *re.split(r"[^A-Za-z0-9]+", recipe)]).rstrip("_")


# ------------------------------------------------------------------------- per-variant stages
def quantize(ctx: RunContext | dict, variant_name: str) -> VariantResult:
    """Convert the variant's source model; creates the variant's child run and stores the
    .tflite as its artifact `model/model.tflite`. The converter makes float32, dynamic, float16,
    int8 and int16x8 from a Keras model or SavedModel; LiteRT Quantizer makes int4 and mixed from
    the float32 .tflite, and every mode from a bare .tflite input."""
    started = time.perf_counter()
    run = RunContext.of(ctx)
    variant = parse_variant(variant_name)
    run_id = tracking.child_run(run.parent_run_id, variant.tags())
    with _variant_failure(run_id, variant.name):
        from pipeline.runtime.quantize import convert
        from pipeline.variants import CONVERTER_MODES
        config = run.config
        mode = variant.quantization
        source, recipe_info = _conversion_source(run, variant.recipe)
        if recipe_info:
            _log_technique_settings(run, run_id, variant.recipe, recipe_info)
        dataset = calibration = None
        if mode in ("int8", "int16x8", "int4", "mixed"):
            dataset = open_dataset(run)
            calibration = dataset.calibration_batches(config.calibration_samples, config.seed)
        out = (local_run_dir(run.pipeline_run_id) / "variants" / _safe(variant.name)
               / "model.tflite")
        float_tflite = source.get("tflite_path")
        if mode in CONVERTER_MODES and float_tflite is None:
            convert(mode, out, representative_data=calibration,
                    qat="qat" in variant.techniques,
                    sparse=config.sparse_storage and "prune" in variant.techniques, **source)
        else:
            float_tflite = float_tflite or convert("float32", out.with_name("float32.tflite"),
                                                   **source)
            _quantize_tflite(mode, Path(float_tflite), out, calibration, dataset, config, run_id)
        if mode == "int8" and not variant.recipe:  # why int8 loses what it loses, per layer
            from pipeline.runtime import litert_quantizer as lq
            float_tflite = float_tflite or convert("float32", out.with_name("float32.tflite"),
                                                   **source)
            _log_sensitivity(run_id, lq.sensitivity(Path(float_tflite), "int8", calibration))
        tflite_uri = artifacts.store(run_id, out, "model")
        tracking.set_tags(run_id, {"recipe": variant.recipe})
        tracking.log_metrics(run_id, {_stage_metric("quantize"): time.perf_counter() - started})
        return VariantResult(
            **variant.tags(), child_run_id=run_id, tflite_uri=tflite_uri,  # type: ignore[typeddict-item]
            keras_predictions_uri=recipe_info.get("keras_predictions_uri")
            or run.baseline_predictions_uri)


def _log_technique_settings(run: RunContext, run_id: str, recipe: str, info: dict) -> None:
    """What each technique of the variant's recipe really used (chosen from the model and the
    data, after any back-off): params `technique.<name>.<setting>` of the child run, and every
    step's record (settings, attempts, validation accuracies) in `technique_settings.json`."""
    steps = recipe.split("+")
    records = [artifacts.load_json(run.parent_run_id, _recipe_record("+".join(steps[:i])))
               for i in range(1, len(steps))] + [info]
    params: dict[str, Any] = {}
    for record in records:
        for technique, values in ((record or {}).get("settings") or {}).items():
            for key, value in (values or {}).items():
                params[f"technique.{technique}.{key}"] = (
                    value if isinstance(value, (bool, int, float, str)) else json.dumps(value))
    tracking.log_params(run_id, params)
    tracking.log_dict(run_id, [{key: record.get(key) for key in (
        "recipe", "settings", "attempts", "fits_budget", "base_val_accuracy",
        "budget_val_accuracy", "val_accuracy")} for record in records if record],
        "technique_settings.json")


def _quantize_tflite(mode: str, float_tflite: Path, out: Path, calibration, dataset,
                     config: PipelineConfig, run_id: str) -> None:
    """A float32 .tflite -> `mode` through LiteRT Quantizer; int4 and mixed variants also get
    the per-layer sensitivity table."""
    from pipeline.runtime import litert_quantizer as lq
    if mode == "float32":
        write_bytes(out, float_tflite.read_bytes())
        return
    table = placement = None
    # mixed: as small as the budget allows, so int4 wherever LiteRT has an int4 kernel
    # (convolutions too, which XNNPACK runs slower than int8), int8 on the sensitive layers.
    options: dict = {"int4_ops": lq.INT4_CAPABLE_OPS if mode == "mixed" else lq.INT4_OPS}
    if mode in ("int4", "mixed"):
        if config.max_latency_ratio:  # the latency gate is on: int4 only where it stays fast
            options = _int4_placement(float_tflite, out.parent, options["int4_ops"],
                                      config.max_latency_ratio, config, run_id)
        table = lq.sensitivity(float_tflite, "int4", calibration, **options)
    if mode == "mixed":
        from pipeline.runtime.evaluate import evaluate_tflite

        def validation_accuracy(path: Path) -> float:  # the test set stays for the decision
            return evaluate_tflite(str(path), dataset.batches("val"),
                                   dataset.class_names).accuracy
        mixed = lq.quantize_mixed(float_tflite, out, accuracy_of=validation_accuracy,
                                  max_drop_pts=config.max_accuracy_drop_pts, table=table,
                                  **options)
        placement = mixed.layers
        tracking.log_dict(run_id, mixed.to_dict(), "mixed.json")
        tracking.set_tags(run_id, {"mixed_kept": ",".join(mixed.kept) or "none",
                                   "mixed_within_budget": str(mixed.within_budget).lower()})
    else:
        lq.quantize_tflite(mode, float_tflite, out, calibration=calibration, **options)
    if table is not None:
        _log_sensitivity(run_id, table, placement)


def _int4_placement(float_tflite: Path, work_dir: Path, int4_ops: tuple[str, ...],
                    max_latency_ratio: float, config: PipelineConfig,
                    run_id: str) -> dict:
    """The int4 modes' weights per op kind (`litert_quantizer` keyword arguments): per kind the
    smallest whose model is not slower than the float32 one by the latency gate's measure
    (`litert_quantizer.int4_placement`), recorded in the child run (`int4_placement.json`, tag
    `int4_placement`). Timed here, on this worker, as the benchmark stage will time the variant."""
    from pipeline.runtime import litert_quantizer as lq
    from pipeline.runtime.benchmark import measure
    from pipeline.selection.select import LATENCY_SLACK_MS

    def p50(path: Path) -> float:
        return measure(path, runs=config.latency_runs, warmup=config.latency_warmup).latency_ms_p50
    limit = p50(float_tflite) * max_latency_ratio + LATENCY_SLACK_MS
    placement = lq.int4_placement(float_tflite, work_dir, latency_of=p50, latency_limit_ms=limit,
                                  int4_ops=int4_ops)
    tracking.log_dict(run_id, placement.to_dict(), "int4_placement.json")
    tracking.set_tags(run_id, {"int4_placement": ",".join(
        f"{kind}={precision}" for kind, precision in placement.kinds().items())})
    return placement.options()


def _log_sensitivity(run_id: str, table: list[dict], placement: dict | None = None) -> None:
    """The per-layer table (`sensitivity.md` and `.json` in the child run) and its bar chart
    (`sensitivity.png`)."""
    from pipeline.selection.report import sensitivity_markdown, sensitivity_plot
    tracking.log_dict(run_id, table, "sensitivity.json")
    tracking.log_text(run_id, sensitivity_markdown(table, placement), "sensitivity.md")
    title = ("Per-layer sensitivity: each weighted layer quantized alone"
             + (" (colour: the mixed model's placement)" if placement is not None else ""))
    _log_picture(run_id, "sensitivity.png",
                 lambda path: sensitivity_plot(table, path, title, placement))


def _log_picture(run_id: str, name: str, draw, folder: str | None = None) -> None:
    """Draw a PNG with `draw(path)` and store it as the run's artifact `name` (in `folder`)."""
    import tempfile
    with tempfile.TemporaryDirectory() as scratch:
        tracking.log_artifact(run_id, draw(Path(scratch) / name), folder)


def evaluate(ctx: RunContext | dict, quantized: VariantResult) -> VariantResult:
    """Accuracy over the whole test set, on the runtime the benchmark measures."""
    started = time.perf_counter()
    run = RunContext.of(ctx)
    run_id = quantized["child_run_id"]
    with _variant_failure(run_id, quantized["variant"]):
        import numpy as np

        from pipeline.runtime.evaluate import evaluate_tflite
        dataset = open_dataset(run)
        keras_predictions = np.load(artifacts.fetch(quantized["keras_predictions_uri"]))
        evaluation = evaluate_tflite(str(artifacts.fetch(quantized["tflite_uri"])),
                                     dataset.batches("test"), dataset.class_names,
                                     keras_predictions)
        delta = (evaluation.accuracy - run.reference.accuracy) * 100.0
        tracking.log_metrics(run_id, {"accuracy": evaluation.accuracy, "accuracy_delta_pts": delta,
                                      "keras_agreement": evaluation.keras_agreement,
                                      _stage_metric("evaluate"): time.perf_counter() - started})
        tracking.log_dict(run_id, evaluation.to_dict(), "evaluation.json")
        # Which runtime computed the accuracy (the benchmark records its own below).
        tracking.set_tags(run_id, {"evaluation_runtime": evaluation.runtime.get("runtime"),
                                   "evaluation_kernels": evaluation.runtime.get("kernels")})
        _log_class_results(run_id, quantized["variant"], evaluation)
        return VariantResult(**quantized, accuracy=evaluation.accuracy, accuracy_delta_pts=delta,
                             keras_agreement=evaluation.keras_agreement)


def _log_class_results(run_id: str, variant: str, evaluation) -> None:
    """Per-class accuracy as metrics (`accuracy_class_<name>`) and the confusion matrix as an
    image (`confusion_matrix.png`) of the variant's child run."""
    from pipeline.selection.report import class_metric_names, confusion_plot
    class_names = list(evaluation.per_class_accuracy)
    tracking.log_metrics(run_id, dict(zip(class_metric_names(class_names),
                                          evaluation.per_class_accuracy.values())))
    if evaluation.confusion:
        _log_picture(run_id, "confusion_matrix.png", lambda path: confusion_plot(
            evaluation.confusion, class_names, path, f"{variant}: confusion matrix (test set)"))


def benchmark(ctx: RunContext | dict, evaluated: VariantResult) -> VariantResult:
    """Size, gzip size, latency and peak memory; closes the variant's child run."""
    started = time.perf_counter()
    run = RunContext.of(ctx)
    run_id = evaluated["child_run_id"]
    with _variant_failure(run_id, evaluated["variant"]):
        from pipeline.runtime.benchmark import measure, weight_stats
        tflite_path = artifacts.fetch(evaluated["tflite_uri"])
        measurement = measure(tflite_path, runs=run.config.latency_runs,
                              warmup=run.config.latency_warmup, num_threads=1)
        reference_bytes = run.reference.size_bytes
        metrics = {
            "size_bytes": measurement.size_bytes,
            "gzip_size_bytes": measurement.gzip_size_bytes,
            "compression_ratio": reference_bytes / measurement.size_bytes,
            "gzip_compression_ratio": reference_bytes / measurement.gzip_size_bytes,
            "latency_ms_p50": measurement.latency_ms_p50,
            "latency_ms_p90": measurement.latency_ms_p90,
            "peak_memory_mb": measurement.peak_memory_mb,
            **weight_stats(tflite_path),
        }
        tracking.log_metrics(run_id, {**metrics,
                                      _stage_metric("benchmark"): time.perf_counter() - started})
        # Which LiteRT runtime measured it (and why not the compiled one, if it fell back).
        tracking.set_tags(run_id, {"status": "ok", "runtime": measurement.runtime,
                                   "runtime_fallback_reason": measurement.fallback_reason})
        tracking.finish_run(run_id)
        result = VariantResult(**evaluated, **metrics, status="ok", error=None)  # type: ignore[typeddict-item]
        progress.variant_done(dict(result))
        return result


def _conversion_source(run: RunContext, recipe: str) -> tuple[dict, dict]:
    """Keyword arguments for quantize.convert: the baseline or the recipe's optimized model."""
    if not recipe:
        base = artifacts.fetch(run.base_model_uri)
        if run.base_model_kind == "tflite":
            return {"tflite_path": str(base)}, {}
        if run.base_model_kind == "saved_model":
            return {"saved_model_dir": str(base)}, {}
        from pipeline.sources.models import load_model
        return {"model": load_model(base, run.config.allow_unsafe_model)}, {}
    info = artifacts.load_json(run.parent_run_id, _recipe_record(recipe))
    if info is None:
        raise VariantFailed(f"optimization {recipe!r} produced no model (its task did not run)")
    if "skipped" in info:
        raise VariantSkipped(info["skipped"])
    if "error" in info:
        raise VariantFailed(f"optimization {recipe!r} failed: {info['error']}")
    from pipeline.techniques.persistence import load_optimized
    return {"model": load_optimized(artifacts.fetch(info["model_uri"]))}, info


class _variant_failure:
    """Record any error in the variant's child run (tag `error`, status FAILED), then re-raise."""

    def __init__(self, run_id: str, variant: str):
        self.run_id, self.variant = run_id, variant

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None:
            return False
        if isinstance(error, VariantSkipped):
            log.info("variant %s skipped: %s", self.variant, error)
            tracking.set_tags(self.run_id, {"status": "skipped", "skip_reason": one_line(error)})
            tracking.finish_run(self.run_id)
            return False
        log.error("variant %s failed: %s", self.variant,
                  "".join(traceback.format_exception(kind, error, tb))[-2000:])
        try:
            tracking.fail_run(self.run_id, one_line(error))
        except Exception as tracking_error:  # the original error matters more
            log.error("could not record the failure in MLflow: %s", tracking_error)
        return False


# ------------------------------------------------------------------------------ select/report
def results_of(ctx: RunContext | dict) -> list[dict[str, Any]]:
    """Every requested variant's result, read back from its MLflow child run (the source of
    truth whichever worker produced it); a variant without a finished run is reported failed."""
    context = RunContext.of(ctx)
    runs = {run.data.tags.get("variant"): run for run in tracking.child_runs(context.parent_run_id)}
    results = []
    for name in context.config.variants:
        variant = parse_variant(name)
        run = runs.get(variant.name)
        result: dict[str, Any] = {**variant.tags(), "child_run_id": run.info.run_id if run else None}
        if run is None:
            result.update(status="failed", error="did not run (an upstream task failed)")
        elif run.data.tags.get("status") == "skipped":
            result.update(status="skipped", error=run.data.tags.get("skip_reason", "skipped"))
        elif run.info.status == "FINISHED" and run.data.tags.get("status") == "ok":
            result.update(run.data.metrics, status="ok", error=None,
                          tflite_uri=f"runs:/{run.info.run_id}/model/model.tflite")
        else:
            result.update(run.data.metrics, status="failed",
                          error=run.data.tags.get("error", f"run ended {run.info.status.lower()}"))
        results.append(result)
    return results


def select(ctx: RunContext | dict) -> dict[str, Any]:
    """Gate every variant, choose the champion, write and log the report on the parent run."""
    from pipeline.selection.report import pareto_plot, summary_markdown, verdict
    from pipeline.selection.select import choose

    run = RunContext.of(ctx)
    config = run.config
    results = results_of(run)
    selection = choose(results, config, run.num_classes)
    run_dir = local_run_dir(run.pipeline_run_id)
    report_dir = run_dir / "report"
    markdown = (summary_markdown(results, selection) + _search_sections(run)
                + _sensitivity_sections(results, selection))
    write_text(report_dir / "summary.md", markdown)
    ok = [r for r in results if r.get("status") == "ok"]
    if ok:  # the budget line: the float32 accuracy less max_accuracy_drop_pts
        reference = ok[0]["accuracy"] - ok[0]["accuracy_delta_pts"] / 100.0
        pareto_plot(results, selection, report_dir / "pareto.png",
                    gate_accuracy=reference - config.max_accuracy_drop_pts / 100.0)
    parent = run.parent_run_id
    for name in ("summary.md", "pareto.png"):
        if (report_dir / name).exists():
            tracking.log_artifact(parent, report_dir / name, "report")
    decision = selection.to_dict()
    failed = [r["variant"] for r in results if r.get("status") == "failed"]
    selected = {"selection": decision, "summary_markdown": markdown, "failed_variants": failed,
                "variants_ok": len(ok), "variants_total": len(results)}
    tracking.log_dict(parent, {**selected, "results": results}, SELECTION_RECORD)
    tracking.set_tags(parent, {"champion_variant": selection.champion or "none",
                               "selection_reason": selection.reason})
    # The runs' descriptions in the MLflow UI: the table on the parent, a verdict on each child.
    tracking.set_description(parent, summary_markdown(results, selection), "report/summary.md")
    for result in results:
        if result.get("child_run_id"):
            tracking.set_description(result["child_run_id"], verdict(result, selection))
    log.info("selection: %s", selection.reason)
    write_json(run_dir / "select.json", {**selected, "results": results})
    return selected


def _search_sections(run: RunContext) -> str:
    """Per auto-* variant: the settings its search chose and every trial (validation split),
    beside the picture `search/<recipe>.png` of the parent run."""
    sections = []
    for recipe in (r for r in recipes(run.config.variants) if is_search(r)):
        record = artifacts.load_json(run.parent_run_id, _recipe_record(recipe)) or {}
        chosen = (record.get("settings") or {}).get("search")
        if not chosen:
            continue
        rows = "".join(
            f"| {a['attempt'] - 1} | {a['round']} | "
            + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in a["settings"].items())
            + (f" | failed: {a['error']} | | | | |\n" if a.get("error") else
               f" | {a.get('train_images') or 'all'} | {a['val_accuracy']:.4f} | "
               f"{a.get('estimated_val_accuracy') or a['val_accuracy']:.4f} | "
               f"{a['gzip_size_bytes'] / 1024:.1f} KB | "
               f"{'**chosen**' if a['attempt'] - 1 == chosen['trial'] else ''} |\n")
            for a in (record.get("attempts") or {}).get("search", []))
        sections.append(
            f"\n## Search: `{recipe}`\n\nOptuna (TPE) over the chain's settings, smallest gzip "
            f"size with validation accuracy >= {record.get('budget_val_accuracy', 0):.4f} "
            f"(the base model's {record.get('base_val_accuracy', 0):.4f} less "
            f"max_accuracy_drop_pts). A trial fine-tuned on a sample is judged by its accuracy "
            f"plus the fidelity gap ({chosen.get('fidelity_gap', 0):+.4f}: the configured "
            f"settings on all the images less on the sample); the chosen settings were trained "
            f"on all the images ({chosen.get('retrained', 0)} retraining(s)) and reached "
            f"{chosen.get('final_val_accuracy', 0):.4f}. Picture: "
            f"`search/{_safe(recipe)}.png`.\n\n"
            "| trial | round | settings | images | validation accuracy | estimated (all images) "
            "| gzip size | |\n|---:|---:|:---|---:|---:|---:|---:|:---|\n" + rows)
    return "".join(sections)


def _sensitivity_sections(results: list[dict], selection) -> str:
    """The per-layer sensitivity tables of the plain int8 variant and of the champion (when it
    has one): where quantization costs accuracy."""
    from pipeline.selection.report import sensitivity_markdown
    shown = [r for r in results if r.get("status") == "ok" and r.get("child_run_id")
             and (r["variant"] == "int8" or r["variant"] == selection.champion)]
    sections = []
    for result in shown:
        table = artifacts.load_json(result["child_run_id"], "sensitivity.json")
        if table:
            placement = (artifacts.load_json(result["child_run_id"], "mixed.json") or {}).get("layers")
            sections.append(f"\n## Per-layer sensitivity: `{result['variant']}`\n\nEach weighted "
                            "layer quantized alone; lower SNR = more sensitive.\n\n"
                            + sensitivity_markdown(table, placement))
    return "".join(sections)


SELECTION_RECORD = "report/selection.json"
REGISTER_RECORD = "report/register.json"


def register(ctx: RunContext | dict, selected: dict) -> dict[str, Any]:
    """Register the champion as a servable pyfunc model version and move aliases; close the
    parent run."""
    from pipeline.sources.inputs import FLOAT_MODEL_TAG
    from pipeline.selection.champion import register_champion
    from pipeline.serving import EXAMPLE_IMAGES
    from pipeline.selection.select import Selection

    run = RunContext.of(ctx)
    dataset = open_dataset(run)  # a few test images: the served model's input example
    selection = Selection.from_dict(selected["selection"])
    results = {r["variant"]: r for r in results_of(run)}
    outcome = register_champion(selection, results, run.config, parent_run_id=run.parent_run_id,
                                airflow_run_id=run.pipeline_run_id,
                                input_example=dataset.arrays("test", EXAMPLE_IMAGES)[0],
                                class_names=dataset.class_names,
                                extra_tags={FLOAT_MODEL_TAG: run.base_model_uri})
    tracking.set_tags(run.parent_run_id, {
        "registered_version": outcome.get("version", "none"),
        "register_decision": outcome.get("decision") or outcome.get("reason", "")})
    tracking.log_dict(run.parent_run_id, outcome, REGISTER_RECORD)
    tracking.finish_run(run.parent_run_id)
    write_json(local_run_dir(run.pipeline_run_id) / "register.json", outcome)
    return outcome


# --------------------------------------------------------------------------------- utilities
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name) or "baseline"


def one_line(error: BaseException) -> str:
    """The first line of an error; our own errors are already phrased for the user."""
    ours = isinstance(error, (PipelineInputError, VariantFailed, VariantSkipped,
                              tracking.TrackingServerUnreachable, tracking.ArtifactStoreError))
    return first_line(error, with_type=not (ours and str(error).strip()), limit=500)
