"""The pipeline's Airflow Assets: the training dataset it consumes and the champion it produces.

`publish_dataset` emits an event on `TRAINING_DATASET` whose extra names the dataset
(`{"dataset": "fashion-mnist"}` or an absolute path); `model_compression` is scheduled on the
asset and trains on the dataset named by the latest triggering event.

`model_compression`'s `register` emits an event on `CHAMPION_MODEL` when, and only when, the run
moved the champion alias to its version (extra: the registered model, version and `models:/` URI),
so a deploy DAG can be scheduled on it (`schedule=[CHAMPION_MODEL]`). A task's outlets otherwise
get an event whenever it succeeds; the event goes through the alias `CHAMPION_CHANGES`, which
emits only the events the task adds to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.sdk import Asset, AssetAlias

# Logical assets: the dataset's location changes from event to event (it is in the event's
# extra), and so does the champion's version, so each URI is a stable name in a private `x-`
# scheme, which Airflow keeps verbatim.
TRAINING_DATASET = Asset(name="model_compression/training_dataset",
                         uri="x-model-compression://training-dataset")
CHAMPION_MODEL = Asset(name="model_compression/champion", uri="x-model-compression://champion")
CHAMPION_CHANGES = AssetAlias(name="model_compression/champion_changes")


def champion_changed(outcome: dict[str, Any]) -> bool:
    """Whether `register`'s outcome made its version the champion (the alias points at it)."""
    return (not outcome.get("skipped") and outcome.get("version") is not None
            and str(outcome.get("champion_version")) == str(outcome["version"]))


def announce_champion(outlet_events, outcome: dict[str, Any]) -> bool:
    """Add an event on CHAMPION_MODEL to the task's CHAMPION_CHANGES outlet when the champion
    changed; return whether it did."""
    if not champion_changed(outcome):
        return False
    outlet_events[CHAMPION_CHANGES].add(CHAMPION_MODEL, extra={
        "registered_model": outcome["name"], "version": str(outcome["version"]),
        "model_uri": outcome["model_uri"], "decision": outcome.get("decision", "")})
    return True


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
