"""confluent-kafka (librdkafka) adapter: the same functions and objects as the kafka-python one.

The loop (:mod:`worker.loop`) speaks kafka-python's interface; this module wraps
``confluent_kafka.Consumer`` / ``Producer`` in objects that speak exactly the part of it the
loop uses, and raises ``kafka.errors`` exceptions translated from librdkafka's error codes
(so the loop's ``except KafkaError`` paths and its tests on class *names* hold unchanged).

Differences from kafka-python that shape this module (why, not what):

* ``Consumer.consume(n, timeout)`` waits until it has ``n`` messages or the timeout expires;
  kafka-python's ``poll`` returns as soon as anything is there. :meth:`Consumer.poll` waits
  for the first message with ``poll(timeout)`` and then takes what is already fetched with
  ``consume(n - 1, 0)``, so a batch's latency is the loop's ``batch.max_wait_ms``, not the
  idle poll timeout.
* Rebalance callbacks run inside ``poll``/``consume`` on the calling (loop) thread. The
  loop's listener methods are coroutines written for kafka-python's I/O thread; they only
  await :meth:`Consumer.commit_async`, which here commits synchronously, so they are driven
  to completion in one step (:func:`_drive`).
* librdkafka's consumer group metadata carries the member id and generation; a member that
  learned it was evicted has generation -1 and an empty member id, and a transactional
  offset commit with generation -1 skips the broker's KIP-447 fencing (it would rewind the
  group's offsets: issue 9, defect 2). :func:`membership` reads them and refuses, and also
  refuses between ``on_lost`` and the next assignment.
* A synchronous ``Consumer.commit`` can wait forever for an unreachable coordinator, and
  ``Producer.close`` may wait on an open transaction; both run on a helper thread the
  caller waits on for at most its timeout.
* ``produce`` never blocks: a full local queue raises ``BufferError``; :meth:`Producer.send`
  serves delivery reports and retries for at most ``max_block`` seconds, then raises
  ``KafkaTimeoutError`` (the loop's "send failed synchronously" path).

Records handed to the loop are :class:`Record` views over librdkafka's messages: the
attributes the core reads (topic, partition, offset, key, value, headers, timestamp) without
copying anything up front.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any

import confluent_kafka as ck
import kafka.errors as ke
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from worker.clients.kafka_python import (
    StartupError,
    TxnOutcomeUnknown,
    _diagnosed,
    _Diagnosis,
    client_id,
    transactional_id,
)
from worker.config import KafkaSettings, WorkerConfig

__all__ = [
    "Consumer",
    "Producer",
    "Record",
    "RestoreConsumer",
    "StartupError",
    "TxnOutcomeUnknown",
    "abort_hanging",
    "abort_transaction",
    "build_consumer",
    "build_producer",
    "build_restore_consumer",
    "commit_in_listener",
    "commit_transaction",
    "consumer_config",
    "discard_producer",
    "ensure_changelog",
    "ensure_topics",
    "is_stable_member",
    "membership",
    "producer_config",
    "send_offsets_to_transaction",
    "translate",
]

log = logging.getLogger(__name__)
# librdkafka's own log lines: under "kafka" so the CLI's throttle and level apply to them.
_client_log = logging.getLogger("kafka.librdkafka")

_E = ck.KafkaError
_LOCAL_ERRORS: dict[int, type[KafkaError]] = {
    _E._TIMED_OUT: KafkaTimeoutError,
    _E._MSG_TIMED_OUT: KafkaTimeoutError,
    _E._TIMED_OUT_QUEUE: KafkaTimeoutError,
    _E._QUEUE_FULL: KafkaTimeoutError,
    _E._TRANSPORT: ke.KafkaConnectionError,
    _E._ALL_BROKERS_DOWN: ke.KafkaConnectionError,
    _E._RESOLVE: ke.KafkaConnectionError,
    _E._SSL: ke.KafkaConnectionError,
    _E._AUTHENTICATION: ke.SaslAuthenticationFailedError,
    # The loop treats these names as "our partitions were reassigned".
    _E._ASSIGNMENT_LOST: ke.CommitFailedError,
    _E._MAX_POLL_EXCEEDED: ke.CommitFailedError,
    _E._FENCED: ke.ProducerFencedError,
    _E._UNKNOWN_TOPIC: ke.UnknownTopicOrPartitionError,
    _E._UNKNOWN_PARTITION: ke.UnknownTopicOrPartitionError,
    _E._WAIT_COORD: ke.CoordinatorNotAvailableError,
    _E._STATE: ke.IllegalStateError,
}
# librdkafka's socket/request timeouts have upper bounds our settings may exceed.
_MAX_SOCKET_TIMEOUT_MS = 300_000
_MAX_REQUEST_TIMEOUT_MS = 900_000
# kafka-python's default delivery_timeout_ms (at-least-once): how long librdkafka keeps
# retrying a record before failing its delivery report.
_ALO_MESSAGE_TIMEOUT_MS = 120_000
# kafka-python's max_request_size default; the loop sizes dead letters against it.
_MAX_MESSAGE_BYTES = 1_048_576


class LibrdkafkaError(KafkaError):  # type: ignore[misc]
    """A librdkafka error without a kafka-python counterpart; the message names the code."""


def translate(err: ck.KafkaError | BaseException) -> KafkaError:
    """The ``kafka.errors`` exception for a librdkafka error (or a ``KafkaException``).

    Broker error codes (positive) map through ``kafka.errors.for_code`` (same numbers);
    local ones (negative) through a table; anything else is :class:`LibrdkafkaError`. The
    result carries ``retriable``, ``fatal`` and ``txn_requires_abort`` from librdkafka.
    """
    if isinstance(err, ck.KafkaException):
        err = err.args[0] if err.args and isinstance(err.args[0], ck.KafkaError) else err
    if not isinstance(err, ck.KafkaError):
        return LibrdkafkaError(str(err))
    code = err.code()
    cls: type[KafkaError]
    if code > 0:
        cls = ke.for_code(code)
        if cls is ke.UnknownError:
            cls = LibrdkafkaError
    else:
        cls = _LOCAL_ERRORS.get(code, LibrdkafkaError)
    exc = cls(f"{err.name()}: {err.str()}")
    exc.retriable = bool(err.retriable())
    exc.fatal = bool(err.fatal())
    exc.txn_requires_abort = bool(err.txn_requires_abort())
    exc.librdkafka_code = code
    return exc


def _clamp(v: int, hi: int) -> int:
    return max(1, min(int(v), hi))


def security_config(k: KafkaSettings) -> dict[str, Any]:
    """librdkafka TLS/SASL properties, the counterpart of ``kafka_security_kwargs``."""
    out: dict[str, Any] = {"security.protocol": k.security_protocol.lower()}
    if k.security_protocol in ("SSL", "SASL_SSL"):
        out["ssl.endpoint.identification.algorithm"] = "https" if k.ssl_check_hostname else "none"
        for ours, theirs in (
            ("ssl_cafile", "ssl.ca.location"),
            ("ssl_certfile", "ssl.certificate.location"),
            ("ssl_keyfile", "ssl.key.location"),
            ("ssl_password", "ssl.key.password"),
        ):
            if getattr(k, ours):
                out[theirs] = getattr(k, ours)
    if k.security_protocol.startswith("SASL"):
        out["sasl.mechanisms"] = k.sasl_mechanism
        out["sasl.username"] = k.sasl_username
        out["sasl.password"] = k.sasl_password
    return out


def _common_config(k: KafkaSettings, cid: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": k.bootstrap_servers,
        "client.id": cid,
        "reconnect.backoff.max.ms": k.reconnect_backoff_max_ms,
        # New partitions and the metadata race at join (see Worker._await_input_metadata)
        # are noticed within 30 s, as with kafka-python's metadata_max_age_ms.
        "topic.metadata.refresh.interval.ms": 30_000,
        **security_config(k),
    }


def consumer_config(cfg: WorkerConfig, instance_id: str = "") -> dict[str, Any]:
    """librdkafka consumer properties for ``cfg`` (without callbacks)."""
    k = cfg.kafka
    iid = instance_id or k.instance_id or "worker"
    return {
        **_common_config(k, client_id(cfg, iid)),
        "group.id": k.group_id,
        # Offsets are committed by the loop only, explicitly, after delivery.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": k.auto_offset_reset,
        # Never score aborted records; offset fetches wait for pending transactional
        # commits (KIP-447), as with kafka-python.
        "isolation.level": "read_committed",
        "session.timeout.ms": k.session_timeout_ms,
        "heartbeat.interval.ms": k.heartbeat_interval_ms,
        # librdkafka refuses a poll interval below the session timeout (kafka-python does not).
        "max.poll.interval.ms": max(k.max_poll_interval_ms, k.session_timeout_ms),
        "fetch.wait.max.ms": k.fetch_max_wait_ms,
        "max.partition.fetch.bytes": k.max_partition_fetch_bytes,
        "fetch.max.bytes": k.fetch_max_bytes,
        "socket.timeout.ms": _clamp(
            max(k.request_timeout_ms, k.session_timeout_ms + 5000), _MAX_SOCKET_TIMEOUT_MS
        ),
    }


def producer_config(cfg: WorkerConfig, instance_id: str = "") -> dict[str, Any]:
    """librdkafka producer properties for ``cfg`` (without callbacks)."""
    k = cfg.kafka
    iid = instance_id or k.instance_id or "worker"
    conf: dict[str, Any] = {
        **_common_config(k, client_id(cfg, iid)),
        "acks": "all",
        "enable.idempotence": True,
        # kafka-python's (and Java's) partitioner: an event keyed by device goes to the same
        # output partition whichever client the worker runs on.
        "partitioner": "murmur2_random",
        "linger.ms": k.linger_ms,
        "compression.type": k.compression_type,
        "request.timeout.ms": _clamp(k.request_timeout_ms, _MAX_REQUEST_TIMEOUT_MS),
        "socket.timeout.ms": _clamp(k.request_timeout_ms, _MAX_SOCKET_TIMEOUT_MS),
        "message.max.bytes": _MAX_MESSAGE_BYTES,
        "message.timeout.ms": _ALO_MESSAGE_TIMEOUT_MS,
    }
    if k.delivery == "exactly_once":
        conf["transactional.id"] = transactional_id(cfg, iid)
        conf["transaction.timeout.ms"] = k.transaction_timeout_ms
        # librdkafka requires a record's delivery timeout within the transaction's.
        conf["message.timeout.ms"] = k.transaction_timeout_ms
        conf["socket.timeout.ms"] = min(conf["socket.timeout.ms"], k.transaction_timeout_ms)
    return conf


def _drive(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine that awaits nothing truly asynchronous, to completion, now."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("rebalance listener awaited something that is not synchronous")


def _run_bounded(fn: Any, timeout_s: float, what: str) -> Any:
    """Run ``fn`` on a daemon thread; its result, or KafkaTimeoutError after ``timeout_s``."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller
            box.append((False, e))

    t = threading.Thread(target=target, name=f"confluent-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if not box:
        raise KafkaTimeoutError(f"{what} did not complete within {timeout_s:.1f}s")
    ok, value = box[0]
    if ok:
        return value
    raise value


def _construct(cls: Any, conf: dict[str, Any]) -> Any:
    """A librdkafka client; settings it refuses are the user's to fix (StartupError)."""
    try:
        return cls(conf)
    except ck.KafkaException as e:
        err = e.args[0] if e.args else e
        text = err.str() if isinstance(err, ck.KafkaError) else str(err)
        raise StartupError(
            f"the confluent client refused the kafka settings: {text}; fix the kafka.* "
            "settings (or use kafka.client: kafka-python)"
        ) from None


# -- records ---------------------------------------------------------------------------------


def _fetch(c: Any, timeout_ms: int, max_records: int | None) -> list[Any]:
    """Up to ``max_records`` (default 500) messages: wait up to ``timeout_ms`` for the first,
    then take what is already fetched (``consume(n, timeout)`` would wait for all ``n``)."""
    n = max(1, max_records or 500)
    try:
        first = c.poll(max(0, timeout_ms) / 1000)
        msgs = [] if first is None else [first]
        if first is not None and n > 1:
            msgs.extend(c.consume(n - 1, 0))
    except ck.KafkaException as e:
        raise translate(e) from None
    return msgs


class Record:
    """A consumed record with kafka-python's ``ConsumerRecord`` attributes (a view).

    ``topic`` and ``partition`` are filled when polled (they group the batch); the rest are
    read from librdkafka's message when asked for.
    """

    __slots__ = ("_m", "partition", "topic")

    def __init__(self, m: Any, topic: str, partition: int) -> None:
        self._m = m
        self.topic = topic
        self.partition = partition

    @property
    def offset(self) -> int:
        return int(self._m.offset())

    @property
    def key(self) -> bytes | None:
        k: bytes | None = self._m.key()
        return k

    @property
    def value(self) -> bytes | None:
        v: bytes | None = self._m.value()
        return v

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return list(self._m.headers() or ())

    @property
    def timestamp(self) -> int:
        """Milliseconds since the epoch (-1 when the record has none)."""
        return int(self._m.timestamp()[1])

    @property
    def timestamp_type(self) -> int:
        """0 create time, 1 log-append time, -1 none (kafka-python's numbering)."""
        t = self._m.timestamp()[0]
        return {ck.TIMESTAMP_CREATE_TIME: 0, ck.TIMESTAMP_LOG_APPEND_TIME: 1}.get(t, -1)

    def __repr__(self) -> str:
        return f"Record({self.topic}/{self.partition}@{self.offset})"


# -- consumer --------------------------------------------------------------------------------


class Consumer:
    """``confluent_kafka.Consumer`` behind the part of ``KafkaConsumer`` the loop uses."""

    # How often a broker outage reported by librdkafka is raised from poll() (the loop
    # logs each and starts its give-up clock from the first).
    _OUTAGE_REPORT_S = 10.0

    def __init__(self, conf: Mapping[str, Any], op_timeout_s: float = 30.0) -> None:
        self._op_timeout_s = op_timeout_s
        self._c = _construct(
            ck.Consumer, {**conf, "error_cb": self._on_error, "logger": _client_log}
        )
        self._tps: dict[tuple[str, int], TopicPartition] = {}
        self._listener: Any = None
        self._closing = False
        # Holds a valid assignment: set in on_assign, cleared on revoke/lost.
        self._assigned = False
        self._stable = False
        self._error: KafkaError | None = None
        self._outage_reported = 0.0
        self._commit_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="confluent-commit"
        )

    # callbacks (run on the thread calling poll/consume/close) ---------------------------

    def _on_error(self, err: ck.KafkaError) -> None:
        code = err.code()
        if err.fatal() or code == _E._AUTHENTICATION:
            self._error = translate(err)
        elif code == _E._ALL_BROKERS_DOWN:
            now = time.monotonic()
            if now - self._outage_reported >= self._OUTAGE_REPORT_S:
                self._outage_reported = now
                self._error = translate(err)
        _client_log.warning("consumer error: %s: %s", err.name(), err.str())

    def _tp(self, topic: str, partition: int) -> TopicPartition:
        tp = self._tps.get((topic, partition))
        if tp is None:
            tp = self._tps[(topic, partition)] = TopicPartition(topic, partition)
        return tp

    def _kafka_tps(self, parts: Iterable[Any]) -> list[TopicPartition]:
        return [self._tp(p.topic, p.partition) for p in parts]

    def _on_assign(self, c: Any, parts: list[Any]) -> None:
        # Assign before the listener runs, so assignment() inside it is the new one.
        c.assign(parts)
        self._assigned = self._stable = True
        if self._listener is not None and not self._closing:
            _drive(self._listener.on_partitions_assigned(self._kafka_tps(parts)))

    def _on_revoke(self, c: Any, parts: list[Any]) -> None:
        self._stable = False
        try:
            if self._listener is not None and not self._closing:
                _drive(self._listener.on_partitions_revoked(self._kafka_tps(parts)))
        finally:
            self._assigned = False
            c.unassign()

    def _on_lost(self, c: Any, parts: list[Any]) -> None:
        self._assigned = self._stable = False
        try:
            if self._listener is not None and not self._closing:
                _drive(self._listener.on_partitions_lost(self._kafka_tps(parts)))
        finally:
            c.unassign()

    # the interface ---------------------------------------------------------------------

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        self._listener = listener
        try:
            self._c.subscribe(
                list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )  # fmt: skip
        except ck.KafkaException as e:
            raise translate(e) from None

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        """Records by partition: waits up to ``timeout_ms`` for the first, takes at most
        ``max_records`` of what is fetched. Rebalance callbacks run in here.

        Raises a ``KafkaError`` for a fatal client error, refused credentials, or (at most
        every 10 s) all brokers being down.
        """
        msgs = _fetch(self._c, timeout_ms, max_records)
        if self._error is not None:
            err, self._error = self._error, None
            if not msgs:
                raise err
            self._error = err  # report it at the next poll; deliver these records first
        out: dict[TopicPartition, list[Record]] = {}
        lt, lp, lst = "", -1, None
        for m in msgs:
            merr = m.error()
            if merr is not None:
                self._message_error(merr)
                continue
            t, p = m.topic(), m.partition()
            if p != lp or t != lt or lst is None:
                tp = self._tp(t, p)
                lst = out.get(tp)
                if lst is None:
                    lst = out[tp] = []
                lt, lp = t, p
            lst.append(Record(m, t, p))
        return out

    def _message_error(self, e: ck.KafkaError) -> None:
        if e.code() == _E._PARTITION_EOF:
            return
        if e.fatal():
            self._error = translate(e)
        _client_log.warning("consume error: %s: %s", e.name(), e.str())

    def _ck_offsets(self, offsets: Mapping[TopicPartition, Any]) -> list[Any]:
        out = []
        for tp, om in offsets.items():
            off = om.offset if isinstance(om, OffsetAndMetadata) else int(om)
            meta = getattr(om, "metadata", None)
            if meta:
                out.append(ck.TopicPartition(tp.topic, tp.partition, off, metadata=meta))
            else:
                out.append(ck.TopicPartition(tp.topic, tp.partition, off))
        return out

    def commit(
        self, offsets: Mapping[TopicPartition, Any] | None = None, timeout_ms: int | None = None
    ) -> None:
        """Commit ``offsets`` synchronously, waiting at most ``timeout_ms``.

        Raises ``KafkaTimeoutError`` when the commit did not complete in time (it may still
        complete later, with these same offsets), or the translated broker error.
        """
        if not offsets:
            return
        parts = self._ck_offsets(offsets)
        timeout_s = (timeout_ms if timeout_ms is not None else 30_000) / 1000
        fut = self._commit_pool.submit(self._c.commit, offsets=parts, asynchronous=False)
        try:
            res = fut.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise KafkaTimeoutError(
                f"offset commit did not complete within {timeout_s:.1f}s"
            ) from None
        except ck.KafkaException as e:
            raise translate(e) from None
        for p in res or ():
            if p.error is not None:
                raise translate(p.error)

    async def commit_async(self, offsets: Mapping[TopicPartition, Any] | None = None) -> None:
        """For the rebalance listener: a synchronous commit on the calling thread.

        librdkafka runs the listener inside ``poll`` on the loop's thread, where blocking is
        allowed; a commit issued from another thread meanwhile is not served until the
        callback returns (measured: it waits out any timeout), so this one is direct.
        """
        if not offsets:
            return
        try:
            res = self._c.commit(offsets=self._ck_offsets(offsets), asynchronous=False)
        except ck.KafkaException as e:
            raise translate(e) from None
        for p in res or ():
            if p.error is not None:
                raise translate(p.error)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Fetch ``tp`` from ``offset`` next; records of it already fetched are dropped."""
        try:
            self._c.seek(ck.TopicPartition(tp.topic, tp.partition, int(offset)))
        except ck.KafkaException as e:
            raise translate(e) from None

    def committed(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        """The group's committed offset of ``tp`` (None if none)."""
        timeout_s = (timeout_ms if timeout_ms is not None else 30_000) / 1000
        try:
            res = self._c.committed([ck.TopicPartition(tp.topic, tp.partition)], timeout_s)
        except ck.KafkaException as e:
            raise translate(e) from None
        p = res[0]
        if p.error is not None:
            raise translate(p.error)
        return int(p.offset) if p.offset >= 0 else None

    def assignment(self) -> set[TopicPartition]:
        try:
            return set(self._kafka_tps(self._c.assignment()))
        except (ck.KafkaException, RuntimeError):
            return set()

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        """The next offset to fetch (local; None before the first fetch)."""
        try:
            p = self._c.position([ck.TopicPartition(tp.topic, tp.partition)])[0]
        except ck.KafkaException as e:
            raise translate(e) from None
        return int(p.offset) if p.offset >= 0 else None

    def end_offsets(
        self, tps: Iterable[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        """Log-end offsets (asked of the broker: proves it answers)."""
        timeout_s = (timeout_ms if timeout_ms is not None else 30_000) / 1000
        out: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + timeout_s
        for tp in tps:
            left = max(0.1, deadline - time.monotonic())
            try:
                wm = self._c.get_watermark_offsets(
                    ck.TopicPartition(tp.topic, tp.partition), timeout=left, cached=False
                )
            except ck.KafkaException as e:
                raise translate(e) from None
            if wm is None:
                raise KafkaTimeoutError(f"end offsets not returned within {timeout_s:.1f}s")
            out[tp] = int(wm[1])
        return out

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        try:
            md = self._c.list_topics(topic, timeout=5.0).topics.get(topic)
        except ck.KafkaException as e:
            raise translate(e) from None
        if md is None or md.error is not None or not md.partitions:
            return None
        return set(md.partitions)

    def group_metadata(self) -> Any:
        return self._c.consumer_group_metadata()

    def member_id(self) -> str:
        try:
            return self._c.memberid() or ""
        except (ck.KafkaException, RuntimeError):
            return ""

    def close(self, autocommit: bool = False, timeout_ms: int = 5000) -> None:
        """Leave the group; the loop has committed what it holds, so the revoke on the
        way out does not call the listener (and ``autocommit`` must be False)."""
        self._closing = True
        try:
            _run_bounded(self._c.close, timeout_ms / 1000, "consumer close")
        except KafkaTimeoutError:
            log.warning("consumer close did not complete within %d ms", timeout_ms)
        finally:
            self._commit_pool.shutdown(wait=False)


# -- producer --------------------------------------------------------------------------------


class Future:
    """A send's outcome, as kafka-python's ``FutureRecordMetadata`` exposes it to the loop."""

    __slots__ = ("exception", "is_done")

    def __init__(self) -> None:
        self.is_done = False
        self.exception: KafkaError | None = None

    def failed(self) -> bool:
        return self.exception is not None

    def succeeded(self) -> bool:
        return self.is_done and self.exception is None

    def _report(self, err: Any, _msg: Any) -> None:
        self.is_done = True
        if err is not None:
            self.exception = translate(err)


class Producer:
    """``confluent_kafka.Producer`` behind the part of ``KafkaProducer`` the loop uses."""

    def __init__(self, conf: Mapping[str, Any], max_block_s: float = 10.0) -> None:
        self._max_block_s = max_block_s
        #: ``transactional.id`` or None: ``abort_hanging`` looks its producer id up by it.
        self.transactional_id: str | None = conf.get("transactional.id")
        self._p = _construct(
            ck.Producer, {**conf, "error_cb": self._on_error, "logger": _client_log}
        )

    @staticmethod
    def _on_error(err: ck.KafkaError) -> None:
        _client_log.warning("producer error: %s: %s", err.name(), err.str())

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> Future:
        """Queue one record; its :class:`Future` completes when the broker acknowledged it
        (``acks=all``) or its delivery failed. Delivery reports are served by
        :meth:`flush` (and here, while the local queue is full).

        Raises:
            KafkaTimeoutError: the local queue stayed full for ``max_block_s``.
            KafkaError: librdkafka refused the record (e.g. too large).
        """
        fut = Future()
        # librdkafka's "unassigned" partition (-1) lets its partitioner choose by key.
        part = -1 if partition is None else partition
        try:
            self._p.produce(
                topic, value, key, partition=part, headers=headers, on_delivery=fut._report
            )
        except BufferError:
            self._produce_when_room(topic, value, key, headers, fut, part)
        except ck.KafkaException as e:
            raise translate(e) from None
        return fut

    def _produce_when_room(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        fut: Future,
        part: int,
    ) -> None:
        deadline = time.monotonic() + self._max_block_s
        while True:
            self._p.poll(0.05)
            try:
                self._p.produce(
                    topic, value, key, partition=part, headers=headers, on_delivery=fut._report
                )
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError(
                        f"producer queue full for {self._max_block_s:.0f}s "
                        f"({len(self._p)} records waiting)"
                    ) from None
            except ck.KafkaException as e:
                raise translate(e) from None

    def poll(self, timeout_s: float = 0) -> int:
        """Serve delivery reports (and client callbacks); returns how many."""
        return int(self._p.poll(timeout_s))

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every queued record's delivery report.

        Raises:
            KafkaTimeoutError: some were still outstanding after ``timeout`` seconds.
        """
        left = self._p.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} record(s) not delivered within {timeout}s")

    def init_transactions(self) -> None:
        try:
            self._p.init_transactions(self._max_block_s)
        except ck.KafkaException as e:
            raise translate(e) from None

    def begin_transaction(self) -> None:
        try:
            self._p.begin_transaction()
        except ck.KafkaException as e:
            raise translate(e) from None

    def close(self, timeout: float | None = None) -> None:
        """Deliver for at most ``timeout`` seconds, drop the rest, release the client.

        librdkafka's close may wait on an open transaction's abort; it runs on a daemon
        thread so a stalled broker cannot hold the caller (0 = do not wait at all).
        """
        p = self._p
        t = 5.0 if timeout is None else float(timeout)

        def shut() -> None:
            if t > 0:
                p.flush(t)
            p.purge(in_queue=True, in_flight=True)
            p.poll(0)
            p.close()

        try:
            _run_bounded(shut, t + 2.0 if t > 0 else 0.0, "producer close")
        except KafkaTimeoutError:
            if t > 0:
                log.warning("producer close did not complete within %.0fs", t)
        except Exception as e:  # closing is best effort
            log.debug("producer close: %s", e)


# -- the adapter's functions ----------------------------------------------------------------


def discard_producer(producer: Producer, timeout_s: float) -> bool:
    """Close a transactional producer that is being replaced: its queued and in-flight
    requests are purged here, before the replacement starts (librdkafka then sends nothing
    more for it); the close itself runs on a daemon thread (see :meth:`Producer.close`)."""
    try:
        producer._p.purge(in_queue=True, in_flight=True)
    except Exception:  # best effort: the close below purges again
        log.debug("purge of the replaced producer failed", exc_info=True)
    producer.close(timeout=0)
    return True


def abort_hanging(
    cfg: WorkerConfig, producer: Producer, topics: list[str], timeout_ms: int = 10_000
) -> list[str]:
    """Abort transactions of this producer's id still open on ``topics`` after
    ``init_transactions`` (the broker_kill duplicates: see ``kafka_python.abort_hanging``,
    seen with both clients); returns what was aborted (``topic/partition@offset``).

    librdkafka exposes neither the producer id nor DescribeProducers / the admin abort, so
    this asks the transaction coordinator (DescribeTransactions, by ``transactional.id``)
    for the producer id ``init_transactions`` just settled on, and aborts with
    kafka-python's admin, as that adapter does. Needs Describe on the transactional id
    and ClusterAction; without them this raises and the loop logs one line.
    """
    tid = producer.transactional_id
    if not tid:
        return []
    from worker.clients.kafka_python import abort_open_transactions, build_admin

    admin = build_admin(cfg, timeout_ms)
    try:
        desc = admin.describe_transactions([tid]).get(tid)
    except BaseException:
        admin.close()
        raise
    if desc is None or desc.producer_id < 0:
        admin.close()
        return []
    return abort_open_transactions(cfg, desc.producer_id, topics, timeout_ms, admin=admin)


def build_consumer(cfg: WorkerConfig, instance_id: str = "") -> Consumer:
    return Consumer(consumer_config(cfg, instance_id), cfg.kafka.request_timeout_ms / 1000)


def build_producer(cfg: WorkerConfig, instance_id: str = "") -> Producer:
    # As kafka-python's max_block_ms: bounded so a stall cannot hold the loop's rebalances.
    return Producer(
        producer_config(cfg, instance_id), min(cfg.kafka.request_timeout_ms, 10_000) / 1000
    )


async def commit_in_listener(consumer: Consumer, offsets: Any, timeout_s: float) -> None:
    """Commit offsets from inside the rebalance listener.

    librdkafka runs the listener inside ``poll`` on the loop's thread, where a synchronous
    commit is allowed and is the only one served (a commit from another thread waits for the
    callback to return), so this cannot run on the bounded helper thread: it is bounded by
    librdkafka's request timeout (``socket.timeout.ms``) instead of ``timeout_s``.
    """
    await consumer.commit_async(offsets)


def _txn_call(fn: Any, timeout_s: float, what: str, *args: Any) -> None:
    try:
        fn(*args, timeout_s)
    except ck.KafkaException as e:
        err = e.args[0] if e.args else None
        if isinstance(err, ck.KafkaError) and err.code() in (_E._TIMED_OUT, _E._TIMED_OUT_QUEUE):
            raise TxnOutcomeUnknown(f"{what} did not complete within {timeout_s:.0f}s") from None
        raise translate(e) from None


def commit_transaction(producer: Producer, timeout_s: float) -> None:
    """Commit the open transaction, waiting at most ``timeout_s`` (TxnOutcomeUnknown)."""
    _txn_call(producer._p.commit_transaction, timeout_s, "transaction commit")


def abort_transaction(producer: Producer, timeout_s: float) -> None:
    """Abort the open transaction, waiting at most ``timeout_s`` (TxnOutcomeUnknown)."""
    _txn_call(producer._p.abort_transaction, timeout_s, "transaction abort")


def send_offsets_to_transaction(
    producer: Producer, offsets: Mapping[TopicPartition, Any], group_metadata: Any, timeout_s: float
) -> None:
    """Add ``offsets`` ({TopicPartition: OffsetAndMetadata}) to the open transaction with
    the consumer's group metadata (KIP-447), waiting at most ``timeout_s``."""
    parts = [
        ck.TopicPartition(tp.topic, tp.partition, om.offset if hasattr(om, "offset") else int(om))
        for tp, om in offsets.items()
    ]
    _txn_call(
        producer._p.send_offsets_to_transaction,
        timeout_s,
        "adding offsets to the transaction",
        parts,
        group_metadata,
    )


_CGMD_MAGIC = b"CGMDv2:"


def _generation(gm: Any) -> tuple[int, str] | None:
    """(generation, member id) from librdkafka's serialised group metadata, if readable.

    The format (rd_kafka_consumer_group_metadata_write) is the magic, the generation as a
    native-endian int32, then NUL-terminated group id and member id.
    """
    if not isinstance(gm, bytes) or not gm.startswith(_CGMD_MAGIC):
        return None
    body = gm[len(_CGMD_MAGIC) :]
    if len(body) < 6:
        return None
    gen = int.from_bytes(body[:4], "little", signed=True)
    rest = body[4:].split(b"\x00")
    if len(rest) < 2:
        return None
    return gen, rest[1].decode(errors="replace")


def membership(consumer: Consumer) -> Any | None:
    """The consumer's group metadata, or None when it holds no valid generation.

    None when: no assignment since the last revoke/lost (an evicted member: a zombie),
    librdkafka reports no member id, or the metadata's generation is -1. A transactional
    offset commit with generation -1 would skip the broker's fencing and rewind the group.
    """
    if not consumer._assigned or not consumer.member_id():
        return None
    gm = consumer.group_metadata()
    parsed = _generation(gm)
    if parsed is not None and (parsed[0] < 0 or not parsed[1]):
        return None
    return gm


def is_stable_member(consumer: Consumer) -> bool:
    """Joined and assigned (possibly nothing: a standby), not in a rebalance."""
    return consumer._stable and bool(consumer.member_id())


# -- topics ------------------------------------------------------------------------------------


class _AdminErrors:
    """Collects the admin client's error callbacks: librdkafka reports refused credentials and
    TLS failures there, while the request itself just fails or times out."""

    def __init__(self) -> None:
        self.diag = _Diagnosis()

    def __call__(self, err: ck.KafkaError) -> None:
        text = err.str()
        low = text.lower()
        if err.code() == _E._AUTHENTICATION:
            self.diag.cause = "auth"
        elif "certificate verify failed" in low or "certificate_verify_failed" in low:
            self.diag.cause = "tls"
        elif "wrong version number" in low or "packet length too long" in low:
            self.diag.cause = "tls-mismatch"
        else:
            return
        self.diag.detail = text[-300:]


def _existing(admin: AdminClient, topics: list[str], timeout_s: float) -> dict[str, int]:
    """Existing topics among ``topics`` with their partition counts."""
    out: dict[str, int] = {}
    for t in topics:
        md = admin.list_topics(t, timeout=timeout_s).topics.get(t)
        if md is not None and md.error is None and md.partitions:
            out[t] = len(md.partitions)
    return out


def ensure_topics(cfg: WorkerConfig, timeout_ms: int = 5000) -> list[str]:
    """Check the input topics and create missing output / dead-letter topics.

    Same contract and messages as ``worker.clients.kafka_python.ensure_topics``: returns the
    missing input topics; raises KafkaError (broker did not answer: retry) or StartupError.
    """
    k = cfg.kafka
    errors = _AdminErrors()
    conf = {
        **_common_config(k, f"{k.client_id}-admin"),
        "socket.timeout.ms": _clamp(max(timeout_ms, 1000), _MAX_SOCKET_TIMEOUT_MS),
        "error_cb": errors,
        "logger": _client_log,
    }
    timeout_s = max(timeout_ms, 1000) / 1000
    admin = AdminClient(conf)

    def failed(e: BaseException) -> BaseException:
        admin.poll(0.1)  # serve pending error callbacks: they name the cause
        found = _diagnosed(cfg, errors.diag)
        return found if found is not None else translate(e)

    outputs = [k.output_topic, k.dead_letter_topic]
    try:
        existing = _existing(admin, [*k.input_topics, *outputs], timeout_s)
    except ck.KafkaException as e:
        raise failed(e) from None
    missing_inputs = [t for t in k.input_topics if t not in existing]
    missing_outputs = [t for t in outputs if t not in existing]
    if missing_outputs and not k.create_topics:
        raise StartupError(
            f"output topic(s) {', '.join(missing_outputs)} do not exist; create them "
            "or set kafka.create_topics: true"
        )
    if not missing_outputs:
        return missing_inputs
    parts = k.topic_partitions or next((existing[t] for t in k.input_topics if t in existing), 1)
    _create(admin, missing_outputs, parts, k.topic_replication, timeout_s, failed)
    log.info("created topic(s) %s with %d partition(s)", ", ".join(missing_outputs), parts)
    return missing_inputs


def _create(
    admin: AdminClient,
    topics: list[str],
    parts: int,
    replication: int,
    timeout_s: float,
    failed: Any,
) -> None:
    """Create ``topics`` and wait until the broker shows them (StartupError if not)."""
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=parts, replication_factor=replication) for t in topics],
        request_timeout=timeout_s,
    )
    for fut in futures.values():
        try:
            fut.result(timeout=timeout_s + 1)
        except ck.KafkaException as e:
            err = translate(e)
            if "Authorization" in type(err).__name__:
                raise StartupError(
                    f"not allowed to create {', '.join(topics)} "
                    f"({type(err).__name__}); create them or grant CREATE"
                ) from None
            # Already exists (a concurrent creator) or a transient failure: checked below.
        except concurrent.futures.TimeoutError:
            pass
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if len(_existing(admin, topics, timeout_s)) == len(topics):
                return
        except ck.KafkaException as e:
            raise failed(e) from None
        if time.monotonic() > deadline:
            raise StartupError(
                f"could not create {', '.join(topics)}; create them by hand "
                "(check the broker's log and kafka.topic_replication)"
            )
        time.sleep(0.2)


# -- the state store's changelog ------------------------------------------------------------


class RestoreConsumer:
    """A group-less ``read_committed`` reader of changelog partitions for
    :meth:`worker.state.StateStore.restore` (the part of ``KafkaConsumer`` it uses).

    Why not :class:`Consumer`: librdkafka's ``position()`` counts delivered messages only, so a
    changelog partition that ends with a transaction marker (every exactly-once commit writes
    one) would never reach its end offset. This reader asks for partition-EOF events and moves
    its position to the offset each reports, which under ``read_committed`` is the last stable
    offset. librdkafka needs a ``group.id`` even for a consumer that only assigns; this one
    never joins (no ``subscribe``) and never commits.
    """

    def __init__(self, conf: Mapping[str, Any], op_timeout_s: float = 10.0) -> None:
        self._op_timeout_s = op_timeout_s
        self._c = _construct(ck.Consumer, {**conf, "logger": _client_log})
        self._pos: dict[tuple[str, int], int] = {}
        self._tps: list[TopicPartition] = []

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        try:
            md = self._c.list_topics(topic, timeout=self._op_timeout_s).topics.get(topic)
        except ck.KafkaException as e:
            raise translate(e) from None
        if md is None or md.error is not None or not md.partitions:
            return None
        return set(md.partitions)

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        self._tps = list(tps)

    def _watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        try:
            wm = self._c.get_watermark_offsets(
                ck.TopicPartition(tp.topic, tp.partition),
                timeout=self._op_timeout_s,
                cached=False,
            )
        except ck.KafkaException as e:
            raise translate(e) from None
        if wm is None:
            raise KafkaTimeoutError(f"watermarks of {tp} not returned in {self._op_timeout_s}s")
        return int(wm[0]), int(wm[1])

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        parts = list(tps) or self._tps
        for tp in parts:
            self._pos[(tp.topic, tp.partition)] = self._watermarks(tp)[0]
        try:
            self._c.assign(
                [ck.TopicPartition(tp.topic, tp.partition, ck.OFFSET_BEGINNING) for tp in parts]
            )
        except ck.KafkaException as e:
            raise translate(e) from None

    def end_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Last stable offsets: librdkafka's ListOffsets uses the reader's isolation level."""
        return {tp: self._watermarks(tp)[1] for tp in tps}

    def position(self, tp: TopicPartition) -> int:
        return self._pos.get((tp.topic, tp.partition), 0)

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        msgs = _fetch(self._c, timeout_ms, max_records)
        out: dict[TopicPartition, list[Record]] = {}
        for m in msgs:
            t, p = m.topic(), m.partition()
            key = (t, p)
            err = m.error()
            if err is not None:
                if err.code() == _E._PARTITION_EOF:
                    self._pos[key] = max(self._pos.get(key, 0), int(m.offset()))
                    continue
                raise translate(err)
            self._pos[key] = int(m.offset()) + 1
            out.setdefault(TopicPartition(t, p), []).append(Record(m, t, p))
        return out

    def close(self) -> None:
        try:
            _run_bounded(self._c.close, self._op_timeout_s, "restore consumer close")
        except KafkaTimeoutError:
            log.warning("restore consumer close did not complete in %.0f s", self._op_timeout_s)


def build_restore_consumer(cfg: WorkerConfig) -> RestoreConsumer:
    k = cfg.kafka
    return RestoreConsumer(
        {
            **_common_config(k, f"{k.client_id}-state-restore"),
            "group.id": f"{k.group_id}-state-restore",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # An aborted transaction's state must not come back.
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "max.partition.fetch.bytes": k.max_partition_fetch_bytes,
        }
    )


def ensure_changelog(cfg: WorkerConfig, topic: str, partitions: int) -> bool:
    """Create (or check) the compacted changelog ``topic``; True if it was created.

    Same contract and messages as ``worker.state.store.ensure_changelog_topic``.

    Raises:
        ChangelogError: it exists with fewer partitions or without ``cleanup.policy=compact``.
        KafkaError: the broker did not answer.
    """
    from confluent_kafka.admin import ConfigResource, ResourceType

    from worker.state.store import ChangelogError

    k = cfg.kafka
    timeout_s = 10.0
    admin = AdminClient({**_common_config(k, f"{k.client_id}-state-admin"), "logger": _client_log})
    fut = admin.create_topics(
        [
            NewTopic(
                topic,
                num_partitions=max(1, partitions),
                replication_factor=k.topic_replication,
                config={"cleanup.policy": "compact"},
            )
        ],
        request_timeout=timeout_s,
    )[topic]
    try:
        fut.result(timeout=timeout_s + 1)
        return True
    except ck.KafkaException as e:
        if e.args[0].code() != _E.TOPIC_ALREADY_EXISTS:
            raise translate(e) from None
    except concurrent.futures.TimeoutError:
        raise KafkaTimeoutError(f"creating {topic} not answered in {timeout_s:g}s") from None
    try:
        have = _existing(admin, [topic], timeout_s).get(topic, 0)
        res = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
        entries = next(iter(res.values())).result(timeout=timeout_s)
    except ck.KafkaException as e:
        raise translate(e) from None
    if have < partitions:
        raise ChangelogError(
            f"changelog topic {topic!r} has {have} partitions, the input has {partitions}; "
            "add partitions (kafka-topics --alter) or delete it"
        )
    entry = entries.get("cleanup.policy")
    policy = None if entry is None else entry.value
    if policy is not None and "compact" not in policy:
        raise ChangelogError(
            f"changelog topic {topic!r} has cleanup.policy={policy}; set it to compact"
        )
    return False
