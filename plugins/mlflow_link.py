"""Airflow's plugins folder entry for the "MLflow run" link (pipeline.airflow_adapter.mlflow_link).

An installed package registers the plugin through its `airflow.plugins` entry point
(pyproject.toml). Airflow loads the plugins folder as well, and a plugin found both ways is
skipped the second time with an import error ("already registered"), so this file exposes the
plugin class only where the package's entry point is not installed (pipeline/ on PYTHONPATH).
"""
from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT = "pipeline.airflow_adapter.mlflow_link:MLflowLinkPlugin"

if not any(point.value == ENTRY_POINT for point in entry_points(group="airflow.plugins")):
    from pipeline.airflow_adapter.mlflow_link import MLflowLinkPlugin  # noqa: F401 (found by Airflow)
