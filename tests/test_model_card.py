"""The model card of a registered version and the registered model's description."""
from pipeline.config import PipelineConfig
from pipeline.selection.model_card import Lineage, registered_model_description, version_card
from pipeline.selection.select import choose

CONFIG = PipelineConfig.from_mapping({"registered_model_name": "fashion", "cluster_count": 8},
                                     use_env=False)
LINEAGE = Lineage(
    params={"dataset": "s3://bucket/fashion/", "model": "default-cnn", "epochs": "12",
            "train_images": "54000", "validation_images": "6000", "test_images": "10000",
            "classes": "3", "input_shape": "28x28x1", "dataset_digest": "0123456789abcdef"},
    tags={"pipeline_run_id": "manual__2026-12-04"},
    metrics={"reference_size_bytes": 1_690_016.0, "reference_accuracy": 0.9317},
    datasets=[{"name": "fashion-train", "digest": "d41d8cd9", "source": "s3://bucket/fashion/",
               "context": "training"}])


def result(variant, accuracy, delta, gzip, status="ok"):
    quantization = variant.rsplit("-", 1)[-1]
    optimizations = variant.rsplit("-", 1)[0].replace("+", ",") if "-" in variant else ""
    return {"variant": variant, "quantization": quantization, "optimizations": optimizations,
            "status": status, "error": None, "accuracy": accuracy, "accuracy_delta_pts": delta,
            "size_bytes": gzip * 6, "gzip_size_bytes": gzip,
            "compression_ratio": 1_690_016 / (gzip * 6), "gzip_compression_ratio": 1_690_016 / gzip,
            "latency_ms_p50": 0.0213, "latency_ms_p90": 0.0301, "peak_memory_mb": 41.25}


RESULTS = [result("float32", 0.9317, 0.0, 1_560_000),
           result("prune+cluster+qat4-int4", 0.9231, -0.86, 35_800),
           result("int4", 0.9100, -2.17, 200_000)]


def card(variant, decision="champion: first champion of this registered model", **kwargs):
    selection = choose(RESULTS, CONFIG, num_classes=3)
    row = next(r for r in RESULTS if r["variant"] == variant)
    return version_card(row, selection, CONFIG, name="fashion", version=7, decision=decision,
                        lineage=LINEAGE, **kwargs)


def test_version_card_holds_the_figures_of_its_result():
    text = card("prune+cluster+qat4-int4",
                run_tags={"runtime": "compiled_model", "evaluation_runtime": "compiled_model",
                          "evaluation_kernels": "xnnpack"},
                per_class_accuracy={"T-shirt/top": 0.86, "Trouser": 0.99, "Bag": 0.975},
                float_model_uri="runs:/abc/exchange/baseline/baseline.keras")
    assert text.startswith("# `prune+cluster+qat4-int4`: version 7 of `fashion`")
    assert "**Champion decision:** champion: first champion of this registered model" in text
    # source and lineage
    assert "`default-cnn` (trained by the pipeline, 12 epochs)" in text
    assert "runs:/abc/exchange/baseline/baseline.keras" in text
    assert ("`s3://bucket/fashion/` (54000 training images, 6000 validation images, 10000 test "
            "images, digest `0123456789abcdef`)") in text
    assert "training: `fashion-train`, digest `d41d8cd9`, source `s3://bucket/fashion/`" in text
    # what was done, with the settings it ran with
    assert "`int4`: int4 weights on fully-connected layers" in text
    assert "`prune`: target sparsity 0.91, blocks of 16, 8 epochs" in text
    assert "`cluster`: 8 centroids per kernel" in text
    assert "`qat4`: int4-aware training" in text
    # the measurements, the runtimes and the reference they are compared with
    for figure in ("0.9231", "-0.86", "35,800 B", "214,800 B", "47.21x", "7.87x", "0.021 / 0.030",
                   "41.2", "1,690,016 B", "LiteRT `compiled_model` (xnnpack)"):
        assert figure in text, figure
    assert "Latency and memory measured on LiteRT `compiled_model`" in text
    # gates, the selection, per-class accuracy and serving
    assert "accuracy drop at most 1 pts; accuracy at least 0.5000" in text
    assert ("passed, 1 of 2 passing variants by smallest gzip size not slower than float32; on "
            "the Pareto front") in text
    assert any(line.startswith("| `T-shirt/top`") and line.endswith(" 0.8600 |")
               for line in text.splitlines())
    assert "make serve MODEL=models:/fashion/7" in text
    assert "curl -s 127.0.0.1:5001/invocations" in text


def test_version_card_of_a_rejected_variant_says_why():
    text = card("int4", decision="not champion: did not pass the gates; v6 (int8) stays champion")
    assert "rejected: accuracy drop 2.17 pts > 1.0 allowed" in text
    assert "not champion: did not pass the gates" in text
    assert "**Training-time techniques:** none" in text
    assert "Accuracy per class" not in text                 # not given: no empty section


def test_registered_model_description_says_what_it_classifies():
    text = registered_model_description("fashion", ["T-shirt/top", "Trouser", "Bag"], "28x28x1",
                                        LINEAGE)
    assert "**Classes (3):** `T-shirt/top`, `Trouser`, `Bag`" in text
    assert "`(N, 28, 28, 1)`" in text
    assert "`s3://bucket/fashion/`" in text


def test_an_auto_variants_card_names_the_settings_its_search_chose():
    text = card("prune+cluster+qat4-int4", run_params={
        "technique.search.prune_sparsity": "0.9412", "technique.search.prune_block": "16",
        "technique.search.cluster_count": "8", "technique.search.trial": "5",
        "technique.search.trials": "12", "technique.prune.prune_epochs": "8"})
    assert ("**Settings found by the accuracy-aware search** (trial 5 of 12, chosen on the "
            "validation split): cluster_count 8, prune_block 16, prune_sparsity 0.9412") in text
    assert "target sparsity 0.91" not in text  # not the configured settings
