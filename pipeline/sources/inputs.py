"""Inputs by URI: the dataset and the model a run starts from, wherever they live.

A worker cannot read the laptop path of the person who triggered the run, so `dataset` and
`model_path` may be:
- a local path (it must then exist on the worker that runs `train`);
- `s3://BUCKET/KEY` (a file: an .npz, a .keras/.h5/.tflite model) or `s3://BUCKET/PREFIX/` (a
  folder: an image folder, a SavedModel), read with boto3's usual credentials and endpoint
  (MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL for S3-compatible stores);
- an MLflow URI: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/PATH`,
  `mlflow-artifacts:/...`. A model version registered by this pipeline serves a quantized .tflite;
  it carries the URI of the float model it was compressed from (tag `float_model_uri`), and that
  float model is what a new run starts from.

`fetch_input` downloads a URI into a fresh folder of the run and returns the local path; a URI
that does not exist or cannot be read is one PipelineInputError naming it (without credentials).
"""
from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import PipelineInputError, first_line, without_credentials

log = logging.getLogger("pipeline.sources.inputs")

MLFLOW_SCHEMES = ("models", "runs", "mlflow-artifacts")
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5", ".tflite")
FLOAT_MODEL_TAG = "float_model_uri"


def is_uri(spec: str | None) -> bool:
    return bool(spec) and urlsplit(str(spec)).scheme in ("s3", *MLFLOW_SCHEMES)


def fetch_input(spec: str, dest: Path, what: str) -> Path:
    """A local path for `spec` ('dataset' or 'model', for messages); URIs are downloaded into
    `dest`. Local paths are returned as they are (the loaders check them)."""
    scheme = urlsplit(spec).scheme
    if scheme == "s3":
        return _fetch_s3(spec, dest, what)
    if scheme in MLFLOW_SCHEMES:
        path = _fetch_mlflow(spec, dest, what)
        return find_model(path, spec) if what == "model" else path
    if scheme not in ("", "file") and len(scheme) > 1:
        raise PipelineInputError(
            f"unsupported {what} URI {without_credentials(spec)}: give a local path, s3://BUCKET/KEY, "
            "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")
    return Path(spec[len("file://"):] if scheme == "file" else spec).expanduser()


def find_model(path: Path, uri: str) -> Path:
    """The model inside a downloaded MLflow model or artifact folder: a .keras/.h5 file, a
    SavedModel folder, or a float .tflite (in that order)."""
    if path.is_file() or not path.is_dir():
        return path
    if (path / "saved_model.pb").exists():
        return path
    for suffix in MODEL_SUFFIXES:
        found = sorted(path.rglob(f"*{suffix}"))
        if found:
            return found[0]
    saved = sorted(p.parent for p in path.rglob("saved_model.pb"))
    if saved:
        return saved[0]
    raise PipelineInputError(f"{without_credentials(uri)} holds no model the pipeline can read (a .keras, "
                             ".h5 or .tflite file or a SavedModel folder)")


def _fetch_mlflow(uri: str, dest: Path, what: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.store import tracking
    tracking.client()  # sets the tracking URI for the fluent API
    source = uri
    if uri.startswith("models:/"):
        source = _float_model_uri(uri) or uri
        if source != uri:
            log.info("%s was compressed from the float model %s: starting from that", uri, source)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source.split("#")[0],
                                                        dst_path=str(dest)))
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise PipelineInputError(f"{what} {without_credentials(uri)} does not exist in MLflow at "
                                     f"{without_credentials(tracking.tracking_uri())}: {first_line(error)}") \
                from None
        raise
    except (FileNotFoundError, OSError) as error:
        raise PipelineInputError(f"{what} {without_credentials(uri)} cannot be read: {first_line(error)}") \
            from None


def _float_model_uri(uri: str) -> str | None:
    """The `float_model_uri` tag of the model version a models:/ URI names, if it has one."""
    from mlflow.exceptions import MlflowException

    from pipeline.store import tracking
    name, _, rest = uri[len("models:/"):].partition("@")
    try:
        if rest:
            version = tracking.client().get_model_version_by_alias(name, rest)
        else:
            name, _, number = uri[len("models:/"):].partition("/")
            version = tracking.client().get_model_version(name, number)
    except MlflowException as error:
        raise PipelineInputError(f"model {without_credentials(uri)} does not exist in the MLflow registry: "
                                 f"{first_line(error)}") from None
    return version.tags.get(FLOAT_MODEL_TAG)


def _fetch_s3(uri: str, dest: Path, what: str) -> Path:
    """A file (s3://bucket/key) or every object under a prefix (s3://bucket/prefix/)."""
    from botocore.exceptions import ClientError

    from pipeline.store.s3 import Endpoint, parse_s3_uri, translated_errors
    bucket, key = parse_s3_uri(uri)
    endpoint = Endpoint()
    s3 = endpoint.client
    dest.mkdir(parents=True, exist_ok=True)
    with translated_errors(endpoint, bucket):
        if key and not uri.endswith("/"):
            try:
                s3.head_object(Bucket=bucket, Key=key)
                target = dest / Path(key).name
                s3.download_file(bucket, key, str(target))
                return target
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                    if error.response.get("Error", {}).get("Code") == "NoSuchBucket":
                        raise _missing(what, uri, endpoint.display_url, "no such bucket") \
                            from None
                    raise
        prefix = f"{key}/" if key else ""
        root = dest / (Path(key).name or bucket)
        count = 0
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix):
                for item in page.get("Contents", []):
                    relative = item["Key"][len(prefix):]
                    if not relative or relative.endswith("/"):
                        continue
                    target = root / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, item["Key"], str(target))
                    count += 1
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "NoSuchBucket":
                raise _missing(what, uri, endpoint.display_url, "no such bucket") from None
            raise
    if count == 0:
        raise _missing(what, uri, endpoint.display_url, "no object or folder of that name")
    log.info("fetched %d objects of %s", count, uri)
    return root


def _missing(what: str, uri: str, endpoint: str, reason: str) -> PipelineInputError:
    return PipelineInputError(f"{what} {without_credentials(uri)} does not exist on the S3 endpoint "
                              f"{endpoint} ({reason})")

