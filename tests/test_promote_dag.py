"""The `promote_model` and `publish_dataset` DAGs: integrity, trigger-form schemas, and real runs
through Airflow (`dag.test`) against a real MLflow registry and the Airflow metadata DB."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import tracking

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SHAPE = (6, 6, 1)


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag
    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors_and_the_agreed_shape(dagbag):
    from pipeline.airflow_adapter.assets import TRAINING_DATASET

    assert dagbag.import_errors == {}
    promote, publish = dagbag.dags["promote_model"], dagbag.dags["publish_dataset"]
    for dag in (promote, publish):
        assert dag.schedule is None and dag.doc_md.strip()  # manual trigger only
    assert [t.task_id for t in promote.tasks] == ["promote"]
    assert promote.get_task("promote").retries == 0
    assert [t.task_id for t in publish.tasks] == ["publish"]
    assert publish.get_task("publish").outlets == [TRAINING_DATASET]
    assert TRAINING_DATASET.name == "model_compression/training_dataset"


def test_parsing_imports_neither_tensorflow_nor_mlflow():
    code = ("import sys, importlib.util as u\n"
            "for path in sys.argv[1:]:\n"
            "    s = u.spec_from_file_location('m', path); s.loader.exec_module(u.module_from_spec(s))\n"
            "print(sorted(m for m in ('tensorflow', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags" / "promote_model.py"),
                          str(ROOT / "dags" / "publish_dataset.py")],
                         capture_output=True, text=True, env=os.environ.copy(), check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("dag_id, name, bad", [
    ("promote_model", "version", 0), ("promote_model", "version", -1),
    ("promote_model", "version", "two"), ("promote_model", "version", 1.5),
    ("promote_model", "version", None), ("promote_model", "alias", ""),
    ("promote_model", "alias", "production"), ("promote_model", "model_name", ""),
    ("publish_dataset", "dataset", ""),
])
def test_trigger_form_schemas_reject_invalid_values(dagbag, dag_id, name, bad):
    from airflow.sdk.definitions.param import ParamValidationError
    with pytest.raises(ParamValidationError):
        dagbag.dags[dag_id].params.get_param(name).resolve(bad)


def test_trigger_form_requires_a_version_and_accepts_valid_values(dagbag):
    from airflow.sdk.definitions.param import ParamValidationError
    params = dagbag.dags["promote_model"].params
    with pytest.raises(ParamValidationError):
        params.get_param("version").resolve()                # no default: the form asks for it
    assert params.get_param("version").resolve(3) == 3
    assert params.get_param("alias").resolve("challenger") == "challenger"
    assert params.get_param("model_name").resolve() == "fashion-mnist-classifier"


# ---------------------------------------------------------------------------- runs through Airflow
@pytest.fixture(scope="module")
def tflite_int8(tmp_path_factory):
    """A tiny full-integer int8 classifier for 6x6 grey images, 3 classes."""
    import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow is imported)
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.Input(IMAGE_SHAPE), tf_keras.layers.Flatten(),
                                 tf_keras.layers.Dense(3, activation="softmax")])
    calibration = np.random.default_rng(0).random((16, *IMAGE_SHAPE), dtype=np.float32)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(16))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    path = tmp_path_factory.mktemp("tflite") / "model.tflite"
    path.write_bytes(converter.convert())
    return path


@pytest.fixture(scope="module")
def experiment(session_dir):
    """The tests' experiment, its artifacts in the session folder (MLflow's default with a SQLite
    store would be ./mlruns in the working directory)."""
    name = "promote-tests"
    if tracking.client().get_experiment_by_name(name) is None:
        tracking.client().create_experiment(
            name, artifact_location=(session_dir / "promote-artifacts").as_uri())
    return name


def register(experiment, name, variant, gzip_size_bytes, tflite_path):
    """One pipeline run's champion registered as `register` registers it (pipeline.selection.champion)."""
    from pipeline.config import PipelineConfig
    from pipeline.selection.champion import register_champion
    from pipeline.selection.select import Selection

    run_id = f"manual__{name}-{variant}"
    parent = tracking.start_parent_run(experiment, run_id, {}, {})
    child = tracking.child_run(parent, {"variant": variant, "quantization": "int8",
                                        "optimizations": ""})
    result = {"variant": variant, "status": "ok", "accuracy": 0.9, "accuracy_delta_pts": 0.0,
              "size_bytes": gzip_size_bytes * 2, "gzip_size_bytes": gzip_size_bytes,
              "compression_ratio": 4.0, "gzip_compression_ratio": 5.0, "latency_ms_p50": 0.5,
              "latency_ms_p90": 0.6, "peak_memory_mb": 30.0, "child_run_id": child,
              "tflite_path": str(tflite_path)}
    selection = Selection(champion=variant, passed=[variant], rejected={}, pareto=[variant],
                          objective="gzip_size", reason="test")
    config = PipelineConfig.from_mapping({"registered_model_name": name}, use_env=False)
    return register_champion(selection, [result], config, parent_run_id=parent,
                             airflow_run_id=run_id,
                             input_example=np.zeros((2, int(np.prod(IMAGE_SHAPE))), np.float32))


def aliases(name):
    client = tracking.client()
    return {alias: int(client.get_model_version_by_alias(name, alias).version)
            for alias in ("champion", "challenger")}


def task_instance(dag_run, task_id):
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select
    with create_session() as session:
        ti = session.scalars(select(TaskInstance).where(
            TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id,
            TaskInstance.task_id == task_id)).one()
        session.expunge(ti)
        return ti


@pytest.mark.pipeline  # DAG runs through Airflow (dag.test on a migrated metadata DB); make test-stack
def test_promote_model_rolls_the_champion_back_and_refuses_unknown_versions(
        airflow_db, dagbag, experiment, tflite_int8, capfd):
    name = "promote-dag-tests"
    assert register(experiment, name, "int8", 1000, tflite_int8)["champion_version"] == 1
    assert register(experiment, name, "prune-int8", 800,  # smaller: the new champion
                    tflite_int8)["champion_version"] == 2
    assert aliases(name) == {"champion": 2, "challenger": 2}
    dag = dagbag.dags["promote_model"]

    rolled_back = dag.test(run_conf={"model_name": name, "version": 1, "alias": "champion"})
    assert rolled_back.state == "success"
    assert aliases(name) == {"champion": 1, "challenger": 2}
    promote = task_instance(rolled_back, "promote")
    assert promote.state == "success" and promote.try_number == 1

    capfd.readouterr()
    refused = dag.test(run_conf={"model_name": name, "version": 7, "alias": "champion"})
    assert refused.state == "failed"
    promote = task_instance(refused, "promote")
    assert promote.state == "failed" and promote.try_number == 1 and promote.max_tries == 0
    output = capfd.readouterr()
    assert "registered model 'promote-dag-tests' has no version 7 (versions: 1, 2)" in (
        output.out + output.err)
    assert aliases(name) == {"champion": 1, "challenger": 2}  # nothing changed


@pytest.mark.pipeline  # DAG runs through Airflow (dag.test on a migrated metadata DB); make test-stack
def test_publish_dataset_validates_and_emits_the_asset_event(airflow_db, dagbag, tmp_path):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from pipeline.airflow_adapter.assets import TRAINING_DATASET

    def events():
        with create_session() as session:
            return [(e.source_run_id, e.extra) for e in session.scalars(
                select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                .where(AssetModel.name == TRAINING_DATASET.name,
                       AssetModel.uri == TRAINING_DATASET.uri))]

    dag = dagbag.dags["publish_dataset"]
    published = dag.test(run_conf={"dataset": "fashion-mnist"})
    assert published.state == "success"
    assert events() == [(published.run_id, {
        "dataset": "fashion-mnist", "train_images": 60000, "test_images": 10000, "classes": 10,
        "input_shape": [28, 28, 1]})]

    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip archive")
    refused = dag.test(run_conf={"dataset": str(broken)})
    assert refused.state == "failed"
    publish = task_instance(refused, "publish")
    assert publish.state == "failed" and publish.try_number == 1
    assert len(events()) == 1  # no event for a dataset that does not load
