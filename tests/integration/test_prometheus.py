"""A real Prometheus scrapes a worker processing real traffic from the real broker; then every
dashboard panel's PromQL and every rule is evaluated against it.
"""

from __future__ import annotations

import json
import shutil
import string
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from tests.support.dashboard_queries import dashboard_queries
from tests.support.detectors import save_linear_detector
from tests.support.kafka import REPO, Broker
from tests.support.worker_proc import WorkerProcess, free_port, write_worker_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.prometheus,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian prometheus missing"),
]

DASHBOARD = REPO / "deploy/grafana/dashboards/sensor-anomaly.json"


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _query(base: str, expr: str) -> tuple[int, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class _Traffic(threading.Thread):
    """Produces readings (some anomalous, some malformed) at a steady pace until stopped."""

    def __init__(self, broker: Broker, topic: str, rate: float = 400.0) -> None:
        super().__init__(daemon=True)
        self.broker, self.topic, self.rate = broker, topic, rate
        self.halt = threading.Event()

    def run(self) -> None:
        # Event time advances with wall time: 8 devices each reading every 8/rate seconds.
        spec = FleetSpec(
            devices=8,
            sensors=16,
            seed=11,
            start_ms=int(time.time() * 1000),
            period_ms=int(8000 / self.rate),
        )
        it = stream(spec, readings_per_device=100_000, anomaly_fraction=0.05)
        chunk = int(self.rate / 4)
        rounds = 0
        while not self.halt.is_set():
            rounds += 1
            recs: list[tuple[bytes | None, bytes | None]] = []
            for _ in range(chunk):
                r = next(it)
                recs.append((r.key(), r.to_json()))
            if rounds % 4 == 0:  # ~0.25 % malformed: visible, below the alert's 1 % floor
                recs.append((b"bad", b"{not json"))
            self.broker.produce(self.topic, recs)
            time.sleep(0.25)


@pytest.fixture(scope="module")
def scraped_worker(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yields the base URL of a Prometheus that has scraped a busy worker for a while."""
    tmp_path = tmp_path_factory.mktemp("prometheus")
    spec = FleetSpec(devices=8, sensors=16, seed=11)
    registry = tmp_path / "registry"
    save_linear_detector(registry, normal_matrix(spec, 20_000), feature_names(spec), code=4)
    topics = {
        "in": broker.new_topic("readings", 2),
        "out": broker.new_topic("anomalies"),
        "dlq": broker.new_topic("dlq"),
    }
    wport, pport = free_port(), free_port()
    cfg = write_worker_config(
        tmp_path / "worker.yaml",
        kafka={
            "bootstrap_servers": broker.bootstrap,
            "input_topics": [topics["in"]],
            "output_topic": topics["out"],
            "dead_letter_topic": topics["dlq"],
            "group_id": broker.new_group(),
            "instance_id": "prom-1",
        },
        model={"registry": str(registry), "name": "sensors"},
        reading={"max_past_s": 7 * 86400.0, "max_future_s": 7 * 86400.0},
        http={"host": "127.0.0.1", "port": wport},
    )
    worker = WorkerProcess(cfg, tmp_path / "worker.log")
    traffic = _Traffic(broker, topics["in"])
    traffic.start()
    tmpl = string.Template((REPO / "deploy/prometheus/local.yml.tmpl").read_text())
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(
        tmpl.substitute(
            WORKER_TARGET=f"127.0.0.1:{wport}", RULES_DIR=str(REPO / "deploy/prometheus/rules")
        )
    )
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={prom_cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{pport}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{pport}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            assert worker.alive(), worker.log()[-3000:]
            try:
                targets = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
                if targets and targets[0]["health"] == "up":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus never scraped the worker"
            time.sleep(0.5)
        # Enough samples for rate() windows of 30 s ($__rate_interval in tests) to have data,
        # and the slowest series scraped at least once: the score-ratio PSI exists only after
        # PSI_REFERENCE + PSI_MIN_READINGS scored readings of a group (3,000, ~8 s of this
        # traffic on a quiet machine, much longer when the machine is loaded).
        time.sleep(20)
        deadline = time.monotonic() + 120
        while not _query(base, "sensor_anomaly_drift_score_ratio_psi")[1]["data"]["result"]:
            assert worker.alive(), worker.log()[-3000:]
            assert time.monotonic() < deadline, "no PSI sample after 140 s of traffic"
            time.sleep(1)
        yield base
    finally:
        traffic.halt.set()
        traffic.join(timeout=10)
        rc = worker.terminate()
        prom.terminate()
        prom.wait(timeout=20)
        log.close()
        assert rc == 0, worker.log()[-3000:]


def test_every_dashboard_query_parses_and_returns_data(scraped_worker: str) -> None:
    base = scraped_worker
    queries = dashboard_queries(DASHBOARD)
    assert len(queries) >= 10
    failures = []
    for title, expr in queries:
        code, body = _query(base, expr)
        if code != 200 or body.get("status") != "success":
            failures.append(f"{title}: HTTP {code} {body.get('error')} for {expr}")
        elif not body["data"]["result"]:
            failures.append(f"{title}: no data for {expr}")
    assert not failures, "\n".join(failures)


def test_rules_evaluate_and_worker_series_are_sane(scraped_worker: str) -> None:
    base = scraped_worker
    groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert rules, "no rules loaded"
    bad = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
    assert not bad, bad
    firing = [r["name"] for r in rules if r["type"] == "alerting" and r["state"] == "firing"]
    # A healthy, busy worker with a fresh model fires nothing.
    assert not firing, firing
    code, body = _query(base, "sum(rate(sensor_anomaly_readings_scored_total[30s]))")
    assert code == 200 and float(body["data"]["result"][0]["value"][1]) > 50
    code, body = _query(base, 'sensor_anomaly_dead_letters_total{reason="decode_error"}')
    assert float(body["data"]["result"][0]["value"][1]) > 0
    code, body = _query(base, "sensor_anomaly_ready")
    assert float(body["data"]["result"][0]["value"][1]) == 1
