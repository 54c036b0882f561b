"""Group joins per start: plain ``KafkaConsumer`` vs the worker's kafka-python consumer.

    python scripts/bench_joins.py [--starts 10] [--watch-s 4]

Each start is a new consumer in a new group on a 4-partition topic whose metadata the
consumer has already loaded (as ``Worker._await_input_metadata`` does), then
``subscribe()`` and ``poll()`` for ``--watch-s`` seconds. It counts the assignments the
rebalance listener sees and the time from ``subscribe()`` to the last one (seconds,
monotonic clock). Plain kafka-python 3.0.12 rejoins right after its first assignment (a
stale metadata snapshot; ``docs/reliability.md``, "two joins at every start"); the
adapter's ``_Consumer`` should be assigned once. Plain and adapter starts alternate, so
machine load drifts hit both. Needs the broker at ``$KAFKA_BOOTSTRAP`` (127.0.0.1:39092).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
from kafka import KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from worker.clients.kafka_python import _Consumer


class _Recorder(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.assigned_at: list[float] = []

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.assigned_at.append(time.monotonic())


def one_start(cls: type, topic: str, group: str, watch_s: float) -> tuple[int, float | None]:
    """(assignments seen, seconds from subscribe() to the last one)."""
    c = cls(bootstrap_servers=bench.BOOTSTRAP.split(","), group_id=group, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + 15
        while not c.partitions_for_topic(topic):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no metadata for {topic}")
            time.sleep(0.05)
        rec = _Recorder()
        t0 = time.monotonic()
        c.subscribe([topic], listener=rec)
        while time.monotonic() < t0 + watch_s:
            c.poll(timeout_ms=100)
        last = rec.assigned_at[-1] - t0 if rec.assigned_at else None
        return len(rec.assigned_at), last
    finally:
        c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--starts", type=int, default=10, help="starts of each consumer")
    p.add_argument("--watch-s", type=float, default=4.0, help="seconds watched per start")
    a = p.parse_args()
    kafka = bench.Kafka(bench.BOOTSTRAP, f"joins-{uuid.uuid4().hex[:8]}")
    results: dict[str, list[tuple[int, float | None]]] = {"plain": [], "adapter": []}
    try:
        topic = kafka.topic("in", bench.PARTITIONS)
        for i in range(a.starts):
            for name, cls in (("plain", KafkaConsumer), ("adapter", _Consumer)):
                results[name].append(one_start(cls, topic, kafka.group(name), a.watch_s))
            print(f"start {i + 1}/{a.starts}", file=sys.stderr)
    finally:
        kafka.cleanup()
    print(
        "| consumer | starts | assigned once | assigned twice or more "
        "| s to final assignment (median / max) |"
    )
    print("|---|--:|--:|--:|--:|")
    for name, xs in results.items():
        once = sum(1 for n, _ in xs if n == 1)
        more = sum(1 for n, _ in xs if n > 1)
        last = [d for _, d in xs if d is not None]
        span = f"{statistics.median(last):.3f} / {max(last):.3f}" if last else "never assigned"
        label = "plain `KafkaConsumer`" if name == "plain" else "worker's `_Consumer`"
        print(f"| {label} | {len(xs)} | {once} | {more} | {span} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
