"""Loop reliability on the real broker (issue 9): outputs that cannot be delivered hold the
commit back, missing topics, standby readiness, instance ids, assignment after restarts.

The broker-fault scenarios (kill -9, broker SIGKILL/SIGSTOP, zombies) are in the chaos suite
(tests/chaos, tests/integration/test_chaos_ci.py).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from tests.support.detectors import save_linear_detector
from tests.support.kafka import Broker
from tests.support.worker_proc import (
    WorkerProcess,
    free_port,
    wait_until_committed,
    write_worker_config,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("reliability")
    spec = FleetSpec(devices=4, sensors=16, seed=11)
    save_linear_detector(tmp / "registry", normal_matrix(spec, 8000), feature_names(spec))
    return tmp / "registry"


def _spec(per_device: int, seed: int = 11) -> FleetSpec:
    return FleetSpec(
        devices=4, sensors=16, seed=seed, start_ms=int(time.time() * 1000) - per_device * 1000
    )


def _cfg(
    tmp: Path,
    name: str,
    broker: Broker,
    registry: Path,
    topics: dict[str, str],
    group: str,
    http_port: int | None = None,
    **kafka: Any,
) -> Path:
    k: dict[str, Any] = {
        "bootstrap_servers": broker.bootstrap,
        "input_topics": [topics["in"]],
        "output_topic": topics["out"],
        "dead_letter_topic": topics["dlq"],
        "group_id": group,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "transaction_timeout_ms": 10000,
    }
    k.update(kafka)
    return write_worker_config(
        tmp / f"{name}.yaml",
        kafka=k,
        model={"registry": str(registry), "name": "sensors", "reload_interval_s": 1.0},
        batch={"max_size": 256, "max_wait_ms": 20},
        reading={"max_past_s": 7 * 86400.0},
        http={"enabled": http_port is not None, "port": http_port or 0},
    )


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait(pred: Any, timeout: float, what: str, workers: list[WorkerProcess]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = pred()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        for w in workers:
            assert w.alive(), f"worker exited ({w.proc.returncode}):\n{w.log()[-3000:]}"
        time.sleep(0.3)
    logs = "\n---\n".join(w.log()[-2500:] for w in workers)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def test_outputs_not_acknowledged_hold_the_commit_back_until_delivered(
    broker: Broker, registry: Path, tmp_path: Path
) -> None:
    """Defect 1: a send that fails synchronously (the output topic vanished) must not let
    the batch's offsets be committed; once the topic is back every output is delivered."""
    topics = {"in": broker.new_topic("readings", 2), "out": broker.new_topic("anomalies")}
    topics["dlq"] = broker.new_topic("dlq")
    group = broker.new_group()
    w = WorkerProcess(
        _cfg(tmp_path, "w", broker, registry, topics, group, instance_id="rel-1"),
        tmp_path / "w.log",
    )
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    try:
        first = list(stream(_spec(100, seed=1), 100, anomaly_fraction=0.05))
        broker.produce(topics["in"], ((r.key(), r.to_json()) for r in first))
        wait_until_committed(broker, group, topics["in"], [w])
        before = broker.committed(group, topics["in"])
        admin.delete_topics([topics["out"]])[topics["out"]].result(timeout=30)
        time.sleep(3)
        second = list(stream(_spec(100, seed=2), 100, anomaly_fraction=0.2))
        broker.produce(topics["in"], ((r.key(), r.to_json()) for r in second))
        time.sleep(15)  # sends fail (no such topic); nothing may be committed meanwhile
        assert broker.committed(group, topics["in"]) == before, w.log()[-3000:]
        assert w.alive()
        admin.create_topics([NewTopic(topics["out"], 1, 1)])[topics["out"]].result(timeout=30)
        wait_until_committed(broker, group, topics["in"], [w], timeout=120)
    finally:
        rc = w.terminate()
    assert rc == 0, w.log()[-3000:]
    events = [json.loads(m.value()) for m in broker.read_all(topics["out"])]
    flagged = {(e["device_id"], e["reading_timestamp_ms"]) for e in events}
    injected = {(r.device_id, r.timestamp_ms) for r in second if r.anomaly is not None}
    missed = injected - flagged
    assert not missed, f"{len(missed)} of {len(injected)} events of the failed batches lost"


def test_missing_input_topic_is_reported_once_and_in_readyz(
    broker: Broker, registry: Path, tmp_path: Path
) -> None:
    """Defect 8: outputs created at start, a missing input reported once, then picked up."""
    name = f"late-{broker.new_group('t')}"
    topics = {"in": name, "out": f"{name}-events", "dlq": f"{name}-dlq"}
    group = broker.new_group()
    port = free_port()
    w = WorkerProcess(
        _cfg(tmp_path, "w", broker, registry, topics, group, port, instance_id="rel-2"),
        tmp_path / "w.log",
    )
    try:
        code, body = _wait(
            lambda: (
                lambda r: r if r[0] == 503 and "do not exist" in r[1].get("reason", "") else None
            )(_get(port, "/readyz")),
            30,
            "/readyz to name the missing topic",
            [w],
        )
        assert name in body["reason"]
        time.sleep(6)  # a few re-checks
        assert w.log().count("do not exist") == 1, w.log()[-3000:]
        md = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
        assert topics["out"] in md and topics["dlq"] in md  # created by the worker
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        admin.create_topics([NewTopic(name, 2, 1)])[name].result(timeout=30)
        readings = list(stream(_spec(50), 50, anomaly_fraction=0.05))
        broker.produce(name, ((r.key(), r.to_json()) for r in readings))
        wait_until_committed(broker, group, name, [w], timeout=60)
        code, body = _get(port, "/readyz")
        assert code == 200, body
    finally:
        rc = w.terminate()
    assert rc == 0


def test_standby_member_is_ready_and_says_so(
    broker: Broker, registry: Path, tmp_path: Path
) -> None:
    """Defect 10: with more workers than partitions the extra one is ready (standby)."""
    topics = {"in": broker.new_topic("readings", 1), "out": broker.new_topic("anomalies")}
    topics["dlq"] = broker.new_topic("dlq")
    group = broker.new_group()
    ports = [free_port(), free_port()]
    ws = [
        WorkerProcess(
            _cfg(
                tmp_path, f"w{i}", broker, registry, topics, group, ports[i], instance_id=f"sb-{i}"
            ),
            tmp_path / f"w{i}.log",
        )
        for i in range(2)
    ]
    try:

        def both_ready() -> list[dict[str, Any]] | None:
            res = [_get(p, "/readyz") for p in ports]
            if all(code == 200 for code, _ in res):
                bodies = [b for _, b in res]
                if sorted(b["assigned_partitions"] for b in bodies) == [0, 1]:
                    return bodies
            return None

        bodies = _wait(both_ready, 60, "both workers ready, one standby", ws)
        assert sorted(b["standby"] for b in bodies) == [False, True]
        assert all(b["group_member"] for b in bodies)
        assert any(b["assignment"] == [f"{topics['in']}/0"] for b in bodies)
    finally:
        for w in ws:
            w.terminate()


def test_two_exactly_once_workers_on_one_host_do_not_fence_each_other(
    broker: Broker, registry: Path, tmp_path: Path
) -> None:
    """Defect 9: the default instance id is unique per running worker."""
    topics = {"in": broker.new_topic("readings", 4), "out": broker.new_topic("anomalies")}
    topics["dlq"] = broker.new_topic("dlq")
    group = broker.new_group()
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    env = {"SENSOR_ANOMALY_KAFKA__INSTANCE_LOCK_DIR": str(lock_dir)}
    ws = [
        WorkerProcess(
            _cfg(tmp_path, f"w{i}", broker, registry, topics, group, delivery="exactly_once"),
            tmp_path / f"w{i}.log",
            env=env,
        )
        for i in range(2)
    ]
    try:
        readings = list(stream(_spec(300), 300, anomaly_fraction=0.05))
        broker.produce(topics["in"], ((r.key(), r.to_json()) for r in readings))
        wait_until_committed(broker, group, topics["in"], ws, timeout=120)
        logs = [w.log() for w in ws]
    finally:
        rcs = [w.terminate() for w in ws]
    assert rcs == [0, 0], logs
    ids = sorted(
        line.split("(instance ")[1].split(")")[0]
        for log in logs
        for line in log.splitlines()
        if "(instance " in line
    )
    assert len(set(ids)) == 2 and ids[0].endswith("-0") and ids[1].endswith("-1"), ids
    for log in logs:
        assert "Fenced" not in log and "transaction not committed" not in log, log[-3000:]
    events = [json.loads(m.value()) for m in broker.read_all(topics["out"])]
    ids_seen = [e["event_id"] for e in events]
    assert len(ids_seen) == len(set(ids_seen)), "duplicate events under exactly-once"
    injected = {(r.device_id, r.timestamp_ms) for r in readings if r.anomaly is not None}
    assert injected <= {(e["device_id"], e["reading_timestamp_ms"]) for e in events}


def test_restarted_worker_gets_its_partitions_back_promptly(
    broker: Broker, registry: Path, tmp_path: Path
) -> None:
    """Defect 6: after each graceful restart the group covers every partition quickly."""
    topics = {"in": broker.new_topic("readings", 4), "out": broker.new_topic("anomalies")}
    topics["dlq"] = broker.new_topic("dlq")
    group = broker.new_group()
    ports = [free_port(), free_port()]
    cfgs = [
        _cfg(tmp_path, f"w{i}", broker, registry, topics, group, ports[i], instance_id=f"rs-{i}")
        for i in range(2)
    ]
    ws = [WorkerProcess(cfgs[i], tmp_path / f"w{i}.log") for i in range(2)]

    last: list[Any] = []

    def covered() -> bool:
        res = [_get(p, "/readyz") for p in ports]
        last[:] = res
        owned = sum(b.get("assigned_partitions", 0) for code, b in res if code == 200)
        return owned == 4 and all(code == 200 for code, _ in res)

    took = []
    try:
        _wait(covered, 60, "all partitions assigned", ws)
        for _ in range(3):
            assert ws[1].terminate() == 0
            ws[1] = WorkerProcess(cfgs[1], tmp_path / "w1.log")
            t0 = time.monotonic()
            try:
                _wait(covered, 45, "all partitions assigned after a restart", ws)
            except AssertionError as e:
                raise AssertionError(f"last /readyz: {last}") from e
            took.append(time.monotonic() - t0)
    finally:
        for w in ws:
            w.terminate()
    assert max(took) < 45, took
