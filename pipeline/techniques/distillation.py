"""Knowledge distillation: train a smaller student on the teacher's temperature-softened outputs
plus the hard labels. The student of the pipeline's own CNN is `build_cnn` at
`config.student_width` (about a quarter of its multiply-adds at width 0.5); the student of any
other architecture (a user's model, a Keras 3 model's translation) is a width-scaled copy of it:
the same layers with filters and hidden units times `student_width`, the output layer unchanged.
Either starts from the teacher's weights cut to its width (`inherit_weights`; `student_init`
'scratch' for random weights): on few images a student from scratch learned too little (the
10-class small model of tests/test_small_models.py: 4.1 pts under its teacher, while its 54
validation images could not tell).

    loss = alpha * CE(labels, student)
           + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The teacher's logits are computed once on the training and validation images and fed to Keras as
a second target column, so training is a plain `fit` (no custom train_step) and the teacher is not
run again every epoch. A teacher with a softmax output contributes its log-probabilities, which
are logits up to a constant (softmax ignores the constant). The student trains on logits (a
softmax at the teacher's output is made linear in its copy) and is returned, plain and uncompiled,
with the teacher's output activation; refuses (TechniqueError) a student that would not have
fewer multiply-adds than the teacher.

Sized to the model and the data: the student keeps at least MIN_STUDENT_WEIGHTS weights (its
width rises above `student_width` for a teacher of a few thousand weights), and it trains for at
least MIN_STEPS["distill"] optimizer steps (`sizing.fine_tuning`: smaller batches, more epochs on
a few hundred images) with BatchNorm momentum low enough that its moving averages forget their
initial 0 / 1. Backing off, each retry halves the gap between the width and 1 (up to
MAX_WIDTH) and trains twice as long.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

from pipeline.errors import TechniqueError
from pipeline.sources.models import build_cnn, count_macs, tf_keras
from pipeline.techniques import sizing
from pipeline.techniques.backoff import configured
from pipeline.techniques.finetune import batchnorm_momentum, outputs_probabilities
from pipeline.techniques.train import cosine_schedule, fit
from pipeline.techniques.validation import training_image_count

NAME = "distill"
# A student is a fresh network: below a few thousand weights it has no capacity to give away.
MIN_STUDENT_WEIGHTS = 2000
WIDTH_STEP = 0.125          # widths are multiples of this
MAX_WIDTH = 0.875           # wider is not a smaller model
# A student learns from scratch: on few images its accuracy follows its training length (a
# 0.875-wide student of a 3,300-weight model on 486 images: 65 % after 620 steps, 84 % after
# 1,240; the teacher 92 %), so each retry doubles it.
RELAXED_EPOCHS_FACTOR = 2


def settings(model, dataset, config) -> dict:
    """What `apply` uses on this teacher and data: the student's width (`student_width`, or
    wider for a small teacher), epochs and batch size."""
    affordable = math.sqrt(MIN_STUDENT_WEIGHTS / max(1, model.count_params()))
    width = max(config.student_width, min(MAX_WIDTH, _step_up(affordable))) \
        if config.size_to_data else config.student_width
    plan = sizing.fine_tuning(NAME, config.distill_epochs, config.batch_size,
                              training_image_count(dataset), to_data=config.size_to_data)
    return {"student_width": width, "distill_epochs": plan.epochs,
            "batch_size": plan.batch_size}


def relax(settings: dict) -> dict:
    """Half the way from the width to 1 (up to MAX_WIDTH) and twice the training."""
    wider = min(MAX_WIDTH, _step_up((1 + settings["student_width"]) / 2))
    return {"student_width": max(settings["student_width"], wider),
            "distill_epochs": math.ceil(settings["distill_epochs"] * RELAXED_EPOCHS_FACTOR)}


def _step_up(width: float) -> float:
    return math.ceil(round(width / WIDTH_STEP, 6)) * WIDTH_STEP


def apply(model, dataset, config, *, applied: tuple[str, ...] = ()):
    keras = tf_keras()
    config = configured(config, settings(model, dataset, config))
    teacher = model
    if teacher.name == "cnn":  # the pipeline's own default CNN (build_cnn's name)
        student = build_cnn(dataset.input_shape, dataset.num_classes, width=config.student_width,
                            name="student_cnn")
    else:
        student = scaled_copy(teacher, config.student_width, logits=True)
    teacher_macs, student_macs = count_macs(teacher), count_macs(student)
    if teacher_macs and student_macs >= teacher_macs:
        raise TechniqueError(
            f"{NAME}: the student ({student_macs:,} multiply-adds at student_width="
            f"{config.student_width}) is not smaller than the teacher ({teacher_macs:,}): "
            "lower student_width")

    if config.student_init == "teacher":
        inherit_weights(student, teacher)
    steps = config.distill_epochs * math.ceil(training_image_count(dataset) / config.batch_size)
    refresh = batchnorm_momentum(student, steps) if config.size_to_data \
        else nullcontext()
    with refresh:
        fit_to_teacher(student, teacher, dataset, config, epochs=config.distill_epochs,
                       learning_rate=config.learning_rate)
    # An uncompiled copy: it saves without the custom loss and optimizer state, and a teacher's
    # softmax output is put back (the student trained on logits), so it serves like the teacher.
    if teacher.name == "cnn":
        plain = keras.models.clone_model(student)
    else:
        plain = scaled_copy(teacher, config.student_width)
    plain.set_weights(student.get_weights())
    return plain


# Layer classes whose width (output channels or units) the student scales, by config key.
_WIDTH_KEYS = {"Conv2D": "filters", "SeparableConv2D": "filters", "Dense": "units"}


def scaled_copy(teacher, width: float, *, logits: bool = False):
    """The teacher's architecture with every Conv2D/SeparableConv2D's filters and every hidden
    Dense layer's units times `width` (at least 4), fresh weights. The output layers keep their
    width; layers that follow a scaled one (BatchNormalization, depthwise convs, Add) take the
    new width when the copy is built. With `logits`, a softmax at the output (the last Dense's
    activation, or a Softmax/Activation layer) becomes linear: the distillation loss takes
    logits, and a softmax under it flattens the gradients (a MobileNetV2 student stayed near
    chance). The weights are the same either way, so the trained logits copy's weights load
    into the softmax one."""
    keras = tf_keras()
    # The model's output layers and its last Dense (the class scores, maybe before a softmax
    # Activation layer) keep their width.
    dense = [layer.name for layer in teacher.layers if type(layer).__name__ == "Dense"]
    keep = set(teacher.output_names) | set(dense[-1:])

    def clone(layer):
        config = layer.get_config()
        kind = type(layer).__name__
        key = _WIDTH_KEYS.get(kind)
        if key and layer.name not in keep:
            config[key] = max(4, int(round(config[key] * width)))
        if logits and layer.name in keep:
            if kind == "Softmax" or (kind == "Activation" and config.get("activation") == "softmax"):
                return keras.layers.Activation("linear", name=layer.name)
            if config.get("activation") == "softmax":
                config["activation"] = "linear"
        return layer.__class__.from_config(config)

    try:
        return keras.models.clone_model(teacher, clone_function=clone)
    except (ValueError, TypeError) as error:
        raise TechniqueError(
            f"{NAME}: cannot build a width-scaled student of {teacher.name} ({error}); use a "
            "model without fixed-size Reshape layers, or skip distill") from None


def inherit_weights(student, teacher) -> int:
    """Start `student` (a narrower copy of `teacher`'s architecture: `scaled_copy` or the default
    CNN at a width) from the teacher's weights: each weight is the leading slice of the
    teacher's (its first filters, units and channels). The same indices in every layer keep
    residual Adds and depthwise channels lined up, and a Dense after a Flatten takes the rows of
    the kept channels at every position. The student then starts as the teacher with its last
    channels cut away, a far better start than random on few images (the 10-class small
    model's width-0.875 student: 0.825 from scratch against the teacher's 0.866). Layers are
    paired by position when the two models have the same layer kinds in the same order, else by
    name; a layer whose weights do not fit (another shape or rank) keeps its random start.
    Returns the number of layers seeded."""
    import numpy as np

    kinds = [type(layer).__name__ for layer in student.layers]
    pairs = list(zip(student.layers, teacher.layers)) \
        if kinds == [type(layer).__name__ for layer in teacher.layers] \
        else [(layer, _layer_named(teacher, layer.name)) for layer in student.layers]
    seeded = 0
    for mine, theirs in pairs:
        weights = mine.get_weights()
        if theirs is None or not weights:
            continue
        source = theirs.get_weights()
        rows = _flattened_rows(mine, theirs)
        new = []
        for own, other in zip(weights, source):
            if rows is not None and own.ndim == 2 and rows.size == own.shape[0]:
                other = other[rows]
            if own.ndim != other.ndim or any(a > b for a, b in zip(own.shape, other.shape)):
                break
            new.append(np.ascontiguousarray(other[tuple(slice(0, n) for n in own.shape)]))
        if len(new) == len(weights) == len(source):
            mine.set_weights(new)
            seeded += 1
    return seeded


def _layer_named(model, name: str):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def _flattened_rows(mine, theirs):
    """For a Dense layer fed by a Flatten (maybe through Dropout) of a narrower feature map: the
    teacher's kernel rows that hold the student's channels, position by position (a flattened
    (h, w, c) map puts channel c of position p at row p * channels + c); else None."""
    import numpy as np

    if type(mine).__name__ != "Dense":
        return None
    shapes = []
    for layer in (mine, theirs):
        producer = layer.input._keras_history.layer if hasattr(layer.input, "_keras_history") \
            else None
        while producer is not None and type(producer).__name__ == "Dropout":
            producer = producer.input._keras_history.layer
        if producer is None or type(producer).__name__ != "Flatten":
            return None
        shapes.append(tuple(producer.input.shape[1:]))
    (*space, kept), (*teacher_space, channels) = shapes
    if space != teacher_space or kept >= channels:
        return None
    positions = int(np.prod(space)) if space else 1
    return (np.arange(positions)[:, None] * channels + np.arange(kept)[None, :]).reshape(-1)


def fit_to_teacher(student, teacher, dataset, config, *, epochs: int,
                   learning_rate: float) -> None:
    """Compile `student` (logits output) with the distillation loss
    (config.distill_temperature/_alpha) and a cosine-decayed Adam rate, then fit it for `epochs`
    on the labels and the teacher's outputs."""
    import tensorflow as tf

    keras = tf_keras()
    temperature, alpha = config.distill_temperature, config.distill_alpha

    def distillation_loss(target, student_logits):
        labels = tf.cast(target[:, 0], tf.int32)
        teacher_log_p = tf.nn.log_softmax(target[:, 1:] / temperature)
        student_log_p = tf.nn.log_softmax(student_logits / temperature)
        soft = tf.reduce_sum(tf.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
        hard = keras.losses.sparse_categorical_crossentropy(labels, student_logits,
                                                            from_logits=True)
        return alpha * hard + (1.0 - alpha) * temperature ** 2 * soft

    def accuracy(target, student_logits):
        labels = tf.cast(target[:, 0], tf.int64)
        return tf.cast(tf.equal(labels, tf.argmax(student_logits, axis=-1)), tf.float32)

    steps = math.ceil(dataset.train_count / config.batch_size)
    student.compile(optimizer=keras.optimizers.Adam(cosine_schedule(learning_rate, epochs, steps)),
                    loss=distillation_loss, metrics=[accuracy])

    def with_teacher(images, labels):
        """[label, teacher logits...] per image, computed batch by batch as the data streams."""
        return images, tf.concat([tf.cast(labels, tf.float32)[:, None],
                                  teacher_logits(teacher, images)], axis=1)
    # No flips here (unlike the baseline's training): in our runs the half-width student learned
    # less within its epoch budget from flipped images (-2.0 pts against -1.5 without).
    fit(student, dataset, epochs=epochs, batch_size=config.batch_size, seed=config.seed,
        targets=with_teacher)


def teacher_logits(teacher, images):
    """The teacher's logits (a float32 tensor); log-probabilities when its last layer is a
    softmax."""
    import tensorflow as tf
    outputs = tf.cast(teacher(images, training=False), tf.float32)
    if outputs_probabilities(teacher):
        outputs = tf.math.log(tf.clip_by_value(outputs, 1e-7, 1.0))
    return outputs
