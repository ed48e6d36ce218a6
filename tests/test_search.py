"""The auto-* variants: an Optuna search of a technique chain's settings for the smallest model
within the accuracy budget on the validation split, its trials MLflow child runs of their own."""
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from benchmarks.scaling import make_photos
from pipeline.errors import PipelineInputError
from pipeline.techniques import search
from pipeline.variants import all_variant_names, parse_variant

ROOT = Path(__file__).resolve().parent.parent
CONFIG = SimpleNamespace(seed=42, search_trials=9, prune_sparsity=0.91, prune_block=16,
                         prune_size_exponent=0.25, cluster_count=16, prune_epochs=8,
                         finetune_epochs=2)


def test_auto_variants_name_the_chain_they_search():
    variant = parse_variant("auto-int4")
    assert variant.recipe == "auto-int4"
    assert variant.techniques == ("prune", "cluster", "qat4")
    assert variant.tags()["optimizations"] == "prune,cluster,qat4"
    assert parse_variant("auto-int8").techniques == ("prune", "cluster", "qat")
    assert {"auto-int4", "auto-int8", "auto-dynamic"} <= set(all_variant_names())
    for wrong in ("auto-float16", "prune+auto-int8", "auto+prune-int4"):
        with pytest.raises(PipelineInputError, match="auto-int4, auto-int8, auto-dynamic"):
            parse_variant(wrong)


def test_the_first_trial_is_the_configured_settings_and_later_rounds_learn_from_the_history():
    first = search.suggest("int4", CONFIG, [], 3, 0)
    assert first[0] == {"params": {"prune_sparsity": 0.91, "prune_block": 16,
                                   "prune_size_exponent": 0.25, "cluster_count": 16,
                                   "epochs_factor": 1},
                        "train_images": search.ALL_IMAGES}
    assert len({str(p["params"]) for p in first}) == 3
    # A made-up model: accuracy falls off above 0.85 sparsity; the size shrinks with sparsity.
    history = []
    for number in range(3):
        for trial in search.suggest("int4", CONFIG, history, 3, number):
            params = trial["params"]
            accuracy = 0.93 - 2 * max(0.0, params["prune_sparsity"] - 0.85)
            history.append({"params": params, "round": number, "trial": len(history),
                            "val_accuracy": accuracy, "budget_accuracy": 0.92,
                            "fits_budget": accuracy >= 0.92,
                            "gzip_size_bytes": int(100_000 * (1 - params["prune_sparsity"]))})
    history.append({"params": history[0]["params"], "round": 2, "trial": 9, "error": "boom"})
    chosen = search.best(history)
    fitting = [r for r in history if r.get("fits_budget")]
    assert chosen["gzip_size_bytes"] == min(r["gzip_size_bytes"] for r in fitting)
    assert chosen["fits"] and chosen["params"]["prune_sparsity"] <= 0.855
    # TPE learned: the later rounds' trials are mostly within the budget.
    assert sum(r.get("fits_budget", False) for r in history[3:]) >= 3
    # Nothing within the budget: the most accurate trial, marked as not fitting.
    outside = [{**r, "budget_accuracy": 0.99} for r in history if not r.get("error")]
    assert search.best(outside)["val_accuracy"] == max(r["val_accuracy"] for r in outside)
    assert not search.best(outside)["fits"]
    assert search.best([{"error": "boom"}]) is None


def _record(trial, sparsity, accuracy, *, sampled, size=None):
    return {"trial": trial, "round": 0, "params": {"prune_sparsity": sparsity},
            "sampled": sampled, "val_accuracy": accuracy, "budget_accuracy": 0.92,
            "fits_budget": accuracy >= 0.92,
            "gzip_size_bytes": size or int(100_000 * (1 - sparsity))}


def test_sampled_trials_are_judged_by_the_anchors_gap_and_verified_on_all_the_images():
    # The anchors: the fixed settings (0.9) reach 0.925 on all the images, 0.905 on the sample.
    anchors = [_record(0, 0.9, 0.925, sampled=False), _record(1, 0.9, 0.905, sampled=True)]
    assert search.fidelity_gap(anchors) == pytest.approx(0.02)
    history = anchors + [_record(2, 0.95, 0.903, sampled=True),   # estimated 0.923: fits
                         _record(3, 0.97, 0.890, sampled=True),   # estimated 0.910: does not
                         _record(4, 0.6, 0.93, sampled=True)]     # fits, larger
    estimates = {r["trial"]: r for r in search.estimated(history)}
    assert estimates[2]["fits"] and not estimates[3]["fits"] and estimates[4]["fits"]
    assert estimates[2]["estimated_val_accuracy"] == pytest.approx(0.923)
    assert search.best(history)["trial"] == 2
    trained = []

    def retrain(fits: dict[int, float]):
        def run(trial):
            trained.append(trial["trial"])
            return {**trial, "sampled": False, "val_accuracy": fits[trial["trial"]],
                    "fits_budget": fits[trial["trial"]] >= 0.92}
        return run

    # The sample's anchor is never a candidate of its own (its settings were trained on all
    # the images), even when its file came out a few bytes smaller.
    twin = [anchors[0], {**anchors[1], "gzip_size_bytes": anchors[0]["gzip_size_bytes"] - 700}]
    assert search.choose(twin, lambda trial: pytest.fail("retrained"))[0]["trial"] == 0
    # The smallest estimated fit holds on all the images: it is chosen, trained once.
    chosen, final = search.choose(history, retrain({2: 0.921}))
    assert (chosen["trial"], final["val_accuracy"], trained) == (2, 0.921, [2])
    # It does not hold: the next smallest estimated fit is the full-fidelity anchor (0.9 is
    # smaller than 0.6), which is its own result; no further retraining.
    trained.clear()
    chosen, final = search.choose(history, retrain({2: 0.915}))
    assert (chosen["trial"], final is chosen, trained) == (0, True, [2])
    # Without a fitting anchor: up to VERIFICATIONS sampled trials are retrained, then the most
    # accurate model trained on all the images is shipped, marked as not fitting.
    trained.clear()
    low = [{**anchors[0], "val_accuracy": 0.915, "fits_budget": False},
           {**anchors[1], "val_accuracy": 0.895}] + history[2:]
    chosen, final = search.choose(low, retrain({2: 0.915, 4: 0.918}))
    assert trained == [2, 4] and chosen["trial"] == 4 and not final["fits_budget"]
    with pytest.raises(ValueError, match="every trial"):
        search.choose([{"trial": 0, "error": "boom"}], retrain({}))


def test_a_sampled_search_starts_with_both_anchors():
    config = SimpleNamespace(**vars(CONFIG), search_train_images=600)
    first = search.suggest("int4", config, [], 1, 0, sampled=True)
    assert [t["train_images"] for t in first] == [search.ALL_IMAGES, 600]
    assert first[0]["params"] == first[1]["params"] == search.configured_trial("int4", config)
    later = search.suggest("int4", config, [], 4, 0, sampled=True)
    assert [t["train_images"] for t in later] == [search.ALL_IMAGES, 600, 600, 600]
    assert later[2]["params"] != later[0]["params"]


def test_only_the_configured_settings_on_all_the_images_are_the_fixed_variants_training():
    from pipeline.config import PipelineConfig

    config = PipelineConfig()
    anchor = {"params": search.configured_trial("int4", config), "train_images": search.ALL_IMAGES}
    assert search.is_anchor("int4", config, anchor)
    assert search.is_anchor("int8", config, {**anchor, "params": search.configured_trial(
        "int8", config)})
    assert not search.is_anchor("int4", config, {**anchor, "train_images": 600})
    assert not search.is_anchor("int4", config, {**anchor, "params": {
        **anchor["params"], "epochs_factor": 2}})
    assert not search.is_anchor("int4", config, {**anchor, "params": {
        **anchor["params"], "cluster_count": 8}})
    # A configured value outside the searched space is clipped into it: that trial is not the
    # fixed variant's settings (runs of 8 inputs are searched as 4).
    odd = PipelineConfig.from_mapping({"prune_block": 8})
    assert not search.is_anchor("int4", odd, {
        "params": search.configured_trial("int4", odd), "train_images": search.ALL_IMAGES})


def test_trials_are_split_over_the_rounds():
    assert search.round_sizes(12) == [4, 4, 4]
    assert search.round_sizes(10) == [4, 3, 3]
    assert search.round_sizes(2) == [1, 1, 0]


@pytest.mark.pipeline  # trains a model, then prune, cluster and QAT and a conversion; make test-stack
def test_a_trial_runs_the_chain_with_its_settings_and_measures_it_on_validation(tmp_path):
    import tf_keras

    from pipeline.config import PipelineConfig
    from pipeline.sources.data import load_dataset
    from tests.small_models import shape_images, tf_keras_depthwise_residual

    dataset = load_dataset(str(shape_images(tmp_path / "shapes.npz", classes=3, train=240,
                                            test=60, size=32)))
    model = tf_keras_depthwise_residual(dataset.input_shape, 3)
    model.compile(optimizer="adam",
                  loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*dataset.arrays("train"), epochs=2, batch_size=32, verbose=0)
    model.save(tmp_path / "base.keras")
    config = PipelineConfig.from_mapping({"prune_epochs": 1, "finetune_epochs": 1,
                                          "size_to_data": False, "calibration_samples": 16})
    outcome = search.run_trial("int8", str(tmp_path / "base.keras"), dataset, config,
                               {"prune_sparsity": 0.3, "prune_block": 1, "cluster_count": 8,
                                "epochs_factor": 1}, tmp_path / "trial")
    assert 0.0 <= outcome["val_accuracy"] <= 1.0
    assert outcome["budget_accuracy"] == pytest.approx(outcome["base_val_accuracy"] - 0.01)
    assert outcome["fits_budget"] == (outcome["val_accuracy"] >= outcome["budget_accuracy"])
    assert outcome["gzip_size_bytes"] < outcome["size_bytes"]
    assert Path(outcome["tflite_path"]).exists() and Path(outcome["model_path"]).exists()
    # The settings were applied: the largest kernel is as sparse as pruning's plan for the
    # trial's prune_sparsity (0.3) makes it, and that plan differs from one for 0.8.
    import numpy as np

    from pipeline.sources.models import load_model
    from pipeline.techniques.graph import fuse_layers
    from pipeline.techniques.persistence import load_optimized
    from pipeline.techniques.pruning import layer_plan

    def largest_planned(sparsity: float) -> float:
        plan = layer_plan(fuse_layers(load_model(tmp_path / "base.keras")), search.trial_config(
            config, {"prune_sparsity": sparsity, "prune_block": 1}))
        return max(plan.values(), key=lambda layer: layer.get("weights", 0))["sparsity"]

    kernels = [w for w in load_optimized(outcome["model_path"]).get_weights() if w.ndim >= 2]
    largest = max(kernels, key=np.size)
    assert np.mean(largest == 0) == pytest.approx(largest_planned(0.3), abs=0.03)
    assert largest_planned(0.3) < largest_planned(0.8)


@pytest.mark.pipeline  # a whole CLI run with its search; make test-stack
def test_an_auto_variant_runs_its_search_and_ships_the_best_trial(tmp_path):
    photos = make_photos(tmp_path / "photos", 150, size=48)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PIPELINE_WORK_DIR": str(tmp_path / "work"), "MLFLOW_TRACKING_URI": store}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--dataset", str(photos), "--epochs", "2",
         "--variants", "float32,prune+cluster+qat4-int4,auto-int4", "--experiment", "search-run",
         "--registered-model-name", "search-run", "--set", "search_trials=3",
         "--set", "search_train_images=60",
         "--set", "prune_epochs=1", "--set", "finetune_epochs=1", "--set", "size_to_data=false",
         "--set", "latency_runs=5", "--set", "calibration_samples=16", "--set", "min_accuracy=0",
         "--set", "technique_retries=0"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stderr
    assert "[search] auto-int4 trial 0 (round 1): {'prune_sparsity': 0.91" in log, log[-3000:]
    # Round 1 holds the two anchors (the fixed settings on all 108 images and on the sample of
    # 60), so 3 trials become 4.
    assert "auto-int4 trial 0: " in log and "fine-tuned on all the images" in log
    # The run also has the fixed variant of the chain: that anchor is its model, not a second
    # training of the same settings.
    assert "auto-int4 trial 0: the fixed variant's prune+cluster+qat4 model" in log, log[-3000:]
    assert "auto-int4 trial 1 (round 1): {'prune_sparsity': 0.91" in log
    assert "fine-tuned on a sample of 60 images" in log
    assert "[search] auto-int4 trial 3 (round 3)" in log
    chosen_trial = int(re.search(r"\[search\] auto-int4: chose trial (\d+) ", log).group(1))
    # A trial chosen from the sample is trained again on all the images before it ships.
    if chosen_trial != 0:
        assert "settings on all 108 training images" in log

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("search-run")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.run_role = 'parent'")
    trials = client.search_runs([experiment.experiment_id], "tags.run_role = 'search_trial'")
    assert sorted(run.data.tags["search_trial"] for run in trials) == [
        f"auto-int4 trial {n}" for n in range(4)]
    assert sorted(run.data.tags["sampled"] for run in trials) == ["false", "true", "true", "true"]
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags["search"] == "auto-int4"
        assert {"prune_sparsity", "prune_block", "cluster_count"} <= set(run.data.params)
        assert {"val_accuracy", "gzip_size_bytes", "budget_accuracy"} <= set(run.data.metrics)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # The variant ships the chosen trial's settings.
    (chosen,) = [r for r in trials if r.data.tags["search_trial"] == f"auto-int4 trial {chosen_trial}"]
    (variant,) = client.search_runs([experiment.experiment_id], "tags.variant = 'auto-int4'")
    assert variant.data.tags["status"] == "ok"
    assert variant.data.params["technique.search.trial"] == str(chosen_trial)
    assert (float(variant.data.params["technique.search.prune_sparsity"])
            == pytest.approx(float(chosen.data.params["prune_sparsity"])))
    assert variant.data.params["technique.search.trial_train_images"] == str(
        int(chosen.data.metrics["train_images"]))
    # The trials are not variants: the summary has the three requested ones; the report shows the
    # search's trials and its choice.
    assert "**Variants:** 3 (" in parent.data.tags.get("mlflow.note.content", "")
    summary = Path(client.download_artifacts(parent.info.run_id, "report/summary.md",
                                             str(tmp_path))).read_text()
    assert "## Search: `auto-int4`" in summary and "**chosen**" in summary

    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "search")}
    assert "search/auto-int4.png" in artifacts
    assert "optimize/auto-int4.json" in {
        f.path for f in client.list_artifacts(parent.info.run_id, "optimize")}


@pytest.mark.pipeline  # a whole DAG run through Airflow with its search rounds; make test-stack
def test_the_dag_runs_a_search_as_rounds_of_mapped_trials(airflow_db):
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session
    from mlflow import MlflowClient

    from pipeline.airflow_adapter.launch import run_dag
    from tests.conftest import QUICK
    conf = {**QUICK, "variants": ["float32", "auto-dynamic"], "search_trials": 2,
            "search_train_images": 600, "experiment": "e2e-search",
            "registered_model_name": "e2e-search-model", "min_accuracy": 0}
    run, ctx = run_dag(conf)
    assert str(run.state).endswith("success")
    with create_session() as session:
        instances = session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id).all()
    states = {(ti.task_id, ti.rendered_map_index): str(ti.state) for ti in instances}
    # Two trials in rounds of 1, 1, 0; the first round grows to hold both anchors (the fixed
    # settings on all the images and on the sample of 600); the third round has nothing to ask
    # and is skipped.
    assert states[("search_trial_1", "auto-dynamic trial 0")].endswith("success"), states
    assert states[("search_trial_1", "auto-dynamic trial 1")].endswith("success"), states
    assert states[("search_trial_2", "auto-dynamic trial 2")].endswith("success"), states
    assert states[("search_ask_3", None)].endswith("skipped"), states
    assert states[("optimize", "auto-dynamic")].endswith("success"), states
    client = MlflowClient()
    parent = client.get_run(ctx["parent_run_id"])
    trials = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                "tags.run_role = 'search_trial'")
    assert len(trials) == 3
    (variant,) = client.search_runs([parent.info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                    "tags.variant = 'auto-dynamic'")
    assert variant.data.tags["status"] == "ok"
