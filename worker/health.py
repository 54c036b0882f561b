"""Liveness/readiness state and the HTTP endpoint serving it with ``/metrics``.

``/healthz``: 200 while the main loop has iterated within ``stall_after_s`` (a wedged loop
is not alive). ``/readyz``: 200 when a model is loaded, partitions are assigned and the
broker answered recently. Bodies are small JSON documents explaining the verdict.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


@dataclass
class HealthState:
    """Mutable, lock-protected health facts written by the loop, read by HTTP threads."""

    stall_after_s: float = 120.0
    model_version: str = ""
    assigned_partitions: int = 0
    broker_ok: bool = False
    last_loop_monotonic: float = field(default_factory=time.monotonic)
    stopping: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **changes: Any) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self, k, v)

    def beat(self) -> None:
        self.last_loop_monotonic = time.monotonic()  # a float store is atomic in CPython

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self.last_loop_monotonic
        return age < self.stall_after_s, {"loop_age_s": round(age, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            facts = {
                "model_version": self.model_version or None,
                "assigned_partitions": self.assigned_partitions,
                "broker_ok": self.broker_ok,
                "stopping": self.stopping,
            }
            ok = bool(
                self.model_version
                and self.assigned_partitions > 0
                and self.broker_ok
                and not self.stopping
            )
        alive, live_facts = self.liveness()
        return ok and alive, {**facts, **live_facts}


def _handler(registry: CollectorRegistry, state: HealthState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, facts = state.liveness() if path == "/healthz" else state.readiness()
                body = json.dumps({"ok": ok, **facts}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes every few seconds would drown the log

    return Handler


class HealthServer:
    """Serves /metrics, /healthz and /readyz on a background thread."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, state: HealthState
    ) -> None:
        self._server = ThreadingHTTPServer((host, port), _handler(registry, state))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-http", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
