"""Turning the reconstruction errors of held-out normal data into an alarm threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from detector.errors import ThresholdError

ThresholdMethod = Literal["mean_k_std", "percentile"]


@dataclass(frozen=True)
class Threshold:
    """An alarm threshold on the per-reading reconstruction error (MSE in scaled units).

    Attributes:
        method: ``mean_k_std`` (value = mean + k·std) or ``percentile`` (value = q-th
            percentile).
        param: k for ``mean_k_std``, q in (0, 100) for ``percentile``.
        value: the threshold itself; a reading with score > value is anomalous.
        error_mean, error_std: statistics of the normal errors it was fitted on (population
            std, ``ddof=0``), kept so reports and events can say how unusual a score is.
        n: number of normal readings it was fitted on.
        exceed_rate: fraction of those readings above ``value``: the false-positive rate to
            expect on normal data like the holdout.
    """

    method: ThresholdMethod
    param: float
    value: float
    error_mean: float
    error_std: float
    n: int
    exceed_rate: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "param": self.param,
            "value": self.value,
            "error_mean": self.error_mean,
            "error_std": self.error_std,
            "n": self.n,
            "exceed_rate": self.exceed_rate,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Threshold:
        t = cls(
            method=d["method"],
            param=float(d["param"]),
            value=float(d["value"]),
            error_mean=float(d["error_mean"]),
            error_std=float(d["error_std"]),
            n=int(d["n"]),
            exceed_rate=float(d.get("exceed_rate", float("nan"))),
        )
        if not (math.isfinite(t.value) and t.value > 0):
            raise ThresholdError(f"stored threshold {t.value} is not a positive finite number")
        return t


def _checked(errors: npt.ArrayLike) -> npt.NDArray[np.float64]:
    e = np.asarray(errors, dtype=np.float64).ravel()
    if e.size < 2:
        raise ThresholdError(
            f"need at least 2 held-out normal errors to fit a threshold, got {e.size}; "
            "provide more training rows or a larger validation split"
        )
    if not np.all(np.isfinite(e)):
        raise ThresholdError("held-out errors contain NaN or infinity; check the training data")
    return e


def fit_threshold(
    errors: npt.ArrayLike, method: ThresholdMethod = "mean_k_std", param: float = 2.0
) -> Threshold:
    """Fit a threshold on reconstruction errors of *held-out* normal readings.

    Args:
        errors: per-reading MSE of normal readings the model did not fit on.
        method: ``mean_k_std`` or ``percentile``.
        param: k >= 0 (default 2) or a percentile in (0, 100).
    """
    e = _checked(errors)
    mean, std = float(e.mean()), float(e.std())
    if method == "mean_k_std":
        if not (math.isfinite(param) and 0 <= param <= 100):
            raise ThresholdError(f"k must be in [0, 100], got {param}; k = 2 is the default")
        value = mean + param * std
    elif method == "percentile":
        if not (0 < param < 100):
            raise ThresholdError(f"percentile must be in (0, 100), got {param}; try 99")
        value = float(np.percentile(e, param))
    else:
        raise ThresholdError(f"unknown threshold method {method!r}; use mean_k_std or percentile")
    if value <= 0:
        raise ThresholdError(
            "the fitted threshold is 0: the model reconstructs the held-out data perfectly, "
            "which means the features are constant or duplicated; check the feature list"
        )
    return Threshold(
        method=method,
        param=float(param),
        value=value,
        error_mean=mean,
        error_std=std,
        n=int(e.size),
        exceed_rate=float((e > value).mean()),
    )
