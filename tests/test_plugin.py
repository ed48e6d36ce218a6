"""The `mlflow_link` plugin: it loads, puts an "MLflow run" link on the pipeline's task instances,
and its redirect finds the right MLflow run (parent or variant child) in a real tracking store,
also from the XComs of a real DAG run."""
import sys
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from pipeline.store import tracking

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_DAG = "model_compression"
VARIANTS = ["float32", "prune-int8", "int8"]   # planned; int8 has no child run yet
EXPERIMENT = "link-tests"


@pytest.fixture(scope="module")
def plugin():
    """The plugin module, once Airflow's plugin manager has loaded the plugins folder and the
    package's entry point without an error (a plugin found both ways is one)."""
    from airflow import plugins_manager
    plugins_manager.ensure_plugins_loaded()
    assert not any("mlflow_link" in source or "already registered" in error
                   for source, error in plugins_manager.get_import_errors().items())
    return sys.modules["pipeline.airflow_adapter.mlflow_link"]


def test_plugin_is_found_once_through_the_entry_point_or_the_plugins_folder(plugin, monkeypatch):
    """The installed package's entry point registers the plugin; plugins/mlflow_link.py exposes
    the class only where that entry point is missing (pipeline/ on PYTHONPATH), never both."""
    import importlib.metadata
    import runpy

    from airflow import plugins_manager
    assert [p["name"] for p in plugins_manager.get_plugin_info()].count("mlflow_link") == 1
    points = importlib.metadata.entry_points(group="airflow.plugins")
    assert [p.load() for p in points if p.name == "mlflow_link"] == [plugin.MLflowLinkPlugin]
    folder_file = str(ROOT / "plugins" / "mlflow_link.py")
    assert "MLflowLinkPlugin" not in runpy.run_path(folder_file)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert runpy.run_path(folder_file)["MLflowLinkPlugin"] is plugin.MLflowLinkPlugin


@pytest.fixture(scope="module", autouse=True)
def experiment(session_dir):
    """The tests' experiment, its artifacts in the session folder (MLflow's default with a SQLite
    store would be ./mlruns in the working directory)."""
    if tracking.client().get_experiment_by_name(EXPERIMENT) is None:
        tracking.client().create_experiment(
            EXPERIMENT, artifact_location=(session_dir / "link-artifacts").as_uri())


@pytest.fixture
def ui(monkeypatch):
    """The MLflow UI base for a local SQLite store."""
    monkeypatch.setenv("MLFLOW_UI_URL", "http://mlflow.example:5000/")
    return "http://mlflow.example:5000"


def pipeline_run(dag_id=PIPELINE_DAG, children=("float32", "prune-int8")):
    """A parent run and child runs tagged as the pipeline's `train`/`variant.quantize` tag them."""
    run_id = f"manual__{uuid.uuid4()}"
    parent = tracking.start_parent_run(EXPERIMENT, run_id, params={}, tags={
        "airflow_dag_id": dag_id, "airflow_run_id": run_id})
    child_ids = {name: tracking.child_run(parent, {"variant": name, "quantization": "x",
                                                   "optimizations": ""}) for name in children}
    return run_id, parent, child_ids


def run_page(ui, run_id):
    experiment = tracking.client().get_run(run_id).info.experiment_id
    return f"{ui}/#/experiments/{experiment}/runs/{run_id}"


def test_plugin_is_registered_with_its_app_and_link(plugin):
    from airflow import plugins_manager
    info = next(p for p in plugins_manager.get_plugin_info() if p["name"] == "mlflow_link")
    assert info["fastapi_apps"][0]["url_prefix"] == "/mlflow-link"
    assert "MLflowRunLink" in [
        type(link).__name__ for link in plugins_manager.get_global_operator_extra_links()]


def test_every_pipeline_task_offers_the_link_to_the_redirect(plugin):
    """As the API server sees the DAG (deserialized), mapped tasks included; other DAGs get none."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstancekey import TaskInstanceKey
    from airflow.serialization.serialized_objects import DagSerialization

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags[PIPELINE_DAG]
    served = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    run_id = "manual__2026-01-01T00:00:00+00:00"
    for task_id, map_index in (("train", -1), ("variant.evaluate", 2)):
        task = served.get_task(task_id)
        assert "MLflow run" in task.extra_links
        key = TaskInstanceKey(PIPELINE_DAG, task_id, run_id, 1, map_index)
        link = plugin.MLflowRunLink().get_link(task, ti_key=key)
        path, query = link.split("?")
        assert path == "/mlflow-link/redirect"
        assert parse_qs(query) == {"dag_id": [PIPELINE_DAG], "run_id": [run_id],
                                   "task_id": [task_id], "map_index": [str(map_index)]}
    other = TaskInstanceKey("publish_dataset", "publish", run_id, 1, -1)
    assert plugin.MLflowRunLink().get_link(None, ti_key=other) == ""


def test_mlflow_ui_url_comes_from_a_tracking_server_without_its_credentials(plugin, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bot:secret@mlflow.corp:8443/ml/")
    assert plugin.mlflow_ui_url() == "https://mlflow.corp:8443/ml"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/mlflow.db")
    monkeypatch.delenv("MLFLOW_UI_URL", raising=False)
    assert plugin.mlflow_ui_url() == "http://127.0.0.1:5000"


def test_resolves_the_parent_run_or_the_variants_child_run(plugin, ui):
    run_id, parent, children = pipeline_run()
    resolve = plugin.resolve_run_url

    def planned():
        return VARIANTS

    def never():
        raise AssertionError("only mapped variant tasks need the plan")

    assert resolve(PIPELINE_DAG, run_id, "train", -1, never) == run_page(ui, parent)
    assert resolve(PIPELINE_DAG, run_id, "select", -1, never) == run_page(ui, parent)
    assert resolve(PIPELINE_DAG, run_id, "optimize", 0, never) == run_page(ui, parent)
    assert resolve(PIPELINE_DAG, run_id, "variant.quantize", 0, planned) == run_page(
        ui, children["float32"])
    assert resolve(PIPELINE_DAG, run_id, "variant.benchmark", 1, planned) == run_page(
        ui, children["prune-int8"])
    # the plan's XCom is gone: the parent run, which lists every variant
    assert resolve(PIPELINE_DAG, run_id, "variant.benchmark", 1, lambda: None) == run_page(
        ui, parent)
    with pytest.raises(plugin.RunNotFound, match=r"variant 'int8' .* has no MLflow run yet"):
        resolve(PIPELINE_DAG, run_id, "variant.quantize", 2, planned)


def test_unknown_runs_and_other_dags_are_not_found(plugin, ui):
    run_id, _, _ = pipeline_run(dag_id="someone_else")  # same tags, another DAG
    with pytest.raises(plugin.RunNotFound, match=r"no MLflow run for DAG run .* `train` task"):
        plugin.resolve_run_url(PIPELINE_DAG, run_id, "train")
    with pytest.raises(plugin.RunNotFound, match="'someone_else' does not track its runs"):
        plugin.resolve_run_url("someone_else", run_id, "train")


@pytest.fixture
def client(plugin):
    from fastapi.testclient import TestClient
    plugin.app.dependency_overrides[plugin.authorized] = lambda: None  # a permitted user
    yield TestClient(plugin.app)
    plugin.app.dependency_overrides.clear()


def test_redirect_endpoint(plugin, client, ui):
    run_id, parent, _ = pipeline_run()
    found = client.get("/redirect", params={"dag_id": PIPELINE_DAG, "run_id": run_id,
                                            "task_id": "train"}, follow_redirects=False)
    assert found.status_code == 302 and found.headers["location"] == run_page(ui, parent)
    missing = client.get("/redirect", params={"dag_id": PIPELINE_DAG, "run_id": "manual__nope",
                                              "task_id": "train"})
    assert missing.status_code == 404
    assert missing.text.startswith("no MLflow run for DAG run 'manual__nope' of "
                                   "'model_compression' yet: its `train` task creates it")


def test_redirect_requires_an_airflow_login(plugin):
    from fastapi.testclient import TestClient
    response = TestClient(plugin.app).get("/redirect", params={
        "dag_id": PIPELINE_DAG, "run_id": "x", "task_id": "train"}, follow_redirects=False)
    assert response.status_code == 401


@pytest.mark.pipeline  # a DAG run through Airflow (dag.test on a migrated metadata DB); make test-stack
def test_redirect_reads_the_variant_from_a_real_dag_runs_plan(plugin, client, ui, airflow_db, register_dag,
                                                              monkeypatch, tmp_path):
    """A stand-in for the pipeline DAG with its shape (plan -> train -> mapped `variant` group),
    run by Airflow: the map index is resolved through the `plan` task's XCom in the metadata DB."""
    from airflow.sdk import DAG, get_current_context, task, task_group

    @task
    def plan() -> list[str]:
        return ["float32", "int8"]

    @task
    def train() -> dict:
        context = get_current_context()
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        return {"parent_run_id": tracking.start_parent_run(EXPERIMENT, run_id, {}, {
            "airflow_dag_id": dag_id, "airflow_run_id": run_id})}

    @task
    def quantize(ctx: dict, variant: str) -> dict:
        return {"child_run_id": tracking.child_run(ctx["parent_run_id"], {
            "variant": variant, "quantization": variant, "optimizations": ""})}

    @task_group(group_id="variant")
    def variant(ctx: dict, variant: str):
        quantize(ctx, variant)

    with DAG("mlflow_link_standin", schedule=None) as dag:
        variant.partial(ctx=train()).expand(variant=plan())
    register_dag(dag, tmp_path)
    dag_run = dag.test()
    assert dag_run.state == "success"

    monkeypatch.setattr(plugin, "PIPELINE_DAG_ID", dag.dag_id)
    parent = tracking.client().search_runs(
        [tracking.experiment_id(EXPERIMENT)],
        f"tags.airflow_run_id = '{dag_run.run_id}' and tags.run_role = 'parent'")[0].info.run_id
    children = {run.data.tags["variant"]: run.info.run_id for run in tracking.child_runs(parent)}
    response = client.get("/redirect", params={
        "dag_id": dag.dag_id, "run_id": dag_run.run_id, "task_id": "variant.quantize",
        "map_index": 1}, follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["location"] == run_page(ui, children["int8"])
    assert urlsplit(response.headers["location"]).netloc == "mlflow.example:5000"
