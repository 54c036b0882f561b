"""The worker's pure parts: config, decoding, scoring pipeline, events, metrics, health."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from detector import Detector
from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from tests.support.detectors import linear_detector
from worker.config import ConfigError, EventSettings, ReadingSettings, load_config
from worker.events import DeviceGroups, EpisodeTracker
from worker.health import HealthServer, HealthState
from worker.metrics import WorkerMetrics, observe_many
from worker.pipeline import Scorer
from worker.reasons import Reason
from worker.records import SimpleRecord

REPO = Path(__file__).resolve().parents[2]
SPEC = FleetSpec(devices=4, sensors=16, seed=3)
FEATURES = feature_names(SPEC)


@pytest.fixture(scope="module")
def det() -> Detector:
    return linear_detector(normal_matrix(SPEC, 8000), FEATURES, code=4)


def _now_spec(per_device: int) -> FleetSpec:
    return FleetSpec(
        devices=4, sensors=16, seed=3, start_ms=int(time.time() * 1000) - per_device * 1000
    )


def _rec(i: int, value: bytes | None, key: bytes | None = b"k") -> SimpleRecord:
    return SimpleRecord("in", 0, i, key, value, [("h", b"1")])


# -- config ---------------------------------------------------------------------------------


def test_config_defaults_file_and_env_layering(tmp_path: Path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("kafka:\n  group_id: from-file\n  input_topics: [a, b]\nbatch:\n  max_size: 64\n")
    cfg = load_config(
        f,
        env={
            "SENSOR_ANOMALY_BATCH__MAX_SIZE": "128",
            "SENSOR_ANOMALY_KAFKA__SASL_PASSWORD": "s3cret",
        },
    )
    assert cfg.kafka.group_id == "from-file"
    assert cfg.kafka.input_topics == ("a", "b")
    assert cfg.batch.max_size == 128  # env wins
    assert cfg.kafka.sasl_password == "s3cret"
    assert cfg.masked()["kafka"]["sasl_password"] == "***"
    assert "s3cret" not in json.dumps(cfg.masked())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch.max_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("kafka:\n  grup_id: x\n", {}, "unknown key(s) ['grup_id'] in section 'kafka'"),
        ("kafak: {}\n", {}, "unknown key(s) ['kafak'] in the top level"),
        ("batch:\n  max_size: 0\n", {}, "batch.max_size: 0 is out of range"),
        ("batch:\n  max_size: many\n", {}, "batch.max_size: expected an integer"),
        ("kafka:\n  delivery: twice\n", {}, "kafka.delivery: 'twice' is not one of"),
        ("kafka:\n  sasl_password: hunter2\n", {}, "secrets are not read from files"),
        ("http:\n  enabled: maybe\n", {}, "http.enabled: expected true or false"),
        ("kafka: [1, 2]\n", {}, "kafka: expected a mapping"),
        ("kafka:\n  group_id: [\n", {}, "is not valid YAML at line"),
        ("", {"SENSOR_ANOMALY_BATCH__MAX_WAIT_MS": "soon"}, "batch.max_wait_ms: expected"),
        ("kafka:\n  security_protocol: SASL_SSL\n", {}, "SASL needs kafka.sasl_mechanism"),
        ("kafka:\n  output_topic: sensor-readings\n", {}, "must differ from the inputs"),
    ],
)
def test_config_refuses_bad_input_with_a_fix(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    f = tmp_path / "w.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        load_config(f, env=env)
    assert message in str(e.value)


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", env={})


def test_worker_cli_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("batch:\n  max_sise: 3\n")
    r = subprocess.run(
        [str(REPO / ".venv/bin/anomaly-worker"), "--config", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: unknown key(s) ['max_sise'] in section 'batch'")


# -- decoding and scoring -------------------------------------------------------------------


def test_scorer_flags_injected_anomalies_and_builds_schema_valid_events(det: Detector) -> None:
    readings = list(stream(_now_spec(300), readings_per_device=300, anomaly_fraction=0.05))
    recs = [_rec(i, r.to_json(), r.key()) for i, r in enumerate(readings)]
    res = Scorer(det, ReadingSettings(), EventSettings()).process(recs)
    assert res.dead_letters == []
    assert res.scored == len(readings)
    flagged = {json.loads(m.value or b"")["source"]["offset"] for m in res.events}
    injected = {i for i, r in enumerate(readings) if r.anomaly}
    assert injected <= flagged
    schema = json.loads((REPO / "schemas/anomaly-event.v1.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for m in res.events:
        validator.validate(json.loads(m.value or b""))
        assert m.key == json.loads(m.value or b"")["device_id"].encode()
    # Ratios are recorded for every scored reading: the score histogram sees normal ones too.
    assert res.score_ratio.shape == (len(readings),)


def test_schema_examples_validate() -> None:
    for name in ("reading.v1.json", "anomaly-event.v1.json"):
        schema = json.loads((REPO / "schemas" / name).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        for ex in schema["examples"]:
            jsonschema.Draft202012Validator(schema).validate(ex)


def test_contributors_name_the_sensor_that_moved(det: Detector) -> None:
    r = next(r for r in stream(_now_spec(5), readings_per_device=5) if r.anomaly is None)
    doc = json.loads(r.to_json())
    doc["values"]["sensor_05"] += 40 * float(det.preprocessor.scale[5])
    res = Scorer(det, ReadingSettings(), EventSettings()).process(
        [_rec(0, json.dumps(doc).encode())]
    )
    ev = json.loads(res.events[0].value or b"")
    top = ev["contributors"][0]
    assert top["sensor"] == "sensor_05" and top["share"] > 0.5
    assert top["value"] > top["expected"]


def test_non_finite_score_is_a_dead_letter_not_normal(det: Detector) -> None:
    r = next(stream(_now_spec(2), readings_per_device=2))
    doc = json.loads(r.to_json())
    doc["values"]["sensor_00"] = 1e308  # finite input, overflows in scaling/squaring
    res = Scorer(det, ReadingSettings(), EventSettings()).process(
        [_rec(0, json.dumps(doc).encode())]
    )
    assert res.events == [] and res.scored == 0
    assert res.dead_by_reason == {Reason.NON_FINITE_SCORE: 1}


def test_imputation_within_the_limit_is_reported(det: Detector) -> None:
    r = next(s for s in stream(_now_spec(3), readings_per_device=3) if s.anomaly is None)
    doc = json.loads(r.to_json())
    doc["values"]["sensor_02"] = None
    doc["values"]["sensor_07"] += 50 * float(det.preprocessor.scale[7])
    scorer = Scorer(det, ReadingSettings(max_imputed_features=1), EventSettings())
    res = scorer.process([_rec(0, json.dumps(doc).encode())])
    assert res.dead_letters == []
    assert json.loads(res.events[0].value or b"")["imputed_sensors"] == ["sensor_02"]
    strict = Scorer(det, ReadingSettings(max_imputed_features=0), EventSettings())
    assert strict.process([_rec(0, json.dumps(doc).encode())]).dead_by_reason == {
        Reason.MISSING_FIELD: 1
    }


def test_flat_readings_and_rfc3339_timestamps(det: Detector) -> None:
    r = next(s for s in stream(_now_spec(3), readings_per_device=3) if s.anomaly is None)
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r.timestamp_ms / 1000)) + ".000Z"
    flat = {"dev": r.device_id, "time": ts, **r.values}
    settings = ReadingSettings(device_field="dev", timestamp_field="time", values_field="")
    res = Scorer(det, settings, EventSettings()).process([_rec(0, json.dumps(flat).encode())])
    assert res.dead_letters == [] and res.scored == 1
    naive = {**flat, "time": ts[:-1]}
    res = Scorer(det, settings, EventSettings()).process([_rec(0, json.dumps(naive).encode())])
    assert res.dead_by_reason == {Reason.INVALID_TIMESTAMP: 1}


def test_duplicate_keys_last_wins(det: Detector) -> None:
    r = next(s for s in stream(_now_spec(3), readings_per_device=3) if s.anomaly is None)
    raw = r.to_json()
    dup = raw[:-1] + b', "device_id": "pump-999"}'
    res = Scorer(det, ReadingSettings(), EventSettings()).process([_rec(0, dup)])
    assert res.scored == 1 and res.scored_by_group == {"pump": 1}


def test_one_bad_record_never_fails_its_neighbours(det: Detector) -> None:
    readings = [r for r in stream(_now_spec(10), readings_per_device=10) if r.anomaly is None]
    recs = [_rec(i, r.to_json()) for i, r in enumerate(readings)]
    recs.insert(3, _rec(99, b"\x00garbage"))
    res = Scorer(det, ReadingSettings(), EventSettings()).process(recs)
    assert res.scored == len(readings) and len(res.dead_letters) == 1


# -- events ---------------------------------------------------------------------------------


def test_episode_tracker_reports_since_when() -> None:
    t = EpisodeTracker(max_devices=2)
    assert t.update("a", 1000, True) == (1000, 1)
    assert t.update("a", 2000, True) == (1000, 2)
    assert t.update("a", 3000, False) is None
    assert t.update("a", 4000, True) == (4000, 1)
    t.update("b", 1, True)
    t.update("c", 1, True)  # evicts the least recent ("a")
    assert t.update("a", 5000, True) == (5000, 1)


def test_device_groups_are_bounded_and_sanitised() -> None:
    g = DeviceGroups(r"^([A-Za-z]+)", max_groups=2)
    assert g("pump-001") == "pump"
    assert g("fan-7") == "fan"
    assert g("valve-1") == "other"  # cap reached
    assert g("1234") == "other"


# -- metrics and health ---------------------------------------------------------------------


def test_observe_many_matches_observe() -> None:
    reg_a, reg_b = CollectorRegistry(), CollectorRegistry()
    buckets = (0.5, 1.0, 2.0)
    ha = Histogram("h", "h", buckets=buckets, registry=reg_a)
    hb = Histogram("h", "h", buckets=buckets, registry=reg_b)
    values = np.array([0.1, 0.5, 0.7, 1.0, 1.5, 2.0, 9.0, 0.5])
    for v in values:
        ha.observe(float(v))
    observe_many(hb, values)
    assert (
        generate_latest(reg_a).split(b"h_created")[0]
        == generate_latest(reg_b).split(b"h_created")[0]
    )


def test_metrics_hooks_set_exact_values() -> None:
    reg = CollectorRegistry()
    m = WorkerMetrics.create(reg)
    m.on_consumed("in", 10)
    m.on_batch(
        10, 0.002, {"pump": 9}, {"pump": 2}, {Reason.DECODE_ERROR: 1}, np.array([0.5, 1.5, 3.0])
    )
    m.on_committed(1000.0, np.array([0.02, 0.2]))
    v = reg.get_sample_value
    assert v("sensor_anomaly_readings_consumed_total", {"topic": "in"}) == 10
    assert v("sensor_anomaly_readings_scored_total", {"device_group": "pump"}) == 9
    assert v("sensor_anomaly_anomalies_total", {"device_group": "pump"}) == 2
    assert v("sensor_anomaly_dead_letters_total", {"reason": "decode_error"}) == 1
    assert v("sensor_anomaly_dead_letters_total", {"reason": "oversize"}) == 0
    assert v("sensor_anomaly_score_ratio_bucket", {"le": "1.0"}) == 1
    assert v("sensor_anomaly_score_ratio_count") == 3
    assert v("sensor_anomaly_end_to_end_latency_seconds_bucket", {"le": "0.025"}) == 1
    assert v("sensor_anomaly_last_batch_timestamp_seconds") == 1000.0
    assert v("sensor_anomaly_batches_total") == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_exposition_passes_promtool(det: Detector) -> None:
    reg = CollectorRegistry()
    m = WorkerMetrics.create(reg)
    m.on_model(det.info, det.threshold.value, 1.7e9)
    m.on_batch(3, 0.001, {"pump": 3}, {}, {}, np.array([0.2, 0.4, 0.9]))
    m.consumer_lag.labels(topic="in", partition="0").set(5)
    r = subprocess.run(
        ["promtool", "check", "metrics"],
        input=generate_latest(reg),
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _get(url: str) -> tuple[int, dict[str, Any] | str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if body.startswith("{") else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def test_health_endpoints_follow_state() -> None:
    reg = CollectorRegistry()
    WorkerMetrics.create(reg)
    state = HealthState(stall_after_s=0.5)
    srv = HealthServer("127.0.0.1", 0, reg, state).start()
    host, port = srv.address
    base = f"http://{host}:{port}"
    try:
        assert _get(base + "/healthz")[0] == 200
        code, body = _get(base + "/readyz")
        assert code == 503 and isinstance(body, dict) and body["model_version"] is None
        state.update(model_version="v0001", assigned_partitions=2, broker_ok=True)
        state.beat()
        assert _get(base + "/readyz")[0] == 200
        code, text = _get(base + "/metrics")
        assert code == 200 and "sensor_anomaly_ready" in str(text)
        time.sleep(0.6)  # loop stalled
        assert _get(base + "/healthz")[0] == 503
        assert _get(base + "/readyz")[0] == 503
    finally:
        srv.stop()


def test_every_worker_setting_is_documented_in_the_readme() -> None:
    from worker.config import WorkerConfig

    readme = (REPO / "README.md").read_text()
    cfg = WorkerConfig()
    missing = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            if f"`{section.name}`" not in readme:
                missing.append(section.name)
            continue
        for f in dataclasses.fields(value):
            if f"{section.name}.{f.name}" not in readme:
                missing.append(f"{section.name}.{f.name}")
    assert not missing, f"undocumented settings: {missing}"


def test_example_configs_load() -> None:
    for path in (REPO / "examples/worker-local.yaml", REPO / "deploy/config/worker.yaml"):
        load_config(path, env={})


def test_min_consecutive_debounces_isolated_alarms(det: Detector) -> None:
    readings = [r for r in stream(_now_spec(40), readings_per_device=40) if r.anomaly is None]
    # Clearly normal readings of one device, so only the injected ones can be anomalous.
    x = np.array([[r.values[f] for f in FEATURES] for r in readings])
    calm = det.score(x).score < 0.5 * det.threshold.value
    dev = [
        r
        for r, ok in zip(readings, calm, strict=True)
        if ok and r.device_id == readings[0].device_id
    ][:8]
    assert len(dev) == 8
    recs = []
    for i, r in enumerate(dev):
        doc = json.loads(r.to_json())
        if i in (1, 3, 4, 5, 6):  # one isolated anomalous reading, then a run of four
            doc["values"]["sensor_05"] += 40 * float(det.preprocessor.scale[5])
        recs.append(_rec(i, json.dumps(doc).encode()))
    res = Scorer(det, ReadingSettings(), EventSettings(min_consecutive=3)).process(recs)
    events = [json.loads(m.value or b"") for m in res.events]
    assert [e["source"]["offset"] for e in events] == [5, 6]
    assert {e["anomaly_since_ms"] for e in events} == {dev[3].timestamp_ms}
    assert [e["consecutive_anomalies"] for e in events] == [3, 4]
    assert sum(res.anomalies_by_group.values()) == 5  # all anomalous readings still counted
