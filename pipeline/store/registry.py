"""The MLflow model registry: the registered model's versions and aliases (`champion`,
`challenger`), and `promote`, the rollback path. The servable model is `pipeline.serving`; the
policy that decides which version becomes champion is `pipeline.selection.champion`.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineInputError

CHAMPION, CHALLENGER = "champion", "challenger"


def promote(name: str, version: str | int, alias: str = CHAMPION,
            client: MlflowClient | None = None) -> dict[str, Any]:
    """Point `alias` of registered model `name` at an existing `version` that passed its gates:
    the rollback path (`promote(name, 3, "champion")`). Raises PipelineInputError otherwise."""
    client = client or MlflowClient()
    try:
        model_version = client.get_model_version(name, str(version))
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        known = sorted((int(v.version) for v in versions(client, name)))
        raise PipelineInputError(
            f"registered model {name!r} has no version {version} "
            f"(versions: {', '.join(map(str, known)) or 'none'})") from None
    if model_version.tags.get("gates_passed") != "true":
        raise PipelineInputError(
            f"version {version} of {name!r} did not pass the quality gates (tag gates_passed="
            f"{model_version.tags.get('gates_passed')!r}): refusing to make it {alias!r}")
    previous = alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, model_version.version)
    return {"name": name, "version": model_version.version, "alias": alias,
            "previous_version": previous.version if previous else None}


def find_version(client, name, parent_run_id, variant):
    """The version a pipeline run registered for `variant` (its tags), or None."""
    matches = [v for v in versions(client, name)
               if v.tags.get("parent_run_id") == parent_run_id and v.tags.get("variant") == variant]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def versions(client, name):
    """Every version of `name` (paged), [] when the registered model does not exist yet."""
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def alias_version(client, name, alias):
    """The version `alias` points at, or None (no such alias or registered model)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def summary(client, name, version, decision, reused) -> dict[str, Any]:
    """What a registration reports: the version, its aliases, the champion and the decision."""
    aliases = sorted(client.get_model_version(name, version.version).aliases)
    champion = alias_version(client, name, CHAMPION)
    return {"name": name, "version": version.version, "aliases": aliases,
            "champion_version": champion.version if champion else None, "decision": decision,
            "model_uri": f"models:/{name}/{version.version}", "reused": reused}


def run_json(client, run_id: str | None, artifact_file: str) -> Any | None:
    """A JSON artifact of a run read through `client`, or None when the run has none."""
    if not run_id or artifact_file not in {f.path for f in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as download_dir:
        return json.loads(Path(client.download_artifacts(run_id, artifact_file, download_dir))
                          .read_text())
