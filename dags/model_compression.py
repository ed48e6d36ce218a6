"""
### model_compression

Train (or bring) a Keras classifier, produce every requested compressed variant, measure each
through the LiteRT interpreter, choose the best under the accuracy budget and register it in MLflow.

`train` -> `optimize` (one mapped task per optimized Keras model, each trained once; a
combination such as prune+cluster continues from the prune model, training it first if needed) ->
`variant.quantize` -> `variant.evaluate` -> `variant.benchmark` (a mapped task group, one per
variant) -> `select` -> `register`.

Runs weekly (cron `PIPELINE_SCHEDULE`, default Monday 03:00 UTC, no catch-up), whenever
`publish_dataset` publishes a new training dataset (the run trains on that dataset), and on demand
from the trigger form.

A failing variant fails only its own tasks and is recorded, with its error, in its MLflow child
run; `select` runs whatever happened and reports it. Bad input (a missing dataset, a broken model
file) fails `train` at once with a message naming the problem, without retries.
"""
from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import (AssetOrTimeSchedule, CronTriggerTimetable, Param, dag,
                         get_current_context, task, task_group)

from pipeline.airflow_adapter.assets import TRAINING_DATASET
from pipeline.config import PipelineConfig
from pipeline.variants import all_variant_names

def _params() -> dict[str, Param]:
    """The trigger form: one field per setting of PipelineConfig, with its description, type and
    range from there (the only place they are written). The defaults are the deployment's:
    PipelineConfig's, overridden by PIPELINE_* variables where Airflow runs."""
    params = {}
    defaults = PipelineConfig.from_mapping({}).to_dict()
    for name, spec in PipelineConfig.describe().items():
        schema = {k: v for k, v in spec.items() if k not in ("default", "description")}
        if name == "variants":
            schema.update(minItems=1, uniqueItems=True,
                          items={"type": "string", "enum": all_variant_names()})
        elif spec["type"] == "string" and "enum" not in schema:
            schema["minLength"] = 1
        params[name] = Param(defaults[name], description=spec["description"], **schema)
    return params


PARAMS = _params()


# The first retry waits this long (then exponential backoff); tests lower it.
RETRY_DELAY = timedelta(seconds=float(os.environ.get("PIPELINE_RETRY_DELAY_SECONDS", "15")))

SCHEDULE = AssetOrTimeSchedule(
    # run_immediately=0: unpausing on a Monday must not start a full run for this week's slot.
    timetable=CronTriggerTimetable(os.environ.get("PIPELINE_SCHEDULE", "0 3 * * 1"), timezone="UTC",
                                   run_immediately=timedelta(0)),
    assets=TRAINING_DATASET)


def _config_values(context) -> dict:
    """The trigger form's values; a run started by a dataset event trains on that dataset."""
    values = {name: context["params"].get(name) for name in PARAMS}
    events = (context.get("triggering_asset_events") or {}).get(TRAINING_DATASET) or []
    if events and events[-1].extra.get("dataset"):
        values["dataset"] = events[-1].extra["dataset"]
    return values


def _close_parent_run(context) -> None:
    """on_failure_callback of the pipeline-level tasks (after their last retry): the MLflow
    parent run ends FAILED with the error instead of staying RUNNING."""
    from pipeline.store import tracking
    from pipeline.stages import one_line
    error = context.get("exception")
    experiment = _config_values(context).get("experiment") or PipelineConfig().experiment
    tracking.fail_parent_run(experiment, context["run_id"],
                             f"{context['ti'].task_id} failed: "
                             f"{one_line(error) if error else 'see its log'}")


def _input_errors_fail_fast(function, *args, permanent: tuple[type[Exception], ...] = ()):
    """Bad input (and the errors in `permanent`) cannot be fixed by retrying: fail the task at
    once with the clear message."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.errors import PipelineInputError
    try:
        return function(*args)
    except (PipelineInputError, *permanent) as error:
        raise AirflowFailException(str(error)) from None


def _require_context(ctx: dict | None) -> dict:
    """Tasks that run whatever happened upstream (trigger rule all_done) get no context when
    `train` failed: fail at once (retrying cannot bring it), which also fails the DAG run."""
    from airflow.sdk.exceptions import AirflowFailException
    if ctx is None:
        raise AirflowFailException("train did not finish, so there is nothing to do here: see "
                                   "the train task's log")
    return ctx


@dag(
    dag_id="model_compression",
    schedule=SCHEDULE,
    catchup=False,
    max_active_runs=4,
    params=PARAMS,
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": RETRY_DELAY,
                  "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=5)},
    tags=["compression", "mlflow", "litert"],
)
def model_compression():
    @task
    def plan() -> list[str]:
        """Validate the trigger form into one config before anything heavy runs: the variants."""
        config = _input_errors_fail_fast(PipelineConfig.from_mapping, _config_values(get_current_context()))
        return config.variants

    @task
    def recipes(variants: list[str]) -> list[str]:
        """The optimized Keras models those variants need, each trained once."""
        from pipeline import stages
        return stages.recipes(variants)

    # Training-type tasks go to the `training` queue (e.g. GPU workers), the rest to `default`.
    @task(queue="training", on_failure_callback=_close_parent_run)
    def train() -> dict:
        from pipeline import stages
        context = get_current_context()
        tags = {"airflow_dag_id": context["dag"].dag_id, "airflow_run_id": context["run_id"]}
        return _input_errors_fail_fast(stages.train, _config_values(context), context["run_id"], tags)

    @task(queue="training", max_active_tis_per_dagrun=1)  # fine-tuning saturates a worker's cores
    def optimize(ctx: dict, recipe: str) -> dict:
        from pipeline import stages
        from pipeline.techniques import TechniqueError  # the model has a layer it cannot handle
        return _input_errors_fail_fast(stages.optimize, ctx, recipe, permanent=(TechniqueError,))

    @task(trigger_rule="all_done")  # runs when an optimization failed: it records why
    def quantize(ctx: dict | None, variant: str) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline import stages
        try:
            return _input_errors_fail_fast(stages.quantize, _require_context(ctx), variant,
                                           permanent=(stages.VariantFailed,))  # its optimization failed
        except stages.VariantSkipped as reason:  # cannot apply to this model: shown as skipped
            raise AirflowSkipException(str(reason)) from None

    @task
    def evaluate(ctx: dict, quantized: dict) -> dict:
        from pipeline import stages
        return stages.evaluate(ctx, quantized)

    @task
    def benchmark(ctx: dict, evaluated: dict) -> dict:
        from pipeline import stages
        return stages.benchmark(ctx, evaluated)

    @task_group(group_id="variant")
    def variant(ctx: dict, variant: str):
        quantized = quantize(ctx, variant)
        optimized >> quantized  # noqa: F821 (bound below, before the group is expanded)
        return benchmark(ctx, evaluate(ctx, quantized))

    @task(trigger_rule="all_done", on_failure_callback=_close_parent_run)  # report it all
    def select(ctx: dict | None) -> dict:
        from pipeline import stages
        return stages.select(_require_context(ctx))

    @task(on_failure_callback=_close_parent_run)
    def register(ctx: dict, selection: dict) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline import stages
        outcome = stages.register(ctx, selection)
        if outcome.get("skipped"):
            raise AirflowSkipException(outcome["reason"])
        return outcome

    planned = plan()
    ctx = train()
    planned >> ctx
    optimized = optimize.partial(ctx=ctx).expand(recipe=recipes(planned))
    variants = variant.partial(ctx=ctx).expand(variant=planned)
    selection = select(ctx)
    variants >> selection
    register(ctx, selection)


model_compression()
