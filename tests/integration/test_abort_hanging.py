"""``ClientAdapter.abort_hanging`` on the real broker, with each client's producer.

The exactly-once reset calls it right after ``init_transactions`` to abort a transaction of
its producer id that a broker restart left open on an output partition (chaos broker_kill;
docs/reliability.md). That situation needs a broker SIGKILL at the right moment, so this
test builds the same broker-side state directly: a transaction of the worker's producer id
with records on two partitions, open, and nothing else to end it. What must hold:

- the sweep finds and aborts exactly the partitions that hold open records, and the
  group's partition of ``__consumer_offsets`` that holds the transaction's offsets, and
  nothing when there are none;
- before the sweep the group's committed offsets cannot be read by a ``read_committed``
  consumer (librdkafka's ``committed()`` asks for stable offsets and times out: the
  confluent worker and the verifier were stuck so in chaos broker_kill);
- afterwards the last stable offset has moved past the records: a record written later
  becomes visible to a ``read_committed`` reader, the abandoned records never do, and the
  group's offsets are readable again (none: the offsets were aborted).
"""

from __future__ import annotations

import uuid
from typing import Any

import confluent_kafka as ck
import pytest
from confluent_kafka import Producer
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from tests.support.kafka import Broker
from worker.clients import adapter_for
from worker.config import KafkaSettings, WorkerConfig

pytestmark = pytest.mark.integration


def _cfg(broker: Broker, topic: str, source: str, client: str) -> WorkerConfig:
    return WorkerConfig(
        kafka=KafkaSettings(
            bootstrap_servers=broker.bootstrap,
            input_topics=(source,),
            output_topic=topic,
            dead_letter_topic=f"{topic}-dlq",
            group_id=broker.new_group(),
            delivery="exactly_once",
            # Far past the test's own waits: the broker must not end the open transaction
            # on its timeout before the sweep does (the point is that only the sweep ends it).
            transaction_timeout_ms=300_000,
            instance_id=f"hang-{uuid.uuid4().hex[:6]}",
            client=client,
        )
    )


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_open_transaction_of_our_producer_id_is_aborted(broker: Broker, client: str) -> None:
    topic = broker.new_topic("hang", 3)
    source = broker.new_topic("hang-in", 1)
    cfg = _cfg(broker, topic, source, client)
    group = cfg.kafka.group_id
    adapter = adapter_for(cfg)
    producer: Any = adapter.build_producer(cfg)
    try:
        producer.init_transactions()
        # Right after init_transactions nothing of ours is open: the sweep finds nothing.
        assert adapter.abort_hanging(cfg, producer, [topic]) == []

        producer.begin_transaction()
        for i in range(10):
            producer.send(topic, value=f"abandoned-{i}".encode(), key=b"k", partition=i % 2)
        _add_offsets(broker, cfg, producer, source)
        producer.flush()
        assert _committed(broker, source, group) is None  # not readable while open

        aborted = adapter.abort_hanging(cfg, producer, [topic])
        # The offsets topic has one partition on the test broker; its first offset varies.
        assert sorted(a for a in aborted if not a.startswith("__consumer_offsets/")) == [
            f"{topic}/0@0",
            f"{topic}/1@0",
        ]
        assert len([a for a in aborted if a.startswith("__consumer_offsets/0@")]) == 1
        # A second sweep finds nothing left open.
        assert adapter.abort_hanging(cfg, producer, [topic]) == []
    finally:
        adapter.discard_producer(producer, 10.0)

    # Written after the abandoned records: read_committed shows it only once the open
    # transaction no longer holds the last stable offset back.
    plain = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    for part in (0, 1):
        plain.produce(topic, value=f"after-{part}".encode(), partition=part)
    assert plain.flush(30) == 0
    got = broker.read_all(topic, timeout=30, idle=3.0)
    values = sorted(m.value() for m in got)
    assert values == [b"after-0", b"after-1"]
    assert _committed(broker, source, group) == -1001  # readable; nothing committed


def _add_offsets(broker: Broker, cfg: WorkerConfig, producer: Any, source: str) -> None:
    """Put offset 5 of ``source``/0 for the worker's group into the open transaction,
    through the adapter, as the loop does (group metadata: the bare group id for
    kafka-python, a not-joined consumer's metadata for librdkafka)."""
    adapter = adapter_for(cfg)
    offsets = {TopicPartition(source, 0): OffsetAndMetadata(5, "", -1)}
    group = cfg.kafka.group_id
    if cfg.kafka.client == "kafka-python":
        adapter.send_offsets_to_transaction(producer, offsets, group, 30.0)
        return
    meta = ck.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        adapter.send_offsets_to_transaction(producer, offsets, meta.consumer_group_metadata(), 30.0)
    finally:
        meta.close()


def _committed(broker: Broker, source: str, group: str) -> int | None:
    """The group's committed offset of ``source``/0 as a read_committed consumer sees it
    (librdkafka: stable offsets only), or None if that read times out."""
    c = ck.Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        got = c.committed([ck.TopicPartition(source, 0)], timeout=8)
        return int(got[0].offset)
    except ck.KafkaException:
        return None
    finally:
        c.close()
