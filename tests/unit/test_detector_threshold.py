"""Threshold fitting and the frozen preprocessing of the detector core."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from detector import Preprocessor, Threshold, ThresholdError, fit_threshold


def test_mean_k_std_uses_population_std() -> None:
    e = np.random.default_rng(0).gamma(2.0, 0.01, 1000)
    t = fit_threshold(e, "mean_k_std", 2.0)
    assert t.value == pytest.approx(e.mean() + 2 * e.std(ddof=0), rel=1e-12)
    assert (t.error_mean, t.error_std, t.n) == (
        pytest.approx(e.mean()),
        pytest.approx(e.std()),
        1000,
    )


def test_percentile_threshold() -> None:
    e = np.arange(1, 101, dtype=float)
    assert fit_threshold(e, "percentile", 99).value == pytest.approx(np.percentile(e, 99))


@pytest.mark.parametrize(
    ("errors", "method", "param", "match"),
    [
        ([0.1], "mean_k_std", 2.0, "at least 2"),
        ([0.1, np.nan], "mean_k_std", 2.0, "NaN"),
        ([0.1, 0.2], "mean_k_std", -1.0, "k must be"),
        ([0.1, 0.2], "percentile", 100.0, "percentile must be"),
        ([0.0, 0.0], "mean_k_std", 2.0, "threshold is 0"),
    ],
)
def test_bad_threshold_inputs_are_refused(
    errors: list[float], method: str, param: float, match: str
) -> None:
    with pytest.raises(ThresholdError, match=match):
        fit_threshold(errors, method, param)  # type: ignore[arg-type]


def test_threshold_dict_round_trip() -> None:
    t = fit_threshold([0.1, 0.2, 0.4], "mean_k_std", 3.0)
    assert Threshold.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("scaler", [MinMaxScaler(), StandardScaler()])
def test_frozen_preprocessing_equals_sklearn(scaler: object) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(5, 3, size=(300, 4))
    x[rng.random(x.shape) < 0.05] = np.nan
    imp = SimpleImputer(strategy="median").fit(x)
    sk = scaler.fit(imp.transform(x))  # type: ignore[attr-defined]
    pre = Preprocessor.from_sklearn(imp, sk)
    new = rng.normal(5, 3, size=(50, 4))
    new[3, 1] = np.nan
    expected = sk.transform(imp.transform(new))  # type: ignore[attr-defined]
    np.testing.assert_allclose(pre.transform(new), expected, rtol=1e-5, atol=1e-5)
    round_trip = Preprocessor.from_dict(pre.to_dict())
    assert np.array_equal(round_trip.transform(new), pre.transform(new))


def test_constant_feature_is_refused_not_divided_by_zero() -> None:
    x = np.column_stack([np.arange(10.0), np.full(10, 3.0)])
    imp = SimpleImputer().fit(x)
    with pytest.raises(ValueError, match="constant"):
        Preprocessor.from_sklearn(imp, StandardScaler().fit(x))
