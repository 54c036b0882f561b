"""A bounded replay of a Kafka topic of readings, as training data.

Contract of :func:`read_kafka`:
    1. look up the topic's partitions (the topic must exist; auto-creation is never asked for);
    2. fix the bounds *before* reading: per partition, a start offset (``earliest``, an
       offset, or the first record at/after ``start_time``) and an end offset, exclusive
       (``latest`` = the high watermark now, an offset, or the first record at/after
       ``end_time``). Records produced during the replay are therefore never read, and the
       replay always ends;
    3. read with a group-less, assign()-ed consumer (no offsets are committed, no group is
       joined), ``read_committed`` so aborted transactional records are not trained on;
    4. decode each value as a reading record; an undecodable record (tombstone, invalid
       JSON, not an object) is skipped and counted, never fatal, because one poison record
       must not block training; if no record is usable, that is an error;
    5. give up with a :class:`~trainer.errors.DataError` after ``timeout_s``.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from typing import Any

import msgspec

from trainer.config import KafkaSource, parse_time_ms
from trainer.data import RawTable, RecordFields, flatten_record, table_from_rows
from trainer.errors import DataError

Progress = Callable[[str], None]


def _consumer(src: KafkaSource) -> Any:
    # Imported here so that CSV-only training never imports the Kafka client.
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    try:
        return KafkaConsumer(
            bootstrap_servers=src.bootstrap.split(","),
            client_id=src.client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            allow_auto_create_topics=False,
            bootstrap_timeout_ms=int(min(src.timeout_s, 30.0) * 1000),
            request_timeout_ms=int(max(min(src.timeout_s, 30.0), 5.0) * 1000),
        )
    except KafkaError as e:
        raise DataError(
            f"cannot reach Kafka at {src.bootstrap} ({type(e).__name__}: {e})",
            "check data.kafka.bootstrap and that the broker is running",
        ) from None


def _bounds(consumer: Any, src: KafkaSource, tps: list[Any]) -> dict[Any, tuple[int, int]]:
    """Per partition ``(start, stop)`` offsets, stop exclusive, fixed before reading."""
    begin = consumer.beginning_offsets(tps)
    end = consumer.end_offsets(tps)

    def by_time(value: int | str, key: str) -> dict[Any, int]:
        ms = parse_time_ms(value, key)
        found = consumer.offsets_for_times(dict.fromkeys(tps, ms))
        # No record at/after that time: the bound is the end of the partition.
        return {tp: (found[tp].offset if found.get(tp) is not None else end[tp]) for tp in tps}

    if src.start_time is not None:
        start = by_time(src.start_time, "data.kafka.start_time")
    elif src.start_offset == "earliest":
        start = dict(begin)
    else:
        start = {tp: max(int(src.start_offset), begin[tp]) for tp in tps}
    if src.end_time is not None:
        stop = by_time(src.end_time, "data.kafka.end_time")
    elif src.end_offset == "latest":
        stop = dict(end)
    else:
        stop = {tp: min(int(src.end_offset), end[tp]) for tp in tps}
    return {tp: (start[tp], max(start[tp], stop[tp])) for tp in tps}


def _partitions(consumer: Any, src: KafkaSource) -> list[Any]:
    from kafka import TopicPartition

    parts = consumer.partitions_for_topic(src.topic)
    if not parts:
        topics = sorted(t for t in consumer.topics() if not t.startswith("__"))
        close = difflib.get_close_matches(src.topic, topics, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"existing topics: {topics[:10]}"
        raise DataError(f"Kafka topic {src.topic!r} does not exist at {src.bootstrap}", hint)
    chosen = sorted(parts) if src.partitions is None else list(src.partitions)
    unknown = sorted(set(chosen) - set(parts))
    if unknown:
        raise DataError(
            f"topic {src.topic!r} has no partition(s) {unknown} (it has {sorted(parts)})",
            "fix data.kafka.partitions or set it to null for all",
        )
    return [TopicPartition(src.topic, p) for p in chosen]


def _decode(value: bytes | None, fields: RecordFields) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        obj = msgspec.json.decode(value)
    except msgspec.DecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    return flatten_record(obj, fields)


def _consume(
    consumer: Any,
    src: KafkaSource,
    bounds: dict[Any, tuple[int, int]],
    active: set[Any],
    want: int,
    fields: RecordFields,
) -> tuple[list[tuple[int, int, int, dict[str, Any]]], int]:
    """Poll until every partition reached its stop offset (or ``want`` records were seen).

    Returns ``(timestamp, partition, offset, row)`` per usable record and the skipped count.
    """
    got: list[tuple[int, int, int, dict[str, Any]]] = []
    skipped = 0
    deadline = time.monotonic() + src.timeout_s
    while active and len(got) + skipped < want:
        if time.monotonic() > deadline:
            raise DataError(
                f"the Kafka replay of {src.topic!r} timed out after {src.timeout_s:g} s "
                f"with {len(got) + skipped} of {want} records",
                "check the broker, or raise data.kafka.timeout_s",
            )
        batch = consumer.poll(timeout_ms=500, max_records=2000)
        for tp, records in batch.items():
            stop = bounds[tp][1]
            for r in records:
                if r.offset >= stop or len(got) + skipped >= want:
                    break
                row = _decode(r.value, fields)
                if row is None:
                    skipped += 1
                else:
                    got.append((r.timestamp, tp.partition, r.offset, row))
        for tp in list(active):
            # position() also steps over transaction markers, which have no record.
            if consumer.position(tp) >= bounds[tp][1]:
                consumer.pause(tp)
                active.discard(tp)
    return got, skipped


def read_kafka(src: KafkaSource, progress: Progress | None = None) -> RawTable:
    """Replay ``src.topic`` between fixed bounds into a :class:`RawTable` (see module contract).

    Rows are ordered by Kafka record timestamp (then partition, offset), so a chronological
    split means the same thing as for a time-ordered file.
    """
    from kafka.errors import KafkaError

    fields = RecordFields(src.device_field, src.timestamp_field, src.values_field)
    consumer = _consumer(src)
    try:
        tps = _partitions(consumer, src)
        bounds = _bounds(consumer, src, tps)
        want = sum(stop - start for start, stop in bounds.values())
        if src.max_records is not None:
            want = min(want, src.max_records)
        if progress:
            shown = ", ".join(f"p{tp.partition}:[{a},{b})" for tp, (a, b) in bounds.items())
            progress(f"kafka replay of {src.topic}: {want} records, offsets {shown}")
        consumer.assign(tps)
        active: set[Any] = set()
        for tp, (start, stop) in bounds.items():
            if stop > start:
                consumer.seek(tp, start)
                active.add(tp)
            else:
                consumer.pause(tp)
        got, skipped = _consume(consumer, src, bounds, active, want, fields)
    except KafkaError as e:
        raise DataError(
            f"Kafka replay of {src.topic!r} failed ({type(e).__name__}: {e})",
            "check the broker and data.kafka settings",
        ) from None
    finally:
        consumer.close()
    if not got:
        raise DataError(
            f"the Kafka replay of {src.topic!r} found no usable reading records "
            f"({skipped} undecodable)",
            "check the topic, the offset/time bounds and data.kafka.values_field",
        )
    got.sort(key=lambda t: (t[0], t[1], t[2]))
    where = [(p, o) for _, p, o, _ in got]
    return table_from_rows(
        f"kafka topic {src.topic}",
        [row for *_, row in got],
        lambda i: f"partition {where[i][0]} offset {where[i][1]}",
        skipped=skipped,
    )
