"""The incident state store against the real broker: changelog write, restore, size and time.

Writes go through kafka-python's transactional producer (the worker's client); one
transaction is aborted on purpose, and the restore (``read_committed``) must not bring its
state back. Figures (state bytes per device, restore seconds per 10k devices) are printed
(`pytest -s`) and recorded in docs/incidents.md.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient

from tests.support.kafka import Broker
from worker.incidents import (
    APPLIED_KEY,
    Contributor,
    IncidentSettings,
    IncidentTracker,
    ScoredBatch,
    decode_state,
    encode_change,
)
from worker.state import ChangelogError, StateStore, ensure_changelog_topic

pytestmark = pytest.mark.integration

DEVICES = 10_000
PARTITIONS = 2


def _consumer(bootstrap: str) -> Any:
    return lambda: KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )


def _confluent_reader(bootstrap: str) -> Any:
    from worker.clients import confluent
    from worker.config import load_config

    cfg = load_config(env={"SENSOR_ANOMALY_KAFKA__BOOTSTRAP_SERVERS": bootstrap})
    return confluent.build_restore_consumer(cfg)


def _states(devices: list[str], partition: int) -> dict[str, bytes]:
    """Realistic states: half the devices in an open incident naming 5 sensors, half with a
    candidate (one anomalous reading in the window)."""
    tr = IncidentTracker(IncidentSettings(open_ratio=0.0, min_anomalous=3, min_mean_ratio=1.0))
    n = len(devices)
    out: dict[str, bytes] = {}
    five = [Contributor(f"sensor_{k:02d}", 0.3 - 0.05 * k, 41.25 + k, 40.5) for k in range(5)]
    for step in range(4):
        b = ScoredBatch(
            device_ids=devices,
            device_groups=["pump"] * n,
            ts_ms=np.full(n, 1_764_201_600_000 + step * 1000, dtype=np.int64),
            # Even devices: 4 anomalous readings (open incident); odd: one (a candidate).
            scores=np.array([2.0 if (i % 2 == 0 or step == 0) else 0.1 for i in range(n)]),
            threshold=1.0,
            topics=["in"] * n,
            partitions=np.full(n, partition, dtype=np.int64),
            offsets=np.arange(step * n, (step + 1) * n, dtype=np.int64),
            contributors={i: five for i in range(n) if i % 2 == 0 or step == 0},
            model_name="sensors",
            model_version="v0001",
        )
        for key, value in tr.process(b).changed.get(partition, {}).items():
            raw = encode_change(value)
            if raw is None:
                out.pop(key, None)
            else:
                out[key] = raw
    return out


def test_changelog_restore_round_trip_size_and_time(broker: Broker) -> None:
    bootstrap = broker.bootstrap
    topic = f"test-incident-state-{uuid.uuid4().hex[:10]}"

    def admin() -> KafkaAdminClient:
        return KafkaAdminClient(bootstrap_servers=bootstrap)

    assert ensure_changelog_topic(admin, topic, PARTITIONS) is True
    assert ensure_changelog_topic(admin, topic, PARTITIONS) is False  # idempotent
    with pytest.raises(ChangelogError, match="partitions"):
        ensure_changelog_topic(admin, topic, PARTITIONS + 2)

    store = StateStore()
    expected: dict[int, dict[str, bytes]] = {}
    for p in range(PARTITIONS):
        store.assign(p)
        devs = [f"pump-{p}-{i:05d}" for i in range(DEVICES)]
        for k, v in _states(devs, p).items():
            store.put(p, k, v)
        expected[p] = dict(store.items(p))
    # A key overwritten and a key deleted after an earlier flush: compaction's last wins.
    store.put(0, "gone-later", b"x")

    producer = KafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"t-{uuid.uuid4().hex[:8]}", linger_ms=5
    )
    producer.init_transactions()
    try:
        producer.begin_transaction()
        for p in range(PARTITIONS):
            for key, value in store.changelog_records(p):
                producer.send(topic, key=key, value=value, partition=p)
        producer.commit_transaction()
        for p in range(PARTITIONS):
            store.mark_flushed(p)
        store.put(0, "gone-later", None)
        store.put(0, "pump-0-00000", expected[0]["pump-0-00001"])
        expected[0]["pump-0-00000"] = expected[0]["pump-0-00001"]
        producer.begin_transaction()
        for key, value in store.changelog_records(0):
            producer.send(topic, key=key, value=value, partition=0)
        producer.commit_transaction()
        store.mark_flushed(0)
        # An aborted transaction: its state must not come back.
        producer.begin_transaction()
        producer.send(topic, key=b"pump-0-00002", value=b"aborted", partition=0)
        producer.send(topic, key=b"ghost", value=b"aborted", partition=0)
        producer.flush()
        producer.abort_transaction()
    finally:
        producer.close()

    for p in range(PARTITIONS):
        fresh = StateStore()
        stats = fresh.restore(_consumer(bootstrap), topic, p)
        assert dict(fresh.items(p)) == expected[p]
        assert fresh.changelog_records(p) == []  # a restore is not a change
        keys, size = fresh.size(p)
        assert stats.keys == keys == len(expected[p])
        opened = sum(
            1
            for k, v in expected[p].items()
            if k != APPLIED_KEY and (s := decode_state(v)).incident and s.incident.id
        )
        print(
            f"\n[state] partition {p}: {stats.records} changelog records -> {keys} keys, "
            f"{size / 1e6:.2f} MB ({size / max(keys, 1):.0f} B/key, {opened} open incidents), "
            f"restored in {stats.seconds:.2f} s"
        )
        assert opened == DEVICES // 2 - (p == 0)  # pump-0-00000 took a candidate state
        # The confluent adapter's reader (librdkafka) restores the same state.
        ck = StateStore()
        ck_stats = ck.restore(lambda: _confluent_reader(bootstrap), topic, p)
        assert dict(ck.items(p)) == expected[p]
        print(f"[state] partition {p}: confluent reader restored it in {ck_stats.seconds:.2f} s")
    # Restoring a partition the changelog does not have is a clear error, not a hang.
    with pytest.raises(ChangelogError, match="no partition 7"):
        StateStore().restore(_consumer(bootstrap), topic, 7)


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_each_client_creates_checks_and_restores_the_changelog(broker: Broker, client: str) -> None:
    """The worker reads and creates its changelog with its own Kafka library
    (``kafka.client``): both adapters give the same restore, including a partition that ends
    with an aborted transaction's marker and one that ends with a commit marker (librdkafka's
    position never reaches such an end by counting messages)."""
    from worker.clients import adapter_for
    from worker.config import load_config

    cfg = load_config(
        env={
            "SENSOR_ANOMALY_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
            "SENSOR_ANOMALY_KAFKA__CLIENT": client,
            "SENSOR_ANOMALY_KAFKA__GROUP_ID": f"g-{uuid.uuid4().hex[:8]}",
        }
    )
    adapter = adapter_for(cfg)
    topic = f"test-changelog-{client}-{uuid.uuid4().hex[:8]}"
    assert adapter.ensure_changelog(cfg, topic, 2) is True
    assert adapter.ensure_changelog(cfg, topic, 2) is False
    with pytest.raises(ChangelogError, match="has 2 partitions, the input has 3"):
        adapter.ensure_changelog(cfg, topic, 3)
    plain = f"{topic}-plain"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        from kafka.admin import NewTopic

        admin.create_topics([NewTopic(plain, 1, 1)])
    finally:
        admin.close()
    with pytest.raises(ChangelogError, match=r"cleanup\.policy=delete"):
        adapter.ensure_changelog(cfg, plain, 1)

    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap, transactional_id=f"t-{uuid.uuid4().hex[:8]}"
    )
    producer.init_transactions()
    try:
        producer.begin_transaction()
        for i in range(500):
            producer.send(topic, key=f"d{i % 50}".encode(), value=f"v{i}".encode(), partition=0)
            producer.send(topic, key=f"e{i % 7}".encode(), value=f"w{i}".encode(), partition=1)
        producer.send(topic, key=b"d3", value=None, partition=0)  # a tombstone
        producer.commit_transaction()
        producer.begin_transaction()
        producer.send(topic, key=b"d1", value=b"aborted", partition=0)
        producer.send(topic, key=b"ghost", value=b"aborted", partition=0)
        producer.flush()
        producer.abort_transaction()
    finally:
        producer.close()

    expected0 = {f"d{i}": f"v{450 + i}".encode() for i in range(50) if i != 3}
    expected1 = {f"e{i}": f"w{max(j for j in range(500) if j % 7 == i)}".encode() for i in range(7)}
    for p, want in ((0, expected0), (1, expected1)):
        store = StateStore()
        stats = store.restore(lambda: adapter.build_restore_consumer(cfg), topic, p, timeout_s=30)
        assert dict(store.items(p)) == want
        assert stats.keys == len(want)
    with pytest.raises(ChangelogError, match="no partition 5"):
        StateStore().restore(lambda: adapter.build_restore_consumer(cfg), topic, 5)
