"""The Python API: `compress()` runs the pipeline in-process and returns the results as data."""
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline import compress
from pipeline.runtime.litert import TFLiteRunner


@pytest.mark.pipeline  # a whole in-process run of four variants with registration; make test-stack
def test_compress_takes_a_keras_model_and_arrays_and_returns_the_results(tiny_model_path,
                                                                        small_dataset):
    from pipeline.sources.models import load_model
    model = load_model(tiny_model_path)  # an in-memory model, as in a notebook
    data = small_dataset
    results = compress(model, (data.x_train, data.y_train, data.x_test[:300], data.y_test[:300]),
                       variants=["float32", "int8", "int4", "prune-int8"], latency_runs=10,
                       latency_warmup=2, calibration_samples=32, prune_epochs=1,
                       experiment="api", registered_model_name="api-classifier")
    table = results.table
    assert isinstance(table, pd.DataFrame)
    assert sorted(table["variant"]) == ["float32", "int4", "int8", "prune-int8"]
    assert (table["status"] == "ok").all(), table[["variant", "status", "error"]]
    assert table.iloc[0]["variant"] == results.champion  # best first
    assert results.registered["version"] and results.registered["name"] == "api-classifier"
    path = results.model_file("int8")
    classes = TFLiteRunner(path).predict_classes(data.x_test[:50])
    assert classes.shape == (50,)
    client = MlflowClient()
    assert client.get_run(results.parent_run_id).info.status == "FINISHED"
    for variant, run_id in results.run_ids.items():
        assert client.get_run(run_id).data.tags["variant"] == variant
    assert int(client.get_run(results.parent_run_id).data.params["test_images"]) == 300
    np.testing.assert_allclose(table.set_index("variant").loc["float32", "compression_ratio"], 1.0)
