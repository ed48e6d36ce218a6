"""`make run`: the `model_compression` DAG end to end through Airflow, in one process.

Takes the same options as `python -m pipeline run`, turns them into the DAG run's conf (validated
by the DAG's Params), runs the DAG with `dag.test` on the Airflow home's metadata DB, then prints
the summary table and where to look. Exit status as for the command line.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from pipeline.store import artifacts
from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.errors import PipelineInputError

if TYPE_CHECKING:
    from airflow.models.dagrun import DagRun

DAG_ID = "model_compression"
TRAINING_POOL = "training"  # dags/model_compression.py's TRAINING_POOL
TRAINING_POOL_DESCRIPTION = "model_compression's train and optimize: training at once across DAG runs"


def load_dag(dag_id: str = DAG_ID):
    """Parse dags/ like the DAG processor does; any import error is fatal."""
    from airflow.dag_processing.dagbag import DagBag
    folder = os.environ.get("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT_ROOT / "dags"))
    bag = DagBag(dag_folder=folder)
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.get_dag(dag_id)


def ensure_training_pool() -> None:
    """The pool `training` the DAG's train and optimize use, as `airflow pools set` creates it
    (PIPELINE_TRAINING_POOL_SLOTS slots, default 1); an existing pool keeps its slots."""
    from airflow.models.pool import Pool
    if Pool.get_pool(TRAINING_POOL) is None:
        Pool.create_or_update_pool(TRAINING_POOL, int(os.environ.get("PIPELINE_TRAINING_POOL_SLOTS", "1")),
                                   TRAINING_POOL_DESCRIPTION, include_deferred=False)


def run_dag(conf: dict) -> tuple[DagRun, dict | None]:
    """Run the DAG once with `conf`; returns (dag_run, the context `train` produced or None)."""
    ensure_training_pool()
    dag = load_dag()
    dag_run = dag.test(run_conf=conf)
    return dag_run, _train_context(dag_run)


def _train_context(dag_run: DagRun) -> dict | None:
    """The run context `train` returned (its XCom), or None when it did not finish."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=dag_run.run_id, key="return_value",
                                                 task_ids="train", dag_ids=DAG_ID)).first()
        return None if row is None else XComModel.deserialize_value(row)


def main(argv=None) -> int:
    from pipeline.__main__ import build_parser, settings_from_args, summary_footer
    from pipeline.stages import REGISTER_RECORD, SELECTION_RECORD

    args = build_parser().parse_args(["run", *(argv if argv is not None else sys.argv[1:])])
    try:
        values = settings_from_args(args)
        config = PipelineConfig.from_mapping(values)
    except PipelineInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Only what the user set goes into the conf: the DAG's Params supply the rest.
    conf = {k: (config.to_dict()[k]) for k in values}
    started = time.perf_counter()
    dag_run, ctx = run_dag(conf)
    state = str(getattr(dag_run, "state", "unknown"))
    print(f"\nDAG run {dag_run.run_id}: {state}")
    if ctx is None:
        print("the run stopped before training finished: see the task log above", file=sys.stderr)
        return 1
    selected = artifacts.load_json(ctx["parent_run_id"], SELECTION_RECORD)
    if selected is not None:
        print(selected["summary_markdown"])
        outcome = artifacts.load_json(ctx["parent_run_id"], REGISTER_RECORD) or {
            "skipped": True, "reason": "register did not run"}
        print(summary_footer(ctx, selected, outcome, time.perf_counter() - started))
    print(f"Airflow: AIRFLOW_HOME={os.environ.get('AIRFLOW_HOME')}; see every task's log there, "
          "or start the UI with 'make up' (http://127.0.0.1:8080)")
    return 0 if state.endswith("success") else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
