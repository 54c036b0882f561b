"""The Kafka adapter: poll → batch → score → publish → commit, with the delivery contract.

Delivery contract (``_deliver_pending`` runs steps 1-2 per batch; ``_commit`` runs 3-5 for
every batch scored since the last commit, at most every ``kafka.commit_interval_ms``, and
always before a rebalance, a model switch and a shutdown):

At least once (default):
    1. score the batch (pure; bad records become dead letters, never exceptions);
       1b. with per-device state (worker/stateful.py): apply the incident rules, record
       the state changes, and add the incident events to the batch's outputs;
    2. send every event and dead letter of the batch to the producer (asynchronously); if a
       send raises, the batch is marked for re-sending: nothing after it is trusted;
    3. flush the producer and check every send since the last commit was acknowledged
       (``acks=all``, idempotent producer); if any failed or was never handed over, nothing
       is committed and *all* outputs since the last commit are sent again after a back-off
       (duplicates carry the same ``event_id``), until acknowledged, a stop request (left
       uncommitted: the next owner replays) or ``kafka.outage_give_up_s`` (exit 3);
       3b. send the state changes to the compacted changelog and wait for them too (a
       replay after a crash here skips readings the restored state already applied);
    4. check this member still holds a valid group generation, then commit each
       partition's offset (one past its last scored record) synchronously;
    5. only then update metrics.
    A crash anywhere before 4 replays the uncommitted batches after restart; nothing is
    skipped.

Exactly once (``kafka.delivery = exactly_once``):
    1. score the batch (1b as above);
    2. (begin a transaction if none is open) send events, dead letters and incident events
       in it; 2b. at commit time, the state changes to the changelog in the same transaction;
    3. check this member still holds a valid group generation, then add the offsets to the
       transaction with the consumer's group metadata (KIP-447 fencing of zombies);
    4. commit the transaction, waiting at most ``kafka.request_timeout_ms``;
    5. only then update metrics.
    Any failure in 2-4 (abortable, fatal, fenced, or a commit whose outcome is unknown)
    takes one path: drop every held batch, re-create the producer (``init_transactions``
    completes or aborts the open transaction on the broker, so nothing of it can become
    visible later), seek every owned partition back to its *committed* offset, and score
    again. Outputs are deterministic, so readers see each output exactly once whichever way
    the open transaction went; we never re-send a transaction's outputs while its outcome
    is unknown. Readers of the output topics must use ``isolation.level=read_committed``.

Per-device state is restored from the changelog for every newly assigned partition before
any of its records is scored (after the committed offsets are fetched, so a previous
owner's open transaction is resolved first); a dropped transaction reloads it.

Group membership: a member that has lost its generation (evicted after a stall: a zombie)
commits nothing: ``on_partitions_lost`` and the generation check in step 3/4 drop its
batches (and, exactly-once, abort its transaction by re-initialising), leaving them to the
partitions' new owner. If a commit fails because our partitions were reassigned, the
uncommitted batches are dropped and the consumer rewinds to their first offsets.
Rebalance: everything held is delivered and committed in ``on_partitions_revoked``
(an async listener: kafka-python runs it on its I/O thread) before the partitions move,
so a rebalance loses nothing and, when that commit succeeds, duplicates nothing.
Shutdown: after a stop request the open batch is scored, delivered and committed (one
bounded attempt), and the clients closed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka import TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from detector import ArtifactError, Detector
from worker.clients import ClientAdapter, adapter_for
from worker.clients.kafka_python import StartupError
from worker.config import WorkerConfig
from worker.incidents import ThresholdMultipliers
from worker.memory import DeviceMemory
from worker.metrics import WorkerMetrics
from worker.model_source import ModelSource, trained_timestamp
from worker.pipeline import BatchResult, Scorer
from worker.records import OutputMessage
from worker.stateful import Produced, StatefulStage
from worker.status import DriftWindow, WorkerStatus

__all__ = ["GiveUp", "StartupError", "Worker"]

log = logging.getLogger(__name__)

_REASSIGNED_ERRORS = frozenset(
    {
        "CommitFailedError",
        "IllegalGenerationError",
        "UnknownMemberIdError",
        "RebalanceInProgressError",
        "FencedInstanceIdError",
    }
)
_AUTH_ERRORS = ("Authentication", "Authorization", "SaslAuthentication")
# Leave room for headers and the record overhead under the producer's request limit.
_DLQ_VALUE_MARGIN = 16_384
# Stop-time operations must fit the CLI's 30 s grace with room for closing the clients.
_STOP_OP_TIMEOUT_S = 8.0


class GiveUp(RuntimeError):
    """The broker stayed unreachable past ``kafka.outage_give_up_s``: exit, let a supervisor
    restart us."""


class DeliveryFailed(KafkaError):  # type: ignore[misc]
    """Some outputs of a batch were not acknowledged.

    ``only_pending``: none of them failed; they are still in flight in the client.
    """

    def __init__(self, message: str, only_pending: bool = False) -> None:
        super().__init__(message)
        self.only_pending = only_pending


class _Reassigned(Exception):
    """This member holds no valid generation: its partitions belong to someone else."""


class _Abandoned(Exception):
    """A stop was requested while outputs could not be delivered: leave them uncommitted."""


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
    # Incident events of those batches (per-device state: worker/stateful.py).
    extras: list[Produced] = field(default_factory=list)
    futures: list[Any] = field(default_factory=list)
    next_offset: dict[TopicPartition, int] = field(default_factory=dict)
    first_offset: dict[TopicPartition, int] = field(default_factory=dict)
    started: float = 0.0
    in_transaction: bool = False
    # At least once: some output was not handed to the producer; re-send all before commit.
    resend: bool = False
    # Exactly once: a send or begin failed; the transaction cannot be committed.
    failed: BaseException | None = None

    def add(self, pending: _Pending, n: int, result: BatchResult) -> None:
        if not self.results:
            self.started = time.monotonic()
        self.results.append((n, result))
        self.next_offset.update(pending.next_offset)
        for tp, off in pending.first_offset.items():
            self.first_offset.setdefault(tp, off)

    def offsets(self) -> dict[TopicPartition, OffsetAndMetadata]:
        return {tp: OffsetAndMetadata(off, "", -1) for tp, off in self.next_offset.items()}


def _is_auth_error(e: BaseException) -> bool:
    return any(a in type(e).__name__ for a in _AUTH_ERRORS)


class Worker:
    """One consumer-group member. Build with clients (or let ``run`` build them)."""

    def __init__(
        self,
        cfg: WorkerConfig,
        metrics: WorkerMetrics,
        health: WorkerStatus,
        models: ModelSource,
        client: ClientAdapter | None = None,
        instance_id: str = "",
        stage: StatefulStage | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.health = health
        self.models = models
        self.instance_id = instance_id or cfg.kafka.instance_id or "worker"
        # Durable per-device state (incidents, windows): None when nothing needs it.
        self.stage = stage
        self.memory = stage.memory if stage is not None and stage.memory is not None else None
        if self.memory is None:
            self.memory = DeviceMemory()  # in memory only: windows still work, not durable
        self._multipliers = ThresholdMultipliers.parse(cfg.incidents.threshold_multipliers)
        self.drift = DriftWindow(on_change=lambda facts: self.health.update(drift=facts))
        # The Kafka library behind the contract (kafka.client): kafka-python or confluent.
        self.client = client or adapter_for(cfg)
        self._consumer_factory: Callable[[WorkerConfig, str], Any] = self.client.build_consumer
        self._producer_factory: Callable[[WorkerConfig, str], Any] = self.client.build_producer
        self._stop = False
        self.consumer: Any = None  # the adapter's consumer (kafka-python's interface)
        self.producer: Any = None
        self.scorer: Scorer | None = None
        self._pending = _Pending()
        self._unc = _Uncommitted()
        self._eos = cfg.kafka.delivery == "exactly_once"
        self._outage_since: float | None = None
        # Exactly once: the producer must be re-created before the next transaction
        # (set where re-creating is impossible: the rebalance listener's thread).
        self._needs_reset: str = ""
        self._delivery_failures = 0
        self._last_rejoin = 0.0
        self._dropped_from: dict[TopicPartition, int] = {}
        self.batches_done = 0
        self.readings_done = 0

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and return (signal-handler safe)."""
        self._stop = True
        self.health.update(stopping=True)

    def set_detector(self, det: Detector) -> None:
        old = self.scorer
        stage = self.stage
        self.scorer = Scorer(
            det,
            self.cfg.reading,
            self.cfg.events,
            episodes=old.episodes if old else None,
            # Windows / EWMA state per device, shared across reloads (the Scorer drops it
            # when the new model's window, features or smoothing differ).
            memory=self.memory,
            multipliers=self._multipliers,
            scored_batch=stage is not None and stage.tracker is not None,
        )
        if (det.window > 1 or det.ewma_alpha is not None) and (
            stage is None or stage.memory is None
        ):
            log.warning(
                "model %s keeps per-device windows/smoothing but no durable state store is "
                "configured: a restart or rebalance starts those devices afresh",
                det.info.version,
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
            StartupError: a condition the user must fix (authentication, topics).
        """
        if self.scorer is None:
            self.set_detector(self.models.load_initial())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        next_housekeeping = 0.0
        try:
            if not self._start():
                return  # stopped during start-up
            while not self._stop:
                if max_batches is not None and self.batches_done >= max_batches:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self.health.beat()
                if self._needs_reset:
                    self._reset_eos(self._needs_reset)
                    continue
                self._poll_once()
                now = time.monotonic()
                if now >= next_housekeeping:
                    self._housekeeping()
                    next_housekeeping = now + min(5.0, self.cfg.model.reload_interval_s)
            # Stop requested: finish what we hold, deliver and commit it.
            with contextlib.suppress(_Abandoned):
                if not self._needs_reset:
                    self._flush_all()
        finally:
            self.close()

    def _start(self) -> bool:
        """Check topics, build the clients, subscribe. False if stopped meanwhile.

        Broker trouble is retried with back-off until ``kafka.outage_give_up_s`` (GiveUp);
        authentication and topic problems are :class:`StartupError` (the user must act).
        """
        k = self.cfg.kafka
        reported: set[str] = set()
        backoff = 0.5
        while True:
            if self._stop:
                return False
            self.health.beat()
            try:
                missing = self.client.ensure_topics(
                    self.cfg, timeout_ms=min(k.request_timeout_ms, 5000)
                )
                if not missing:
                    self.health.update(problem="")
                    break
                problem = f"input topic(s) {', '.join(missing)} do not exist"
                if problem not in reported:
                    log.error(
                        "%s; waiting for them (create them or fix kafka.input_topics)", problem
                    )
                    reported.add(problem)
                self.health.update(problem=problem, broker_ok=True)
                self._sleep(5.0)
            except StartupError:
                raise
            except KafkaError as e:
                if _is_auth_error(e):
                    raise StartupError(_auth_message(e)) from None
                self._kafka_error("start-up", e, quiet="start-up" in reported)
                reported.add("start-up")
                self._check_give_up()
                self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self._outage_over()
        self.producer = self._new_producer()
        if self.producer is None or (self._eos and not self._init_transactions(self.producer)):
            return False
        if not self._join_group("consumer start"):
            return False
        if self.stage is not None:  # before the first poll, which restores assigned state
            parts = self.consumer.partitions_for_topic(k.input_topics[0]) or {0}
            self.stage.start(len(parts))
        return True

    def _join_group(self, what: str) -> bool:
        """Build the consumer and subscribe it (the join happens in the next poll).
        False if stopped meanwhile."""
        self.consumer = self._build(self._consumer_factory, what)
        if self.consumer is None:
            return False
        self._await_input_metadata()
        self.consumer.subscribe(list(self.cfg.kafka.input_topics), listener=_Listener(self))
        return True

    def _await_input_metadata(self) -> None:
        """Have the consumer's metadata cache hold the input topics before it joins.

        The group leader assigns from its own cache: a first join before the cache knows a
        topic assigns none of its partitions, and kafka-python notices only at the next
        metadata refresh (``metadata_max_age_ms``, 5 min by default) — the "restarted
        worker holds 0 partitions for minutes" defect.
        """
        assert self.consumer is not None
        deadline = time.monotonic() + 15.0
        while not self._stop and time.monotonic() < deadline:
            self.health.beat()
            try:
                if all(self.consumer.partitions_for_topic(t) for t in self.cfg.kafka.input_topics):
                    return
            except KafkaError as e:
                self._kafka_error("metadata", e, quiet=True)
            time.sleep(0.2)
        log.warning("input topic metadata not loaded before joining; assignment may lag")

    def _new_producer(self) -> Any | None:
        return self._build(self._producer_factory, "producer start")

    def _build(self, factory: Callable[[WorkerConfig, str], Any], what: str) -> Any | None:
        """Build a client, retrying while the broker is unreachable (kafka-python's
        constructors bootstrap and raise KafkaTimeoutError). None if stopped meanwhile.

        Raises:
            GiveUp: unreachable past ``kafka.outage_give_up_s``.
            StartupError: the broker refused our credentials.
        """
        backoff = 0.5
        while True:
            if self._stop:
                return None
            self.health.beat()
            try:
                return factory(self.cfg, self.instance_id)
            except KafkaError as e:
                if _is_auth_error(e):
                    raise StartupError(_auth_message(e)) from None
                self._kafka_error(what, e)
                self._check_give_up()
                self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _init_transactions(self, producer: Any) -> bool:
        """``init_transactions`` with retries (it waits ``max_block_ms`` per attempt)."""
        backoff = 0.2
        while True:
            if self._stop:
                return False
            self.health.beat()
            try:
                producer.init_transactions()
                return True
            except KafkaError as e:
                if _is_auth_error(e):
                    raise StartupError(_auth_message(e)) from None
                self._kafka_error("init_transactions", e)
                self._check_give_up()
                self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _sleep(self, seconds: float) -> None:
        """Sleep in small steps, returning early on a stop request."""
        end = time.monotonic() + seconds
        while not self._stop and time.monotonic() < end:
            self.health.beat()
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    def close(self) -> None:
        if self.stage is not None:
            self.stage.stop()
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False, timeout_ms=5000)
            except Exception:
                log.exception("error closing consumer")
            self.consumer = None
        if self.producer is not None:
            try:
                self.producer.close(timeout=5)
            except Exception:
                log.exception("error closing producer")
            self.producer = None
        self.health.update(assigned_partitions=0, assignment=())
        self.health.set_member(False)
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
        if polled:
            self.health.progress()
            if self._outage_since is not None:
                self._outage_over()  # records arrived: the broker is back
        if self.stage is not None and self.stage.needs_restore():
            # Newly assigned partitions: their state before any of their records is scored.
            self._restore_state()
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
        if self._needs_reset:
            return  # the reset drops what we hold and rewinds; deliver nothing before it
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
        unc = self._unc
        extras = self.stage.process(result) if self.stage is not None else []  # step 1b
        if self._eos and not unc.in_transaction and unc.failed is None:
            try:
                self.producer.begin_transaction()
                unc.in_transaction = True
            except KafkaError as e:
                unc.failed = e
        unc.add(pending, len(pending.records), result)
        unc.extras.extend(extras)
        if unc.resend or unc.failed is not None:
            return  # the commit step re-sends (ALO) or resets (EOS) everything held
        try:
            self._send_all(result, unc.futures)  # step 2
            self._send_produced(extras, unc.futures)
        except KafkaError as e:
            # A send can fail synchronously (metadata timeout, buffer full, broker gone):
            # the futures created so far are kept, but the batch counts as not handed over.
            self._kafka_error("send", e)
            self.health.update(delivery_ok=False)
            if self._eos:
                unc.failed = e
            else:
                unc.resend = True

    def _commit(self) -> None:
        """Steps 3-5 for every uncommitted batch; see the module docstring."""
        if self._eos:
            self._commit_eos()
        else:
            self._commit_alo()

    def _op_timeout_s(self) -> float:
        if self._stop:
            return _STOP_OP_TIMEOUT_S
        return self.cfg.kafka.request_timeout_ms / 1000

    def _commit_alo(self) -> None:
        assert self.consumer is not None
        unc = self._unc
        backoff = 0.2
        while True:
            try:
                self._alo_attempt(unc)
                break
            except _Reassigned as e:
                self._drop_reassigned(str(e))
                return
            except KafkaError as e:
                name = type(e).__name__
                if name in _REASSIGNED_ERRORS:
                    self._drop_reassigned(name)
                    return
                self._kafka_error("commit", e)
                if self.stage is not None and name != "DeliveryFailed":
                    self.stage.commit_failed()  # the offset commit failed: state goes again
                if isinstance(e, DeliveryFailed) and e.only_pending and not unc.resend:
                    # Nothing failed, records are still queued in the client (which keeps
                    # retrying them): wait on the same futures; re-sending all of them now
                    # would add one full copy per retry.
                    self.health.update(delivery_ok=False)
                    self._delivery_failures += 1
                elif isinstance(e, DeliveryFailed | KafkaTimeoutError) or unc.resend:
                    unc.resend = True
                    self.health.update(delivery_ok=False)
                    self._delivery_failures += 1
                    if self._delivery_failures % 5 == 0:
                        self._recreate_alo_producer()
                if self._stop:
                    log.warning(
                        "stopping with %d scored batch(es) not delivered (%s); they are "
                        "not committed and will be processed again",
                        len(unc.results),
                        name,
                    )
                    self._unc = _Uncommitted()
                    raise _Abandoned() from None
                self._check_give_up()
                log.warning("delivery failed (%s: %s); retrying in %.1fs", name, e, backoff)
                self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self._unc = _Uncommitted()
        self._after_commit(unc)  # step 5

    def _alo_attempt(self, unc: _Uncommitted) -> None:
        """One try of at-least-once steps 2 (again, if needed), 3, 3b and 4."""
        assert self.consumer is not None
        if unc.resend:
            unc.futures = []
            for _, r in unc.results:
                self._send_all(r, unc.futures)
            self._send_produced(unc.extras, unc.futures)
            unc.resend = False
        self._wait_acknowledged(unc.futures)  # step 3
        if self.stage is not None:  # step 3b: state changes, acknowledged
            changes: list[Any] = []
            try:
                self._send_produced(self.stage.changelog(), changes)
                self._wait_acknowledged(changes)
            except KafkaError:
                self.stage.commit_failed()
                raise
        self._delivery_failures = 0
        self.health.update(delivery_ok=True)
        if self.client.membership(self.consumer) is None:
            raise _Reassigned("this member holds no valid group generation")
        self.consumer.commit(  # step 4
            offsets=unc.offsets(), timeout_ms=int(self._op_timeout_s() * 1000)
        )
        self._outage_over()

    def _recreate_alo_producer(self) -> None:
        """An idempotent producer can stay in an error state; start afresh."""
        old, self.producer = self.producer, None
        if old is not None:
            self._discard(old)
        log.warning("re-creating the producer after repeated delivery failures")
        self.producer = self._new_producer()
        if self.producer is None:
            raise _Abandoned()

    def _commit_eos(self) -> None:
        assert self.consumer is not None and self.producer is not None
        unc = self._unc
        if unc.failed is not None:
            self._reset_eos(f"a send failed ({type(unc.failed).__name__}: {unc.failed})")
            return
        gm = self.client.membership(self.consumer)
        if gm is None:
            self._abort_or_reset()
            self._drop_reassigned("this member holds no valid group generation")
            return
        t = self._op_timeout_s()
        try:
            if self.stage is not None:  # step 2b: state changes in the same transaction
                self._send_produced(self.stage.changelog(), unc.futures)
            self.client.send_offsets_to_transaction(self.producer, unc.offsets(), gm, t)  # step 3
            self.client.commit_transaction(self.producer, t)  # step 4
        except KafkaError as e:
            name = type(e).__name__
            if name in _REASSIGNED_ERRORS:
                self._abort_or_reset()
                self._drop_reassigned(name)
                return
            self._reset_eos(f"{name}: {e}")
            return
        unc.in_transaction = False
        self._outage_over()
        self.health.update(delivery_ok=True)
        self._unc = _Uncommitted()
        self._after_commit(unc)  # step 5

    def _abort_or_reset(self) -> None:
        """Abort the open transaction; if that fails, re-initialise (which aborts it)."""
        if self.producer is None or not self._unc.in_transaction:
            return
        try:
            self.client.abort_transaction(self.producer, self._op_timeout_s())
            self._unc.in_transaction = False
        except KafkaError as e:
            self._needs_reset = f"abort failed ({type(e).__name__})"

    def _reset_eos(self, cause: str) -> None:
        """Drop everything held, re-create the producer, resume from committed offsets."""
        assert self.consumer is not None
        self._needs_reset = ""
        dropped, pending = self._unc, self._pending
        self._unc, self._pending = _Uncommitted(), _Pending()
        fallback = _earliest(self._dropped_from, pending.first_offset, dropped.first_offset)
        self._dropped_from = {}
        self.metrics.kafka_errors.labels(kind="TransactionReset").inc()
        if self.stage is not None:
            self.stage.reset()
        self.health.update(delivery_ok=False)
        log.warning(
            "transaction not committed (%s): dropping %d uncommitted batch(es), "
            "re-creating the producer and resuming from the committed offsets",
            cause,
            len(dropped.results),
        )
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        old, self.producer = self.producer, None
        if old is not None:
            self._discard(old)
        producer = self._new_producer()
        if producer is None:
            raise _Abandoned()
        if not self._init_transactions(producer):
            self._discard(producer)
            raise _Abandoned()
        self._abort_hanging(producer)
        self.producer = producer
        self._rewind_to_committed(fallback)
        self.health.update(delivery_ok=True)

    def _abort_hanging(self, producer: Any) -> None:
        """Abort what the reset left open on our output topics (``ClientAdapter.abort_hanging``).

        Best effort: a failure is logged and the reset goes on (the chaos suite's verifier
        is what shows whether an abandoned transaction got committed)."""
        k = self.cfg.kafka
        topics = [k.output_topic, k.dead_letter_topic]
        if self.stage is not None:
            topics.append(self.stage.topic)
            if self.stage.incident_topic:
                topics.append(self.stage.incident_topic)
        try:
            aborted = self.client.abort_hanging(self.cfg, producer, topics)
        except Exception as e:  # never let the sweep stop the recovery
            log.warning("could not check for open transactions after the reset: %s", e)
            return
        if aborted:
            self.metrics.kafka_errors.labels(kind="HangingTransactionAborted").inc()
            log.warning(
                "aborted %d transaction(s) of this producer left open by the reset: %s",
                len(aborted),
                ", ".join(aborted),
            )

    def _discard(self, producer: Any) -> None:
        """Retire a transactional producer before its replacement starts (see
        ``ClientAdapter.discard_producer``): bounded by twice the request timeout, so a
        client that never lets go delays the reset, never wedges it."""
        limit = max(30.0, 2 * self.cfg.kafka.request_timeout_ms / 1000)
        t0 = time.monotonic()
        try:
            gone = self.client.discard_producer(producer, limit)
        except Exception:
            log.debug("discarding the old producer failed", exc_info=True)
            gone = False
        took = time.monotonic() - t0
        if not gone:
            log.warning(
                "the replaced producer was still running after %.0fs; starting its "
                "replacement anyway",
                took,
            )
        elif took > 1.0:
            log.info("the replaced producer's I/O thread exited after %.1fs", took)

    def _rewind_to_committed(self, fallback: dict[TopicPartition, int]) -> None:
        """Seek each owned partition to its committed offset (or ``fallback``'s)."""
        assert self.consumer is not None
        backoff = 0.2
        for tp in sorted(self.consumer.assignment()):
            while True:
                try:
                    committed = self.consumer.committed(tp, timeout_ms=5000)
                    break
                except KafkaError as e:
                    self._kafka_error("committed", e)
                    self._check_give_up()
                    if self._stop:
                        raise _Abandoned() from None
                    self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            target = committed if committed is not None else fallback.get(tp)
            if target is not None:
                self.consumer.seek(tp, target)
        self._outage_over()

    def _drop_reassigned(self, why: str) -> None:
        log.warning("batch not committed, partitions were reassigned (%s)", why)
        if self.stage is not None:
            self.stage.reset()  # state back to what the committed changelog holds
        unc = self._unc
        self._unc = _Uncommitted()
        self._rewind(unc.first_offset)

    def _wait_acknowledged(self, futures: list[Any]) -> None:
        assert self.producer is not None
        with contextlib.suppress(KafkaTimeoutError):  # judged by the futures below
            self.producer.flush(timeout=self._op_timeout_s())
        failed = [f for f in futures if f.is_done and f.failed()]
        pending = [f for f in futures if not f.is_done]
        if failed or pending:
            first = failed[0].exception if failed else "not acknowledged in time"
            raise DeliveryFailed(
                f"{len(failed) + len(pending)} of {len(futures)} outputs not acknowledged: {first}",
                only_pending=not failed,
            )

    def _send_all(self, result: BatchResult, into: list[Any]) -> None:
        """Hand a batch's outputs to the producer, appending each future to ``into`` as it
        is created (so a send that raises half-way leaves a truthful record)."""
        assert self.producer is not None
        k = self.cfg.kafka
        send = self.producer.send
        for m in result.events:
            into.append(send(k.output_topic, key=m.key, value=m.value))
        for m in result.dead_letters:
            into.append(send(k.dead_letter_topic, **_fit_dead_letter(m)))

    def _send_produced(self, items: list[Produced], into: list[Any]) -> None:
        """Hand incident events / changelog records to the producer (futures into ``into``)."""
        if not items:
            return
        assert self.producer is not None
        send = self.producer.send
        for m in items:
            if m.partition is None:
                into.append(send(m.topic, key=m.key, value=m.value))
            else:
                into.append(send(m.topic, key=m.key, value=m.value, partition=m.partition))

    def _restore_state(self) -> None:
        """Load newly assigned partitions' state from the changelog (retried on failure).

        The committed offsets are fetched first (``position``: read_committed fetches wait
        for a pending transactional offset commit to resolve), so a previous owner's open
        transaction is resolved before its changelog partition is read.
        """
        assert self.consumer is not None and self.stage is not None
        backoff = 0.2
        while self.stage.needs_restore():
            try:
                for tp in list(self.consumer.assignment()):
                    self.consumer.position(tp, timeout_ms=10_000)
                self.stage.restore_pending()
            except (KafkaError, RuntimeError) as e:
                self._kafka_error("state restore", e)
                self._check_give_up()
                if self._stop:
                    raise _Abandoned() from None
                self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self.health.progress()  # a long restore is work, not a fetch stall
        self._outage_over()

    def _rewind(self, first: dict[TopicPartition, int]) -> None:
        """Seek still-owned partitions back to the first uncommitted offset."""
        assert self.consumer is not None
        owned = self.consumer.assignment()
        for tp, off in first.items():
            if tp in owned:
                self.consumer.seek(tp, off)

    def _after_commit(self, unc: _Uncommitted) -> None:
        if self.stage is not None:
            self.stage.committed()
        now = time.time()
        self.metrics.on_published(
            sum(len(r.events) for _, r in unc.results),
            sum(len(r.dead_letters) for _, r in unc.results),
            len(unc.extras),
        )
        for n, result in unc.results:
            self.metrics.on_drift(result)
            self.drift.add(result)
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

    def _kafka_error(self, where: str, e: Exception, quiet: bool = False) -> None:
        self.metrics.kafka_errors.labels(kind=type(e).__name__).inc()
        if not quiet:
            log.warning("kafka error during %s: %s: %s", where, type(e).__name__, e)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        self.health.update(broker_ok=False)

    def _outage_over(self) -> None:
        if self._outage_since is not None:
            log.info("broker reachable again after %.1fs", time.monotonic() - self._outage_since)
            # Nothing could be fetched during the outage: the stall clock starts again.
            self.health.progress()
        self._outage_since = None
        self.health.update(broker_ok=True)

    def _check_give_up(self) -> None:
        if self._outage_since is None:
            return
        down = time.monotonic() - self._outage_since
        if down > self.cfg.kafka.outage_give_up_s:
            raise GiveUp(
                f"broker unreachable or failing for {down:.0f}s "
                f"(kafka.outage_give_up_s = {self.cfg.kafka.outage_give_up_s:.0f})"
            )

    def _housekeeping(self) -> None:
        assert self.consumer is not None
        self.health.set_member(self.client.is_stable_member(self.consumer))
        self._maybe_rejoin()
        self._refresh_lag()
        self._check_give_up()
        self._maybe_reload()
        self.metrics.ready.set(1 if self.health.readiness()[0] else 0)

    def _maybe_rejoin(self) -> None:
        """Re-create the consumer when it is stuck: a join that does not complete, or an
        assignment it does not fetch.

        Both seen with kafka-python 3.0.12 under load: (a) a member assigned, revoked at once
        by a second rebalance, then never rejoining until evicted; (b) a member holding its
        partitions, records waiting in them, the broker answering, and nothing returned by
        ``poll`` (upstream dpkp/kafka-python#3131 / #3106 describe the same symptom). Past
        ``3 × session timeout`` (at least 30 s) in either state, and only while the broker
        answers and outputs are acknowledged, the consumer is closed and a new one joins;
        whatever is held is dropped (at least once: replayed by the next owner; exactly
        once: its transaction aborted by the reset). Liveness (``kafka.rejoin_stuck_s``,
        the stall limit) stays the last resort.
        """
        limit = max(30.0, 3 * self.cfg.kafka.session_timeout_ms / 1000)
        now = time.monotonic()
        if now - self._last_rejoin < limit or self._outage_since is not None or self._stop:
            return
        h = self.health
        since = h.unstable_since
        if since is not None and now - since >= limit:
            why = f"not a stable group member for {now - since:.0f}s"
            kind = "RejoinStuck"
        elif (
            h.lag > 0
            and h.broker_ok
            and h.delivery_ok
            and since is None
            and now - max(h.last_progress, self._last_rejoin) >= limit
        ):
            why = f"{h.lag} records waiting in owned partitions and none fetched for {limit:.0f}s"
            kind = "FetchStuck"
        else:
            return
        self._last_rejoin = now
        log.warning("%s: re-creating the consumer to rejoin", why)
        self.metrics.kafka_errors.labels(kind=kind).inc()
        self._drop_all("consumer re-created")
        old = self.consumer
        owned = list(old.assignment())
        self._forget(owned)
        if self.stage is not None:
            self.stage.revoked(owned)
        try:  # bounded; the old member is being thrown away whatever it says
            old.close(autocommit=False, timeout_ms=2000)
        except Exception:
            log.debug("close of the stuck consumer failed", exc_info=True)
        self.consumer = None
        if not self._join_group("consumer restart"):
            raise _Abandoned()

    def _refresh_lag(self) -> None:
        """Ask the broker for log-end offsets: measures lag and proves the broker answers."""
        assert self.consumer is not None
        assigned = list(self.consumer.assignment())
        if not assigned:
            self.health.update(lag=0)
            # Still prove the broker answers: a client may drop its assignment during an
            # outage (librdkafka does), and then nothing else would start the give-up clock.
            try:
                self.consumer.partitions_for_topic(self.cfg.kafka.input_topics[0])
            except KafkaError as e:
                self._kafka_error("metadata", e, quiet=self._outage_since is not None)
            return
        try:
            ends = self.consumer.end_offsets(assigned, timeout_ms=5000)
        except (KafkaTimeoutError, KafkaError) as e:
            # One line when an outage starts; the rest of it is counted, not logged.
            self._kafka_error("end_offsets", e, quiet=self._outage_since is not None)
            return
        if not self._unc.resend and self._unc.failed is None:
            self._outage_over()
        total = 0
        for tp in assigned:
            try:
                pos = self.consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                continue
            end = ends.get(tp)
            if pos is not None and end is not None:
                total += max(0, end - pos)
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, end - pos)
                )
        if total and not self.health.lag:
            self.health.progress()  # the stall clock starts when work appears
        self.health.update(lag=total)

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
        thread and may block here (bounded). One attempt only: retrying would stall the
        group's rebalance; on failure the new owner replays from the last commit.
        """
        assert self.consumer is not None
        if not revoked and not self._unc.results and not self._pending.records:
            return  # the first join: nothing to hand over
        if self.client.membership(self.consumer) is None:
            # Not ours to commit any more (kafka-python may report a lost generation as a
            # revocation on close): same as on_lost.
            self.on_lost(revoked)
            return
        if self._needs_reset:
            self._drop_all("a transaction reset is pending")
        else:
            try:
                self._deliver_pending()
            except KafkaError as e:
                self._kafka_error("revoke delivery", e)
        unc, self._unc = self._unc, _Uncommitted()
        if unc.results:
            log.info("partitions revoked; committing %d scored batch(es) first", len(unc.results))
            try:
                await self._commit_for_revoke(unc)
            except KafkaError as e:
                self._kafka_error("revoke commit", e)
                if self._eos:
                    # Outcome unknown or transaction unusable: re-initialise before the
                    # next transaction (that also aborts this one on the broker).
                    self._needs_reset = f"revoke commit failed ({type(e).__name__})"
                log.warning(
                    "could not commit before the rebalance (%s); the partitions' "
                    "next owner replays from the last commit",
                    type(e).__name__,
                )
            else:
                self._after_commit(unc)
        if self.stage is not None:
            self.stage.revoked(revoked)
        self._forget(revoked)

    def on_lost(self, lost: list[TopicPartition]) -> None:
        """Evicted from the group (e.g. stopped past the session timeout): commit nothing.

        The partitions already belong to another member, which replays from the last
        commit; whatever we hold is dropped. Exactly once, the open transaction must never
        commit: the producer is re-initialised before the next one (aborting it).
        """
        n = len(self._unc.results) + (1 if self._pending.records else 0)
        log.warning(
            "group membership lost (evicted: stalled past kafka.session_timeout_ms?); "
            "dropping %d uncommitted batch(es) of %d partition(s) for their new owner",
            n,
            len(lost),
        )
        self.metrics.kafka_errors.labels(kind="MembershipLost").inc()
        self._drop_all("membership lost")
        if self.stage is not None:
            self.stage.revoked(lost)
        self._forget(lost)

    def _drop_all(self, why: str) -> None:
        if self._eos and (self._unc.in_transaction or self._unc.results):
            self._needs_reset = why
        # Where the dropped records began: the reset seeks there for a partition that has
        # no committed offset yet (nothing else would say where to resume).
        self._dropped_from = _earliest(
            self._dropped_from, self._pending.first_offset, self._unc.first_offset
        )
        self._unc, self._pending = _Uncommitted(), _Pending()

    def _forget(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        self.health.update(assigned_partitions=0, assignment=(), lag=0)

    async def _commit_for_revoke(self, unc: _Uncommitted) -> None:
        assert self.consumer is not None and self.producer is not None
        gm = self.client.membership(self.consumer)
        if gm is None:
            raise DeliveryFailed("no valid group generation")
        t = min(self._op_timeout_s(), 10.0)
        if self._eos:
            if unc.failed is not None or not unc.in_transaction:
                raise DeliveryFailed("the transaction cannot be committed")
            if self.stage is not None:
                self._send_produced(self.stage.changelog(), unc.futures)
            self.client.send_offsets_to_transaction(self.producer, unc.offsets(), gm, t)
            self.client.commit_transaction(self.producer, t)
            return
        if unc.resend:
            raise DeliveryFailed("some outputs were never handed to the producer")
        self._wait_acknowledged(unc.futures)
        if self.stage is not None:
            changes: list[Any] = []
            self._send_produced(self.stage.changelog(), changes)
            self._wait_acknowledged(changes)
        await self.client.commit_in_listener(self.consumer, unc.offsets(), t)

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self.consumer is not None
        self.metrics.rebalances.inc()
        owned = sorted(self.consumer.assignment())
        self.health.update(
            assigned_partitions=len(owned),
            assignment=tuple(f"{tp.topic}/{tp.partition}" for tp in owned),
        )
        self.health.set_member(True)
        # The stall clock (liveness, _maybe_rejoin) restarts: nothing could be fetched from
        # this assignment before it existed.
        self.health.progress()
        if self.stage is not None:
            self.stage.assigned(owned)  # restored before their first record is scored
        self._outage_over()  # the group coordinator answered
        log.info(
            "assigned %d partition(s): %s",
            len(owned),
            ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(assigned)) or "none (standby)",
        )


def _auth_message(e: BaseException) -> str:
    return (
        f"the broker refused our credentials ({type(e).__name__}: {e}); check "
        "kafka.sasl_mechanism and SENSOR_ANOMALY_KAFKA__SASL_USERNAME / "
        "SENSOR_ANOMALY_KAFKA__SASL_PASSWORD (or the ACLs)"
    )


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.worker.on_assigned(assigned)

    async def on_partitions_lost(self, lost: list[TopicPartition]) -> None:
        # kafka-python's default delegates to on_partitions_revoked, which would commit
        # with a stale identity (issue 9, defect 2).
        self.worker.on_lost(lost)


def _earliest(*sources: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """The lowest offset per partition over ``sources`` (where dropped records began)."""
    out: dict[TopicPartition, int] = {}
    for src in sources:
        for tp, off in src.items():
            out[tp] = min(off, out.get(tp, off))
    return out


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
