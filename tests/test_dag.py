"""DAG integrity: parses without import errors, fast, without TensorFlow, in the agreed shape."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag
    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "model_compression" in dagbag.dag_ids


def test_task_order(dagbag):
    dag = dagbag.dags["model_compression"]
    ids = {t.task_id for t in dag.tasks}
    assert {"train", "optimize", "variant.quantize", "variant.evaluate", "variant.benchmark",
            "select", "register"} <= ids
    task = dag.get_task
    assert "train" in task("optimize").upstream_task_ids
    assert "optimize" in task("variant.quantize").upstream_task_ids
    assert "variant.quantize" in task("variant.evaluate").upstream_task_ids
    assert "variant.evaluate" in task("variant.benchmark").upstream_task_ids
    assert "variant.benchmark" in task("select").upstream_task_ids
    assert "select" in task("register").upstream_task_ids
    assert task("select").trigger_rule == "all_done"
    # The auto-* searches: rounds of mapped trials between train and optimize, each round asked
    # after the one before finished (failed trials included).
    assert "train" in task("search_ask_1").upstream_task_ids
    assert "search_ask_1" in task("search_trial_1").upstream_task_ids
    assert "search_trial_1" in task("search_ask_2").upstream_task_ids
    assert "search_trial_3" in task("optimize").upstream_task_ids
    assert task("search_ask_2").trigger_rule == task("optimize").trigger_rule == "all_done"


def test_parsing_imports_nothing_heavy():
    """The DAG processor parses dags/ every few seconds: the file imports neither TensorFlow nor
    Keras nor MLflow (module names, not a wall-clock limit a loaded machine would break)."""
    code = ("import sys; import airflow.sdk;"
            "import importlib.util as u; s = u.spec_from_file_location('m', sys.argv[1]);"
            "m = u.module_from_spec(s); s.loader.exec_module(m);"
            "print(sorted(n for n in ('tensorflow', 'tf_keras', 'keras', 'mlflow', "
            "'tensorflow_model_optimization', 'litert_quantizer') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags" / "model_compression.py")],
                         capture_output=True, text=True, env=os.environ.copy(), check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name, bad", [
    ("epochs", 0), ("epochs", "ten"), ("variants", ["int9"]), ("variants", []),
    ("variants", ["qat-dynamic"]), ("objective", "speed"), ("prune_sparsity", 1.5),
    ("train_limit", -5), ("dataset", ""),
])
def test_trigger_form_schema_rejects_invalid_values(dagbag, name, bad):
    from airflow.sdk.definitions.param import ParamValidationError
    param = dagbag.dags["model_compression"].params.get_param(name)
    with pytest.raises(ParamValidationError):
        param.resolve(bad)


def test_trigger_form_accepts_valid_values(dagbag):
    params = dagbag.dags["model_compression"].params
    assert params.get_param("variants").resolve(["prune+cluster+qat-int8", "distill-int8"])
    assert params.get_param("epochs").resolve(3) == 3


def test_scheduled_weekly_and_on_the_dataset_asset(dagbag):
    dag = dagbag.dags["model_compression"]
    assert dag.catchup is False
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    assert dag.timetable.timetable.expression == "0 3 * * 1"
    assert dag.timetable.asset_condition.name == "model_compression/training_dataset"


def test_a_dataset_event_sets_the_training_dataset():
    import importlib.util
    from types import SimpleNamespace

    from pipeline.airflow_adapter.assets import TRAINING_DATASET
    spec = importlib.util.spec_from_file_location("mc", ROOT / "dags" / "model_compression.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = {"dataset": "fashion-mnist", "epochs": 3}
    event = SimpleNamespace(extra={"dataset": "/data/new-images"})
    values = module._config_values({"params": params,
                                    "triggering_asset_events": {TRAINING_DATASET: [event]}})
    assert values["dataset"] == "/data/new-images" and values["epochs"] == 3
    assert module._config_values({"params": params})["dataset"] == "fashion-mnist"


def _dag_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("model_compression_dag", ROOT / "dags" / "model_compression.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_task_has_a_docstring_and_a_time_limit(dagbag):
    """The docstring is the task's doc in the UI; execution_timeout ends a hung attempt."""
    for dag_id in ("model_compression", "promote_model", "publish_dataset"):
        for task in dagbag.dags[dag_id].tasks:
            assert (task.doc_md or "").strip(), f"{dag_id}.{task.task_id} has no docstring"
            assert task.execution_timeout is not None and task.execution_timeout.total_seconds() > 0, \
                f"{dag_id}.{task.task_id} has no execution_timeout"
    task = dagbag.dags["model_compression"].get_task
    assert task("train").execution_timeout > task("variant.quantize").execution_timeout


def test_stage_time_limits_can_be_set_per_deployment(monkeypatch):
    from datetime import timedelta
    monkeypatch.setenv("PIPELINE_TRAIN_TIMEOUT_MINUTES", "720")
    assert _dag_module().TIMEOUTS["train"] == timedelta(hours=12)


def test_training_tasks_share_the_training_pool_and_queue(dagbag):
    dag = dagbag.dags["model_compression"]
    in_pool = sorted(t.task_id for t in dag.tasks if t.pool == "training")
    assert in_pool == ["optimize", "search_trial_1", "search_trial_2", "search_trial_3", "train"]
    assert all(dag.get_task(t).queue == "training" for t in in_pool)


def test_trigger_form_in_titled_sections_with_a_variant_multi_select(dagbag):
    params = dagbag.dags["model_compression"].params
    sections = {name: params.get_param(name).schema.get("section") for name in params}
    assert all(sections.values()), [name for name, section in sections.items() if not section]
    assert sections["variants"] == "Variants" and sections["epochs"] == "Baseline training"
    assert sections["max_accuracy_drop_pts"] == "Quality gates and champion"
    # Fields of one section are next to each other (the form groups them in order).
    order = list(dict.fromkeys(sections.values()))
    assert [s for s in sections.values()] == sorted(sections.values(), key=order.index)
    from pipeline.variants import all_variant_names
    variants = params.get_param("variants").schema
    assert variants["type"] == "array" and variants["examples"] == all_variant_names()
    assert variants["items"]["enum"] == all_variant_names()


def test_dag_doc_names_the_runtime_it_uses(dagbag):
    doc = dagbag.dags["model_compression"].doc_md
    assert "CompiledModel" in doc and "XNNPACK" in doc
    assert "interpreter" not in doc.lower()


def test_register_announces_only_a_new_champion():
    from airflow.sdk import AssetAlias
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from pipeline.airflow_adapter.assets import CHAMPION_CHANGES, CHAMPION_MODEL, announce_champion
    outcome = {"name": "m", "version": "4", "champion_version": "4", "model_uri": "models:/m/4",
               "decision": "promoted"}
    events = OutletEventAccessors()
    assert announce_champion(events, outcome)
    [event] = events[CHAMPION_CHANGES].asset_alias_events
    assert event.dest_asset_key.name == CHAMPION_MODEL.name and event.extra["version"] == "4"
    for unchanged in ({**outcome, "champion_version": "3"}, {"skipped": True, "reason": "no variant"}):
        events = OutletEventAccessors()
        assert not announce_champion(events, unchanged)
        assert events[AssetAlias(CHAMPION_CHANGES.name)].asset_alias_events == []


@pytest.mark.pipeline  # a DAG run through Airflow (dag.test on a migrated metadata DB); make test-stack
def test_mapped_tasks_named_and_champion_event_in_a_real_run(airflow_db, register_dag, tmp_path):
    """A stand-in with the DAG's shape (mapped `optimize`, mapped `variant` group handing on a
    dict, `register` with the champion alias outlet), run by Airflow with the DAG's own labels:
    the grid names each mapped instance, and only a changed champion leaves an asset event."""
    from airflow.models.asset import AssetEvent
    from airflow.models.taskinstance import TaskInstance
    from airflow.sdk import DAG, get_current_context, task, task_group
    from airflow.utils.session import create_session

    from pipeline.airflow_adapter.assets import CHAMPION_CHANGES, CHAMPION_MODEL, announce_champion
    module = _dag_module()

    @task(map_index_template=module.RECIPE_LABEL)
    def optimize(recipe: str) -> str:
        return recipe

    @task(map_index_template=module.VARIANT_LABEL)
    def quantize(variant: str) -> dict:
        return {"variant": variant}

    @task(map_index_template=module.QUANTIZED_LABEL)
    def evaluate(quantized: dict) -> dict:
        return quantized

    @task(map_index_template=module.EVALUATED_LABEL)
    def benchmark(evaluated: dict) -> dict:
        return evaluated

    @task_group(group_id="variant")
    def variant(variant: str):  # called with keywords, as the DAG calls them
        return benchmark(evaluated=evaluate(quantized=quantize(variant=variant)))

    @task(outlets=[CHAMPION_CHANGES])
    def register(version: str) -> None:
        announce_champion(get_current_context()["outlet_events"], {
            "name": "m", "version": version, "champion_version": "2", "model_uri": f"models:/m/{version}"})

    with DAG("map_index_standin", schedule=None) as dag:
        optimize.expand(recipe=["prune", "cluster"])
        variant.expand(variant=["float32", "prune-int8"])
        register.expand(version=["1", "2"])  # version 2 becomes the champion, 1 does not
    register_dag(dag, tmp_path)
    run = dag.test()
    assert run.state == "success"
    with create_session() as session:
        names = {(ti.task_id, ti.rendered_map_index) for ti in session.query(TaskInstance).filter(
            TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == run.run_id)}
        events = session.query(AssetEvent).filter(AssetEvent.source_dag_id == dag.dag_id).all()
        assert [(e.asset.name, e.extra.get("version")) for e in events] == [(CHAMPION_MODEL.name, "2")]
    assert {("optimize", "prune"), ("optimize", "cluster")} <= names
    for stage in ("quantize", "evaluate", "benchmark"):
        assert {(f"variant.{stage}", "float32"), (f"variant.{stage}", "prune-int8")} <= names, names
