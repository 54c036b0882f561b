"""Seeded chaos input: simulator readings plus bad records, each with its partition fixed up front.

Everything is a pure function of :class:`InputSpec`. Readings come from
:func:`simulator.fleet.stream` with anomalies injected at a large magnitude (every injected
reading is an *extreme* anomaly the detector must flag); the simulator's labels are the ground
truth. Bad records are drawn from :data:`BAD_KINDS` (each a deterministic function of a normal
reading) and inserted at seeded positions; ``flood`` inserts one run of consecutive bad records
into a single partition. Partition = device index modulo ``partitions``, so a device's readings
stay ordered on one partition and the driver can produce to explicit partitions (offsets are
then known without trusting any partitioner).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from simulator.fleet import FleetSpec, Reading, stream

PERIOD_MS = 1000


@dataclass(frozen=True)
class InputSpec:
    """What to generate.

    Attributes:
        readings: number of good readings (spread over ``devices``; rounded down to a
            multiple of it).
        devices, sensors, seed: the simulated fleet (see :class:`simulator.fleet.FleetSpec`).
        partitions: input topic partitions.
        anomaly_fraction: share of readings inside injected anomaly segments.
        magnitude: anomaly magnitude (1.0 is already clearly detectable; larger is extreme).
        bad_fraction: share of extra records that are bad (dead letters), at seeded positions.
        flood: number of consecutive bad records inserted at one position of one partition.
        start_ms: timestamp of the first reading; ``None`` = recent enough for the worker's
            ``reading.max_past_s`` (ends a minute before generation time).
    """

    readings: int = 50_000
    devices: int = 8
    sensors: int = 16
    seed: int = 11
    partitions: int = 3
    anomaly_fraction: float = 0.02
    magnitude: float = 3.0
    bad_fraction: float = 0.005
    flood: int = 0
    start_ms: int | None = None

    def fleet(self, start_ms: int) -> FleetSpec:
        return FleetSpec(
            devices=self.devices,
            sensors=self.sensors,
            seed=self.seed,
            period_ms=PERIOD_MS,
            start_ms=start_ms,
        )

    @property
    def per_device(self) -> int:
        return max(1, self.readings // self.devices)


@dataclass(frozen=True, slots=True)
class Planned:
    """One record to produce. ``anomaly`` is the injected kind (ground truth) of a good
    reading; ``bad`` names the bad-record kind of a record that must be dead-lettered."""

    partition: int
    key: bytes | None
    value: bytes | None
    device_id: str | None
    timestamp_ms: int | None
    anomaly: str | None = None
    bad: str | None = None


def _mutate(obj: dict[str, object], **changes: object) -> bytes:
    doc = dict(obj)
    doc.update(changes)
    return json.dumps(doc).encode()


def _drop(obj: dict[str, object], key: str) -> bytes:
    return json.dumps({k: v for k, v in obj.items() if k != key}).encode()


def _values_with(obj: dict[str, object], sensor: str, value: object) -> bytes:
    values = dict(obj["values"])  # type: ignore[call-overload]
    values[sensor] = value
    return _mutate(obj, values=values)


# Each bad kind: a normal reading's JSON object -> the bad value (None = tombstone). Cases
# from GUIDE §7; every one must become exactly one dead letter, never an event or a crash.
BAD_KINDS: dict[str, Callable[[dict[str, object]], bytes | None]] = {
    "tombstone": lambda o: None,
    "empty": lambda o: b"",
    "invalid_utf8": lambda o: b'{"device_id": "\xff\xfe", "timestamp": 1}',
    "truncated_json": lambda o: json.dumps(o).encode()[:-7],
    "trailing_garbage": lambda o: json.dumps(o).encode() + b" xyz",
    "top_level_array": lambda o: b"[1, 2, 3]",
    "top_level_number": lambda o: b"42",
    "null": lambda o: b"null",
    "deep_nesting": lambda o: b"[" * 5000 + b"]" * 5000,
    "nan_literal": lambda o: (
        json.dumps(o).replace('"sensor_00": ', '"sensor_00": NaN, "x": ', 1).encode()
    ),
    "huge_number": lambda o: _values_with(o, "sensor_01", 0).replace(
        b'"sensor_01": 0', b'"sensor_01": 1e400'
    ),
    "string_number": lambda o: _values_with(o, "sensor_02", "1.5"),
    "bool_number": lambda o: _values_with(o, "sensor_03", True),
    "null_feature": lambda o: _values_with(o, "sensor_04", None),
    "missing_feature": lambda o: _mutate(
        o,
        values={k: v for k, v in o["values"].items() if k != "sensor_05"},  # type: ignore[attr-defined]
    ),
    "missing_device": lambda o: _drop(o, "device_id"),
    "missing_timestamp": lambda o: _drop(o, "timestamp"),
    "timestamp_seconds": lambda o: _mutate(o, timestamp=int(o["timestamp"]) // 1000),  # type: ignore[call-overload]
    "timestamp_future": lambda o: _mutate(o, timestamp=4_102_444_800_000),  # year 2100
    "timestamp_garbage": lambda o: _mutate(o, timestamp="yesterday-ish"),
    "device_too_long": lambda o: _mutate(o, device_id="p" * 300),
    "device_control_char": lambda o: _mutate(o, device_id="pump-\x07bell"),
    "values_not_object": lambda o: _mutate(o, values=[1, 2, 3]),
}


@dataclass
class ChaosInput:
    """The generated records, in production order, and their ground truth."""

    spec: InputSpec
    records: list[Planned] = field(default_factory=list)

    @property
    def injected(self) -> set[tuple[str, int]]:
        """(device, timestamp) of every injected extreme anomaly."""
        return {
            (r.device_id, r.timestamp_ms)  # type: ignore[misc]
            for r in self.records
            if r.anomaly is not None
        }

    @property
    def bad(self) -> int:
        return sum(r.bad is not None for r in self.records)

    def per_partition(self) -> dict[int, int]:
        out: dict[int, int] = {p: 0 for p in range(self.spec.partitions)}
        for r in self.records:
            out[r.partition] += 1
        return out


def generate(spec: InputSpec) -> ChaosInput:
    """The chaos input for ``spec`` (deterministic except ``start_ms=None``'s clock)."""
    start = spec.start_ms
    if start is None:
        start = int(time.time() * 1000) - spec.per_device * PERIOD_MS - 60_000
    fleet = spec.fleet(start)
    rng = random.Random(spec.seed * 7919 + 17)
    good: list[Reading] = list(
        stream(
            fleet, spec.per_device, anomaly_fraction=spec.anomaly_fraction, magnitude=spec.magnitude
        )
    )
    n_bad = round(len(good) * spec.bad_fraction)
    # Positions (in the good stream) after which a bad record is inserted.
    bad_at: dict[int, list[str]] = {}
    kinds = sorted(BAD_KINDS)
    for i in range(n_bad):
        # Balanced rotation over the kinds, shuffled positions.
        bad_at.setdefault(rng.randrange(len(good)), []).append(kinds[i % len(kinds)])
    flood_at = (
        rng.randrange(len(good) // 4, max(len(good) // 4 + 1, len(good) * 3 // 4))
        if spec.flood
        else -1
    )
    out = ChaosInput(spec)
    dev_index = {f"pump-{i:03d}": i for i in range(spec.devices)}
    for i, r in enumerate(good):
        part = dev_index[r.device_id] % spec.partitions
        out.records.append(
            Planned(part, r.key(), r.to_json(), r.device_id, r.timestamp_ms, anomaly=r.anomaly)
        )
        for kind in bad_at.get(i, ()):
            out.records.append(_bad(kind, r, part))
        if i == flood_at:
            for j in range(spec.flood):
                out.records.append(_bad(kinds[j % len(kinds)], r, part))
    return out


def _bad(kind: str, r: Reading, partition: int) -> Planned:
    obj = json.loads(r.to_json())
    return Planned(partition, r.key(), BAD_KINDS[kind](obj), None, None, bad=kind)
