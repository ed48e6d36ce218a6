"""Training-time compression techniques (TF Model Optimization; qat4 is our own small Keras
wrapper, TF-MOT's QAT being int8 only), one module each: pruning, clustering, qat, qat4,
distillation. Around them, one job per module:

    recipes.py      the registry (TECHNIQUES), the `Technique` interface, apply_recipe
    finetune.py     fine-tuning shared by the techniques; TF-MOT's refusals as TechniqueErrors
    graph.py        fuse_layers: the model TF-MOT's techniques work on
    persistence.py  save_optimized, load_optimized
    stats.py        kernel_stats, keras_params (seen through TF-MOT's wrappers)
    search.py       the auto-* variants: an Optuna search of a chain's settings
    backoff.py, sizing.py, train.py, validation.py   retries within the accuracy budget; epochs
                    and batch sizes; baseline training; validation accuracy

This file only re-exports what code outside the package uses; modules inside the package import
from the module that defines a name, never from here (no import cycles).

TensorFlow and TF-MOT are imported inside functions: importing this package stays cheap (the
Airflow DAG processor imports the DAG files every few seconds).
"""
from pipeline.errors import TechniqueError
from pipeline.techniques.graph import fuse_layers
from pipeline.techniques.persistence import load_optimized, save_optimized
from pipeline.techniques.recipes import TECHNIQUES, Technique, apply_recipe, parse_recipe
from pipeline.techniques.stats import keras_params, kernel_stats

__all__ = ["TECHNIQUES", "Technique", "TechniqueError", "apply_recipe", "fuse_layers",
           "keras_params", "kernel_stats", "load_optimized", "parse_recipe", "save_optimized"]
