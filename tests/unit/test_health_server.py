"""The metrics/health endpoint is bounded and answers everyone: real sockets on loopback."""

from __future__ import annotations

import gzip
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry, Counter

from worker.health import HealthServer, HealthServerError, HealthState


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("demo_things", "things", registry=reg).inc(3)
    return reg


@pytest.fixture
def server(registry: CollectorRegistry) -> Iterator[HealthServer]:
    state = HealthState()
    state.update(model_version="v0001", assigned_partitions=1, broker_ok=True)
    srv = HealthServer(
        "127.0.0.1", 0, registry, state, max_connections=16, max_requests_per_s=2000
    ).start()
    try:
        yield srv
    finally:
        srv.stop()


def _request(srv: HealthServer, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_200_concurrent_requests_are_all_answered(server: HealthServer) -> None:
    paths = ["/metrics", "/healthz", "/readyz", "/metrics"] * 50
    start = threading.Barrier(len(paths), timeout=30)

    def one(path: str) -> int:
        start.wait()  # all 200 connect at once, far above max_connections=16
        code, _, body = _request(server, "GET", path)
        assert body
        return code

    with ThreadPoolExecutor(len(paths)) as pool:
        codes = list(pool.map(one, paths))
    assert codes == [200] * len(paths)
    assert server.requests_served == len(paths)


def test_head_answers_like_get_without_a_body(server: HealthServer) -> None:
    for path in ("/metrics", "/healthz", "/readyz"):
        code, headers, body = _request(server, "HEAD", path)
        g_code, g_headers, g_body = _request(server, "GET", path)
        assert (code, body) == (200, b"")
        assert g_code == 200 and g_body
        assert headers["content-type"] == g_headers["content-type"]
    _, _, metrics = _request(server, "GET", "/metrics")
    assert b"demo_things_total 3.0" in metrics


def test_other_methods_and_paths(server: HealthServer) -> None:
    code, headers, _ = _request(server, "POST", "/metrics")
    assert code == 405 and headers["allow"] == "GET, HEAD"
    assert _request(server, "GET", "/nope")[0] == 404
    assert _request(server, "HEAD", "/nope")[0] == 404


def _raw(srv: HealthServer, data: bytes) -> bytes:
    with socket.create_connection(srv.address, timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_malformed_and_oversized_request_heads(server: HealthServer) -> None:
    assert _raw(server, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    big = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    assert _raw(server, big).startswith(b"HTTP/1.1 431 ")


def test_idle_connections_cannot_hold_the_slots(registry: CollectorRegistry) -> None:
    srv = HealthServer(
        "127.0.0.1", 0, registry, HealthState(), max_connections=4, request_timeout_s=0.5
    ).start()
    idle = [socket.create_connection(srv.address, timeout=5) for _ in range(8)]
    try:
        t0 = time.monotonic()
        code, _, _ = _request(srv, "GET", "/healthz")
        assert code == 200
        assert time.monotonic() - t0 < 10  # the idle ones were dropped at their deadline
        assert all(s.recv(1) == b"" for s in idle[:4])  # closed by the server, unanswered
    finally:
        for s in idle:
            s.close()
        srv.stop()


def test_metrics_rendering_is_shared_within_its_max_age(registry: CollectorRegistry) -> None:
    c = Counter("demo_fresh", "fresh", registry=registry)
    srv = HealthServer("127.0.0.1", 0, registry, HealthState(), metrics_max_age_s=0.3).start()
    try:
        assert b"demo_fresh_total 0.0" in _request(srv, "GET", "/metrics")[2]
        c.inc()
        assert b"demo_fresh_total 0.0" in _request(srv, "GET", "/metrics")[2]  # cached
        time.sleep(0.4)
        assert b"demo_fresh_total 1.0" in _request(srv, "GET", "/metrics")[2]
    finally:
        srv.stop()


def test_port_in_use_is_one_clear_line(registry: CollectorRegistry) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(HealthServerError) as err:
            HealthServer("127.0.0.1", port, registry, HealthState())
    msg = str(err.value)
    assert msg == (
        f"http.port {port} is in use on 127.0.0.1; set http.port or SENSOR_ANOMALY_HTTP__PORT "
        "to a free port, or stop what uses it"
    )
    assert isinstance(err.value, OSError) and err.value.strerror == "Address already in use"


def test_unknown_host_is_one_clear_line(registry: CollectorRegistry) -> None:
    with pytest.raises(HealthServerError, match=r"^http\.host 192\.0\.2\.1 is not an address"):
        HealthServer("192.0.2.1", 0, registry, HealthState())


def test_stop_closes_the_port(registry: CollectorRegistry) -> None:
    srv = HealthServer("127.0.0.1", 0, registry, HealthState()).start()
    host, port = srv.address
    srv.stop()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()


def test_metrics_gzip_when_the_client_accepts_it(server: HealthServer) -> None:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and r.getheader("Content-Encoding") == "gzip"
    finally:
        conn.close()
    assert b"demo_things_total 3.0" in gzip.decompress(body)
    _, headers, plain = _request(server, "GET", "/metrics")  # no Accept-Encoding: plain
    assert "content-encoding" not in headers and b"demo_things_total 3.0" in plain


def test_probes_are_answered_before_a_scrape_flood(registry: CollectorRegistry) -> None:
    srv = HealthServer("127.0.0.1", 0, registry, HealthState(), max_requests_per_s=20).start()
    try:
        with ThreadPoolExecutor(40) as pool:
            flood = [pool.submit(_request, srv, "GET", "/metrics") for _ in range(40)]
            deadline = time.monotonic() + 10
            while len(srv._queue) < 30 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(srv._queue) >= 30  # the flood is waiting for its turn
            assert _request(srv, "GET", "/healthz")[0] == 200
            assert srv.requests_served < 30  # the probe did not wait for the flood
            assert [f.result()[0] for f in flood] == [200] * 40
    finally:
        srv.stop()
