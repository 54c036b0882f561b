"""Scoring a whole table of readings offline, exactly as the worker decides on a stream.

The worker scores a device's reading with its last ``window`` readings and smooths the
score per device (:mod:`detector.smoothing`); :func:`score_rows` does the same over rows of
many devices at once, for evaluation, the trainer's report and benchmarks. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from detector.core import Detector
from detector.smoothing import ewma_series
from detector.windows import sliding_windows


@dataclass(frozen=True, eq=False)
class RowScores:
    """Per-row results of :func:`score_rows` (n rows, d features).

    Attributes:
        scored: bool (n,): False for a device's first ``window - 1`` rows (no full window).
        score: float64 (n,): the raw score (window MSE); NaN where not scored.
        decision: float64 (n,): the score compared with the threshold: the per-device EWMA
            of ``score`` when the detector smooths, else ``score``; NaN where not scored.
        feature_error: float32 (n, d), NaN where not scored (see :meth:`Detector.score_windows`).
        reconstruction: float32 (n, d), the newest reading's reconstruction; NaN where not scored.
        anomalous: bool (n,): ``decision > threshold``, or non-finite (unscorable counts as
            flagged offline); False where not scored.
    """

    scored: npt.NDArray[np.bool_]
    score: npt.NDArray[np.float64]
    decision: npt.NDArray[np.float64]
    feature_error: npt.NDArray[np.float32]
    reconstruction: npt.NDArray[np.float32]
    anomalous: npt.NDArray[np.bool_]


def device_groups(n: int, device_ids: Sequence[str] | None) -> list[npt.NDArray[np.intp]]:
    """Row indices of each device, in first-seen order (one group of all rows without ids)."""
    if device_ids is None:
        return [np.arange(n, dtype=np.intp)]
    groups: dict[str, list[int]] = {}
    for i, dev in enumerate(device_ids):
        groups.setdefault(dev, []).append(i)
    return [np.asarray(g, dtype=np.intp) for g in groups.values()]


def score_rows(
    det: Detector, x: npt.ArrayLike, device_ids: Sequence[str] | None = None
) -> RowScores:
    """Score raw readings ``x`` (n, d), each device's rows taken in the given (time) order.

    ``device_ids`` None means one device. Each device starts with an empty window history
    and no smoothing state, as a worker meeting it for the first time.
    """
    raw = np.asarray(x, dtype=np.float64)
    n, d = raw.shape
    w = det.window
    scored = np.zeros(n, dtype=bool)
    score = np.full(n, np.nan)
    decision = np.full(n, np.nan)
    fe = np.full((n, d), np.nan, dtype=np.float32)
    recon = np.full((n, d), np.nan, dtype=np.float32)
    for rows in device_groups(n, device_ids):
        if len(rows) < w:
            continue
        s = det.score_windows(sliding_windows(raw[rows], w))
        at = rows[w - 1 :]
        scored[at] = True
        score[at] = s.score
        fe[at] = s.feature_error
        recon[at] = s.reconstruction
        decision[at] = s.score if det.ewma_alpha is None else ewma_series(s.score, det.ewma_alpha)
    anomalous = scored & ~(decision <= det.threshold.value)
    return RowScores(scored, score, decision, fe, recon, anomalous)
