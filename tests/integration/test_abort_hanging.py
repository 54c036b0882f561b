"""``ClientAdapter.abort_hanging`` on the real broker, with each client's producer.

The exactly-once reset calls it right after ``init_transactions`` to abort a transaction of
its producer id that a broker restart left open on an output partition (chaos broker_kill;
docs/reliability.md). That situation needs a broker SIGKILL at the right moment, so this
test builds the same broker-side state directly: a transaction of the worker's producer id
with records on two partitions, open, and nothing else to end it. What must hold:

- the sweep finds and aborts exactly the partitions that hold open records, and nothing
  when there are none;
- afterwards the last stable offset has moved past them: a record written later becomes
  visible to a ``read_committed`` reader, and the abandoned records never do.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from confluent_kafka import Producer

from tests.support.kafka import Broker
from worker.clients import adapter_for
from worker.config import KafkaSettings, WorkerConfig

pytestmark = pytest.mark.integration


def _cfg(broker: Broker, topic: str, client: str) -> WorkerConfig:
    return WorkerConfig(
        kafka=KafkaSettings(
            bootstrap_servers=broker.bootstrap,
            input_topics=(f"{topic}-in",),
            output_topic=topic,
            dead_letter_topic=f"{topic}-dlq",
            group_id=broker.new_group(),
            delivery="exactly_once",
            instance_id=f"hang-{uuid.uuid4().hex[:6]}",
            client=client,
        )
    )


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_open_transaction_of_our_producer_id_is_aborted(broker: Broker, client: str) -> None:
    topic = broker.new_topic("hang", 3)
    cfg = _cfg(broker, topic, client)
    adapter = adapter_for(cfg)
    producer: Any = adapter.build_producer(cfg)
    try:
        producer.init_transactions()
        # Right after init_transactions nothing of ours is open: the sweep finds nothing.
        assert adapter.abort_hanging(cfg, producer, [topic]) == []

        producer.begin_transaction()
        for i in range(10):
            producer.send(topic, value=f"abandoned-{i}".encode(), key=b"k", partition=i % 2)
        producer.flush()

        aborted = adapter.abort_hanging(cfg, producer, [topic])
        assert sorted(aborted) == [f"{topic}/0@0", f"{topic}/1@0"]
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
