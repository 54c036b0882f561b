"""Start-up failures speak one line with the documented exit code (issue 9, defects 7-8).

Each case runs the real ``anomaly-worker`` and checks: the exit code, one ``error:`` line on
stderr naming the cause and the fix, and no traceback. The authentication case runs against
a private real broker with a SASL/PLAIN listener.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.fleet import FleetSpec, feature_names, normal_matrix
from tests.support.detectors import save_linear_detector
from tests.support.kafka import KAFKA_SH, REPO, Broker
from tests.support.worker_proc import free_port, write_worker_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("startup")
    spec = FleetSpec(devices=4, sensors=16, seed=3)
    save_linear_detector(tmp / "registry", normal_matrix(spec, 4000), feature_names(spec))
    return tmp / "registry"


def _config(tmp: Path, registry: Path, **sections: dict[str, object]) -> Path:
    kafka = {"bootstrap_servers": "127.0.0.1:1", "instance_id": "startup-1"}
    kafka.update(sections.pop("kafka", {}))  # type: ignore[arg-type]
    return write_worker_config(
        tmp / "worker.yaml",
        kafka=kafka,
        model={"registry": str(registry), "name": "sensors"},
        http=sections.pop("http", {"enabled": False}),
        **sections,
    )


def _run(
    config: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "--config", str(config), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _one_error_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def test_unreachable_broker_gives_up_with_exit_3_after_the_limit(
    registry: Path, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    cfg = _config(
        tmp_path, registry, kafka={"bootstrap_servers": f"127.0.0.1:{port}", "outage_give_up_s": 4}
    )
    t0 = time.monotonic()
    r = _run(cfg)
    took = time.monotonic() - t0
    assert r.returncode == 3, r.stderr[-3000:]
    _one_error_line(r.stderr, "unreachable", f"127.0.0.1:{port}")
    assert took < 60, f"gave up after {took:.0f}s, limit was 4 s"
    # No wall of client noise: kafka-python's lines are throttled.
    assert len(r.stderr.splitlines()) < 40, r.stderr[-4000:]


def test_sigterm_during_start_up_exits_0_at_once(registry: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, registry, kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    p = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "--config", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err[-3000:]
    assert time.monotonic() - t0 < 10
    assert "Traceback" not in err


def test_metrics_port_in_use_is_exit_2(registry: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = _config(tmp_path, registry, http={"enabled": True, "port": port})
        r = _run(cfg)
    assert r.returncode == 2, r.stderr[-3000:]
    _one_error_line(r.stderr, str(port), "http.port")


def test_sasl_mechanism_without_password_is_a_config_error(registry: Path, tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        registry,
        kafka={"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
    )
    r = _run(cfg, env={"SENSOR_ANOMALY_KAFKA__SASL_USERNAME": "svc"})
    assert r.returncode == 2
    _one_error_line(r.stderr, "SASL_PASSWORD")


def test_missing_tls_file_is_a_config_error(registry: Path, tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        registry,
        kafka={"security_protocol": "SSL", "ssl_cafile": str(tmp_path / "nope.pem")},
    )
    r = _run(cfg)
    assert r.returncode == 2
    _one_error_line(r.stderr, "ssl_cafile", "nope.pem")


def test_score_file_with_a_missing_input_is_exit_2(registry: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, registry)
    r = _run(cfg, "score-file", "--input", str(tmp_path / "absent.jsonl"))
    assert r.returncode == 2
    _one_error_line(r.stderr, "absent.jsonl")


def test_options_after_the_subcommand_and_version(registry: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, registry)
    r = subprocess.run(
        [sys.executable, "-m", "worker.cli", "check-config", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert '"sensors"' in r.stdout
    v = subprocess.run(
        [sys.executable, "-m", "worker.cli", "--version"], capture_output=True, text=True
    )
    assert v.returncode == 0 and v.stdout.startswith("anomaly-worker ")


def test_missing_output_topic_without_create_topics_is_exit_2(
    broker: Broker, registry: Path, tmp_path: Path
) -> None:
    inp = broker.new_topic("readings")
    cfg = _config(
        tmp_path,
        registry,
        kafka={
            "bootstrap_servers": broker.bootstrap,
            "input_topics": [inp],
            "output_topic": f"absent-{inp}",
            "dead_letter_topic": f"absent-dlq-{inp}",
            "create_topics": False,
        },
    )
    r = _run(cfg)
    assert r.returncode == 2, r.stderr[-3000:]
    _one_error_line(r.stderr, f"absent-{inp}", "kafka.create_topics")


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[str]:
    """A private real broker whose client listener wants SASL/PLAIN (user svc)."""
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_SASL_PLAIN_USERS": "svc:svc-secret",
        "KAFKA_HOME": str(REPO / ".cache" / "kafka"),
    }
    subprocess.run([str(KAFKA_SH), "start"], check=True, env=env, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(KAFKA_SH), "stop"], check=False, env=env, timeout=60)
        shutil.rmtree(REPO / ".cache" / "kafka" / f"data-{port}", ignore_errors=True)


def test_wrong_sasl_password_is_one_line_exit_2(
    sasl_broker: str, registry: Path, tmp_path: Path
) -> None:
    cfg = _config(
        tmp_path,
        registry,
        kafka={
            "bootstrap_servers": sasl_broker,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "outage_give_up_s": 60,
        },
    )
    env = {
        "SENSOR_ANOMALY_KAFKA__SASL_USERNAME": "svc",
        "SENSOR_ANOMALY_KAFKA__SASL_PASSWORD": "wrong",
    }
    r = _run(cfg, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    _one_error_line(r.stderr, "refused our SASL credentials", "SASL_PASSWORD")
    assert "wrong" not in r.stderr  # the secret is never echoed
