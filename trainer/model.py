"""The Keras autoencoders (dense or 1-D convolutional): build, seed and fit one.

TensorFlow is imported lazily (:func:`import_keras`), after the config and the data have
been checked, so a user error is reported in well under a second and without TensorFlow's
start-up chatter.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trainer.config import ModelConfig

Progress = Callable[[str], None]
F32 = npt.NDArray[np.float32]


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Silence file descriptor 2 while TensorFlow's C++ runtime loads.

    Its start-up lines ("oneDNN custom operations are on", "Could not find cuda drivers")
    are written by absl before any log level applies, so no environment variable hides
    them. If the import fails, the captured text is replayed so nothing is lost.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreter): nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))


def import_keras() -> Any:
    """Import and return ``keras`` (TensorFlow backend) quietly; cheap after the first call."""
    if "keras" in sys.modules and "tensorflow" in sys.modules:
        return sys.modules["keras"]
    # Level 3 also hides the C++ runtime's E-level noise on a CPU-only machine ("failed
    # call to cuInit", graph attribute mismatches); real failures still raise in Python.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _quiet_fd2():
        import keras
        import tensorflow  # noqa: F401  (loads the runtime while fd 2 is silenced)
    return keras


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and TensorFlow; optionally make TF ops deterministic.

    With op determinism on, one seed gives bit-identical weights run after run on the same
    machine and library versions (tested). It cannot be turned off again in a process.
    """
    keras = import_keras()
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def build_autoencoder(
    n_features: int,
    hp: ModelConfig,
    output_activation: str,
    steps: int = 1,
    step_units: int = 0,
) -> Any:
    """A compiled dense autoencoder ``n → hidden… → code → reversed(hidden)… → n``.

    Layers are plain ``Dense`` (plus ``Dropout`` during training) with built-in activations
    only, so :meth:`detector.DenseNetwork.from_keras` can copy it into the numpy scorer.
    The code layer is named ``code``; loss is MSE, optimiser Adam(``hp.learning_rate``).

    Windowed (``steps > 1``, input = ``steps`` readings flattened): with ``step_units > 0``
    a per-reading ``Dense(step_units)`` shared by every step comes first (``steps × d →
    steps × step_units``) and its mirror last (``steps × step_units → steps × d``), so the
    costly full-width layers see ``steps × step_units`` values instead of ``steps × d``.
    """
    if hp.architecture == "conv1d":
        return build_conv_autoencoder(n_features, hp, output_activation, steps)
    if hp.hidden is None or hp.code_size is None:
        # Auto shapes depend on the input width: trainer.pipeline.resolve_shape fills them.
        raise ValueError("model.hidden / model.code_size must be resolved before building")
    keras = import_keras()
    layers = keras.layers
    reg = keras.regularizers.L2(hp.l2) if hp.l2 > 0 else None

    def dense(units: int, name: str, activation: str) -> Any:
        return layers.Dense(units, activation=activation, kernel_regularizer=reg, name=name)

    inputs = keras.Input(shape=(n_features,), name="reading")
    h = inputs
    per_step = steps > 1 and step_units > 0
    if per_step:
        d = n_features // steps
        h = layers.Reshape((steps, d), name="steps")(h)
        h = dense(step_units, "step_encoder", hp.activation)(h)
        h = layers.Flatten(name="step_codes")(h)
    for i, width in enumerate(hp.hidden):
        h = dense(width, f"encoder_{i}", hp.activation)(h)
        if hp.dropout > 0:
            h = layers.Dropout(hp.dropout, name=f"encoder_{i}_dropout")(h)
    h = dense(hp.code_size, "code", hp.activation)(h)
    for i, width in enumerate(reversed(hp.hidden)):
        h = dense(width, f"decoder_{i}", hp.activation)(h)
        if hp.dropout > 0:
            h = layers.Dropout(hp.dropout, name=f"decoder_{i}_dropout")(h)
    if per_step:
        h = dense(steps * step_units, "step_codes_out", hp.activation)(h)
        h = layers.Reshape((steps, step_units), name="steps_out")(h)
        h = dense(d, "reconstruction_steps", output_activation)(h)
        out = layers.Flatten(name="reconstruction")(h)
    else:
        out = dense(n_features, "reconstruction", output_activation)(h)
    model = keras.Model(inputs, out, name="autoencoder")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=hp.learning_rate), loss="mse")
    return model


def build_conv_autoencoder(
    n_inputs: int, hp: ModelConfig, output_activation: str, steps: int
) -> Any:
    """A compiled 1-D convolutional autoencoder over windows of ``steps`` readings.

    The input stays the flattened window (``steps × d`` values, oldest reading first), so
    the trainer's data path and :meth:`detector.Detector.score_windows` are those of the
    dense windowed models: ``Reshape((steps, d))`` → for each of ``hp.conv_filters``
    ``Conv1D(f, conv_kernel, strides=conv_stride, padding="same", activation)`` → the
    mirror ``Conv1DTranspose`` layers → ``Conv1DTranspose(d, conv_kernel, padding="same",
    output_activation)`` → ``Flatten``. ``Dropout(conv_dropout)`` follows every
    convolution but the innermost and the output one. With the defaults this is SKAB's
    published Conv-AE (32 → 16 filters, kernel 7, stride 2, dropout 0.2, relu), except its
    last layer, which has ``d`` filters here (the published one has 1 and is trained
    against all ``d`` channels by broadcasting, so it can only reconstruct their mean).
    Loss MSE, Adam(``hp.learning_rate``); ``hp.l2`` on every kernel.
    """
    keras = import_keras()
    layers = keras.layers
    if steps < 2 or n_inputs % steps:
        raise ValueError(f"conv1d needs windows of >= 2 readings, got {steps} for {n_inputs}")
    d = n_inputs // steps
    reg = keras.regularizers.L2(hp.l2) if hp.l2 > 0 else None
    conv = {"kernel_size": hp.conv_kernel, "padding": "same", "kernel_regularizer": reg}
    filters = list(hp.conv_filters)
    inputs = keras.Input(shape=(n_inputs,), name="reading")
    h = layers.Reshape((steps, d), name="window")(inputs)
    for i, f in enumerate(filters):
        name = "code" if i == len(filters) - 1 else f"encoder_{i}"
        h = layers.Conv1D(f, strides=hp.conv_stride, activation=hp.activation, name=name, **conv)(h)
        if hp.conv_dropout > 0 and i < len(filters) - 1:
            h = layers.Dropout(hp.conv_dropout, name=f"encoder_{i}_dropout")(h)
    for i, f in enumerate(reversed(filters)):
        h = layers.Conv1DTranspose(
            f, strides=hp.conv_stride, activation=hp.activation, name=f"decoder_{i}", **conv
        )(h)
        if hp.conv_dropout > 0 and i < len(filters) - 1:
            h = layers.Dropout(hp.conv_dropout, name=f"decoder_{i}_dropout")(h)
    h = layers.Conv1DTranspose(
        d, activation=output_activation, name="reconstruction_steps", **conv
    )(h)
    out = layers.Flatten(name="reconstruction")(h)
    model = keras.Model(inputs, out, name="conv_autoencoder")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=hp.learning_rate), loss="mse")
    return model


@dataclass(frozen=True)
class FitHistory:
    """What one ``fit`` did.

    Attributes:
        loss, val_loss: per epoch, MSE in scaled units (plus the L2 penalty, if any).
        epoch_seconds: wall time of each epoch, seconds.
        best_epoch: 1-based epoch whose weights were kept (lowest val_loss).
        best_val_loss: that epoch's val_loss.
        stopped_early: True when early stopping ended training before ``epochs``.
        seconds: wall time of the whole fit, seconds.
    """

    loss: tuple[float, ...]
    val_loss: tuple[float, ...]
    epoch_seconds: tuple[float, ...]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": list(self.loss),
            "val_loss": list(self.val_loss),
            "epoch_seconds": list(self.epoch_seconds),
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "stopped_early": self.stopped_early,
            "seconds": self.seconds,
        }


def fit_autoencoder(
    model: Any,
    x_train: F32,
    x_val: F32,
    hp: ModelConfig,
    progress: Progress | None = None,
    prefix: str = "",
) -> FitHistory:
    """Fit ``model`` to reconstruct ``x_train`` (scaled, float32), early-stopping on ``x_val``.

    The best epoch's weights are restored at the end. One progress line per epoch
    (``epoch 3/50 loss … val_loss … 0.8 s``) goes to ``progress``; Keras' own progress bar is
    off, since it floods logs when stderr is not a terminal.
    """
    keras = import_keras()
    losses: list[float] = []
    val_losses: list[float] = []
    seconds: list[float] = []

    callback_base: Any = keras.callbacks.Callback

    class EpochLog(callback_base):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            dt = time.perf_counter() - self._t0
            loss, val = float(logs["loss"]), float(logs["val_loss"])
            losses.append(loss)
            val_losses.append(val)
            seconds.append(dt)
            if progress is not None:
                progress(
                    f"{prefix}epoch {epoch + 1}/{hp.epochs}  loss {loss:.6f}  "
                    f"val_loss {val:.6f}  {dt:.1f} s"
                )

    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss",
        patience=hp.patience,
        min_delta=hp.min_delta,
        restore_best_weights=True,
    )
    t0 = time.perf_counter()
    model.fit(
        x_train,
        x_train,
        validation_data=(x_val, x_val),
        epochs=hp.epochs,
        batch_size=hp.batch_size,
        shuffle=True,
        verbose=0,
        callbacks=[EpochLog(), stop],
    )
    total = time.perf_counter() - t0
    best = int(np.argmin(val_losses))
    return FitHistory(
        loss=tuple(losses),
        val_loss=tuple(val_losses),
        epoch_seconds=tuple(seconds),
        best_epoch=best + 1,
        best_val_loss=val_losses[best],
        stopped_early=len(losses) < hp.epochs,
        seconds=total,
    )
