"""Per-device scoring memory for windowed models and score smoothing, with byte export.

A windowed model (``Detector.window = w > 1``) scores a reading together with the ``w - 1``
readings of its device before it; a smoothing model (``Detector.ewma_alpha``) compares an
exponentially weighted average of the device's scores with the threshold. Both need state per
device that must survive restarts and partition moves, so :class:`DeviceMemory` keeps it in
plain arrays and floats and turns one device's state into versioned bytes (``export``) that
the loop writes to the durable per-partition state store, and back (``load``) on assignment.

Per device: the last ``<= w - 1`` raw readings (float32, oldest first), the last smoothed
score, and the input position (topic, partition, offset) of the last reading folded in (so a
re-delivered reading after a restore is not folded twice). Per-point models without smoothing
use no memory at all.

Bytes: msgpack of ``[version, signature, rows, cols, float32 bytes, ewma, topic, partition,
offset]``. ``signature`` identifies the model shape (window, features, alpha): a state written
for another shape is refused on load (the device warms up again), never mis-read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

MEMORY_VERSION: Final = 1
# Store keys of device memories: a control character first (device ids cannot contain one),
# so they never collide with the incident tracker's keys (device ids, "\x00applied").
MEMORY_KEY_PREFIX: Final = "\x00m:"

F32 = npt.NDArray[np.float32]


class _State(msgspec.Struct, array_like=True):
    version: int
    signature: str
    rows: int
    cols: int
    history: bytes
    ewma: float | None
    topic: str
    partition: int
    offset: int


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_State).decode


def memory_signature(window: int, features: Sequence[str], ewma_alpha: float | None) -> str:
    """Identity of the state shape a model needs: states of another signature are dropped."""
    h = hashlib.sha256(f"{window}|{ewma_alpha!r}|".encode())
    h.update("\x1f".join(features).encode())
    return h.hexdigest()[:16]


class DeviceMemory:
    """Window histories and EWMA states per device. Not thread-safe (one per worker loop).

    The Scorer reads and updates it; the loop persists it (:meth:`take_dirty` +
    :meth:`export`) and restores it (:meth:`load_partition`). Devices are remembered with
    the input partition they were last seen on, so a revoked partition's devices can be
    dropped together.
    """

    def __init__(self) -> None:
        self.signature = ""
        self.window = 1
        self.history: dict[str, F32] = {}
        self.ewma: dict[str, float] = {}
        # (topic, partition, offset) of the last reading folded into each device's state.
        self.position: dict[str, tuple[str, int, int]] = {}
        # Devices restored from bytes whose replayed readings must be skipped (cleared once
        # the device's first batch after the restore is processed).
        self.guard: dict[str, tuple[str, int, int]] = {}
        self._dirty: dict[int, set[str]] = {}
        self.rejected = 0  # states refused on load (other signature or version, bad bytes)

    # ---- configuration

    def configure(self, window: int, features: Sequence[str], ewma_alpha: float | None) -> bool:
        """Adopt a model's shape; drop every state if it differs. True when states were dropped.

        Dropped devices are marked dirty, so :meth:`take_dirty` + :meth:`export` (None) write
        their tombstones.
        """
        sig = memory_signature(window, features, ewma_alpha)
        if sig == self.signature:
            return False
        had = bool(self.position)
        if had:
            self.drop(list(self.position))
        self.signature, self.window = sig, window
        return had

    # ---- queries

    def devices(self) -> list[str]:
        """Every device with state."""
        return list(self.position)

    def devices_of(self, partition: int) -> list[str]:
        """Devices last seen on input partition ``partition``."""
        return [d for d, pos in self.position.items() if pos[1] == partition]

    def __len__(self) -> int:
        return len(self.position)

    # ---- updates (called by the Scorer)

    def update(
        self,
        history: Mapping[str, F32] | None,
        ewma: Mapping[str, float] | None,
        positions: Mapping[str, tuple[str, int, int]],
    ) -> None:
        """Store new states for the devices of a batch and mark them dirty."""
        if history:
            self.history.update(history)
        if ewma:
            self.ewma.update(ewma)
        self.position.update(positions)
        dirty = self._dirty
        for dev, pos in positions.items():
            s = dirty.get(pos[1])
            if s is None:
                s = dirty[pos[1]] = set()
            s.add(dev)

    # ---- persistence

    def take_dirty(self) -> dict[int, set[str]]:
        """Partition → devices whose state changed (or was dropped) since the last call."""
        out, self._dirty = self._dirty, {}
        return out

    def export(self, device: str) -> bytes | None:
        """One device's state as bytes, or None if it has none (a store tombstone)."""
        pos = self.position.get(device)
        if pos is None:
            return None
        h = self.history.get(device)
        if h is None:
            rows, cols, raw = 0, 0, b""
        else:
            rows, cols = h.shape
            raw = np.ascontiguousarray(h, dtype="<f4").tobytes()
        return _encode(
            _State(
                MEMORY_VERSION,
                self.signature,
                rows,
                cols,
                raw,
                self.ewma.get(device),
                pos[0],
                pos[1],
                pos[2],
            )
        )

    def load(self, device: str, data: bytes) -> bool:
        """Restore one device from :meth:`export` bytes. False (and ``rejected`` += 1) when the
        bytes are undecodable, of another version, or of another model signature."""
        try:
            st = _decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.rejected += 1
            return False
        if (
            st.version != MEMORY_VERSION
            or st.signature != self.signature
            or st.rows * st.cols * 4 != len(st.history)
            or st.rows >= max(self.window, 1)
        ):
            self.rejected += 1
            return False
        if st.rows:
            self.history[device] = (
                np.frombuffer(st.history, dtype="<f4").astype(np.float32).reshape(st.rows, st.cols)
            )
        else:
            self.history.pop(device, None)
        if st.ewma is not None:
            self.ewma[device] = st.ewma
        else:
            self.ewma.pop(device, None)
        pos = (st.topic, st.partition, st.offset)
        self.position[device] = pos
        self.guard[device] = pos
        return True

    def load_partition(self, partition: int, items: Mapping[str, bytes]) -> int:
        """Restore every device of one partition (``items``: device → bytes); returns loaded."""
        del partition  # the position inside each state names it
        return sum(self.load(d, b) for d, b in items.items())

    def drop(self, devices: Iterable[str]) -> None:
        """Forget ``devices`` and mark them dirty (their export is None: a tombstone)."""
        for d in devices:
            pos = self.position.pop(d, None)
            self.history.pop(d, None)
            self.ewma.pop(d, None)
            self.guard.pop(d, None)
            if pos is not None:
                self._dirty.setdefault(pos[1], set()).add(d)

    def drop_partition(self, partition: int) -> None:
        """Forget a revoked partition's devices without tombstones (the next owner restores)."""
        for d in self.devices_of(partition):
            self.position.pop(d, None)
            self.history.pop(d, None)
            self.ewma.pop(d, None)
            self.guard.pop(d, None)
        self._dirty.pop(partition, None)


def gather(
    history: Mapping[str, F32], device_ids: Sequence[str], x: npt.ArrayLike, w: int
) -> tuple[F32, npt.NDArray[np.intp], dict[str, F32]]:
    """:func:`detector.windows.gather_windows` with whole-array steps (same results).

    The detector's version slides a window view per device, which costs ~6 µs per reading
    on a 200-device batch; this one builds every window with one fancy index: lay each
    device's history and batch rows end to end (one segment per device), take the
    positions of every window end that has ``w - 1`` predecessors inside its segment, and
    index. Python work is per device, not per reading.

    Returns ``(windows (m, w, d) float32, rows (m,) ascending, history)`` where ``history``
    holds the new last ``<= w - 1`` readings of every device *of the batch* only. One
    difference: an infinite value (a number beyond float32) is kept in the window of its own
    reading but is NaN (missing) as a predecessor and in the history.
    """
    with np.errstate(over="ignore"):  # beyond float32 -> inf, handled below
        a = np.asarray(x, dtype=np.float32)
    n = len(device_ids)
    if a.ndim != 2 or len(a) != n or w < 2:
        raise ValueError(f"expected {n} readings of shape (n, d) and a window >= 2")
    d = a.shape[1]
    keep = w - 1
    devs = list(dict.fromkeys(device_ids))  # first-seen order
    code = {dv: i for i, dv in enumerate(devs)}
    codes = np.fromiter(map(code.__getitem__, device_ids), np.intp, count=n)
    counts = np.bincount(codes, minlength=len(devs))
    prev: list[F32] = []
    hl = np.zeros(len(devs), dtype=np.intp)
    for i, dv in enumerate(devs):
        h = history.get(dv)
        if h is not None and len(h) and h.ndim == 2 and h.shape[1] == d:
            h = h[-keep:]
            prev.append(h)
            hl[i] = len(h)
    n_p = int(hl.sum())
    big = np.concatenate([*prev, a]) if prev else a  # history rows first, then the batch
    seg_len = hl + counts
    seg_start = np.cumsum(seg_len) - seg_len
    total = int(seg_len.sum())
    seq = np.empty(total, dtype=np.intp)  # segment position -> row of ``big``
    if n_p:
        hist_off = np.cumsum(hl) - hl
        local = np.arange(n_p) - np.repeat(hist_off, hl)
        seq[np.repeat(seg_start, hl) + local] = np.arange(n_p)
    order = np.argsort(codes, kind="stable")  # batch rows grouped by device, in time order
    c_sorted = codes[order]
    batch_off = np.cumsum(counts) - counts
    rank = np.arange(n) - np.repeat(batch_off, counts)
    seq[seg_start[c_sorted] + hl[c_sorted] + rank] = n_p + order
    local_all = np.arange(total) - np.repeat(seg_start, seg_len)
    ends = np.flatnonzero(local_all >= keep)
    rows = seq[ends] - n_p
    by_row = np.argsort(rows, kind="stable")
    ends, rows = ends[by_row], rows[by_row]
    windows = big[seq[ends[:, None] + np.arange(-keep, 1)]]
    poisoned = bool(np.isinf(a).any())
    if poisoned:
        # A value beyond float32 (e.g. 1e308) makes its own reading unscorable (a dead
        # letter), but must not make the next w - 1 readings of the device unscorable too:
        # as a predecessor it counts as missing (imputed), like a null.
        head = windows[:, :-1]
        head[np.isinf(head)] = np.nan
    # New history: the last <= keep entries of each segment (slices of one fresh array).
    tail = np.minimum(seg_len, keep)
    tail_start = seg_start + seg_len - tail
    tail_rows = seq[
        np.repeat(tail_start, tail)
        + (np.arange(int(tail.sum())) - np.repeat(np.cumsum(tail) - tail, tail))
    ]
    hist_all = big[tail_rows]
    if poisoned:
        hist_all[np.isinf(hist_all)] = np.nan
    new_hist: dict[str, F32] = {}
    lo = 0
    for dv, k in zip(devs, tail.tolist(), strict=True):
        new_hist[dv] = hist_all[lo : lo + k]
        lo += k
    return windows, rows.astype(np.intp), new_hist
