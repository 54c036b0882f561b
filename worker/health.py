"""Liveness/readiness state and the HTTP endpoint serving it with ``/metrics``.

``/healthz``: 200 while the main loop has iterated within ``stall_after_s`` (a wedged loop
is not alive). ``/readyz``: 200 when a model is loaded, partitions are assigned and the
broker answered recently. Bodies are small JSON documents explaining the verdict.

The server is a side channel of the scoring loop and must never starve it, however many
clients scrape (an unbounded thread-per-connection server let 200 concurrent scrapes cut
scoring from 2,993 to 245 readings/s). So it is one thread with a selector, and bounded:

- at most ``max_connections`` (256) open connections; more wait in the kernel's listen
  backlog (``backlog``) until one closes, so every request is answered, later;
- at most ``max_requests_per_s`` (50) responses per second (token bucket, burst
  ``max_requests_per_s / 10``); requests beyond it wait their turn. ``/healthz`` and
  ``/readyz`` queue apart from the rest and the two queues take turns, so a probe is
  answered within two tokens' time under a scrape flood (and probes cannot starve
  scrapes); each queue is served in arrival order. A response costs 60-260 µs of CPU
  (measured on a loaded 2-core machine, most of it the kernel's loopback send and close),
  so a flood costs the loop at most about 1 % of a core; a real deployment needs a
  handful per second (Prometheus and probes every few seconds);
- ``/metrics`` is rendered at most once per ``metrics_max_age_s``: concurrent scrapes share
  one rendering (Prometheus scrapes every few seconds; the body is at most that stale),
  gzip-compressed once per rendering for clients that accept it (Prometheus does);
- a connection that has not sent its request head within ``request_timeout_s``, or not
  taken its response within that time, is closed (a slow client cannot hold a slot);
- request heads are limited to 16 KiB (431), methods to GET and HEAD (405 otherwise).

Every response closes its connection (``Connection: close``), so no idle keep-alive
connection holds a slot. Measured in docs/benchmarks.md (scripts/bench_scrape.py).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import math
import os
import re
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

_MAX_HEAD = 16384
_PROBES = frozenset({"/healthz", "/readyz"})
_GZIP_RE = re.compile(rb"(?im)^accept-encoding:[^\r\n]*\bgzip\b")
_GZIP_HEADERS = "Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HealthServerError(OSError):
    """The endpoint cannot listen: port in use, address not of this host, no permission.

    ``str()`` is a one-line message naming the setting to change; ``errno`` and
    ``strerror`` are the operating system's, as for any :class:`OSError`.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, os.strerror(code) if code else message)
        self.message = message

    def __str__(self) -> str:
        return self.message


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


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening, non-blocking socket, or :class:`HealthServerError`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise HealthServerError(
            errno.EADDRNOTAVAIL,
            f"http.host {host!r} does not resolve ({e.strerror}); set http.host or "
            "SENSOR_ANOMALY_HTTP__HOST to an address of this machine, e.g. 127.0.0.1",
        ) from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted worker bind while its predecessor's sockets are in TIME_WAIT;
        # on Linux it does not let two processes listen on one port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        code = e.errno or 0
        if code == errno.EADDRINUSE:
            msg = (
                f"http.port {port} is in use on {host}; set http.port or "
                "SENSOR_ANOMALY_HTTP__PORT to a free port, or stop what uses it"
            )
        elif code == errno.EACCES:
            msg = (
                f"no permission to listen on {host}:{port}; set http.port or "
                "SENSOR_ANOMALY_HTTP__PORT to a port above 1023"
            )
        elif code == errno.EADDRNOTAVAIL:
            msg = (
                f"http.host {host} is not an address of this machine; set http.host or "
                "SENSOR_ANOMALY_HTTP__HOST (default 127.0.0.1)"
            )
        else:
            msg = (
                f"cannot listen on {host}:{port} ({e.strerror}); check http.host and "
                "http.port (SENSOR_ANOMALY_HTTP__HOST / __PORT)"
            )
        raise HealthServerError(code, msg) from None
    return sock


class _Conn:
    """One client connection: reading its request head, queued, or writing the response."""

    __slots__ = ("buf", "deadline", "out", "registered", "request", "sent", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.deadline = deadline
        self.out = b""
        self.sent = 0
        # (method, path, accepts gzip) once the head is in
        self.request: tuple[str, str, bool] | None = None
        self.registered = False  # with the selector (only while waiting for the socket)


class HealthServer:
    """Serves /metrics, /healthz and /readyz on one background thread (see the module doc).

    Args:
        host, port: where to listen (port 0 picks a free port; see :attr:`address`).
        registry: the Prometheus registry ``/metrics`` renders.
        state: the liveness/readiness verdicts.
        max_connections: open connections at most; more wait in the listen backlog.
        backlog: the listen backlog (the kernel caps it at ``net.core.somaxconn``).
        request_timeout_s: seconds a connection may take to send its request head, and
            again to take its response, before it is closed.
        max_requests_per_s: responses per second at most: the endpoint's CPU budget.
        metrics_max_age_s: seconds a /metrics rendering is reused.

    Raises:
        HealthServerError: from the constructor, when it cannot listen.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        state: HealthState,
        *,
        max_connections: int = 256,
        backlog: int = 1024,
        request_timeout_s: float = 10.0,
        max_requests_per_s: float = 50.0,
        metrics_max_age_s: float = 0.5,
    ) -> None:
        self._registry = registry
        self._state = state
        self._max_connections = max_connections
        self._timeout = request_timeout_s
        self._rate = max_requests_per_s
        self._burst = max(1.0, max_requests_per_s / 10)
        self._tokens = self._burst
        self._tokens_at = time.monotonic()
        self._metrics_max_age = metrics_max_age_s
        self._metrics: tuple[float, bytes] | None = None
        self._metrics_gz: tuple[float, bytes] | None = None
        self._sock = _listen(host, port, backlog)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._accepting = True
        self._conns: dict[socket.socket, _Conn] = {}
        self._queue: deque[_Conn] = deque()
        self._probes: deque[_Conn] = deque()  # /healthz and /readyz: their own turns
        self._probe_turn = False
        self._stopping = False
        self._next_sweep = 0.0
        self._thread = threading.Thread(target=self._serve, name="health-http", daemon=True)
        self.requests_served = 0  # for tests and benchmarks

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every socket; open connections are dropped."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for c in list(self._conns.values()):
            self._close(c)
        self._sel.close()
        for s in (self._sock, self._wake_r, self._wake_w):
            s.close()

    # -- the serving thread ---------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping:
            try:
                self._step()
            except Exception:  # never let a bug end the endpoint silently
                log.exception("health endpoint: unexpected error; continuing")
                time.sleep(0.1)

    def _step(self) -> None:
        now = time.monotonic()
        timeout = self._timeout
        if self._queue or self._probes:
            timeout = min(timeout, max(0.0, (1.0 - self._tokens) / self._rate))
        for key, mask in self._sel.select(timeout):
            if key.data is None:
                self._accept()
            elif key.data == "wake":
                self._drain_wake()
            elif mask & selectors.EVENT_READ:
                self._read(key.data)
            else:
                self._write(key.data)
        self._respond_queued()
        now = time.monotonic()
        if now >= self._next_sweep:  # deadlines are coarse: a sweep every 0.1 s is enough
            self._next_sweep = now + 0.1
            for c in [c for c in self._conns.values() if c.deadline < now]:
                self._close(c)
        if not self._accepting and len(self._conns) < self._max_connections:
            self._sel.register(self._sock, selectors.EVENT_READ, None)
            self._accepting = True

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        while len(self._conns) < self._max_connections:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: leave the rest in the backlog for now
                log.warning("health endpoint: accept failed: %s", e)
                return
            sock.setblocking(False)
            c = _Conn(sock, time.monotonic() + self._timeout)
            self._conns[sock] = c
            # The request has usually arrived by the time a connection is accepted: read
            # it now, and involve the selector only if it has not (a few µs per request).
            self._read(c)
        # Full: stop accepting; the kernel queues new connections until a slot frees.
        self._sel.unregister(self._sock)
        self._accepting = False

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(8192)
        except (BlockingIOError, InterruptedError):
            self._watch(c, selectors.EVENT_READ)
            return
        except OSError:
            self._close(c)
            return
        if not data:  # the client went away before sending a whole request
            self._close(c)
            return
        c.buf += data
        end = c.buf.find(b"\r\n\r\n")
        if end < 0 and len(c.buf) <= _MAX_HEAD:
            self._watch(c, selectors.EVENT_READ)
            return
        self._unwatch(c)
        if end < 0 or end > _MAX_HEAD:
            c.request = ("", "431", False)
        else:
            line = bytes(c.buf[: c.buf.find(b"\r\n")]).split(b" ")
            if len(line) != 3 or not line[2].startswith(b"HTTP/"):
                c.request = ("", "400", False)
            else:
                gz = _GZIP_RE.search(bytes(c.buf[:end])) is not None
                c.request = (line[0].decode("latin-1"), line[1].decode("latin-1"), gz)
        c.buf = bytearray()
        c.deadline = math.inf  # waiting in the queue is our delay, not the client's fault
        method, target = c.request[0], c.request[1]
        probe = method in ("GET", "HEAD") and target.split("?", 1)[0] in _PROBES
        # Probes queue apart: a scrape flood must not make an orchestrator restart us.
        (self._probes if probe else self._queue).append(c)

    def _respond_queued(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        while (self._probes or self._queue) and self._tokens >= 1.0:
            # Probes and the rest take turns when both wait: neither can starve the other.
            self._probe_turn = not self._probe_turn
            q = (
                self._probes
                if (self._probe_turn and self._probes) or not self._queue
                else self._queue
            )
            c = q.popleft()
            if c.sock.fileno() < 0:  # closed (by stop) while queued
                continue
            self._tokens -= 1.0
            method, path, gz = c.request or ("", "400", False)
            c.out = self._response(method, path, gz)
            c.deadline = now + self._timeout
            self.requests_served += 1
            self._write(c, first=True)

    def _write(self, c: _Conn, first: bool = False) -> None:
        try:
            c.sent += c.sock.send(c.out[c.sent :])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(c)
            return
        if c.sent >= len(c.out):
            self._close(c)
        elif first:
            self._watch(c, selectors.EVENT_WRITE)

    def _watch(self, c: _Conn, events: int) -> None:
        if not c.registered:
            self._sel.register(c.sock, events, c)
            c.registered = True

    def _unwatch(self, c: _Conn) -> None:
        if c.registered:
            self._sel.unregister(c.sock)
            c.registered = False

    def _close(self, c: _Conn) -> None:
        if self._conns.pop(c.sock, None) is None:
            return
        self._unwatch(c)
        c.sock.close()

    # -- what to answer -------------------------------------------------------------------

    def _response(self, method: str, target: str, gzip_ok: bool = False) -> bytes:
        if method == "":  # unparsable request: target holds the status code
            code = int(target)
            return _http(code, b"bad request\n", "text/plain", head=False)
        if method not in ("GET", "HEAD"):
            return _http(
                405, b"only GET and HEAD\n", "text/plain", head=False, extra="Allow: GET, HEAD\r\n"
            )
        head = method == "HEAD"
        path = target.split("?", 1)[0]
        try:
            if path == "/metrics":
                if gzip_ok:  # Prometheus asks for it: a tenth of the bytes to send
                    body = self._metrics_gzip()
                    return _http(200, body, CONTENT_TYPE_LATEST, head, extra=_GZIP_HEADERS)
                return _http(200, self._metrics_body(), CONTENT_TYPE_LATEST, head)
            if path in ("/healthz", "/readyz"):
                st = self._state
                ok, facts = st.liveness() if path == "/healthz" else st.readiness()
                body = json.dumps({"ok": ok, **facts}).encode()
                return _http(200 if ok else 503, body, "application/json", head)
        except Exception as e:  # a broken collector must not take the endpoint down
            log.exception("health endpoint: %s failed", path)
            return _http(500, f"{type(e).__name__}: {e}\n".encode(), "text/plain", head)
        return _http(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain", head)

    def _metrics_body(self) -> bytes:
        now = time.monotonic()
        if self._metrics is None or now - self._metrics[0] > self._metrics_max_age:
            self._metrics = (now, generate_latest(self._registry))
        return self._metrics[1]

    def _metrics_gzip(self) -> bytes:
        plain = self._metrics_body()
        rendered_at = self._metrics[0] if self._metrics else 0.0
        if self._metrics_gz is None or self._metrics_gz[0] != rendered_at:
            self._metrics_gz = (rendered_at, gzip.compress(plain, compresslevel=1, mtime=0))
        return self._metrics_gz[1]


def _http(code: int, body: bytes, ctype: str, head: bool, extra: str = "") -> bytes:
    """A whole HTTP/1.1 response; for HEAD, the same headers and no body."""
    status = (
        f"HTTP/1.1 {code} {_REASONS.get(code, '')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\nConnection: close\r\n{extra}\r\n"
    ).encode("latin-1")
    return status if head else status + body
