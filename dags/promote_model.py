"""
### promote_model

Point an alias of the registered model at an existing version: the rollback path. To roll the
champion back to version 3, trigger with `version` 3 and `alias` `champion`.

Only a version that passed the quality gates when it was registered (tag `gates_passed` =
`true`) can be promoted. An unknown model or version, or an ungated version, fails the task at
once with a message naming the problem and changes nothing; it is not retried.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from airflow.sdk import Param, dag, get_current_context, task

from pipeline.config import PipelineConfig

# pipeline.store.registry's aliases (CHAMPION, CHALLENGER); importing it here would load MLflow each
# time the DAG processor parses this file.
ALIASES = ["champion", "challenger"]
log = logging.getLogger(__name__)


@dag(
    dag_id="promote_model",
    schedule=None,
    catchup=False,
    max_active_runs=1,  # alias moves happen one at a time, in trigger order
    params={
        "model_name": Param(PipelineConfig.__dataclass_fields__["registered_model_name"].default,
                            type="string", minLength=1, description="Registered model name"),
        "version": Param(type="integer", minimum=1, description="The version to promote"),
        "alias": Param("champion", type="string", enum=ALIASES,
                       description="The alias to point at that version"),
    },
    doc_md=__doc__,
    default_args={"retries": 0},
    tags=["compression", "mlflow", "registry"],
)
def promote_model():
    @task(execution_timeout=timedelta(minutes=10))  # a few MLflow registry calls
    def promote() -> dict:
        """Point the alias at the version after checking it exists and passed its gates; log
        the move (and the version it replaced)."""
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline.store import registry, tracking
        from pipeline.errors import PipelineInputError

        params = get_current_context()["params"]
        try:
            outcome = registry.promote(params["model_name"], params["version"], params["alias"],
                                       client=tracking.client())
        except PipelineInputError as error:
            raise AirflowFailException(str(error)) from None
        log.info("%s@%s: now version %s (was %s)", outcome["name"], outcome["alias"],
                 outcome["version"], outcome["previous_version"] or "unset")
        return outcome

    promote()


promote_model()
