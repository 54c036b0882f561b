"""anomaly-serve as a real process on a loopback port, called over real HTTP.

One server (module scope) on a registry holding a small linear detector serves most tests;
tests that need other settings (a token, a short body timeout, hot reload) start their own.
/score is compared with the worker's own :class:`worker.pipeline.Scorer` on the same
artifact and readings, to 1e-9.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import yaml

from detector import Detector, Registry, load
from serve.cli import openapi_text
from serve.config import load_config
from tests.support.detectors import linear_detector
from worker.pipeline import Scorer
from worker.records import SimpleRecord

REPO = Path(__file__).resolve().parents[2]
FEATURES = [f"sensor_{i:02d}" for i in range(8)]
NOW_MS = int(time.time() * 1000)


def _normal(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 3))
    mix = np.random.default_rng(42).normal(size=(3, len(FEATURES)))
    return base @ mix + rng.normal(scale=0.05, size=(n, len(FEATURES))) + 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python -m serve.cli --config <file>`` with its log in a file."""

    def __init__(self, tmp: Path, serve: dict[str, Any], env: dict[str, str] | None = None,
                 **sections: Any) -> None:  # fmt: skip
        self.port = _free_port()
        doc = {"serve": {"port": self.port, **serve}, **sections}
        self.config = tmp / f"serve-{self.port}.yaml"
        self.config.write_text(yaml.safe_dump(doc))
        self.log_path = tmp / f"serve-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "--config", str(self.config)],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server not ready within 60 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        if body is not None and not isinstance(body, bytes | str):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        status, hdrs, data = self.request("POST", path, body, **kw)
        assert hdrs.get("content-type", "").startswith("application/json"), (status, data)
        return status, json.loads(data)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve-registry")
    Registry(root).save(linear_detector(_normal(4000, 0), FEATURES, code=3, k=2.0))
    return root


@pytest.fixture(scope="module")
def detector(registry: Path) -> Detector:
    return load(Registry(registry).current_path("sensors"))


@pytest.fixture(scope="module")
def server(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    s = Server(
        tmp,
        {"registry": str(registry), "models": ["sensors"], "max_readings": 500,
         "max_body_bytes": 200_000},
        reading={"max_imputed_features": 1},
    )  # fmt: skip
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


def _reading(values: np.ndarray, device: str | None = "pump-001", ts: int | None = NOW_MS) -> Any:
    r: dict[str, Any] = {"values": dict(zip(FEATURES, values.tolist(), strict=True))}
    if device is not None:
        r["device_id"] = device
    if ts is not None:
        r["timestamp"] = ts
    return r


def _mixed_readings() -> list[Any]:
    """Normal readings, anomalous ones (correlations broken), and each kind of bad reading."""
    x = _normal(60, 7)
    x[::5, 2] += 8.0  # every 5th reading anomalous in one sensor
    x[3] += np.linspace(-6, 6, len(FEATURES))  # one anomalous in many sensors
    readings = [_reading(row, device=f"pump-{i % 4:03d}", ts=NOW_MS - 1000 * i) for i, row in
                enumerate(x)]  # fmt: skip
    del readings[10]["values"]["sensor_03"]  # one feature missing: imputed (limit 1)
    readings[11]["values"]["sensor_01"] = None  # null: imputed too
    del readings[12]["values"]["sensor_03"]
    del readings[12]["values"]["sensor_04"]  # two missing: missing_field
    readings[13]["values"]["sensor_05"] = "1.5"  # a string: invalid_number
    readings[14]["values"]["sensor_05"] = True  # a boolean: invalid_number
    readings[15]["timestamp"] = 1_700_000_000  # seconds, not ms: invalid_timestamp
    readings[16]["device_id"] = ""  # invalid_device_id
    readings[17]["values"] = [1, 2, 3]  # invalid_shape
    readings[18] = 42  # not an object
    readings[19]["timestamp"] = "yesterday"
    return readings


def _body_with_overflow(readings: list[Any], index: int) -> bytes:
    """JSON text with reading ``index``'s sensor_00 set to 1e400 (out of float64 range)."""
    readings = json.loads(json.dumps(readings))
    readings[index]["values"]["sensor_00"] = 123456.0
    return json.dumps({"readings": readings}).replace("123456.0", "1e400").encode()


def test_score_equals_the_workers_events(server: Server, detector: Detector) -> None:
    readings = _mixed_readings()
    body = _body_with_overflow(readings, 20)
    status, doc = server.post("/v1/models/sensors/score", body)
    assert status == 200, doc
    # The worker's path on the same artifact, settings and reading bytes.
    cfg = load_config(server.config, env={})
    scorer = Scorer(detector, cfg.reading, cfg.events)
    values = [
        bytes(r) for r in msgspec.json.decode(body, type=dict[str, list[msgspec.Raw]])["readings"]
    ]
    res = scorer.process([SimpleRecord("t", 0, i, None, v, []) for i, v in enumerate(values)])
    events = {json.loads(m.value)["source"]["offset"]: json.loads(m.value) for m in res.events}
    dead = {
        int(dict(m.headers)["__connect.errors.offset"]): dict(m.headers)[
            "sensor_anomaly.error.reason"
        ].decode()
        for m in res.dead_letters
    }
    results = doc["results"]
    assert len(results) == len(readings)
    assert doc["model"] == {"name": "sensors", "version": detector.info.version}
    got_errors = {r["index"]: r["error"]["reason"] for r in results if "error" in r}
    assert got_errors == dead
    assert dead[12] == "missing_field" and dead[13] == dead[14] == dead[20] == "invalid_number"
    assert dead[15] == dead[19] == "invalid_timestamp" and dead[16] == "invalid_device_id"
    assert dead[17] == dead[18] == "invalid_shape"
    anomalous = {r["index"] for r in results if r.get("is_anomaly")}
    assert anomalous == set(events)
    assert len(anomalous) >= 10  # the data set has anomalies to compare
    assert doc["scored"] == len(readings) - len(dead) and doc["errors"] == len(dead)
    assert doc["anomalies"] == len(anomalous)
    for r in results:
        if "error" in r:
            continue
        i = r["index"]
        assert r["device_id"] == readings[i]["device_id"]
        assert r["timestamp_ms"] == readings[i]["timestamp"]
        assert r["threshold"] == detector.threshold.value
        if i not in events:
            assert r["score"] <= r["threshold"] and r["contributors"] == []
            continue
        ev = events[i]
        for key in ("score", "threshold", "score_ratio"):
            assert math.isclose(r[key], ev[key], rel_tol=0, abs_tol=1e-9), key
        assert r["imputed_sensors"] == ev["imputed_sensors"]
        assert [c["sensor"] for c in r["contributors"]] == [c["sensor"] for c in ev["contributors"]]
        for a, b in zip(r["contributors"], ev["contributors"], strict=True):
            for key in ("share", "expected", "error_z"):
                assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=1e-9), key
            assert a["value"] == b["value"]  # None (imputed) on both sides, else equal
    assert results[10]["imputed_sensors"] == ["sensor_03"]
    assert results[11]["imputed_sensors"] == ["sensor_01"]


def test_score_reports_out_of_range_features(server: Server, detector: Detector) -> None:
    x = _normal(1, 3)[0]
    x[6] = 1e6  # far above anything seen in training
    status, doc = server.post("/v1/models/sensors/score", {"readings": [_reading(x)]})
    assert status == 200, doc
    r = doc["results"][0]
    expected = detector.out_of_range(x[None, :]).features(0)
    assert [(o["sensor"], o["excess"]) for o in r["out_of_range"]] == expected
    if detector.train_min is not None:
        assert r["out_of_range"][0]["sensor"] == "sensor_06"
    assert r["is_anomaly"] and r["contributors"][0]["sensor"] == "sensor_06"


def test_device_id_and_timestamp_are_optional(server: Server) -> None:
    x = _normal(1, 4)[0]
    status, doc = server.post(
        "/v1/models/sensors/score",
        {"readings": [_reading(x, device=None, ts=None), _reading(x), {"values": {}}]},
    )
    assert status == 200, doc
    a, b, c = doc["results"]
    assert a["device_id"] is None and b["device_id"] == "pump-001"
    assert abs(a["timestamp_ms"] - time.time() * 1000) < 60_000
    assert a["score"] == b["score"]
    assert c["error"]["reason"] == "missing_field"


def test_reconstruct_encode_and_decode(server: Server, detector: Detector) -> None:
    x = _normal(5, 5)
    readings = {"readings": [_reading(row) for row in x]}
    status, rec = server.post("/v1/models/sensors/reconstruct", readings)
    assert status == 200, rec
    expected = detector.preprocessor.inverse_transform(detector.score(x).reconstruction)
    got = np.array([[r["reconstruction"][f] for f in FEATURES] for r in rec["results"]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    status, enc = server.post("/v1/models/sensors/encode", readings)
    assert status == 200, enc
    assert enc["code_width"] == 3
    codes = [r["code"] for r in enc["results"]]
    np.testing.assert_allclose(
        codes, detector.network.encode(detector.preprocessor.transform(x)), rtol=0, atol=1e-9
    )
    status, dec = server.post("/v1/models/sensors/decode", {"codes": codes})
    assert status == 200, dec
    back = np.array([[r["values"][f] for f in FEATURES] for r in dec["readings"]])
    # Decoding the codes runs the second half of the same network: the reconstruction.
    np.testing.assert_allclose(back, got, rtol=0, atol=1e-9)


def test_model_listing_and_detail(server: Server, detector: Detector) -> None:
    status, _, data = server.get("/v1/models")
    assert status == 200
    assert json.loads(data)["models"] == [
        {
            "name": "sensors",
            "version": detector.info.version,
            "n_features": len(FEATURES),
            "threshold": detector.threshold.value,
            "trained_at": detector.info.trained_at,
        }
    ]
    status, _, data = server.get("/v1/models/sensors")
    d = json.loads(data)
    assert status == 200 and d["features"] == FEATURES and d["code_width"] == 3
    assert d["threshold"]["value"] == detector.threshold.value
    assert d["threshold"]["method"] == "mean_k_std" and d["threshold"]["param"] == 2.0


def test_open_inference_protocol_v2_by_hand(server: Server, detector: Detector) -> None:
    assert server.get("/v2/health/live")[0] == 200
    status, _, data = server.get("/v2/health/ready")
    assert status == 200 and json.loads(data) == {"ready": True}
    status, _, data = server.get("/v2/models/sensors")
    meta = json.loads(data)
    assert status == 200
    assert meta["inputs"] == [{"name": "readings", "datatype": "FP32", "shape": [-1, 8]}]
    assert meta["versions"] == [detector.info.version]
    x = _normal(6, 6)
    x[0, 2] += 8
    x32 = x.astype(np.float32)
    request = {
        "id": "req-1",
        "inputs": [
            {"name": "readings", "shape": [6, 8], "datatype": "FP32", "data": x32.ravel().tolist()}
        ],
    }
    status, doc = server.post("/v2/models/sensors/infer", request)
    assert status == 200, doc
    s = detector.score(x32.astype(np.float64)).score
    assert doc["model_name"] == "sensors" and doc["id"] == "req-1"
    assert doc["model_version"] == detector.info.version
    out = {o["name"]: o for o in doc["outputs"]}
    assert set(out) == {"score", "is_anomaly"}
    assert out["score"]["shape"] == [6] and out["score"]["datatype"] == "FP64"
    np.testing.assert_allclose(out["score"]["data"], s, rtol=0, atol=1e-12)
    assert out["is_anomaly"]["datatype"] == "BOOL"
    assert out["is_anomaly"]["data"] == (s > detector.threshold.value).tolist()
    assert out["is_anomaly"]["data"][0] is True
    # Nested rows, a requested output and the versioned route give the same numbers.
    request["inputs"][0]["data"] = x32.tolist()
    request["outputs"] = [{"name": "score_ratio"}]
    path = f"/v2/models/sensors/versions/{detector.info.version}/infer"
    status, doc2 = server.post(path, request)
    assert status == 200, doc2
    assert [o["name"] for o in doc2["outputs"]] == ["score_ratio"]
    np.testing.assert_allclose(
        doc2["outputs"][0]["data"], s / detector.threshold.value, rtol=0, atol=1e-12
    )
    status, err = server.post("/v2/models/sensors/versions/v9999/infer", request)
    assert status == 404 and "v9999" in err["error"]


def test_tritonclient_speaks_to_it(server: Server, detector: Detector) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_ready()
    assert client.get_model_metadata("sensors")["inputs"][0]["shape"] == [-1, 8]
    x = _normal(4, 8).astype(np.float32)
    inp = httpclient.InferInput("readings", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("score",)]
    res = client.infer("sensors", [inp], outputs=outputs)
    np.testing.assert_allclose(
        res.as_numpy("score"), detector.score(x.astype(np.float64)).score, rtol=0, atol=1e-12
    )


def _good(n: int = 1) -> list[Any]:
    return [_reading(row) for row in _normal(n, 9)]


BAD_REQUESTS: list[tuple[str, str, Any, dict[str, str] | None, int, str]] = [
    # (id, path, body, extra headers, status, text the error must contain)
    ("malformed", "/v1/models/sensors/score", b'{"readings": [', None, 400, "not valid JSON"),
    ("nan-literal", "/v1/models/sensors/score",
     b'{"readings": [{"values": {"sensor_00": NaN}}]}', None, 400, "NaN"),
    ("not-json-type", "/v1/models/sensors/score", {"readings": _good()},
     {"Content-Type": "text/plain"}, 415, "application/json"),
    ("form-type", "/v1/models/sensors/encode", {"readings": _good()},
     {"Content-Type": "application/x-www-form-urlencoded"}, 415, "not JSON"),
    ("unknown-model", "/v1/models/pumps/score", {"readings": _good()}, None, 404, "pumps"),
    ("extra-feature", "/v1/models/sensors/score",
     {"readings": [{"values": {**_good()[0]["values"], "sensor_99": 1.0}}]}, None, 422,
     "sensor_99"),
    ("missing-features", "/v1/models/sensors/score",
     {"readings": [{"values": {"sensor_00": 1.0}}]}, None, 422, "sensor_01"),
    ("string-number", "/v1/models/sensors/reconstruct",
     {"readings": [{"values": {**_good()[0]["values"], "sensor_02": "3"}}]}, None, 422,
     "sensor_02"),
    ("too-many", "/v1/models/sensors/score", {"readings": _good(501)}, None, 422, "limit is 500"),
    ("empty", "/v1/models/sensors/score", {"readings": []}, None, 422, "no readings"),
    ("too-large", "/v1/models/sensors/score", b'{"readings": [' + b" " * 200_000 + b"]}", None, 413,
     "200000"),
    ("top-level-extra", "/v1/models/sensors/score", {"readings": _good(), "reading": 1}, None,
     422, "reading"),
    ("readings-not-list", "/v1/models/sensors/score", {"readings": {"a": 1}}, None, 422,
     "$.readings"),
    ("code-width", "/v1/models/sensors/decode", {"codes": [[0.0, 1.0]]}, None, 422,
     "width 3"),
    ("code-strings", "/v1/models/sensors/decode", {"codes": [["a", 1, 2]]}, None, 422,
     "$.codes[0][0]"),
    ("code-overflow", "/v1/models/sensors/decode", b'{"codes": [[1e400, 0, 0]]}', None, 422,
     "codes"),
    ("oip-shape", "/v2/models/sensors/infer",
     {"inputs": [{"name": "x", "shape": [1, 7], "datatype": "FP32", "data": [0] * 7}]}, None,
     400, "[n, 8]"),
    ("oip-datatype", "/v2/models/sensors/infer",
     {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "INT64", "data": [0] * 8}]}, None,
     400, "FP32"),
    ("oip-bools", "/v2/models/sensors/infer",
     {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [True] * 8}]}, None,
     400, "numbers"),
    ("oip-count", "/v2/models/sensors/infer",
     {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0] * 8}]}, None,
     400, "needs 16"),
    ("oip-output", "/v2/models/sensors/infer",
     {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}],
      "outputs": [{"name": "latent"}]}, None, 400, "latent"),
    ("oip-overflow", "/v2/models/sensors/infer",
     {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64", "data": [1e300] * 8}]},
     None, 422, "non-finite"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "text"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_a_json_4xx_naming_the_problem(
    server: Server, path: str, body: Any, headers: dict[str, str] | None, status: int, text: str
) -> None:
    got, doc = server.post(path, body, headers=headers)
    assert got == status, doc
    assert text in json.dumps(doc), doc
    assert doc["error"] and doc.get("fix"), doc
    assert "Traceback" not in json.dumps(doc)


def test_one_bad_reading_does_not_fail_the_others(server: Server) -> None:
    readings = _good(3)
    del readings[1]["values"]["sensor_00"]
    readings[1]["values"]["sensor_01"] = None
    status, doc = server.post("/v1/models/sensors/encode", {"readings": readings})
    assert status == 200, doc
    assert [("error" in r) for r in doc["results"]] == [False, True, False]
    assert doc["results"][1]["error"]["reason"] == "missing_field"
    assert "sensor_00" in doc["results"][1]["error"]["message"]


def test_unknown_routes_and_methods_answer_json(server: Server) -> None:
    status, _, data = server.get("/v1/nothing")
    assert status == 404 and json.loads(data)["error"].startswith("no route")
    status, _, data = server.get("/v1/models/sensors/score")
    assert status == 405 and "GET" in json.loads(data)["error"]


def test_the_served_openapi_is_the_committed_one(server: Server) -> None:
    status, _, data = server.get("/openapi.json")
    assert status == 200
    committed = json.loads((REPO / "schemas" / "openapi.json").read_text())
    assert json.loads(data) == committed == json.loads(openapi_text())


def test_metrics_count_requests_codes_latency_and_readings(server: Server) -> None:
    server.post("/v1/models/sensors/score", {"readings": _good(3)})
    server.post("/v1/models/nope/score", {"readings": _good(1)})
    status, hdrs, data = server.get("/metrics")
    text = data.decode()
    assert status == 200 and hdrs["content-type"].startswith("text/plain")

    def sample(name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        head = f"{name}{{{want}}} " if labels else f"{name} "
        for line in text.splitlines():
            if line.startswith(head):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no sample {name}{{{want}}} in\n{text}")

    route = "/v1/models/{name}/score"
    assert sample("sensor_anomaly_serve_requests_total", code="200", method="POST",
                  route=route) >= 1  # fmt: skip
    assert sample("sensor_anomaly_serve_requests_total", code="404", method="POST",
                  route=route) >= 1  # fmt: skip
    assert sample("sensor_anomaly_serve_request_duration_seconds_count", route=route) >= 2
    assert sample("sensor_anomaly_serve_readings_total", endpoint="score", model="sensors") >= 3
    assert sample("sensor_anomaly_serve_ready") == 1


def test_a_slow_body_gets_408(registry: Path, tmp_path: Path) -> None:
    s = Server(tmp_path, {"registry": str(registry), "request_timeout_s": 0.5})
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/models/sensors/score HTTP/1.1\r\nHost: x\r\n"
                b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"readings"'
            )
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            doc = json.loads(resp.read())
        assert resp.status == 408, doc
        assert "request_timeout_s" in doc["fix"]
        # The server is fine afterwards.
        assert s.post("/v1/models/sensors/score", {"readings": _good()})[0] == 200
    finally:
        assert s.stop() == 0, s.log()


def test_bearer_token_from_the_environment(registry: Path, tmp_path: Path) -> None:
    env = {"SERVE_TEST_TOKEN": "s3cret-token"}
    s = Server(tmp_path, {"registry": str(registry), "token_env": "SERVE_TEST_TOKEN"}, env=env)
    try:
        body = {"readings": _good()}
        status, doc = s.post("/v1/models/sensors/score", body)
        assert status == 401 and "Bearer" in doc["fix"]
        status, doc = s.post("/v1/models/sensors/score", body,
                             headers={"Authorization": "Bearer wrong"})  # fmt: skip
        assert status == 401
        assert s.get("/v1/models")[0] == 401
        assert s.get("/v2/models/sensors")[0] == 401
        ok = {"Authorization": "Bearer s3cret-token"}
        assert s.post("/v1/models/sensors/score", body, headers=ok)[0] == 200
        assert s.get("/v1/models", headers=ok)[0] == 200
        # Probes and scrapes need no secret.
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready", "/openapi.json"):
            assert s.get(path)[0] == 200, path
        assert "s3cret-token" not in s.log()
    finally:
        assert s.stop() == 0, s.log()


def test_new_registry_versions_are_picked_up_and_shutdown_is_clean(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    Registry(root).save(linear_detector(_normal(2000, 1), FEATURES, code=3))
    s = Server(tmp_path, {"registry": str(root), "reload_interval_s": 0.2})
    try:
        assert json.loads(s.get("/v1/models/sensors")[2])["version"] == "v0001"
        Registry(root).save(linear_detector(_normal(2000, 2), FEATURES, code=2))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            d = json.loads(s.get("/v1/models/sensors")[2])
            if d["version"] == "v0002":
                break
            time.sleep(0.1)
        assert d["version"] == "v0002" and d["code_width"] == 2, s.log()
        status, doc = s.post("/v1/models/sensors/encode", {"readings": _good()})
        assert status == 200 and doc["model"]["version"] == "v0002"
        assert len(doc["results"][0]["code"]) == 2
    finally:
        assert s.stop(signal.SIGTERM) == 0, s.log()
    assert "stopped cleanly" in s.log()


def test_sigterm_lets_an_in_flight_request_finish(registry: Path, tmp_path: Path) -> None:
    s = Server(tmp_path, {"registry": str(registry), "shutdown_grace_s": 10})
    body = json.dumps({"readings": _good(2)}).encode()
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=20) as sock:
            head = (
                "POST /v1/models/sensors/score HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body[:10])
            time.sleep(0.3)  # the server is now receiving this request's body
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert s.proc.poll() is None  # still draining
            sock.sendall(body[10:])
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            doc = json.loads(resp.read())
        assert resp.status == 200 and doc["scored"] == 2, doc
        assert s.proc.wait(20) == 0
    finally:
        s.stop()
    assert "stopped cleanly" in s.log() and "Traceback" not in s.log()
