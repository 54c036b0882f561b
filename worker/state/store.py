"""An in-memory key → bytes store per input partition, with a changelog.

Contract with the loop (one store per worker; not thread-safe):

1. On assignment of input partition ``p``: :meth:`StateStore.restore` reads changelog partition
   ``p`` from its beginning to its end with ``read_committed`` and rebuilds the partition —
   *before* the first record of ``p`` is scored.
2. After each batch: :meth:`StateStore.put` every changed key (``None`` deletes).
3. At commit time, for every owned partition: produce :meth:`changelog_records` to changelog
   partition ``p`` — inside the exactly-once transaction, or flushed before the offsets are
   committed under at-least-once — then :meth:`mark_flushed`. If that commit fails, call
   :meth:`flush_failed`: the records go out again with the next commit (state values are
   whole values, so re-sending is harmless: the last one wins under compaction).
4. On revoke or loss of ``p``: :meth:`drop` (the next owner restores it from the changelog).

The changelog topic is compacted (``cleanup.policy=compact``), keyed like the input (device
id), with one partition per input partition; :func:`ensure_changelog_topic` creates it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

ChangelogRecord = tuple[bytes, bytes | None]  # (key, value or None = tombstone)


class ChangelogError(RuntimeError):
    """The changelog topic is missing, mis-shaped, or could not be read to its end in time."""


@dataclass(frozen=True)
class RestoreStats:
    """One partition's restore: records read, keys kept, their bytes, wall seconds."""

    partition: int
    records: int
    keys: int
    value_bytes: int
    seconds: float


def changelog_topic_name(group_id: str) -> str:
    """``<group>-incident-state``: one changelog per consumer group (and input topic)."""
    return f"{group_id}-incident-state"


class StateStore:
    """Per-partition ``str → bytes`` maps plus the keys changed since the last flush."""

    def __init__(self) -> None:
        self._data: dict[int, dict[str, bytes]] = {}
        self._dirty: dict[int, dict[str, bytes | None]] = {}
        self._inflight: dict[int, dict[str, bytes | None]] = {}

    # ---- access

    def partitions(self) -> list[int]:
        return sorted(self._data)

    def assign(self, partition: int) -> None:
        """Start an empty partition (restore does this itself)."""
        self._data.setdefault(partition, {})
        self._dirty.setdefault(partition, {})

    def get(self, partition: int, key: str) -> bytes | None:
        return self._data.get(partition, {}).get(key)

    def items(self, partition: int) -> Mapping[str, bytes]:
        """A read-only view of the partition's contents."""
        return self._data.get(partition, {})

    def put(self, partition: int, key: str, value: bytes | None) -> None:
        """Set (or, with ``None``, delete) a key; it is in the next changelog flush.

        Raises:
            KeyError: ``partition`` is not assigned (state of a partition we do not own).
        """
        data = self._data[partition]
        if value is None:
            if key not in data and key not in self._dirty[partition]:
                return  # never stored and not pending: nothing to tombstone
            data.pop(key, None)
        else:
            data[key] = value
        self._dirty[partition][key] = value

    def size(self, partition: int) -> tuple[int, int]:
        """(keys, bytes of keys + values) held for ``partition``."""
        d = self._data.get(partition, {})
        return len(d), sum(len(k.encode()) + len(v) for k, v in d.items())

    # ---- changelog

    def changelog_records(self, partition: int) -> list[ChangelogRecord]:
        """The changes since the last flush, oldest state dropped (one record per key).

        Moves them in flight: call :meth:`mark_flushed` once they are committed, or
        :meth:`flush_failed` to send them again next time.
        """
        dirty = self._dirty.get(partition)
        if not dirty:
            return []
        inflight = self._inflight.setdefault(partition, {})
        inflight.update(dirty)
        self._dirty[partition] = {}
        return [(k.encode(), v) for k, v in inflight.items()]

    def mark_flushed(self, partition: int) -> None:
        self._inflight.pop(partition, None)

    def flush_failed(self, partition: int) -> None:
        """Put the in-flight records back in front of any newer changes."""
        inflight = self._inflight.pop(partition, None)
        if inflight and partition in self._dirty:
            inflight.update(self._dirty[partition])
            self._dirty[partition] = inflight

    def drop(self, partition: int) -> None:
        """Forget a revoked or lost partition, unflushed changes included."""
        self._data.pop(partition, None)
        self._dirty.pop(partition, None)
        self._inflight.pop(partition, None)

    # ---- restore

    def restore(
        self,
        consumer_factory: Callable[[], Any],
        topic: str,
        partition: int,
        timeout_s: float = 120.0,
    ) -> RestoreStats:
        """Rebuild ``partition`` from changelog ``topic`` (same partition), beginning to end.

        ``consumer_factory()`` must return a consumer with kafka-python's interface, without
        a group and with ``read_committed`` isolation (an aborted transaction's state must
        not come back): a ``KafkaConsumer`` or the client adapter's
        ``build_restore_consumer`` (worker/clients); it is closed here. The end is the
        partition's end offset when the restore starts (the last stable offset under
        read_committed): the store's owner is the only writer.

        Raises:
            ChangelogError: the partition does not exist, or its end was not reached in
                ``timeout_s``.
        """
        t0 = time.perf_counter()
        self.drop(partition)
        data: dict[str, bytes] = {}
        records = 0
        tp = TopicPartition(topic, partition)
        consumer = consumer_factory()
        try:
            known = consumer.partitions_for_topic(topic)
            if not known or partition not in known:
                raise ChangelogError(
                    f"changelog topic {topic!r} has no partition {partition}; create it with "
                    "one partition per input partition (ensure_changelog_topic)"
                )
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            end = consumer.end_offsets([tp])[tp]
            deadline = time.monotonic() + timeout_s
            while consumer.position(tp) < end:
                if time.monotonic() > deadline:
                    raise ChangelogError(
                        f"restore of {topic}[{partition}] did not reach offset {end} in "
                        f"{timeout_s:g} s (at {consumer.position(tp)})"
                    )
                batch = consumer.poll(timeout_ms=200, max_records=10_000)
                for recs in batch.values():
                    for r in recs:
                        if r.key is None:
                            continue  # not ours: changelog keys are never empty
                        records += 1
                        key = r.key.decode()
                        if r.value is None:
                            data.pop(key, None)
                        else:
                            data[key] = r.value
        finally:
            consumer.close()
        self._data[partition] = data
        self._dirty[partition] = {}
        n, size = self.size(partition)
        return RestoreStats(partition, records, n, size, time.perf_counter() - t0)


def ensure_changelog_topic(
    admin_factory: Callable[[], KafkaAdminClient],
    topic: str,
    partitions: int,
    replication_factor: int = 1,
    extra_configs: Mapping[str, str] | None = None,
) -> bool:
    """Create the compacted changelog topic if missing; check it if present.

    Returns True if it was created. ``partitions`` is the input topic's partition count.

    Raises:
        ChangelogError: it exists with fewer partitions or without ``cleanup.policy=compact``
            (a deleting changelog loses state after retention).
    """
    configs = {"cleanup.policy": "compact", **(extra_configs or {})}
    admin = admin_factory()
    try:
        try:
            admin.create_topics(
                [NewTopic(topic, partitions, replication_factor, topic_configs=configs)]
            )
            return True
        except TopicAlreadyExistsError:
            pass
        desc = admin.describe_topics([topic])
        have = len(desc[0]["partitions"]) if desc else 0
        if have < partitions:
            raise ChangelogError(
                f"changelog topic {topic!r} has {have} partitions, the input has {partitions}; "
                "add partitions (kafka-topics --alter) or delete it"
            )
        # kafka-python 3 lists only modified keys by default: a topic left at the broker's
        # default (delete) would look like it has no policy at all and pass the check.
        try:
            res = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic, configs=["cleanup.policy"])],
                config_filter="all",
            )
        except TypeError:  # kafka-python 2.x: no filter, every key is listed
            res = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic, configs=["cleanup.policy"])]
            )
        policy = _config_value(res, "cleanup.policy")
        if policy is not None and "compact" not in policy:
            raise ChangelogError(
                f"changelog topic {topic!r} has cleanup.policy={policy}; set it to compact"
            )
        return False
    finally:
        admin.close()


def _config_value(response: Any, name: str) -> str | None:
    """Pull one config value out of kafka-python's describe_configs response (any shape).

    kafka-python 3: ``{"topic": {name: {key: {"value": ...}}}}``; 2.x: a list of responses
    whose ``resources`` rows end in ``(key, value, …)`` entries.
    """
    if isinstance(response, dict) and "topic" in response:
        for configs in response["topic"].values():
            entry = configs.get(name) if isinstance(configs, dict) else None
            if isinstance(entry, dict) and entry.get("value") is not None:
                return str(entry["value"])
        return None
    for resp in response if isinstance(response, list) else [response]:
        resources = getattr(resp, "resources", None)
        if resources is None and isinstance(resp, dict):
            resources = resp.get("resources")
        for res in resources or []:
            entries = res[4] if isinstance(res, tuple | list) else res.get("configs", [])
            for entry in entries:
                key = entry[0] if isinstance(entry, tuple | list) else entry.get("name")
                if key == name:
                    return str(entry[1] if isinstance(entry, tuple | list) else entry["value"])
    return None
