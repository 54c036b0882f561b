"""Incidents through the real worker and broker, across kill -9 and a rebalance (issue 10).

The oracle replays the same input records (same topic, partition and offset, read back from
the broker) through the same Scorer and IncidentTracker offline: the incident ids are
derived from the opening reading's source offset, so a correct worker publishes exactly the
oracle's incidents — each opened once and resolved once, whatever crashed in between.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from detector import Registry, load
from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from tests.support.detectors import save_linear_detector
from tests.support.kafka import Broker
from tests.support.worker_proc import WorkerProcess, wait_until_committed, write_worker_config
from worker.config import EventSettings, ReadingSettings
from worker.incidents import IncidentSettings, IncidentTracker, incident_event_doc
from worker.pipeline import Scorer
from worker.records import SimpleRecord

pytestmark = pytest.mark.integration

INCIDENTS = {"enabled": True, "window_s": 6.0, "min_anomalous": 3, "resolve_normal_readings": 5}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("incidents")
    spec = FleetSpec(devices=6, sensors=16, seed=21)
    save_linear_detector(tmp / "registry", normal_matrix(spec, 10_000), feature_names(spec))
    return tmp / "registry"


def _cfg(tmp: Path, name: str, broker: Broker, registry: Path, t: dict[str, str], group: str,
         delivery: str) -> Path:  # fmt: skip
    return write_worker_config(
        tmp / f"{name}.yaml",
        kafka={
            "bootstrap_servers": broker.bootstrap,
            "input_topics": [t["in"]],
            "output_topic": t["out"],
            "dead_letter_topic": t["dlq"],
            "group_id": group,
            "instance_id": name,
            "delivery": delivery,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "transaction_timeout_ms": 10000,
        },
        model={"registry": str(registry), "name": "sensors", "reload_interval_s": 1.0},
        batch={"max_size": 128, "max_wait_ms": 20},
        reading={"max_past_s": 7 * 86400.0},
        incidents={**INCIDENTS, "topic": t["inc"]},
        http={"enabled": False},
    )


def _oracle(broker: Broker, topic: str, registry: Path) -> list[dict[str, Any]]:
    """Incident events computed offline from the records as the broker holds them."""
    det = load(Registry(registry).current_path("sensors"))
    scorer = Scorer(
        det,
        ReadingSettings(max_past_s=7 * 86400.0),
        EventSettings(),
        scored_batch=True,
    )
    tracker = IncidentTracker(IncidentSettings.from_mapping(INCIDENTS))
    msgs = broker.read_all(topic)
    by_part: dict[int, list[Any]] = defaultdict(list)
    for m in msgs:
        by_part[m.partition()].append(m)
    docs: list[dict[str, Any]] = []
    for p, ms in sorted(by_part.items()):
        ms.sort(key=lambda m: m.offset())
        recs = [SimpleRecord(topic, p, m.offset(), m.key(), m.value(), []) for m in ms]
        for i in range(0, len(recs), 128):
            res = scorer.process(recs[i : i + 128])
            assert res.scored_batch is not None
            out = tracker.process(res.scored_batch)
            docs.extend(incident_event_doc(ev) for ev in out.events)
    return docs


def _lifecycle(docs: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    return Counter((d["incident_id"], d["state"]) for d in docs if d["state"] != "updated")


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_incidents_survive_kill_9_and_a_rebalance(
    broker: Broker, registry: Path, tmp_path: Path, delivery: str
) -> None:
    t = {
        "in": broker.new_topic("readings", 2),
        "out": broker.new_topic("anomalies"),
        "dlq": broker.new_topic("dlq"),
        "inc": broker.new_topic("incidents"),
    }
    group = broker.new_group()
    spec = FleetSpec(devices=6, sensors=16, seed=21, start_ms=int(time.time() * 1000) - 900_000)
    readings = list(stream(spec, 600, anomaly_fraction=0.06, segment_length=25))
    third = len(readings) // 3
    chunks = [readings[:third], readings[third : 2 * third], readings[2 * third :]]

    def produce(chunk: list[Any]) -> None:
        broker.produce(t["in"], ((r.key(), r.to_json()) for r in chunk))

    a = WorkerProcess(_cfg(tmp_path, "a", broker, registry, t, group, delivery), tmp_path / "a.log")
    b: WorkerProcess | None = None
    try:
        produce(chunks[0])
        wait_until_committed(broker, group, t["in"], [a], timeout=120)
        a.kill()  # kill -9 with open incidents and state in the changelog
        produce(chunks[1])
        a = WorkerProcess(
            _cfg(tmp_path, "a", broker, registry, t, group, delivery), tmp_path / "a2.log"
        )
        time.sleep(2)
        b = WorkerProcess(
            _cfg(tmp_path, "b", broker, registry, t, group, delivery), tmp_path / "b.log"
        )
        produce(chunks[2])  # a rebalance while incidents are open
        wait_until_committed(broker, group, t["in"], [a, b], timeout=180)
    finally:
        rcs = [w.terminate() for w in (a, b) if w is not None]
    assert all(rc == 0 for rc in rcs), a.log()[-3000:]
    got = [json.loads(m.value()) for m in broker.read_all(t["inc"])]
    want = _oracle(broker, t["in"], registry)
    assert any(d["state"] == "opened" for d in want), "the scenario opened no incident"
    want_life, got_life = _lifecycle(want), _lifecycle(got)
    assert all(n == 1 for n in want_life.values())
    if delivery == "exactly_once":
        assert got_life == want_life, (got_life - want_life, want_life - got_life)
    else:
        # At least once: nothing lost, and a repeat is the identical event (same id).
        assert set(got_life) == set(want_life), (
            set(got_life) - set(want_life),
            set(want_life) - set(got_life),
        )
        by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for d in got:
            by_key[(d["incident_id"], d["state"])].append(d)
        for docs in by_key.values():
            assert all(d == docs[0] for d in docs), docs
