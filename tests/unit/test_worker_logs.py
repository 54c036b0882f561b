"""Log lines: JSON format with structured fields, and the kafka-python throttle."""

from __future__ import annotations

import io
import json
import logging

from worker.identity import resolve_instance_id
from worker.logs import JsonFormatter, Throttle


def _handler(fmt: logging.Formatter) -> tuple[logging.Handler, io.StringIO]:
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(fmt)
    h.addFilter(Throttle(("kafka",), window_s=60))
    return h, buf


def test_json_lines_carry_fields_and_secrets_stay_out() -> None:
    h, buf = _handler(JsonFormatter())
    log = logging.getLogger("worker.test-json")
    log.addHandler(h)
    log.propagate = False
    log.warning("batch %d", 7, extra={"topic": "t", "partition": 3, "config": {"a": 1}})
    doc = json.loads(buf.getvalue())
    assert doc["message"] == "batch 7" and doc["level"] == "WARNING"
    assert doc["logger"] == "worker.test-json" and doc["time"].endswith("+00:00")
    assert doc["topic"] == "t" and doc["partition"] == 3 and doc["config"] == {"a": 1}


def test_client_noise_is_throttled_tracebacks_dropped_errors_relevelled() -> None:
    h, buf = _handler(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    client = logging.getLogger("kafka.net.connection.test")
    client.addHandler(h)
    client.propagate = False
    ours = logging.getLogger("worker.test-throttle")
    ours.addHandler(h)
    ours.propagate = False
    for _ in range(200):
        try:
            raise ConnectionError("refused")
        except ConnectionError:
            client.exception("Connection to %s failed", "127.0.0.1:1")
    for i in range(3):
        ours.warning("ours %d", i)
    lines = buf.getvalue().splitlines()
    client_lines = [ln for ln in lines if "kafka.net" in ln]
    assert len(client_lines) == 1, lines[:5]
    assert client_lines[0].startswith("WARNING")  # ERROR re-levelled
    assert "Traceback" not in buf.getvalue()
    assert sum("ours" in ln for ln in lines) == 3  # our own records are never throttled


def test_instance_ids_unique_among_live_holders_and_reused_after(tmp_path: object) -> None:
    d = str(tmp_path)
    a = resolve_instance_id("", "g", d)
    b = resolve_instance_id("", "g", d)
    assert a != b and a.endswith("-0") and b.endswith("-1")
    assert resolve_instance_id("fixed", "g", d) == "fixed"


def test_liveness_fails_when_owned_work_is_not_consumed() -> None:
    import time as _t

    from worker.status import WorkerStatus

    st = WorkerStatus(stall_after_s=0.2)
    st.update(broker_ok=True, lag=100)
    st.set_member(True)
    assert st.liveness()[0]
    _t.sleep(0.3)
    st.beat()  # the loop iterates, but consumes nothing
    ok, facts = st.liveness()
    assert not ok and "nothing consumed" in facts["reason"]
    st.progress()
    assert st.liveness()[0]
    st.update(lag=0)  # a standby with nothing to do stays alive
    _t.sleep(0.3)
    st.beat()
    assert st.liveness()[0]
