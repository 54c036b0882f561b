"""The Scorer with windowed, smoothing, range-aware and constant-watching models.

Oracle: :func:`detector.offline.score_rows` (the detector's own per-device, whole-table
scoring); the Scorer sees the same readings as a stream of batches of uneven sizes, with
its per-device memory carried between batches, exported and restored in the middle.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import StandardScaler

from detector import (
    DenseLayer,
    DenseNetwork,
    Detector,
    ModelInfo,
    Preprocessor,
    WatchedConstant,
    fit_threshold,
)
from detector.offline import score_rows
from detector.windows import gather_windows, sliding_windows
from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from worker.config import EventSettings, ReadingSettings
from worker.incidents import IncidentSettings, IncidentTracker, ThresholdMultipliers
from worker.memory import MEMORY_KEY_PREFIX, DeviceMemory, gather
from worker.pipeline import Scorer
from worker.reasons import Reason
from worker.records import SimpleRecord

REPO = Path(__file__).resolve().parents[2]
SPEC = FleetSpec(devices=4, sensors=12, seed=5)
FEATURES = feature_names(SPEC)
VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((REPO / "schemas/anomaly-event.v1.json").read_text())
)
NEW_FIELDS = {
    "window",
    "smoothed_score",
    "threshold_multiplier",
    "out_of_range",
    "changed_constants",
}


def windowed_detector(
    w: int, alpha: float | None = None, ranges: bool = True, k: float = 2.0, **kw: Any
) -> Detector:
    """A linear autoencoder (PCA) on flattened scaled windows; threshold on a holdout."""
    x = normal_matrix(SPEC, 6000)
    fit, hold = x[:4500], x[4500:]
    imp = SimpleImputer().fit(fit)
    pre = Preprocessor.from_sklearn(imp, StandardScaler().fit(fit))
    d = x.shape[1]
    z = sliding_windows(pre.transform(fit), w).reshape(-1, w * d)
    pca = PCA(n_components=4, random_state=0).fit(z)
    comp = pca.components_.astype(np.float32)
    mean = pca.mean_.astype(np.float32)
    net = DenseNetwork(
        (
            DenseLayer(comp.T.copy(), (-mean @ comp.T).astype(np.float32), "linear"),
            DenseLayer(comp.copy(), mean.copy(), "linear"),
        ),
        0,
    )
    base = Detector(
        feature_names=tuple(FEATURES),
        preprocessor=pre,
        network=net,
        threshold=fit_threshold([1.0, 2.0]),
        feature_error_mean=np.zeros(d),
        feature_error_std=np.ones(d),
        info=ModelInfo("win"),
        window=w,
        ewma_alpha=alpha,
    )
    rs = score_rows(base, hold)
    fe = rs.feature_error[rs.scored].astype(np.float64)
    extra: dict[str, Any] = {"train_min": fit.min(axis=0), "train_max": fit.max(axis=0)}
    return dataclasses.replace(
        base,
        threshold=fit_threshold(rs.decision[rs.scored], "mean_k_std", k),
        feature_error_mean=fe.mean(axis=0),
        feature_error_std=fe.std(axis=0),
        **(extra if ranges else {}),
        **kw,
    )


def _readings(per_device: int, anomaly_fraction: float = 0.05) -> list[Any]:
    start = int(time.time() * 1000) - per_device * 1000
    spec = dataclasses.replace(SPEC, start_ms=start)
    return list(stream(spec, per_device, anomaly_fraction=anomaly_fraction))


def _records(readings: list[Any], topic: str = "in", partition: int = 0) -> list[SimpleRecord]:
    return [
        SimpleRecord(topic, partition, i, r.key(), r.to_json(), []) for i, r in enumerate(readings)
    ]


def _batches(recs: list[SimpleRecord], sizes: tuple[int, ...] = (7, 1, 30, 3, 64)) -> list[Any]:
    out, i, k = [], 0, 0
    while i < len(recs):
        n = sizes[k % len(sizes)]
        out.append(recs[i : i + n])
        i, k = i + n, k + 1
    return out


def _events(results: list[Any]) -> dict[int, dict[str, Any]]:
    return {(ev := json.loads(m.value))["source"]["offset"]: ev for r in results for m in r.events}


def _oracle(det: Detector, readings: list[Any]) -> Any:
    x = np.array([[r.values[f] for f in FEATURES] for r in readings])
    return score_rows(det, x, [r.device_id for r in readings])


# -- windows ----------------------------------------------------------------------------------


def test_memory_gather_equals_the_detectors_gather_windows() -> None:
    rng = np.random.default_rng(1)
    for trial in range(200):
        w, d, n = int(rng.integers(2, 7)), 3, int(rng.integers(1, 40))
        devs = [f"d{int(rng.integers(0, 6))}" for _ in range(n)]
        hist = {
            f"d{k}": rng.normal(size=(int(rng.integers(0, w + 2)), d if k else 4)).astype(
                np.float32
            )
            for k in range(6)
            if rng.random() < 0.6
        }
        x = rng.normal(size=(n, d))
        ref = gather_windows(hist, devs, x, w)
        win, rows, new = gather(hist, devs, x, w)
        assert np.array_equal(ref.windows, win) and np.array_equal(ref.rows, rows), trial
        for dev in set(devs):
            assert np.array_equal(ref.history[dev], new[dev]), (trial, dev)


@pytest.mark.parametrize(("w", "alpha"), [(4, None), (1, 0.3), (3, 0.5)])
def test_stream_of_batches_scores_like_the_whole_table(w: int, alpha: float | None) -> None:
    det = windowed_detector(w, alpha)
    readings = _readings(60)
    scorer = Scorer(det, ReadingSettings(), EventSettings())
    results = [scorer.process(b) for b in _batches(_records(readings))]
    rs = _oracle(det, readings)
    assert sum(r.warming_up for r in results) == SPEC.devices * (w - 1)
    assert sum(r.scored for r in results) == int(rs.scored.sum())
    assert sum(sum(r.warming_up_by_group.values()) for r in results) == SPEC.devices * (w - 1)
    events = _events(results)
    assert set(events) == set(np.flatnonzero(rs.anomalous).tolist())
    assert events, "the injected anomalies must flag something"
    for off, ev in events.items():
        VALIDATOR.validate(ev)
        assert ev["score"] == pytest.approx(rs.score[off], rel=1e-5)
        compared = rs.decision[off]
        assert ev["score_ratio"] == pytest.approx(compared / det.threshold.value, rel=1e-5)
        assert ("window" in ev) == (w > 1) and ev.get("window", w) == w
        if alpha is None:
            assert "smoothed_score" not in ev
        else:
            assert ev["smoothed_score"] == pytest.approx(compared, rel=1e-5)
    ratios = np.concatenate([r.score_ratio for r in results])
    np.testing.assert_allclose(ratios, rs.decision[rs.scored] / det.threshold.value, rtol=1e-5)


def test_memory_survives_export_and_restore_in_the_middle_and_skips_replays() -> None:
    det = windowed_detector(4, 0.4)
    readings = _readings(40)
    recs = _records(readings)
    cut = len(recs) // 2
    straight = Scorer(det, ReadingSettings(), EventSettings())
    expected = _events([straight.process(b) for b in _batches(recs)])

    first = Scorer(det, ReadingSettings(), EventSettings())
    got = [first.process(b) for b in _batches(recs[:cut])]
    dirty = first.memory.take_dirty()
    assert dirty == {0: {r.device_id for r in readings}}
    stored = {MEMORY_KEY_PREFIX + d: first.memory.export(d) for d in dirty[0]}
    assert all(isinstance(v, bytes) for v in stored.values())

    # A new worker restores the partition, then the records since the last commit (10
    # before the cut) are delivered again: the memory already holds them.
    mem = DeviceMemory()
    second = Scorer(det, ReadingSettings(), EventSettings(), memory=mem)
    loaded = mem.load_partition(
        0, {k[len(MEMORY_KEY_PREFIX) :]: v for k, v in stored.items() if v is not None}
    )
    assert loaded == SPEC.devices
    again = [second.process(b) for b in _batches(recs[cut - 10 :])]
    assert sum(r.replayed for r in again) == 10
    assert sum(r.warming_up for r in again) == 0
    # The same events, to rounding (other batch splits), but for what is per worker and
    # not restored (the wall clock, the anomaly runs).
    resumed = _events(got + again)
    assert set(resumed) == set(expected)
    for k, ev in resumed.items():
        for f in ("score", "smoothed_score", "score_ratio"):
            assert ev[f] == pytest.approx(expected[k][f], rel=1e-6)
        assert [c["sensor"] for c in ev["contributors"]] == [
            c["sensor"] for c in expected[k]["contributors"]
        ]


def test_an_overflowing_value_dead_letters_its_reading_only() -> None:
    det = windowed_detector(3)
    readings = [r for r in _readings(12, 0.0) if r.device_id == "pump-000"]
    docs = [json.loads(r.to_json()) for r in readings]
    docs[5]["values"]["sensor_01"] = 1e308  # a finite JSON number, infinite as float32
    recs = [SimpleRecord("in", 0, i, None, json.dumps(d).encode(), []) for i, d in enumerate(docs)]
    scorer = Scorer(det, ReadingSettings(), EventSettings())
    first, second = scorer.process(recs[:7]), scorer.process(recs[7:])
    assert first.dead_by_reason == {Reason.NON_FINITE_SCORE: 1}  # row 5 itself
    assert first.scored == 7 - 2 - 1 and second.scored == len(recs) - 7
    assert second.dead_letters == []


def test_reload_with_another_shape_drops_the_memory_with_tombstones() -> None:
    readings = _readings(10, 0.0)
    mem = DeviceMemory()
    s1 = Scorer(windowed_detector(3), ReadingSettings(), EventSettings(), memory=mem)
    s1.process(_records(readings))
    mem.take_dirty()
    assert len(mem) == SPEC.devices
    # Same shape: kept.
    Scorer(windowed_detector(3), ReadingSettings(), EventSettings(), memory=mem)
    assert len(mem) == SPEC.devices and mem.take_dirty() == {}
    s3 = Scorer(windowed_detector(5), ReadingSettings(), EventSettings(), memory=mem)
    assert len(mem) == 0
    dropped = mem.take_dirty()
    assert dropped == {0: {r.device_id for r in readings}}
    assert all(mem.export(d) is None for d in dropped[0])
    res = s3.process(_records(readings[: SPEC.devices * 4]))
    assert res.warming_up == SPEC.devices * 4  # a new window of 5 warms up from scratch


def test_load_refuses_other_signatures_versions_and_garbage() -> None:
    det = windowed_detector(3)
    s = Scorer(det, ReadingSettings(), EventSettings())
    s.process(_records(_readings(5, 0.0)))
    blob = s.memory.export("pump-000")
    assert blob is not None
    other = DeviceMemory()
    other.configure(4, det.feature_names, None)
    assert not other.load("pump-000", blob)
    assert not other.load("pump-000", b"\x93garbage")
    same = DeviceMemory()
    same.configure(3, det.feature_names, None)
    assert same.load("pump-000", blob)
    np.testing.assert_array_equal(same.history["pump-000"], s.memory.history["pump-000"])
    assert other.rejected == 2 and same.rejected == 0


def test_drop_partition_forgets_without_tombstones() -> None:
    det = windowed_detector(3)
    readings = _readings(5, 0.0)
    s = Scorer(det, ReadingSettings(), EventSettings())
    recs = [dataclasses.replace(r, partition=int(r.key[-1:]) % 2) for r in _records(readings)]
    s.process(recs)
    by_p = s.memory.take_dirty()
    assert set(by_p) == {0, 1}
    s.memory.drop_partition(1)
    assert set(s.memory.devices()) == by_p[0]
    assert s.memory.take_dirty() == {}


# -- out of range, constants, multipliers ----------------------------------------------------


def _doc(r: Any) -> dict[str, Any]:
    return json.loads(r.to_json())


def test_out_of_range_features_are_named_and_counted() -> None:
    det = windowed_detector(1)
    r = next(r for r in _readings(3, 0.0))
    doc = _doc(r)
    span = det.train_max[3] - det.train_min[3]  # type: ignore[index]
    doc["values"]["sensor_03"] = float(det.train_max[3] + 0.5 * span)  # type: ignore[index]
    normal = _doc(r)
    res = Scorer(det, ReadingSettings(), EventSettings()).process(
        [SimpleRecord("in", 0, 0, None, json.dumps(doc).encode(), []),
         SimpleRecord("in", 0, 1, None, json.dumps(normal).encode(), [])]
    )  # fmt: skip
    assert res.out_of_range_by_group == {"pump": 1}
    ev = json.loads(res.events[0].value or b"")
    VALIDATOR.validate(ev)
    assert ev["out_of_range"][0]["sensor"] == "sensor_03"
    assert ev["out_of_range"][0]["excess"] == pytest.approx(0.5, rel=1e-6)


def test_per_point_model_without_new_fields_gives_the_v1_event_shape() -> None:
    det = windowed_detector(1, ranges=False)
    res = Scorer(det, ReadingSettings(), EventSettings()).process(_records(_readings(30)))
    assert res.events
    for m in res.events:
        assert not NEW_FIELDS & set(json.loads(m.value or b""))
    assert res.out_of_range_by_group == {} and res.warming_up == 0
    assert len(Scorer(det, ReadingSettings(), EventSettings()).memory) == 0


def test_training_ranges_only_add_the_out_of_range_field() -> None:
    with_ranges = windowed_detector(1)
    without = dataclasses.replace(with_ranges, train_min=None, train_max=None)
    recs = _records(_readings(40))
    now = int(time.time() * 1000)
    a = Scorer(with_ranges, ReadingSettings(), EventSettings(), clock_ms=lambda: now).process(recs)
    b = Scorer(without, ReadingSettings(), EventSettings(), clock_ms=lambda: now).process(recs)
    assert a.events and len(a.events) == len(b.events)
    for ma, mb in zip(a.events, b.events, strict=True):
        ea, eb = json.loads(ma.value or b""), json.loads(mb.value or b"")
        assert isinstance(ea.pop("out_of_range"), list)
        assert ea == eb


def test_changed_watched_constant_makes_a_normal_reading_anomalous() -> None:
    det = windowed_detector(
        1, constants=(WatchedConstant("valve", 1.0, 0.01), WatchedConstant("mode", 3.0, 0.5))
    )
    rs = [r for r in _readings(3, 0.0)][:4]
    docs = [_doc(r) for r in rs]
    docs[0]["values"]["valve"] = 1.0  # unchanged
    docs[1]["values"]["valve"] = 1.5  # changed
    docs[2]["values"]["mode"] = None  # null: absent, not an error
    # docs[3]: both absent
    recs = [SimpleRecord("in", 0, i, None, json.dumps(d).encode(), []) for i, d in enumerate(docs)]
    scorer = Scorer(det, ReadingSettings(), EventSettings(), scored_batch=True)
    res = scorer.process(recs)
    assert res.dead_letters == [] and res.scored == 4
    normal = np.flatnonzero(res.score_ratio > 1).tolist()
    ev = {
        json.loads(m.value or b"")["source"]["offset"]: json.loads(m.value or b"")
        for m in res.events
    }
    assert 1 in ev and set(ev) == {1, *normal}
    VALIDATOR.validate(ev[1])
    assert ev[1]["changed_constants"] == [{"sensor": "valve", "expected": 1.0, "value": 1.5}]
    for off, e in ev.items():
        if off != 1:
            assert e["changed_constants"] == []
    sb = res.scored_batch
    assert sb is not None
    assert sb.scores[1] > sb.threshold  # the tracker sees it as anomalous
    # The model's own missing-value limit still applies to model features.
    docs[0]["values"].pop("sensor_00")
    res2 = scorer.process([SimpleRecord("in", 0, 9, None, json.dumps(docs[0]).encode(), [])])
    assert res2.dead_by_reason == {Reason.MISSING_FIELD: 1}


def test_group_multiplier_scales_ratio_threshold_and_decision() -> None:
    det = windowed_detector(1, ranges=False)
    readings = _readings(40)
    docs = [_doc(r) for r in readings]
    for d in docs:  # two device groups: pump-00x and fan-00x
        if d["device_id"] in ("pump-001", "pump-003"):
            d["device_id"] = d["device_id"].replace("pump", "fan")
    recs = [SimpleRecord("in", 0, i, None, json.dumps(d).encode(), []) for i, d in enumerate(docs)]
    plain = Scorer(det, ReadingSettings(), EventSettings()).process(recs)
    mult = ThresholdMultipliers.parse(["fan=0.5"])
    res = Scorer(
        det, ReadingSettings(), EventSettings(), multipliers=mult, scored_batch=True
    ).process(recs)
    thr = det.threshold.value
    np.testing.assert_array_equal(res.score_ratio, plain.score_ratio)  # model ratio, unscaled
    assert res.above_threshold_by_group == plain.anomalies_by_group
    assert res.anomalies_by_group["pump"] == plain.anomalies_by_group["pump"]
    assert res.anomalies_by_group["fan"] > plain.anomalies_by_group["fan"]
    for m in res.events:
        ev = json.loads(m.value or b"")
        VALIDATOR.validate(ev)
        if ev["device_id"].startswith("fan"):
            assert ev["threshold"] == pytest.approx(thr * 0.5)
            assert ev["threshold_multiplier"] == 0.5
            assert ev["score_ratio"] == pytest.approx(ev["score"] / (thr * 0.5))
        else:
            assert ev["threshold"] == thr and "threshold_multiplier" not in ev
    groups = res.ratio_by_group()
    assert set(groups) == {"pump", "fan"}
    assert sum(len(v) for v in groups.values()) == res.scored
    # The tracker's batch: every row anomalous for the tracker has its contributors.
    sb = res.scored_batch
    assert sb is not None and len(sb) == res.scored
    eff = np.array([thr * mult.for_group(g) for g in sb.device_groups])
    assert set(np.flatnonzero(sb.scores > eff).tolist()) <= set(sb.contributors)
    tracker = IncidentTracker(IncidentSettings(threshold_multipliers=("fan=0.5",)))
    out = tracker.process(sb)
    assert out.events  # the anomalies of the stream open incidents


def test_scored_batch_matches_the_trackers_own_builder() -> None:
    from worker.events import DeviceGroups
    from worker.incidents import scored_batch_from

    det = windowed_detector(1)
    recs = _records(_readings(20))
    ev = EventSettings()
    res = Scorer(det, ReadingSettings(), ev, scored_batch=True).process(recs)
    ref = scored_batch_from(
        det, recs, DeviceGroups(ev.device_group_pattern, 50), min_share=ev.min_share
    )
    sb = res.scored_batch
    assert sb is not None
    assert list(sb.device_ids) == list(ref.device_ids)
    np.testing.assert_array_equal(sb.offsets, ref.offsets)
    np.testing.assert_allclose(sb.scores, ref.scores)
    assert set(sb.contributors) == set(ref.contributors)
