"""Where a run starts: datasets, users' models (tf_keras, Keras 3, SavedModel, .tflite), the Keras 3 -> tf_keras translation, inputs by URI."""
