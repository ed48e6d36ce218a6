"""End to end through Airflow (`dag.test` on a real metadata DB) with MLflow read back."""
import pytest

from tests.conftest import QUICK, ROOT

pytestmark = pytest.mark.pipeline  # whole DAG runs through Airflow; make test-stack

CONTRACT_METRICS = ("accuracy", "accuracy_delta_pts", "size_bytes", "gzip_size_bytes",
                    "compression_ratio", "gzip_compression_ratio", "latency_ms_p50",
                    "latency_ms_p90", "peak_memory_mb")


def _children(client, parent_run_id):
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {run.data.tags["variant"]: run for run in runs}


@pytest.fixture(scope="module")
def dag_run(airflow_db):
    from pipeline.airflow_adapter.launch import run_dag
    conf = {**QUICK, "variants": ["float32", "dynamic", "int8"], "experiment": "e2e-foundation",
            "registered_model_name": "e2e-foundation-model"}
    return run_dag(conf)


def test_dag_run_succeeds_with_parent_and_child_runs(dag_run):
    from mlflow import MlflowClient
    run, ctx = dag_run
    assert str(run.state).endswith("success")
    client = MlflowClient()
    parent = client.get_run(ctx["parent_run_id"])
    assert parent.data.tags["airflow_dag_id"] == "model_compression"
    assert parent.data.tags["airflow_run_id"] == run.run_id
    assert parent.data.params["dataset"] == "fashion-mnist"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["stage_seconds_train"] > 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/summary.md", "report/pareto.png"} <= artifacts

    children = _children(client, ctx["parent_run_id"])
    assert set(children) == {"float32", "dynamic", "int8"}
    for name, child in children.items():
        assert child.data.tags["quantization"] == name
        assert child.data.tags["optimizations"] == ""
        for metric in CONTRACT_METRICS:
            assert metric in child.data.metrics, (name, metric)
        assert 0.0 <= child.data.metrics["accuracy"] <= 1.0
        # One runtime: the accuracy and the latency come from the same LiteRT CompiledModel.
        assert child.data.tags["evaluation_runtime"] == child.data.tags["runtime"] == "compiled"
        for stage in ("quantize", "evaluate", "benchmark"):  # where the time went
            assert child.data.metrics[f"stage_seconds_{stage}"] > 0, (name, stage)
        assert [a.path for a in client.list_artifacts(child.info.run_id, "model")] == ["model/model.tflite"]


def test_dynamic_range_figures(dag_run):
    from mlflow import MlflowClient
    _, ctx = dag_run
    dynamic = _children(MlflowClient(), ctx["parent_run_id"])["dynamic"].data.metrics
    assert dynamic["compression_ratio"] >= 3.5
    assert dynamic["accuracy_delta_pts"] >= -1.5
    float32 = _children(MlflowClient(), ctx["parent_run_id"])["float32"].data.metrics
    assert float32["accuracy_delta_pts"] == pytest.approx(0.0, abs=1e-9)
    assert float32["compression_ratio"] == pytest.approx(1.0)


def test_summary_lists_every_variant(dag_run):
    """The report on the parent run has one table row per variant, each with a status."""
    from pipeline.store import artifacts
    from pipeline.stages import SELECTION_RECORD
    _, ctx = dag_run
    selected = artifacts.load_json(ctx["parent_run_id"], SELECTION_RECORD)
    rows = [line for line in selected["summary_markdown"].splitlines() if line.startswith("| `")]
    assert sorted(row.split("`")[1] for row in rows) == ["dynamic", "float32", "int8"]
    assert all("pass" in [cell.strip() for cell in row.split("|")] for row in rows), rows
    assert selected["variants_ok"] == 3


def test_no_task_hands_on_a_local_path(dag_run, session_dir):
    """The run context every task receives names URIs of the artifact store, never a folder of
    the machine that ran train."""
    import json
    _, ctx = dag_run
    text = json.dumps(ctx)
    assert str(session_dir) not in text and str(ROOT) not in text, text
    assert ctx["dataset_uri"].startswith(f"runs:/{ctx['parent_run_id']}/exchange/")


def test_the_dag_recompresses_a_registered_champion(dag_run):
    """`model_path: models:/NAME@champion` through the DAG: the run starts from the float model
    that champion was compressed from (the earlier run's baseline), with no training."""
    from mlflow import MlflowClient

    from pipeline.airflow_adapter.launch import run_dag
    _, first = dag_run
    conf = {**QUICK, "model_path": "models:/e2e-foundation-model@champion",
            "variants": ["float32", "int8"], "experiment": "e2e-recompress",
            "registered_model_name": "e2e-recompressed"}
    run, ctx = run_dag(conf)
    assert str(run.state).endswith("success")
    client = MlflowClient()
    parent = client.get_run(ctx["parent_run_id"])
    assert parent.data.params["model"] == "models:/e2e-foundation-model@champion"
    before = client.get_run(first["parent_run_id"]).data.metrics
    # The same float model on the same test images: the same Keras accuracy.
    assert parent.data.metrics["keras_accuracy"] == before["keras_accuracy"]
    assert ctx["base_model_kind"] == "tf_keras"
