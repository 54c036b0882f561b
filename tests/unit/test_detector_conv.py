"""The numpy Conv1D / Conv1DTranspose layers against Keras ``predict`` (needs TensorFlow).

Fits nothing: fresh Keras models (random weights, non-zero biases) are copied into the
numpy scorer and both are run on the same inputs; agreement to 1e-5 in every case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import StandardScaler

from detector import DenseNetwork, Detector, ModelInfo, Preprocessor, Registry, fit_threshold, load
from detector.errors import ArtifactError
from detector.network import Conv1DLayer, DenseLayer, conv_output_length
from detector.offline import score_rows
from detector.windows import sliding_windows

D = 3


def _randomise_biases(model: Any, seed: int = 3) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        w = layer.get_weights()
        if len(w) == 2:
            layer.set_weights([w[0], rng.normal(0, 0.5, w[1].shape)])


def _single_layer_model(kind: str, length: int, c_in: int, **kw: Any) -> Any:
    from trainer.model import import_keras

    keras = import_keras()
    inp = keras.Input(shape=(length * c_in,))
    h = keras.layers.Reshape((length, c_in))(inp)
    cls = keras.layers.Conv1D if kind == "conv" else keras.layers.Conv1DTranspose
    h = cls(**kw)(h)
    model = keras.Model(inp, keras.layers.Flatten()(h))
    _randomise_biases(model)
    return model


@pytest.mark.parametrize("kind", ["conv", "transpose"])
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize(
    ("length", "kernel", "stride"),
    [(12, 7, 2), (13, 7, 2), (10, 3, 1), (9, 4, 3), (8, 1, 1), (7, 2, 3), (6, 6, 1)],
)
def test_single_layer_matches_keras(
    kind: str, padding: str, length: int, kernel: int, stride: int
) -> None:
    from trainer.model import seed_everything

    seed_everything(length * 100 + kernel * 10 + stride, deterministic=False)
    act = "relu" if kind == "conv" else "tanh"
    model = _single_layer_model(
        kind,
        length,
        D,
        filters=5,
        kernel_size=kernel,
        strides=stride,
        padding=padding,
        activation=act,
    )
    net = DenseNetwork.from_keras(model)
    (layer,) = net.layers
    assert isinstance(layer, Conv1DLayer)
    assert layer.transpose == (kind == "transpose")
    lo = conv_output_length(length, kernel, stride, padding, kind == "transpose")
    assert net.n_outputs == lo * 5 == int(np.prod(model.output.shape[1:]))
    x = np.random.default_rng(1).normal(0, 2, size=(40, length * D)).astype(np.float32)
    np.testing.assert_allclose(net.forward(x), model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("w", [8, 60])
def test_conv_autoencoder_matches_keras_and_round_trips(w: int) -> None:
    from trainer.config import ModelConfig
    from trainer.model import build_autoencoder, seed_everything

    seed_everything(11, deterministic=False)
    hp = ModelConfig(architecture="conv1d", window=w, conv_dropout=0.2)
    model = build_autoencoder(w * D, hp, "linear", steps=w)
    _randomise_biases(model)
    net = DenseNetwork.from_keras(model)
    kinds = [(type(lay).__name__, getattr(lay, "transpose", None)) for lay in net.layers]
    assert kinds == [
        ("Conv1DLayer", False),
        ("Conv1DLayer", False),
        ("Conv1DLayer", True),
        ("Conv1DLayer", True),
        ("Conv1DLayer", True),
    ]
    assert (net.n_inputs, net.n_outputs) == (w * D, w * D)
    assert net.code_layer == 1  # Conv1D(16) at w / 4 steps: the narrowest output
    # 700 windows: more rows than one OpenBLAS-sized block, so the blocked path runs too.
    x = np.random.default_rng(7).normal(0, 2, size=(700, w * D)).astype(np.float32)
    keras_out = model.predict(x, verbose=0)
    np.testing.assert_allclose(net.forward(x), keras_out, atol=1e-5)
    np.testing.assert_allclose(net.forward(x[:3]), keras_out[:3], atol=1e-5)
    arrays, meta = net.to_arrays()
    assert [c["kind"] for c in meta["conv"]] == ["conv1d"] * 2 + ["conv1d_transpose"] * 3
    back = DenseNetwork.from_arrays(arrays, meta)
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    # A transposed kernel is stored (k, c_in, c_out) like a forward one.
    assert arrays["kernel_4"].shape == (7, 32, D)


def test_mixed_dense_and_conv_chain() -> None:
    from trainer.model import import_keras, seed_everything

    keras = import_keras()
    seed_everything(4, deterministic=False)
    w = 6
    inp = keras.Input(shape=(w * D,))
    h = keras.layers.Reshape((w, D))(inp)
    h = keras.layers.Conv1D(4, 3, strides=2, padding="same", activation="elu")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(5, activation="sigmoid")(h)
    h = keras.layers.Dense(3 * 4, activation="relu")(h)
    h = keras.layers.Reshape((3, 4))(h)
    h = keras.layers.Conv1DTranspose(D, 3, strides=2, padding="same")(h)
    model = keras.Model(inp, keras.layers.Flatten()(h))
    _randomise_biases(model)
    net = DenseNetwork.from_keras(model)
    assert [type(lay) for lay in net.layers] == [Conv1DLayer, DenseLayer, DenseLayer, Conv1DLayer]
    x = np.random.default_rng(2).normal(0, 1, size=(50, w * D)).astype(np.float32)
    np.testing.assert_allclose(net.forward(x), model.predict(x, verbose=0), atol=1e-5)
    back = DenseNetwork.from_arrays(*net.to_arrays())
    np.testing.assert_array_equal(back.forward(x), net.forward(x))


def _conv_detector(w: int = 8) -> tuple[Detector, Any]:
    from trainer.config import ModelConfig
    from trainer.model import build_autoencoder, seed_everything

    seed_everything(21, deterministic=False)
    model = build_autoencoder(
        w * D, ModelConfig(architecture="conv1d", window=w, conv_filters=(6, 4)), "linear", w
    )
    rng = np.random.default_rng(0)
    x = rng.normal(5, 2, size=(300, D))
    pre = Preprocessor.from_sklearn(SimpleImputer().fit(x), StandardScaler().fit(x))
    det = Detector(
        feature_names=tuple(f"s{i}" for i in range(D)),
        preprocessor=pre,
        network=DenseNetwork.from_keras(model),
        threshold=fit_threshold(rng.gamma(2, 0.1, 200)),
        feature_error_mean=np.full(D, 0.1),
        feature_error_std=np.full(D, 0.05),
        info=ModelInfo("conv-test"),
        window=w,
    )
    return det, model


def test_conv_detector_scores_windows_like_keras_and_names_sensors(tmp_path: Path) -> None:
    w = 8
    det, model = _conv_detector(w)
    rng = np.random.default_rng(5)
    x = rng.normal(5, 2, size=(40, D))
    x[30:, 1] += 15  # one sensor off from reading 30 on
    wins = sliding_windows(x, w)
    s = det.score_windows(wins)
    z = det.preprocessor.transform(wins.reshape(-1, D)).reshape(len(wins), w * D)
    rec = model.predict(z.astype(np.float32), verbose=0)
    sq = np.square(z - rec).reshape(len(wins), w, D)
    np.testing.assert_allclose(s.score, sq.mean(axis=(1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s.feature_error, sq.mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s.score, s.feature_error.mean(axis=1), rtol=1e-5)
    # Per-sensor attribution names the shifted sensor (window error aggregated per feature).
    last = len(wins) - 1
    top = det.contributions_many(wins[:, -1], s, [last])[0]
    assert top[0].sensor == "s1"
    # The artifact round trip (layer format in detector.json's network meta) scores alike.
    path = Registry(tmp_path).save(det)
    back = load(path)
    assert back.window == w
    np.testing.assert_array_equal(back.score_windows(wins).score, s.score)
    rs = score_rows(back, x)
    assert not rs.scored[: w - 1].any() and rs.scored[w - 1 :].all()
    np.testing.assert_allclose(rs.score[w - 1 :], s.score)


def test_bad_conv_descriptions_are_refused() -> None:
    det, _ = _conv_detector()
    arrays, meta = det.network.to_arrays()
    bad = dict(meta, conv=[dict(meta["conv"][0], kind="conv2d"), *meta["conv"][1:]])
    with pytest.raises(ArtifactError, match="unknown layer kind"):
        DenseNetwork.from_arrays(arrays, bad)
    bad = dict(meta, conv=[dict(meta["conv"][0], padding="causal"), *meta["conv"][1:]])
    with pytest.raises(ArtifactError, match="padding"):
        DenseNetwork.from_arrays(arrays, bad)
    bad = dict(meta, conv=[dict(meta["conv"][0], length=6), *meta["conv"][1:]])
    with pytest.raises(ArtifactError, match="do not chain"):
        DenseNetwork.from_arrays(arrays, bad)
    # Without the conv description (an older reader's view) the 3-D kernels are refused.
    old = {k: v for k, v in meta.items() if k != "conv"}
    with pytest.raises(ArtifactError, match="shapes do not match"):
        DenseNetwork.from_arrays(arrays, old)


def test_conv_config_checks_the_window() -> None:
    from trainer.config import ModelConfig, _check_conv
    from trainer.errors import ConfigError

    _check_conv(ModelConfig(architecture="conv1d", window=60))
    for w in (1, 2, 10, 62):
        with pytest.raises(ConfigError, match="multiple of 4"):
            _check_conv(ModelConfig(architecture="conv1d", window=w))
    _check_conv(ModelConfig(architecture="conv1d", window=9, conv_stride=3, conv_filters=(4,)))
