"""kafka-python (3.x) adapter: client construction, bounded transactional calls, topics.

Why bounded calls: kafka-python's ``commit_transaction``, ``abort_transaction`` and
``send_offsets_to_transaction`` wait on their result without a timeout, so a broker that
stalls (SIGSTOP, a partition of the network) wedges the caller forever. The functions here
wait at most ``timeout_s`` and raise :class:`TxnOutcomeUnknown` otherwise; the loop then
re-creates the producer (``init_transactions`` resolves the open transaction one way or
the other) instead of guessing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import ConsumerGroupMetadata, MemberState

from worker.config import WorkerConfig, kafka_security_kwargs

log = logging.getLogger(__name__)


class TxnOutcomeUnknown(KafkaTimeoutError):  # type: ignore[misc]
    """A transactional call did not complete in time: its outcome is unknown."""


class StartupError(RuntimeError):
    """A start-up condition the user must fix (exit 2): the message says what and how."""


def client_id(cfg: WorkerConfig, instance_id: str) -> str:
    return f"{cfg.kafka.client_id}-{instance_id}"


class _Consumer(KafkaConsumer):  # type: ignore[misc]
    """A ``KafkaConsumer`` whose first join is its only one.

    kafka-python's coordinator records, for the leader, the metadata it assigned from
    (``_assignment_snapshot = _metadata_snapshot``) and rejoins when a later metadata
    update differs. ``_metadata_snapshot`` is built when the coordinator is constructed
    (subscription still empty: ``{}``) and refreshed only by metadata *updates*; when the
    cache already knows the input topics (``Worker._await_input_metadata`` loads them, so
    the first join assigns them), no update lands between ``subscribe()`` and the join. The
    leader then assigns every partition, records ``{}``, and the next metadata response
    (``request_update()`` right after the assignment) triggers a second rebalance: revoke,
    commit, rejoin within 0.1 s of every start, and now and then a second join that stalls
    until ``kafka.rejoin_stuck_s``. Refreshing the snapshot at ``subscribe()`` is what
    kafka-python's PR #1174 does at construction. If the private names ever change, this
    degrades to kafka-python's own behaviour (one extra rebalance), never to an error.
    """

    def subscribe(self, topics: Any = (), pattern: Any = None, listener: Any = None) -> None:
        super().subscribe(topics=topics, pattern=pattern, listener=listener)
        coord = getattr(self, "_coordinator", None)
        build = getattr(coord, "_build_metadata_snapshot", None)
        cluster = getattr(getattr(self, "_client", None), "cluster", None)
        if coord is not None and build is not None and cluster is not None:
            coord._metadata_snapshot = build(self._subscription, cluster)


def build_consumer(cfg: WorkerConfig, instance_id: str = "") -> KafkaConsumer:
    k = cfg.kafka
    return _Consumer(
        bootstrap_servers=k.bootstrap_servers.split(","),
        group_id=k.group_id,
        client_id=client_id(cfg, instance_id or k.instance_id or "worker"),
        enable_auto_commit=False,
        auto_offset_reset=k.auto_offset_reset,
        # Inputs may be written transactionally; never score aborted records. It also makes
        # offset fetches "require stable" (KIP-447): a new owner waits for a pending
        # transactional offset commit to resolve instead of replaying from an older one.
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
        # A safety net for the metadata race in Worker._await_input_metadata (and new
        # partitions): the leader re-assigns within 30 s of a metadata change, not 5 min.
        metadata_max_age_ms=30_000,
        **kafka_security_kwargs(k),
    )


def transactional_id(cfg: WorkerConfig, instance_id: str) -> str:
    k = cfg.kafka
    return f"{k.transactional_id_prefix}-{k.group_id}-{instance_id}"


def build_producer(cfg: WorkerConfig, instance_id: str = "") -> KafkaProducer:
    k = cfg.kafka
    iid = instance_id or k.instance_id or "worker"
    extra: dict[str, Any] = {}
    if k.delivery == "exactly_once":
        extra["transactional_id"] = transactional_id(cfg, iid)
        extra["transaction_timeout_ms"] = k.transaction_timeout_ms
    if k.compression_type != "none":
        extra["compression_type"] = k.compression_type
    return KafkaProducer(
        bootstrap_servers=k.bootstrap_servers.split(","),
        client_id=client_id(cfg, iid),
        acks="all",
        enable_idempotence=True,
        linger_ms=k.linger_ms,
        request_timeout_ms=k.request_timeout_ms,
        # send() blocks this long for a topic's metadata; the default 60 s would stall the
        # loop (and its heartbeat-driven rebalances) when an output topic is missing.
        max_block_ms=min(k.request_timeout_ms, 10_000),
        reconnect_backoff_max_ms=k.reconnect_backoff_max_ms,
        **extra,
        **kafka_security_kwargs(k),
    )


def _wait(result: Any, timeout_s: float, what: str) -> None:
    if not result.wait(timeout_ms=int(timeout_s * 1000)):
        raise TxnOutcomeUnknown(f"{what} did not complete within {timeout_s:.0f}s")


def commit_transaction(producer: KafkaProducer, timeout_s: float) -> None:
    """``producer.commit_transaction()`` that waits at most ``timeout_s``."""
    tm = producer._transaction_manager
    result = tm.begin_commit()
    producer._sender.wakeup()
    _wait(result, timeout_s, "transaction commit")


def abort_transaction(producer: KafkaProducer, timeout_s: float) -> None:
    """``producer.abort_transaction()`` that waits at most ``timeout_s``."""
    tm = producer._transaction_manager
    result = tm.begin_abort()
    producer._sender.wakeup()
    _wait(result, timeout_s, "transaction abort")


def send_offsets_to_transaction(
    producer: KafkaProducer, offsets: Any, group_metadata: Any, timeout_s: float
) -> None:
    """``producer.send_offsets_to_transaction()`` that waits at most ``timeout_s``."""
    tm = producer._transaction_manager
    result = tm.send_offsets_to_transaction(offsets, group_metadata)
    producer._sender.wakeup()
    _wait(result, timeout_s, "adding offsets to the transaction")


async def commit_in_listener(consumer: KafkaConsumer, offsets: Any, timeout_s: float) -> None:
    """Commit offsets from inside a rebalance listener, waiting at most ``timeout_s``.

    kafka-python runs listeners on its I/O thread, where the blocking ``commit()`` is
    refused; awaiting ``commit_async``'s future directly was seen to never return during a
    join (the worker then held the whole group's rebalance). This polls the future with the
    I/O loop's own sleep, so the loop keeps running, and gives up after ``timeout_s``.
    """
    fut = consumer.commit_async(offsets=offsets)
    net = consumer._coordinator._manager._net
    deadline = time.monotonic() + timeout_s
    while not fut.is_done:
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(
                f"offset commit in the rebalance listener took over {timeout_s:.0f}s"
            )
        await net.sleep(0.02)
    if fut.exception is not None:
        raise fut.exception


def membership(consumer: KafkaConsumer) -> Any | None:
    """The consumer's group metadata, or None when it holds no valid generation.

    A member whose heartbeat learned it was evicted (a zombie: stopped past its session
    timeout) keeps running with generation -1; a transactional offset commit carrying
    generation -1 skips the broker's KIP-447 fencing and would rewind the group's offsets.
    Such a member must not commit.
    """
    # Read without the coordinator's lock: this runs inside rebalance listeners, on the
    # client's I/O thread, while another thread may hold that lock waiting for the I/O
    # thread (``consumer.group_metadata()`` there deadlocked a worker mid-join: assigned,
    # revoked at once, then silent until evicted). One attribute read is atomic.
    coord = consumer._coordinator
    gen = coord._generation
    if gen.generation_id is None or gen.generation_id < 0 or not gen.member_id:
        return None
    return ConsumerGroupMetadata(
        group_id=coord.group_id,
        generation_id=gen.generation_id,
        member_id=gen.member_id,
        group_instance_id=coord.group_instance_id,
        state=coord.state,
    )


def is_stable_member(consumer: KafkaConsumer) -> bool:
    """Joined and synced (kafka-python's MemberState is a set of string constants)."""
    return bool(getattr(consumer.group_metadata(), "state", None) == MemberState.STABLE)


def build_admin(cfg: WorkerConfig, timeout_ms: int) -> KafkaAdminClient:
    k = cfg.kafka
    return KafkaAdminClient(
        bootstrap_servers=k.bootstrap_servers.split(","),
        client_id=f"{k.client_id}-admin",
        request_timeout_ms=max(timeout_ms, 1000),
        bootstrap_timeout_ms=timeout_ms,
        reconnect_backoff_max_ms=k.reconnect_backoff_max_ms,
        **kafka_security_kwargs(k),
    )


def discard_producer(producer: KafkaProducer, timeout_s: float) -> bool:
    """Close a transactional producer that is being replaced, and wait (at most
    ``timeout_s``) until its I/O thread has exited; False if it is still running.

    Why: kafka-python's ``close(timeout)`` flushes first, and ``flush`` raises
    ``KafkaTimeoutError`` when a batch is still unacknowledged, so ``close(timeout=0)`` on a
    producer cut off from the broker raises *before* it stops the sender thread: the old
    producer lived on, retrying its batches and transactional requests. After a broker
    SIGKILL such a producer was seen at work 34 s after the reset (fenced at its
    AddOffsetsToTxn once the broker was back), and in those runs records of the abandoned
    transaction were committed by the replacement's next transaction (events and dead
    letters twice under read_committed; 2 of 3 runs of broker_kill, exactly-once). So the
    sender is force-closed first (it drops what it holds, sends nothing more), then the
    producer is closed, and the replacement starts only once the thread has exited.
    """
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()
    try:
        producer.close(timeout=0)
    except Exception:  # the flush inside close raises for unacknowledged batches
        log.debug("close of the replaced producer raised", exc_info=True)
    if sender is None:
        return True
    sender.join(timeout_s)
    return not sender.is_alive()


def abort_hanging(
    cfg: WorkerConfig, producer: KafkaProducer, topics: list[str], timeout_ms: int = 10_000
) -> list[str]:
    """Abort transactions of this producer id still open on ``topics`` after
    ``init_transactions``; returns what was aborted (``topic/partition@offset``).

    Why: after a broker SIGKILL the replacement producer's ``init_transactions`` left the
    abandoned transaction open on an output partition (no abort marker was ever written
    there: the coordinator did not list that partition in the transaction after its
    restart), and the replacement's next commit marker then committed the abandoned
    records too (duplicates under read_committed, chaos broker_kill). After
    ``init_transactions`` no transaction of ours can legitimately be open, so any one
    DescribeProducers shows is aborted with an admin abort (KIP-664, WriteTxnMarkers: the
    principal needs ClusterAction; without it this logs and returns nothing).
    """
    tm = getattr(producer, "_transaction_manager", None)
    pid = getattr(getattr(tm, "producer_id_and_epoch", None), "producer_id", None)
    if pid is None or pid < 0:
        return []
    return abort_open_transactions(cfg, pid, topics, timeout_ms)


OFFSETS_TOPIC = "__consumer_offsets"


def offsets_partition(group_id: str, partitions: int) -> int:
    """The partition of ``__consumer_offsets`` that holds ``group_id``'s offsets: the
    broker's ``Utils.abs(groupId.hashCode()) % partitions`` (Java's String.hashCode over
    UTF-16 code units, 32-bit signed; Kafka's ``Utils.abs`` is ``Math.abs`` with
    ``Integer.MIN_VALUE`` mapped to 0)."""
    h = 0
    data = group_id.encode("utf-16-be")
    for i in range(0, len(data), 2):
        h = (31 * h + (data[i] << 8 | data[i + 1])) & 0xFFFFFFFF
    signed = h - (1 << 32) if h & 0x80000000 else h
    positive = 0 if signed == -(1 << 31) else abs(signed)
    return positive % max(1, partitions)


def abort_open_transactions(
    cfg: WorkerConfig,
    producer_id: int,
    topics: list[str],
    timeout_ms: int = 10_000,
    admin: KafkaAdminClient | None = None,
) -> list[str]:
    """Admin-abort every transaction of ``producer_id`` that DescribeProducers shows open
    on a partition of ``topics`` or on the group's partition of ``__consumer_offsets``
    (``send_offsets_to_transaction`` wrote there); returns ``topic/partition@first offset``
    of each.

    The contract for callers: call it only when the producer has just finished
    ``init_transactions`` and begun nothing, so every open transaction of that id is
    an abandoned one. Shared by both client adapters (librdkafka's admin has neither
    DescribeProducers nor the admin abort). ``admin`` is closed on return.
    """
    from kafka.admin._transactions import AbortTransactionSpec

    admin = admin or build_admin(cfg, timeout_ms)
    aborted: list[str] = []
    try:
        parts: list[TopicPartition] = []
        for t in admin.describe_topics([*topics, OFFSETS_TOPIC]):
            name = t.get("name", t.get("topic"))
            ids = [p.get("partition_index", p.get("partition")) for p in t.get("partitions", [])]
            if name == OFFSETS_TOPIC:
                # The transaction's offsets went to the group's partition of the offsets
                # topic; left open there, every read_committed OffsetFetch of the group
                # (librdkafka's committed(), require_stable) answers UNSTABLE_OFFSET_COMMIT
                # until it times out, and the group never resumes (chaos broker_kill, confluent).
                ids = [offsets_partition(cfg.kafka.group_id, len(ids))] if ids else []
            parts.extend(TopicPartition(name, i) for i in ids)
        if not parts:
            return []
        states = admin.describe_producers(parts)
        for tp, state in states.items():
            for ps in state.active_producers:
                if ps.producer_id != producer_id or ps.current_transaction_start_offset < 0:
                    continue
                # The coordinator epoch DescribeProducers reports: with -1 the leader
                # refused the abort as TransactionCoordinatorFenced.
                admin.abort_transaction(
                    AbortTransactionSpec(tp, producer_id, ps.producer_epoch, ps.coordinator_epoch)
                )
                aborted.append(f"{tp.topic}/{tp.partition}@{ps.current_transaction_start_offset}")
    finally:
        admin.close()
    return aborted


def build_restore_consumer(cfg: WorkerConfig) -> KafkaConsumer:
    """A consumer without a group for :meth:`worker.state.StateStore.restore` (changelog
    partitions are assigned by hand and read to their end, ``read_committed``)."""
    k = cfg.kafka
    return KafkaConsumer(
        bootstrap_servers=k.bootstrap_servers.split(","),
        group_id=None,
        client_id=f"{k.client_id}-state-restore",
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=k.max_partition_fetch_bytes,
        **kafka_security_kwargs(k),
    )


def ensure_changelog(cfg: WorkerConfig, topic: str, partitions: int) -> bool:
    """Create (or check) the compacted changelog ``topic``; True if it was created.

    Raises:
        ChangelogError: it exists mis-shaped (see ``ensure_changelog_topic``).
    """
    from worker.state.store import ensure_changelog_topic

    k = cfg.kafka

    def admin() -> KafkaAdminClient:
        return KafkaAdminClient(
            bootstrap_servers=k.bootstrap_servers.split(","),
            client_id=f"{k.client_id}-state-admin",
            bootstrap_timeout_ms=10_000,
            **kafka_security_kwargs(k),
        )

    return ensure_changelog_topic(
        admin, topic, max(1, partitions), replication_factor=k.topic_replication
    )


class _Diagnosis(logging.Handler):
    """Listens to kafka-python's connection log for causes it does not raise.

    kafka-python reports a refused password or an untrusted certificate only in its logs,
    then fails the bootstrap with a bare timeout; this recovers the cause so the user gets
    one line that names it instead of a timeout after a wall of client noise.
    """

    _CAUSES = (
        ("AuthenticationFailed", "auth"),
        ("CERTIFICATE_VERIFY_FAILED", "tls"),
        ("certificate verify failed", "tls"),
        ("SSLCertVerificationError", "tls"),
        ("WRONG_VERSION_NUMBER", "tls-mismatch"),
    )

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.cause = ""
        self.detail = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            return
        for needle, cause in self._CAUSES:
            if needle in text:
                self.cause, self.detail = cause, text[-300:]


def _diagnosed(cfg: WorkerConfig, diag: _Diagnosis) -> StartupError | None:
    k = cfg.kafka
    if diag.cause == "auth":
        return StartupError(
            f"the broker at {k.bootstrap_servers} refused our SASL credentials "
            f"(mechanism {k.sasl_mechanism or 'none'}, user {k.sasl_username or '-'}); check "
            "kafka.sasl_mechanism and SENSOR_ANOMALY_KAFKA__SASL_USERNAME / "
            "SENSOR_ANOMALY_KAFKA__SASL_PASSWORD"
        )
    if diag.cause == "tls":
        return StartupError(
            f"the broker's TLS certificate at {k.bootstrap_servers} is not trusted "
            f"(kafka.ssl_cafile = {k.ssl_cafile or 'system default'}); point kafka.ssl_cafile "
            "at the CA that signed it (or fix kafka.ssl_check_hostname)"
        )
    if diag.cause == "tls-mismatch":
        return StartupError(
            f"TLS handshake with {k.bootstrap_servers} failed: the listener does not speak "
            "TLS; check kafka.security_protocol and the port"
        )
    return None


def _topic_partitions(admin: KafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Existing topics among ``topics`` with their partition counts."""
    out: dict[str, int] = {}
    for t in admin.describe_topics(topics):
        name = t.get("topic") or t.get("name")
        err = t.get("error_code", 0)
        if name and not err and t.get("partitions"):
            out[str(name)] = len(t["partitions"])
    return out


def ensure_topics(cfg: WorkerConfig, timeout_ms: int = 5000) -> list[str]:
    """Check the input topics and create missing output / dead-letter topics.

    Returns the input topics that do not exist (the caller reports them once and waits).

    Raises:
        KafkaTimeoutError / KafkaError: the broker did not answer (the caller retries).
        StartupError: an output topic is missing and may not or could not be created.
    """
    k = cfg.kafka
    diag = _Diagnosis()
    client_log = logging.getLogger("kafka")
    client_log.addHandler(diag)
    # Our handler must see connection errors even when the client's level hides them;
    # meanwhile the client's own lines stay out of the log (we report the cause once).
    saved, client_log.level = client_log.level, logging.INFO
    client_log.propagate = False
    try:
        try:
            admin = build_admin(cfg, timeout_ms)
        except KafkaError:
            err = _diagnosed(cfg, diag)
            if err is not None:
                raise err from None
            raise
    finally:
        client_log.removeHandler(diag)
        client_log.setLevel(saved)
        client_log.propagate = True
    try:
        outputs = [k.output_topic, k.dead_letter_topic]
        if cfg.incidents.enabled:
            outputs.append(cfg.incidents.topic)
        existing = _topic_partitions(admin, [*k.input_topics, *outputs])
        missing_inputs = [t for t in k.input_topics if t not in existing]
        missing_outputs = [t for t in outputs if t not in existing]
        if missing_outputs and not k.create_topics:
            raise StartupError(
                f"output topic(s) {', '.join(missing_outputs)} do not exist; create them "
                "or set kafka.create_topics: true"
            )
        if missing_outputs:
            parts = k.topic_partitions or next(
                (existing[t] for t in k.input_topics if t in existing), 1
            )
            spec = {
                t: {"num_partitions": parts, "replication_factor": k.topic_replication}
                for t in missing_outputs
            }
            try:
                admin.create_topics(spec, timeout_ms=timeout_ms, raise_errors=False)
            except KafkaError as e:
                if "Authorization" in type(e).__name__:
                    raise StartupError(
                        f"not allowed to create {', '.join(missing_outputs)} "
                        f"({type(e).__name__}); create them or grant CREATE"
                    ) from None
                raise
            deadline = time.monotonic() + timeout_ms / 1000
            while True:
                now_there = _topic_partitions(admin, missing_outputs)
                if len(now_there) == len(missing_outputs):
                    break
                if time.monotonic() > deadline:
                    raise StartupError(
                        f"could not create {', '.join(missing_outputs)}; create them by hand "
                        "(check the broker's log and kafka.topic_replication)"
                    )
                time.sleep(0.2)
            log.info("created topic(s) %s with %d partition(s)", ", ".join(missing_outputs), parts)
        return missing_inputs
    finally:
        admin.close()
