"""Worker lifecycle on the real broker: model hot reload, broker outage and give-up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from detector import Registry
from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from tests.support.detectors import linear_detector
from tests.support.kafka import KAFKA_SH, REPO, Broker
from tests.support.worker_proc import WorkerProcess, wait_until_committed, write_worker_config

pytestmark = pytest.mark.integration


def _cfg(
    tmp: Path, bootstrap: str, registry: Path, topics: dict[str, str], group: str, **kafka: object
) -> Path:
    return write_worker_config(
        tmp / "worker.yaml",
        kafka={
            "bootstrap_servers": bootstrap,
            "input_topics": [topics["in"]],
            "output_topic": topics["out"],
            "dead_letter_topic": topics["dlq"],
            "group_id": group,
            "instance_id": "life-1",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            **kafka,
        },
        model={"registry": str(registry), "name": "sensors", "reload_interval_s": 0.5},
        batch={"max_size": 256, "max_wait_ms": 20},
        reading={"max_past_s": 7 * 86400.0},
        http={"enabled": False},
    )


def _now_spec(per_device: int, seed: int = 5) -> FleetSpec:
    return FleetSpec(
        devices=4, sensors=16, seed=seed, start_ms=int(time.time() * 1000) - per_device * 1000
    )


def test_new_model_version_is_picked_up_without_restart_and_bad_one_refused(
    broker: Broker, tmp_path: Path
) -> None:
    spec = FleetSpec(devices=4, sensors=16, seed=5)
    x, names = normal_matrix(spec, 12_000), feature_names(spec)
    reg = Registry(tmp_path / "registry")
    reg.save(linear_detector(x, names, code=4))
    topics = {
        "in": broker.new_topic("readings"),
        "out": broker.new_topic("anomalies"),
        "dlq": broker.new_topic("dlq"),
    }
    group = broker.new_group()
    w = WorkerProcess(
        _cfg(tmp_path, broker.bootstrap, tmp_path / "registry", topics, group), tmp_path / "w.log"
    )
    try:
        first = [r for r in stream(_now_spec(200), 200, anomaly_fraction=0.05)]
        broker.produce(topics["in"], ((r.key(), r.to_json()) for r in first))
        wait_until_committed(broker, group, topics["in"], [w])
        # A tampered version must be refused while v0001 keeps serving...
        bad = reg.save(linear_detector(x, names, code=3))
        (bad / "detector.json").write_text((bad / "detector.json").read_text() + " ")
        time.sleep(2)
        assert w.alive()
        assert "new model version rejected" in w.log() and "checksum mismatch" in w.log()
        # ...and a good new version is picked up without a restart.
        reg.save(linear_detector(x, names, code=5))
        deadline = time.monotonic() + 20
        while "serving model sensors v0003" not in w.log():
            assert time.monotonic() < deadline, w.log()[-3000:]
            time.sleep(0.2)
        second = [r for r in stream(_now_spec(200, seed=6), 200, anomaly_fraction=0.05)]
        broker.produce(topics["in"], ((r.key(), r.to_json()) for r in second))
        wait_until_committed(broker, group, topics["in"], [w])
    finally:
        assert w.terminate() == 0, w.log()[-3000:]
    events = [json.loads(m.value()) for m in broker.read_all(topics["out"])]
    versions = {e["source"]["offset"] < len(first): e["model"]["version"] for e in events}
    assert versions == {True: "v0001", False: "v0003"}


@pytest.fixture
def private_broker(tmp_path: Path) -> tuple[dict[str, str], str]:
    """A second broker of our own (own port and data) that a test may stop and restart."""
    port = int(os.environ.get("KAFKA_PORT", "39092")) + 100
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(port + 1),
        "KAFKA_HOME": str(REPO / ".cache/kafka"),
    }
    shutil.rmtree(REPO / f".cache/kafka/data-{port}", ignore_errors=True)
    subprocess.run([str(KAFKA_SH), "start"], check=True, env=env)
    yield env, f"127.0.0.1:{port}"
    subprocess.run([str(KAFKA_SH), "stop"], check=False, env=env)
    shutil.rmtree(REPO / f".cache/kafka/data-{port}", ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_broker_outage_backs_off_resumes_without_loss_then_gives_up(
    private_broker: tuple[dict[str, str], str], tmp_path: Path
) -> None:
    env, bootstrap = private_broker
    b = Broker(bootstrap, started_here=False)
    spec = FleetSpec(devices=4, sensors=16, seed=5)
    Registry(tmp_path / "registry").save(
        linear_detector(normal_matrix(spec, 12_000), feature_names(spec), code=4)
    )
    topics = {
        "in": b.new_topic("readings", 2),
        "out": b.new_topic("anomalies"),
        "dlq": b.new_topic("dlq"),
    }
    group = b.new_group()
    cfg = _cfg(
        tmp_path,
        bootstrap,
        tmp_path / "registry",
        topics,
        group,
        # Above the first outage (8 s + a broker restart: up to ~20 s on a loaded 2-core
        # machine), so only the second, open-ended outage gives up.
        outage_give_up_s=45.0,
        request_timeout_ms=5000,
    )
    w = WorkerProcess(cfg, tmp_path / "w.log")
    first = list(stream(_now_spec(300), 300, anomaly_fraction=0.05))
    b.produce(topics["in"], ((r.key(), r.to_json()) for r in first))
    wait_until_committed(b, group, topics["in"], [w])
    # Outage shorter than the give-up time: the worker waits without spinning, then resumes.
    subprocess.run([str(KAFKA_SH), "stop"], check=True, env=env)
    cpu0 = _cpu_seconds(w.proc.pid)
    time.sleep(8)
    cpu_during = _cpu_seconds(w.proc.pid) - cpu0
    assert w.alive(), w.log()[-3000:]
    assert cpu_during < 0.5 * 8, f"worker busy-looped during the outage: {cpu_during:.1f}s CPU"
    subprocess.run([str(KAFKA_SH), "start"], check=True, env=env)
    second = list(stream(_now_spec(300, seed=9), 300, anomaly_fraction=0.05))
    b.produce(topics["in"], ((r.key(), r.to_json()) for r in second))
    wait_until_committed(b, group, topics["in"], [w], timeout=120)
    # A broker just restarted on a loaded machine can take seconds to serve the first fetch.
    events = [json.loads(m.value()) for m in b.read_all(topics["out"], timeout=60, idle=6.0)]
    flagged = {(e["device_id"], e["reading_timestamp_ms"]) for e in events}
    injected = {(r.device_id, r.timestamp_ms) for r in first + second if r.anomaly}
    assert injected <= flagged
    # Outage longer than the give-up time: exit 3 so a supervisor restarts the worker.
    subprocess.run([str(KAFKA_SH), "stop"], check=True, env=env)
    try:
        rc = w.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        w.kill()
        raise AssertionError("worker did not give up: " + w.log()[-3000:]) from None
    assert rc == 3, w.log()[-3000:]
    assert "giving up: broker unreachable" in w.log()
