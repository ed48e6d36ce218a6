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
from pathlib import Path

from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.errors import PipelineInputError

DAG_ID = "model_compression"


def load_dag(dag_id: str = DAG_ID):
    """Parse dags/ like the DAG processor does; any import error is fatal."""
    from airflow.dag_processing.dagbag import DagBag
    folder = os.environ.get("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT_ROOT / "dags"))
    bag = DagBag(dag_folder=folder)
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.get_dag(dag_id)


def run_dag(conf: dict) -> tuple[object, dict | None]:
    """Run the DAG once with `conf`; returns (dag_run, the context `train` produced or None)."""
    from pipeline import stages
    dag = load_dag()
    dag_run = dag.test(run_conf=conf)
    config = PipelineConfig.from_mapping(conf)
    ctx_path = stages.run_dir_for(config, dag_run.run_id) / "context.json"
    import json
    ctx = json.loads(ctx_path.read_text()) if ctx_path.exists() else None
    return dag_run, ctx


def main(argv=None) -> int:
    from pipeline.__main__ import build_parser, summary_footer

    args = build_parser().parse_args(["run", *(argv if argv is not None else sys.argv[1:])])
    try:
        values = {k: v for k, v in vars(args).items() if k not in ("command", "set") and v is not None}
        for item in args.set:
            name, _, value = item.partition("=")
            values[name.strip().replace("-", "_")] = value
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
    report = Path(ctx["run_dir"]) / "report" / "summary.md"
    outcome_path = Path(ctx["run_dir"]) / "register.json"
    import json
    selected = json.loads((Path(ctx["run_dir"]) / "select.json").read_text()) \
        if (Path(ctx["run_dir"]) / "select.json").exists() else None
    if report.exists():
        print(report.read_text())
    if selected is not None:
        outcome = json.loads(outcome_path.read_text()) if outcome_path.exists() else {
            "skipped": True, "reason": "register did not run"}
        print(summary_footer(ctx, selected, outcome, time.perf_counter() - started))
    print(f"Airflow: AIRFLOW_HOME={os.environ.get('AIRFLOW_HOME')}; see every task's log there, "
          "or start the UI with 'make up' (http://127.0.0.1:8080)")
    return 0 if state.endswith("success") else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
