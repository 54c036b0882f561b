"""The confluent-kafka adapter's objects on the real broker: what the loop relies on.

Each check is one the loop's contract needs from a client (worker/loop.py): a poll that
returns what is there without waiting for a full batch, records grouped by partition in
offset order, commits / committed / seek / end offsets, rebalance callbacks that see the new
assignment, no group metadata for an evicted member, and topic checks that behave and speak
exactly as the kafka-python adapter's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient
from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from tests.support.kafka import Broker
from worker.clients import confluent as C
from worker.clients import kafka_python as KP
from worker.config import KafkaSettings, WorkerConfig

pytestmark = pytest.mark.integration


def _cfg(broker: Broker, topic: str, group: str, **kafka: Any) -> WorkerConfig:
    k = {
        "bootstrap_servers": broker.bootstrap,
        "input_topics": (topic,),
        "output_topic": f"{topic}-out",
        "dead_letter_topic": f"{topic}-dlq",
        "group_id": group,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        **kafka,
    }
    return WorkerConfig(kafka=KafkaSettings(**k))


class _Recorder:
    """A rebalance listener in the loop's shape (coroutines) that records what it saw."""

    def __init__(self, consumer: C.Consumer) -> None:
        self.consumer = consumer
        self.calls: list[tuple[str, list[TopicPartition], Any]] = []

    async def on_partitions_assigned(self, tps: list[TopicPartition]) -> None:
        self.calls.append(("assigned", tps, sorted(self.consumer.assignment())))

    async def on_partitions_revoked(self, tps: list[TopicPartition]) -> None:
        self.calls.append(("revoked", tps, C.membership(self.consumer)))

    async def on_partitions_lost(self, tps: list[TopicPartition]) -> None:
        self.calls.append(("lost", tps, C.membership(self.consumer)))


def _joined(c: C.Consumer, rec: _Recorder, timeout: float = 30) -> dict[TopicPartition, list[Any]]:
    got: dict[TopicPartition, list[Any]] = {}
    deadline = time.monotonic() + timeout
    while not any(k == "assigned" for k, _, _ in rec.calls):
        assert time.monotonic() < deadline, "no assignment"
        for tp, recs in c.poll(100, 100).items():
            got.setdefault(tp, []).extend(recs)
    return got


def test_poll_commit_seek_and_assignment_as_the_loop_uses_them(broker: Broker) -> None:
    topic = broker.new_topic("cfa", 2)
    broker.produce(topic, ((f"k{i}".encode(), f"v{i}".encode()) for i in range(2000)))
    cfg = _cfg(broker, topic, broker.new_group())
    c = C.build_consumer(cfg, "a")
    rec = _Recorder(c)
    assert c.partitions_for_topic(topic) == {0, 1}
    assert c.partitions_for_topic(f"{topic}-nope") is None
    assert C.membership(c) is None  # not joined yet
    c.subscribe([topic], listener=rec)
    try:
        got = _joined(c, rec)
        kind, tps, seen = rec.calls[0]
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        assert kind == "assigned" and sorted(tps) == [tp0, tp1]
        assert seen == [tp0, tp1]  # assignment() inside the callback is the new one
        assert C.membership(c) is not None and C.is_stable_member(c)
        deadline = time.monotonic() + 30
        while sum(map(len, got.values())) < 2000:
            assert time.monotonic() < deadline
            polled = c.poll(200, 300)
            assert sum(map(len, polled.values())) <= 300
            for tp, recs in polled.items():
                got.setdefault(tp, []).extend(recs)
        for tp, recs in got.items():
            assert [r.offset for r in recs] == list(range(len(recs)))
            assert all(r.topic == tp.topic and r.partition == tp.partition for r in recs)
        values = {r.value for recs in got.values() for r in recs}
        assert values == {f"v{i}".encode() for i in range(2000)}
        # Nothing more to read: poll waits its timeout and returns nothing.
        assert c.poll(300, 100) == {}
        # One new record (sent by our producer to an explicit partition, as the loop sends
        # changelog records): returned at once, not after the timeout for a full batch.
        prod = C.build_producer(cfg, "a")
        fut = prod.send(topic, key=b"late", value=b"late", partition=1)
        prod.flush(timeout=10)
        assert fut.is_done and not fut.failed()
        prod.close(timeout=1)
        t0 = time.monotonic()
        late: dict[TopicPartition, list[Any]] = {}
        while not late and time.monotonic() - t0 < 20:
            late = c.poll(20_000, 1000)
        assert [r.value for recs in late.values() for r in recs] == [b"late"]
        assert list(late) == [tp1]
        assert time.monotonic() - t0 < 19
        # Commit, read it back, rewind, and the end offsets.
        c.commit({tp0: OffsetAndMetadata(123, "", -1)}, timeout_ms=10_000)
        assert c.committed(tp0, timeout_ms=10_000) == 123
        assert c.committed(tp1, timeout_ms=10_000) is None
        ends = c.end_offsets([tp0, tp1], timeout_ms=10_000)
        assert sum(ends.values()) == 2001
        assert c.position(tp0) == ends[tp0] and c.position(tp1) == ends[tp1]
        c.seek(tp0, 10)
        again = c.poll(5000, 5)
        assert [r.offset for r in again[tp0]] == [10, 11, 12, 13, 14]
    finally:
        c.close()


def test_second_member_revokes_with_a_valid_generation_and_commit_in_callback(
    broker: Broker,
) -> None:
    topic = broker.new_topic("cfr", 2)
    broker.produce(topic, ((b"k", b"v") for _ in range(10)))
    cfg = _cfg(broker, topic, broker.new_group())
    a = C.build_consumer(cfg, "a")
    committed: list[Any] = []

    class CommitOnRevoke(_Recorder):
        async def on_partitions_revoked(self, tps: list[TopicPartition]) -> None:
            await super().on_partitions_revoked(tps)
            await a.commit_async({tp: OffsetAndMetadata(1, "", -1) for tp in tps})
            committed.extend(tps)

    rec = CommitOnRevoke(a)
    a.subscribe([topic], listener=rec)
    b = C.build_consumer(cfg, "b")
    rec_b = _Recorder(b)
    try:
        _joined(a, rec)
        b.subscribe([topic], listener=rec_b)
        deadline = time.monotonic() + 40
        while not any(k == "assigned" for k, _, _ in rec_b.calls):
            assert time.monotonic() < deadline, rec.calls
            a.poll(50, 10)
            b.poll(50, 10)
        revoked = [c for c in rec.calls if c[0] == "revoked"]
        assert revoked and revoked[0][2] is not None  # membership valid inside revoke
        assert len(committed) == 2
        assert a.committed(TopicPartition(topic, 0), timeout_ms=10_000) == 1
    finally:
        a.close()
        b.close()


def test_evicted_member_gets_on_lost_and_no_group_metadata(broker: Broker) -> None:
    """A member that stops polling past max.poll.interval.ms is evicted: the loop must see
    on_partitions_lost (never a revoke that commits) and membership() None afterwards."""
    topic = broker.new_topic("cfl", 1)
    cfg = _cfg(broker, topic, broker.new_group(), max_poll_interval_ms=6000)
    c = C.build_consumer(cfg, "z")
    rec = _Recorder(c)
    c.subscribe([topic], listener=rec)
    try:
        _joined(c, rec)
        assert C.membership(c) is not None
        time.sleep(8)  # stalled: librdkafka leaves the group after max.poll.interval.ms
        deadline = time.monotonic() + 20
        while not any(k in ("lost", "revoked") for k, _, _ in rec.calls):
            assert time.monotonic() < deadline, rec.calls
            # librdkafka may also report the exceeded poll interval as an error.
            with contextlib.suppress(KafkaError):
                c.poll(100, 10)
        kinds = [k for k, _, _ in rec.calls]
        assert "lost" in kinds and "revoked" not in kinds, kinds
        assert C.membership(c) is None and not C.is_stable_member(c)
    finally:
        c.close()


@pytest.mark.parametrize("adapter", [KP, C], ids=["kafka-python", "confluent"])
def test_topic_checks_behave_and_speak_as_the_kafka_python_adapter(
    broker: Broker, adapter: Any
) -> None:
    topic = broker.new_topic("cft", 3)
    cfg = _cfg(broker, topic, broker.new_group())
    assert adapter.ensure_topics(cfg, timeout_ms=10_000) == []
    md = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
    # Created with the input topic's partition count.
    assert len(md[f"{topic}-out"].partitions) == 3 and len(md[f"{topic}-dlq"].partitions) == 3
    no_create = dataclasses.replace(cfg.kafka, create_topics=False)
    missing = dataclasses.replace(no_create, input_topics=(f"{topic}-missing",))
    assert adapter.ensure_topics(WorkerConfig(kafka=missing), timeout_ms=10_000) == [
        f"{topic}-missing"
    ]
    no_output = dataclasses.replace(no_create, output_topic=f"{topic}-x")
    with pytest.raises(KP.StartupError) as e:
        adapter.ensure_topics(WorkerConfig(kafka=no_output), timeout_ms=10_000)
    assert str(e.value) == (
        f"output topic(s) {topic}-x do not exist; create them or set kafka.create_topics: true"
    )
