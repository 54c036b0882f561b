"""Exponentially weighted moving average of scores, per device (``Detector.ewma_alpha``).

``s_t = alpha * score_t + (1 - alpha) * s_{t-1}``, with ``s`` = the first score for a
device without state. Pure: state in, state out. With smoothing on, the trainer fits the
threshold on the *smoothed* holdout scores, so the worker compares the smoothed score with
``Detector.threshold.value``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


def ewma_series(scores: npt.ArrayLike, alpha: float, start: float | None = None) -> F64:
    """The smoothed scores of one device's time-ordered ``scores``; ``start`` = prior state.

    A non-finite score is passed through unsmoothed and does not enter the state (it is
    unscorable, not a value to average).
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"ewma alpha must be in (0, 1], got {alpha}")
    s = np.asarray(scores, dtype=np.float64)
    out = np.empty_like(s)
    prev = start
    b = 1.0 - alpha
    for i, v in enumerate(s.tolist()):
        if not math.isfinite(v):
            out[i] = v
            continue
        prev = v if prev is None else alpha * v + b * prev
        out[i] = prev
    return out


def ewma_batch(
    state: Mapping[str, float], device_ids: Sequence[str], scores: npt.ArrayLike, alpha: float
) -> tuple[F64, dict[str, float]]:
    """Smooth a batch's scores per device (rows of one device in time order).

    Returns the smoothed scores (same order as ``scores``) and the new state: the last
    smoothed score of every device in ``state`` or the batch.
    """
    s = np.asarray(scores, dtype=np.float64)
    if len(s) != len(device_ids):
        raise ValueError(f"{len(s)} scores for {len(device_ids)} device ids")
    if not 0 < alpha <= 1:
        raise ValueError(f"ewma alpha must be in (0, 1], got {alpha}")
    new = dict(state)
    out = np.empty_like(s)
    b = 1.0 - alpha
    for i, (dev, v) in enumerate(zip(device_ids, s.tolist(), strict=True)):
        if not math.isfinite(v):
            out[i] = v
            continue
        prev = new.get(dev)
        cur = v if prev is None else alpha * v + b * prev
        new[dev] = cur
        out[i] = cur
    return out, new
