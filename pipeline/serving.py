"""The served model: a pyfunc classifier around a .tflite file, and its request example.

MLflow has no TFLite flavor, so `TFLiteClassifier` is a `mlflow.pyfunc.PythonModel` running the
file on LiteRT (`pipeline.runtime.litert`: the CompiledModel it was measured on). Its input is
a batch of images (N, H, W, C), float32, in the model's own input domain (this pipeline's
loaders scale pixels to [0, 1]), the shape every other part of the pipeline holds images in; its
signature says so, and its stored serving input example (`serving_input_example.json`) is a ready
request body. Integer models (int8/int16x8 inputs) get their inputs quantized and their outputs
dequantized here, so every variant takes and returns floats. The output is a pandas DataFrame,
one row per image: `class` (int, the argmax of the scores), `label` (str, only when class names
were given), and `score_0` .. `score_<K-1>` (float32, the model's dequantized outputs, softmax
probabilities for the pipeline's models). Served with `mlflow models serve`, it answers
`{"inputs": [[[[0.0], ...]]]}` (N x H x W x C nested lists) with
`{"predictions": [{"class": 3, "label": "Dress", "score_0": ..., ...}]}`.

The model ships its own code (this module, `pipeline.runtime.litert` and `pipeline.errors`,
staged as `code_paths`) and needs only ai-edge-litert, numpy and pandas at serving time, not
TensorFlow.
"""
from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.pyfunc.model import PythonModel

from pipeline.errors import PipelineInputError, first_line
from pipeline.runtime.litert import TFLiteRunner

log = logging.getLogger("pipeline.serving")

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

# Test images stored with the model as its input example (and in its serving example).
EXAMPLE_IMAGES = 3
# The modules the pyfunc model needs when it is loaded elsewhere (keep their imports light).
SERVING_MODULES = ("__init__.py", "errors.py", "serving.py", "runtime/__init__.py",
                   "runtime/litert.py")
SERVING_PACKAGES = ("ai-edge-litert", "numpy", "pandas")
PYFUNC_NAME = "tflite_pyfunc"


class TFLiteClassifier(PythonModel):
    """A pyfunc classifier around the artifact `tflite` (see the module docstring for the I/O).

    `model_config={"num_threads": N}` (at logging or `mlflow.pyfunc.load_model` time) sets the
    runtime's threads; the default, 1, matches how the pipeline measured latency."""

    def __init__(self, class_names: list[str] | None = None):
        self.class_names = list(class_names) if class_names else None
        self._runner: TFLiteRunner | None = None

    def __getstate__(self):
        return {"class_names": self.class_names}  # the runtime is rebuilt by load_context

    def __setstate__(self, state):
        self.class_names = state["class_names"]
        self._runner = None

    def load_context(self, context):
        num_threads = int((context.model_config or {}).get("num_threads", 1))
        self._runner = TFLiteRunner(context.artifacts["tflite"], num_threads=num_threads)
        # The runtime the pipeline evaluated and benchmarked this model on (CompiledModel).
        log.info("serving on LiteRT %s", self._runner.describe())

    # Annotated np.ndarray (MLflow infers no schema from it): the logged signature validates.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        if self._runner is None:
            raise RuntimeError("the model's context is not loaded (mlflow.pyfunc.load_model does it)")
        return self.frame(self._runner.scores(self._runner.images(model_input)))

    def frame(self, scores: np.ndarray) -> pd.DataFrame:
        classes = scores.argmax(axis=1).astype(np.int64)
        columns: dict[str, Any] = {"class": classes}
        if self.class_names:
            if len(self.class_names) != scores.shape[1]:
                raise PipelineInputError(f"{len(self.class_names)} class names for a model with "
                                         f"{scores.shape[1]} outputs")
            columns["label"] = [self.class_names[c] for c in classes]
        for k in range(scores.shape[1]):
            columns[f"score_{k}"] = scores[:, k]
        return pd.DataFrame(columns)


def log_tflite_pyfunc(tflite_path: str | Path, input_example: Any = None, name: str = "model",
                      class_names: list[str] | None = None, num_threads: int = 1) -> "ModelInfo":
    """Log `tflite_path` as a servable pyfunc model in the active run.

    `input_example`: a few images (default: one black image); the signature is a float32 tensor
    (-1, H, W, C)."""
    runner = TFLiteRunner(tflite_path, num_threads=num_threads)
    if input_example is None:
        input_example = np.zeros((1, *runner.image_shape), np.float32)
    example = runner.images(input_example)
    model = TFLiteClassifier(class_names)
    with warnings.catch_warnings():
        # "integer columns cannot represent missing values": `class` is never missing.
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(example, model.frame(runner.scores(runner.images(example))))
    from pipeline.store.tracking import explain_artifact_errors  # not needed (nor shipped) for serving
    active = mlflow.active_run()
    with tempfile.TemporaryDirectory() as staging, explain_artifact_errors(
            "pyfunc model", active.info.run_id if active else ""):
        return mlflow.pyfunc.log_model(
            name=name, python_model=model, artifacts={"tflite": str(tflite_path)},
            code_paths=[_stage_serving_code(Path(staging))], signature=signature,
            input_example=example, pip_requirements=serving_requirements(),
            model_config={"num_threads": num_threads})


def serving_requirements() -> list[str]:
    """What the pyfunc model needs at serving time, pinned to the versions it was built with."""
    return [f"{package}=={importlib.metadata.version(package)}" for package in SERVING_PACKAGES]


def _stage_serving_code(staging: Path) -> str:
    """Copy the modules the model imports into `staging/pipeline` (a minimal package)."""
    package = Path(__file__).resolve().parent
    target = staging / package.name
    for module in SERVING_MODULES:
        (target / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package / module, target / module)
    return str(target)


def write_serving_example(model_uri: str, out_path: str | Path) -> Path:
    """The request body stored with a registered model (its input example), written to
    `out_path` for `curl -d @out_path .../invocations`."""
    from pipeline.store import tracking  # the project's tracking store when none is set
    tracking.client()
    try:
        local = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/serving_input_example.json")
    except MlflowException as error:
        raise PipelineInputError(f"cannot read {model_uri} from MLflow at "
                                 f"{tracking.tracking_uri()}: {first_line(error)} (run "
                                 "make run first, or give MODEL=models:/NAME@ALIAS)") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local, out)
    return out


def main(argv=None) -> int:
    """`python -m pipeline.serving example MODEL_URI OUT.json`: a ready request body."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "example":
        print("usage: python -m pipeline.serving example MODEL_URI OUT.json", file=sys.stderr)
        return 2
    try:
        print(f"request body for {args[1]}: {write_serving_example(args[1], args[2])}")
    except PipelineInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
