"""Per-device state behind the loop: incidents and the scorer's device memory, made durable.

One :class:`StatefulStage` per worker. It owns the :class:`~worker.state.store.StateStore`
(one key space per input partition: incident states, the tracker's applied-offset marks and
the windowed/EWMA device memory under ``MEMORY_KEY_PREFIX``), the
:class:`~worker.incidents.IncidentTracker` and the optional Alertmanager client. The loop calls
it at fixed points of its delivery contract (see worker/loop.py):

- ``assigned`` (rebalance listener) marks partitions to restore; ``restore_pending`` (main
  thread, right after ``poll`` returns and before any record of those partitions is scored)
  reads each changelog partition from its beginning to its end, read_committed, and loads it;
- ``process(result)`` after each scored batch: incident rules (event time only), store
  changes, the incident events to publish with the batch's outputs;
- ``changelog()`` at commit time: the changed keys of every owned partition, to be produced to
  the compacted changelog topic in the same transaction as the outputs and offsets
  (exactly-once) or acknowledged before the offsets are committed (at-least-once);
- ``committed()`` after the commit; ``commit_failed()`` when an at-least-once attempt failed;
  ``reset()`` when an exactly-once transaction was dropped (state goes back to the changelog,
  which matches the committed offsets); ``revoked`` on revoke/loss.

The changelog topic is ``<group>-incident-state``, one partition per input partition, keyed by
device. Several input topics share the partition numbering, so they must be co-partitioned
(same partition count, the default range assignor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition

from worker.alertmanager import AlertmanagerClient
from worker.clients import ClientAdapter, adapter_for
from worker.config import WorkerConfig
from worker.incidents import (
    IncidentEvent,
    IncidentOutput,
    IncidentTracker,
    encode_change,
    encode_incident_event,
)
from worker.records import OutputMessage
from worker.state.store import StateStore, changelog_topic_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Produced:
    """One output beside a batch's events and dead letters."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None


class StatefulStage:
    """See the module docstring. Not thread-safe except ``assigned``/``revoked`` (flags)."""

    def __init__(
        self,
        cfg: WorkerConfig,
        tracker: IncidentTracker | None,
        memory: Any | None,
        alerts: AlertmanagerClient | None = None,
        on_incidents: Callable[[list[IncidentEvent], Any], None] | None = None,
        on_restore: Callable[[int, int, int, float], None] | None = None,
        client: ClientAdapter | None = None,
    ) -> None:
        self.cfg = cfg
        # The changelog is read and created with the worker's own Kafka library, so its
        # security settings and client behaviour are the ones the user chose.
        self.client = client or adapter_for(cfg)
        self.tracker = tracker
        self.memory = memory
        self.alerts = alerts
        self.topic = changelog_topic_name(cfg.kafka.group_id)
        self.incident_topic = cfg.incidents.topic if tracker is not None else ""
        self.store = StateStore()
        self._to_restore: set[int] = set()
        self._owned: set[int] = set()
        self._alerts_pending: list[IncidentEvent] = []
        self._on_incidents = on_incidents
        self._on_restore = on_restore
        self.restores: list[tuple[int, int, int, float]] = []  # (partition, keys, bytes, s)

    # -- start-up ---------------------------------------------------------------------------

    def start(self, input_partitions: int) -> None:
        """Create (or check) the compacted changelog topic; start Alertmanager delivery."""
        created = self.client.ensure_changelog(self.cfg, self.topic, max(1, input_partitions))
        if created:
            log.info("created changelog topic %s (%d partitions)", self.topic, input_partitions)
        if self.alerts is not None:
            self.alerts.start()

    def stop(self) -> None:
        if self.alerts is not None:
            self.alerts.stop()

    # -- partition lifecycle ------------------------------------------------------------------

    def assigned(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._to_restore.add(tp.partition)

    def revoked(self, tps: Iterable[TopicPartition]) -> None:
        for p in {tp.partition for tp in tps}:
            self._to_restore.discard(p)
            self._owned.discard(p)
            self.store.drop(p)
            if self.tracker is not None:
                self.tracker.drop_partition(p)
            if self.memory is not None:
                self.memory.drop_partition(p)

    def needs_restore(self) -> bool:
        return bool(self._to_restore)

    def restore_pending(self) -> None:
        """Restore every partition marked by ``assigned`` (main thread, before scoring).

        Raises:
            ChangelogError / KafkaError: the changelog could not be read (the loop retries).
        """
        from worker.memory import MEMORY_KEY_PREFIX

        for p in sorted(self._to_restore):
            stats = self.store.restore(
                lambda: self.client.build_restore_consumer(self.cfg), self.topic, p
            )
            items = self.store.items(p)
            if self.tracker is not None:
                self.tracker.load_partition(
                    p, {k: v for k, v in items.items() if not k.startswith(MEMORY_KEY_PREFIX)}
                )
            if self.memory is not None:
                self.memory.load_partition(
                    p,
                    {
                        k[len(MEMORY_KEY_PREFIX) :]: v
                        for k, v in items.items()
                        if k.startswith(MEMORY_KEY_PREFIX)
                    },
                )
            self._to_restore.discard(p)
            self._owned.add(p)
            entry = (p, stats.keys, stats.value_bytes, stats.seconds)
            self.restores.append(entry)
            if self._on_restore is not None:
                self._on_restore(*entry)
            log.info(
                "restored state of partition %d: %d keys, %d bytes from %d records in %.3fs",
                p,
                stats.keys,
                stats.value_bytes,
                stats.records,
                stats.seconds,
            )

    # -- per batch ------------------------------------------------------------------------------

    def process(self, result: Any) -> list[Produced]:
        """Apply a scored batch; return the incident events to publish with it."""
        events: list[IncidentEvent] = []
        sb = getattr(result, "scored_batch", None)
        if self.tracker is not None and sb is not None and len(sb):
            out = self.tracker.process(sb)
            self._apply(out)
            events.extend(out.events)
            # Devices that stop reporting: resolve against the partition's event time.
            marks: dict[int, int] = {}
            for p, ts in zip(sb.partitions.tolist(), sb.ts_ms.tolist(), strict=True):
                if ts > marks.get(p, -1):
                    marks[p] = ts
            for p, wm in marks.items():
                exp = self.tracker.expire(wm, p)
                self._apply(exp)
                events.extend(exp.events)
        if self.memory is not None:
            from worker.memory import MEMORY_KEY_PREFIX

            for p, devs in self.memory.take_dirty().items():
                if p not in self._owned:
                    self._owned.add(p)
                    self.store.assign(p)
                for dev in devs:
                    self.store.put(p, MEMORY_KEY_PREFIX + dev, self.memory.export(dev))
        if self.tracker is not None and self._on_incidents is not None:
            self._on_incidents(events, self.tracker.open_counts())
        self._alerts_pending.extend(events)
        top = self.cfg.incidents.top_sensors
        out_msgs: list[Produced] = []
        for ev in events:
            m: OutputMessage = encode_incident_event(ev, top)
            out_msgs.append(Produced(self.incident_topic, m.key, m.value))
        return out_msgs

    def _apply(self, out: IncidentOutput) -> None:
        for p, changes in out.changed.items():
            if p not in self._owned:
                self._owned.add(p)
                self.store.assign(p)
            for key, value in changes.items():
                self.store.put(p, key, encode_change(value))

    # -- commit ----------------------------------------------------------------------------------

    def changelog(self) -> list[Produced]:
        """Changed keys of every owned partition since the last successful commit."""
        out: list[Produced] = []
        for p in self.store.partitions():
            for key, value in self.store.changelog_records(p):
                out.append(Produced(self.topic, key, value, partition=p))
        return out

    def committed(self) -> None:
        for p in self.store.partitions():
            self.store.mark_flushed(p)
        if self.alerts is not None:
            for ev in self._alerts_pending:
                self.alerts.submit(ev)
        self._alerts_pending.clear()

    def commit_failed(self) -> None:
        """At-least-once: the changelog records go out again with the next attempt."""
        for p in self.store.partitions():
            self.store.flush_failed(p)

    def reset(self) -> None:
        """Exactly-once: the open transaction was dropped; reload owned state from the
        changelog (whose committed content matches the committed offsets)."""
        owned = set(self._owned) | set(self._to_restore)
        for p in owned:
            self.store.drop(p)
            if self.tracker is not None:
                self.tracker.drop_partition(p)
            if self.memory is not None:
                self.memory.drop_partition(p)
        self._owned.clear()
        self._to_restore = owned
        self._alerts_pending.clear()
