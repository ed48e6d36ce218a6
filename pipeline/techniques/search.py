"""Accuracy-aware search: the `auto-<mode>` variants. Instead of fixed settings (tuned on one
model), Optuna's TPE sampler searches the settings of a technique chain (variants.SEARCH_CHAINS:
prune+cluster+qat4 for int4, prune+cluster+qat for int8, prune+cluster for dynamic) for the
smallest gzipped model of that mode whose validation accuracy, measured through LiteRT on the
converted .tflite, stays within `max_accuracy_drop_pts` of the base model's. The test split is
never looked at: the quality gates decide on it afterwards, as for every variant.

The search runs in ROUNDS rounds. Each round, `suggest` rebuilds the study from the finished
trials' records (so no study database has to be shared between workers) and asks for the next
trials; `run_trial` runs one of them. In the DAG every trial is a mapped task on the `training`
queue, so Celery workers share a search; `python -m pipeline run` runs the same rounds in turn.
Trials fine-tune on a sample of the training images (`search_train_images`: a cheaper
estimate, as multi-fidelity searches do). A sample is biased: fine-tuned on fewer images, the
same settings land lower than on all of them, and judged against the full budget the sample
would reject settings that fit. So the first round holds two anchors, the configured (fixed)
settings fine-tuned on all the images and on the sample; the difference of their validation
accuracies (the fidelity gap) is added to every sampled trial's accuracy to estimate what it
would reach on all the images. TPE's constraint (budget - estimated accuracy <= 0, Optuna's
trial constraints) and the choice use that estimate. `choose` then trains the smallest
estimated fit on all the images and keeps it only when that verified model fits (up to
VERIFICATIONS tries, smallest first); else the full-fidelity anchor, when it fits. The search
can therefore never ship anything worse than the fixed settings trained as usual. When the run
also has the fixed variant of the same chain (`prune+cluster+qat4-int4` beside `auto-int4`), the
full-fidelity anchor is that variant's model, measured (`measure`), not trained a second time.

A search also shares the per-technique back-off's rules (`backoff.configured`): a trial's
settings are config fields, and each technique sizes its fine-tuning to the data as usual.
"""
from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from pipeline.techniques.backoff import configured
from pipeline.variants import SEARCH_CHAINS
from pipeline.variants import SEARCH_ROUNDS as ROUNDS
SPARSITY_RANGE = (0.5, 0.97)
PRUNE_BLOCKS = (1, 4, 16)
# How a kernel's pruning target falls with its size (pruning.layer_plan): 0.25 suits a model whose
# weights sit in one large layer (the default CNN's Dense head), 0 (every kernel the same target)
# one whose weights are spread over many convolutions (MobileNetV2: at 0.8, 7.0x gzip at -0.5 pts).
SIZE_EXPONENTS = (0.0, 0.25)
CLUSTER_COUNTS = (8, 16, 32)
EPOCH_FACTORS = (1, 2)
ALL_IMAGES = 0  # a trial's train_images: fine-tune on every training image (full fidelity)
VERIFICATIONS = 2  # sampled trials trained again on all the images before falling back


def space(mode: str) -> dict[str, Any]:
    """The searched settings of `mode`'s chain, as Optuna distributions."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    chain = SEARCH_CHAINS[mode]
    distributions: dict[str, Any] = {}
    if "prune" in chain:
        distributions["prune_sparsity"] = FloatDistribution(*SPARSITY_RANGE)
        distributions["prune_block"] = CategoricalDistribution(PRUNE_BLOCKS)
        distributions["prune_size_exponent"] = CategoricalDistribution(SIZE_EXPONENTS)
    if "cluster" in chain:
        distributions["cluster_count"] = CategoricalDistribution(CLUSTER_COUNTS)
    distributions["epochs_factor"] = CategoricalDistribution(EPOCH_FACTORS)
    return distributions


def configured_trial(mode: str, config) -> dict[str, Any]:
    """The configured settings as a trial of the search (its first), clipped into the space."""
    first: dict[str, Any] = {}
    chain = SEARCH_CHAINS[mode]
    if "prune" in chain:
        low, high = SPARSITY_RANGE
        first["prune_sparsity"] = min(high, max(low, config.prune_sparsity))
        first["prune_block"] = min(PRUNE_BLOCKS, key=lambda block: abs(block - config.prune_block))
        first["prune_size_exponent"] = min(
            SIZE_EXPONENTS, key=lambda e: abs(e - config.prune_size_exponent))
    if "cluster" in chain:
        first["cluster_count"] = min(CLUSTER_COUNTS,
                                     key=lambda count: abs(count - config.cluster_count))
    first["epochs_factor"] = 1
    return first


def round_sizes(trials: int) -> list[int]:
    """`trials` split over ROUNDS rounds, the earlier rounds taking the remainder."""
    base, extra = divmod(trials, ROUNDS)
    return [base + (1 if number < extra else 0) for number in range(ROUNDS)]


def suggest(mode: str, config, history: list[dict[str, Any]], count: int,
            round_number: int, *, sampled: bool = False) -> list[dict[str, Any]]:
    """The next `count` trials, [{params, train_images}], given the finished ones (`run_trial`'s
    records; a record with an `error` counts as a failed trial). `sampled`: the dataset has more
    training images than `search_train_images`, so trials fine-tune on that sample (train_images)
    and the first round holds the two anchors (the configured settings on all the images and on
    the sample; the round grows to hold them)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = space(mode)
    sample = int(config.search_train_images) if sampled else ALL_IMAGES
    sampler = optuna.samplers.TPESampler(
        seed=config.seed + round_number, n_startup_trials=max(2, config.search_trials // 3),
        multivariate=True, constant_liar=True)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    for record in estimated(history):
        params = {name: record["params"][name] for name in distributions
                  if name in record.get("params", {})}
        if len(params) != len(distributions):
            continue  # a record of another space (settings changed between rounds)
        if record.get("error"):
            study.add_trial(create_trial(state=TrialState.FAIL, params=params,
                                         distributions=distributions))
        else:
            study.add_trial(create_trial(
                value=float(record["gzip_size_bytes"]), params=params, distributions=distributions,
                constraints={"accuracy": record["budget_accuracy"]
                             - record["estimated_val_accuracy"]}))
    trials: list[dict[str, Any]] = []
    if not history:
        anchor = configured_trial(mode, config)
        trials.append({"params": anchor, "train_images": ALL_IMAGES})
        if sampled:
            trials.append({"params": anchor, "train_images": sample})
        study.enqueue_trial(anchor)
        study.ask(distributions)  # the anchor's place in the study, so TPE's next asks differ
    trials += [{"params": study.ask(distributions).params, "train_images": sample}
               for _ in range(count - len(trials))]
    return trials


def fidelity_gap(history: list[dict[str, Any]]) -> float:
    """How much more validation accuracy the same settings reach fine-tuned on all the images
    than on the sample: the anchors' difference (0 without both anchors)."""
    finished = [record for record in history if not record.get("error")]
    for full in (record for record in finished if not record.get("sampled")):
        for part in (record for record in finished if record.get("sampled")):
            if part["params"] == full["params"]:
                return float(full["val_accuracy"] - part["val_accuracy"])
    return 0.0


def estimated(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with `estimated_val_accuracy` (a sampled trial's accuracy plus the fidelity
    gap; a full-fidelity trial's own) and `fits` (that estimate within the budget)."""
    gap = fidelity_gap(history)
    out = []
    for record in history:
        if record.get("error"):
            out.append(record)
            continue
        guess = record["val_accuracy"] + (gap if record.get("sampled") else 0.0)
        out.append({**record, "estimated_val_accuracy": float(guess),
                    "fits": bool(guess >= record["budget_accuracy"])})
    return out


def trial_config(config, params: dict[str, Any]):
    """`config` with a trial's settings: no back-off inside a trial (the search is the back-off)."""
    factor = int(params.get("epochs_factor", 1))
    settings = {name: value for name, value in params.items() if name != "epochs_factor"}
    settings.update(prune_epochs=config.prune_epochs * factor,
                    finetune_epochs=config.finetune_epochs * factor, technique_retries=0)
    return configured(config, settings)


def is_anchor(mode: str, config, trial: dict[str, Any]) -> bool:
    """Whether `trial` ({params, train_images}) is the full-fidelity anchor trained exactly as the
    fixed variant of `mode`'s chain is: the configured settings (none clipped into the searched
    space) on all the training images."""
    params = trial["params"]
    if trial.get("train_images") != ALL_IMAGES or params != configured_trial(mode, config):
        return False
    settings = trial_config(config, params)
    return all(getattr(settings, name) == getattr(config, name)
               for name in params if name != "epochs_factor")


def run_trial(mode: str, base_model_path: str, dataset, config, params: dict[str, Any],
              out_dir: Path, *, train_images: int | None = None) -> dict[str, Any]:
    """Apply `mode`'s chain with the trial's settings to a fresh copy of the base model, convert
    it to `mode` and measure it (`measure`). `train_images` (default
    `config.search_train_images`; ALL_IMAGES = 0 = all): the fine-tuning sees a sample of that
    many training images, a cheaper estimate of the whole (multi-fidelity search); validation is
    always the whole split."""
    from pipeline.sources.models import load_model
    from pipeline.techniques.persistence import save_optimized
    from pipeline.techniques.recipes import TECHNIQUES
    from pipeline.techniques.train import set_seed
    from pipeline.techniques.validation import validation_accuracy

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    trial = trial_config(config, params)
    sample = dataset.sample_train(
        config.search_train_images if train_images is None else train_images, config.seed)
    model = load_model(base_model_path, allow_unsafe=config.allow_unsafe_model)
    base_accuracy = validation_accuracy(model, sample)
    applied: tuple[str, ...] = ()
    for name in SEARCH_CHAINS[mode]:
        set_seed(config.seed)
        model = TECHNIQUES[name].apply(model, sample, trial, applied=applied)
        applied += (name,)
    return measure(mode, save_optimized(model, out_dir / "model"), dataset, config, out_dir,
                   params=params, base_accuracy=base_accuracy, train_images=sample.train_count,
                   started=started, model=model)


def measure(mode: str, model_path: str, dataset, config, out_dir: Path, *,
            params: dict[str, Any], base_accuracy: float, train_images: int | None = None,
            started: float | None = None, model=None) -> dict[str, Any]:
    """A trial's record for the optimized Keras model at `model_path`, converted to `mode`:
    {params, train_images, sampled, val_accuracy, base_val_accuracy, budget_accuracy,
    fits_budget, size_bytes, gzip_size_bytes, seconds, model_path, tflite_path}. Validation
    accuracy through LiteRT on the whole validation split; fits_budget is this model's own
    accuracy against the budget (`estimated` corrects a sampled one). `train_images`: how many
    the model was fine-tuned on (default all of `dataset`'s); `model`: that model, when it is
    in memory already (else it is loaded)."""
    from pipeline.runtime.benchmark import gzip_size
    from pipeline.runtime.evaluate import evaluate_tflite
    from pipeline.techniques.persistence import load_optimized

    started = time.perf_counter() if started is None else started
    out_dir.mkdir(parents=True, exist_ok=True)
    tflite = convert_to(mode, load_optimized(model_path) if model is None else model,
                        out_dir / "model.tflite", dataset, config)
    accuracy = evaluate_tflite(str(tflite), dataset.batches("val"), dataset.class_names).accuracy
    budget = base_accuracy - config.max_accuracy_drop_pts / 100.0
    train_images = dataset.train_count if train_images is None else train_images
    return {"params": params, "train_images": train_images,
            "sampled": train_images < dataset.train_count,
            "val_accuracy": float(accuracy),
            "base_val_accuracy": float(base_accuracy), "budget_accuracy": float(budget),
            "fits_budget": bool(accuracy >= budget), "size_bytes": tflite.stat().st_size,
            "gzip_size_bytes": gzip_size(tflite), "seconds": time.perf_counter() - started,
            "model_path": model_path, "tflite_path": str(tflite)}


def convert_to(mode: str, model, out: Path, dataset, config) -> Path:
    """The .tflite of `mode` a trial is measured as (as the quantize stage would convert it,
    int4 with LiteRT Quantizer's default op kinds)."""
    from pipeline.runtime import litert_quantizer as lq
    from pipeline.runtime.quantize import convert
    if mode == "int4":
        float_tflite = convert("float32", out.with_name("float32.tflite"), model=model)
        return lq.quantize_tflite("int4", float_tflite, out)
    if mode == "int8":
        calibration = dataset.calibration_batches(config.calibration_samples, config.seed)
        return convert("int8", out, model=model, representative_data=calibration,
                       qat="qat" in SEARCH_CHAINS[mode])
    return convert(mode, out, model=model)


def best(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest trial whose estimated accuracy is within the budget; when none is, the most
    accurate (estimated; its `fits` False tells); None when every trial failed."""
    ranked = _ranked(history)
    if ranked:
        return ranked[0]
    finished = [record for record in estimated(history) if not record.get("error")]
    if not finished:
        return None
    return max(finished, key=lambda r: (r["estimated_val_accuracy"], -r["gzip_size_bytes"]))


def _ranked(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials estimated within the budget, smallest first; a sampled trial whose settings
    were also trained on all the images (the sample's anchor) is left to that trial."""
    records = [r for r in estimated(history) if not r.get("error")]
    full = [r["params"] for r in records if not r.get("sampled")]
    return sorted((r for r in records
                   if r["fits"] and not (r.get("sampled") and r["params"] in full)),
                  key=lambda r: (r["gzip_size_bytes"], -r["estimated_val_accuracy"],
                                 bool(r.get("sampled"))))


def choose(history: list[dict[str, Any]], retrain: Callable[[dict[str, Any]], dict[str, Any]]
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(chosen trial, its full-fidelity result). A full-fidelity trial within the budget is its
    own result; a sampled one is retrained on all the images by `retrain(trial)` (a `run_trial`
    record) and kept only when that model fits. Up to VERIFICATIONS sampled trials are tried,
    smallest first; then the smallest full-fidelity trial within the budget; else the most
    accurate trial (full fidelity when retrained), its result's fits_budget False. ValueError
    when every trial failed."""
    retrained: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (trial, its full result)
    for record in _ranked(history):
        if not record.get("sampled"):
            return record, record
        if len(retrained) < VERIFICATIONS:
            final = retrain(record)
            if final["fits_budget"]:
                return record, final
            retrained.append((record, final))
    finished = [record for record in estimated(history) if not record.get("error")]
    if not finished:
        raise ValueError("every trial of the search failed")
    trained = [(r, r) for r in finished if not r.get("sampled")] + retrained
    if trained:  # the most accurate model actually trained on all the images
        return max(trained, key=lambda pair: (pair[1]["val_accuracy"],
                                              -pair[1]["gzip_size_bytes"]))
    fallback = max(finished, key=lambda r: (r["estimated_val_accuracy"], -r["gzip_size_bytes"]))
    return fallback, retrain(fallback)


def plot_history(history: list[dict[str, Any]], chosen: dict[str, Any] | None, title: str,
                 path: Path) -> Path:
    """Gzip size against validation accuracy (a sampled trial's estimated for all the images),
    one point per trial coloured by round, the budget line and the chosen trial ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [record for record in estimated(history) if not record.get("error")]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.get_cmap("viridis")
    for number in range(ROUNDS):
        points = [record for record in finished if record.get("round") == number]
        if points:
            axes.scatter([p["gzip_size_bytes"] / 1024 for p in points],
                         [p["estimated_val_accuracy"] for p in points],
                         color=colours(number / max(1, ROUNDS - 1)), label=f"round {number + 1}")
    if finished:
        axes.axhline(finished[0]["budget_accuracy"], color="grey", linestyle="--",
                     label="budget (validation)")
    if chosen is not None:
        axes.scatter([chosen["gzip_size_bytes"] / 1024],
                     [chosen.get("estimated_val_accuracy", chosen["val_accuracy"])], s=160,
                     facecolors="none", edgecolors="red", label="chosen")
    axes.set_xlabel("gzip size (KB)")
    axes.set_ylabel("validation accuracy (sampled trials: estimated for all images)")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
