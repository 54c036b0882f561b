"""Training from a bounded replay of a real Kafka topic (offsets and time range)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulator.fleet import FleetSpec, feature_names, stream
from trainer.config import from_mapping
from trainer.errors import DataError
from trainer.pipeline import load_training_data, train

pytestmark = pytest.mark.integration

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:39092")
PER_DEVICE = 300


@dataclass(frozen=True)
class Produced:
    topic: str
    start_ms: int
    # (partition, offset, timestamp_ms, values or None for a poison record)
    records: list[tuple[int, int, int, dict[str, float] | None]]


@pytest.fixture(scope="module")
def produced(broker: Any) -> Iterator[Produced]:
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    # Recent event times: the broker's time-based retention must not delete the records.
    start_ms = (int(time.time()) - 3600) * 1000
    spec = FleetSpec(devices=4, sensors=12, seed=5, start_ms=start_ms)
    topic = f"trainer-replay-{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(bootstrap_servers=BOOTSTRAP, client_id="trainer-test-admin")
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    producer = KafkaProducer(bootstrap_servers=BOOTSTRAP)
    futures = []
    for i, r in enumerate(stream(spec, PER_DEVICE)):
        futures.append(
            (
                r.timestamp_ms,
                r.values,
                producer.send(topic, value=r.to_json(), key=r.key(), timestamp_ms=r.timestamp_ms),
            )
        )
        if i == 100:  # a poison record in the middle: skipped, never fatal
            futures.append(
                (
                    r.timestamp_ms,
                    None,
                    producer.send(
                        topic, value=b"{not json", key=r.key(), timestamp_ms=r.timestamp_ms
                    ),
                )
            )
    producer.flush(30)
    records = []
    for ts, values, fut in futures:
        md = fut.get(timeout=30)
        records.append((md.partition, md.offset, ts, values))
    producer.close()
    yield Produced(topic, start_ms, records)
    admin.delete_topics([topic])
    admin.close()


def _config(p: Produced, tmp: Path, **kafka: Any) -> Any:
    return from_mapping(
        {
            "name": "replayed",
            "registry": str(tmp / "registry"),
            "data": {
                "format": "kafka",
                "kafka": {"bootstrap": BOOTSTRAP, "topic": p.topic, "timeout_s": 60} | kafka,
            },
            "model": {"hidden": [8], "code_size": 3, "epochs": 2, "batch_size": 64},
        }
    )


def _expected(p: Produced, keep: Any) -> tuple[np.ndarray, int]:
    names = feature_names(FleetSpec(devices=4, sensors=12, seed=5))
    chosen = [r for r in p.records if keep(r)]
    rows = np.array(sorted(tuple(v[n] for n in names) for *_, v in chosen if v is not None))
    return rows, sum(v is None for *_, v in chosen)


def _sorted_rows(x: np.ndarray) -> np.ndarray:
    return np.array(sorted(map(tuple, x.tolist())))


def test_train_from_bounded_offset_replay(produced: Produced, tmp_path: Path) -> None:
    cfg = _config(produced, tmp_path, start_offset=10, end_offset=450)
    lines: list[str] = []
    res = train(cfg, lines.append)
    rows, poison = _expected(produced, lambda r: 10 <= r[1] < 450)
    assert poison == 1  # the poison record lies inside the bounds
    assert res.dataset.n_rows == len(rows) == res.metrics["data"]["rows"]
    assert res.metrics["data"]["skipped_records"] == 1
    np.testing.assert_array_equal(_sorted_rows(res.dataset.x), rows)
    assert res.dataset.feature_names == tuple(
        feature_names(FleetSpec(devices=4, sensors=12, seed=5))
    )
    assert res.artifact is not None and (res.artifact / "manifest.json").is_file()
    assert any(ln.startswith(f"kafka replay of {produced.topic}:") for ln in lines)


def test_time_range_replay(produced: Produced, tmp_path: Path) -> None:
    start = produced.start_ms + 50_000
    end = produced.start_ms + 120_000
    iso_end = datetime.fromtimestamp(end / 1000, UTC).isoformat()
    ds = load_training_data(_config(produced, tmp_path, start_time=start, end_time=iso_end))
    rows, poison = _expected(produced, lambda r: start <= r[2] < end)
    assert len(rows) == 70 * 4 and poison == 0
    np.testing.assert_array_equal(_sorted_rows(ds.x), rows)


def test_replay_never_reads_past_the_high_watermark(produced: Produced, tmp_path: Path) -> None:
    ds = load_training_data(_config(produced, tmp_path, max_records=5000))
    assert ds.n_rows == 4 * PER_DEVICE and ds.skipped_records == 1


def test_unknown_topic_is_a_clear_error(produced: Produced) -> None:
    cfg = from_mapping(
        {
            "data": {
                "format": "kafka",
                "kafka": {"bootstrap": BOOTSTRAP, "topic": produced.topic + "x", "timeout_s": 20},
            }
        }
    )
    with pytest.raises(DataError, match=f"did you mean '{produced.topic}'"):
        load_training_data(cfg)
