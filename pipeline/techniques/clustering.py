"""Weight clustering (TF-MOT `cluster_weights`): each conv/dense kernel keeps at most
`config.cluster_count` distinct values (k-means++ centroids, fine-tuned), then the wrappers are
stripped. After pruning, clustering preserves sparsity (zeros stay zeros and one centroid is 0).

Which layers: the top-level Conv1D/2D/3D and Dense layers (what TF-MOT clusters) holding more
weights than there are clusters; other layers (and layers inside nested models) are left as they
are. Clustering works on `graph.fuse_layers(model)` (see there why).
Epochs and batch size follow the number of training images (`sizing.fine_tuning`); backing off,
each retry doubles the clusters and the epochs.
"""
from __future__ import annotations

import math

from pipeline.errors import TechniqueError
from pipeline.techniques import sizing
from pipeline.techniques.backoff import configured
from pipeline.techniques.finetune import tfmot_kernel_layers, wrap_and_finetune
from pipeline.techniques.graph import fuse_layers
from pipeline.techniques.validation import training_image_count

NAME = "cluster"
# TF-MOT's clustering guide fine-tunes far below the training rate: the centroids only need nudging.
LEARNING_RATE_SCALE = 0.05
MAX_CLUSTERS = 256  # the setting's maximum
RELAXED_EPOCHS_FACTOR = 2


def settings(model, dataset, config) -> dict:
    """What `apply` uses on this model and data."""
    plan = sizing.fine_tuning("finetune", config.finetune_epochs, config.batch_size,
                              training_image_count(dataset), to_data=config.size_to_data)
    return {"cluster_count": config.cluster_count, "finetune_epochs": plan.epochs,
            "batch_size": plan.batch_size}


def relax(settings: dict) -> dict | None:
    """Twice the clusters and epochs; None at MAX_CLUSTERS."""
    if settings["cluster_count"] >= MAX_CLUSTERS:
        return None
    return {"cluster_count": min(MAX_CLUSTERS, settings["cluster_count"] * 2),
            "finetune_epochs": math.ceil(settings["finetune_epochs"] * RELAXED_EPOCHS_FACTOR)}


def apply(model, dataset, config, *, applied: tuple[str, ...] = ()):
    import tensorflow_model_optimization as tfmot

    clustering = tfmot.clustering.keras
    config = configured(config, settings(model, dataset, config))
    model = fuse_layers(model)
    targets = {layer.name for layer in tfmot_kernel_layers(model)
               if layer.kernel.shape.num_elements() > config.cluster_count}
    if not targets:
        raise TechniqueError(
            f"{NAME}: model {model.name!r} has no Conv/Dense kernel with more than "
            f"{config.cluster_count} weights to cluster")
    params = {
        "number_of_clusters": config.cluster_count,
        "cluster_centroids_init": clustering.CentroidInitialization.KMEANS_PLUS_PLUS,
        "preserve_sparsity": "prune" in applied,
    }

    clustered = wrap_and_finetune(
        model, targets, lambda layer: clustering.cluster_weights(layer, **params), NAME, dataset,
        config, learning_rate=config.learning_rate * LEARNING_RATE_SCALE)
    return clustering.strip_clustering(clustered)
