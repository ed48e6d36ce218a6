"""The TFLite pyfunc model and the registry: a tiny int8 model (quantized input and output), a
temporary SQLite tracking store, real registrations, and one `mlflow models serve` process."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineInputError
from pipeline.runtime.litert import MAX_BATCH, TFLiteRunner
from pipeline.selection.champion import register_champion
from pipeline.store.registry import promote
from pipeline.selection.select import Selection

IMAGE_SHAPE = (6, 6, 1)
FEATURES = int(np.prod(IMAGE_SHAPE))
CLASS_NAMES = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def tflite_int8(tmp_path_factory):
    """A small conv net converted to full-integer int8 with int8 input and output tensors."""
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([
        tf_keras.Input(IMAGE_SHAPE),
        tf_keras.layers.Conv2D(4, 3, activation="relu"),
        tf_keras.layers.Flatten(),
        # large weights so that different images get different classes
        tf_keras.layers.Dense(len(CLASS_NAMES), activation="softmax",
                              kernel_initializer=tf_keras.initializers.RandomNormal(stddev=3.0)),
    ])
    calibration = np.random.default_rng(0).random((32, *IMAGE_SHAPE), dtype=np.float32)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(32))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    path = tmp_path_factory.mktemp("tflite") / "model.tflite"
    path.write_bytes(converter.convert())
    return path


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).random((24, FEATURES), dtype=np.float32)


def interpreter_classes(tflite_path, flat_images):
    """Reference: the LiteRT interpreter driven directly, one image at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite_path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    scale, zero_point = inp["quantization"]
    classes = []
    for image in flat_images.reshape(-1, 1, *IMAGE_SHAPE):
        quantized = np.clip(np.round(image / scale + zero_point), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], quantized)
        interpreter.invoke()
        classes.append(int(interpreter.get_tensor(out["index"])[0].argmax()))
    return np.array(classes)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite tracking store and an experiment whose artifacts live in a temporary folder."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("registry-tests",
                                             artifact_location=str(root / "artifacts"))
    yield {"uri": uri, "experiment_id": experiment_id}
    mlflow.set_tracking_uri(previous)  # None: back to MLflow's default resolution


def pipeline_runs(store, tflite_path=None):
    """(parent_run_id, child_run_id) like the tracking stage creates; optionally the child run
    gets the variant's `model/model.tflite` artifact."""
    with mlflow.start_run(experiment_id=store["experiment_id"]) as parent:
        with mlflow.start_run(experiment_id=store["experiment_id"], nested=True) as child:
            if tflite_path:
                mlflow.log_artifact(str(tflite_path), "model")
    return parent.info.run_id, child.info.run_id


def register(store, name, variant, *, gzip, accuracy, tflite_path, images, runs=None,
             local_file=True, class_names=None):
    runs = runs or pipeline_runs(store, None if local_file else tflite_path)
    parent_run_id, child_run_id = runs
    result = {"variant": variant, "quantization": variant.rsplit("-", 1)[-1],
              "optimizations": variant.rsplit("-", 1)[0] if "-" in variant else "",
              "status": "ok", "error": None, "accuracy": accuracy,
              "accuracy_delta_pts": -0.1, "size_bytes": gzip * 2, "gzip_size_bytes": gzip,
              "compression_ratio": 4.0, "gzip_compression_ratio": 5.0, "latency_ms_p50": 0.5,
              "latency_ms_p90": 0.6, "peak_memory_mb": 30.0, "child_run_id": child_run_id,
              "tflite_path": str(tflite_path) if local_file else "/elsewhere/model.tflite"}
    selection = Selection(champion=variant, passed=[variant], rejected={}, pareto=[variant],
                          objective="gzip_size", reason="test")
    config = PipelineConfig.from_mapping({"registered_model_name": name}, use_env=False)
    if class_names:  # as the pipeline's register stage calls it: results by variant name
        return register_champion(selection.to_dict(), {variant: result}, config,
                                 parent_run_id=parent_run_id, airflow_run_id="manual__2026-01-01",
                                 input_example=images[:3], class_names=class_names)
    return register_champion(selection.to_dict(), [result], config, parent_run_id=parent_run_id,
                             airflow_run_id="manual__2026-01-01", input_example=images[:2])


@pytest.fixture(scope="module")
def served(store, tflite_int8, images):
    """A registered model whose first version is the champion, with three test images as its
    input example and the dataset's class names, as the register stage gives them."""
    info = register(store, "served", "int8", gzip=1000, accuracy=0.9, tflite_path=tflite_int8,
                    images=images.reshape(-1, *IMAGE_SHAPE), class_names=CLASS_NAMES)
    return info["name"]


def test_runner_matches_the_interpreter_for_any_batch_and_input_form(tflite_int8):
    runner = TFLiteRunner(tflite_int8)
    many = np.random.default_rng(2).random((MAX_BATCH + 5, FEATURES), dtype=np.float32)
    expected = interpreter_classes(tflite_int8, many)
    assert len(set(expected)) > 1                          # the model discriminates
    for count in (1, 7, MAX_BATCH + 5):                    # one chunk, a padded chunk, two chunks
        scores = runner.scores(runner.images(many[:count]))
        assert scores.shape == (count, len(CLASS_NAMES)) and scores.dtype == np.float32
        np.testing.assert_array_equal(scores.argmax(1), expected[:count])
        np.testing.assert_allclose(scores.sum(1), 1.0, atol=0.05)   # dequantized softmax
    reference = runner.scores(runner.images(many[:5]))
    for form in (many[:5].reshape(-1, *IMAGE_SHAPE), pd.DataFrame(many[:5]), many[:5].tolist()):
        np.testing.assert_array_equal(runner.scores(runner.images(form)), reference)
    assert runner.images(many[0]).shape == (1, *IMAGE_SHAPE)          # one unbatched image
    with pytest.raises(PipelineInputError, match="36 values"):
        runner.images(np.zeros((2, 35), np.float32))


def test_registered_pyfunc_predicts_like_the_interpreter(served, tflite_int8, images):
    model = mlflow.pyfunc.load_model(f"models:/{served}@champion")
    expected = interpreter_classes(tflite_int8, images)
    # Images in the shape the rest of the pipeline holds them: (N, H, W, C).
    output = model.predict(images.reshape(-1, *IMAGE_SHAPE))
    assert list(output.columns) == ["class", "label"] + [f"score_{k}" for k in range(4)]
    np.testing.assert_array_equal(output["class"].to_numpy(), expected)
    assert output["label"].tolist() == [CLASS_NAMES[c] for c in expected]
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, *IMAGE_SHAPE)

    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{served}@champion"))
    packages = {line.split("==")[0] for line in requirements.read_text().split()}
    assert {"ai-edge-litert", "numpy", "pandas"} <= packages
    assert not any("tensorflow" in p or "keras" in p for p in packages)


def test_versions_carry_a_model_card_and_their_metrics_as_numbers(store, tflite_int8, images):
    client, served = MlflowClient(), "carded"
    parent_run_id, child_run_id = pipeline_runs(store)
    result = {"variant": "int8", "quantization": "int8", "optimizations": "", "status": "ok",
              "accuracy": 0.9, "accuracy_delta_pts": -0.1, "size_bytes": 2000,
              "gzip_size_bytes": 1000, "compression_ratio": 4.0, "gzip_compression_ratio": 5.0,
              "latency_ms_p50": 0.5, "latency_ms_p90": 0.6, "peak_memory_mb": 30.0,
              "child_run_id": child_run_id, "tflite_path": str(tflite_int8)}
    selection = Selection(champion="int8", passed=["int8"], rejected={}, pareto=["int8"],
                          objective="gzip_size", reason="int8: smallest gzip size")
    config = PipelineConfig.from_mapping({"registered_model_name": served}, use_env=False)
    register_champion(selection, [result], config, parent_run_id=parent_run_id,
                      input_example=images[:2], class_names=CLASS_NAMES)
    version = client.get_model_version(served, "1")
    card = version.description
    assert card.startswith(f"# `int8`: version 1 of `{served}`")
    assert "**Champion decision:** champion: first champion of this registered model" in card
    assert "full integer: int8 weights and activations" in card
    assert "| gzip size " in card and "1,000 B" in card and "0.9000" in card
    assert "passed, 1 of 1 passing variants by smallest gzip size" in card
    assert f"make serve MODEL=models:/{served}/1" in card
    description = client.get_registered_model(served).description
    assert "**Classes (4):** `zero`, `one`, `two`, `three`" in description
    # MLflow 3: the version's source is a logged model, whose metrics are numbers
    model_id = version.source.removeprefix("models:/")
    metrics = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert metrics["accuracy"] == 0.9 and metrics["gzip_size_bytes"] == 1000.0
    assert metrics["latency_ms_p50"] == 0.5 and "sparsity" not in metrics   # not measured


def test_champion_moves_only_to_better_versions_and_rolls_back(store, tflite_int8, images):
    name, client = "lifecycle", MlflowClient()
    common = {"tflite_path": tflite_int8, "images": images}

    first = register(store, name, "int8", gzip=1000, accuracy=0.900, **common)
    assert (first["version"], first["champion_version"]) == (1, 1)
    assert first["aliases"] == ["challenger", "champion"]
    assert first["decision"].startswith("champion: first")

    # smaller, 0.05 pts less accurate (within the 0.1 tolerance); its .tflite is only in MLflow
    runs = pipeline_runs(store, tflite_int8)
    second = register(store, name, "prune-int8", gzip=800, accuracy=0.8995, runs=runs,
                      local_file=False, **common)
    assert (second["version"], second["champion_version"]) == (2, 2)
    assert second["decision"].startswith("champion: beats v1 (int8)")
    assert client.get_model_version(name, "1").aliases == []
    tags = client.get_model_version(name, "2").tags
    assert {k: tags[k] for k in ("variant", "quantization", "optimizations", "parent_run_id",
                                 "airflow_run_id", "gates_passed", "gzip_size_bytes")} == {
        "variant": "prune-int8", "quantization": "int8", "optimizations": "prune",
        "parent_run_id": runs[0], "airflow_run_id": "manual__2026-01-01", "gates_passed": "true",
        "gzip_size_bytes": "800"}
    assert float(tags["accuracy"]) == 0.8995 and float(tags["latency_ms_p50"]) == 0.5

    # bigger but more accurate: challenger only
    third = register(store, name, "dynamic", gzip=900, accuracy=0.920, **common)
    assert (third["version"], third["champion_version"]) == (3, 2)
    assert third["aliases"] == ["challenger"]
    assert third["decision"].startswith("not champion: v2 (prune-int8) is at least as good")
    assert client.get_model_version(name, "3").tags["champion_decision"] == third["decision"]

    # smaller but 0.45 pts less accurate: beyond the tolerance
    fourth = register(store, name, "cluster-int8", gzip=500, accuracy=0.8950, **common)
    assert (fourth["version"], fourth["champion_version"]) == (4, 2)
    assert "0.45 pts less accurate than v2" in fourth["decision"]

    # a retried registration of the same pipeline run and variant returns the same version
    again = register(store, name, "prune-int8", gzip=800, accuracy=0.8995, runs=runs, **common)
    assert (again["version"], again["reused"]) == (2, True)
    assert len(client.search_model_versions(f"name = '{name}'")) == 4

    # rollback: champion back to v1
    rolled = promote(name, 1, "champion")
    assert (rolled["version"], rolled["previous_version"]) == (1, 2)
    assert client.get_model_version_by_alias(name, "champion").version == 1
    with pytest.raises(PipelineInputError, match="has no version 99"):
        promote(name, 99, "champion")
    source = client.get_model_version(name, "1").source
    ungated = client.create_model_version(name, source, tags={"gates_passed": "false"})
    with pytest.raises(PipelineInputError, match="did not pass the quality gates"):
        promote(name, ungated.version, "champion")
    assert client.get_model_version_by_alias(name, "champion").version == 1


def test_retry_finishes_an_interrupted_registration(store, tflite_int8, images, monkeypatch):
    import pipeline.selection.champion as champion

    name, client = "interrupted", MlflowClient()
    runs = pipeline_runs(store)

    def crash(*args):
        raise RuntimeError("worker lost")

    # the first attempt logs the model into the child run while the parent run is active (as
    # under `python -m pipeline`), registers the version, then dies before the aliases
    with mlflow.start_run(run_id=runs[0]), monkeypatch.context() as patch:
        patch.setattr(champion, "champion_decision", crash)
        with pytest.raises(RuntimeError):
            register(store, name, "int8", gzip=1000, accuracy=0.9, tflite_path=tflite_int8,
                     images=images, runs=runs)
        assert mlflow.active_run().info.run_id == runs[0]
    first = client.get_model_version(name, "1")
    assert first.run_id == runs[1] and "champion_decision" not in first.tags
    assert first.aliases == ["challenger"]                 # set before the crash

    retried = register(store, name, "int8", gzip=1000, accuracy=0.9, tflite_path=tflite_int8,
                       images=images, runs=runs)
    assert (retried["version"], retried["reused"], retried["champion_version"]) == (1, True, 1)
    assert retried["aliases"] == ["challenger", "champion"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_no_champion_registers_nothing(store):
    selection = Selection(champion=None, passed=[],
                          rejected={"int8": ["accuracy drop 3.0 pts > 1.0 allowed"]},
                          pareto=["int8"], objective="gzip_size",
                          reason="no variant passed the gates")
    config = PipelineConfig.from_mapping({"registered_model_name": "never"}, use_env=False)
    outcome = register_champion(selection.to_dict(), [], config, parent_run_id="r1")
    assert outcome == {"skipped": True, "reason": "no variant passed the gates"}
    assert MlflowClient().search_registered_models("name = 'never'") == []


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.pipeline  # an `mlflow models serve` server process; make test-stack
def test_mlflow_models_serve_answers_invocations(served, store, tflite_int8, images, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the model brings its code
    env["MLFLOW_TRACKING_URI"] = store["uri"]
    # The CLI starts `uvicorn` by name: the virtualenv's bin must be on PATH (as when activated).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
         f"models:/{served}@champion", "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port), "-w", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server not up in 120 s"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        example = json.loads(Path(mlflow.artifacts.download_artifacts(
            f"models:/{served}@champion/serving_input_example.json", tracking_uri=store["uri"]))
            .read_text())
        assert np.asarray(example["inputs"]).shape[1:] == IMAGE_SHAPE
        for payload in ({"inputs": images[:3].reshape(-1, *IMAGE_SHAPE).tolist()}, example):
            expected = interpreter_classes(tflite_int8, np.asarray(payload["inputs"]))
            request = urllib.request.Request(f"{base}/invocations",
                                             data=json.dumps(payload).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                predictions = json.load(response)["predictions"]
            assert [p["class"] for p in predictions] == expected.tolist()
            assert [p["label"] for p in predictions] == [CLASS_NAMES[c] for c in expected]
    finally:
        stop_process_group(server)
        log.close()


def stop_process_group(process):
    """SIGTERM the server's whole process group (CLI + uvicorn + worker), SIGKILL after 20 s,
    and return only once no process of the group is left."""
    def signal_group(signum):
        try:
            os.killpg(process.pid, signum)
            return True
        except ProcessLookupError:
            return False

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while signal_group(0):
        if time.monotonic() > deadline:
            signal_group(signal.SIGKILL)
        process.poll()  # reap the leader so that it does not linger as a zombie
        time.sleep(0.2)
    process.wait()
