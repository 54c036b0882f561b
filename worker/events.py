"""Anomaly events and dead-letter records: building and encoding, no I/O.

Event schema: ``schemas/anomaly-event.v1.json``. Dead-letter headers reuse Kafka Connect's
names (``__connect.errors.*``) so existing tooling can read them, plus our closed-set
reason under ``sensor_anomaly.error.reason``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, KeysView
from datetime import UTC, datetime
from typing import Any

import msgspec

from detector import Contribution
from worker.reasons import Reason, Stage
from worker.records import InputRecord, OutputMessage

EVENT_SCHEMA = "sensor-anomaly-event/v1"
_encode = msgspec.json.Encoder().encode


def event_id(topic: str, partition: int, offset: int) -> str:
    """Deterministic id of the event for one input record: reprocessing gives the same id."""
    return f"{topic}/{partition}/{offset}"


# Below 2**32 s (year 2106) ``ms / 1000`` is within half a microsecond of the exact value,
# so the fast path below formats exactly what the datetime path would.
_FAST_ISO_LIMIT_MS = 2**32 * 1000
_SECONDS: dict[int, str] = {}  # "YYYY-MM-DDTHH:MM:SS" by epoch second; events cluster in time


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC with millisecond precision."""
    if 0 <= ms < _FAST_ISO_LIMIT_MS:
        sec, milli = divmod(ms, 1000)
        head = _SECONDS.get(sec)
        if head is None:
            if len(_SECONDS) >= 4096:
                _SECONDS.clear()
            head = _SECONDS[sec] = datetime.fromtimestamp(sec, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{head}.{milli:03d}Z"
    return (
        datetime.fromtimestamp(ms / 1000, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class EpisodeTracker:
    """Remembers, per device, when its current run of anomalous readings began ("since when").

    A run ends at the device's first normal reading. Bounded (LRU) so a flood of device ids
    cannot grow memory; state is per worker and restarts empty, so after a restart or a
    rebalance ``anomaly_since`` starts again at the next anomalous reading.
    """

    def __init__(self, max_devices: int = 100_000) -> None:
        self._since: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._max = max_devices

    def devices(self) -> KeysView[str]:
        """Devices with an open run (a live view): only their normal readings change state."""
        return self._since.keys()

    def update(self, device: str, ts_ms: int, anomalous: bool) -> tuple[int, int] | None:
        """Record a reading; return ``(since_ms, count)`` of the run if anomalous."""
        if not anomalous:
            self._since.pop(device, None)
            return None
        prev = self._since.pop(device, None)
        run = (prev[0], prev[1] + 1) if prev and prev[0] <= ts_ms else (ts_ms, 1)
        self._since[device] = run
        if len(self._since) > self._max:
            self._since.popitem(last=False)
        return run


class DeviceGroups:
    """Maps device ids to a bounded set of metric label values (never a raw id)."""

    def __init__(self, pattern: str, max_groups: int) -> None:
        self._re = re.compile(pattern)
        self._max = max_groups
        self._cache: dict[str, str] = {}
        self._groups: set[str] = set()

    def __call__(self, device: str) -> str:
        g = self._cache.get(device)
        if g is not None:
            return g
        m = self._re.search(device)
        g = (m.group(1) if m and m.groups() else (m.group(0) if m else "")) or "other"
        g = re.sub(r"[^A-Za-z0-9_.-]", "_", g)[:32]
        if g not in self._groups:
            if len(self._groups) >= self._max:
                g = "other"
            else:
                self._groups.add(g)
        if len(self._cache) < 1_000_000:
            self._cache[device] = g
        return g

    def many(self, devices: Iterable[str]) -> dict[str, str]:
        """``{device: label}`` for distinct ``devices``, labelled in the order given."""
        cache = self._cache
        out: dict[str, str] = {}
        for d in devices:
            g = cache.get(d)
            out[d] = g if g is not None else self(d)
        return out


def build_event(
    *,
    record: InputRecord,
    device_id: str,
    ts_ms: int,
    detected_ms: int,
    score: float,
    threshold: float,
    contributors: list[Contribution],
    imputed: list[str],
    since: tuple[int, int],
    model_name: str,
    model_version: str,
    compared: float | None = None,
    extra: dict[str, Any] | None = None,
) -> OutputMessage:
    """One anomaly event, keyed by device id.

    ``threshold`` is the threshold the reading was compared with (the model's × the device
    group's multiplier); ``compared`` the score compared with it when that is not ``score``
    (the smoothed score of a smoothing model). ``extra`` holds the optional fields of newer
    models (schema: ``window``, ``smoothed_score``, ``threshold_multiplier``, ``out_of_range``
    as ``[(sensor, excess)]``, ``changed_constants`` as ``[(sensor, expected, value)]``);
    without it the event is exactly the original v1 shape.
    """
    doc: dict[str, Any] = {
        "schema": EVENT_SCHEMA,
        "event_id": event_id(record.topic, record.partition, record.offset),
        "device_id": device_id,
        "reading_timestamp": iso_ms(ts_ms),
        "reading_timestamp_ms": ts_ms,
        "detected_at": iso_ms(detected_ms),
        "score": score,
        "threshold": threshold,
        "score_ratio": (score if compared is None else compared) / threshold,
        "anomaly_since": iso_ms(since[0]),
        "anomaly_since_ms": since[0],
        "consecutive_anomalies": since[1],
        "contributors": [
            {
                "sensor": c.sensor,
                "share": round(c.share, 6),
                "value": c.value,
                "expected": c.expected,
                "error_z": round(c.error_z, 3),
            }
            for c in contributors
        ],
        "imputed_sensors": imputed,
        "model": {"name": model_name, "version": model_version},
        "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
    }
    if extra:
        _add_extra(doc, extra)
    return OutputMessage(device_id.encode(), _encode(doc), [])


def _add_extra(doc: dict[str, Any], extra: dict[str, Any]) -> None:
    for key in ("window", "smoothed_score", "threshold_multiplier"):
        if key in extra:
            doc[key] = extra[key]
    if "out_of_range" in extra:
        doc["out_of_range"] = [
            {"sensor": name, "excess": round(ex, 6)} for name, ex in extra["out_of_range"]
        ]
    if "changed_constants" in extra:
        doc["changed_constants"] = [
            {"sensor": name, "expected": exp, "value": val}
            for name, exp, val in extra["changed_constants"]
        ]


def build_dead_letter(
    record: InputRecord,
    reason: Reason,
    stage: Stage,
    exception: str,
    message: str,
    model_version: str,
) -> OutputMessage:
    """The original key, value and headers plus error headers."""
    headers = list(record.headers or [])
    headers += [
        ("__connect.errors.topic", record.topic.encode()),
        ("__connect.errors.partition", str(record.partition).encode()),
        ("__connect.errors.offset", str(record.offset).encode()),
        ("__connect.errors.stage", stage.value.encode()),
        ("__connect.errors.exception.class.name", exception.encode()),
        ("__connect.errors.exception.message", message.encode("utf-8", "replace")[:2000]),
        ("sensor_anomaly.error.reason", reason.value.encode()),
        ("sensor_anomaly.model.version", model_version.encode()),
    ]
    return OutputMessage(record.key, record.value, headers)
