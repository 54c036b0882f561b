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
    """

    feature_names: tuple[str, ...]
    preprocessor: Preprocessor
    network: DenseNetwork
    threshold: Threshold
    feature_error_mean: npt.NDArray[np.float64]
    feature_error_std: npt.NDArray[np.float64]
    info: ModelInfo
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.feature_names)
        if len(set(self.feature_names)) != n:
            raise DetectorError("feature names must be unique")
        if not (
            self.preprocessor.n_features == n
            and self.network.n_inputs == n
            and self.network.n_outputs == n
            and self.feature_error_mean.shape == (n,)
            and self.feature_error_std.shape == (n,)
        ):
            raise DetectorError(
                f"detector parts disagree on the number of features ({n} names, "
                f"{self.preprocessor.n_features} scaler columns, {self.network.n_inputs} inputs, "
                f"{self.network.n_outputs} outputs); re-train"
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
        """
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
