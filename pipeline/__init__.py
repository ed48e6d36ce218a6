"""Model compression pipeline: train or bring a Keras classifier, compress it every useful way,
measure each variant through LiteRT, pick and register the best. See README.md."""
import os
import sys

# TF-MOT needs Keras 2 (tf_keras); this must be set before TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's native log (e.g. a failed CUDA probe on CPU-only machines); real errors still
# surface as Python exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def compress(*args, **kwargs):
    """The pipeline in this process: see pipeline.api.compress."""
    from pipeline.api import compress as run
    return run(*args, **kwargs)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 silenced: its native libraries print banners to
    stderr while loading, before any log level applies. Call it once, early, in programs whose
    stderr is read by people or scripts (the command line)."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
        import tf_keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
