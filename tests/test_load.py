"""Load: four runs of `model_compression` at once on `make up`'s stack (tests/conftest_stack.py:
MLflow server and Airflow's scheduler, api-server, dag-processor and triggerer, LocalExecutor on
SQLite), triggered through Airflow's REST API like any client would.

All four complete; each has one MLflow parent run and one child run per variant carrying every
contract metric; each registers one model version; and neither Airflow's logs (task logs under
AIRFLOW_HOME/logs, the components' logs) nor the MLflow server's log mention "database is locked".

Slow (minutes on 2 cores): deselect with `-m "not slow"`.
"""
from __future__ import annotations

import math
import time
import urllib.parse
from datetime import datetime

import pytest

from conftest_stack import DAG_ID, Stack
from pipeline.store.tracking import CONTRACT_METRICS

pytestmark = [pytest.mark.slow, pytest.mark.stack]

RUNS = 4  # the DAG's max_active_runs
EXPERIMENT = "load-test"
MODEL_NAME = "load-test-model"
CONF = {"epochs": 1, "train_limit": 600, "test_limit": 200, "variants": ["float32", "dynamic"],
        "finetune_epochs": 1, "prune_epochs": 1, "experiment": EXPERIMENT, "registered_model_name": MODEL_NAME}
TIMEOUT = 1800
LOCKED = "database is locked"


def wait_until_idle(stack: Stack, timeout: float = 900) -> None:
    """Wait for runs started by other tests to end, so that these four can all be active."""
    deadline = time.monotonic() + timeout
    while any(run["state"] in ("queued", "running") for run in stack.dag_runs()):
        if time.monotonic() > deadline:
            return  # run anyway; the overlap check below says how many ran together
        time.sleep(5)


def max_overlap(runs: list[dict]) -> int:
    """The most runs that were running at the same moment (from their start and end dates)."""
    events = []
    for run in runs:
        events.append((datetime.fromisoformat(run["start_date"]), 1))
        events.append((datetime.fromisoformat(run["end_date"]), -1))
    current = peak = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):
        current += change
        peak = max(peak, current)
    return peak


def test_four_runs_at_once_complete_with_every_metric_and_no_lock_errors(stack):
    wait_until_idle(stack)
    started = time.monotonic()
    run_ids = [stack.trigger(CONF) for _ in range(RUNS)]
    assert len(set(run_ids)) == RUNS

    finished: dict[str, dict] = {}
    while len(finished) < RUNS:
        assert time.monotonic() - started < TIMEOUT, \
            {r: stack.task_states(r) for r in run_ids if r not in finished}
        time.sleep(10)
        for run_id in run_ids:
            if run_id not in finished:
                run = stack.dag_run(run_id)
                if run["state"] in ("success", "failed"):
                    finished[run_id] = run
    seconds = time.monotonic() - started

    failed = {r: stack.task_states(r) for r, run in finished.items() if run["state"] != "success"}
    assert not failed, f"runs that failed: {failed}; logs under {stack.base}"
    overlap = max_overlap(list(finished.values()))
    assert overlap == RUNS, f"only {overlap} of the {RUNS} runs were running at the same time"

    client = stack.mlflow_client()
    children_total = 0
    for run_id in run_ids:
        parent = stack.parent_run(EXPERIMENT, run_id)  # exactly one per DAG run
        assert parent.info.status == "FINISHED", run_id
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(c.data.tags["variant"] for c in children) == ["dynamic", "float32"]
        for child in children:
            assert child.info.status == "FINISHED", (run_id, child.data.tags)
            missing = [m for m in CONTRACT_METRICS if m not in child.data.metrics
                       or not math.isfinite(child.data.metrics[m])]
            assert not missing, (run_id, child.data.tags["variant"], missing)
        children_total += len(children)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    parents = sorted(v.tags["airflow_run_id"] for v in versions)
    assert parents == sorted(run_ids), "one registered version per run, none lost or doubled"

    logs = stack.base / "airflow" / "logs"
    task_logs = sorted(p for p in logs.rglob("*.log") if "dag_id=" in str(p))
    for run_id in run_ids:  # the task logs are there to search
        assert [p for p in task_logs if f"run_id={run_id}" in str(p) and "task_id=train" in str(p)]
    searched = task_logs + sorted(stack.stack_dir.glob("*.log"))
    assert stack.stack_dir / "mlflow.log" in searched
    locked = [str(p) for p in searched if LOCKED in p.read_text(errors="replace")]
    assert not locked, f"{LOCKED!r} in {locked}"

    tries = [t["try_number"] for r in run_ids for t in stack.request(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(r, safe='')}/taskInstances"
               "?limit=100")[1]["task_instances"] if t["state"] == "success"]
    print(f"\nload: {RUNS} runs triggered, {len(finished)} finished ({overlap} at once) in "
          f"{seconds:.0f} s; {children_total} child runs with all {len(CONTRACT_METRICS)} contract "
          f"metrics; {len(versions)} registry versions; {len(tries)} task instances, "
          f"{sum(1 for t in tries if t > 1)} retried; {len(searched)} log files without "
          f"{LOCKED!r}")
