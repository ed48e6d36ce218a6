"""The technique registry and recipes. Every technique module has one interface (`Technique`):

    NAME: str
    apply(model, dataset, config, *, applied: tuple[str, ...]) -> model

`model` is a tf_keras classifier; `applied` names the techniques already applied to it, in order,
so clustering can keep pruning's zeros and QAT can keep both. `apply` returns the fine-tuned model
ready for TFLite conversion: TF-MOT's training wrappers are stripped, except QAT's, which the
converter needs to produce int8 kernels. `settings` and `relax` are what `backoff` needs to retry
with more conservative settings.

`apply_recipe` runs a recipe such as "prune+cluster+qat" on a fresh copy of the base model (or
continues from a saved shorter recipe, e.g. the "prune+cluster" model), saves the result and
returns small JSON-able figures. `TECHNIQUES` maps recipe names to modules: a new
technique is one module plus one line there (and its place in variants.OPTIMIZATION_ORDER).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.errors import TechniqueError
from pipeline.files import save_array
from pipeline.sources.models import load_model, model_kind, predict_classes
from pipeline.techniques import backoff, clustering, distillation, pruning, qat, qat4
from pipeline.techniques.persistence import load_optimized, save_optimized
from pipeline.techniques.stats import keras_params, kernel_stats
from pipeline.techniques.train import set_seed
from pipeline.techniques.validation import validation_accuracy
from pipeline.variants import OPTIMIZATION_ORDER, qat_problem

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.sources.data import Dataset


class Technique(Protocol):
    """What every technique module provides (a module satisfies this protocol)."""

    NAME: str

    def settings(self, model: Any, dataset: Dataset, config: PipelineConfig) -> dict[str, Any]:
        """The settings it will use on this model and data (config fields, plus figures for the
        record)."""
        ...

    def relax(self, settings: dict[str, Any]) -> dict[str, Any] | None:
        """Config fields for the next, more conservative attempt; None when there is nothing
        left to give."""
        ...

    def apply(self, model: Any, dataset: Dataset, config: PipelineConfig, *,
              applied: tuple[str, ...] = ()) -> Any:
        """The fine-tuned tf_keras model (see the module docstring)."""
        ...


TECHNIQUES: dict[str, Technique] = {
    "distill": distillation, "prune": pruning, "cluster": clustering, "qat": qat, "qat4": qat4}


def parse_recipe(recipe: str) -> tuple[str, ...]:
    """'cluster+prune' -> ('prune', 'cluster'): validated names in OPTIMIZATION_ORDER."""
    names = [name.strip() for name in recipe.split("+") if name.strip()]
    if not names:
        raise TechniqueError(f"empty recipe {recipe!r}: name techniques joined by '+', e.g. "
                             "'prune+cluster+qat'")
    unknown = [name for name in names if name not in TECHNIQUES]
    if unknown:
        raise TechniqueError(f"unknown technique {unknown[0]!r} in recipe {recipe!r}; known: "
                             f"{', '.join(TECHNIQUES)}")
    if len(set(names)) != len(names):
        raise TechniqueError(f"recipe {recipe!r} repeats a technique")
    problem = qat_problem(names)
    if problem:
        raise TechniqueError(f"recipe {recipe!r}: {problem}")
    return tuple(sorted(names, key=OPTIMIZATION_ORDER.index))


def apply_recipe(recipe: str, base_model_path: str, dataset, config, out_dir, *,
                 start: tuple[str, str] | None = None) -> dict:
    """Apply the recipe's techniques in order to a fresh copy of the base model and save it.

    `start` = (prefix recipe, its saved model path) continues from an earlier result instead:
    'prune+cluster' started from ('prune', path) only clusters, so collaborative recipes do not
    redo the techniques they share with shorter recipes of the same run.

    Each technique checks its result on the validation split and backs off within
    `config.technique_retries` retries when it fell far below the budget (`backoff`).

    Returns {recipe, model_path, params, macs, sparsity, unique_weights_max,
    unique_weights_per_channel_max, val_accuracy, keras_test_accuracy, keras_predictions_path,
    base_val_accuracy, budget_val_accuracy, fits_budget, settings, attempts}: kernel figures as
    in `kernel_stats` (through QAT's wrappers), params as in `keras_params`, accuracies of the
    Keras model, its predicted test classes saved as .npy; the base model's validation accuracy
    and the lowest an attempt may reach; per technique of this call, the settings it kept and
    every attempt's settings and validation accuracy; `fits_budget` False when a technique's
    best attempt stayed under the budget.
    """
    techniques = parse_recipe(recipe)
    name = "+".join(techniques)
    applied: tuple[str, ...] = ()
    if start is None:
        model = _load_base(base_model_path, name, config)
    else:
        applied = parse_recipe(start[0])
        if techniques[:len(applied)] != applied or applied == techniques:
            raise ValueError(f"{start[0]!r} is not a shorter prefix of recipe {name!r}")
        model = load_optimized(start[1])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_accuracy = validation_accuracy(
        _load_base(base_model_path, name, config) if start else model, dataset)
    budget = backoff.accuracy_budget(base_accuracy, config, dataset.num_classes)
    settings, attempts, fits = {}, {}, True
    for technique in techniques[len(applied):]:
        outcome = _apply_within_budget(technique, model, dataset, config, applied, budget,
                                       out_dir / f"{name}.{technique}-input")
        model = outcome.model
        settings[technique], attempts[technique] = outcome.settings, outcome.attempts
        fits = fits and outcome.fits
        applied += (technique,)

    return {**describe(model, dataset, out_dir, name, save_optimized(model, out_dir / name)),
            "base_val_accuracy": base_accuracy, "budget_val_accuracy": budget,
            "fits_budget": fits, "settings": settings, "attempts": attempts}


def describe(model, dataset, out_dir: Path, name: str, model_path: str) -> dict[str, Any]:
    """The figures every optimized model's record holds: {recipe, model_path, params, macs,
    sparsity, unique_weights_max, unique_weights_per_channel_max, val_accuracy,
    keras_test_accuracy, keras_predictions_path} (its test predictions saved as .npy)."""
    from sklearn.metrics import accuracy_score

    test_predictions = predict_classes(model, dataset.batches("test"))
    predictions_path = str(save_array(out_dir / f"{name}.test-predictions.npy", test_predictions))
    stats = kernel_stats(model)
    return {
        "recipe": name,
        "model_path": model_path,
        "params": keras_params(model),
        "macs": stats["macs"],
        "sparsity": stats["sparsity"],
        "unique_weights_max": stats["unique_weights_max"],
        "unique_weights_per_channel_max": stats["unique_weights_per_channel_max"],
        "val_accuracy": float(accuracy_score(dataset.labels("val"),
                                             predict_classes(model, dataset.batches("val")))),
        "keras_test_accuracy": float(accuracy_score(dataset.labels("test"), test_predictions)),
        "keras_predictions_path": predictions_path,
    }


def _apply_within_budget(technique: str, model, dataset, config, applied: tuple[str, ...],
                         budget: float, scratch: Path) -> backoff.Outcome:
    """`technique` applied to `model` through `backoff.fit_within_budget`. Each attempt starts
    from its own copy of `model` (TF-MOT's wrappers change the model they are given), reloaded
    from `scratch` when there may be a retry."""
    module = TECHNIQUES[technique]
    source = save_optimized(model, scratch) if config.technique_retries else None

    def attempt(settings: dict):
        set_seed(config.seed)
        given = load_optimized(source) if source else model
        return module.apply(given, dataset, backoff.configured(config, settings),
                            applied=applied)

    return backoff.fit_within_budget(
        attempt, module.settings(model, dataset, config), module.relax,
        score=lambda tuned: validation_accuracy(tuned, dataset), budget=budget,
        retries=config.technique_retries,
        settle=lambda settings: module.settings(model, dataset,
                                                backoff.configured(config, settings)))


def _load_base(path, recipe: str, config):
    kind = model_kind(path)
    if kind != "tf_keras":
        what = "a Keras 3 model" if kind == "keras3" else "a SavedModel without Keras metadata"
        raise TechniqueError(
            f"{recipe}: needs a tf_keras (Keras 2) model, because TF Model Optimization only "
            f"works with Keras 2, but {Path(path).name} is {what}. Save the model with tf_keras "
            "(TF_USE_LEGACY_KERAS=1), or choose variants without optimizations (e.g. int8)")
    # A fresh copy on every call: TF-MOT's wrappers change the model they are given.
    return load_model(path, allow_unsafe=config.allow_unsafe_model)
