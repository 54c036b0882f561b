"""``anomaly-worker score-file`` with a windowed, range-aware model: summary, --scores,
time checks for backfills, untimed files (row order as time)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from detector import Registry
from simulator.fleet import stream
from tests.unit.test_worker_pipeline_memory import SPEC, windowed_detector
from worker.cli import UNTIMED_START_MS, main

W = 3


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sf")
    det = windowed_detector(W, 0.5)
    path = Registry(tmp / "registry").save(det)
    cfg = tmp / "worker.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(path)}}))
    return cfg


def _run(config: Path, tmp_path: Path, lines: list[bytes], *extra: str) -> tuple[int, Any]:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    args = ["--config", str(config), "score-file", "--input", str(src)]
    args += ["--output", str(tmp_path / "events.jsonl"), *extra]
    return main(args), src


def _lines(per_device: int, start_ms: int, anomaly_fraction: float = 0.05) -> list[bytes]:
    spec = dataclasses.replace(SPEC, start_ms=start_ms)
    return [r.to_json() for r in stream(spec, per_device, anomaly_fraction=anomaly_fraction)]


def test_summary_and_scores_file(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time() * 1000)
    lines = [*_lines(40, now - 60_000), b'{"broken": ', b'{"device_id": "x"}']
    scores = tmp_path / "scores.jsonl"
    rc, _ = _run(config, tmp_path, lines, "--scores", str(scores))
    err = capsys.readouterr().err
    assert rc == 0, err
    n = 40 * SPEC.devices
    assert f"scored {n + 2} readings" in err
    assert "dead letters by reason: decode_error 1, missing_field 1" in err
    assert f"not scored: {SPEC.devices * (W - 1)} readings while device windows filled" in err
    assert "drift: " in err and "above the threshold (holdout: " in err
    rows = [json.loads(x) for x in scores.read_text().splitlines()]
    assert len(rows) == n - SPEC.devices * (W - 1)  # every scored reading, none warming up
    assert {
        "line",
        "device_id",
        "timestamp_ms",
        "score",
        "ratio",
        "anomalous",
        "out_of_range",
    } <= set(rows[0])
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    flagged = {e["source"]["offset"] + 1 for e in events}
    assert flagged == {r["line"] for r in rows if r["anomalous"]}
    assert all((r["ratio"] > 1) == r["anomalous"] for r in rows)


def test_backfill_needs_the_time_checks_relaxed(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _lines(10, int(time.time() * 1000) - 90 * 86_400_000, 0.0)  # 90 days ago
    rc, _ = _run(config, tmp_path, old)
    err = capsys.readouterr().err
    assert rc == 0 and f"invalid_timestamp {len(old)}" in err
    rc, _ = _run(config, tmp_path, old, "--max-past", str(100 * 86_400))
    err = capsys.readouterr().err
    assert rc == 0 and "invalid_timestamp" not in err and "0 unscorable" in err
    rc, _ = _run(config, tmp_path, old, "--no-time-checks")
    err = capsys.readouterr().err
    assert rc == 0 and "0 unscorable" in err
    rc, _ = _run(config, tmp_path, old, "--max-past", "-1")
    assert rc == 2 and "error: " in capsys.readouterr().err


def test_untimed_file_gets_row_order_as_time(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = []
    for raw in _lines(10, int(time.time() * 1000), 0.0):
        doc = json.loads(raw)
        del doc["timestamp"]
        lines.append(json.dumps(doc).encode())
    scores = tmp_path / "scores.jsonl"
    rc, _ = _run(config, tmp_path, lines, "--scores", str(scores))
    err = capsys.readouterr().err
    assert rc == 0 and "0 unscorable" in err and "row order used as time" in err
    rows = [json.loads(x) for x in scores.read_text().splitlines()]
    ts = np.array([r["timestamp_ms"] for r in rows])
    lines_no = np.array([r["line"] for r in rows])
    np.testing.assert_array_equal(ts, UNTIMED_START_MS + (lines_no - 1) * 1000)


def test_incidents_offline_equal_the_tracker_on_the_same_scores(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.config import load_config
    from worker.incidents import IncidentTracker
    from worker.pipeline import Scorer
    from worker.records import SimpleRecord

    lines = _lines(150, int(time.time() * 1000) - 200_000, 0.06)
    out = tmp_path / "incidents.jsonl"
    rc, src = _run(config, tmp_path, lines, "--incidents", str(out), "--batch", "100")
    err = capsys.readouterr().err
    assert rc == 0, err
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got, "6 % injected anomalies must open incidents"
    assert "incidents: opened " in err
    # The same readings through Scorer + IncidentTracker by hand, in other batch sizes.
    cfg = load_config(config)
    det = windowed_detector(W, 0.5)
    scorer = Scorer(det, cfg.reading, cfg.events, scored_batch=True)
    tracker = IncidentTracker(cfg.incidents)
    recs = [SimpleRecord(src.name, 0, i, None, v, []) for i, v in enumerate(lines)]
    ids = []
    for i in range(0, len(recs), 37):
        sb = scorer.process(recs[i : i + 37]).scored_batch
        assert sb is not None
        ids += [(e.state, e.incident.id) for e in tracker.process(sb).events]
    assert [(e["state"], e["incident_id"]) for e in got] == ids
