"""The expected outputs, computed offline with the worker's own scoring path.

The oracle scores the records that are actually in the input topic (read back with the
independent client, so their partitions and offsets are facts, not assumptions) with
:class:`worker.pipeline.Scorer`, built from the same YAML the workers run with. Expected:

- one event per reading the Scorer flags, keyed by ``event_id`` (``topic/partition/offset``),
  with its device, timestamp and score;
- one dead letter per unscorable record, keyed by its source ``(partition, offset)``, with
  its reason.

A worker scores in batches whose composition depends on timing (faults, rebalances). Scores are
row-wise, but a BLAS product may round differently for different batch shapes, so the oracle
scores everything twice with different batchings; a reading whose flagged/not-flagged status
differs between the two is *ambiguous* and counted neither as lost nor as unexpected (the
report shows how many there were; normally 0).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from detector import Registry, load
from worker.config import load_config
from worker.pipeline import Scorer
from worker.records import SimpleRecord


@dataclass(frozen=True)
class ExpectedEvent:
    device_id: str
    timestamp_ms: int
    score: float


@dataclass
class Expected:
    events: dict[str, ExpectedEvent] = field(default_factory=dict)
    dead: dict[tuple[int, int], str] = field(default_factory=dict)  # (partition, offset) -> reason
    ambiguous: set[str] = field(default_factory=set)  # event ids
    records: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "records": self.records,
            "events": len(self.events),
            "dead_letters": len(self.dead),
            "ambiguous": len(self.ambiguous),
        }


def _score(
    scorer: Scorer, recs: Sequence[SimpleRecord], sizes: Sequence[int]
) -> tuple[dict[str, ExpectedEvent], dict[tuple[int, int], str]]:
    events: dict[str, ExpectedEvent] = {}
    dead: dict[tuple[int, int], str] = {}
    i = 0
    k = 0
    while i < len(recs):
        n = sizes[k % len(sizes)]
        k += 1
        res = scorer.process(recs[i : i + n])
        i += n
        for m in res.events:
            doc = json.loads(m.value or b"{}")
            events[doc["event_id"]] = ExpectedEvent(
                doc["device_id"], int(doc["reading_timestamp_ms"]), float(doc["score"])
            )
        for m in res.dead_letters:
            h = dict(m.headers)
            key = (int(h["__connect.errors.partition"]), int(h["__connect.errors.offset"]))
            dead[key] = h["sensor_anomaly.error.reason"].decode()
    return events, dead


def compute(config: Path, records: Sequence[SimpleRecord], seed: int = 0) -> Expected:
    """Expected outputs for ``records`` (all partitions, any order) under the worker config."""
    cfg = load_config(config)
    path = (
        Path(cfg.model.path)
        if cfg.model.path
        else Registry(Path(cfg.model.registry)).current_path(cfg.model.name)
    )
    det = load(path)
    # Scoring state (per-device anomaly runs) only shapes anomaly_since, never which readings
    # are flagged (events.min_consecutive must be 1 for this oracle; checked here).
    if cfg.events.min_consecutive != 1:
        raise ValueError("the chaos oracle needs events.min_consecutive = 1")
    by_part: dict[int, list[SimpleRecord]] = {}
    for r in records:
        by_part.setdefault(r.partition, []).append(r)
    rng = random.Random(seed)
    exp = Expected(records=len(records))
    first: dict[str, ExpectedEvent] = {}
    second: dict[str, ExpectedEvent] = {}
    for part in sorted(by_part):
        recs = sorted(by_part[part], key=lambda r: r.offset)
        e1, d1 = _score(Scorer(det, cfg.reading, cfg.events), recs, [cfg.batch.max_size])
        sizes = [rng.randint(1, cfg.batch.max_size) for _ in range(64)]
        e2, d2 = _score(Scorer(det, cfg.reading, cfg.events), recs, sizes)
        if d1 != d2:
            # Dead-letter reasons are a function of a record's bytes (worker/decode.py); a
            # difference here is a worker bug, not an oracle problem: keep the first and say so.
            diff = sorted(set(d1.items()) ^ set(d2.items()))[:5]
            raise AssertionError(f"dead letters depend on batching: {diff}")
        first.update(e1)
        second.update(e2)
        exp.dead.update(d1)
    exp.ambiguous = set(first) ^ set(second)
    exp.events = {k: v for k, v in first.items() if k not in exp.ambiguous}
    return exp


def replace_topic(rec: SimpleRecord, topic: str) -> SimpleRecord:
    return dataclasses.replace(rec, topic=topic)
