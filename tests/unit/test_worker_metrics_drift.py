"""Drift and incident metrics: real Scorer / IncidentTracker output into a real registry."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.unit.test_worker_pipeline_memory import SPEC, _readings, _records, windowed_detector
from worker.alertmanager import AlertmanagerHooks
from worker.config import EventSettings, ReadingSettings
from worker.incidents import IncidentSettings, IncidentTracker
from worker.metrics import ScoreRatioPsi, WorkerMetrics
from worker.pipeline import Scorer
from worker.records import SimpleRecord


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(f"sensor_anomaly_{name}", labels)
    return 0.0 if v is None else v


def _drifted(readings: list[Any], sensor: str, shift: float, offset0: int) -> list[SimpleRecord]:
    out = []
    for i, r in enumerate(readings):
        doc = json.loads(r.to_json())
        doc["values"][sensor] += shift
        out.append(SimpleRecord("in", 0, offset0 + i, None, json.dumps(doc).encode(), []))
    return out


def test_drift_metrics_move_when_normal_data_drifts_out_of_range() -> None:
    det = windowed_detector(1)
    reg = CollectorRegistry()
    m = WorkerMetrics.create(reg, ScoreRatioPsi(window=600, reference=600, min_readings=200))
    scorer = Scorer(det, ReadingSettings(), EventSettings())
    normal = _readings(400, 0.0)  # 1600 normal readings
    results = []
    for i in range(0, len(normal), 100):
        res = scorer.process(_records(normal[i : i + 100]))
        m.on_drift(res)
        results.append(res)
    lbl = {"model": "win", "device_group": "pump"}
    n0 = _value(reg, "drift_readings_total", **lbl)
    assert n0 == len(normal)
    oor0 = _value(reg, "drift_out_of_range_readings_total", **lbl)
    above0 = _value(reg, "drift_above_threshold_readings_total", **lbl)
    assert oor0 == sum(sum(r.out_of_range_by_group.values()) for r in results)
    assert above0 == sum(sum(r.above_threshold_by_group.values()) for r in results)
    assert oor0 / n0 < 0.05  # normal readings stay (nearly) inside the training range
    expected = _value(reg, "drift_expected_above_threshold_ratio", model="win")
    assert expected == pytest.approx(det.threshold.exceed_rate)
    psi_normal = _value(reg, "drift_score_ratio_psi", **lbl)
    assert 0 <= psi_normal < 0.1

    # Slow drift: one sensor moves 1.5 training ranges above its training max.
    span = float(det.train_max[2] - det.train_min[2])  # type: ignore[index]
    later = _readings(200, 0.0)
    drifted = _drifted(later, "sensor_02", 1.5 * span, 10_000)
    for i in range(0, len(drifted), 100):
        m.on_drift(scorer.process(drifted[i : i + 100]))
    n1 = _value(reg, "drift_readings_total", **lbl) - n0
    oor1 = _value(reg, "drift_out_of_range_readings_total", **lbl) - oor0
    above1 = _value(reg, "drift_above_threshold_readings_total", **lbl) - above0
    assert n1 == len(drifted)
    assert oor1 == n1  # every drifted reading is out of range
    assert above1 / n1 > 5 * max(expected, above0 / n0)
    assert _value(reg, "drift_score_ratio_psi", **lbl) > 0.25
    text = generate_latest(reg).decode()
    assert 'sensor_anomaly_drift_score_ratio_psi{device_group="pump",model="win"}' in text


def test_psi_reference_window_and_version_reset() -> None:
    rng = np.random.default_rng(0)
    psi = ScoreRatioPsi(bins=10, window=2000, reference=2000, min_readings=1000)
    same = [psi.observe("m", "v1", "g", rng.gamma(2, 0.3, 500)) for _ in range(10)]
    assert same[:3] == [None, None, None]  # reference being frozen (4 batches), then < min
    assert all(v is not None and v < 0.05 for v in same[6:])
    shifted = [psi.observe("m", "v1", "g", rng.gamma(2, 0.6, 500)) for _ in range(5)]
    assert shifted[-1] is not None and shifted[-1] > 0.25
    # A new version of the model: a new reference, no value until it is frozen.
    assert psi.observe("m", "v2", "g", rng.gamma(2, 0.6, 500)) is None


def test_warming_up_readings_are_counted() -> None:
    det = windowed_detector(4)
    reg = CollectorRegistry()
    m = WorkerMetrics.create(reg)
    res = Scorer(det, ReadingSettings(), EventSettings()).process(_records(_readings(10, 0.0)))
    m.on_drift(res)
    lbl = {"model": "win", "device_group": "pump"}
    assert _value(reg, "readings_warming_up_total", **lbl) == SPEC.devices * 3
    assert _value(reg, "drift_readings_total", **lbl) == SPEC.devices * 7


def test_incident_metrics_from_real_tracker_events() -> None:
    det = windowed_detector(1, ranges=False)
    reg = CollectorRegistry()
    m = WorkerMetrics.create(reg)
    scorer = Scorer(det, ReadingSettings(), EventSettings(), scored_batch=True)
    tracker = IncidentTracker(IncidentSettings())
    readings = _readings(300, 0.05)
    opened = resolved = 0
    durations: list[float] = []
    peak_open = 0
    for i in range(0, len(readings), 64):
        res = scorer.process(_records(readings[i : i + 64]))
        assert res.scored_batch is not None
        out = tracker.process(res.scored_batch)
        m.on_incidents(out.events, tracker.open_counts())
        opened += sum(e.state == "opened" for e in out.events)
        resolved += sum(e.state == "resolved" for e in out.events)
        durations += [e.duration_s for e in out.events if e.state == "resolved"]
        now_open = sum(tracker.open_counts().values())
        peak_open = max(peak_open, now_open)
        got = sum(
            _value(reg, "incidents_open", device_group=g, severity=s)
            for g, s in tracker.open_counts()
        )
        assert got == now_open
    assert opened >= 1, "5 % injected anomalies must open an incident"
    total_opened = sum(
        _value(reg, "incidents_opened_total", device_group="pump", severity=s)
        for s in ("warning", "critical")
    )
    total_resolved = sum(
        _value(reg, "incidents_resolved_total", device_group="pump", reason=r)
        for r in ("normal_readings", "quiet")
    )
    assert (total_opened, total_resolved) == (opened, resolved)
    assert _value(reg, "incident_duration_seconds_count") == resolved
    assert _value(reg, "incident_duration_seconds_sum") == pytest.approx(sum(durations))
    # Everything resolved in the end → every gauge that was set reads 0.
    m.on_incidents([], {})
    for s in ("warning", "critical"):
        assert _value(reg, "incidents_open", device_group="pump", severity=s) == 0


def test_alertmanager_hooks_feed_the_metrics() -> None:
    reg = CollectorRegistry()
    m = WorkerMetrics.create(reg)
    hooks = AlertmanagerHooks(**m.alertmanager_hooks())
    hooks.on_post(True, 3)
    hooks.on_post(False, 1)
    hooks.on_dropped(2)
    hooks.on_queue_depth(7)
    hooks.on_active(4)
    assert _value(reg, "alertmanager_posts_total", outcome="ok") == 1
    assert _value(reg, "alertmanager_posts_total", outcome="error") == 1
    assert _value(reg, "alertmanager_dropped_total") == 2
    assert _value(reg, "alertmanager_queue_depth") == 7
    assert _value(reg, "alertmanager_active_alerts") == 4
