"""S3-backed artifacts end to end, with real processes on loopback: `moto_server` (S3), `mlflow
server` proxying artifacts to s3://BUCKET/artifacts on it (the S3 credentials in the server's
environment only), and `python -m pipeline run` as a client with no AWS_* variable at all. Then
an S3 outage: uploads fail with a message naming the artifact store, and nothing is registered.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.store import s3, tracking
from pipeline.errors import PipelineInputError
from tests.servers import (MOTO_ACCESS_KEY_ID, MOTO_SECRET_ACCESS_KEY, free_port,
                           moto_credentials_env, moto_s3, running_mlflow_server,  # noqa: F401
                           running_moto_s3)

pytestmark = pytest.mark.pipeline  # moto_server and mlflow server processes, whole runs; make test-stack

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "pipeline-artifacts"
EXPERIMENT = "s3-artifacts"
MODEL_NAME = "s3-test-classifier"
VARIANTS = ("float32", "dynamic")
TINY = ["--epochs", "1", "--train-limit", "600", "--test-limit", "200",
        "--variants", ",".join(VARIANTS), "--set", "latency_runs=20", "--set", "finetune_epochs=1", "--set", "prune_epochs=1",
        "--experiment", EXPERIMENT, "--registered-model-name", MODEL_NAME]
SECRETS = (MOTO_SECRET_ACCESS_KEY, MOTO_ACCESS_KEY_ID)
# During the outage: MLflow's client retries a failed request 7 times with exponential backoff
# (about 4 minutes per request). Fewer, immediate retries keep the test short; some retrying is
# needed: after a 500 to an upload the server may reset the kept-alive connection, and the next
# request on it fails unless retried.
FAST_MLFLOW_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}


def client_env(tracking_url: str, **extra: str) -> dict[str, str]:
    """A pipeline client's environment: the tracking server, and no S3 settings at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}
    env.update(MLFLOW_TRACKING_URI=tracking_url, **extra)
    assert not [k for k in env if k.startswith("AWS_")]
    return env


def s3_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.store.s3", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def run_pipeline(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=1200)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """moto_server with the bucket (made by the CLI, as `make up` does) and an MLflow server
    proxying artifacts to it."""
    root = tmp_path_factory.mktemp("s3-stack")
    with running_moto_s3(root) as (s3_url, moto):
        operator_env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
                        **moto_credentials_env(s3_url)}
        first_ensure = s3_cli("ensure-bucket", f"s3://{BUCKET}/artifacts", env=operator_env)
        assert first_ensure.returncode == 0, first_ensure.stderr
        with running_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", f"s3://{BUCKET}/artifacts",
                                   moto_credentials_env(s3_url), root) as (tracking_url, server):
            yield SimpleNamespace(
                root=root, s3_url=s3_url, moto=moto, tracking_url=tracking_url, server=server,
                operator_env=operator_env, first_ensure=first_ensure,
                mlflow=MlflowClient(tracking_url),
                bucket=boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                                    aws_access_key_id=MOTO_ACCESS_KEY_ID,
                                    aws_secret_access_key=MOTO_SECRET_ACCESS_KEY))


@pytest.fixture(scope="module")
def pipeline_run(stack):
    """One tiny pipeline run through the tracking server: its output, work dir, and runs."""
    work_dir = stack.root / "work"
    started = time.perf_counter()
    result = run_pipeline(*TINY, env=client_env(stack.tracking_url,
                                                PIPELINE_WORK_DIR=str(work_dir)))
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-4000:]
    experiment = stack.mlflow.get_experiment_by_name(EXPERIMENT)
    runs = stack.mlflow.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("run_role") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    (run_dir,) = [p for p in work_dir.iterdir() if p.is_dir() and p.name != "cache"]
    return SimpleNamespace(result=result, seconds=seconds, work_dir=work_dir, run_dir=run_dir,
                           parent=parent, children=children, runs=runs)


@pytest.fixture(scope="module")
def s3_down(stack, pipeline_run):
    """The S3 endpoint stops (after the healthy run); the tracking server stays up."""
    stack.moto.stop()
    return stack


def bucket_keys(stack) -> set[str]:
    keys, token = set(), None
    while True:
        page = stack.bucket.list_objects_v2(Bucket=BUCKET, **({"ContinuationToken": token}
                                                             if token else {}))
        keys.update(item["Key"] for item in page.get("Contents", []))
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def s3_key(artifact_uri: str, path: str) -> str:
    """The object key behind a proxied artifact URI (mlflow-artifacts:/1/<run>/artifacts)."""
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
    return "/".join(["artifacts", artifact_uri.split(":", 1)[1].strip("/"), path])


def versions(stack, name: str) -> list:
    return stack.mlflow.search_model_versions(f"name = '{name}'")


# ------------------------------------------------------------------------------ the bucket
def test_ensure_bucket_is_idempotent_through_the_cli(stack):
    assert stack.first_ensure.stdout.strip() == (
        f"bucket {BUCKET} at {stack.s3_url}: created")
    for target in (f"s3://{BUCKET}/artifacts", BUCKET):
        again = s3_cli("ensure-bucket", target, env=stack.operator_env)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == f"bucket {BUCKET} at {stack.s3_url}: already exists"


def test_ensure_bucket_outside_us_east_1_and_a_concurrent_create(moto_s3, monkeypatch):
    """A region that needs a LocationConstraint; a bucket created by someone else between the
    existence check and the create (BucketAlreadyOwnedByYou) is fine; missing credentials are one
    line naming the endpoint."""
    for name in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_S3_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", MOTO_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", MOTO_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    first = s3.ensure_bucket("s3://eu-bucket/prefix", moto_s3)
    assert first == {"bucket": "eu-bucket", "prefix": "prefix", "endpoint_url": moto_s3,
                     "created": True}
    monkeypatch.setattr(s3, "_bucket_exists", lambda client, bucket: False)
    assert s3.ensure_bucket("eu-bucket", moto_s3)["created"] is False
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(PipelineInputError, match=f"^no S3 credentials for {re.escape(moto_s3)}:"):
        s3.ensure_bucket("eu-bucket", moto_s3)


def test_an_unreachable_endpoint_is_named(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unused-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused-secret")
    expected = (f"S3 endpoint {endpoint} is unreachable (connection refused): start it or fix "
                "MLFLOW_S3_ENDPOINT_URL")
    with pytest.raises(s3.S3EndpointUnreachable) as raised:
        s3.ensure_bucket(f"s3://{BUCKET}/artifacts")
    assert str(raised.value) == expected
    started = time.monotonic()
    with pytest.raises(s3.S3EndpointUnreachable):
        s3.ensure_bucket(BUCKET, wait=2)
    assert time.monotonic() - started >= 2
    cli = s3_cli("ensure-bucket", f"s3://{BUCKET}", env=os.environ.copy())
    assert (cli.returncode, cli.stdout, cli.stderr) == (1, "", f"error: {expected}\n")
    bad = s3_cli("ensure-bucket", "s3://Not_A_Bucket", env=os.environ.copy())
    assert bad.returncode == 2 and bad.stderr.startswith("error: invalid S3 bucket name")


# ----------------------------------------------------------------------- the healthy run
def test_pipeline_artifacts_land_in_s3_through_the_server(stack, pipeline_run, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    assert sorted(r.data.tags["variant"] for r in pipeline_run.children) == sorted(VARIANTS)
    for run in pipeline_run.runs:  # proxied: clients never address S3 themselves
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    keys = bucket_keys(stack)
    models = [s3_key(run.info.artifact_uri, "model/model.tflite") for run in pipeline_run.children]
    reports = [s3_key(pipeline_run.parent.info.artifact_uri, f"report/{name}")
               for name in ("summary.md", "pareto.png")]
    assert set(models + reports) <= keys, sorted(keys)
    assert all(key.startswith("artifacts/") for key in keys)

    # The registered champion's files are in S3 too (MLflow 3 logged model: MLmodel, tflite).
    (found,) = versions(stack, MODEL_NAME)
    version = stack.mlflow.get_model_version(MODEL_NAME, found.version)
    assert "champion" in version.aliases
    logged = stack.mlflow.get_logged_model(version.model_id or version.source.split("/")[-1])
    assert s3_key(logged.artifact_location, "MLmodel") in keys
    assert any(k.startswith(s3_key(logged.artifact_location, "artifacts/"))
               and k.endswith(".tflite") for k in keys)

    local = tmp_path / "model.tflite"
    stack.bucket.download_file(BUCKET, models[0], str(local))
    interpreter = Interpreter(model_path=str(local))
    interpreter.allocate_tensors()
    (given,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.set_tensor(given["index"], np.zeros(given["shape"], given["dtype"]))
    interpreter.invoke()
    scores = interpreter.get_tensor(output["index"])
    assert scores.shape == (1, 10) and np.isfinite(scores).all()


def test_the_champion_loads_and_predicts_through_the_server(stack, pipeline_run):
    script = (
        "import json, numpy as np, mlflow\n"
        f"model = mlflow.pyfunc.load_model('models:/{MODEL_NAME}@champion')\n"
        "frame = model.predict(np.zeros((5, 28, 28, 1), np.float32))\n"
        "print(json.dumps({'rows': len(frame), 'classes': frame['class'].tolist(),\n"
        "                  'columns': list(frame.columns)}))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=client_env(stack.tracking_url), cwd=stack.root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["rows"] == 5 and all(0 <= c < 10 for c in answer["classes"])
    assert answer["columns"][:2] == ["class", "label"] and "score_9" in answer["columns"]


def test_no_credential_reaches_the_pipeline_or_what_it_wrote(stack, pipeline_run):
    output = pipeline_run.result.stdout + pipeline_run.result.stderr
    texts = {"pipeline stdout/stderr": output}
    for run in pipeline_run.runs:
        texts[f"params/tags of run {run.info.run_id}"] = json.dumps(
            [run.data.params, run.data.tags])
    for version in versions(stack, MODEL_NAME):
        texts[f"model version {version.version}"] = json.dumps(version.tags)
    files = [p for p in pipeline_run.work_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        texts[str(path)] = path.read_bytes().decode("latin-1")
    for key in bucket_keys(stack):
        texts[f"s3://{BUCKET}/{key}"] = stack.bucket.get_object(
            Bucket=BUCKET, Key=key)["Body"].read().decode("latin-1")
    leaks = [(where, secret) for where, text in texts.items() for secret in SECRETS
             if secret in text]
    assert not leaks
    # ...while the server did hold them (the test would be vacuous otherwise).
    server_env = (Path("/proc") / str(stack.server.popen.pid) / "environ").read_bytes()
    assert MOTO_SECRET_ACCESS_KEY.encode() in server_env



# ------------------------------------------------------- workers that share no folder
STAGE_SCRIPT = """
import json, sys
from pipeline import stages
name, args = json.load(sys.stdin)
result = getattr(stages, name)(*args)
print("TENSORFLOW-LOADED " + str("tensorflow" in sys.modules))
print("STAGE-RESULT " + json.dumps(result))
"""


def test_stages_run_on_workers_that_share_no_folder(stack, tmp_path):
    """Each stage in its own process with its own empty work folder, deleted right after, as on
    Celery workers on different hosts: everything a stage needs reaches it through the MLflow
    server (artifacts in S3), and nothing handed on names a local path."""
    workers = iter(tmp_path / f"worker-{i}" for i in range(100))
    handed_on = []

    def on_a_new_worker(stage: str, *args):
        work = next(workers)
        result = subprocess.run([sys.executable, "-c", STAGE_SCRIPT], input=json.dumps([stage, args]),
                                capture_output=True, text=True, cwd=ROOT, timeout=600,
                                env=client_env(stack.tracking_url, PIPELINE_WORK_DIR=str(work)))
        assert result.returncode == 0, (stage, result.stderr[-3000:])
        shutil.rmtree(work, ignore_errors=True)
        line = next(x for x in result.stdout.splitlines() if x.startswith("STAGE-RESULT "))
        handed_on.append(line)
        if stage in ("evaluate", "benchmark"):  # LiteRT alone: they fit on small workers
            assert "TENSORFLOW-LOADED False" in result.stdout, stage
        return json.loads(line[len("STAGE-RESULT "):])

    config = {"epochs": 1, "train_limit": 600, "test_limit": 200, "prune_epochs": 1,
              "latency_runs": 10, "calibration_samples": 32, "experiment": "no-shared-folder",
              "registered_model_name": "no-shared-folder-classifier",
              "variants": ["int8", "prune-int8"]}
    ctx = on_a_new_worker("train", config, "no-shared-folder-run", {})
    on_a_new_worker("optimize", ctx, "prune")
    for variant in config["variants"]:
        quantized = on_a_new_worker("quantize", ctx, variant)
        measured = on_a_new_worker("benchmark", ctx, on_a_new_worker("evaluate", ctx, quantized))
        assert measured["status"] == "ok" and measured["size_bytes"] > 0, measured
    selected = on_a_new_worker("select", ctx)
    assert selected["variants_ok"] == 2, selected
    outcome = on_a_new_worker("register", ctx, selected)
    assert outcome["version"] and "champion" in outcome["aliases"], outcome
    assert not any(str(tmp_path) in line or str(ROOT) in line for line in handed_on)
    # The files went through the server into S3, under the parent run's exchange/ folder.
    parent = stack.mlflow.get_run(ctx["parent_run_id"])
    keys = bucket_keys(stack)
    for path in ("exchange/train/dataset.json", "exchange/baseline/baseline.keras",
                 "exchange/train/float32.tflite"):
        assert s3_key(parent.info.artifact_uri, path) in keys, path
    # No task stored the dataset's pixels: what travelled is its manifest (an index of labels
    # and split ids), smaller than the 600 training images' pixels would be as uint8.
    assert not [k for k in keys if k.endswith((".npz", ".tfrecord"))]
    manifest = stack.bucket.head_object(
        Bucket=BUCKET, Key=s3_key(parent.info.artifact_uri, "exchange/train/dataset.json"))
    assert manifest["ContentLength"] < 600 * 28 * 28, manifest["ContentLength"]
    assert any(k.startswith(s3_key(parent.info.artifact_uri, "exchange/optimized/prune/"))
               and k.endswith(".keras") for k in keys)


def test_a_registered_model_and_an_s3_dataset_as_inputs(stack, pipeline_run, tmp_path):
    """`--model models:/NAME@champion` starts from the float model that champion was compressed
    from; `--dataset s3://...npz` is read from the S3 endpoint; missing URIs are one clear line."""
    from pipeline.sources.data import load_dataset
    data = load_dataset("fashion-mnist", train_limit=600, test_limit=200)
    npz = tmp_path / "shirts.npz"
    np.savez(npz, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test,
             y_test=data.y_test)
    stack.bucket.create_bucket(Bucket="user-data")
    stack.bucket.upload_file(str(npz), "user-data", "sets/shirts.npz")
    env = {**client_env(stack.tracking_url, PIPELINE_WORK_DIR=str(tmp_path / "work")),
           # Reading the user's s3:// input takes S3 credentials; the artifacts still go
           # through the tracking server.
           "AWS_ENDPOINT_URL_S3": stack.s3_url, "AWS_ACCESS_KEY_ID": MOTO_ACCESS_KEY_ID,
           "AWS_SECRET_ACCESS_KEY": MOTO_SECRET_ACCESS_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
    champion = stack.mlflow.get_model_version_by_alias(MODEL_NAME, "champion")
    result = run_pipeline("--model", f"models:/{MODEL_NAME}@champion", "--dataset",
                          "s3://user-data/sets/shirts.npz", "--variants", "float32,dynamic",
                          "--set", "latency_runs=10", "--experiment", "uri-inputs",
                          "--registered-model-name", "uri-inputs-classifier", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = stack.mlflow.get_experiment_by_name("uri-inputs")
    (parent,) = [r for r in stack.mlflow.search_runs([experiment.experiment_id])
                 if r.data.tags.get("run_role") == "parent"]
    assert parent.data.params["model"] == f"models:/{MODEL_NAME}@champion"
    assert parent.data.params["dataset"] == "s3://user-data/sets/shirts.npz"
    # The uploaded training split, less the validation tenth carved from it.
    assert int(parent.data.params["train_images"]) == pytest.approx(0.9 * len(data.x_train), abs=2)
    # The same float model the champion came from: the same float32 reference accuracy.
    source_parent = stack.mlflow.get_run(champion.tags["parent_run_id"])
    assert parent.data.metrics["keras_accuracy"] == pytest.approx(
        source_parent.data.metrics["keras_accuracy"], abs=0.05)

    for args, needle in (
            (["--model", f"models:/{MODEL_NAME}@nosuchalias"], "does not exist in the MLflow registry"),
            (["--dataset", "s3://user-data/sets/missing.npz"], "does not exist on the S3 endpoint")):
        failed = run_pipeline(*TINY, *args, env=env)
        assert failed.returncode == 2, failed.stderr[-2000:]
        last = failed.stderr.strip().splitlines()[-1]
        assert needle in last and MOTO_SECRET_ACCESS_KEY not in failed.stderr, last



# ---------------------------------------------------------------------------- the outage
def test_an_upload_during_an_s3_outage_names_the_artifact_store(s3_down, pipeline_run,
                                                                 monkeypatch, tmp_path):
    from pipeline.store import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", s3_down.tracking_url)
    for name, value in FAST_MLFLOW_RETRIES.items():
        monkeypatch.setenv(name, value)
    note = tmp_path / "note.txt"
    note.write_text("written during the outage")
    with pytest.raises(tracking.ArtifactStoreError) as raised:
        tracking.log_artifact(pipeline_run.parent.info.run_id, note, "outage")
    message = str(raised.value)
    assert message.startswith(f"could not store artifact outage/note.txt of run "
                              f"{pipeline_run.parent.info.run_id}: the tracking server "
                              f"{s3_down.tracking_url} is up but its artifact store is "
                              "unreachable or failing (listing it answers HTTP 500; the upload: ")
    assert "MLFLOW_S3_ENDPOINT_URL" in message
    # The server knows which endpoint: its log names it.
    assert f"Could not connect to the endpoint URL: \"{s3_down.s3_url}/{BUCKET}/" in (
        s3_down.server.log_tail(200_000))


def test_a_failed_model_upload_registers_nothing(s3_down, pipeline_run, monkeypatch):
    """register logs the pyfunc model (its files) before it creates the version: when the upload
    fails, neither the registered model nor a version exists."""
    from pipeline import stages

    monkeypatch.setenv("MLFLOW_TRACKING_URI", s3_down.tracking_url)
    # The worker that ran the pipeline: its cache holds the dataset register reads.
    monkeypatch.setenv("PIPELINE_WORK_DIR", str(pipeline_run.work_dir))
    for name, value in FAST_MLFLOW_RETRIES.items():
        monkeypatch.setenv(name, value)
    ctx = json.loads((pipeline_run.run_dir / "context.json").read_text())
    ctx["config"]["registered_model_name"] = "s3-outage-classifier"
    selected = json.loads((pipeline_run.run_dir / "select.json").read_text())
    before = [v.version for v in versions(s3_down, MODEL_NAME)]
    with pytest.raises(tracking.ArtifactStoreError, match="artifact store is unreachable"):
        stages.register(ctx, selected)
    assert s3_down.mlflow.search_registered_models("name = 's3-outage-classifier'") == []
    assert [v.version for v in versions(s3_down, MODEL_NAME)] == before
    # What is left is MLflow's own record of the attempt: a logged model marked FAILED.
    experiment_id = pipeline_run.parent.info.experiment_id
    failed = [m for m in s3_down.mlflow.search_logged_models([experiment_id])
              if str(m.status) == "FAILED"]
    champion = selected["selection"]["champion"]
    champion_run = next(r for r in pipeline_run.children if r.data.tags["variant"] == champion)
    assert [m.source_run_id for m in failed] == [champion_run.info.run_id]


def test_a_download_during_an_outage_names_the_artifact_store(s3_down, pipeline_run, tmp_path,
                                                               monkeypatch):
    """A worker with an empty cache fetches a file another task stored: the outage is named."""
    from pipeline.store import artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s3_down.tracking_url)
    monkeypatch.setenv("PIPELINE_WORK_DIR", str(tmp_path))
    for name, value in FAST_MLFLOW_RETRIES.items():
        monkeypatch.setenv(name, value)
    ctx = json.loads((pipeline_run.run_dir / "context.json").read_text())
    with pytest.raises(tracking.ArtifactStoreError,
                       match=r"^could not fetch artifact exchange/train/dataset.json .* artifact "
                             r"store is unreachable or failing .*the download"):
        artifacts.fetch(ctx["dataset_uri"])


def test_a_pipeline_run_during_an_s3_outage_fails_and_registers_nothing(s3_down, pipeline_run):
    before = [v.version for v in versions(s3_down, MODEL_NAME)]
    baseline = pipeline_run.run_dir / "baseline.keras"
    env = client_env(s3_down.tracking_url, PIPELINE_WORK_DIR=str(s3_down.root / "outage-work"),
                     **FAST_MLFLOW_RETRIES)
    result = run_pipeline(*TINY, "--model", str(baseline), "--variants", "float32", env=env)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    # The first upload is the model, into the run's artifact store for the later tasks.
    assert last_line.startswith("error: could not store artifact "
                                "exchange/baseline/baseline.keras"), last_line
    assert (f"tracking server {s3_down.tracking_url} is up but its artifact store is "
            "unreachable or failing" in last_line)
    assert [v.version for v in versions(s3_down, MODEL_NAME)] == before
    experiment = s3_down.mlflow.get_experiment_by_name(EXPERIMENT)
    new_variant_runs = [r for r in s3_down.mlflow.search_runs([experiment.experiment_id])
                        if r.data.tags.get("run_role") == "variant"
                        and r.info.run_id not in {c.info.run_id for c in pipeline_run.children}]
    assert new_variant_runs == []  # no variant started on a run whose inputs could not be stored
    assert not any(secret in result.stdout + result.stderr for secret in SECRETS)
