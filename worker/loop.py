"""The Kafka adapter: poll → batch → score → publish → commit, with the delivery contract.

Delivery contract (``_deliver_pending`` runs steps 1-2 per batch; ``_commit`` runs 3-5 for
every batch scored since the last commit, at most every ``kafka.commit_interval_ms``, and
always before a rebalance, a model switch and a shutdown):

At least once (default):
    1. score the batch (pure; bad records become dead letters, never exceptions);
    2. send every event and dead letter of the batch to the producer (asynchronously);
    3. flush the producer and check every send since the last commit was acknowledged
       (``acks=all``, idempotent producer); if any failed, nothing is committed and all
       those outputs are sent again after a back-off (duplicates carry the same
       ``event_id``);
    4. commit each partition's offset (one past its last scored record) synchronously;
    5. only then update metrics.
    A crash anywhere before 4 replays the uncommitted batches after restart; nothing is
    skipped.

Exactly once (``kafka.delivery = exactly_once``):
    1. score the batch;
    2. (begin a transaction if none is open) send events and dead letters in it;
    3. add the offsets to the transaction with the consumer's group metadata (KIP-447
       fencing of zombie instances);
    4. commit the transaction; on an abortable error abort it and send the same outputs
       again in a new transaction (the scored batches are kept until committed); a fatal
       error (fenced) exits;
    5. only then update metrics.
    Readers of the output topics must use ``isolation.level=read_committed``.

If a commit fails because our partitions were reassigned, the uncommitted batches are
dropped and the consumer rewinds to their first offsets: the new owner replays them.
Rebalance: everything held is delivered and committed in ``on_partitions_revoked``
(an async listener: kafka-python runs it on its I/O thread) before the partitions move,
so a rebalance loses nothing and, when that commit succeeds, duplicates nothing.
Shutdown: after a stop request the open batch is scored, delivered and committed, and the
clients closed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from detector import ArtifactError, Detector
from worker.config import WorkerConfig, kafka_security_kwargs
from worker.health import HealthState
from worker.metrics import WorkerMetrics
from worker.model_source import ModelSource, trained_timestamp
from worker.pipeline import BatchResult, Scorer
from worker.records import OutputMessage

log = logging.getLogger(__name__)

_FATAL_PRODUCER_ERRORS = (
    "ProducerFencedError",
    "InvalidProducerEpochError",
    "TransactionalIdAuthorizationFailedError",
    "AuthorizationError",
)
_REASSIGNED_ERRORS = frozenset(
    {
        "CommitFailedError",
        "IllegalGenerationError",
        "UnknownMemberIdError",
        "RebalanceInProgressError",
        "FencedInstanceIdError",
    }
)
# Leave room for headers and the record overhead under the producer's request limit.
_DLQ_VALUE_MARGIN = 16_384


class GiveUp(RuntimeError):
    """The broker stayed unreachable past ``kafka.outage_give_up_s``: exit, let a supervisor
    restart us."""


class DeliveryFailed(KafkaError):  # type: ignore[misc]
    """Some outputs of a batch were not acknowledged."""


def build_consumer(cfg: WorkerConfig) -> KafkaConsumer:
    k = cfg.kafka
    return KafkaConsumer(
        bootstrap_servers=k.bootstrap_servers.split(","),
        group_id=k.group_id,
        client_id=f"{k.client_id}-{k.instance_id}",
        enable_auto_commit=False,
        auto_offset_reset=k.auto_offset_reset,
        # Inputs may be written transactionally; never score aborted records.
        isolation_level="read_committed",
        max_poll_records=cfg.batch.max_size,
        session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms,
        max_poll_interval_ms=k.max_poll_interval_ms,
        fetch_max_wait_ms=k.fetch_max_wait_ms,
        max_partition_fetch_bytes=k.max_partition_fetch_bytes,
        fetch_max_bytes=k.fetch_max_bytes,
        request_timeout_ms=max(k.request_timeout_ms, k.session_timeout_ms + 5000),
        reconnect_backoff_max_ms=k.reconnect_backoff_max_ms,
        **kafka_security_kwargs(k),
    )


def build_producer(cfg: WorkerConfig) -> KafkaProducer:
    k = cfg.kafka
    extra: dict[str, Any] = {}
    if k.delivery == "exactly_once":
        extra["transactional_id"] = f"{k.transactional_id_prefix}-{k.group_id}-{k.instance_id}"
        extra["transaction_timeout_ms"] = k.transaction_timeout_ms
    if k.compression_type != "none":
        extra["compression_type"] = k.compression_type
    return KafkaProducer(
        bootstrap_servers=k.bootstrap_servers.split(","),
        client_id=f"{k.client_id}-{k.instance_id}",
        acks="all",
        enable_idempotence=True,
        linger_ms=k.linger_ms,
        request_timeout_ms=k.request_timeout_ms,
        reconnect_backoff_max_ms=k.reconnect_backoff_max_ms,
        **extra,
        **kafka_security_kwargs(k),
    )


@dataclass
class _Pending:
    """Records polled but not yet scored (the open batch)."""

    records: list[Any] = field(default_factory=list)
    started: float = 0.0
    # Per partition: offset after the last record, and the first record's offset (rewind).
    next_offset: dict[TopicPartition, int] = field(default_factory=dict)
    first_offset: dict[TopicPartition, int] = field(default_factory=dict)


@dataclass
class _Uncommitted:
    """Scored batches whose outputs are sent but whose offsets are not yet committed."""

    results: list[tuple[int, BatchResult]] = field(default_factory=list)  # (records, result)
    futures: list[Any] = field(default_factory=list)
    next_offset: dict[TopicPartition, int] = field(default_factory=dict)
    first_offset: dict[TopicPartition, int] = field(default_factory=dict)
    started: float = 0.0
    in_transaction: bool = False

    def add(self, pending: _Pending, n: int, result: BatchResult) -> None:
        if not self.results:
            self.started = time.monotonic()
        self.results.append((n, result))
        self.next_offset.update(pending.next_offset)
        for tp, off in pending.first_offset.items():
            self.first_offset.setdefault(tp, off)

    def offsets(self) -> dict[TopicPartition, OffsetAndMetadata]:
        return {tp: OffsetAndMetadata(off, "", -1) for tp, off in self.next_offset.items()}


class Worker:
    """One consumer-group member. Build with clients (or let ``run`` build them)."""

    def __init__(
        self,
        cfg: WorkerConfig,
        metrics: WorkerMetrics,
        health: HealthState,
        models: ModelSource,
        consumer_factory: Callable[[WorkerConfig], KafkaConsumer] = build_consumer,
        producer_factory: Callable[[WorkerConfig], KafkaProducer] = build_producer,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.health = health
        self.models = models
        self._consumer_factory = consumer_factory
        self._producer_factory = producer_factory
        self._stop = False
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.scorer: Scorer | None = None
        self._pending = _Pending()
        self._unc = _Uncommitted()
        self._eos = cfg.kafka.delivery == "exactly_once"
        self._outage_since: float | None = None
        self.batches_done = 0
        self.readings_done = 0

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and return (signal-handler safe)."""
        self._stop = True
        self.health.update(stopping=True)

    def set_detector(self, det: Detector) -> None:
        old = self.scorer
        self.scorer = Scorer(
            det, self.cfg.reading, self.cfg.events, episodes=old.episodes if old else None
        )
        self.metrics.on_model(det.info, det.threshold.value, trained_timestamp(det))
        self.health.update(model_version=det.info.version)
        log.info(
            "serving model %s %s (threshold %.6g, %d features)",
            det.info.name,
            det.info.version,
            det.threshold.value,
            det.n_features,
        )

    def run(self, max_batches: int | None = None, timeout_s: float | None = None) -> None:
        """Consume until :meth:`stop`, ``max_batches`` batches, or ``timeout_s`` seconds.

        Raises:
            GiveUp: the broker was unreachable for longer than ``kafka.outage_give_up_s``.
            KafkaError: a fatal producer error (fenced by a newer instance).
        """
        if self.scorer is None:
            self.set_detector(self.models.load_initial())
        self.producer = self._producer_factory(self.cfg)
        if self._eos:
            self.producer.init_transactions()
        self.consumer = self._consumer_factory(self.cfg)
        self.consumer.subscribe(list(self.cfg.kafka.input_topics), listener=_Listener(self))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        next_housekeeping = 0.0
        try:
            while not self._stop:
                if max_batches is not None and self.batches_done >= max_batches:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self.health.beat()
                self._poll_once()
                now = time.monotonic()
                if now >= next_housekeeping:
                    self._housekeeping()
                    next_housekeeping = now + min(5.0, self.cfg.model.reload_interval_s)
            # Stop requested: finish what we hold, deliver and commit it.
            self._flush_all()
        finally:
            self.close()

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except Exception:
                log.exception("error closing consumer")
            self.consumer = None
        if self.producer is not None:
            try:
                self.producer.close(timeout=10)
            except Exception:
                log.exception("error closing producer")
            self.producer = None
        self.health.update(assigned_partitions=0)
        self.metrics.ready.set(0)

    # -- the loop ----------------------------------------------------------------------------

    def _poll_once(self) -> None:
        assert self.consumer is not None
        b = self.cfg.batch
        pending = self._pending
        now = time.monotonic()
        if pending.records:
            timeout_ms = max(0, int(b.max_wait_ms - (now - pending.started) * 1000))
        elif self._unc.results:
            left = self.cfg.kafka.commit_interval_ms - (now - self._unc.started) * 1000
            timeout_ms = max(0, int(left))
        else:
            timeout_ms = 200  # idle: wake up regularly for stop requests and housekeeping
        try:
            polled = self.consumer.poll(
                timeout_ms=timeout_ms, max_records=b.max_size - len(pending.records)
            )
        except KafkaError as e:
            self._kafka_error("poll", e)
            return
        if polled and self._outage_since is not None:
            self._outage_over()  # records arrived: the broker is back
        # poll() may have run a rebalance that delivered the open batch and replaced it:
        # add the new records to the batch that is open now.
        pending = self._pending
        for tp, recs in polled.items():
            if not pending.records:
                pending.started = time.monotonic()
            pending.records.extend(recs)
            pending.next_offset[tp] = recs[-1].offset + 1
            pending.first_offset.setdefault(tp, recs[0].offset)
            self.metrics.on_consumed(tp.topic, len(recs))
        now = time.monotonic()
        if pending.records and (
            len(pending.records) >= b.max_size or (now - pending.started) * 1000 >= b.max_wait_ms
        ):
            self._deliver_pending()
        if self._unc.results and (
            (time.monotonic() - self._unc.started) * 1000 >= self.cfg.kafka.commit_interval_ms
        ):
            self._commit()

    def _flush_all(self) -> None:
        """Deliver the open batch and commit everything (stop, revoke, model switch)."""
        self._deliver_pending()
        if self._unc.results:
            self._commit()

    def _deliver_pending(self) -> None:
        """Steps 1-2: score the open batch and send its outputs."""
        pending, self._pending = self._pending, _Pending()
        if not pending.records:
            return
        assert self.scorer is not None and self.producer is not None
        result = self.scorer.process(pending.records)  # step 1
        if self._eos and not self._unc.in_transaction:
            self._begin()
        self._unc.add(pending, len(pending.records), result)
        try:
            self._unc.futures += self._send_all(result)  # step 2
        except KafkaError as e:
            # A send can fail synchronously (buffer full, broker gone); _commit re-sends.
            self._kafka_error("send", e)

    def _begin(self) -> None:
        assert self.producer is not None
        self.producer.begin_transaction()
        self._unc.in_transaction = True

    def _commit(self) -> None:
        """Steps 3-5 for every uncommitted batch; see the module docstring."""
        assert self.consumer is not None and self.producer is not None
        unc = self._unc
        backoff = 0.1
        while True:
            try:
                if self._eos:
                    if not unc.in_transaction:  # aborted after an error: send again
                        self._begin()
                        unc.futures = [f for _, r in unc.results for f in self._send_all(r)]
                    self.producer.send_offsets_to_transaction(  # step 3 (EOS)
                        unc.offsets(), self.consumer.group_metadata()
                    )
                    self.producer.commit_transaction()  # step 4 (EOS)
                    unc.in_transaction = False
                else:
                    self._wait_acknowledged(unc.futures)  # step 3
                    self.consumer.commit(offsets=unc.offsets())  # step 4
                self._outage_over()
                break
            except KafkaError as e:
                name = type(e).__name__
                if name in _FATAL_PRODUCER_ERRORS:
                    raise
                self._kafka_error("commit", e)
                if self._eos:
                    self._abort_quietly()
                    unc.in_transaction = False
                if name in _REASSIGNED_ERRORS:
                    # Our partitions moved: the new owner replays from the last commit.
                    log.warning("batch not committed, partitions were reassigned (%s)", name)
                    self._rewind(unc.first_offset)
                    self._unc = _Uncommitted()
                    return
                self._check_give_up()
                log.warning("delivery failed (%s: %s); retrying in %.1fs", name, e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if not self._eos:
                    unc.futures = [f for _, r in unc.results for f in self._send_all(r)]
        self._unc = _Uncommitted()
        self._after_commit(unc)  # step 5

    def _wait_acknowledged(self, futures: list[Any]) -> None:
        assert self.producer is not None
        self.producer.flush(timeout=self.cfg.kafka.request_timeout_ms / 1000)
        failed = [f for f in futures if not f.is_done or f.failed()]
        if failed:
            first = failed[0].exception if failed[0].is_done else "not acknowledged in time"
            raise DeliveryFailed(f"{len(failed)} of {len(futures)} outputs failed: {first}")

    def _send_all(self, result: BatchResult) -> list[Any]:
        assert self.producer is not None
        k = self.cfg.kafka
        send = self.producer.send
        futures = [send(k.output_topic, key=m.key, value=m.value) for m in result.events]
        for m in result.dead_letters:
            futures.append(send(k.dead_letter_topic, **_fit_dead_letter(m)))
        return futures

    def _abort_quietly(self) -> None:
        assert self.producer is not None
        try:
            self.producer.abort_transaction()
        except KafkaError as e:
            if type(e).__name__ in _FATAL_PRODUCER_ERRORS:
                raise
            log.warning("abort_transaction failed: %s", e)

    def _rewind(self, first: dict[TopicPartition, int]) -> None:
        """Seek still-owned partitions back to the first uncommitted offset."""
        assert self.consumer is not None
        owned = self.consumer.assignment()
        for tp, off in first.items():
            if tp in owned:
                self.consumer.seek(tp, off)

    def _after_commit(self, unc: _Uncommitted) -> None:
        now = time.time()
        for n, result in unc.results:
            self.metrics.on_batch(
                n,
                result.scoring_seconds,
                result.scored_by_group,
                result.anomalies_by_group,
                result.dead_by_reason,
                result.score_ratio,
            )
            lat = now - np.asarray(result.reading_ts_ms, dtype=np.float64) / 1000.0
            self.metrics.on_committed(now, lat)
            self.batches_done += 1
            self.readings_done += n

    # -- outages, housekeeping ---------------------------------------------------------------

    def _kafka_error(self, where: str, e: Exception) -> None:
        self.metrics.kafka_errors.labels(kind=type(e).__name__).inc()
        log.warning("kafka error during %s: %s: %s", where, type(e).__name__, e)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        self.health.update(broker_ok=False)

    def _outage_over(self) -> None:
        if self._outage_since is not None:
            log.info("broker reachable again after %.1fs", time.monotonic() - self._outage_since)
        self._outage_since = None
        self.health.update(broker_ok=True)

    def _check_give_up(self) -> None:
        if self._outage_since is None:
            return
        down = time.monotonic() - self._outage_since
        if down > self.cfg.kafka.outage_give_up_s:
            raise GiveUp(
                f"broker unreachable for {down:.0f}s "
                f"(kafka.outage_give_up_s = {self.cfg.kafka.outage_give_up_s:.0f})"
            )

    def _housekeeping(self) -> None:
        self._refresh_lag()
        self._check_give_up()
        self._maybe_reload()
        self.metrics.ready.set(1 if self.health.readiness()[0] else 0)

    def _refresh_lag(self) -> None:
        """Ask the broker for log-end offsets: measures lag and proves the broker answers."""
        assert self.consumer is not None
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        try:
            ends = self.consumer.end_offsets(assigned, timeout_ms=5000)
        except (KafkaTimeoutError, KafkaError) as e:
            self._kafka_error("end_offsets", e)
            return
        self._outage_over()
        for tp in assigned:
            try:
                pos = self.consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                continue
            end = ends.get(tp)
            if pos is not None and end is not None:
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, end - pos)
                )

    def _maybe_reload(self) -> None:
        try:
            det = self.models.poll()
        except ArtifactError as e:
            self.metrics.model_reloads.labels(result="failure").inc()
            log.error("new model version rejected, keeping %s: %s", self.models.current_version, e)
            return
        if det is not None:
            # Deliver what the old model scored before switching (events name their model).
            self._flush_all()
            self.set_detector(det)
            self.metrics.model_reloads.labels(result="success").inc()

    # -- rebalance callbacks -----------------------------------------------------------------

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Deliver and commit everything held before the partitions move.

        kafka-python runs rebalance listeners on the consumer's I/O thread, where the
        blocking ``commit()`` is refused; so this is a coroutine that awaits the offset
        commit. Producer calls (flush, transaction commit) run on the producer's own
        thread and may block here. One attempt only: retrying would stall the group's
        rebalance; on failure the new owner replays from the last commit.
        """
        self._deliver_pending()
        unc, self._unc = self._unc, _Uncommitted()
        if unc.results:
            log.info("partitions revoked; committing %d scored batch(es) first", len(unc.results))
            try:
                await self._commit_for_revoke(unc)
            except KafkaError as e:
                self._kafka_error("revoke commit", e)
                if self._eos:
                    self._abort_quietly()
                log.warning(
                    "could not commit before the rebalance (%s); the partitions' "
                    "next owner replays from the last commit",
                    type(e).__name__,
                )
            else:
                self._after_commit(unc)
        for tp in revoked:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    async def _commit_for_revoke(self, unc: _Uncommitted) -> None:
        assert self.consumer is not None and self.producer is not None
        if self._eos:
            if not unc.in_transaction:
                raise DeliveryFailed("transaction was aborted before the rebalance")
            self.producer.send_offsets_to_transaction(unc.offsets(), self.consumer.group_metadata())
            self.producer.commit_transaction()
            return
        self._wait_acknowledged(unc.futures)
        await self.consumer.commit_async(offsets=unc.offsets())

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self.consumer is not None
        self.metrics.rebalances.inc()
        n = len(self.consumer.assignment())
        self.health.update(assigned_partitions=n)
        self._outage_over()  # the group coordinator answered
        log.info(
            "assigned %d partition(s): %s",
            n,
            ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(assigned)),
        )


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.worker.on_assigned(assigned)


def _fit_dead_letter(m: OutputMessage) -> dict[str, Any]:
    """Producer kwargs for a dead letter, dropping a value too large to fit beside headers.

    A record near the broker's size limit plus our error headers would be refused forever;
    the headers (source topic/partition/offset) still let an operator fetch the original.
    """
    value, headers = m.value, m.headers
    if value is not None and len(value) > 1_048_576 - _DLQ_VALUE_MARGIN:
        headers = [*headers, ("sensor_anomaly.error.value_dropped", b"too large to copy")]
        value = None
    return {"key": m.key, "value": value, "headers": headers}
