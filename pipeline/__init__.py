"""Model compression pipeline: train or bring a Keras classifier, compress it every useful way,
measure each variant through LiteRT, pick and register the best. See README.md."""
import os

# TF-MOT needs Keras 2 (tf_keras); this must be set before TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
