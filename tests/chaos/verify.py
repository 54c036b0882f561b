"""The verifier: an independent client (confluent-kafka / librdkafka, ``read_committed``).

It shares no code with the worker's kafka-python client. It reads the input topic back (the
oracle's input), the event and dead-letter topics under ``read_committed``, the group's
committed offsets, and the transaction state, then counts against the oracle:

- events: lost (expected ``event_id`` never seen), duplicated (extra copies of one
  ``event_id``), inconsistent duplicates (copies whose score or reading differ), unexpected
  (an ``event_id`` the oracle does not expect, or one naming another reading);
- dead letters, keyed by source ``(partition, offset)`` from the ``__connect.errors.*``
  headers: lost, duplicated, unexpected, wrong reason;
- committed offsets vs log end of every input partition;
- hanging transactions: output partitions whose last stable offset stays below the high
  watermark after every worker stopped and the transaction timeout passed, plus transactions
  the broker still lists as ongoing (kafka-python's admin ``list_transactions``, the only
  Python client that has the API; it is used for nothing else).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.chaos.oracle import Expected
from worker.records import SimpleRecord


def _consumer(bootstrap: str, committed: bool, group: str | None = None) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group or f"chaos-verifier-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed" if committed else "read_uncommitted",
            "log_level": 0,
        }
    )


def partitions(bootstrap: str, topic: str) -> list[int]:
    md = (
        AdminClient({"bootstrap.servers": bootstrap})
        .list_topics(topic, timeout=10)
        .topics.get(topic)
    )
    if md is None or md.error is not None:
        return []
    return sorted(md.partitions)


def read_topic(
    bootstrap: str, topic: str, committed: bool = True, timeout: float = 120.0
) -> list[Any]:
    """Every record of ``topic`` up to its end (the LSO under read_committed)."""
    parts = partitions(bootstrap, topic)
    if not parts:
        return []
    c = _consumer(bootstrap, committed)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list[Any] = []
    at_eof: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(at_eof) < len(parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: no end after {timeout:.0f}s")
            for m in c.consume(num_messages=5000, timeout=0.5):
                err = m.error()
                if err is None:
                    out.append(m)
                    at_eof.discard(m.partition())
                elif err.code() == err._PARTITION_EOF:
                    at_eof.add(m.partition())
                else:
                    raise KafkaException(err)
    finally:
        c.close()
    return out


def watermarks(bootstrap: str, topic: str, committed: bool) -> dict[int, int]:
    """High watermark per partition; under read_committed librdkafka asks for the LSO."""
    parts = partitions(bootstrap, topic)
    c = _consumer(bootstrap, committed)
    try:
        return {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in parts
        }
    finally:
        c.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    parts = partitions(bootstrap, topic)
    c = _consumer(bootstrap, True, group=group)
    try:
        for attempt in range(50):
            try:
                tps = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
                return {tp.partition: tp.offset for tp in tps}
            except KafkaException as e:
                if attempt == 49 or not e.args[0].retriable():
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")
    finally:
        c.close()


def input_records(bootstrap: str, topic: str) -> list[SimpleRecord]:
    return [
        SimpleRecord(
            m.topic(), m.partition(), m.offset(), m.key(), m.value(), list(m.headers() or [])
        )
        for m in read_topic(bootstrap, topic)
    ]


def ongoing_transactions(bootstrap: str, prefix: str) -> list[str]:
    """Transactional ids starting with ``prefix`` that the broker lists as Ongoing (or in
    PrepareCommit/PrepareAbort), via kafka-python's admin client (KIP-664 ListTransactions)."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        listed = admin.list_transactions()
    finally:
        admin.close()
    out = []
    # {broker_id: [TransactionListing(transactional_id, producer_id, state)]}
    rows = [t for ts in listed.values() for t in ts] if isinstance(listed, dict) else list(listed)
    for t in rows:
        tid = str(getattr(t, "transactional_id", ""))
        state = getattr(getattr(t, "state", ""), "value", str(getattr(t, "state", "")))
        if tid.startswith(prefix) and state not in (
            "Empty",
            "CompleteCommit",
            "CompleteAbort",
            "Dead",
        ):
            out.append(f"{tid}:{state}")
    return sorted(out)


@dataclass
class Counts:
    lost: int = 0
    dup: int = 0
    dup_inconsistent: int = 0
    unexpected: int = 0
    wrong: int = 0  # dead letters: wrong reason; events: same id, other reading
    seen: int = 0
    expected: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    events: Counts
    dead: Counts
    committed_gap: int  # sum over input partitions of (log end - committed)
    committed: dict[int, int]
    log_end: dict[int, int]
    hanging: list[str]  # "topic/partition lso<hw" and ongoing transactional ids
    lso_lag_wait_s: float  # how long after the stop LSO took to reach HW
    ambiguous: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Scores are computed in float32 (detector/); a BLAS kernel may round the last bit of a row
# differently for another batch shape (seen 2026-12-02: 6.403442479944715 published,
# 6.403443085213439 from the oracle's batching, 9.5e-8 apart relative). The same reading's
# score is therefore compared to float32 precision: 1e-6 relative is 8 float32 ulps.
SCORE_REL_TOL = 1e-6


def same_score(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=SCORE_REL_TOL, abs_tol=1e-12)


def _consistent(copies: list[tuple[float, str, int]]) -> bool:
    s0, dev, ts = copies[0]
    return all((d, t) == (dev, ts) and same_score(s, s0) for s, d, t in copies[1:])


def _count_events(msgs: list[Any], exp: Expected) -> Counts:
    c = Counts(expected=len(exp.events))
    seen: dict[str, list[tuple[float, str, int]]] = {}
    for m in msgs:
        try:
            doc = json.loads(m.value())
            eid = str(doc["event_id"])
            rec = (float(doc["score"]), str(doc["device_id"]), int(doc["reading_timestamp_ms"]))
        except (ValueError, KeyError, TypeError):
            c.unexpected += 1
            c.examples.append(f"undecodable event at {m.partition()}/{m.offset()}")
            continue
        seen.setdefault(eid, []).append(rec)
    c.seen = sum(len(v) for v in seen.values())
    for eid, copies in seen.items():
        c.dup += len(copies) - 1
        if not _consistent(copies):
            c.dup_inconsistent += 1
            c.examples.append(f"inconsistent copies of {eid}: {sorted(set(copies))[:3]}")
        want = exp.events.get(eid)
        if want is None:
            if eid not in exp.ambiguous:
                c.unexpected += 1
                if len(c.examples) < 10:
                    c.examples.append(f"unexpected event {eid}")
            continue
        score, dev, ts = copies[0]
        if (dev, ts) != (want.device_id, want.timestamp_ms) or not same_score(score, want.score):
            c.wrong += 1
            if len(c.examples) < 10:
                c.examples.append(f"event {eid}: got {(dev, ts, score)}, oracle {want}")
    lost = [e for e in exp.events if e not in seen]
    c.lost = len(lost)
    if lost:
        c.examples.append(f"lost events e.g. {sorted(lost)[:5]}")
    return c


def _count_dead(msgs: list[Any], exp: Expected) -> Counts:
    c = Counts(expected=len(exp.dead))
    seen: Counter[tuple[int, int]] = Counter()
    for m in msgs:
        h = {k: v for k, v in (m.headers() or [])}
        try:
            key = (int(h["__connect.errors.partition"]), int(h["__connect.errors.offset"]))
            reason = h["sensor_anomaly.error.reason"].decode()
        except (KeyError, ValueError):
            c.unexpected += 1
            continue
        seen[key] += 1
        want = exp.dead.get(key)
        if want is None:
            c.unexpected += 1
            if len(c.examples) < 10:
                c.examples.append(f"unexpected dead letter for {key} ({reason})")
        elif seen[key] == 1 and want != reason:
            c.wrong += 1
            if len(c.examples) < 10:
                c.examples.append(f"dead letter {key}: reason {reason}, oracle {want}")
    c.seen = sum(seen.values())
    c.dup = sum(n - 1 for n in seen.values())
    lost = [k for k in exp.dead if k not in seen]
    c.lost = len(lost)
    if lost:
        c.examples.append(f"lost dead letters e.g. {sorted(lost)[:5]}")
    return c


def wait_stable(bootstrap: str, topics: list[str], timeout: float) -> tuple[list[str], float]:
    """Wait until every partition's LSO equals its high watermark; return those that never
    did ("topic/partition lso<hw") and the seconds waited."""
    t0 = time.monotonic()
    behind: list[str] = []
    while True:
        behind = []
        for t in topics:
            try:
                hw = watermarks(bootstrap, t, committed=False)
                lso = watermarks(bootstrap, t, committed=True)
            except KafkaException as e:
                behind.append(f"{t}: {e}")
                continue
            behind += [
                f"{t}/{p} lso {lso.get(p)} < hw {hw[p]}" for p in hw if lso.get(p, -1) < hw[p]
            ]
        if not behind or time.monotonic() - t0 > timeout:
            return behind, time.monotonic() - t0
        time.sleep(1.0)


def verify(
    bootstrap: str,
    exp: Expected,
    input_topic: str,
    out_topic: str,
    dlq_topic: str,
    group: str,
    txn_prefix: str | None,
    stable_timeout: float,
) -> Verdict:
    behind, waited = wait_stable(bootstrap, [out_topic, dlq_topic], stable_timeout)
    hanging = list(behind)
    if txn_prefix is not None:
        try:
            hanging += ongoing_transactions(bootstrap, txn_prefix)
        except Exception as e:  # the admin API is a second opinion; say why it is missing
            hanging.append(f"list_transactions failed: {type(e).__name__}: {e}")
    events = _count_events(read_topic(bootstrap, out_topic), exp)
    dead = _count_dead(read_topic(bootstrap, dlq_topic), exp)
    end = watermarks(bootstrap, input_topic, committed=False)
    com = committed_offsets(bootstrap, group, input_topic)
    gap = sum(max(0, e - max(com.get(p, 0), 0)) for p, e in end.items())
    return Verdict(events, dead, gap, com, end, hanging, round(waited, 1), len(exp.ambiguous))
