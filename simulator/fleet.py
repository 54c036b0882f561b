"""Synthetic pump fleet: normal sensor behaviour, injected anomalies and their ground truth.

Everything here is a pure function of its arguments: the same ``FleetSpec`` (including its
``seed``) gives the same readings, byte for byte, on every machine and every run.

Normal behaviour
----------------
Each device is a pump whose operating state is four latent processes ``z`` (load, thermal,
supply, process). Each latent is a slow sinusoid (fixed period, per-device phase) plus an
AR(1) process, scaled to unit variance. Sensor ``s`` of device ``d`` reads, in *standardised
units* ``u``::

    u[s] = W[s] . z  +  o[d, s]  +  e[s]          x[s] = mean[s] + std[s] * u[s]

* ``W`` is a seeded loading matrix with group structure: sensor ``s`` loads mainly on latent
  ``s % 4`` (some with negative sign) plus small cross-loadings, so every latent is observed by
  at least three sensors (hence ``sensors >= 12``) and same-group sensors move together.
* ``o`` is a fixed per-device offset, N(0, 0.1²): a pump is recognisably itself but well
  inside the fleet's normal variation.
* ``e`` is independent sensor noise with std 0.08–0.20.

Rows of ``W`` are scaled so that ``Var(u[s]) == 1``: ``std[s]`` *is* the sensor's marginal
standard deviation in normal operation, and all anomaly magnitudes below are in that unit
(written σ). Values are finally floored at 0 (every quantity is non-negative; only an
anomaly at magnitude > 1 can get there) and rounded to each quantity's instrument
resolution, so a ``Reading`` and its decoded JSON payload hold the same floats.

Anomalies and detectability
---------------------------
A reading can only be flagged by a model of the normal structure if it departs from it *in a
direction that structure cannot explain*. We control exactly that: for a displacement ``δ``
of the standardised reading, ``unexplained(δ) = |(I - P) δ|``, where ``P`` projects onto the
span of ``W`` (the normal manifold). At ``magnitude = 1`` every injected displacement has
``unexplained(δ) >= 5σ``, or ``>= 4σ`` for ``correlated_fault``, which must stay inside each
sensor's normal range. For scale: a normal reading's own unexplained part, from sensor noise
and device offsets, is ≈ 0.5–0.8σ (growing with the sensor count), and it adds to ``δ``'s in
the measured reading (``unexplained_deviation``). ``magnitude`` scales every displacement
linearly, so a sweep over it traces a detector's sensitivity curve.

================  =========================================================================
spike             one reading; one or two sensors jump (up, or either way for quantities far
                  from zero); unexplained 6–9σ.
drift             one or two sensors ramp away (same directions): 5–6σ at the first
                  reading, doubling over the first third of the segment. The segment is the
                  part of a drift that is already detectable: labelling the sub-threshold
                  start of a real drift would make the ground truth unfair to any detector.
stuck             one sensor repeats a single value (no noise) while the others keep moving.
                  The value sits on the side of the sensor's trajectory nearer its mean
                  (above it when below would approach zero), far enough that every reading is
                  5–6σ unexplained: freezing at the last good value is invisible to a
                  per-reading detector until the process moves.
noise_burst       ``max(3, sensors // 4)`` sensors get large Gaussian noise (≈ 7σ
                  unexplained), each reading's draw scaled up to at least 5σ.
correlated_fault  a co-moving sensor group splits: half reads as if the group's latent
                  were at its crest (≈ 95th percentile), half as if at its trough. Each
                  sensor shows a value it shows in normal operation, so marginals stay
                  normal; only their relationship breaks. Further groups split until
                  every reading is ≥ 4σ unexplained.
================  =========================================================================

Segments never overlap, keep at least two normal readings between them on one device, and
are spread evenly over devices and time.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "ANOMALY_KINDS",
    "FleetSpec",
    "Reading",
    "SensorProfile",
    "device_ids",
    "feature_names",
    "load_truth",
    "normal_matrix",
    "sensor_profiles",
    "stream",
    "unexplained_deviation",
    "write_normal_csv",
    "write_truth",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

ANOMALY_KINDS: tuple[str, ...] = ("spike", "drift", "stuck", "noise_burst", "correlated_fault")

MIN_SENSORS: Final = 12
MAX_SENSORS: Final = 100  # feature names carry two digits
MAX_DEVICES: Final = 1000  # device ids carry three digits
MAX_ANOMALY_FRACTION: Final = 0.3

_OFFSET_STD: Final = 0.1
# Normal readings on each side of a segment: a detector that smooths over a couple of
# readings still sees clean boundaries, and truth segments never touch.
_GUARD: Final = 1
_CORRELATED_MIN: Final = 4.0  # σ unexplained for correlated_fault at magnitude 1
# Mean/std a quantity needs before anomalies may push it down: the largest single-sensor
# displacement at magnitude 1 is ≈ 17σ.
_FALL_HEADROOM: Final = 20.0
# Readings per anomaly-plan window (and per generation chunk). Bounds memory for big fleets
# and keeps an unbounded stream's anomaly rate steady.
_WINDOW_READINGS: Final = 65_536
# Normal noise is drawn per block of timesteps so the normal signal at a timestep does not
# depend on how the stream is chunked or how long it is.
_NOISE_BLOCK: Final = 256
# Length of one training-history window (readings of one device).
_HISTORY_WINDOW: Final = 64
_HISTORY_SPAN_MS: Final = 30 * 24 * 3600 * 1000

# Independent random streams, one per purpose, so e.g. changing the anomaly fraction never
# changes a single normal reading.
(
    _RNG_FLEET,
    _RNG_DEVICE,
    _RNG_AR_INIT,
    _RNG_AR,
    _RNG_NOISE,
    _RNG_PLAN,
    _RNG_INJECT,
    _RNG_HISTORY,
) = range(8)


@dataclass(frozen=True)
class _Latent:
    name: str
    period_s: float
    tau_s: float  # AR(1) correlation time
    sine_share: float  # fraction of the unit variance carried by the sinusoid


_LATENTS: Final = (
    _Latent("load", period_s=900.0, tau_s=120.0, sine_share=0.6),
    _Latent("thermal", period_s=3600.0, tau_s=600.0, sine_share=0.7),
    _Latent("supply", period_s=420.0, tau_s=40.0, sine_share=0.5),
    _Latent("process", period_s=150.0, tau_s=15.0, sine_share=0.4),
)
_K: Final = len(_LATENTS)


@dataclass(frozen=True)
class _Quantity:
    quantity: str
    unit: str
    mean: float
    std: float
    decimals: int  # instrument resolution; well below the sensor noise


# Typical pump-station magnitudes; per-sensor means and stds are jittered ±10 % / ±20 %.
_QUANTITIES: Final = (
    _Quantity("discharge_pressure", "bar", 6.2, 0.55, 3),
    _Quantity("bearing_temperature", "degC", 58.0, 4.5, 2),
    _Quantity("motor_current", "A", 41.0, 3.8, 2),
    _Quantity("vibration_velocity", "mm/s", 2.4, 0.22, 3),
    _Quantity("flow", "m3/h", 118.0, 11.0, 1),
    _Quantity("power_factor", "1", 0.86, 0.012, 4),
    _Quantity("shaft_speed", "rpm", 1480.0, 12.0, 1),
    _Quantity("valve_position", "1", 0.55, 0.05, 4),
)


@dataclass(frozen=True)
class FleetSpec:
    """Identity of a simulated fleet; every generated value is a pure function of it.

    Attributes:
        devices: number of pumps, ids ``pump-000`` … (1–1000).
        sensors: sensors per pump, ``sensor_00`` … (12–100). Twelve is the minimum for every
            latent process to be observed by at least three sensors.
        seed: selects loadings, sensor profiles, device offsets and phases, noise and the
            anomaly schedule.
        period_ms: time between two readings of one device, milliseconds (> 0).
        start_ms: timestamp of every device's first streamed reading, epoch milliseconds.
    """

    devices: int = 8
    sensors: int = 16
    seed: int = 0
    period_ms: int = 1000
    start_ms: int = 1_764_201_600_000

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= MAX_DEVICES:
            raise ValueError(
                f"devices={self.devices} is out of range: use 1..{MAX_DEVICES} "
                "(ids are pump-000..pump-999)"
            )
        if not MIN_SENSORS <= self.sensors <= MAX_SENSORS:
            raise ValueError(
                f"sensors={self.sensors} is out of range: use {MIN_SENSORS}..{MAX_SENSORS} "
                f"(the {_K} latent processes each need >= 3 sensors to be learnable)"
            )
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} is negative: use a seed >= 0")
        if self.period_ms <= 0:
            raise ValueError(f"period_ms={self.period_ms} must be > 0 (e.g. 1000 for 1 Hz)")
        if self.start_ms < 0:
            raise ValueError(f"start_ms={self.start_ms} must be >= 0 (epoch milliseconds)")


def feature_names(spec: FleetSpec) -> list[str]:
    """``["sensor_00", …]``: the payload's value keys, in column order of every matrix here."""
    return [f"sensor_{i:02d}" for i in range(spec.sensors)]


def device_ids(spec: FleetSpec) -> list[str]:
    """``["pump-000", …]``: the Kafka keys, in the order devices appear within a timestep."""
    return [f"pump-{i:03d}" for i in range(spec.devices)]


@dataclass(frozen=True)
class SensorProfile:
    """What a sensor column measures; ``mean``/``std`` are its normal marginal moments."""

    name: str
    quantity: str
    unit: str
    mean: float
    std: float
    decimals: int


def sensor_profiles(spec: FleetSpec) -> list[SensorProfile]:
    """Physical meaning of each feature (same for every device), in feature order."""
    m = _model(spec)
    return [
        SensorProfile(
            name=name,
            quantity=_QUANTITIES[i % len(_QUANTITIES)].quantity,
            unit=_QUANTITIES[i % len(_QUANTITIES)].unit,
            mean=float(m.mean[i]),
            std=float(m.std[i]),
            decimals=int(m.decimals[i]),
        )
        for i, name in enumerate(feature_names(spec))
    ]


_ENCODER: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading of one device.

    Attributes:
        device_id: ``pump-NNN``.
        timestamp_ms: event time, epoch milliseconds.
        values: sensor name → value in physical units, in ``feature_names`` order.
        anomaly: the injected kind, or ``None`` for a normal reading. Ground truth only: it is
            never part of the payload.
    """

    device_id: str
    timestamp_ms: int
    values: dict[str, float]
    anomaly: str | None

    def key(self) -> bytes:
        """Kafka key: the device id, UTF-8 (keeps a device's readings on one partition)."""
        return self.device_id.encode()

    def to_json(self) -> bytes:
        """Kafka value: compact JSON ``{"device_id", "timestamp", "values"}`` (no anomaly)."""
        return _ENCODER.encode(
            {"device_id": self.device_id, "timestamp": self.timestamp_ms, "values": self.values}
        )

    def truth_json(self) -> bytes:
        """Ground-truth record ``{"device_id", "timestamp_ms", "kind"}`` of an anomalous reading.

        Raises:
            ValueError: the reading is normal.
        """
        if self.anomaly is None:
            raise ValueError(f"{self.device_id}@{self.timestamp_ms} is a normal reading")
        return _ENCODER.encode(
            {"device_id": self.device_id, "timestamp_ms": self.timestamp_ms, "kind": self.anomaly}
        )


# --------------------------------------------------------------------------- the fleet model


def _rng(spec_seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(spec_seed, spawn_key=key))


@dataclass(frozen=True, eq=False)
class _Model:
    loadings: FloatArray  # (S, K), standardised units
    noise_std: FloatArray  # (S,)
    mean: FloatArray  # (S,) physical units
    std: FloatArray  # (S,)
    decimals: IntArray  # (S,)
    group: IntArray  # (S,) latent each sensor mainly follows
    polarity: FloatArray  # (S,) sign of that main loading
    residual: FloatArray  # (S, S) I - P, P = projector onto span(loadings)
    offsets: FloatArray  # (D, S)
    phases: FloatArray  # (D, K) radians
    period_ms: IntArray  # (K,)
    phi: FloatArray  # (K,) AR(1) coefficient per reading
    sine_amp: FloatArray  # (K,)
    ar_amp: FloatArray  # (K,)


@functools.lru_cache(maxsize=16)
def _model(spec: FleetSpec) -> _Model:
    s_count = spec.sensors
    rng = _rng(spec.seed, _RNG_FLEET)
    group = np.arange(s_count, dtype=np.int64) % _K
    polarity = np.where(rng.random(s_count) < 0.25, -1.0, 1.0)
    loadings = rng.normal(0.0, 0.25, (s_count, _K))
    loadings[np.arange(s_count), group] = rng.uniform(0.8, 1.0, s_count) * polarity
    noise_std = rng.uniform(0.08, 0.20, s_count)
    signal_var = 1.0 - noise_std**2 - _OFFSET_STD**2
    loadings *= np.sqrt(signal_var / (loadings**2).sum(axis=1))[:, None]

    q = [_QUANTITIES[i % len(_QUANTITIES)] for i in range(s_count)]
    mean = np.array([x.mean for x in q]) * rng.uniform(0.9, 1.1, s_count)
    std = np.array([x.std for x in q]) * rng.uniform(0.8, 1.2, s_count)
    decimals = np.array([x.decimals for x in q], dtype=np.int64)

    basis, _ = np.linalg.qr(loadings)
    residual = np.eye(s_count) - basis @ basis.T

    # Per-device draws come from per-device streams: pump-003 is the same pump in a fleet of
    # 4 and in a fleet of 400.
    offsets = np.empty((spec.devices, s_count))
    phases = np.empty((spec.devices, _K))
    for d in range(spec.devices):
        drng = _rng(spec.seed, _RNG_DEVICE, d)
        offsets[d] = drng.normal(0.0, _OFFSET_STD, s_count)
        phases[d] = drng.uniform(0.0, 2.0 * math.pi, _K)

    period_ms = np.array([round(lat.period_s * 1000) for lat in _LATENTS], dtype=np.int64)
    phi = np.array([math.exp(-spec.period_ms / (lat.tau_s * 1000)) for lat in _LATENTS])
    sine_amp = np.sqrt(2.0 * np.array([lat.sine_share for lat in _LATENTS]))
    ar_amp = np.sqrt(1.0 - np.array([lat.sine_share for lat in _LATENTS]))
    return _Model(
        loadings=loadings,
        noise_std=noise_std,
        mean=mean,
        std=std,
        decimals=decimals,
        group=group,
        polarity=polarity,
        residual=residual,
        offsets=offsets,
        phases=phases,
        period_ms=period_ms,
        phi=phi,
        sine_amp=sine_amp,
        ar_amp=ar_amp,
    )


def unexplained_deviation(spec: FleetSpec, values: npt.ArrayLike) -> FloatArray:
    """Norm of the part of standardised readings the fleet's correlation structure cannot explain.

    ``values`` has shape ``(..., sensors)`` in physical units; it is standardised with the
    sensors' normal mean and std, then projected onto the complement of the latent span.
    Normal readings give ≈ 0.5–0.8 (noise and device offsets); readings injected at
    magnitude 1 give ≳ 4. The yardstick for tests, and for judging a detector against the
    best linear one.
    """
    m = _model(spec)
    u = (np.asarray(values, dtype=np.float64) - m.mean) / m.std
    return np.asarray(np.linalg.norm(u @ m.residual, axis=-1), dtype=np.float64)


def _sines(m: _Model, t_ms: IntArray, devices: IntArray) -> FloatArray:
    """Sinusoid part of the latents at absolute times: (len(t_ms), len(devices), K)."""
    # Integer modulo first: 2π·t/P on raw epoch milliseconds would lose phase precision.
    frac = (t_ms[:, None] % m.period_ms[None, :]) / m.period_ms[None, :]
    angle = 2.0 * math.pi * frac[:, None, :] + m.phases[devices][None, :, :]
    return np.asarray(m.sine_amp * np.sin(angle), dtype=np.float64)


def _ar(m: _Model, state: FloatArray, innovations: FloatArray) -> FloatArray:
    """Unit-variance AR(1) paths continuing from ``state``; ``innovations`` is (T, ..., K)."""
    out = np.empty_like(innovations)
    gain = np.sqrt(1.0 - m.phi**2)
    for t in range(innovations.shape[0]):
        state = m.phi * state + gain * innovations[t]
        out[t] = state
    return out


def _to_physical(m: _Model, u: FloatArray) -> FloatArray:
    # Every quantity is non-negative; means sit >= 8σ above zero, so only a large downward
    # anomaly can reach the floor, where it reads 0 like a transmitter at its range limit.
    x = np.maximum(m.mean + m.std * u, 0.0)
    scale = 10.0 ** m.decimals.astype(np.float64)
    # round(x·10^k)/10^k is the double nearest the decimal, so JSON carries no 61.269999….
    return np.asarray(np.round(x * scale) / scale, dtype=np.float64)


# ------------------------------------------------------------------------- training history


def _history(spec: FleetSpec, rows: int, seed: int | None) -> tuple[IntArray, IntArray, FloatArray]:
    """Normal readings from the 30 days before ``start_ms``: (timestamps, device index, values).

    Rows come from many short windows at random, non-overlapping times per device, so they
    sample the stationary distribution (every phase of every cycle) instead of one stretch.
    Sorted by (timestamp, device).
    """
    if rows < 0:
        raise ValueError(f"rows={rows} must be >= 0")
    m = _model(spec)
    rng = (
        _rng(spec.seed, _RNG_HISTORY)
        if seed is None
        else np.random.default_rng(
            np.random.SeedSequence([spec.seed, seed], spawn_key=(_RNG_HISTORY,))
        )
    )
    per_device = [rows // spec.devices + (d < rows % spec.devices) for d in range(spec.devices)]
    win_ms = _HISTORY_WINDOW * spec.period_ms
    n_windows = [-(-n // _HISTORY_WINDOW) for n in per_device]
    slots = max(_HISTORY_SPAN_MS // win_ms, 2 * max(n_windows, default=0))
    first_ms = spec.start_ms - slots * win_ms

    stamps: list[IntArray] = []
    devs: list[IntArray] = []
    values: list[FloatArray] = []
    steps = np.arange(_HISTORY_WINDOW, dtype=np.int64)
    for d, (n, w) in enumerate(zip(per_device, n_windows, strict=True)):
        if n == 0:
            continue
        starts = np.sort(rng.choice(slots, size=w, replace=False)).astype(np.int64)
        t_ms = (first_ms + starts[:, None] * win_ms + steps[None, :] * spec.period_ms).ravel()
        # Windows are independent stretches, so each AR path starts from the stationary law.
        ar = _ar(m, rng.standard_normal((w, _K)), rng.standard_normal((_HISTORY_WINDOW, w, _K)))
        ar_rows = ar.transpose(1, 0, 2).reshape(-1, _K)  # window-major, like t_ms
        z = _sines(m, t_ms, np.array([d]))[:, 0, :] + m.ar_amp * ar_rows
        noise = rng.standard_normal((t_ms.size, spec.sensors)) * m.noise_std
        u = z @ m.loadings.T + m.offsets[d] + noise
        stamps.append(t_ms[:n])
        devs.append(np.full(n, d, dtype=np.int64))
        values.append(_to_physical(m, u[:n]))
    if not stamps:
        return (
            np.empty(0, dtype=np.int64),
            np.empty(0, dtype=np.int64),
            np.empty((0, spec.sensors)),
        )
    t_all, d_all, v_all = np.concatenate(stamps), np.concatenate(devs), np.concatenate(values)
    order = np.lexsort((d_all, t_all))
    return t_all[order], d_all[order], v_all[order]


def normal_matrix(spec: FleetSpec, rows: int, seed: int | None = None) -> FloatArray:
    """Normal readings pooled across the fleet, for training: float64 ``(rows, sensors)``.

    Rows are drawn from the devices' history before ``spec.start_ms`` (device ``i`` gets
    ``rows // devices`` rows, the first ``rows % devices`` devices one more), in short
    windows at random times, ordered by (timestamp, device). Physical units, feature order.

    Args:
        seed: selects the *sample*; the fleet itself (loadings, offsets, phases) is always
            ``spec.seed``'s. ``None`` derives it from ``spec.seed``. Never overlaps the
            random streams behind ``stream``, so training and test data are independent.
    """
    return _history(spec, rows, seed)[2]


def write_normal_csv(path: Path, spec: FleetSpec, rows: int, seed: int | None = None) -> None:
    """Write ``normal_matrix(spec, rows, seed)`` as CSV with its timestamps and device ids.

    Header ``timestamp,device_id,sensor_00,…``; timestamp in epoch milliseconds; values in
    shortest round-trip form.
    """
    t_ms, dev, values = _history(spec, rows, seed)
    ids = device_ids(spec)
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(["timestamp", "device_id", *feature_names(spec)]) + "\n")
        for t, d, row in zip(t_ms.tolist(), dev.tolist(), values.tolist(), strict=True):
            fh.write(f"{t},{ids[d]}," + ",".join(map(repr, row)) + "\n")


# ----------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class _Segment:
    device: int
    start: int  # timestep within the window
    length: int
    kind: str


def _segment_length(kind: str, segment_length: int) -> int:
    return 1 if kind == "spike" else segment_length


def _budget(
    rng: np.random.Generator, target: float, kinds: Sequence[str], segment_length: int
) -> list[str]:
    """Kinds of the segments whose total length is nearest ``target`` readings."""
    chosen: list[str] = []
    total = 0
    while True:
        # Whole shuffled cycles keep the kinds balanced, and all present once the budget allows.
        for i in rng.permutation(len(kinds)).tolist():
            length = _segment_length(kinds[i], segment_length)
            if total + length / 2 >= target:  # adding it would move us away from the target
                return chosen
            chosen.append(kinds[i])
            total += length


def _plan(
    rng: np.random.Generator,
    steps: int,
    devices: int,
    fraction: float,
    kinds: Sequence[str],
    segment_length: int,
) -> list[_Segment]:
    """Non-overlapping segments covering ≈ ``fraction`` of ``steps × devices`` readings."""
    chosen = _budget(rng, fraction * steps * devices, kinds, segment_length)

    # Greedy least-loaded assignment (device order shuffled to break ties fairly); a segment
    # that fits nowhere is dropped rather than overlapping another.
    load = np.zeros(devices, dtype=np.int64)
    order = rng.permutation(devices)
    per_device: list[list[str]] = [[] for _ in range(devices)]
    for kind in chosen:
        cost = _segment_length(kind, segment_length) + 2 * _GUARD
        d = int(order[np.argmin(load[order])])
        if load[d] + cost <= steps:
            load[d] += cost
            per_device[d].append(kind)

    # Each device spreads its segments evenly: segment j sits at phase φ_j of the j-th equal
    # share of the device's slack. Device phases are stratified over [0, 1), so the fleet's
    # segments together tile time evenly rather than piling up at the same instants.
    device_phase = (rng.permutation(devices) + rng.random(devices)) / devices
    segments: list[_Segment] = []
    for d, seg_kinds in enumerate(per_device):
        if not seg_kinds:
            continue
        rng.shuffle(seg_kinds)
        share = (steps - int(load[d])) / len(seg_kinds)
        phases = (device_phase[d] + rng.uniform(-0.2, 0.2, len(seg_kinds))) % 1.0
        occupied = 0  # readings (segments plus guards) before segment j
        for j, (kind, phase) in enumerate(zip(seg_kinds, phases.tolist(), strict=True)):
            # floor((j + phase) * share) is non-decreasing in j and <= the total slack, so
            # segments keep their order, never overlap and end inside the window.
            start = occupied + math.floor((j + phase) * share) + _GUARD
            length = _segment_length(kind, segment_length)
            segments.append(_Segment(d, start, length, kind))
            occupied += length + 2 * _GUARD
    return segments


def _pick_shape(m: _Model, rng: np.random.Generator, n_sensors: int) -> FloatArray:
    """A displacement direction on ``n_sensors`` random sensors, unit unexplained norm.

    Rejects directions mostly inside the normal manifold (e.g. two co-moving sensors moving
    together), which would need absurd jumps to become detectable.
    """
    s_count = m.loadings.shape[0]
    # Faults drive temperatures, currents and vibration up; only quantities with ample room
    # above zero also fail downward, so displacements stay clear of the physical floor.
    may_fall = m.mean / m.std >= _FALL_HEADROOM
    for _ in range(64):
        shape = np.zeros(s_count)
        idx = rng.choice(s_count, size=n_sensors, replace=False)
        shape[idx] = np.where(may_fall[idx], rng.choice([-1.0, 1.0], size=n_sensors), 1.0)
        shape /= np.linalg.norm(shape)
        norm = float(np.linalg.norm(m.residual @ shape))
        if norm >= 0.5:
            return shape / norm
    raise AssertionError("no detectable direction found; loadings are degenerate")


def _inject(
    m: _Model,
    rng: np.random.Generator,
    kind: str,
    u: FloatArray,
    z: FloatArray,
    magnitude: float,
) -> None:
    """Displace one segment ``u`` (length, sensors) of one device in place.

    ``z`` holds the segment's latents (length, K). Guarantees documented in the module
    docstring; every displacement is proportional to ``magnitude``.
    """
    length, s_count = u.shape
    if kind == "spike":
        shape = _pick_shape(m, rng, 1 + int(rng.random() < 0.5))
        u += magnitude * rng.uniform(6.0, 9.0) * shape
    elif kind == "drift":
        shape = _pick_shape(m, rng, 1 + int(rng.random() < 0.3))
        onset = rng.uniform(5.0, 6.0)
        ramp = max(1, length // 3)
        level = onset * (1.0 + np.minimum(1.0, np.arange(length) / ramp))
        u += magnitude * level[:, None] * shape[None, :]
    elif kind == "stuck":
        s = int(rng.integers(s_count))
        need = magnitude * rng.uniform(5.0, 6.0) / math.sqrt(m.residual[s, s])
        hi, lo = float(u[:, s].max()) + need, float(u[:, s].min()) - need
        room = m.mean[s] / m.std[s]  # the physical zero is at u = -room
        u[:, s] = lo if abs(lo) < abs(hi) and lo > -room / 2 else hi
    elif kind == "noise_burst":
        idx = rng.choice(s_count, size=max(3, s_count // 4), replace=False)
        sigma = 7.0 / math.sqrt(float(np.trace(m.residual[np.ix_(idx, idx)])))
        delta = np.zeros_like(u)
        delta[:, idx] = rng.normal(0.0, sigma, (length, idx.size))
        # Excursions that would take a reading more than halfway to zero are mirrored upward:
        # symmetric noise for most quantities, no 0 °C bearing from a noisy thermocouple.
        floor = -0.5 * m.mean / m.std
        delta = np.where(u + delta < floor, -delta, delta)
        norms = np.linalg.norm(delta @ m.residual, axis=1)
        delta *= np.maximum(1.0, 5.0 / norms)[:, None]
        u += magnitude * delta
    elif kind == "correlated_fault":
        _correlated_fault(m, rng, u, z, magnitude)
    else:
        raise ValueError(f"unknown anomaly kind {kind!r}: use one of {', '.join(ANOMALY_KINDS)}")


def _correlated_fault(
    m: _Model, rng: np.random.Generator, u: FloatArray, z: FloatArray, magnitude: float
) -> None:
    """Split co-moving groups: half reports its latent at the crest, half at the trough.

    A sensor moved this way reads exactly what it would at another *normal* operating point
    (only its main latent changes, its noise and offset stay), so its marginal is untouched;
    only the agreement with its group-mates breaks.
    """
    delta = np.zeros_like(u)
    for g in rng.permutation(_K).tolist():
        members = rng.permutation(np.flatnonzero(m.group == g))
        side = np.where(np.arange(members.size) < (members.size + 1) // 2, 1.0, -1.0)
        if rng.random() < 0.5:
            side = -side
        # Crest of the sinusoid plus one AR std: ≈ the latent's 95th percentile.
        level = side * (m.sine_amp[g] + m.ar_amp[g])
        delta[:, members] = m.loadings[members, g][None, :] * (level[None, :] - z[:, g, None])
        if np.linalg.norm(delta @ m.residual, axis=1).min() >= _CORRELATED_MIN:
            break
    u += magnitude * delta


def _normal_block_draws(
    spec: FleetSpec, purpose: int, first: int, count: int, width: int
) -> FloatArray:
    """Standard normals for timesteps [first, first+count): (count, devices, width).

    Drawn per fixed block of timesteps, so a timestep's draws never depend on chunking.
    """
    out = np.empty((count, spec.devices, width))
    t = first
    while t < first + count:
        block, skip = divmod(t, _NOISE_BLOCK)
        take = min(_NOISE_BLOCK - skip, first + count - t)
        draws = _rng(spec.seed, purpose, block).standard_normal((_NOISE_BLOCK, spec.devices, width))
        out[t - first : t - first + take] = draws[skip : skip + take]
        t += take
    return out


def _validate_stream_args(
    readings_per_device: int | None,
    anomaly_fraction: float,
    kinds: Sequence[str],
    magnitude: float,
    segment_length: int,
) -> tuple[str, ...]:
    if readings_per_device is not None and readings_per_device < 0:
        raise ValueError(f"readings_per_device={readings_per_device} must be >= 0")
    if not 0.0 <= anomaly_fraction <= MAX_ANOMALY_FRACTION:
        raise ValueError(
            f"anomaly_fraction={anomaly_fraction} is out of range: use 0..{MAX_ANOMALY_FRACTION} "
            "(beyond that anomalies are the normal regime)"
        )
    unknown = [k for k in kinds if k not in ANOMALY_KINDS]
    if unknown:
        raise ValueError(
            f"unknown anomaly kind(s) {', '.join(map(repr, unknown))}: "
            f"use any of {', '.join(ANOMALY_KINDS)}"
        )
    if anomaly_fraction > 0 and not kinds:
        raise ValueError("anomaly_fraction > 0 needs at least one kind")
    if not (magnitude > 0 and math.isfinite(magnitude)):
        raise ValueError(f"magnitude={magnitude} must be a finite number > 0 (1.0 = default)")
    if segment_length < 1:
        raise ValueError(f"segment_length={segment_length} must be >= 1 reading")
    return tuple(dict.fromkeys(kinds))


def stream(
    spec: FleetSpec,
    readings_per_device: int | None,
    anomaly_fraction: float = 0.0,
    kinds: Sequence[str] = ANOMALY_KINDS,
    magnitude: float = 1.0,
    segment_length: int = 5,
) -> Iterator[Reading]:
    """Readings of the whole fleet from ``spec.start_ms`` on, ordered by time then device.

    Device ``i``'s ``k``-th reading has timestamp ``start_ms + k * period_ms``.

    Args:
        readings_per_device: stream length; ``None`` streams forever (lazily).
        anomaly_fraction: target share of readings inside injected segments, 0–0.3. Met to
            within half a segment per plan window (65 536 readings); segments that cannot
            fit (very short streams) are dropped, never overlapped. ``write_truth`` records
            what was actually injected.
        kinds: anomaly kinds to inject, used in balanced shuffled rotation.
        magnitude: scales every anomaly's displacement; at 1.0 every injected reading is
            clearly detectable (see module docstring).
        segment_length: readings per segment for every kind but ``spike`` (always 1).

    Deterministic for a given spec. The normal signal at a timestep depends only on the spec
    — not on the stream length or the anomaly arguments — so an anomalous stream equals the
    clean one except at the injected readings. The anomaly *schedule* does depend on
    ``readings_per_device`` (the budget is spread over the whole stream).

    Raises:
        ValueError: an argument is out of range (checked before the first reading).
    """
    kinds = _validate_stream_args(
        readings_per_device, anomaly_fraction, kinds, magnitude, segment_length
    )
    return _stream(spec, readings_per_device, anomaly_fraction, kinds, magnitude, segment_length)


def _windows(spec: FleetSpec, readings_per_device: int | None) -> Iterator[tuple[int, int]]:
    """(first timestep, length) of each plan window."""
    size = max(256, _WINDOW_READINGS // spec.devices)
    if readings_per_device is None:
        first = 0
        while True:
            yield first, size
            first += size
    # Finite: equal windows of at least `size`, so no stub window too short for a segment.
    n = max(1, readings_per_device // size)
    edges = [round(i * readings_per_device / n) for i in range(n + 1)]
    for a, b in itertools.pairwise(edges):
        if b > a:
            yield a, b - a


def _stream(
    spec: FleetSpec,
    readings_per_device: int | None,
    anomaly_fraction: float,
    kinds: tuple[str, ...],
    magnitude: float,
    segment_length: int,
) -> Iterator[Reading]:
    m = _model(spec)
    names = feature_names(spec)
    ids = device_ids(spec)
    all_devices = np.arange(spec.devices, dtype=np.int64)
    ar_state = _rng(spec.seed, _RNG_AR_INIT).standard_normal((spec.devices, _K))
    for w, (first, steps) in enumerate(_windows(spec, readings_per_device)):
        t_ms = spec.start_ms + (first + np.arange(steps, dtype=np.int64)) * spec.period_ms
        innovations = _normal_block_draws(spec, _RNG_AR, first, steps, _K)
        ar = _ar(m, ar_state, innovations)
        ar_state = ar[-1]
        z = _sines(m, t_ms, all_devices) + m.ar_amp * ar
        noise = _normal_block_draws(spec, _RNG_NOISE, first, steps, spec.sensors) * m.noise_std
        u = z @ m.loadings.T + m.offsets[None, :, :] + noise

        labels: list[list[str | None]] = [[None] * spec.devices for _ in range(steps)]
        if anomaly_fraction > 0:
            plan_rng = _rng(spec.seed, _RNG_PLAN, w)
            inject_rng = _rng(spec.seed, _RNG_INJECT, w)
            plan = _plan(plan_rng, steps, spec.devices, anomaly_fraction, kinds, segment_length)
            for seg in plan:
                span = slice(seg.start, seg.start + seg.length)
                seg_u = u[span, seg.device]  # a view: _inject writes through
                _inject(m, inject_rng, seg.kind, seg_u, z[span, seg.device], magnitude)
                for t in range(seg.start, seg.start + seg.length):
                    labels[t][seg.device] = seg.kind

        x = _to_physical(m, u).tolist()
        for t, stamp in enumerate(t_ms.tolist()):
            for d, device in enumerate(ids):
                yield Reading(device, stamp, dict(zip(names, x[t][d], strict=True)), labels[t][d])


# ----------------------------------------------------------------------------- ground truth


def write_truth(path: Path, readings: Iterable[Reading]) -> int:
    """Write one JSON line ``{"device_id", "timestamp_ms", "kind"}`` per anomalous reading.

    Consumes ``readings``; returns the number of lines written.
    """
    count = 0
    with path.open("wb") as fh:
        for reading in readings:
            if reading.anomaly is not None:
                fh.write(reading.truth_json() + b"\n")
                count += 1
    return count


def load_truth(path: Path) -> dict[tuple[str, int], str]:
    """Read a ``write_truth`` file: (device_id, timestamp_ms) → kind."""
    truth: dict[tuple[str, int], str] = {}
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                rec = msgspec.json.decode(line, type=dict[str, str | int])
                truth[(str(rec["device_id"]), int(rec["timestamp_ms"]))] = str(rec["kind"])
    return truth
