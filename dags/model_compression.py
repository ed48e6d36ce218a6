"""
### model_compression

Train (or bring) a Keras classifier, produce every requested compressed variant, measure each
with LiteRT's CompiledModel API on the XNNPACK CPU delegate (the runtime the registered model is
served with), choose the best under the accuracy budget and register it in MLflow.

`train` -> (for `auto-*` variants: `search_ask_N` -> `search_trial_N`, three rounds of mapped
search trials, each an MLflow child run) -> `optimize` (one mapped task per optimized Keras model, each trained once; a
combination such as prune+cluster continues from the prune model, training it first if needed) ->
`variant.quantize` -> `variant.evaluate` -> `variant.benchmark` (a mapped task group, one per
variant) -> `select` -> `register`.

Runs weekly (cron `PIPELINE_SCHEDULE`, default Monday 03:00 UTC, no catch-up), whenever
`publish_dataset` publishes a new training dataset (the run trains on that dataset), and on demand
from the trigger form (its fields in titled sections; the variants as a multi-select).

In the grid, mapped tasks are named by their recipe (`optimize`) or variant (`variant.*`). `train`
and `optimize` run on the queue `training` in the pool `training` (one slot by default), so
concurrent runs take turns training instead of stacking on one host. Every task has a time limit.
When `register` makes a new version the champion, it emits an event on the asset
`model_compression/champion` (extra: registered model, version, `models:/` URI) for a deploy DAG.

A failing variant fails only its own tasks and is recorded, with its error, in its MLflow child
run; `select` runs whatever happened and reports it. Bad input (a missing dataset, a broken model
file) fails `train` at once with a message naming the problem, without retries.
"""
from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import (AssetOrTimeSchedule, CronTriggerTimetable, Param, dag,
                         get_current_context, task, task_group)

from pipeline.airflow_adapter.assets import CHAMPION_CHANGES, TRAINING_DATASET
from pipeline.config import PipelineConfig
from pipeline.variants import SEARCH_ROUNDS, all_variant_names

# The trigger form's sections, in order; a setting not listed here lands in the last one.
FORM_SECTIONS = {
    "Variants": ["variants"],
    "Data and model": ["dataset", "model_path", "allow_unsafe_model", "train_limit", "test_limit",
                       "validation_fraction", "pixel_range", "calibration_samples", "seed"],
    "Baseline training": ["epochs", "batch_size", "learning_rate", "augment"],
    "Compression techniques": ["finetune_epochs", "prune_epochs", "prune_sparsity",
                               "prune_size_exponent", "prune_block", "prune_block_pointwise",
                               "prune_structured", "sparse_storage", "cluster_count",
                               "distill_epochs", "distill_temperature", "distill_alpha",
                               "student_width", "student_init", "technique_retries",
                               "search_trials", "search_train_images"],
    "Measurement": ["latency_runs", "latency_warmup"],
    "Quality gates and champion": ["max_accuracy_drop_pts", "min_accuracy", "min_compression_ratio",
                                   "max_latency_ms", "max_peak_memory_mb", "max_latency_ratio",
                                   "max_memory_ratio", "objective",
                                   "champion_accuracy_tolerance_pts"],
    "MLflow": ["registered_model_name", "experiment"],
    "Other settings": [],
}


def _section(name: str) -> str:
    return next((title for title, names in FORM_SECTIONS.items() if name in names), "Other settings")


def _params() -> dict[str, Param]:
    """The trigger form: one field per setting of PipelineConfig, with its description, type and
    range from there (the only place they are written), in titled sections. The defaults are the
    deployment's: PipelineConfig's, overridden by PIPELINE_* variables where Airflow runs."""
    params = {}
    defaults = PipelineConfig.from_mapping({}).to_dict()
    order = {title: index for index, title in enumerate(FORM_SECTIONS)}
    specs = sorted(PipelineConfig.describe().items(), key=lambda item: order[_section(item[0])])
    for name, spec in specs:
        schema = {k: v for k, v in spec.items() if k not in ("default", "description")}
        if name == "variants":
            # type array + `examples`: Airflow's form shows a multi-select of those values;
            # items.enum makes the schema reject any other name.
            names = all_variant_names()
            schema.update(minItems=1, uniqueItems=True, examples=names,
                          items={"type": "string", "enum": names})
        elif spec["type"] == "string" and "enum" not in schema:
            schema["minLength"] = 1
        params[name] = Param(defaults[name], description=spec["description"],
                             section=_section(name), **schema)
    return params


PARAMS = _params()


# The first retry waits this long (then exponential backoff); tests lower it.
RETRY_DELAY = timedelta(seconds=float(os.environ.get("PIPELINE_RETRY_DELAY_SECONDS", "15")))

# Each stage's time limit (execution_timeout), per attempt: generous for the default CNN on a
# 2-core machine (train+optimize took 6 min there), so only a hung task reaches it.
# PIPELINE_<STAGE>_TIMEOUT_MINUTES overrides one, e.g. PIPELINE_TRAIN_TIMEOUT_MINUTES=720.
_DEFAULT_TIMEOUT_MINUTES = {"plan": 5, "recipes": 5, "train": 360, "search_ask": 10,
                            "search_trial": 360, "optimize": 360,
                            "quantize": 60, "evaluate": 60, "benchmark": 60, "select": 30,
                            "register": 30}
TIMEOUTS = {stage: timedelta(minutes=float(os.environ.get(f"PIPELINE_{stage.upper()}_TIMEOUT_MINUTES",
                                                          minutes)))
            for stage, minutes in _DEFAULT_TIMEOUT_MINUTES.items()}

# The pool that bounds training across DAG runs (created with `airflow pools set` by make run,
# make up and the Docker stack's airflow-init; PIPELINE_TRAINING_POOL_SLOTS slots, default 1).
TRAINING_POOL = "training"

# The grid's names of mapped task instances (rendered from the task's arguments, so they show
# while the task runs): the recipe for `optimize`, the variant for the `variant` group.
RECIPE_LABEL = "{{ task.op_kwargs['recipe'] }}"
VARIANT_LABEL = "{{ task.op_kwargs['variant'] }}"
QUANTIZED_LABEL = "{{ task.op_kwargs['quantized']['variant'] }}"
EVALUATED_LABEL = "{{ task.op_kwargs['evaluated']['variant'] }}"
TRIAL_LABEL = "{{ task.op_kwargs['spec']['label'] }}"

SCHEDULE = AssetOrTimeSchedule(
    # run_immediately=0: unpausing on a Monday must not start a full run for this week's slot.
    timetable=CronTriggerTimetable(os.environ.get("PIPELINE_SCHEDULE", "0 3 * * 1"), timezone="UTC",
                                   run_immediately=timedelta(0)),
    assets=TRAINING_DATASET)


def documented_task(**kwargs):
    """@task(**kwargs) with the function's docstring as the task's doc in the UI: Airflow copies
    it by itself only for tasks that are not mapped."""
    return lambda function: task(doc_md=function.__doc__, **kwargs)(function)


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
    @documented_task(execution_timeout=TIMEOUTS["plan"])
    def plan() -> list[str]:
        """Validate the trigger form into one config before anything heavy runs: the variants."""
        config = _input_errors_fail_fast(PipelineConfig.from_mapping, _config_values(get_current_context()))
        return config.variants

    @documented_task(execution_timeout=TIMEOUTS["recipes"])
    def recipes(variants: list[str]) -> list[str]:
        """The optimized Keras models those variants need, each trained once."""
        from pipeline import stages
        return stages.recipes(variants)

    # Training-type tasks go to the `training` queue (e.g. GPU workers), the rest to `default`.
    @documented_task(queue="training", pool=TRAINING_POOL, execution_timeout=TIMEOUTS["train"],
          on_failure_callback=_close_parent_run)
    def train() -> dict:
        """Load the dataset and train the baseline (or load the given model), start the MLflow
        parent run, and hand on the run context every later task reads."""
        from pipeline import stages
        context = get_current_context()
        tags = {"airflow_dag_id": context["dag"].dag_id, "airflow_run_id": context["run_id"]}
        return _input_errors_fail_fast(stages.train, _config_values(context), context["run_id"], tags)

    @documented_task(queue="training", pool=TRAINING_POOL, execution_timeout=TIMEOUTS["optimize"],
          map_index_template=RECIPE_LABEL,
          trigger_rule="all_done",  # after the searches, whatever their trials did
          max_active_tis_per_dagrun=1)  # fine-tuning saturates a worker's cores
    def optimize(ctx: dict | None, recipe: str) -> dict:
        """Fine-tune one optimized Keras model (pruning, clustering, QAT, distillation or a
        combination continuing from its prefix) and log it for the variants that need it; for
        an auto-* variant, take its search's best trial."""
        from pipeline import stages
        from pipeline.errors import TechniqueError  # the model has a layer it cannot handle
        return _input_errors_fail_fast(stages.optimize, _require_context(ctx), recipe,
                                       permanent=(TechniqueError,))

    @documented_task(trigger_rule="all_done",  # runs when an optimization failed: it records why
          execution_timeout=TIMEOUTS["quantize"], map_index_template=VARIANT_LABEL)
    def quantize(ctx: dict | None, variant: str) -> dict:
        """Convert one variant to .tflite with its quantization (its child MLflow run starts
        here); a variant that cannot apply to this model is skipped with the reason."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline import stages
        try:
            return _input_errors_fail_fast(stages.quantize, _require_context(ctx), variant,
                                           permanent=(stages.VariantFailed,))  # its optimization failed
        except stages.VariantSkipped as reason:  # cannot apply to this model: shown as skipped
            raise AirflowSkipException(str(reason)) from None

    @documented_task(execution_timeout=TIMEOUTS["evaluate"], map_index_template=QUANTIZED_LABEL)
    def evaluate(ctx: dict, quantized: dict) -> dict:
        """Accuracy of the variant's .tflite on the test split, through LiteRT, and its
        agreement with the Keras model."""
        from pipeline import stages
        return stages.evaluate(ctx, quantized)

    @documented_task(execution_timeout=TIMEOUTS["benchmark"], map_index_template=EVALUATED_LABEL)
    def benchmark(ctx: dict, evaluated: dict) -> dict:
        """Size (raw and gzipped), latency percentiles and peak memory of the variant on
        LiteRT's CompiledModel (XNNPACK)."""
        from pipeline import stages
        return stages.benchmark(ctx, evaluated)

    @task_group(group_id="variant")
    def variant(ctx: dict, variant: str):
        # Keyword arguments: the map_index_templates read them from the task's op_kwargs.
        quantized = quantize(ctx=ctx, variant=variant)
        optimized >> quantized  # noqa: F821 (bound below, before the group is expanded)
        return benchmark(ctx=ctx, evaluated=evaluate(ctx=ctx, quantized=quantized))

    @documented_task(trigger_rule="all_done", execution_timeout=TIMEOUTS["select"],
          on_failure_callback=_close_parent_run)  # report it all
    def select(ctx: dict | None) -> dict:
        """Apply the quality gates to every variant's results, pick the champion by the
        objective, and write the summary table, report and charts to the parent run."""
        from pipeline import stages
        return stages.select(_require_context(ctx))

    @documented_task(outlets=[CHAMPION_CHANGES], execution_timeout=TIMEOUTS["register"],
          on_failure_callback=_close_parent_run)
    def register(ctx: dict, selection: dict) -> dict:
        """Register the selected variant as a servable model version, move the challenger and
        (when it beats the current one) champion aliases; a new champion emits an event on the
        asset model_compression/champion. Skipped when no variant passed the gates."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline import stages
        from pipeline.airflow_adapter.assets import announce_champion
        outcome = stages.register(ctx, selection)
        if outcome.get("skipped"):
            raise AirflowSkipException(outcome["reason"])
        announce_champion(get_current_context()["outlet_events"], outcome)
        return outcome

    @documented_task(trigger_rule="all_done",  # a failed trial does not end the search
                     execution_timeout=TIMEOUTS["search_ask"])
    def search_ask(ctx: dict | None, round_number: int) -> list[dict]:
        """Choose the next round of trials of every auto-* variant's search (Optuna, from the
        trials so far); skipped when there is none (no auto-* variant, or the budget is spent)."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline import stages
        specs = stages.search_ask(_require_context(ctx), round_number)
        if not specs:
            raise AirflowSkipException("no auto-* search trials in this round")
        return specs

    @documented_task(queue="training", pool=TRAINING_POOL, execution_timeout=TIMEOUTS["search_trial"],
                     map_index_template=TRIAL_LABEL)
    def search_trial(ctx: dict, spec: dict) -> dict:
        """One trial of a search: the technique chain with the trial's settings, converted and
        measured on the validation split, in its own MLflow child run."""
        from pipeline import stages
        return stages.search_trial(ctx, spec)

    planned = plan()
    ctx = train()
    planned >> ctx
    # The auto-* searches: rounds of mapped trials (on the training queue, so Celery workers
    # share them), each round chosen from the ones before; optimize picks each search's best.
    previous = ctx
    for number in range(SEARCH_ROUNDS):
        asked = search_ask.override(task_id=f"search_ask_{number + 1}")(ctx, number)
        previous >> asked
        previous = search_trial.override(task_id=f"search_trial_{number + 1}").partial(
            ctx=ctx).expand(spec=asked)
    optimized = optimize.partial(ctx=ctx).expand(recipe=recipes(planned))
    previous >> optimized
    variants = variant.partial(ctx=ctx).expand(variant=planned)
    selection = select(ctx)
    variants >> selection
    register(ctx, selection)


model_compression()
