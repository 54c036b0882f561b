"""The numpy encoder and decoder halves must reproduce the Keras model's halves (to 1e-5)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from detector import DenseLayer, DenseNetwork
from detector.errors import ArtifactError
from detector.halves import code_width, decode, decoder, encode
from trainer.config import ModelConfig
from trainer.model import build_autoencoder, import_keras, seed_everything


def _keras_model(activation: str, output: str, dropout: float) -> Any:
    seed_everything(5, deterministic=False)
    hp = ModelConfig(hidden=(10, 6), code_size=3, activation=activation, dropout=dropout)  # type: ignore[arg-type]
    model = build_autoencoder(8, hp, output)
    # Non-zero biases, so a decoder that skipped or misplaced a bias would be caught.
    rng = np.random.default_rng(9)
    for layer in model.layers:
        if layer.get_weights():
            k, b = layer.get_weights()
            layer.set_weights([k, rng.normal(0, 0.5, b.shape)])
    return model


def _keras_decoder(model: Any) -> Any:
    """A Keras model from a code input through the layers after ``code`` (Dropout included:
    it is the identity at inference, as in the autoencoder)."""
    keras = import_keras()
    names = [lay.name for lay in model.layers]
    after = model.layers[names.index("code") + 1 :]
    code_in = keras.Input(shape=(model.get_layer("code").units,))
    h = code_in
    for layer in after:
        h = layer(h)
    return keras.Model(code_in, h)


@pytest.mark.parametrize(
    ("activation", "output", "dropout"),
    [("relu", "sigmoid", 0.2), ("tanh", "linear", 0.0), ("elu", "elu", 0.1)],
)
def test_halves_match_keras_encoder_and_decoder(
    activation: str, output: str, dropout: float
) -> None:
    keras = import_keras()
    model = _keras_model(activation, output, dropout)
    net = DenseNetwork.from_keras(model)
    assert code_width(net) == 3
    x = np.random.default_rng(0).normal(0, 2, size=(131, 8)).astype(np.float32)
    keras_encoder = keras.Model(model.inputs, model.get_layer("code").output)
    codes = encode(net, x)
    np.testing.assert_allclose(codes, keras_encoder.predict(x, verbose=0), rtol=0, atol=1e-5)
    # Codes spread wider than the encoder's own outputs reach every activation branch.
    c = np.random.default_rng(1).normal(0, 3, size=(97, 3)).astype(np.float32)
    np.testing.assert_allclose(
        decode(net, c), _keras_decoder(model).predict(c, verbose=0), rtol=0, atol=1e-5
    )
    # The two halves compose to the whole network, operation for operation.
    assert np.array_equal(decode(net, codes), net.forward(x))


def test_decode_refuses_codes_of_the_wrong_width() -> None:
    net = DenseNetwork(
        layers=(
            DenseLayer(np.ones((4, 2), np.float32), np.zeros(2, np.float32), "linear"),
            DenseLayer(np.ones((2, 4), np.float32), np.zeros(4, np.float32), "linear"),
        ),
        code_layer=0,
    )
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        decode(net, np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        decode(net, np.zeros(2))
    assert decode(net, np.ones((1, 2))).tolist() == [[2.0, 2.0, 2.0, 2.0]]


def test_a_network_whose_code_is_its_output_has_no_decoder() -> None:
    net = DenseNetwork(
        layers=(DenseLayer(np.ones((4, 2), np.float32), np.zeros(2, np.float32), "linear"),),
        code_layer=0,
    )
    with pytest.raises(ArtifactError, match="no decoder half"):
        decoder(net)
