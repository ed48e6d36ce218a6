"""The Airflow Asset for the training dataset, and the check that publishes a dataset through it.

`publish_dataset` emits an event on `TRAINING_DATASET` whose extra names the dataset
(`{"dataset": "fashion-mnist"}` or an absolute path); `model_compression` is scheduled on the
asset and trains on the dataset named by the latest triggering event.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.sdk import Asset

# A logical asset: the dataset's location changes from event to event (it is in the event's
# extra), so the URI is a stable name in a private `x-` scheme, which Airflow keeps verbatim.
TRAINING_DATASET = Asset(name="model_compression/training_dataset",
                         uri="x-model-compression://training-dataset")


def dataset_event_extra(spec: str) -> dict[str, Any]:
    """Load and validate the whole dataset `spec` ('fashion-mnist', an image folder or an .npz),
    as training will; return the asset event's extra. Raises PipelineInputError when unusable."""
    from pipeline.sources.data import load_dataset

    if spec not in ("fashion-mnist", "fashion_mnist"):
        # Absolute, so the consuming run finds the same files whatever its working directory.
        spec = str(Path(spec).expanduser().resolve())
    dataset = load_dataset(spec)
    return {"dataset": spec, "train_images": dataset.train_count + dataset.val_count,
            "test_images": dataset.test_count, "classes": dataset.num_classes,
            "input_shape": list(dataset.input_shape)}
