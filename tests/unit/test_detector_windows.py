"""Windowed scoring, smoothing, out-of-range and watched constants of the detector core.

Built from numpy weights (no TensorFlow) except the one Keras cross-check, which fits
nothing: it copies a freshly built windowed Keras autoencoder into the numpy scorer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import StandardScaler

from detector import (
    DenseLayer,
    DenseNetwork,
    Detector,
    DetectorError,
    ModelInfo,
    Preprocessor,
    Registry,
    WatchedConstant,
    fit_threshold,
    load,
)
from detector.offline import score_rows
from detector.smoothing import ewma_batch, ewma_series
from detector.windows import gather_windows, sliding_windows

D = 3


def _detector(window: int = 1, seed: int = 0, **kw: object) -> Detector:
    rng = np.random.default_rng(seed)
    x = rng.normal(5, 2, size=(300, D))
    imp = SimpleImputer().fit(x)
    pre = Preprocessor.from_sklearn(imp, StandardScaler().fit(x))
    n = D * window

    def layer(i: int, o: int, act: str) -> DenseLayer:
        return DenseLayer(
            rng.normal(0, 0.5, (i, o)).astype(np.float32),
            rng.normal(0, 0.1, o).astype(np.float32),
            act,
        )

    net = DenseNetwork((layer(n, 4, "elu"), layer(4, 2, "tanh"), layer(2, n, "linear")), 1)
    args: dict[str, object] = {
        "feature_names": ("a", "b", "c"),
        "preprocessor": pre,
        "network": net,
        "threshold": fit_threshold(rng.gamma(2, 0.1, 100)),
        "feature_error_mean": rng.random(D),
        "feature_error_std": rng.random(D),
        "info": ModelInfo("w"),
        "window": window,
        "train_min": x.min(axis=0),
        "train_max": x.max(axis=0),
    }
    return Detector(**(args | kw))  # type: ignore[arg-type]


def test_window_one_scores_like_points() -> None:
    det = _detector(1)
    x = np.random.default_rng(1).normal(5, 3, size=(50, D))
    x[3, 1] = np.nan
    a, b = det.score(x), det.score_windows(x[:, None, :])
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.feature_error, b.feature_error)
    np.testing.assert_array_equal(a.reconstruction, b.reconstruction)


def test_score_windows_is_the_mse_of_the_flattened_window() -> None:
    det = _detector(4)
    x = np.random.default_rng(2).normal(5, 3, size=(20, D))
    wins = sliding_windows(x, 4)
    s = det.score_windows(wins)
    # Independent recomputation: scale every value, one matrix product chain by hand.
    z = ((x - det.preprocessor.center) / det.preprocessor.scale).astype(np.float32)
    flat = np.stack([z[i : i + 4].ravel() for i in range(17)])
    h = flat
    for lay in det.network.layers:
        h = h @ lay.kernel + lay.bias
        h = {"elu": lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0))), "tanh": np.tanh}.get(
            lay.activation, lambda v: v
        )(h)
    err = (flat - h) ** 2
    np.testing.assert_allclose(s.score, err.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(s.feature_error, err.reshape(17, 4, D).mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(s.reconstruction, h.reshape(17, 4, D)[:, -1], rtol=1e-5, atol=1e-6)
    assert s.feature_error.shape == (17, D) and s.score.shape == (17,)


def test_windowed_model_refuses_point_scoring_and_wrong_shapes() -> None:
    det = _detector(4)
    with pytest.raises(DetectorError, match="score_windows"):
        det.score(np.zeros((2, D)))
    with pytest.raises(DetectorError, match=r"\(m, 4, 3\)"):
        det.score_windows(np.zeros((2, 3, D)))
    with pytest.raises(DetectorError, match="disagree"):
        dataclasses.replace(det, window=2)


def test_gather_windows_equals_sliding_windows_of_each_device() -> None:
    rng = np.random.default_rng(3)
    devs = [str(d) for d in rng.integers(0, 3, 40)]
    x = rng.normal(size=(40, D)).astype(np.float32)
    w = 4
    # Two batches with state carried over give the windows of the whole series per device.
    b1 = gather_windows({}, devs[:25], x[:25], w)
    b2 = gather_windows(b1.history, devs[25:], x[25:], w)
    got = {(int(r), wi.tobytes()) for r, wi in zip(b1.rows, b1.windows, strict=True)}
    got |= {(int(r) + 25, wi.tobytes()) for r, wi in zip(b2.rows, b2.windows, strict=True)}
    want = set()
    for dev in set(devs):
        rows = [i for i, d in enumerate(devs) if d == dev]
        for j, win in enumerate(sliding_windows(x[rows], w)):
            want.add((rows[j + w - 1], np.ascontiguousarray(win).tobytes()))
    assert got == want
    assert list(b1.rows) == sorted(b1.rows)
    # Each device's first w - 1 readings are not scored; history keeps at most w - 1 rows.
    assert len(got) == sum(max(0, devs.count(d) - (w - 1)) for d in set(devs))
    assert all(len(h) <= w - 1 for h in b2.history.values())


def test_gather_windows_restarts_a_history_of_another_shape() -> None:
    b = gather_windows({"d": np.zeros((2, D + 1), np.float32)}, ["d"] * 3, np.ones((3, D)), 3)
    assert b.rows.tolist() == [2]  # the foreign history is dropped, not mixed in


def test_ewma_batch_equals_series_and_skips_non_finite() -> None:
    s = np.array([1.0, 2.0, np.nan, 4.0, 0.0])
    out = ewma_series(s, 0.5)
    assert out[:2].tolist() == [1.0, 1.5] and np.isnan(out[2])
    assert out[3] == 0.5 * 4 + 0.5 * 1.5 and out[4] == 0.5 * out[3]
    a, st = ewma_batch({}, ["x", "y", "x"], [1.0, 10.0, 3.0], 0.5)
    assert a.tolist() == [1.0, 10.0, 2.0] and st == {"x": 2.0, "y": 10.0}
    b, st2 = ewma_batch(st, ["x"], [4.0], 0.5)
    assert b.tolist() == [3.0] and st2["y"] == 10.0
    with pytest.raises(ValueError, match="alpha"):
        ewma_series(s, 0.0)


def test_out_of_range_in_training_ranges() -> None:
    det = _detector(1)
    lo, hi = det.train_min, det.train_max
    assert lo is not None and hi is not None
    span = hi - lo
    x = np.array([(lo + hi) / 2, lo + hi / 1e9, (lo + hi) / 2])
    x[1] = (lo + hi) / 2
    x[1, 0] = hi[0] + 0.25 * span[0]
    x[2, 2] = lo[2] - span[2]
    x[2, 1] = np.nan
    oor = det.out_of_range(x)
    assert oor.any.tolist() == [False, True, True]
    assert oor.excess[1, 0] == pytest.approx(0.25) and oor.excess[2, 2] == pytest.approx(-1.0)
    assert oor.features(2) == [("c", pytest.approx(-1.0))]
    old = dataclasses.replace(det, train_min=None, train_max=None)
    assert not old.out_of_range(x).any.any()


def test_changed_constants_rule() -> None:
    det = _detector(
        1, constants=(WatchedConstant("valve", 1.0, 1e-6), WatchedConstant("z", 0, 0.5))
    )
    v = np.array([[1.0, 0.4], [1.1, np.nan], [np.nan, -0.6]])
    assert det.changed_constants(v).tolist() == [[False, False], [True, False], [False, True]]
    with pytest.raises(DetectorError):
        _detector(1, constants=(WatchedConstant("a", 1.0, 0.0),))  # a model feature


def test_new_fields_round_trip_and_old_artifacts_load(tmp_path: Path) -> None:
    det = _detector(3, ewma_alpha=0.2, constants=(WatchedConstant("valve", 1.0, 1e-6),))
    path = Registry(tmp_path).save(det)
    back = load(path)
    assert (back.window, back.ewma_alpha, back.constants) == (3, 0.2, det.constants)
    assert back.train_min is not None and det.train_min is not None
    np.testing.assert_array_equal(back.train_min, det.train_min)
    x = np.random.default_rng(4).normal(5, 2, size=(9, D))
    np.testing.assert_array_equal(back.score_series(x).score, det.score_series(x).score)
    # An artifact written before these fields: detector.json without them still loads.
    old = Registry(tmp_path / "old").save(_detector(1))
    doc = json.loads((old / "detector.json").read_text())
    for key in ("window", "ewma_alpha", "train_min", "train_max", "constants"):
        doc.pop(key)
    text = json.dumps(doc, indent=2, sort_keys=True)
    (old / "detector.json").write_text(text)
    manifest = json.loads((old / "manifest.json").read_text())
    import hashlib

    manifest["files"]["detector.json"] = hashlib.sha256(text.encode()).hexdigest()
    (old / "manifest.json").write_text(json.dumps(manifest))
    legacy = load(old)
    assert (legacy.window, legacy.ewma_alpha, legacy.train_min, legacy.constants) == (
        1,
        None,
        None,
        (),
    )


def test_score_rows_per_device_windows_and_smoothing() -> None:
    det = _detector(3, ewma_alpha=0.3)
    rng = np.random.default_rng(5)
    x = rng.normal(5, 2, size=(12, D))
    devs = ["p", "q"] * 6
    rs = score_rows(det, x, devs)
    assert rs.scored.tolist() == [False] * 4 + [True] * 8
    p_rows = np.arange(0, 12, 2)
    raw = det.score_series(x[p_rows]).score
    np.testing.assert_allclose(rs.score[p_rows[2:]], raw)
    np.testing.assert_allclose(rs.decision[p_rows[2:]], ewma_series(raw, 0.3))
    assert (rs.anomalous == (rs.scored & (rs.decision > det.threshold.value))).all()


def test_windowed_numpy_forward_matches_keras() -> None:
    from trainer.config import ModelConfig
    from trainer.model import build_autoencoder, seed_everything

    seed_everything(5, deterministic=False)
    w = 6
    model = build_autoencoder(w * D, ModelConfig(hidden=(12, 6), code_size=3, window=w), "linear")
    net = DenseNetwork.from_keras(model)
    x = np.random.default_rng(6).normal(0, 2, size=(64, w, D)).astype(np.float32)
    flat = x.reshape(64, w * D)
    np.testing.assert_allclose(net.forward(flat), model.predict(flat, verbose=0), atol=1e-5)


@pytest.mark.parametrize("output", ["sigmoid", "linear"])
def test_per_step_layers_match_keras_and_round_trip(output: str) -> None:
    from trainer.config import ModelConfig
    from trainer.model import build_autoencoder, seed_everything

    seed_everything(8, deterministic=False)
    w, units = 5, 2
    hp = ModelConfig(hidden=(12, 6), code_size=3, window=w, activation="elu")
    model = build_autoencoder(w * D, hp, output, steps=w, step_units=units)
    for layer in model.layers:  # non-zero biases, so bias handling per step is tested
        if layer.get_weights():
            k, b = layer.get_weights()
            layer.set_weights([k, np.random.default_rng(3).normal(0, 0.5, b.shape)])
    net = DenseNetwork.from_keras(model)
    assert [lay.steps for lay in net.layers] == [w, 1, 1, 1, 1, 1, 1, w]
    assert net.layers[0].kernel.shape == (D, units)
    assert net.code_layer == 3 and (net.n_inputs, net.n_outputs) == (w * D, w * D)
    x = np.random.default_rng(7).normal(0, 2, size=(300, w * D)).astype(np.float32)
    np.testing.assert_allclose(net.forward(x), model.predict(x, verbose=0), atol=1e-5)
    arrays, meta = net.to_arrays()
    back = DenseNetwork.from_arrays(arrays, meta)
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
