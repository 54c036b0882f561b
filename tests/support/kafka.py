"""Test access to the real local broker: topics, an independent client, committed offsets.

Reads and checks go through confluent-kafka (librdkafka), which shares no code with the
kafka-python client the worker uses, so a bug in one cannot hide itself.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"


def broker_answers(bootstrap: str, timeout: float = 3.0) -> bool:
    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout)
        return True
    except Exception:
        return False


@dataclass
class Broker:
    bootstrap: str
    started_here: bool

    @classmethod
    def ensure(cls) -> Broker:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:39092")
        if broker_answers(bootstrap):
            return cls(bootstrap, started_here=False)
        host, port = bootstrap.rsplit(":", 1)
        env = {
            **os.environ,
            "KAFKA_HOST": host,
            "KAFKA_PORT": port,
            "KAFKA_CONTROLLER_PORT": str(int(port) + 1),
        }
        subprocess.run([str(KAFKA_SH), "start"], check=True, env=env)
        return cls(bootstrap, started_here=True)

    def stop(self) -> None:
        if self.started_here:
            host, port = self.bootstrap.rsplit(":", 1)
            env = {
                **os.environ,
                "KAFKA_HOST": host,
                "KAFKA_PORT": port,
                "KAFKA_CONTROLLER_PORT": str(int(port) + 1),
            }
            subprocess.run([str(KAFKA_SH), "stop"], check=False, env=env)

    # -- topics ----------------------------------------------------------------------------

    def new_topic(self, prefix: str, partitions: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        fut = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )[name]
        fut.result(timeout=30)
        # Metadata propagation: wait until the topic is visible with all partitions.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            md = admin.list_topics(name, timeout=5).topics.get(name)
            if md is not None and md.error is None and len(md.partitions) == partitions:
                return name
            time.sleep(0.1)
        raise TimeoutError(f"topic {name} not visible")

    def new_group(self, prefix: str = "g") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    # -- produce / consume with the independent client ------------------------------------

    def produce(
        self,
        topic: str,
        records: Iterable[tuple[bytes | None, bytes | None]],
        headers: list[tuple[str, bytes]] | None = None,
    ) -> int:
        p = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "linger.ms": 5,
                "enable.idempotence": True,
                "message.max.bytes": 2_000_000,
            }
        )
        n = 0
        for key, value in records:
            while True:
                try:
                    p.produce(topic, key=key, value=value, headers=headers)
                    break
                except BufferError:
                    p.poll(0.05)
            n += 1
            if n % 10000 == 0:
                p.poll(0)
        remaining = p.flush(30)
        assert remaining == 0, f"{remaining} records not delivered"
        return n

    def read_all(
        self,
        topic: str,
        expect: int | None = None,
        timeout: float = 30.0,
        read_committed: bool = True,
        idle: float = 2.0,
    ) -> list[Any]:
        """Every record of ``topic`` (all partitions), waiting for ``expect`` records if given,
        otherwise until nothing new arrives for ``idle`` seconds."""
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed" if read_committed else "read_uncommitted",
            }
        )
        c.subscribe([topic])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        try:
            while time.monotonic() < deadline:
                msgs = c.consume(num_messages=1000, timeout=0.5)
                got = [m for m in msgs if m.error() is None]
                out.extend(got)
                if got:
                    last_new = time.monotonic()
                if expect is not None and len(out) >= expect:
                    break
                if expect is None and time.monotonic() - last_new > idle and out:
                    break
                if expect is None and not out and time.monotonic() - last_new > idle * 2:
                    break
        finally:
            c.close()
        return out

    def committed(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed offset per partition of ``topic`` (-1001 if none)."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        md = admin.list_topics(topic, timeout=10).topics[topic]
        c = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": group, "enable.auto.commit": False}
        )
        try:
            # A young broker may still be loading the offsets topic (NOT_COORDINATOR,
            # COORDINATOR_LOAD_IN_PROGRESS): those errors are retriable.
            for attempt in range(50):
                try:
                    tps = c.committed([TopicPartition(topic, p) for p in md.partitions], timeout=10)
                    return {tp.partition: tp.offset for tp in tps}
                except KafkaException as e:
                    if attempt == 49 or not e.args[0].retriable():
                        raise
                    time.sleep(0.2)
            raise AssertionError("unreachable")
        finally:
            c.close()

    def end_offsets(self, topic: str, committed_only: bool = True) -> dict[int, int]:
        """Each partition's end: the last stable offset (``read_committed``, the default), or
        with ``committed_only=False`` the high watermark, which counts records of open
        transactions too."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        md = admin.list_topics(topic, timeout=10).topics[topic]
        isolation = "read_committed" if committed_only else "read_uncommitted"
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "offsets-probe",
                "isolation.level": isolation,
            }
        )
        try:
            return {
                p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in md.partitions
            }
        finally:
            c.close()
