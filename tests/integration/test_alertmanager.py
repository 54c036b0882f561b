"""Incident delivery to Debian's real ``prometheus-alertmanager``, started on loopback here.

Alertmanager routes to a webhook receiver served by this test, so what we check is what
Alertmanager itself groups and sends: one group per device, the labels and annotations we
set, and a ``resolved`` notification after the incident resolves. Also: a POST that fails
(nothing listening yet) is retried with back-off until an Alertmanager appears.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.alertmanager import AlertmanagerClient, AlertmanagerHooks, AlertmanagerSettings
from worker.incidents import (
    Contributor,
    IncidentEvent,
    IncidentSettings,
    IncidentTracker,
    ScoredBatch,
)

BINARY = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not Path(BINARY).exists(),
        reason="needs Debian's prometheus-alertmanager (scripts/system-deps.sh installs it)",
    ),
]
T0 = int(time.time() * 1000) - 600_000
_OFFSETS = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Webhook:
    """Collects Alertmanager's webhook notifications."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", 0))
                hook.payloads.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in list(self.payloads):
                if pred(p):
                    return p
            time.sleep(0.1)
        raise AssertionError(f"no matching notification in {timeout} s; got {self.payloads}")


class Alertmanager:
    """One ``prometheus-alertmanager`` on loopback (clustering off), stopped by PID."""

    def __init__(self, tmp: Path, webhook_port: int, port: int | None = None) -> None:
        self.port = port or free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = tmp / "alertmanager.yml"
        cfg.write_text(
            "route:\n"
            "  receiver: hook\n"
            "  group_by: [device]\n"
            "  group_wait: 1s\n"
            "  group_interval: 1s\n"
            "  repeat_interval: 1h\n"
            "receivers:\n"
            "- name: hook\n"
            "  webhook_configs:\n"
            f"  - url: http://127.0.0.1:{webhook_port}/\n"
            "    send_resolved: true\n"
        )
        self.log = (tmp / "alertmanager.log").open("wb")
        self.proc = subprocess.Popen(
            [
                BINARY,
                f"--config.file={cfg}",
                f"--storage.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",  # no gossip port on every interface
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"alertmanager did not become ready: {(tmp / 'alertmanager.log').read_text()}"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?active=true", timeout=5) as r:
            return list(json.loads(r.read()))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    w = Webhook()
    yield w
    w.server.shutdown()


@pytest.fixture(scope="module")
def am(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook) -> Iterator[Alertmanager]:
    a = Alertmanager(tmp_path_factory.mktemp("am"), webhook.port)
    yield a
    a.stop()


def events(
    tracker: IncidentTracker, device: str, scores: Sequence[float], start_s: int
) -> list[IncidentEvent]:
    n = len(scores)
    first = next(_OFFSETS)
    for _ in range(n - 1):
        next(_OFFSETS)
    b = ScoredBatch(
        device_ids=[device] * n,
        device_groups=["pump"] * n,
        ts_ms=np.array([T0 + (start_s + i) * 1000 for i in range(n)], dtype=np.int64),
        scores=np.array(scores, dtype=np.float64),
        threshold=1.0,
        topics=["in"] * n,
        partitions=np.zeros(n, dtype=np.int64),
        offsets=np.arange(first, first + n, dtype=np.int64),  # one partition: offsets grow
        contributors={
            i: [
                Contributor("sensor_04", 0.71, 88.2, 61.5),
                Contributor("sensor_09", 0.12, 3.1, 2.4),
            ]
            for i, s in enumerate(scores)
            if s > 1
        },
        model_name="sensors",
        model_version="v0001",
    )
    return tracker.process(b).events


SETTINGS = IncidentSettings(
    window_s=3.0, min_anomalous=2, resolve_normal_readings=2, open_ratio=0, min_mean_ratio=1.0
)


def test_alertmanager_groups_by_device_and_delivers_resolve(
    am: Alertmanager, webhook: Webhook
) -> None:
    posts: list[bool] = []
    client = AlertmanagerClient(
        AlertmanagerSettings(
            enabled=True,
            url=am.url,
            resend_interval_s=1.0,
            link_template="https://grafana.example/d/x?var-device={device_id}&from={started_at_ms}",
        ),
        AlertmanagerHooks(on_post=lambda ok, n: posts.append(ok)),
    )
    client.start()
    tr = IncidentTracker(SETTINGS)
    try:
        for ev in events(tr, "pump-001", [2, 2], 0) + events(tr, "pump-002", [2, 2], 0):
            client.submit(ev)
        for dev in ("pump-001", "pump-002"):
            p = webhook.wait_for(
                lambda p, dev=dev: p["groupLabels"] == {"device": dev} and p["status"] == "firing"
            )
            (alert,) = p["alerts"]
            assert alert["labels"] == {
                "alertname": "SensorAnomalyIncident",
                "device": dev,
                "device_group": "pump",
                "model": "sensors",
                "severity": "warning",
            }
            assert "sensor_04 (71 %, 88.2 vs expected 61.5)" in alert["annotations"]["summary"]
            assert alert["annotations"]["link"].startswith(
                f"https://grafana.example/d/x?var-device={dev}&from="
            )
            assert len(alert["annotations"]["incident_id"]) == 32
        # Escalation changes the severity label: the warning alert ends, a critical one fires.
        for ev in events(tr, "pump-002", [12], 2):
            client.submit(ev)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            sev = {
                a["labels"]["severity"] for a in am.alerts() if a["labels"]["device"] == "pump-002"
            }
            if sev == {"critical"}:
                break
            time.sleep(0.2)
        assert sev == {"critical"}
        # Resolve pump-001: Alertmanager sends the group's resolved notification.
        resolved = events(tr, "pump-001", [0, 0], 2)
        assert [e.state for e in resolved] == ["resolved"]
        client.submit(resolved[0])
        p = webhook.wait_for(
            lambda p: p["groupLabels"] == {"device": "pump-001"} and p["status"] == "resolved"
        )
        assert p["alerts"][0]["endsAt"] < time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 1)
        )
        active = {a["labels"]["device"] for a in am.alerts()}
        assert active == {"pump-002"}
        # Active alerts are re-sent every resend_interval_s (1 s here).
        before = len(posts)
        time.sleep(2.5)
        assert len(posts) >= before + 2 and all(posts)
    finally:
        client.stop()


def test_failed_posts_are_retried_with_backoff_until_alertmanager_answers(
    tmp_path: Path, webhook: Webhook
) -> None:
    port = free_port()
    outcomes: list[bool] = []
    client = AlertmanagerClient(
        AlertmanagerSettings(
            enabled=True,
            url=f"http://127.0.0.1:{port}",
            resend_interval_s=30.0,
            initial_backoff_s=0.2,
            max_backoff_s=0.8,
            timeout_s=1.0,
        ),
        AlertmanagerHooks(on_post=lambda ok, n: outcomes.append(ok)),
    )
    client.start()
    try:
        tr = IncidentTracker(SETTINGS)
        for ev in events(tr, "pump-077", [3, 3], 0):
            client.submit(ev)
        deadline = time.monotonic() + 10
        while outcomes.count(False) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcomes.count(False) >= 3 and True not in outcomes
        am = Alertmanager(tmp_path / "late", webhook.port, port=port)
        try:
            webhook.wait_for(lambda p: p["groupLabels"] == {"device": "pump-077"})
            assert outcomes[-1] is True
        finally:
            am.stop()
    finally:
        client.stop()


def test_submit_never_blocks_and_drops_the_oldest_when_full() -> None:
    dropped: list[int] = []
    client = AlertmanagerClient(
        AlertmanagerSettings(enabled=True, queue_size=3),
        AlertmanagerHooks(on_dropped=dropped.append),
    )
    tr = IncidentTracker(SETTINGS)
    evs = [e for i in range(5) for e in events(tr, f"pump-{i:03d}", [2, 2], 0)]
    for ev in evs:  # the delivery thread is not even started
        client.submit(ev)
    assert sum(dropped) == 2 == client.dropped
    assert [e.device_id for e in client._queue] == ["pump-002", "pump-003", "pump-004"]
