"""Drift signals move when drifted normal data flows through the real worker (issue 11).

Normal readings first, then the same fleet with one sensor shifted by three training ranges
(slow drift taken to its end): the out-of-range counter follows the drifted readings exactly,
the above-threshold share leaves the holdout's expected share behind, and ``/readyz`` shows
``drift.state == "drifting"`` while the worker stays ready.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from detector import Registry
from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from tests.support.detectors import linear_detector
from tests.support.kafka import Broker
from tests.support.worker_proc import (
    WorkerProcess,
    free_port,
    wait_until_committed,
    write_worker_config,
)

pytestmark = pytest.mark.integration


def _samples(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                total += s.value
    return total


def test_drift_metrics_and_readyz_follow_drifted_normal_data(
    broker: Broker, tmp_path: Path
) -> None:
    spec = FleetSpec(devices=4, sensors=16, seed=31)
    x, names = normal_matrix(spec, 12_000), feature_names(spec)
    det = linear_detector(x, names, ranges=True)
    Registry(tmp_path / "registry").save(det)
    span = float(det.train_max[0] - det.train_min[0])  # type: ignore[index]
    topics = {"in": broker.new_topic("readings", 2), "out": broker.new_topic("anomalies")}
    topics["dlq"] = broker.new_topic("dlq")
    group = broker.new_group()
    port = free_port()
    cfg = write_worker_config(
        tmp_path / "w.yaml",
        kafka={
            "bootstrap_servers": broker.bootstrap,
            "input_topics": [topics["in"]],
            "output_topic": topics["out"],
            "dead_letter_topic": topics["dlq"],
            "group_id": group,
            "instance_id": "drift-1",
        },
        model={"registry": str(tmp_path / "registry"), "name": "sensors"},
        reading={"max_past_s": 7 * 86400.0},
        http={"enabled": True, "port": port},
    )
    # On the simulator's 7-hour grid (the least common multiple of its latents' periods), so
    # the readings are the same on every run: with a start at an arbitrary time of day, 44
    # of the 1,200 normal readings once fell outside the training range (the sinusoids'
    # phase), failing the "normal part stays inside" check below.
    grid = 7 * 3600 * 1000
    start = (int(time.time() * 1000) - 2_000_000) // grid * grid
    normal = list(stream(FleetSpec(devices=4, sensors=16, seed=31, start_ms=start), 300))
    drifted = []
    for r in stream(FleetSpec(devices=4, sensors=16, seed=31, start_ms=start + 400_000), 300):
        doc = json.loads(r.to_json())
        doc["values"][names[0]] += 3 * span
        drifted.append((r.key(), json.dumps(doc).encode()))
    w = WorkerProcess(cfg, tmp_path / "w.log")
    try:
        broker.produce(topics["in"], ((r.key(), r.to_json()) for r in normal))
        wait_until_committed(broker, group, topics["in"], [w])
        time.sleep(0.5)
        oor_before = _samples(port, "sensor_anomaly_drift_out_of_range_readings_total")
        scored_before = _samples(port, "sensor_anomaly_drift_readings_total")
        above_before = _samples(port, "sensor_anomaly_drift_above_threshold_readings_total")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            assert json.loads(r.read())["drift"]["state"] == "ok"
        broker.produce(topics["in"], drifted)
        wait_until_committed(broker, group, topics["in"], [w])
        time.sleep(0.5)
        oor = _samples(port, "sensor_anomaly_drift_out_of_range_readings_total") - oor_before
        scored = _samples(port, "sensor_anomaly_drift_readings_total") - scored_before
        above = _samples(port, "sensor_anomaly_drift_above_threshold_readings_total") - above_before
        expected = _samples(port, "sensor_anomaly_drift_expected_above_threshold_ratio")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            ready = json.loads(r.read())
    finally:
        assert w.terminate() == 0, w.log()[-3000:]
    assert scored == len(drifted)
    assert oor == len(drifted), (oor, len(drifted))  # every drifted reading is out of range
    assert oor_before <= 0.01 * len(normal)  # the normal part stayed inside (sampling edge)
    assert above / scored > 5 * expected, (above / scored, expected)
    assert ready["ok"] and ready["drift"]["state"] == "drifting", ready
