"""Per-device windows of readings for windowed models (``Detector.window > 1``).

A windowed model scores a reading together with the ``w - 1`` readings of the same device
before it. The worker keeps, per device, the last ``w - 1`` raw readings (its *history*);
:func:`gather_windows` turns a batch plus that history into full windows and the new
history. Pure: arrays and mappings in, new arrays and mappings out; nothing is mutated.

A device's first ``w - 1`` readings (after its history starts empty: first sight, or a
model with another window or feature list) have no full window and are **not scored**;
they only fill the history.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class WindowBatch:
    """Windows built from one batch.

    Attributes:
        windows: float32 (m, w, d): ``windows[i, -1]`` is the reading scored, ``[i, 0]`` the
            oldest of its window; raw units, NaN where a value is missing.
        rows: intp (m,): the batch row each window ends at (ascending).
        history: the new history of every device in the old history or the batch: its last
            ``min(w - 1, readings seen)`` readings, float32 (k, d), oldest first.
    """

    windows: F32
    rows: npt.NDArray[np.intp]
    history: dict[str, F32]


def sliding_windows(x: npt.ArrayLike, w: int) -> F32:
    """All ``n - w + 1`` windows of one device's time-ordered readings ``x`` (n, d).

    Window ``i`` holds rows ``i .. i + w - 1`` and scores row ``i + w - 1``. A read-only view
    when ``x`` is already float32 (no copy).
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected (n, d) readings, got shape {a.shape}")
    if w < 1:
        raise ValueError(f"window must be >= 1, got {w}")
    if len(a) < w:
        return np.empty((0, w, a.shape[1]), dtype=np.float32)
    view = np.lib.stride_tricks.sliding_window_view(a, w, axis=0)  # (n-w+1, d, w)
    return view.transpose(0, 2, 1)


def gather_windows(
    history: Mapping[str, F32], device_ids: Sequence[str], x: npt.ArrayLike, w: int
) -> WindowBatch:
    """Full windows for the readings of a batch, and the history after it.

    Args:
        history: per device, its previous readings (k <= w - 1 rows, oldest first); devices
            absent start empty. Rows beyond ``w - 1`` are ignored (oldest dropped).
        device_ids: the device of each batch row.
        x: raw readings (n, d), float; each device's rows in time order.
        w: the model's window (``Detector.window``).

    Returns:
        A :class:`WindowBatch`; rows of devices with fewer than ``w`` readings in history +
        batch so far are not in ``rows`` (not scored).
    """
    a = np.asarray(x, dtype=np.float32)
    n = len(device_ids)
    if a.ndim != 2 or len(a) != n:
        raise ValueError(f"expected {n} readings of shape (n, d), got {a.shape}")
    d = a.shape[1]
    keep = w - 1
    new_hist: dict[str, F32] = dict(history)
    if w == 1:
        return WindowBatch(a[:, None, :].copy(), np.arange(n, dtype=np.intp), new_hist)
    rows_of: dict[str, list[int]] = {}
    for i, dev in enumerate(device_ids):
        rows_of.setdefault(dev, []).append(i)
    # One float gather at the end: per device only small index arrays are built, into
    # `pool` = the batch rows followed by every device's usable history rows.
    pool_parts: list[F32] = [a]
    offset = n
    win_idx: list[npt.NDArray[np.intp]] = []
    ends: list[npt.NDArray[np.intp]] = []
    tails: dict[str, npt.NDArray[np.intp]] = {}
    for dev, rows in rows_of.items():
        idx = np.asarray(rows, dtype=np.intp)
        prev = history.get(dev)
        k = 0
        if prev is not None and len(prev):
            p = np.asarray(prev, dtype=np.float32)
            if p.ndim == 2 and p.shape[1] == d:  # else another model's history: restart
                p = p[-keep:]
                k = len(p)
                pool_parts.append(p)
                idx = np.concatenate([np.arange(offset, offset + k, dtype=np.intp), idx])
                offset += k
        if len(idx) >= w:
            win_idx.append(np.lib.stride_tricks.sliding_window_view(idx, w))
            ends.append(idx[w - 1 :])
        tails[dev] = idx[-keep:]
    pool = np.concatenate(pool_parts) if len(pool_parts) > 1 else a
    new_hist.update({dev: pool[t] for dev, t in tails.items()})
    if not win_idx:
        return WindowBatch(np.empty((0, w, d), dtype=np.float32), np.empty(0, np.intp), new_hist)
    rows_arr = np.concatenate(ends)
    order = np.argsort(rows_arr, kind="stable")
    windows = pool[np.concatenate(win_idx)[order]]
    return WindowBatch(windows, rows_arr[order], new_hist)
