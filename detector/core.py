"""The fitted detector: preprocessing + autoencoder + threshold + feature order, as one object.

The trainer builds a :class:`Detector`; the worker and offline tools only load one (see
:mod:`detector.artifact`), so no one can pair a model with the wrong scaler or feature order.
Scoring is pure: arrays in, arrays out, no I/O. Higher score means more anomalous.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from detector.errors import DetectorError
from detector.network import DenseNetwork
from detector.preprocess import Preprocessor
from detector.threshold import Threshold


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a fitted model. ``version`` is assigned by the registry when saved."""

    name: str
    version: str = "unsaved"
    trained_at: str = ""  # RFC 3339, UTC
    training_fingerprint: str = ""  # sha256 of the training matrix


@dataclass(frozen=True, eq=False)
class Scores:
    """Scores of a batch of readings.

    Attributes:
        score: per-reading reconstruction MSE in scaled units, float64 (n,).
        feature_error: per-feature squared error in scaled units, float32 (n, features);
            ``score == feature_error.mean(axis=1)``.
        reconstruction: the autoencoder output in scaled units, float32 (n, features).
    """

    score: npt.NDArray[np.float64]
    feature_error: npt.NDArray[np.float32]
    reconstruction: npt.NDArray[np.float32]


@dataclass(frozen=True)
class Contribution:
    """One sensor's part in a reading's reconstruction error."""

    sensor: str
    share: float  # fraction of the reading's total squared error, 0..1
    value: float  # observed value, raw units
    expected: float  # the autoencoder's reconstruction, raw units
    error_z: float  # (error - normal mean error) / normal std of this sensor's error


@dataclass(frozen=True)
class WatchedConstant:
    """A sensor that was constant in training: not a model input, but watched.

    ``changed`` when ``|value_now - value| > tolerance`` (raw units). See
    :meth:`Detector.changed_constants` and docs/detection.md for the rule.
    """

    name: str
    value: float
    tolerance: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "tolerance": self.tolerance}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WatchedConstant:
        return cls(str(d["name"]), float(d["value"]), float(d["tolerance"]))


@dataclass(frozen=True, eq=False)
class OutOfRange:
    """Which features of each reading lie outside the training range, and how far.

    Attributes:
        excess: float64 (n, d), signed distance outside the training ``[min, max]`` in
            training ranges (``max - min``): ``+0.25`` is a quarter of the range above the
            max, ``-1.0`` one range below the min; 0 inside the range or for a missing value.
        any: bool (n,), True where some feature is outside.
        feature_names: column names of ``excess``.
    """

    excess: npt.NDArray[np.float64]
    any: npt.NDArray[np.bool_]
    feature_names: tuple[str, ...]

    def features(self, row: int) -> list[tuple[str, float]]:
        """``(feature, excess)`` of row ``row``'s out-of-range features, largest first."""
        e = self.excess[row]
        idx = np.flatnonzero(e != 0)
        idx = idx[np.argsort(-np.abs(e[idx]), kind="stable")]
        return [(self.feature_names[j], float(e[j])) for j in idx]


@dataclass(frozen=True, eq=False)
class Detector:
    """A fitted anomaly detector. Immutable; safe to share between threads.

    Attributes:
        feature_names: order of the model's inputs.
        preprocessor: frozen imputation + scaling.
        network: the autoencoder, as numpy weights.
        threshold: alarm threshold on :attr:`Scores.score`.
        feature_error_mean, feature_error_std: per-sensor squared-error statistics on held-out
            normal data (scaled units), for ranking contributions.
        info: name, version, training time.
        window: readings per model input: the network sees a device's last ``window``
            readings (flattened, oldest first); 1 = per-point (every artifact before it).
        ewma_alpha: per-device score smoothing (:mod:`detector.smoothing`) the threshold was
            fitted with; None = off.
        train_min, train_max: per-feature range of the training split (raw units), for
            :meth:`out_of_range`; None in artifacts older than it.
        constants: sensors dropped as constant in training and watched at scoring time.
    """

    feature_names: tuple[str, ...]
    preprocessor: Preprocessor
    network: DenseNetwork
    threshold: Threshold
    feature_error_mean: npt.NDArray[np.float64]
    feature_error_std: npt.NDArray[np.float64]
    info: ModelInfo
    extra: dict[str, Any] = field(default_factory=dict)
    window: int = 1
    ewma_alpha: float | None = None
    train_min: npt.NDArray[np.float64] | None = None
    train_max: npt.NDArray[np.float64] | None = None
    constants: tuple[WatchedConstant, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.feature_names)
        if len(set(self.feature_names)) != n:
            raise DetectorError("feature names must be unique")
        w = self.window
        if not (isinstance(w, int) and w >= 1):
            raise DetectorError(f"window must be an integer >= 1, got {w!r}; re-train")
        if not (
            self.preprocessor.n_features == n
            and self.network.n_inputs == n * w
            and self.network.n_outputs == n * w
            and self.feature_error_mean.shape == (n,)
            and self.feature_error_std.shape == (n,)
        ):
            raise DetectorError(
                f"detector parts disagree on the number of features ({n} names, "
                f"{self.preprocessor.n_features} scaler columns, {self.network.n_inputs} inputs, "
                f"{self.network.n_outputs} outputs, window {w}); re-train"
            )
        if self.ewma_alpha is not None and not (0 < self.ewma_alpha <= 1):
            raise DetectorError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha}; re-train")
        if (self.train_min is None) != (self.train_max is None) or (
            self.train_min is not None
            and self.train_max is not None
            and not (self.train_min.shape == (n,) and self.train_max.shape == (n,))
        ):
            raise DetectorError("training min/max must both be present with one value per feature")
        names = [c.name for c in self.constants]
        if len(set(names)) != len(names) or set(names) & set(self.feature_names):
            raise DetectorError("watched constants must be unique and not model features")
        if self.train_min is not None and self.train_max is not None:
            span = self.train_max - self.train_min
            # A zero span cannot happen for a fitted feature (constants are dropped); guard
            # anyway so the excess stays finite.
            object.__setattr__(self, "_range_safe", np.where(span > 0, span, 1.0))
        object.__setattr__(
            self, "_const_value", np.asarray([c.value for c in self.constants], dtype=np.float64)
        )
        object.__setattr__(
            self, "_const_tol", np.asarray([c.tolerance for c in self.constants], dtype=np.float64)
        )
        object.__setattr__(self, "_index", {f: i for i, f in enumerate(self.feature_names)})
        # Guard against a 0 std so error_z stays finite.
        object.__setattr__(self, "_err_std_safe", np.maximum(self.feature_error_std, 1e-12))

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def score(self, x: npt.ArrayLike) -> Scores:
        """Score raw readings ``x`` (n, features) in :attr:`feature_names` order.

        NaN inputs are imputed with the training fill values. A non-finite score (an
        infinite input, an overflow) stays non-finite: callers must treat it as unscorable,
        never as normal (``nan > threshold`` is False).

        Per-point models only: a windowed model (``window > 1``) needs each reading's
        predecessors; use :meth:`score_windows` (or :meth:`score_series` offline).
        """
        if self.window != 1:
            raise DetectorError(
                f"this model scores windows of {self.window} readings; call score_windows "
                "with each device's last readings (detector.windows.gather_windows)"
            )
        raw = np.asarray(x, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != self.n_features:
            raise DetectorError(
                f"expected an array of shape (n, {self.n_features}), got {raw.shape}"
            )
        # Overflow to inf/NaN is expected for absurd inputs and reported through the
        # non-finite score, so numpy's warnings would only be noise in the worker's log.
        with np.errstate(over="ignore", invalid="ignore"):
            z = self.preprocessor.transform(raw)
            recon = self.network.forward(z)
            diff = z - recon
            fe = np.square(diff, out=diff)
            score = fe.mean(axis=1, dtype=np.float64)
        return Scores(score=score, feature_error=fe, reconstruction=recon)

    def score_windows(self, windows: npt.ArrayLike) -> Scores:
        """Score windows of raw readings, float (m, window, features), oldest reading first.

        Each window scores its newest reading ``windows[i, -1]``. The network reconstructs the
        whole (flattened) window; the returned :class:`Scores` are per window:

        - ``score``: MSE over every value of the window (scaled units), float64 (m,);
        - ``feature_error``: each sensor's squared error averaged over the window's readings,
          float32 (m, features), so ``score == feature_error.mean(axis=1)`` as for points;
        - ``reconstruction``: the reconstruction of the newest reading, float32 (m, features).

        With ``window == 1``, ``score_windows(x[:, None, :])`` equals ``score(x)``. NaN values
        are imputed; non-finite scores as in :meth:`score`.
        """
        raw = np.asarray(windows, dtype=np.float32)
        w, d = self.window, self.n_features
        if raw.ndim != 3 or raw.shape[1:] != (w, d):
            raise DetectorError(f"expected windows of shape (m, {w}, {d}), got {raw.shape}")
        m = raw.shape[0]
        with np.errstate(over="ignore", invalid="ignore"):
            z = self.preprocessor.transform(raw.reshape(m * w, d)).reshape(m, w * d)
            recon = self.network.forward(z)
            diff = z - recon
            sq = np.square(diff, out=diff).reshape(m, w, d)
            fe = sq.mean(axis=1, dtype=np.float32) if w > 1 else sq[:, 0, :]
            score = fe.mean(axis=1, dtype=np.float64)
        last = np.ascontiguousarray(recon.reshape(m, w, d)[:, -1, :])
        return Scores(score=score, feature_error=fe, reconstruction=last)

    def score_series(self, x: npt.ArrayLike) -> Scores:
        """Score one device's time-ordered readings ``x`` (n, features), offline.

        Rows ``0 .. window - 2`` have no full window and are not scored: the result holds
        ``n - window + 1`` rows, row ``i`` scoring reading ``i + window - 1``. Per-point
        models score every row (the same as :meth:`score`).
        """
        from detector.windows import sliding_windows

        raw = np.asarray(x, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != self.n_features:
            raise DetectorError(
                f"expected an array of shape (n, {self.n_features}), got {raw.shape}"
            )
        if self.window == 1:
            return self.score(raw)
        return self.score_windows(sliding_windows(raw, self.window))

    def out_of_range(self, x: npt.ArrayLike) -> OutOfRange:
        """Per reading, the features outside the training ``[min, max]`` (see :class:`OutOfRange`).

        ``x``: raw readings (n, features); NaN (missing) counts as inside. Artifacts without
        stored ranges report nothing out of range.
        """
        raw = np.asarray(x, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != self.n_features:
            raise DetectorError(
                f"expected an array of shape (n, {self.n_features}), got {raw.shape}"
            )
        if self.train_min is None or self.train_max is None:
            excess = np.zeros(raw.shape)
        else:
            rng = self._range_safe  # type: ignore[attr-defined]
            with np.errstate(invalid="ignore", over="ignore"):
                above = np.where(raw > self.train_max, (raw - self.train_max) / rng, 0.0)
                below = np.where(raw < self.train_min, (raw - self.train_min) / rng, 0.0)
            excess = above + below
        return OutOfRange(
            excess=excess, any=np.any(excess != 0, axis=1), feature_names=self.feature_names
        )

    def changed_constants(self, values: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which watched constants moved: bool (n, len(constants)).

        ``values``: raw readings of the :attr:`constants` sensors (n, len(constants)), in
        that order; NaN (sensor absent from the reading) is not a change. A change is
        ``|value - training value| > tolerance``. Rule (docs/detection.md): a reading with a
        changed constant is anomalous whatever its score.
        """
        v = np.asarray(values, dtype=np.float64)
        c = len(self.constants)
        if v.ndim != 2 or v.shape[1] != c:
            raise DetectorError(f"expected an array of shape (n, {c}), got {v.shape}")
        with np.errstate(invalid="ignore"):
            return np.asarray(np.abs(v - self._const_value) > self._const_tol)  # type: ignore[attr-defined]

    def is_anomaly(self, score: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        """True where ``score`` exceeds the threshold (NaN gives False: check finiteness first)."""
        return np.asarray(score > self.threshold.value)

    def contributions(
        self, x_row: npt.ArrayLike, scores: Scores, row: int, top: int = 5, min_share: float = 0.0
    ) -> list[Contribution]:
        """The sensors that contribute most to row ``row``'s error, largest first.

        Args:
            x_row: that reading's raw values (features,), NaN where imputed.
            scores: the batch's :class:`Scores`.
            row: index of the reading within the batch.
            top: at most this many sensors.
            min_share: omit sensors with a smaller share of the error.
        """
        fe = scores.feature_error[row].astype(np.float64)
        total = float(fe.sum())
        if not np.isfinite(total) or total <= 0:
            return []
        order = np.argsort(-fe)[:top]
        expected = self.preprocessor.inverse_transform(scores.reconstruction[row])
        raw = np.asarray(x_row, dtype=np.float64)
        z = (fe - self.feature_error_mean) / self._err_std_safe  # type: ignore[attr-defined]
        out = []
        for j in order:
            share = float(fe[j] / total)
            if share < min_share:
                break
            out.append(
                Contribution(
                    sensor=self.feature_names[j],
                    share=share,
                    value=float(raw[j]),
                    expected=float(expected[j]),
                    error_z=float(z[j]),
                )
            )
        return out

    def contributions_many(
        self,
        x: npt.ArrayLike,
        scores: Scores,
        rows: Sequence[int],
        top: int = 5,
        min_share: float = 0.0,
    ) -> list[list[Contribution]]:
        """:meth:`contributions` of several rows of one batch, with whole-array steps.

        Args:
            x: the batch's raw values (n, features), NaN where imputed.
            scores: the batch's :class:`Scores`.
            rows: indices of the readings within the batch.

        Returns one list per entry of ``rows``, equal to ``contributions(x[r], scores, r, top,
        min_share)``.
        """
        if len(rows) == 0:
            return []
        idx = np.asarray(rows, dtype=np.intp)
        fe = scores.feature_error[idx].astype(np.float64)
        totals = fe.sum(axis=1).tolist()
        order = np.argsort(-fe, axis=1)[:, :top].tolist()
        expected = self.preprocessor.inverse_transform(scores.reconstruction[idx]).tolist()
        raw = np.asarray(x, dtype=np.float64)[idx].tolist()
        z = ((fe - self.feature_error_mean) / self._err_std_safe).tolist()  # type: ignore[attr-defined]
        fel = fe.tolist()
        names = self.feature_names
        out: list[list[Contribution]] = []
        for i, total in enumerate(totals):
            found: list[Contribution] = []
            out.append(found)
            if not math.isfinite(total) or total <= 0:
                continue
            for j in order[i]:
                share = fel[i][j] / total
                if share < min_share:
                    break
                found.append(Contribution(names[j], share, raw[i][j], expected[i][j], z[i][j]))
        return out

    def column_index(self, name: str) -> int:
        """Position of feature ``name``; KeyError if the model has no such feature."""
        return int(self._index[name])  # type: ignore[attr-defined]
