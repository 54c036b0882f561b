"""``anomaly-simulate produce`` against the real broker, read back by an independent client.

Topics are created with kafka-python's admin client (broker auto-creation is off); records are
read with confluent-kafka (librdkafka), which shares no code with the producer under test.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient
from kafka import KafkaAdminClient

from simulator import cli
from simulator.fleet import ANOMALY_KINDS, FleetSpec, device_ids, feature_names, load_truth, stream

pytestmark = pytest.mark.integration

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:39092")


@pytest.fixture(scope="module")
def admin() -> Iterator[KafkaAdminClient]:
    try:
        client = KafkaAdminClient(
            bootstrap_servers=BOOTSTRAP, client_id="test-simulator", bootstrap_timeout_ms=10_000
        )
    except Exception as exc:  # whatever the failure, the fix is the same
        pytest.fail(f"no Kafka at {BOOTSTRAP} ({exc}); start it: deploy/kafka/kafka.sh start")
    yield client
    client.close()


@pytest.fixture
def topic(admin: KafkaAdminClient) -> Iterator[str]:
    """A fresh topic name, deleted afterwards if it was created."""
    name = f"simulator-{uuid.uuid4().hex[:12]}"
    yield name
    if name in admin.list_topics():
        admin.delete_topics([name])


def _read_all(topic: str, expected: int, timeout_s: float = 30.0) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value) of ``expected`` records, in per-partition offset order."""
    consumer = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[tuple[int, bytes, bytes]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                if msg.error() is not None:
                    raise KafkaException(msg.error())
                key, value = msg.key(), msg.value()
                assert key is not None and value is not None
                out.append((msg.partition(), key, value))
        # Anything beyond `expected` would be a duplicate: give it a moment to show up.
        out.extend((m.partition(), m.key(), m.value()) for m in consumer.consume(1000, timeout=1.0))
    finally:
        consumer.close()
    return out


def test_produce_delivers_the_stream_and_its_truth(
    admin: KafkaAdminClient, topic: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin.create_topics(
        {topic: {"num_partitions": 3, "replication_factor": 1}}, wait_for_metadata=True
    )
    spec = FleetSpec(devices=4, sensors=16, seed=11)
    truth_path = tmp_path / "truth.jsonl"
    fleet = ["--devices", "4", "--seed", "11", "--anomaly-fraction", "0.1"]
    kafka = ["--bootstrap", BOOTSTRAP, "--topic", topic]
    rc = cli.main(["produce", *kafka, "--per-device", "150", *fleet, "--truth", str(truth_path)])
    assert rc == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "done: 600 readings" in err and "failed=0" in err

    expected = list(stream(spec, 150, anomaly_fraction=0.1))
    records = _read_all(topic, len(expected))
    assert len(records) == len(expected)

    # Key = device id; a device's readings share one partition and keep their order.
    partitions: dict[bytes, set[int]] = defaultdict(set)
    per_device: dict[str, list[bytes]] = defaultdict(list)
    for partition, key, value in records:
        payload = json.loads(value)
        assert list(payload) == ["device_id", "timestamp", "values"]
        assert key == payload["device_id"].encode()
        assert isinstance(payload["timestamp"], int)
        assert list(payload["values"]) == feature_names(spec)
        partitions[key].add(partition)
        per_device[payload["device_id"]].append(value)
    assert sorted(partitions) == [d.encode() for d in device_ids(spec)]
    assert all(len(p) == 1 for p in partitions.values())
    for device, values in per_device.items():
        assert values == [r.to_json() for r in expected if r.device_id == device]  # byte-exact

    truth = load_truth(truth_path)
    assert truth == {(r.device_id, r.timestamp_ms): r.anomaly for r in expected if r.anomaly}
    assert set(truth.values()) == set(ANOMALY_KINDS)


def test_produce_creates_topic_and_paces(topic: str, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    kafka = ["--bootstrap", BOOTSTRAP, "--topic", topic, "--partitions", "2"]
    rc = cli.main(["produce", *kafka, "--devices", "4", "--duration", "1.5", "--rate", "400"])
    elapsed = time.monotonic() - start
    assert rc == 0, capsys.readouterr().err
    assert "done: 600 readings" in capsys.readouterr().err
    assert elapsed >= 1.4  # paced, not as fast as possible

    md = AdminClient({"bootstrap.servers": BOOTSTRAP}).list_topics(topic, timeout=10)
    assert len(md.topics[topic].partitions) == 2
    assert len(_read_all(topic, 600)) == 600


def test_produce_to_missing_topic_fails_fast(
    topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.monotonic()
    rc = cli.main(["produce", "--bootstrap", BOOTSTRAP, "--topic", topic, "--per-device", "1"])
    assert rc == 1
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert topic in err and "--partitions" in err
