"""The pure incident rules: opening, updating, resolving, cooldown, ids, replay, state bytes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from tests.support.detectors import linear_detector
from worker.events import DeviceGroups
from worker.incidents import (
    APPLIED_KEY,
    Contributor,
    IncidentConfigError,
    IncidentEvent,
    IncidentSettings,
    IncidentTracker,
    ScoredBatch,
    StateDecodeError,
    decode_state,
    encode_change,
    encode_incident_event,
    encode_state,
    incident_event_doc,
    scored_batch_from,
)
from worker.records import SimpleRecord

REPO = Path(__file__).resolve().parents[2]
T0 = 1_764_201_600_000
BASE = IncidentSettings(
    window_s=5.0,
    min_anomalous=3,
    open_ratio=0.0,
    min_mean_ratio=1.0,
    resolve_normal_readings=4,
    resolve_quiet_s=30.0,
    cooldown_s=10.0,
    update_interval_s=5.0,
    critical_ratio=3.0,
)
SCHEMA = jsonschema.Draft202012Validator(
    json.loads((REPO / "schemas/incident-event.v1.json").read_text())
)

Row = tuple[str, int, float]  # device, seconds after T0, score (threshold 1 => score = ratio)


def batch(rows: Sequence[Row], first_offset: int = 0, partition: int = 0) -> ScoredBatch:
    n = len(rows)
    return ScoredBatch(
        device_ids=[r[0] for r in rows],
        device_groups=[r[0].split("-")[0] for r in rows],
        ts_ms=np.array([T0 + r[1] * 1000 for r in rows], dtype=np.int64),
        scores=np.array([r[2] for r in rows], dtype=np.float64),
        threshold=1.0,
        topics=["in"] * n,
        partitions=np.full(n, partition, dtype=np.int64),
        offsets=np.arange(first_offset, first_offset + n, dtype=np.int64),
        contributors={
            j: [
                Contributor("sensor_01", 0.7, 10.0 + r[2], 10.0),
                Contributor("sensor_02", 0.2, 1.0, 0.5),
            ]
            for j, r in enumerate(rows)
            if r[2] > 1
        },
        model_name="m",
        model_version="v1",
    )


def run(
    settings: IncidentSettings, rows: Sequence[Row], sizes: int = 10_000
) -> list[IncidentEvent]:
    tr = IncidentTracker(settings)
    out: list[IncidentEvent] = []
    for i in range(0, len(rows), sizes):
        out += tr.process(batch(rows[i : i + sizes], first_offset=i)).events
    return out


def series(dev: str, scores: Sequence[float], start_s: int = 0) -> list[Row]:
    return [(dev, start_s + i, s) for i, s in enumerate(scores)]


def kinds(events: Sequence[IncidentEvent]) -> list[str]:
    return [e.state for e in events]


def test_k_of_n_opens_at_the_kth_anomalous_reading_and_isolated_alarms_do_not() -> None:
    # Isolated false alarms: never 3 in any 5.
    quiet = series("pump-1", [2, 0, 0, 0, 2, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0])
    assert run(BASE, quiet) == []
    rows = series("pump-1", [0, 2, 0, 2, 0, 2, 2])
    ev = run(BASE, rows)
    assert kinds(ev) == ["opened"]
    inc = ev[0].incident
    assert inc.opened_ms == T0 + 5000  # third anomalous reading within 5
    assert inc.started_ms == T0 + 1000  # first anomalous reading of the stretch
    assert (inc.anomalous, inc.readings) == (3, 3)  # normal readings count from the open
    assert inc.first_offset == 1 and inc.last_offset == 5


def test_a_single_reading_far_past_the_threshold_opens_at_once() -> None:
    s = replace(BASE, open_ratio=4.0)
    assert run(s, series("pump-1", [0, 3.9, 0, 0])) == []
    ev = run(s, series("pump-1", [0, 4.0, 0, 0, 0, 0]))
    assert kinds(ev) == ["opened", "resolved"]
    assert ev[0].incident.severity == "critical"
    assert ev[1].resolve_reason == "normal_readings" and ev[1].resolved_ms == T0 + 5000


def test_a_cluster_just_past_the_threshold_does_not_open_a_sustained_departure_does() -> None:
    s = replace(BASE, min_mean_ratio=4.0, min_peak_ratio=6.0)
    assert run(s, series("pump-1", [1.2, 1.5, 1.1, 0, 1.3, 9.0])) == []  # mean 2.8 < 4
    assert run(s, series("pump-1", [5, 5, 5, 5])) == []  # mean 5 but no peak of 6
    ev = run(s, series("pump-1", [5, 5, 5, 6.5]))
    assert kinds(ev) == ["opened"] and ev[0].incident.opened_ms == T0 + 3000
    assert ev[0].incident.anomalous == 4  # the readings before the open belong to it


def test_minimum_duration_holds_the_open_back() -> None:
    s = replace(BASE, min_anomalous=1, min_duration_s=3.0)
    ev = run(s, series("pump-1", [0, 2, 2, 2, 2, 2]))
    assert kinds(ev) == ["opened"] and ev[0].incident.opened_ms == T0 + 4000


def test_resolves_after_m_normal_readings_and_counts_them() -> None:
    rows = series("pump-1", [2, 2, 2, 0, 0, 2, 0, 0, 0, 0, 0])
    ev = run(BASE, rows)
    assert kinds(ev) == ["opened", "resolved"]
    r = ev[1]
    assert r.resolved_ms == T0 + 9000 and r.resolve_reason == "normal_readings"
    assert (r.incident.readings, r.incident.anomalous) == (10, 4)
    assert r.duration_s == 9.0
    assert r.incident.last_anomalous_ms == T0 + 5000
    assert r.incident.id == ev[0].incident.id and r.incident.sequence == 2


def test_quiet_time_resolves_on_the_next_reading_or_by_watermark_with_the_same_event() -> None:
    rows = [*series("pump-1", [2, 2, 2]), ("pump-1", 100, 0.0)]
    by_reading = run(BASE, rows)
    assert kinds(by_reading) == ["opened", "resolved"]
    assert by_reading[1].resolve_reason == "quiet"
    assert by_reading[1].resolved_ms == T0 + 2000 + 30_000
    tr = IncidentTracker(BASE)
    tr.process(batch(rows[:3]))
    assert tr.expire(T0 + 31_999).events == []
    exp = tr.expire(T0 + 32_000).events
    assert len(exp) == 1
    a, b = incident_event_doc(exp[0]), incident_event_doc(by_reading[1])
    a.pop("event_time_ms"), b.pop("event_time_ms")
    assert a == b
    assert tr.open_incidents() == {}


def test_cooldown_blocks_a_reopen_then_lets_it_open() -> None:
    first = [2, 2, 2, 0, 0, 0, 0]  # opens at t=2, resolves at t=6 -> cooldown until t=16
    soon = series("pump-1", first) + series("pump-1", [2, 2, 2, 2, 0], start_s=7)
    assert kinds(run(BASE, soon)) == ["opened", "resolved"]
    late = series("pump-1", first) + series("pump-1", [2, 2, 2], start_s=16)
    ev = run(BASE, late)
    assert kinds(ev) == ["opened", "resolved", "opened"]
    assert ev[0].incident.id != ev[2].incident.id


def test_a_reading_at_open_ratio_opens_even_in_the_cooldown() -> None:
    """The demo lost a 25-79x noise burst that began 5 s after the device's previous
    incident resolved: the cooldown held back every rule. Now only the count rule waits."""
    cfg = replace(BASE, open_ratio=5.0)
    first = [2, 2, 2, 0, 0, 0, 0]  # opens at t=2, resolves at t=6 -> cooldown until t=16
    marginal = series("pump-1", first) + series("pump-1", [2, 2, 2, 2, 0], start_s=7)
    assert kinds(run(cfg, marginal)) == ["opened", "resolved"]
    strong = series("pump-1", first) + series("pump-1", [2, 6, 2, 0], start_s=8)
    ev = run(cfg, strong)
    assert kinds(ev) == ["opened", "resolved", "opened"]
    assert ev[2].event_ms - T0 == 9000  # at the 6x reading, inside the cooldown
    assert ev[0].incident.id != ev[2].incident.id


def test_updates_at_most_every_interval_and_at_once_on_escalation() -> None:
    rows = series("pump-1", [2] * 12 + [3.5, 3.6])
    ev = run(BASE, rows)
    # Opened at t=2, updates at t=7 and t=12 (interval 5 s); t=12 is also the escalation to
    # critical: one event, not two; t=13 is neither.
    assert kinds(ev) == ["opened", "updated", "updated"]
    assert [e.event_ms - T0 for e in ev] == [2000, 7000, 12000]
    assert [e.incident.severity for e in ev] == ["warning", "warning", "critical"]
    rows = series("pump-1", [2, 2, 2, 3.5])
    ev = run(BASE, rows)
    assert kinds(ev) == ["opened", "updated"] and ev[1].incident.severity == "critical"
    assert [e.incident.sequence for e in ev] == [1, 2]


def test_same_input_gives_same_events_whatever_the_batching() -> None:
    rng = np.random.default_rng(7)
    rows: list[Row] = []
    for t in range(600):
        for d in range(6):
            burst = (t // 50) % 3 == d % 3 and t % 50 < 8
            rows.append(
                (f"pump-{d}", t, float(rng.uniform(1.5, 5) if burst else rng.uniform(0, 1.2)))
            )
    s = replace(BASE, open_ratio=4.5)
    whole = [incident_event_doc(e) for e in run(s, rows)]
    assert len(whole) > 10
    for size in (1, 7, 64, 1000):
        assert [incident_event_doc(e) for e in run(s, rows, sizes=size)] == whole


def test_restore_mid_stream_and_redelivery_give_the_same_events() -> None:
    rows = series("pump-1", [0, 2, 2, 2, 2, 0, 2, 0, 0, 0, 0, 0]) + series(
        "pump-2", [2, 2, 2, 0], start_s=3
    )
    rows.sort(key=lambda r: r[1])
    reference = [incident_event_doc(e) for e in run(BASE, rows)]
    for cut in range(1, len(rows)):
        tr = IncidentTracker(BASE)
        store: dict[str, bytes] = {}
        out = tr.process(batch(rows[:cut]))
        got = [incident_event_doc(e) for e in out.events]
        for key, value in out.changed.get(0, {}).items():
            raw = encode_change(value)
            if raw is None:
                store.pop(key, None)
            else:
                store[key] = raw
        fresh = IncidentTracker(BASE)
        fresh.load_partition(0, store)
        # At-least-once: everything from offset cut-3 is delivered again.
        back = max(0, cut - 3)
        again = fresh.process(batch(rows[back:], first_offset=back)).events
        got += [incident_event_doc(e) for e in again]
        assert got == reference, f"cut at {cut}"


def test_threshold_multiplier_per_group_applies_to_rule_and_ratio() -> None:
    s = replace(BASE, threshold_multipliers=("comp.*=2.5",))
    rows = series("compressor-1", [2, 2, 2, 2]) + series("pump-1", [2, 2, 2, 2])
    ev = run(s, rows)
    assert [e.device_id for e in ev] == ["pump-1"]
    ev = run(s, series("compressor-1", [3, 3, 3]))
    assert ev[0].multiplier == 2.5 and ev[0].incident.peak_ratio == pytest.approx(1.2)
    assert ev[0].threshold == 2.5
    with pytest.raises(IncidentConfigError, match="threshold_multipliers"):
        IncidentSettings(threshold_multipliers=("pump",)).validate()
    with pytest.raises(IncidentConfigError, match="threshold_multipliers"):
        IncidentSettings(threshold_multipliers=("pump=-1",)).validate()


def test_quiet_devices_keep_no_state_and_state_bytes_round_trip() -> None:
    tr = IncidentTracker(BASE)
    out = tr.process(batch(series("pump-1", [0] * 50)))
    assert set(out.changed[0]) == {APPLIED_KEY}  # only the applied offset moved
    out = tr.process(batch(series("pump-1", [2, 0, 0, 0, 0, 0], start_s=50), first_offset=50))
    assert set(out.changed[0]) == {APPLIED_KEY, "pump-1"}  # the alarm: state written once
    assert tr.expire(T0 + 54_999).changed == {}  # still inside the 5 s window
    assert tr.expire(T0 + 55_000).changed[0]["pump-1"] is None  # left it: tombstone
    assert tr.state("pump-1") is None
    tr.process(batch(series("pump-1", [2, 2, 2, 5], start_s=60), first_offset=60))
    st = tr.state("pump-1")
    assert st is not None and st.incident is not None
    raw = encode_state(st)
    assert decode_state(raw) == st
    assert len(raw) < 300
    with pytest.raises(StateDecodeError):
        decode_state(b"\x92\x07\xc0")
    with pytest.raises(StateDecodeError):
        decode_state(b"garbage")


def test_top_sensors_keep_the_max_share_and_value_at_it() -> None:
    tr = IncidentTracker(BASE)
    b = batch(series("pump-1", [2, 2, 2]))
    contribs: dict[int, Any] = {
        0: [Contributor("a", 0.5, 1.0, 0.0)],
        1: [Contributor("a", 0.9, 7.0, 1.0), Contributor("b", 0.1, 2.0, 2.5)],
        2: [Contributor("a", 0.6, 3.0, 0.0), Contributor("b", 0.3, 4.0, 3.0)],
    }
    ev = tr.process(replace(b, contributors=contribs)).events
    top = incident_event_doc(ev[0])["top_sensors"]
    assert top == [
        {"sensor": "a", "max_share": 0.9, "value": 7.0, "expected": 1.0},
        {"sensor": "b", "max_share": 0.3, "value": 4.0, "expected": 3.0},
    ]


def test_settings_validation_names_the_key() -> None:
    with pytest.raises(IncidentConfigError, match="min_anomalous"):
        IncidentSettings(min_anomalous=65).validate()
    with pytest.raises(IncidentConfigError, match="window_s"):
        IncidentSettings(window_s=0).validate()
    with pytest.raises(IncidentConfigError, match="unknown"):
        IncidentSettings.from_mapping({"windw": 3})
    assert IncidentSettings.from_mapping({"window_s": 4, "min_anomalous": 2}).window_s == 4
    # The first version's count-based key is gone: refused with the valid keys listed.
    with pytest.raises(IncidentConfigError, match="window_s"):
        IncidentSettings.from_mapping({"window": 6})


def test_events_from_a_real_detector_validate_against_the_schema() -> None:
    spec = FleetSpec(devices=4, sensors=16, seed=3)
    det = linear_detector(normal_matrix(spec, 6000), feature_names(spec), code=4)
    readings = list(stream(spec, readings_per_device=400, anomaly_fraction=0.05))
    recs = [SimpleRecord("in", 0, i, r.key(), r.to_json(), []) for i, r in enumerate(readings)]
    sb = scored_batch_from(det, recs, DeviceGroups(r"^([A-Za-z]+)", 50))
    tr = IncidentTracker(IncidentSettings())
    events = tr.process(sb).events + tr.expire(10**15).events
    assert {"opened", "resolved"} <= {e.state for e in events}
    for e in events:
        msg = encode_incident_event(e)
        doc = json.loads(msg.value or b"")
        SCHEMA.validate(doc)
        assert msg.key == doc["device_id"].encode()
        assert doc["top_sensors"], "an incident names its sensors"


def test_schema_example_validates() -> None:
    schema = json.loads((REPO / "schemas/incident-event.v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for ex in schema["examples"]:
        SCHEMA.validate(ex)


def test_restored_open_incidents_can_be_re_announced_without_changing_state() -> None:
    tr = IncidentTracker(BASE)
    out = tr.process(batch(series("pump-1", [2, 2, 2]) + series("pump-2", [2], start_s=3)))
    store = {k: raw for k, v in out.changed[0].items() if (raw := encode_change(v)) is not None}
    fresh = IncidentTracker(BASE, model_name="m")
    assert fresh.load_partition(0, store) == 2
    (ev,) = fresh.open_incident_events(partition=0)
    assert ev.device_id == "pump-1" and ev.state == "updated" and ev.model_name == "m"
    SCHEMA.validate(incident_event_doc(ev))
    assert fresh.state("pump-1") == tr.state("pump-1")
    assert fresh.open_counts() == {("pump", "warning"): 1}
