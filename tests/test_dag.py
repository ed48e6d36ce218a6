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
