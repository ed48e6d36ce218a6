"""
### publish_dataset

Publish a training dataset: check that it loads and is usable for training (every image, every
label), then emit an event on the asset `model_compression/training_dataset` naming it.
`model_compression` is scheduled on that asset, so publishing a dataset starts a compression run
on it.

`dataset`: `fashion-mnist`, an image folder (one subfolder per class) or an `.npz` with
`x_train`, `y_train`, `x_test`, `y_test`, on a path every worker can read. A dataset that does not
load fails the task at once with a message naming the problem, emits no event, and is not retried.
"""
from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, get_current_context, task

from pipeline.airflow_adapter.assets import TRAINING_DATASET


@dag(
    dag_id="publish_dataset",
    schedule=None,
    catchup=False,
    params={"dataset": Param("fashion-mnist", type="string", minLength=1,
                             description="'fashion-mnist', an image folder (one subfolder per "
                                         "class) or an .npz with x_train, y_train, x_test, y_test")},
    doc_md=__doc__,
    default_args={"retries": 0},
    tags=["compression", "dataset"],
)
def publish_dataset():
    # Loads and checks every image: an hour covers large folders on a slow shared disk.
    @task(outlets=[TRAINING_DATASET], execution_timeout=timedelta(hours=1))
    def publish() -> dict:
        """Load and check the dataset as training will, then emit the asset event naming it
        (with its image counts, classes and input shape)."""
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline.airflow_adapter.assets import dataset_event_extra
        from pipeline.errors import PipelineInputError

        context = get_current_context()
        try:
            extra = dataset_event_extra(context["params"]["dataset"])
        except PipelineInputError as error:
            raise AirflowFailException(str(error)) from None
        context["outlet_events"][TRAINING_DATASET].extra = extra
        return extra

    publish()


publish_dataset()
