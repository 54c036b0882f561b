"""The numpy forward pass must reproduce the Keras model it was copied from (to 1e-5)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from detector import DenseLayer, DenseNetwork
from detector.errors import ArtifactError
from detector.network import ACTIVATIONS
from trainer.config import Activation, ModelConfig
from trainer.model import build_autoencoder, import_keras, seed_everything


def _keras_model(activation: str, output: str, dropout: float = 0.0) -> Any:
    # Deterministic op mode is not needed here; only the weights' seed matters.
    seed_everything(11, deterministic=False)
    hp = ModelConfig(hidden=(12, 6), code_size=3, activation=activation, dropout=dropout)  # type: ignore[arg-type]
    model = build_autoencoder(9, hp, output)
    # Fresh Glorot weights with zero biases would leave bias handling untested.
    for layer in model.layers:
        if layer.get_weights():
            k, b = layer.get_weights()
            layer.set_weights([k, np.random.default_rng(3).normal(0, 0.5, b.shape)])
    return model


def test_supported_activations_are_exactly_the_trainers() -> None:
    assert set(ACTIVATIONS) == set(Activation.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_numpy_forward_matches_keras_predict(activation: str) -> None:
    model = _keras_model(activation, output=activation, dropout=0.2)
    net = DenseNetwork.from_keras(model)
    # Wide inputs reach every branch: sigmoid's both sides, relu/elu's negative part.
    x = np.random.default_rng(0).normal(0, 3, size=(257, 9)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(net.forward(x), expected, rtol=0, atol=1e-5)
    # The code layer is the bottleneck, and encode() equals Keras' own "code" layer output.
    keras = import_keras()
    encoder = keras.Model(model.inputs, model.get_layer("code").output)
    np.testing.assert_allclose(net.encode(x), encoder.predict(x, verbose=0), atol=1e-5)
    assert net.code_layer == 2
    assert [lay.activation for lay in net.layers] == [activation] * 6


def test_dropout_layers_are_skipped_and_shapes_chain() -> None:
    net = DenseNetwork.from_keras(_keras_model("relu", "sigmoid", dropout=0.5))
    assert [lay.kernel.shape for lay in net.layers] == [
        (9, 12),
        (12, 6),
        (6, 3),
        (3, 6),
        (6, 12),
        (12, 9),
    ]
    assert net.layers[-1].activation == "sigmoid"


def test_arrays_round_trip_is_exact() -> None:
    net = DenseNetwork.from_keras(_keras_model("tanh", "linear"))
    arrays, meta = net.to_arrays()
    back = DenseNetwork.from_arrays(arrays, meta)
    x = np.random.default_rng(1).normal(size=(50, 9)).astype(np.float32)
    assert np.array_equal(back.forward(x), net.forward(x))


def test_unsupported_activation_is_refused() -> None:
    with pytest.raises(ArtifactError, match="not supported"):
        DenseLayer(np.zeros((2, 2), np.float32), np.zeros(2, np.float32), "softplus")


def test_non_chaining_layers_are_refused() -> None:
    arrays = {
        "kernel_0": np.zeros((3, 2), np.float32),
        "bias_0": np.zeros(2, np.float32),
        "kernel_1": np.zeros((4, 3), np.float32),
        "bias_1": np.zeros(3, np.float32),
    }
    with pytest.raises(ArtifactError, match="chain"):
        DenseNetwork.from_arrays(arrays, {"activations": ["relu", "relu"], "code_layer": 0})
