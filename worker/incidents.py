"""Incidents: per-device anomaly lifecycles (opened → updated → resolved), pure.

Scored readings in, incident events and changed per-device states out: no Kafka, no
Prometheus, no wall clock. Every rule reads the readings' **event time**, so replaying the same
input (a backfill, a restart from a restored state) gives the same incidents, ids and all.

Rules, per device (``IncidentSettings`` names in brackets):

* A reading is *anomalous* when ``score > threshold × multiplier(device group)``
  [``threshold_multipliers``]; its ``score_ratio`` is ``score / (threshold × multiplier)``.
* An incident **opens** at an anomalous reading when at least ``min_anomalous`` anomalous
  readings fall within the last ``window_s`` of event time, the anomalous stretch has
  lasted ``min_duration_s`` of event time, its readings' mean ratio is at least
  ``min_mean_ratio`` and its peak at least ``min_peak_ratio`` — or at once when a single
  reading's ratio reaches ``open_ratio`` (0 = off). At the card's k = 2 about 4 % of normal
  readings pass the threshold, in clusters: a count alone pages hundreds of times a day per
  device, the magnitude is what separates a fault (docs/incidents.md has the measurements
  behind the defaults). Within ``cooldown_s`` after the device's previous incident
  resolved only the ``open_ratio`` rule opens one (the cooldown damps a marginal cluster
  flapping open and shut; it must not swallow a fault).
* An open incident **resolves** after ``resolve_normal_readings`` consecutive normal readings
  (``resolved_at`` = that reading's time) or when ``resolve_quiet_s`` of event time passed
  without an anomalous reading (``resolved_at`` = last anomalous + ``resolve_quiet_s``;
  noticed at the device's next reading or by :meth:`IncidentTracker.expire`).
* **updated** events go out at anomalous readings at most every ``update_interval_s`` of event
  time, and at once when the severity rises. Severity is the band of the *peak* ratio
  (``critical`` from ``critical_ratio``, else ``warning``): it only escalates, so a page does
  not flap between bands.
* The incident id is ``sha256(model name, device, topic, partition, offset of the opening
  reading)``: a replay after a crash yields the same id, so subscribers dedupe by it.

Replays are idempotent: the tracker remembers, per input partition, the highest offset it
applied (stored under :data:`APPLIED_KEY` beside the device states) and skips rows at or below
it, so re-delivered records after a restore never count twice.

Only anomalous readings and the readings of devices with an open incident are looked at one
by one; any other normal reading changes nothing (the window is event time: nothing shifts),
so it costs nothing and writes nothing to the changelog. A device's state exists while
something is going on (recent anomalous readings, an open incident, a cooldown);
:meth:`IncidentTracker.expire` deletes states that no longer matter.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any, Final, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from worker.events import iso_ms
from worker.records import OutputMessage

INCIDENT_SCHEMA: Final = "sensor-anomaly-incident/v1"
STATE_VERSION: Final = 1
# Reserved store key of a partition's applied-offset marks. Device ids cannot contain control
# characters (the decoder dead-letters them), so it never collides with a device.
APPLIED_KEY: Final = "\x00applied"

Severity = Literal["warning", "critical"]
EventState = Literal["opened", "updated", "resolved"]
ResolveReason = Literal["normal_readings", "quiet"]


class IncidentConfigError(ValueError):
    """An ``incidents`` setting is out of range; the message names it and the fix."""


class StateDecodeError(ValueError):
    """Stored state bytes are not a state this version can read."""


@dataclass(frozen=True)
class IncidentSettings:
    """The ``incidents:`` config section. Durations in seconds of event time.

    Ranges (checked by :meth:`validate`): ``1 <= min_anomalous <= 64``,
    ``0 < window_s <= 86400``,
    ``resolve_normal_readings >= 1``, every duration ``>= 0``, ``critical_ratio >= 1``,
    ``min_peak_ratio``/``min_mean_ratio >= 1``,
    ``open_ratio`` 0 or ``>= 1``, multipliers ``> 0``.
    """

    enabled: bool = False
    topic: str = "sensor-incidents"
    # Opening: k anomalous readings within window_s of event time (k = min_anomalous) ...
    window_s: float = 10.0
    min_anomalous: int = 3
    # ... for at least this long (0 = no duration condition), with at least one reading this
    # far past the threshold (1 = any anomalous reading) ...
    min_duration_s: float = 0.0
    min_peak_ratio: float = 1.0
    # ... and their mean ratio at least this (sustained, not one lucky reading) ...
    min_mean_ratio: float = 4.0
    # ... or one reading at least this far past the threshold (0 = off).
    open_ratio: float = 10.0
    # Resolving: m consecutive normal readings, or T seconds without an anomalous reading.
    resolve_normal_readings: int = 10
    resolve_quiet_s: float = 60.0
    # A resolved device cannot reopen for this long (event time after resolved_at).
    cooldown_s: float = 10.0
    update_interval_s: float = 60.0
    critical_ratio: float = 10.0
    top_sensors: int = 5
    # "<device-group regex>=<multiplier>", first full match on the group label wins; the
    # multiplier scales the model threshold for incidents (and score_ratio) of that group.
    threshold_multipliers: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise :class:`IncidentConfigError` (one line, names the key) on a bad value."""
        if not 0 < self.window_s <= 86400:
            raise IncidentConfigError(
                f"incidents.window_s: {self.window_s} is out of range (0, 86400] seconds"
            )
        if not 1 <= self.min_anomalous <= 64:
            raise IncidentConfigError(
                f"incidents.min_anomalous: {self.min_anomalous} is out of range [1, 64]"
            )
        if self.resolve_normal_readings < 1:
            raise IncidentConfigError("incidents.resolve_normal_readings: must be >= 1")
        for name in (
            "min_duration_s",
            "resolve_quiet_s",
            "cooldown_s",
            "update_interval_s",
        ):
            v = getattr(self, name)
            if not (v >= 0 and v < 10 * 365 * 86400):
                raise IncidentConfigError(f"incidents.{name}: {v} must be >= 0 seconds")
        if not self.critical_ratio >= 1:
            raise IncidentConfigError("incidents.critical_ratio: must be >= 1 (score ÷ threshold)")
        for name in ("min_peak_ratio", "min_mean_ratio"):
            if not getattr(self, name) >= 1:
                raise IncidentConfigError(f"incidents.{name}: must be >= 1 (score ÷ threshold)")
        if not (self.open_ratio == 0 or self.open_ratio >= 1):
            raise IncidentConfigError("incidents.open_ratio: use 0 (off) or a ratio >= 1")
        if not 1 <= self.top_sensors <= 1000:
            raise IncidentConfigError("incidents.top_sensors: must be in [1, 1000]")
        if not self.topic:
            raise IncidentConfigError("incidents.topic: must not be empty")
        ThresholdMultipliers.parse(self.threshold_multipliers)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> IncidentSettings:
        """Build and validate from a plain mapping (tests, scripts); unknown keys refused."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise IncidentConfigError(f"unknown incidents key(s) {unknown}; valid: {sorted(known)}")
        kw = dict(data)
        if "threshold_multipliers" in kw:
            kw["threshold_multipliers"] = tuple(kw["threshold_multipliers"])
        s = cls(**kw)
        s.validate()
        return s


class ThresholdMultipliers:
    """Per-device-group threshold multipliers from ``"<regex>=<multiplier>"`` rules."""

    def __init__(self, rules: Sequence[tuple[re.Pattern[str], float]]) -> None:
        self._rules = list(rules)
        self._cache: dict[str, float] = {}

    @classmethod
    def parse(cls, specs: Iterable[str]) -> ThresholdMultipliers:
        rules: list[tuple[re.Pattern[str], float]] = []
        for spec in specs:
            pattern, sep, value = spec.rpartition("=")
            try:
                mult = float(value)
                rx = re.compile(pattern)
            except (ValueError, re.error):
                mult, rx = float("nan"), None  # type: ignore[assignment]
            if not sep or not pattern or rx is None or not (0 < mult < 1e6):
                raise IncidentConfigError(
                    f"incidents.threshold_multipliers: {spec!r} is not '<group regex>=<number "
                    "> 0>', e.g. 'compressor=1.5'"
                )
            rules.append((rx, mult))
        return cls(rules)

    def for_group(self, group: str) -> float:
        """The multiplier of ``group`` (1.0 when no rule matches)."""
        m = self._cache.get(group)
        if m is None:
            m = next((v for rx, v in self._rules if rx.fullmatch(group)), 1.0)
            if len(self._cache) < 100_000:
                self._cache[group] = m
        return m

    def __bool__(self) -> bool:
        return bool(self._rules)


# ------------------------------------------------------------------------------ state types


class SensorPeak(msgspec.Struct, frozen=True, array_like=True):
    """One sensor over an incident: its largest error share, and value vs expected there."""

    sensor: str
    max_share: float
    value: float | None  # raw units; None if it was imputed
    expected: float


class Incident(msgspec.Struct, frozen=True, array_like=True):
    """An open incident, or a candidate (``id == ""``) while the window fills.

    Times are event time, epoch ms. ``anomalous`` counts the stretch's anomalous readings;
    ``readings`` counts them plus every normal reading from the open on (normal readings
    before the open are not looked at, see the module docstring).
    """

    id: str
    device_group: str
    started_ms: int  # first anomalous reading of the stretch
    opened_ms: int  # reading that opened it (0 for a candidate)
    last_anomalous_ms: int
    last_ts_ms: int
    readings: int
    anomalous: int
    peak_ratio: float
    latest_ratio: float
    ratio_sum: float  # over the anomalous readings: their mean is ratio_sum / anomalous
    severity: str
    sensors: tuple[SensorPeak, ...]
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    model_version: str
    last_event_ms: int  # event time of the last event published for it
    sequence: int  # events published so far


class DeviceState(msgspec.Struct, frozen=True, array_like=True):
    """Everything the rules remember about one device (see module docstring).

    ``recent`` holds the event times of the last ``min_anomalous`` anomalous readings
    (oldest first); ``consecutive_normal`` counts normal readings of an open incident since
    its last anomalous one; ``cooldown_until_ms`` is event time.
    """

    recent: tuple[int, ...] = ()
    consecutive_normal: int = 0
    cooldown_until_ms: int = 0
    last_ts_ms: int = 0
    incident: Incident | None = None


class _Envelope(msgspec.Struct, array_like=True):
    version: int
    state: DeviceState


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(_Envelope)
_applied_decoder = msgspec.msgpack.Decoder(tuple[int, dict[str, int]])


def encode_state(state: DeviceState) -> bytes:
    """Compact bytes of a device state for the changelog (msgpack, with a version field)."""
    return _state_encoder.encode(_Envelope(STATE_VERSION, state))


def decode_state(data: bytes) -> DeviceState:
    """Inverse of :func:`encode_state`.

    Raises:
        StateDecodeError: not a state of a version this code reads.
    """
    try:
        env = _state_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise StateDecodeError(f"undecodable incident state: {e}") from None
    if env.version != STATE_VERSION:
        raise StateDecodeError(f"incident state version {env.version}; this worker reads 1")
    return env.state


def encode_applied(marks: Mapping[str, int]) -> bytes:
    """Bytes of a partition's applied offsets ``{topic: last applied offset}``."""
    return _state_encoder.encode((STATE_VERSION, dict(marks)))


def decode_applied(data: bytes) -> dict[str, int]:
    try:
        version, marks = _applied_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise StateDecodeError(f"undecodable applied-offset marks: {e}") from None
    if version != STATE_VERSION:
        raise StateDecodeError(f"applied-offset marks version {version}; this worker reads 1")
    return marks


# ------------------------------------------------------------------------------ input/output


@dataclass(frozen=True)
class Contributor:
    """A sensor's part in one reading's error (the fields of ``detector.Contribution`` used)."""

    sensor: str
    share: float
    value: float
    expected: float


@dataclass(frozen=True, eq=False)
class ScoredBatch:
    """Parallel columns over the finitely scored readings of one batch, in input order.

    ``contributors`` maps a row index to its ranked contributors; it must cover every row
    with ``score > threshold × multiplier(group)`` (rows without an entry carry no sensors).
    Objects with ``sensor/share/value/expected`` attributes (``detector.Contribution``) fit.
    """

    device_ids: Sequence[str]
    device_groups: Sequence[str]
    ts_ms: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float64]
    threshold: float
    topics: Sequence[str]
    partitions: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]
    contributors: Mapping[int, Sequence[Any]]
    model_name: str
    model_version: str

    def __len__(self) -> int:
        return len(self.device_ids)


@dataclass(frozen=True)
class IncidentEvent:
    """One lifecycle event; :func:`encode_incident_event` gives its published form."""

    state: EventState
    device_id: str
    device_group: str
    model_name: str
    incident: Incident
    event_ms: int  # event time of the reading (or watermark) that caused it
    threshold: float
    multiplier: float
    resolved_ms: int | None = None
    resolve_reason: ResolveReason | None = None

    @property
    def duration_s(self) -> float:
        """Seconds from the first anomalous reading to resolve (or to the latest reading)."""
        end = self.resolved_ms if self.resolved_ms is not None else self.incident.last_ts_ms
        return max(0, end - self.incident.started_ms) / 1000.0


@dataclass
class IncidentOutput:
    """What one :meth:`IncidentTracker.process` call produced.

    ``changed``: input partition → store key → new state bytes-to-be (``DeviceState``), ``None``
    for a deleted key, or — for :data:`APPLIED_KEY` — the partition's ``{topic: offset}``
    marks. :func:`encode_change` turns a value into store bytes.
    """

    events: list[IncidentEvent] = field(default_factory=list)
    changed: dict[int, dict[str, DeviceState | dict[str, int] | None]] = field(default_factory=dict)


def encode_change(value: DeviceState | dict[str, int] | None) -> bytes | None:
    """Store bytes of one ``IncidentOutput.changed`` value (``None`` = tombstone)."""
    if value is None:
        return None
    if isinstance(value, DeviceState):
        return encode_state(value)
    return encode_applied(value)


def incident_id(model_name: str, device_id: str, topic: str, partition: int, offset: int) -> str:
    """Stable id: the same opening reading always gives the same id (32 hex digits)."""
    raw = "\x1f".join((model_name, device_id, topic, str(partition), str(offset)))
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------ the tracker

_EMPTY = DeviceState()


class IncidentTracker:
    """Applies the incident rules to scored batches; holds the state of owned partitions.

    Not thread-safe; one per worker loop. Keep it across model reloads (state is keyed by
    device; the next events carry the new model version). Device ids must map to one input
    partition (the readings' Kafka key is the device id).
    """

    def __init__(self, settings: IncidentSettings, model_name: str = "") -> None:
        """``model_name`` names the model in events made before the first batch (after a
        restore: :meth:`expire`, :meth:`open_incident_events`)."""
        settings.validate()
        self.settings = settings
        self.multipliers = ThresholdMultipliers.parse(settings.threshold_multipliers)
        self._states: dict[str, DeviceState] = {}
        self._partition_of: dict[str, int] = {}
        self._open: set[str] = set()  # devices with an open incident
        self._applied: dict[int, dict[str, int]] = {}
        # Of the latest batch: what a watermark-driven resolve (expire) reports.
        self._model_name = model_name
        self._threshold = 0.0
        s = settings
        self._window_ms = round(s.window_s * 1000)
        self._min_dur_ms = round(s.min_duration_s * 1000)
        self._quiet_ms = round(s.resolve_quiet_s * 1000)
        self._cool_ms = round(s.cooldown_s * 1000)
        self._update_ms = round(s.update_interval_s * 1000)

    # ---- partition lifecycle

    def load_partition(self, partition: int, items: Mapping[str, bytes]) -> int:
        """Install a restored partition's store contents; returns the devices loaded.

        Raises:
            StateDecodeError: a value is not a state this version reads.
        """
        self.drop_partition(partition)
        n = 0
        for key, raw in items.items():
            if key == APPLIED_KEY:
                self._applied[partition] = decode_applied(raw)
                continue
            st = self._states[key] = decode_state(raw)
            self._partition_of[key] = partition
            if st.incident is not None and st.incident.id:
                self._open.add(key)
            n += 1
        return n

    def drop_partition(self, partition: int) -> None:
        """Forget a revoked or lost partition's state (its owner restores it from the changelog)."""
        gone = [d for d, p in self._partition_of.items() if p == partition]
        for d in gone:
            del self._partition_of[d]
            self._states.pop(d, None)
            self._open.discard(d)
        self._applied.pop(partition, None)

    def state(self, device_id: str) -> DeviceState | None:
        return self._states.get(device_id)

    def open_incidents(self) -> dict[str, Incident]:
        """Device → its open incident."""
        return {
            d: s.incident for d, s in self._states.items() if s.incident and s.incident.id != ""
        }

    def open_incident_events(self, partition: int | None = None) -> list[IncidentEvent]:
        """An ``updated`` event per open incident (of ``partition``), changing nothing.

        For re-announcing restored incidents to Alertmanager after an assignment; not meant
        for the incidents topic (the sequence number is not advanced).
        """
        out = []
        for d, st in self._states.items():
            inc = st.incident
            if inc is None or not inc.id:
                continue
            if partition is not None and self._partition_of.get(d) != partition:
                continue
            mult = self.multipliers.for_group(inc.device_group)
            out.append(
                IncidentEvent(
                    state="updated",
                    device_id=d,
                    device_group=inc.device_group,
                    model_name=self._model_name,
                    incident=inc,
                    event_ms=inc.last_ts_ms,
                    threshold=self._threshold * mult,
                    multiplier=mult,
                )
            )
        return out

    def open_counts(self) -> Counter[tuple[str, str]]:
        """Open incidents per (device group, severity): the ``incidents_open`` gauge."""
        c: Counter[tuple[str, str]] = Counter()
        for inc in self.open_incidents().values():
            c[(inc.device_group, inc.severity)] += 1
        return c

    def multiplier_for(self, group: str) -> float:
        return self.multipliers.for_group(group)

    # ---- the rules

    def process(self, batch: ScoredBatch) -> IncidentOutput:
        """Apply one batch. Rows at or below a partition's applied offset are skipped."""
        out = IncidentOutput()
        n = len(batch)
        if n == 0:
            return out
        thr = batch.threshold
        self._model_name, self._threshold = batch.model_name, thr
        if self.multipliers:
            mult = np.fromiter(
                (self.multipliers.for_group(g) for g in batch.device_groups), np.float64, n
            )
            ratio = batch.scores / (thr * mult)
        else:
            mult = None
            ratio = batch.scores / thr
        anomalous = ratio > 1.0
        fresh = self._fresh_rows(batch, out)
        if fresh is not None:
            anomalous &= fresh
        devices = batch.device_ids
        # Per-row work only at anomalous readings and at readings of devices with an open
        # incident (they count towards its resolve). Any other normal reading changes
        # nothing: the window is event time, so nothing needs shifting.
        slow = {devices[j] for j in np.flatnonzero(anomalous).tolist()}
        slow.update(self._open)
        if not slow:
            return out
        if fresh is None:
            kept: Sequence[str] = devices
            index: Sequence[int] = range(n)
        else:
            index = np.flatnonzero(fresh).tolist()
            kept = [devices[j] for j in index]
        ratio_l = ratio.tolist()
        anom_l = anomalous.tolist()
        is_open = self._open.__contains__
        for j in compress(index, map(slow.__contains__, kept)):
            d = devices[j]
            if anom_l[j] or is_open(d):
                self._row(
                    out,
                    batch,
                    j,
                    d,
                    bool(anom_l[j]),
                    float(ratio_l[j]),
                    float(mult[j]) if mult is not None else 1.0,
                )
        return out

    def expire(self, watermark_ms: int, partition: int | None = None) -> IncidentOutput:
        """Resolve open incidents quiet for ``resolve_quiet_s`` before ``watermark_ms``;
        delete states that no longer matter (window and cooldown over).

        For devices that stop reporting: call it with a partition's event-time watermark
        (e.g. the largest reading time seen in it). ``resolved_at`` is last anomalous +
        ``resolve_quiet_s``, as if the device's own next reading had noticed it.
        """
        out = IncidentOutput()
        for d, st in list(self._states.items()):
            p = self._partition_of.get(d, 0)
            if partition is not None and p != partition:
                continue
            inc = st.incident
            if inc is None or inc.id == "":
                if self._stale(st, watermark_ms):
                    self._put(out, d, p, None)  # nothing left that could matter
                continue
            due = inc.last_anomalous_ms + self._quiet_ms
            if due <= watermark_ms:
                mult = self.multipliers.for_group(inc.device_group)
                self._resolve(out, d, p, st, inc, due, "quiet", inc.last_ts_ms, None, mult)
        return out

    # ---- internals

    def _fresh_rows(self, batch: ScoredBatch, out: IncidentOutput) -> npt.NDArray[np.bool_] | None:
        """Mask of rows above their partition's applied offset (None = all); advance marks."""
        parts = batch.partitions
        offs = batch.offsets
        topics = batch.topics
        keep: npt.NDArray[np.bool_] | None = None
        uniq = np.unique(parts).tolist()
        topic_set = set(topics)
        topic_arr = np.asarray(topics) if len(topic_set) > 1 else None
        for p in uniq:
            marks = self._applied.setdefault(p, {})
            pmask = parts == p
            new_marks = dict(marks)
            for t in topic_set:
                m = pmask if topic_arr is None else pmask & (topic_arr == t)
                if not m.any():
                    continue
                seen = marks.get(t, -1)
                if seen >= 0:
                    stale = m & (offs <= seen)
                    if stale.any():
                        keep = (np.ones(len(parts), bool) if keep is None else keep) & ~stale
                new_marks[t] = max(seen, int(offs[m].max()))
            if new_marks != marks:
                self._applied[p] = new_marks
                out.changed.setdefault(p, {})[APPLIED_KEY] = new_marks
        return keep

    def _stale(self, st: DeviceState, now_ms: int) -> bool:
        """True if ``st`` (no open incident) acts like no state at all from ``now_ms`` on."""
        last = st.recent[-1] if st.recent else None
        return (last is None or now_ms - last >= self._window_ms) and (
            st.cooldown_until_ms <= now_ms
        )

    def _put(self, out: IncidentOutput, d: str, p: int, st: DeviceState | None) -> None:
        if (
            st is not None
            and st.incident is None
            and not st.recent
            and (st.cooldown_until_ms <= st.last_ts_ms)
        ):
            st = None  # nothing going on: a quiet device keeps no state
        if st is not None and st.incident is not None and st.incident.id:
            self._open.add(d)
        else:
            self._open.discard(d)
        if st is None:
            if d in self._states:
                del self._states[d]
                self._partition_of.pop(d, None)
                out.changed.setdefault(p, {})[d] = None
            return
        self._states[d] = st
        self._partition_of[d] = p
        out.changed.setdefault(p, {})[d] = st

    def _row(
        self,
        out: IncidentOutput,
        b: ScoredBatch,
        j: int,
        d: str,
        is_anom: bool,
        ratio: float,
        mult: float,
    ) -> None:
        s = self.settings
        p = int(b.partitions[j])
        ts = int(b.ts_ms[j])
        off = int(b.offsets[j])
        st = self._states.get(d, _EMPTY)
        inc = st.incident
        # An open incident quiet for T before this reading resolved then; this reading is
        # then judged afresh.
        if inc is not None and inc.id and ts - inc.last_anomalous_ms >= self._quiet_ms:
            st = self._resolve(
                out, d, p, st, inc, inc.last_anomalous_ms + self._quiet_ms, "quiet", ts, b, mult
            )
            inc = None
        if not is_anom:
            if inc is None or not inc.id:
                return  # only an open incident counts normal readings
            normal = st.consecutive_normal + 1
            inc = msgspec.structs.replace(
                inc, readings=inc.readings + 1, last_ts_ms=ts, last_offset=off
            )
            st = msgspec.structs.replace(st, consecutive_normal=normal, last_ts_ms=ts, incident=inc)
            if normal >= s.resolve_normal_readings:
                self._resolve(out, d, p, st, inc, ts, "normal_readings", ts, b, mult)
            else:
                self._put(out, d, p, st)
            return
        # An anomalous reading. A candidate whose last anomalous reading left the window is
        # over: this reading starts a new stretch.
        if inc is not None and not inc.id and ts - inc.last_anomalous_ms >= self._window_ms:
            inc = None
        recent = (*st.recent, ts)[-s.min_anomalous :]
        contribs = b.contributors.get(j, ())
        if inc is None:
            inc = Incident(
                id="",
                device_group=b.device_groups[j],
                started_ms=ts,
                opened_ms=0,
                last_anomalous_ms=ts,
                last_ts_ms=ts,
                readings=1,
                anomalous=1,
                peak_ratio=ratio,
                latest_ratio=ratio,
                ratio_sum=ratio,
                severity=self._severity(ratio),
                sensors=self._merge_sensors((), contribs),
                topic=b.topics[j],
                partition=p,
                first_offset=off,
                last_offset=off,
                model_version=b.model_version,
                last_event_ms=0,
                sequence=0,
            )
        else:
            peak = max(inc.peak_ratio, ratio)
            inc = msgspec.structs.replace(
                inc,
                last_anomalous_ms=ts,
                last_ts_ms=ts,
                readings=inc.readings + 1,
                anomalous=inc.anomalous + 1,
                peak_ratio=peak,
                latest_ratio=ratio,
                ratio_sum=inc.ratio_sum + ratio,
                sensors=self._merge_sensors(inc.sensors, contribs),
                last_offset=off,
                model_version=b.model_version,
            )
        event: EventState | None = None
        if not inc.id:
            k_ok = len(recent) == s.min_anomalous and ts - recent[0] < self._window_ms
            # Duration and magnitude of the stretch: a cluster of readings just past the
            # threshold is normal for a k = 2 threshold; a sustained departure is not.
            dur_ok = (
                ts - inc.started_ms >= self._min_dur_ms
                and inc.peak_ratio >= s.min_peak_ratio
                and inc.ratio_sum >= s.min_mean_ratio * inc.anomalous
            )
            ratio_ok = s.open_ratio > 0 and ratio >= s.open_ratio
            # The cooldown damps flapping of a marginal cluster; a reading at open_ratio is
            # a fault on its own and opens even then (the demo lost a 25-79x noise burst
            # that began 5 s after the device's previous incident resolved).
            if (ts >= st.cooldown_until_ms and k_ok and dur_ok) or ratio_ok:
                inc = msgspec.structs.replace(
                    inc,
                    id=incident_id(b.model_name, d, b.topics[j], p, off),
                    opened_ms=ts,
                    severity=self._severity(inc.peak_ratio),
                )
                event = "opened"
        else:
            sev = self._severity(inc.peak_ratio)
            if sev != inc.severity:
                inc = msgspec.structs.replace(inc, severity=sev)
                event = "updated"
            elif ts - inc.last_event_ms >= self._update_ms:
                event = "updated"
        if event is not None:
            inc = msgspec.structs.replace(inc, last_event_ms=ts, sequence=inc.sequence + 1)
            out.events.append(
                IncidentEvent(
                    state=event,
                    device_id=d,
                    device_group=b.device_groups[j],
                    model_name=b.model_name,
                    incident=inc,
                    event_ms=ts,
                    threshold=b.threshold * mult,
                    multiplier=mult,
                )
            )
        st = msgspec.structs.replace(
            st, recent=recent, consecutive_normal=0, last_ts_ms=ts, incident=inc
        )
        self._put(out, d, p, st)

    def _resolve(
        self,
        out: IncidentOutput,
        d: str,
        p: int,
        st: DeviceState,
        inc: Incident,
        resolved_ms: int,
        reason: ResolveReason,
        last_ts: int,
        b: ScoredBatch | None,
        mult: float,
    ) -> DeviceState:
        inc = msgspec.structs.replace(inc, last_event_ms=resolved_ms, sequence=inc.sequence + 1)
        out.events.append(
            IncidentEvent(
                state="resolved",
                device_id=d,
                device_group=inc.device_group,
                model_name=b.model_name if b else self._model_name,
                incident=inc,
                event_ms=max(resolved_ms, last_ts),
                threshold=(b.threshold if b else self._threshold) * mult,
                multiplier=mult,
                resolved_ms=resolved_ms,
                resolve_reason=reason,
            )
        )
        new = DeviceState(
            recent=(),
            consecutive_normal=0,
            cooldown_until_ms=resolved_ms + self._cool_ms,
            last_ts_ms=max(st.last_ts_ms, last_ts),
            incident=None,
        )
        self._put(out, d, p, new)
        return new

    def _severity(self, peak_ratio: float) -> Severity:
        return "critical" if peak_ratio >= self.settings.critical_ratio else "warning"

    def _merge_sensors(
        self, current: tuple[SensorPeak, ...], contribs: Sequence[Any]
    ) -> tuple[SensorPeak, ...]:
        if not contribs:
            return current
        by = {sp.sensor: sp for sp in current}
        for c in contribs:
            old = by.get(c.sensor)
            if old is None or c.share > old.max_share:
                v = c.value
                by[c.sensor] = SensorPeak(
                    c.sensor,
                    float(c.share),
                    None if v is None or v != v else float(v),
                    float(c.expected),
                )
        # Keep a bounded, ranked list: the state stays small and the event shows the top.
        ranked = sorted(by.values(), key=lambda sp: (-sp.max_share, sp.sensor))
        return tuple(ranked[: max(self.settings.top_sensors * 2, 8)])


# ------------------------------------------------------------------------------ events out

_json = msgspec.json.Encoder()


def incident_event_doc(ev: IncidentEvent, top_sensors: int = 5) -> dict[str, Any]:
    """The published JSON document of one event (``schemas/incident-event.v1.json``)."""
    inc = ev.incident
    return {
        "schema": INCIDENT_SCHEMA,
        "incident_id": inc.id,
        "sequence": inc.sequence,
        "state": ev.state,
        "device_id": ev.device_id,
        "device_group": ev.device_group,
        "model": {"name": ev.model_name, "version": inc.model_version},
        "severity": inc.severity,
        "started_at": iso_ms(inc.started_ms),
        "started_at_ms": inc.started_ms,
        "opened_at": iso_ms(inc.opened_ms),
        "opened_at_ms": inc.opened_ms,
        "last_anomalous_at": iso_ms(inc.last_anomalous_ms),
        "last_anomalous_at_ms": inc.last_anomalous_ms,
        "resolved_at": None if ev.resolved_ms is None else iso_ms(ev.resolved_ms),
        "resolved_at_ms": ev.resolved_ms,
        "resolve_reason": ev.resolve_reason,
        "event_time_ms": ev.event_ms,
        "duration_s": ev.duration_s,
        "readings": inc.readings,
        "anomalous_readings": inc.anomalous,
        "peak_score_ratio": inc.peak_ratio,
        "latest_score_ratio": inc.latest_ratio,
        "threshold": ev.threshold,
        "threshold_multiplier": ev.multiplier,
        "top_sensors": [
            {
                "sensor": sp.sensor,
                "max_share": round(sp.max_share, 6),
                "value": sp.value,
                "expected": sp.expected,
            }
            for sp in inc.sensors[:top_sensors]
        ],
        "source": {
            "topic": inc.topic,
            "partition": inc.partition,
            "first_offset": inc.first_offset,
            "last_offset": inc.last_offset,
        },
    }


def encode_incident_event(ev: IncidentEvent, top_sensors: int = 5) -> OutputMessage:
    """The Kafka record of one event: key = device id, value = JSON."""
    return OutputMessage(
        ev.device_id.encode(), _json.encode(incident_event_doc(ev, top_sensors)), []
    )


# ------------------------------------------------------------------------------ helpers


def scored_batch_from(
    detector: Any,
    records: Sequence[Any],
    groups: Any,
    reading: Any = None,
    top: int = 5,
    min_share: float = 0.02,
    multipliers: ThresholdMultipliers | None = None,
) -> ScoredBatch:
    """Decode and score ``records`` with ``detector`` into a :class:`ScoredBatch`.

    For tests, ``score-file``-style offline runs and the evaluation, until the Scorer hands a
    ScoredBatch over itself. ``groups`` is a ``worker.events.DeviceGroups``; non-finite
    scores and undecodable records are left out (they are dead letters).
    """
    from worker.config import ReadingSettings
    from worker.decode import ReadingDecoder

    dec = ReadingDecoder(
        detector.feature_names,
        reading or ReadingSettings(max_past_s=1e12, max_future_s=1e12),
        now_ms=lambda: 0,
    )
    batch = dec.decode([r.value for r in records])
    scores = detector.score(batch.x) if batch.index else None
    if scores is None:
        s = np.empty(0)
        finite_rows: list[int] = []
    else:
        s = scores.score
        finite_rows = np.flatnonzero(np.isfinite(s)).tolist()
    thr = float(detector.threshold.value)
    devs = [batch.device_ids[j] for j in finite_rows]
    grp = [groups(d) for d in devs]
    mult = multipliers or ThresholdMultipliers([])
    eff = np.array([thr * mult.for_group(g) for g in grp])
    ss = s[finite_rows] if finite_rows else np.empty(0)
    hot = np.flatnonzero(ss > eff).tolist() if len(ss) else []
    contribs: dict[int, Sequence[Any]] = {}
    if hot:
        lists = detector.contributions_many(
            batch.x, scores, [finite_rows[i] for i in hot], top=top, min_share=min_share
        )
        contribs = dict(zip(hot, lists, strict=True))
    recs = [records[batch.index[j]] for j in finite_rows]
    return ScoredBatch(
        device_ids=devs,
        device_groups=grp,
        ts_ms=np.asarray(batch.timestamps_ms[finite_rows], dtype=np.int64),
        scores=np.asarray(ss, dtype=np.float64),
        threshold=thr,
        topics=[r.topic for r in recs],
        partitions=np.array([r.partition for r in recs], dtype=np.int64),
        offsets=np.array([r.offset for r in recs], dtype=np.int64),
        contributors=contribs,
        model_name=detector.info.name,
        model_version=detector.info.version,
    )
