"""An "MLflow run" button on every task instance of `model_compression`: one click from the Airflow
UI to the task's run in the MLflow UI, with its metrics and artifacts.

- The button is a global operator extra link. Its URL points at this plugin's FastAPI app on the
  Airflow API server, `/mlflow-link/redirect?dag_id=..&run_id=..&task_id=..&map_index=..`,
  without any lookup: the Airflow UI asks for extra links on every task-instance page (and
  again while the task runs), and a slow tracking server must not slow those pages down.
- On click, the app finds the run in MLflow by its tags and answers with a redirect: the pipeline
  run's parent run (tags `airflow_dag_id`, `airflow_run_id`, `run_role` = parent) for the DAG's
  tasks; for a mapped `variant.*` task, that variant's child run (tag `variant`), the map index
  read through the `plan` task's return value (the variant list the group was expanded over).
  When the variant list is gone (XComs cleared), the parent run, which lists every variant.
  A run not created yet (the task has not got that far) gets a 404 saying so.
- The app requires the same permission as reading the task instance in Airflow (the browser's
  Airflow session cookie, or a bearer token).

The MLflow UI is the tracking server when `MLFLOW_TRACKING_URI` is http(s); otherwise (a local
SQLite store) `MLFLOW_UI_URL`, default http://127.0.0.1:5000 (`make mlflow-ui`).

Why not an external view (a tab on the task-instance page): Airflow shows those in a sandboxed
iframe without popups or top-level navigation, and the MLflow server forbids framing by other
origins by default (`X-Frame-Options: SAMEORIGIN`), so the tab could neither show MLflow nor open it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse, RedirectResponse

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

from pipeline.errors import without_credentials

PIPELINE_DAG_ID = "model_compression"
PLAN_TASK_ID = "plan"
VARIANT_TASK_PREFIX = "variant."
URL_PREFIX = "/mlflow-link"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"


class RunNotFound(LookupError):
    """No MLflow run for this task instance (yet); the message says why."""


def mlflow_ui_url() -> str:
    """The MLflow UI's base URL, without credentials a tracking URI may carry."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        uri = os.environ.get("MLFLOW_UI_URL") or DEFAULT_MLFLOW_UI
    return without_credentials(uri).rstrip("/")


def resolve_run_url(dag_id: str, run_id: str, task_id: str, map_index: int = -1,
                    planned_variants: Callable[[], list[str] | None] = lambda: None) -> str:
    """The MLflow UI URL of the run behind one task instance; raises RunNotFound.

    `planned_variants`: returns the variant list the `variant` group was expanded over (None
    when unknown); called only for mapped `variant.*` tasks."""
    from pipeline.store import tracking

    if dag_id != PIPELINE_DAG_ID:
        raise RunNotFound(f"DAG {dag_id!r} does not track its runs in MLflow; "
                          f"{PIPELINE_DAG_ID!r} does")
    client = tracking.client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(
        experiments, max_results=1,
        filter_string=f"tags.airflow_dag_id = '{_quote(dag_id)}' and "
                      f"tags.airflow_run_id = '{_quote(run_id)}' and tags.run_role = 'parent'")
    if not parents:
        raise RunNotFound(f"no MLflow run for DAG run {run_id!r} of {dag_id!r} yet: its `train` "
                          f"task creates it (tracking store: {_store_name()})")
    run = parents[0]
    variants = (planned_variants() if task_id.startswith(VARIANT_TASK_PREFIX) and map_index >= 0
                else None)
    if isinstance(variants, list) and map_index < len(variants):
        variant = variants[map_index]
        children = client.search_runs(
            [run.info.experiment_id], max_results=1,
            filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and "
                          f"tags.variant = '{_quote(variant)}'")
        if not children:
            raise RunNotFound(f"variant {variant!r} of DAG run {run_id!r} has no MLflow run yet "
                              "(its `variant.quantize` task creates it)")
        run = children[0]
    return f"{mlflow_ui_url()}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def planned_variants(dag_id: str, run_id: str) -> list[str] | None:
    """The return value of the DAG run's `plan` task, from Airflow's metadata DB."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(
            key="return_value", run_id=run_id, dag_ids=dag_id, task_ids=PLAN_TASK_ID,
            map_indexes=-1, limit=1)).first()
        return XComModel.deserialize_value(row) if row is not None else None


def _store_name() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return without_credentials(uri) if uri else "the project's .mlflow/"



def _quote(value: str) -> str:  # as pipeline.store.tracking quotes values in its searches
    return value.replace("'", "\\'")


authorized = requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE)
app = FastAPI(title="MLflow run links", description="Task instance -> its MLflow run")


@app.get("/redirect", dependencies=[Depends(authorized)])
def redirect(dag_id: str, run_id: str, task_id: str, map_index: int = -1):
    from mlflow.exceptions import MlflowException

    try:
        url = resolve_run_url(dag_id, run_id, task_id, map_index,
                              lambda: planned_variants(dag_id, run_id))
    except RunNotFound as error:
        return PlainTextResponse(str(error), status_code=404)
    except MlflowException as error:
        return PlainTextResponse(f"the MLflow tracking store ({_store_name()}) failed: "
                                 f"{error.message}", status_code=502)
    return RedirectResponse(url, status_code=302)


class MLflowRunLink(BaseOperatorLink):
    """The "MLflow run" button; empty (hidden) on other DAGs' tasks."""

    name = "MLflow run"

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id != PIPELINE_DAG_ID:
            return ""
        from airflow.configuration import conf

        # The UI opens same-origin links in place; keep the API server's base path, if any.
        base_path = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
        query = urlencode({"dag_id": ti_key.dag_id, "run_id": ti_key.run_id,
                           "task_id": ti_key.task_id, "map_index": ti_key.map_index})
        return f"{base_path}{URL_PREFIX}/redirect?{query}"


class MLflowLinkPlugin(AirflowPlugin):
    name = "mlflow_link"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "MLflow run links"}]
    global_operator_extra_links = [MLflowRunLink()]
