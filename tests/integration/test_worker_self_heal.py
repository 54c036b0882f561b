"""A consumer that holds its partitions but fetches nothing is replaced by the loop itself.

kafka-python 3.0.12 was seen (benchmarks, make test under load) to keep an assignment with
records waiting and return nothing from ``poll`` while the broker answered (upstream
dpkp/kafka-python#3131 and #3106 describe the same symptom). Liveness fails after the stall
limit so an orchestrator restarts such a worker, but not every deployment restarts on
liveness (Docker Compose marks a container unhealthy and leaves it), so the loop re-creates
the consumer after ``max(30 s, 3 × session timeout)`` (``Worker._maybe_rejoin``).

The test runs the real loop in-process against the real broker, on the client under test,
with a consumer factory whose *first* consumer is stuck that way: it polls the broker (so it
stays a group member) and then seeks back and returns nothing. The worker must notice, build a
new consumer, and commit every reading with every event delivered.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from tests.support.detectors import save_linear_detector
from tests.support.kafka import Broker
from worker.config import load_config
from worker.loop import Worker
from worker.metrics import WorkerMetrics
from worker.model_source import ModelSource
from worker.status import WorkerStatus

pytestmark = pytest.mark.integration


class _StuckConsumer:
    """Delegates to a real consumer, but every poll's records are un-read (seek back)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.polls_with_records = 0

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        got = self._inner.poll(timeout_ms=timeout_ms, max_records=max_records)
        for tp, recs in got.items():
            self.polls_with_records += 1
            self._inner.seek(tp, recs[0].offset)
        return {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_assigned_consumer_that_fetches_nothing_is_recreated(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    spec = FleetSpec(devices=4, sensors=16, seed=11, start_ms=int(time.time() * 1000) - 300_000)
    registry = tmp_path / "registry"
    save_linear_detector(registry, normal_matrix(spec, 8000), feature_names(spec))
    topic_in, topic_out = broker.new_topic("readings", 2), broker.new_topic("anomalies")
    dlq, group = broker.new_topic("dlq"), broker.new_group()
    readings = list(stream(spec, 300, anomaly_fraction=0.05))
    broker.produce(topic_in, ((r.key(), r.to_json()) for r in readings))

    env = {
        "SENSOR_ANOMALY_KAFKA__CLIENT": kafka_client,
        "SENSOR_ANOMALY_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "SENSOR_ANOMALY_KAFKA__INPUT_TOPICS": topic_in,
        "SENSOR_ANOMALY_KAFKA__OUTPUT_TOPIC": topic_out,
        "SENSOR_ANOMALY_KAFKA__DEAD_LETTER_TOPIC": dlq,
        "SENSOR_ANOMALY_KAFKA__GROUP_ID": group,
        "SENSOR_ANOMALY_KAFKA__INSTANCE_ID": "heal-1",
        "SENSOR_ANOMALY_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "SENSOR_ANOMALY_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "SENSOR_ANOMALY_MODEL__REGISTRY": str(registry),
        "SENSOR_ANOMALY_MODEL__NAME": "sensors",
        "SENSOR_ANOMALY_READING__MAX_PAST_S": str(7 * 86400.0),
        "SENSOR_ANOMALY_HTTP__ENABLED": "false",
        "SENSOR_ANOMALY_INCIDENTS__ENABLED": "false",
    }
    cfg = load_config(env=env)
    metrics = WorkerMetrics.create(CollectorRegistry())
    health = WorkerStatus(rejoin_stuck_s=cfg.kafka.rejoin_stuck_s)
    models = ModelSource(cfg.model)
    worker = Worker(cfg, metrics, health, models, instance_id="heal-1")
    worker.set_detector(models.load_initial())
    built: list[Any] = []
    real_factory = worker._consumer_factory

    def factory(c: Any, instance_id: str) -> Any:
        consumer = real_factory(c, instance_id)
        if not built:
            consumer = _StuckConsumer(consumer)
        built.append(consumer)
        return consumer

    worker._consumer_factory = factory
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as e:  # surfaced by the assertions below
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        deadline = t0 + 120
        end = broker.end_offsets(topic_in)
        while time.monotonic() < deadline and not errors:
            committed = broker.committed(group, topic_in)
            if all(committed.get(p) == e or e == 0 for p, e in end.items()):
                break
            time.sleep(0.5)
        healed_after = time.monotonic() - t0
    finally:
        worker.stop()
        t.join(timeout=30)
    assert not errors, errors
    assert not t.is_alive(), "the worker did not stop"
    committed = broker.committed(group, topic_in)
    assert all(committed.get(p) == e or e == 0 for p, e in end.items()), (committed, end)
    assert len(built) >= 2, "the stuck consumer was never replaced"
    assert isinstance(built[0], _StuckConsumer) and built[0].polls_with_records > 0
    stuck = metrics.kafka_errors.labels(kind="FetchStuck")._value.get()
    assert stuck >= 1
    # Replaced after the limit (30 s here), not at the first empty poll.
    assert healed_after >= 30, healed_after
    events = [json.loads(m.value()) for m in broker.read_all(topic_out)]
    flagged = {(e["device_id"], e["reading_timestamp_ms"]) for e in events}
    injected = {(r.device_id, r.timestamp_ms) for r in readings if r.anomaly is not None}
    assert injected and not injected - flagged
    print(f"\n[self-heal] {kafka_client}: consumer replaced, all committed in {healed_after:.1f}s")
