"""The worker's command-line tools: offline scoring, health check, check-config, security."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from tests.support.detectors import save_linear_detector
from worker.config import KafkaSettings, kafka_security_kwargs, load_config
from worker.health import HealthServer, HealthState
from worker.healthcheck import main as healthcheck

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv/bin"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    spec = FleetSpec(devices=4, sensors=16, seed=8)
    save_linear_detector(tmp / "registry", normal_matrix(spec, 8000), feature_names(spec))
    cfg = tmp / "worker.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"registry": str(tmp / "registry")}}))
    return cfg


def test_score_file_runs_the_same_path_without_kafka(config: Path, tmp_path: Path) -> None:
    spec = FleetSpec(devices=4, sensors=16, seed=8, start_ms=int(time.time() * 1000) - 200_000)
    readings = list(stream(spec, readings_per_device=50, anomaly_fraction=0.1))
    lines = [r.to_json() for r in readings] + [b'{"broken": ']
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    dead = tmp_path / "dead.jsonl"
    r = subprocess.run(
        [
            str(BIN / "anomaly-worker"),
            "--config",
            str(config),
            "score-file",
            "--input",
            str(src),
            "--dead-letters",
            str(dead),
        ],
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in r.stdout.splitlines()]
    flagged = {(e["device_id"], e["reading_timestamp_ms"]) for e in events}
    assert {(x.device_id, x.timestamp_ms) for x in readings if x.anomaly} <= flagged
    bad = [json.loads(x) for x in dead.read_text().splitlines()]
    assert len(bad) == 1 and bad[0]["headers"]["sensor_anomaly.error.reason"] == "decode_error"
    assert b"scored 201 readings" in r.stderr


def test_score_file_reads_stdin(config: Path) -> None:
    spec = FleetSpec(devices=4, sensors=16, seed=8, start_ms=int(time.time() * 1000) - 20_000)
    data = b"\n".join(r.to_json() for r in stream(spec, readings_per_device=5))
    r = subprocess.run(
        [str(BIN / "anomaly-worker"), "--config", str(config), "score-file"],
        input=data,
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0 and b"scored 20 readings" in r.stderr


def test_check_config_prints_masked_config_and_model(config: Path) -> None:
    r = subprocess.run(
        [str(BIN / "anomaly-worker"), "--config", str(config), "check-config"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"SENSOR_ANOMALY_KAFKA__SASL_PASSWORD": "pw", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["config"]["kafka"]["sasl_password"] == "***"
    assert doc["model"]["version"] == "v0001"


def test_missing_model_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "w.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"registry": str(tmp_path / "none")}}))
    r = subprocess.run(
        [str(BIN / "anomaly-worker"), "--config", str(cfg), "check-config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: no current version of model 'sensors'")
    assert r.stderr.count("\n") == 1


def test_healthcheck_exit_codes() -> None:
    state = HealthState()
    srv = HealthServer("127.0.0.1", 0, CollectorRegistry(), state).start()
    host, port = srv.address
    url = f"http://{host}:{port}"
    try:
        assert healthcheck(["--url", url, "--live"]) == 0
        assert healthcheck(["--url", url]) == 1  # no model, no partitions yet
        state.update(model_version="v0001", assigned_partitions=1, broker_ok=True)
        assert healthcheck(["--url", url]) == 0
    finally:
        srv.stop()
    assert healthcheck(["--url", url, "--timeout", "1"]) == 1  # nothing listening


def test_sasl_and_tls_settings_pass_through(tmp_path: Path) -> None:
    cfg = tmp_path / "w.yaml"
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg.write_text(
        yaml.safe_dump(
            {
                "kafka": {
                    "security_protocol": "SASL_SSL",
                    "sasl_mechanism": "SCRAM-SHA-512",
                    "ssl_cafile": str(ca),
                    "ssl_check_hostname": False,
                }
            }
        )
    )
    c = load_config(
        cfg,
        env={
            "SENSOR_ANOMALY_KAFKA__SASL_USERNAME": "svc",
            "SENSOR_ANOMALY_KAFKA__SASL_PASSWORD": "pw",
        },
    )
    kw = kafka_security_kwargs(c.kafka)
    assert kw == {
        "security_protocol": "SASL_SSL",
        "ssl_check_hostname": False,
        "ssl_cafile": str(ca),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw",
    }
    assert kafka_security_kwargs(KafkaSettings()) == {"security_protocol": "PLAINTEXT"}
