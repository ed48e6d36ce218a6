"""S3, or any S3-compatible store (MinIO, Ceph, a cloud), as the artifact store behind the MLflow
tracking server.

Only the tracking server talks to S3: it runs `mlflow server --artifacts-destination
s3://BUCKET/PREFIX ...` with MLFLOW_S3_ENDPOINT_URL and the S3 credentials in *its* environment,
and the pipeline uploads and downloads artifacts through it, holding no S3 credentials. This
module sets the store up: `ensure_bucket` creates the bucket when it is missing (idempotent),
`describe_endpoint` says which endpoint and which credential source would be used, and an
unreachable endpoint is one line naming it.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile,
an instance role) or, with `aws_conn_id`, from an Airflow connection laid out like the Amazon
provider's (login = access key id, password = secret key, extra `endpoint_url`, `region_name`).
They go to boto3 and nowhere else: never logged, returned, tagged, or put into XCom.

    python -m pipeline.store.s3 ensure-bucket s3://mlflow/artifacts [--endpoint-url URL] [--wait 60]
    python -m pipeline.store.s3 describe [--endpoint-url URL]

Exit status: 0 on success, 2 on bad input or rejected credentials (one line on stderr), 1 when
the endpoint stays unreachable (one line) or on other failures.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import PipelineInputError

log = logging.getLogger("pipeline.store.s3")

# Where the endpoint comes from when none is given, first match wins: the variable the MLflow
# server reads, then the ones boto3 itself reads.
ENDPOINT_VARIABLES = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
AWS_DEFAULT_ENDPOINT = "https://s3.amazonaws.com"
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NOT_FOUND = ("404", "NoSuchBucket", "NotFound")
_DENIED = ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "InvalidToken", "ExpiredToken")


class S3EndpointUnreachable(ConnectionError):
    """The S3 endpoint did not answer: the message names it, why, and what to do."""


@dataclass(frozen=True)
class Endpoint:
    """How this process would reach S3. Holds the boto3 session (and so the credentials), but
    neither its repr nor `describe()` shows them."""
    url: str | None            # None: AWS's own endpoint for the region
    source: str                # where `url` came from
    region: str | None
    credentials_source: str    # e.g. "env", "shared-credentials-file", "airflow connection x"
    verify_tls: bool
    addressing_style: str
    session: Any = None

    @property
    def display_url(self) -> str:
        return _without_userinfo(self.url) if self.url else AWS_DEFAULT_ENDPOINT

    def describe(self) -> dict[str, Any]:
        return {"endpoint_url": self.display_url, "endpoint_source": self.source,
                "region": self.region, "credentials": self.credentials_source,
                "verify_tls": self.verify_tls, "addressing_style": self.addressing_style}

    def __repr__(self) -> str:  # the session holds the credentials: keep it out of logs
        return f"Endpoint({self.describe()})"

    def client(self):
        from botocore.config import Config
        config = Config(signature_version="s3v4", connect_timeout=5, read_timeout=60,
                        retries={"max_attempts": 3, "mode": "standard"},
                        s3={"addressing_style": self.addressing_style})
        return self.session.client("s3", endpoint_url=self.url, region_name=self.region,
                                   verify=None if self.verify_tls else False, config=config)


def parse_s3_uri(uri_or_bucket: str) -> tuple[str, str]:
    """`s3://bucket/prefix`, `s3://bucket` or `bucket` -> (bucket, prefix without slashes)."""
    text = (uri_or_bucket or "").strip()
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme != "s3":
            raise PipelineInputError(f"{uri_or_bucket!r} is not an S3 URI (expected "
                                     "s3://BUCKET/PREFIX or a bucket name)")
        bucket, prefix = parts.netloc, parts.path.strip("/")
    else:
        bucket, _, prefix = text.partition("/")
        prefix = prefix.strip("/")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise PipelineInputError(
            f"invalid S3 bucket name {bucket!r} in {uri_or_bucket!r}: 3-63 characters, lowercase "
            "letters, digits, dots and hyphens, starting and ending with a letter or digit")
    return bucket, prefix


def describe_endpoint(endpoint_url: str | None = None,
                      aws_conn_id: str | None = None) -> dict[str, Any]:
    """Which endpoint, region and credential source S3 calls would use (no network call, no
    secrets): {"endpoint_url", "endpoint_source", "region", "credentials", "verify_tls",
    "addressing_style"}."""
    return resolve_endpoint(endpoint_url, aws_conn_id).describe()


def resolve_endpoint(endpoint_url: str | None = None,
                     aws_conn_id: str | None = None) -> Endpoint:
    """The endpoint and credentials: `endpoint_url`, else the Airflow connection's extra
    `endpoint_url`, else MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else
    AWS. Credentials: the Airflow connection `aws_conn_id` when given and Airflow is installed,
    else boto3's chain (the environment first)."""
    import boto3

    connection = _airflow_connection(aws_conn_id) if aws_conn_id else None
    extra = (connection.extra_dejson or {}) if connection is not None else {}
    if endpoint_url:
        url, source = endpoint_url, "argument"
    elif extra.get("endpoint_url"):
        url, source = extra["endpoint_url"], f"airflow connection {aws_conn_id}"
    else:
        url, source = None, "AWS default"
        for variable in ENDPOINT_VARIABLES:
            if os.environ.get(variable):
                url, source = os.environ[variable], variable
                break
    region = (extra.get("region_name") or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION") or ("us-east-1" if url else None))
    if connection is not None and connection.login:
        session = boto3.session.Session(
            aws_access_key_id=connection.login, aws_secret_access_key=connection.password,
            aws_session_token=extra.get("aws_session_token"), region_name=region)
        credentials_source = f"airflow connection {aws_conn_id}"
    else:
        session = boto3.session.Session(region_name=region)
        found = session.get_credentials()
        credentials_source = found.method if found is not None else "none found"
    verify_tls = os.environ.get("MLFLOW_S3_IGNORE_TLS", "").strip().lower() not in ("1", "true")
    # The same variable the MLflow server reads; "auto" lets botocore choose per endpoint.
    addressing_style = os.environ.get("MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE") or "auto"
    return Endpoint(url, source, region, credentials_source, verify_tls, addressing_style,
                    session)


def ensure_bucket(uri_or_bucket: str, endpoint_url: str | None = None, *,
                  aws_conn_id: str | None = None, wait: float = 0.0) -> dict[str, Any]:
    """Create the bucket of `uri_or_bucket` (s3://bucket/prefix or a bucket name) unless it
    exists; safe to call any number of times, also concurrently. `wait` > 0 keeps trying an
    unreachable endpoint for that many seconds (an endpoint still starting up).

    Returns {"bucket", "prefix", "endpoint_url", "created"}. Raises S3EndpointUnreachable when
    the endpoint does not answer, PipelineInputError for a bad name, missing or rejected
    credentials, or a bucket name taken by another account."""
    bucket, prefix = parse_s3_uri(uri_or_bucket)
    endpoint = resolve_endpoint(endpoint_url, aws_conn_id)
    deadline = time.monotonic() + max(wait, 0.0)
    while True:
        try:
            created = _ensure(endpoint, bucket)
            break
        except S3EndpointUnreachable as error:
            if time.monotonic() >= deadline:
                raise
            log.info("%s; retrying", error)
            time.sleep(1.0)
    log.info("bucket %s at %s %s", bucket, endpoint.display_url,
             "created" if created else "already exists")
    return {"bucket": bucket, "prefix": prefix, "endpoint_url": endpoint.display_url,
            "created": created}


def _ensure(endpoint: Endpoint, bucket: str) -> bool:
    """True when this call created the bucket, False when it was there."""
    from botocore.exceptions import ClientError
    s3 = endpoint.client()
    with translated_errors(endpoint, bucket):
        if _bucket_exists(s3, bucket):
            return False
        arguments: dict[str, Any] = {"Bucket": bucket}
        if endpoint.region not in (None, "us-east-1", "aws-global"):
            arguments["CreateBucketConfiguration"] = {"LocationConstraint": endpoint.region}
        try:
            s3.create_bucket(**arguments)
            return True
        except ClientError as error:
            code = _error_code(error)
            if code == "BucketAlreadyOwnedByYou":  # created meanwhile by us (another task)
                return False
            if code == "BucketAlreadyExists":
                raise PipelineInputError(
                    f"S3 bucket {bucket!r} at {endpoint.display_url} already exists and belongs "
                    "to another account: choose another bucket name") from None
            raise


def _bucket_exists(s3, bucket: str) -> bool:
    from botocore.exceptions import ClientError
    try:
        s3.head_bucket(Bucket=bucket)
        return True
    except ClientError as error:
        if _error_code(error) in _NOT_FOUND:
            return False
        raise


class translated_errors:
    """Turn botocore's connection and credential errors into one line naming the endpoint."""

    def __init__(self, endpoint: Endpoint, bucket: str):
        self.endpoint, self.bucket = endpoint, bucket

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        from botocore.exceptions import (ClientError, ConnectionClosedError,
                                         ConnectTimeoutError, EndpointConnectionError,
                                         NoCredentialsError, PartialCredentialsError,
                                         ReadTimeoutError, SSLError)
        where = self.endpoint.display_url
        if isinstance(error, (EndpointConnectionError, ConnectTimeoutError,
                              ConnectionClosedError, ReadTimeoutError, SSLError)):
            raise S3EndpointUnreachable(unreachable_message(where, error, self.endpoint.source)) \
                from None
        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            raise PipelineInputError(
                f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or give an Airflow connection)") from None
        if isinstance(error, ClientError) and _error_code(error) in _DENIED:
            raise PipelineInputError(
                f"S3 endpoint {where} denied access to bucket {self.bucket!r} "
                f"({_error_code(error)}): check the credentials from "
                f"{self.endpoint.credentials_source} and their permissions") from None
        return False


def unreachable_message(endpoint_display: str, error: BaseException, source: str) -> str:
    """'S3 endpoint URL is unreachable (REASON): what to do', for an endpoint from `source`."""
    if source == "AWS default":
        fix = "check the network, or set MLFLOW_S3_ENDPOINT_URL for an S3-compatible store"
    else:
        fix = f"start it or fix {'the endpoint URL' if source == 'argument' else source}"
    return f"S3 endpoint {endpoint_display} is unreachable ({_reason(error)}): {fix}"


def _reason(error: BaseException) -> str:
    """A few words on why a connection failed, from the exception chain."""
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError, SSLError
    seen, pending = set(), [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, socket.gaierror):
            return "host name not found"
        if isinstance(current, ConnectTimeoutError):
            return "connection timed out"
        if isinstance(current, ReadTimeoutError):
            return "no answer in time"
        if isinstance(current, SSLError):
            return "TLS error"
        kwargs = getattr(current, "kwargs", None) or {}
        pending.extend([current.__cause__, current.__context__, kwargs.get("error")])
        pending.extend(a for a in getattr(current, "args", ()) if isinstance(a, BaseException))
    text = str(error)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("Name or service not known", "host name not found"),
                           ("timed out", "connection timed out")):
        if needle in text:
            return reason
    return type(error).__name__


def _error_code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _airflow_connection(conn_id: str):
    """The Airflow connection `conn_id`, or None when Airflow is not installed here."""
    try:
        from airflow.sdk import Connection
    except ImportError:
        log.info("Airflow is not installed: S3 credentials come from the environment")
        return None
    try:
        return Connection.get(conn_id)
    except Exception as error:  # AirflowNotFoundException and kin
        raise PipelineInputError(f"Airflow connection {conn_id!r} not found: {error}") from None


# --------------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see python -m pipeline.store.s3 --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline.store.s3",
                     description="Set up the S3 artifact store behind the MLflow server.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ensure = commands.add_parser("ensure-bucket", help="create the bucket unless it exists")
    ensure.add_argument("uri", metavar="s3://BUCKET/PREFIX", help="or just a bucket name")
    ensure.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep trying an unreachable endpoint this long (default 0)")
    describe = commands.add_parser("describe", help="endpoint, region and credential source")
    for command in (ensure, describe):
        command.add_argument("--endpoint-url", help="default: MLFLOW_S3_ENDPOINT_URL, then AWS")
        command.add_argument("--aws-conn-id", help="take credentials from this Airflow connection")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "describe":
            print(json.dumps(describe_endpoint(args.endpoint_url, args.aws_conn_id), indent=2))
            return 0
        outcome = ensure_bucket(args.uri, args.endpoint_url, aws_conn_id=args.aws_conn_id,
                                wait=args.wait)
    except PipelineInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except S3EndpointUnreachable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    state = "created" if outcome["created"] else "already exists"
    print(f"bucket {outcome['bucket']} at {outcome['endpoint_url']}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
