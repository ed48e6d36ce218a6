"""The S3 (or S3-compatible) store behind the MLflow tracking server, which alone holds the S3
credentials. boto3 finds credentials and region; this module adds the MLflow server's endpoint
settings (MLFLOW_S3_ENDPOINT_URL, MLFLOW_S3_IGNORE_TLS, MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE),
creating the bucket unless it exists, waiting for an endpoint that is starting up, and one error
line naming the endpoint (never the credentials):

    python -m pipeline.store.s3 ensure-bucket s3://mlflow/artifacts [--endpoint-url URL] [--wait 60]

Exit status: 0 on success, 2 on bad input or rejected credentials, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import PipelineInputError

# The endpoint when none is given, first match wins: the MLflow server's variable, then boto3's.
ENDPOINT_VARIABLES = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_BUCKET_NAME = re.compile(r"^(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # boto3's is laxer
_REASONS = {"refused": "connection refused", "Failed to resolve": "host name not found",
            "Connect timeout": "connection timed out", "Read timeout": "no answer in time",
            "SSL": "TLS error"}


class S3EndpointUnreachable(ConnectionError):
    """The S3 endpoint did not answer: the message names it, why, and what to do."""


class Endpoint:
    """`client`, boto3's S3 client (it holds the credentials), for `endpoint_url`, else the first
    of ENDPOINT_VARIABLES that is set, else AWS; `source` says which, `display_url` names it."""

    def __init__(self, endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config
        variable = next((name for name in ENDPOINT_VARIABLES if os.environ.get(name)), None)
        self.source = "the endpoint URL" if endpoint_url else variable
        # As the MLflow server reads them; "auto" lets botocore choose per endpoint.
        verify = os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() not in ("1", "true")
        style = os.environ.get("MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE") or "auto"
        self.client = boto3.session.Session().client(  # not boto3's default: it caches them
            "s3", endpoint_url=endpoint_url or (os.environ[variable] if variable else None),
            verify=None if verify else False,
            config=Config(connect_timeout=5, s3={"addressing_style": style},
                          retries={"max_attempts": 3, "mode": "standard"}))
        parts = urlsplit(self.client.meta.endpoint_url)  # as boto3 resolved it, minus user:pw@
        self.display_url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def parse_s3_uri(uri_or_bucket: str) -> tuple[str, str]:
    """`s3://bucket/prefix`, `s3://bucket` or `bucket` -> (bucket, prefix without slashes)."""
    bucket, _, prefix = (uri_or_bucket or "").strip().removeprefix("s3://").partition("/")
    if not _BUCKET_NAME.match(bucket):
        raise PipelineInputError(
            f"invalid S3 bucket name {bucket!r} in {uri_or_bucket!r}: expected s3://BUCKET/PREFIX "
            "or BUCKET, 3-63 lowercase letters, digits, dots and hyphens, starting and ending "
            "with a letter or digit")
    return bucket, prefix.strip("/")


def ensure_bucket(uri_or_bucket: str, endpoint_url: str | None = None, *,
                  wait: float = 0.0) -> dict:
    """Create the bucket of `uri_or_bucket` unless it exists (idempotent, also concurrently),
    trying an unreachable endpoint for `wait` seconds. Returns {"bucket", "prefix",
    "endpoint_url", "created"}; raises S3EndpointUnreachable or PipelineInputError."""
    bucket, prefix = parse_s3_uri(uri_or_bucket)
    endpoint = Endpoint(endpoint_url)
    deadline = time.monotonic() + wait
    while True:
        try:
            with translated_errors(endpoint, bucket):
                created = _create_unless_present(endpoint.client, bucket)
            return {"bucket": bucket, "prefix": prefix, "endpoint_url": endpoint.display_url,
                    "created": created}
        except S3EndpointUnreachable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def _create_unless_present(s3, bucket: str) -> bool:
    """True when this call created the bucket. Asks first: in us-east-1, creating a bucket one
    already owns succeeds (and resets its ACLs)."""
    from botocore.exceptions import ClientError
    if _bucket_exists(s3, bucket):
        return False
    region = s3.meta.region_name
    location = ({} if region in ("us-east-1", "aws-global")
                else {"CreateBucketConfiguration": {"LocationConstraint": region}})
    try:
        s3.create_bucket(Bucket=bucket, **location)
        return True
    except ClientError as error:
        if _code(error) == "BucketAlreadyOwnedByYou":  # created meanwhile (another task)
            return False
        if _code(error) == "BucketAlreadyExists":
            raise PipelineInputError(f"S3 bucket {bucket!r} already exists and belongs to another "
                                     "account: choose another bucket name") from None
        raise


def _bucket_exists(s3, bucket: str) -> bool:
    from botocore.exceptions import ClientError
    try:
        s3.head_bucket(Bucket=bucket)
        return True
    except ClientError as error:
        if _code(error) in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise


@contextmanager
def translated_errors(endpoint: Endpoint, bucket: str):
    """botocore's connection and credential errors as one line naming the endpoint."""
    from botocore.exceptions import (ClientError, ConnectionError, HTTPClientError,
                                     NoCredentialsError, PartialCredentialsError)
    where = endpoint.display_url
    try:
        yield
    except (ConnectionError, HTTPClientError) as error:
        text = f"{error} {getattr(error, 'kwargs', {}).get('error', '')}"
        reason = next((why for key, why in _REASONS.items() if key in text), type(error).__name__)
        fix = (f"start it or fix {endpoint.source}" if endpoint.source else
               "check the network, or set MLFLOW_S3_ENDPOINT_URL for an S3-compatible store")
        raise S3EndpointUnreachable(f"S3 endpoint {where} is unreachable ({reason}): {fix}") \
            from None
    except (NoCredentialsError, PartialCredentialsError):
        raise PipelineInputError(f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY (or a profile)") from None
    except ClientError as error:  # 403: unknown key, bad signature, expired token, no permission
        if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 403:
            raise
        raise PipelineInputError(f"S3 endpoint {where} denied access to bucket {bucket!r} "
                                 f"({_code(error)}): check the credentials and their "
                                 "permissions") from None


def _code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.store.s3",
                                     description="Set up the S3 store behind the MLflow server.")
    commands = parser.add_subparsers(dest="command", required=True)
    ensure = commands.add_parser("ensure-bucket", help="create the bucket unless it exists")
    ensure.add_argument("uri", metavar="s3://BUCKET/PREFIX", help="or just a bucket name")
    ensure.add_argument("--endpoint-url", help="default: MLFLOW_S3_ENDPOINT_URL, then boto3's")
    ensure.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep trying an unreachable endpoint this long (default 0)")
    args = parser.parse_args(argv)
    try:
        outcome = ensure_bucket(args.uri, args.endpoint_url, wait=args.wait)
    except (PipelineInputError, S3EndpointUnreachable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, PipelineInputError) else 1
    state = "created" if outcome["created"] else "already exists"
    print(f"bucket {outcome['bucket']} at {outcome['endpoint_url']}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
