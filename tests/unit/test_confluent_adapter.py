"""The confluent-kafka adapter without a broker: settings, error translation, records,
membership parsing, and the bounded producer calls against an address nobody answers."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import confluent_kafka as ck
import pytest
from kafka.errors import KafkaError, KafkaTimeoutError

from worker.clients import confluent as C
from worker.clients import kafka_python as KP
from worker.config import KafkaSettings, WorkerConfig
from worker.loop import _REASSIGNED_ERRORS, _is_auth_error

NOBODY = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


def _cfg(**kafka: Any) -> WorkerConfig:
    return WorkerConfig(kafka=KafkaSettings(**{"bootstrap_servers": NOBODY, **kafka}))


# -- settings ------------------------------------------------------------------------------


def test_every_kafka_setting_reaches_librdkafka() -> None:
    cfg = _cfg(
        group_id="g1",
        client_id="cid",
        auto_offset_reset="latest",
        session_timeout_ms=7000,
        heartbeat_interval_ms=1500,
        max_poll_interval_ms=45000,
        fetch_max_wait_ms=25,
        max_partition_fetch_bytes=2_000_000,
        fetch_max_bytes=30_000_000,
        request_timeout_ms=20000,
        reconnect_backoff_max_ms=700,
        linger_ms=7,
        compression_type="lz4",
    )
    c = C.consumer_config(cfg, "i1")
    assert c["bootstrap.servers"] == NOBODY and c["group.id"] == "g1"
    assert c["client.id"] == "cid-i1" == KP.client_id(cfg, "i1")
    assert c["enable.auto.commit"] is False and c["enable.auto.offset.store"] is False
    assert c["isolation.level"] == "read_committed"
    assert c["auto.offset.reset"] == "latest"
    assert (c["session.timeout.ms"], c["heartbeat.interval.ms"]) == (7000, 1500)
    assert c["max.poll.interval.ms"] == 45000
    short = _cfg(session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=2000)
    # librdkafka refuses a poll interval below the session timeout; kafka-python accepts it.
    assert C.consumer_config(short)["max.poll.interval.ms"] == 6000
    assert c["fetch.wait.max.ms"] == 25
    assert c["max.partition.fetch.bytes"] == 2_000_000 and c["fetch.max.bytes"] == 30_000_000
    assert c["socket.timeout.ms"] == 20000  # max(request, session + 5 s), as kafka-python
    assert c["reconnect.backoff.max.ms"] == 700
    assert c["topic.metadata.refresh.interval.ms"] == 30_000
    p = C.producer_config(cfg, "i1")
    assert p["acks"] == "all" and p["enable.idempotence"] is True
    assert p["linger.ms"] == 7 and p["compression.type"] == "lz4"
    assert p["request.timeout.ms"] == 20000
    assert "transactional.id" not in p
    eos = C.producer_config(dataclasses.replace(cfg, kafka=dataclasses.replace(
        cfg.kafka, delivery="exactly_once", transaction_timeout_ms=12000)), "i1")  # fmt: skip
    assert eos["transactional.id"] == KP.transactional_id(cfg, "i1") == "sensor-anomaly-g1-i1"
    assert eos["transaction.timeout.ms"] == 12000
    # librdkafka refuses a delivery or socket timeout beyond the transaction's.
    assert eos["message.timeout.ms"] <= 12000 and eos["socket.timeout.ms"] <= 12000 + 100


def test_librdkafka_accepts_the_settings_in_both_modes() -> None:
    for delivery in ("at_least_once", "exactly_once"):
        cfg = _cfg(delivery=delivery, compression_type="zstd", transaction_timeout_ms=10000)
        ck.Producer(C.producer_config(cfg, "x"))
        ck.Consumer(C.consumer_config(cfg, "x")).close()


def test_security_settings_map_to_librdkafka(tmp_path: Any) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    k = KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password="p",
        ssl_cafile=str(ca),
        ssl_certfile=str(ca),
        ssl_keyfile=str(ca),
        ssl_password="kp",
        ssl_check_hostname=False,
    )
    s = C.security_config(k)
    assert s == {
        "security.protocol": "sasl_ssl",
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "u",
        "sasl.password": "p",
        "ssl.ca.location": str(ca),
        "ssl.certificate.location": str(ca),
        "ssl.key.location": str(ca),
        "ssl.key.password": "kp",
        "ssl.endpoint.identification.algorithm": "none",
    }
    on = C.security_config(dataclasses.replace(k, ssl_check_hostname=True, security_protocol="SSL"))
    assert on["ssl.endpoint.identification.algorithm"] == "https"
    assert "sasl.username" not in on
    assert C.security_config(KafkaSettings()) == {"security.protocol": "plaintext"}


def test_settings_librdkafka_refuses_are_one_line_startup_errors(tmp_path: Any) -> None:
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("not a certificate")
    cfg = _cfg(security_protocol="SSL", ssl_cafile=str(bad))
    with pytest.raises(C.StartupError) as e:
        C.build_producer(cfg, "x")
    assert "\n" not in str(e.value) and "kafka" in str(e.value)


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (22, "IllegalGenerationError"),
        (25, "UnknownMemberIdError"),
        (27, "RebalanceInProgressError"),
        (82, "FencedInstanceIdError"),
        (90, "ProducerFencedError"),
        (ck.KafkaError._ASSIGNMENT_LOST, "CommitFailedError"),
        (ck.KafkaError._TIMED_OUT, "KafkaTimeoutError"),
        (ck.KafkaError._MSG_TIMED_OUT, "KafkaTimeoutError"),
        (ck.KafkaError._ALL_BROKERS_DOWN, "KafkaConnectionError"),
        (ck.KafkaError._AUTHENTICATION, "SaslAuthenticationFailedError"),
        (ck.KafkaError._UNKNOWN_TOPIC, "UnknownTopicOrPartitionError"),
        (ck.KafkaError._CONFLICT, "LibrdkafkaError"),
    ],
)
def test_librdkafka_errors_become_kafka_python_errors(code: int, name: str) -> None:
    err = ck.KafkaError(code, "why", fatal=False, retriable=True, txn_requires_abort=True)
    for source in (err, ck.KafkaException(err)):
        e = C.translate(source)
        assert isinstance(e, KafkaError) and type(e).__name__ == name
        assert e.retriable and e.txn_requires_abort and not e.fatal
        assert "why" in str(e)


def test_the_loop_reads_translated_errors_as_kafka_python_ones() -> None:
    def name(code: int) -> str:
        return type(C.translate(ck.KafkaError(code))).__name__

    reassigned = {name(c) for c in (22, 25, 27, 82, ck.KafkaError._ASSIGNMENT_LOST)}
    assert reassigned <= _REASSIGNED_ERRORS
    assert _is_auth_error(C.translate(ck.KafkaError(ck.KafkaError._AUTHENTICATION)))
    assert _is_auth_error(C.translate(ck.KafkaError(29)))  # topic authorization
    assert isinstance(C.translate(ck.KafkaError(ck.KafkaError._TIMED_OUT)), KafkaTimeoutError)
    assert issubclass(C.TxnOutcomeUnknown, KafkaTimeoutError)


# -- records, coroutines, membership ---------------------------------------------------------


def test_record_has_the_consumer_record_attributes_the_core_reads() -> None:
    m = ck.Message(
        topic="t", partition=3, offset=41, key=b"k", value=b"{}",
        headers=[("h", b"x")], timestamp=(ck.TIMESTAMP_CREATE_TIME, 1234),
    )  # fmt: skip
    r = C.Record(m, "t", 3)
    assert (r.topic, r.partition, r.offset, r.key, r.value) == ("t", 3, 41, b"k", b"{}")
    assert r.headers == [("h", b"x")] and (r.timestamp, r.timestamp_type) == (1234, 0)
    bare = C.Record(ck.Message(topic="t", partition=0, offset=0), "t", 0)
    assert bare.headers == [] and bare.key is None and bare.value is None


def test_listener_coroutines_are_driven_to_completion() -> None:
    done: list[int] = []

    async def inner() -> None:
        done.append(1)

    async def listener() -> None:
        await inner()
        done.append(2)

    C._drive(listener())
    assert done == [1, 2]

    class Pending:
        def __await__(self) -> Any:
            yield None

    async def truly_async() -> None:
        await Pending()

    with pytest.raises(RuntimeError, match="not synchronous"):
        C._drive(truly_async())


def test_group_metadata_of_a_member_without_generation_is_refused() -> None:
    c = C.build_consumer(_cfg(group_id="g-unit"), "u")
    try:
        assert C._generation(c.group_metadata()) == (-1, "")
        assert C.membership(c) is None and not C.is_stable_member(c)
        c._assigned = True  # even with an assignment flag: no member id, generation -1
        assert C.membership(c) is None
    finally:
        c.close(timeout_ms=2000)
    gm = b"CGMDv2:" + (7).to_bytes(4, "little", signed=True) + b"grp\x00member-1\x00\x00"
    assert C._generation(gm) == (7, "member-1")
    assert C._generation(b"CGMDv9:whatever") is None


# -- producer against an address nobody answers ---------------------------------------------


def test_undelivered_records_make_flush_raise_and_futures_stay_open() -> None:
    p = C.build_producer(_cfg(), "u")
    futs = [p.send("t", value=b"v", key=b"k") for _ in range(3)]
    with pytest.raises(KafkaTimeoutError):
        p.flush(timeout=0.3)
    assert not any(f.is_done for f in futs)
    t0 = time.monotonic()
    p.close(timeout=0)
    assert time.monotonic() - t0 < 2.0  # never waits on the broker


def test_full_local_queue_raises_after_max_block() -> None:
    conf = {**C.producer_config(_cfg(), "u"), "queue.buffering.max.messages": 5}
    p = C.Producer(conf, max_block_s=0.3)
    for _ in range(5):
        p.send("t", value=b"v")
    with pytest.raises(KafkaTimeoutError, match="queue full"):
        p.send("t", value=b"v")
    p.close(timeout=0)


def test_refused_record_raises_a_kafka_error_synchronously() -> None:
    p = C.build_producer(_cfg(), "u")
    with pytest.raises(KafkaError) as e:
        p.send("t", value=b"x" * 2_000_000)
    assert "MSG_SIZE_TOO_LARGE" in str(e.value)
    p.close(timeout=0)


def test_delivery_report_completes_the_future() -> None:
    f = C.Future()
    assert not f.is_done and not f.failed()
    f._report(None, None)
    assert f.is_done and f.succeeded()
    g = C.Future()
    g._report(ck.KafkaError(ck.KafkaError._MSG_TIMED_OUT), None)
    assert g.is_done and g.failed() and isinstance(g.exception, KafkaTimeoutError)


def test_init_transactions_without_a_broker_times_out_as_a_kafka_error() -> None:
    p = C.Producer(C.producer_config(_cfg(delivery="exactly_once"), "u"), max_block_s=0.5)
    with pytest.raises(KafkaTimeoutError):
        p.init_transactions()
    p.close(timeout=0)


def test_unreachable_broker_at_topic_check_is_retryable_not_a_startup_error() -> None:
    with pytest.raises(KafkaError):
        C.ensure_topics(_cfg(), timeout_ms=1000)


def test_both_adapters_provide_every_function_of_the_client_interface() -> None:
    import inspect

    from worker.clients import ClientAdapter

    members = [n for n in vars(ClientAdapter) if not n.startswith("_")]
    assert "build_consumer" in members and "commit_in_listener" in members
    for module in (KP, C):
        for name in members:
            fn = getattr(module, name, None)
            assert callable(fn), f"{module.__name__} lacks {name}"
            want_async = inspect.iscoroutinefunction(getattr(ClientAdapter, name))
            assert inspect.iscoroutinefunction(fn) == want_async, f"{module.__name__}.{name}"
