"""The simulator's contracts: determinism, normal structure, anomaly schedule and detectability.

Detectability is judged the way the service judges it: a linear autoencoder (PCA) fitted on
``normal_matrix`` scores streamed readings by reconstruction error.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from simulator import cli
from simulator.fleet import (
    ANOMALY_KINDS,
    MAX_ANOMALY_FRACTION,
    FleetSpec,
    Reading,
    device_ids,
    feature_names,
    load_truth,
    normal_matrix,
    sensor_profiles,
    stream,
    unexplained_deviation,
    write_normal_csv,
    write_truth,
)

SPEC = FleetSpec(devices=8, sensors=16, seed=3)
PER_DEVICE = 1500
FRACTION = 0.05


def _matrix(readings: list[Reading]) -> np.ndarray:
    return np.array([list(r.values.values()) for r in readings])


def _labels(readings: list[Reading]) -> np.ndarray:
    return np.array([r.anomaly or "" for r in readings])


@pytest.fixture(scope="module")
def readings() -> list[Reading]:
    return list(stream(SPEC, PER_DEVICE, anomaly_fraction=FRACTION))


@pytest.fixture(scope="module")
def clean() -> list[Reading]:
    return list(stream(SPEC, PER_DEVICE))


@pytest.fixture(scope="module")
def train() -> np.ndarray:
    return normal_matrix(SPEC, 20_000)


class _Pca:
    """A linear autoencoder: standardise, project on the top components, reconstruct."""

    def __init__(self, x: np.ndarray, code: int = 4) -> None:
        self.mean, self.std = x.mean(axis=0), x.std(axis=0)
        _, _, vt = np.linalg.svd((x - self.mean) / self.std, full_matrices=False)
        self.components = vt[:code]

    def error(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        r = z - (z @ self.components.T) @ self.components
        return np.asarray((r**2).mean(axis=1))


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney)."""
    neg = np.sort(negative)
    below = np.searchsorted(neg, positive, side="left")
    ties = np.searchsorted(neg, positive, side="right") - below
    return float((below + ties / 2).sum() / (positive.size * neg.size))


# ----------------------------------------------------------------------------- identity


def test_names_and_validation() -> None:
    spec = FleetSpec(devices=3, sensors=12)
    assert device_ids(spec) == ["pump-000", "pump-001", "pump-002"]
    assert feature_names(spec) == [f"sensor_{i:02d}" for i in range(12)]
    with pytest.raises(ValueError, match=r"sensors=11 .* use 12\.\.100"):
        FleetSpec(sensors=11)
    with pytest.raises(ValueError, match="devices=0"):
        FleetSpec(devices=0)
    with pytest.raises(ValueError, match="period_ms"):
        FleetSpec(period_ms=0)
    for bad in (
        {"anomaly_fraction": MAX_ANOMALY_FRACTION + 0.01},
        {"anomaly_fraction": 0.1, "kinds": ["spike", "meteor"]},
        {"magnitude": 0.0},
        {"segment_length": 0},
    ):
        with pytest.raises(ValueError):
            stream(SPEC, 10, **bad)  # eager: raises before the first reading


def test_json_contract(readings: list[Reading]) -> None:
    names = feature_names(SPEC)
    for r in readings[:50] + [r for r in readings if r.anomaly][:50]:
        assert r.key() == r.device_id.encode()
        payload = json.loads(r.to_json())
        assert list(payload) == ["device_id", "timestamp", "values"]  # no ground truth leaks
        assert payload["device_id"] == r.device_id
        assert type(payload["timestamp"]) is int and payload["timestamp"] == r.timestamp_ms
        assert list(payload["values"]) == names
        assert all(type(v) is float for v in payload["values"].values())
        assert payload["values"] == r.values  # rounding happened before, not in the encoder
        assert b" " not in r.to_json()


def test_deterministic_and_interleaved_by_time(readings: list[Reading]) -> None:
    again = stream(SPEC, PER_DEVICE, anomaly_fraction=FRACTION)
    assert all(
        a.to_json() == b.to_json() and a.anomaly == b.anomaly
        for a, b in zip(readings, again, strict=True)
    )
    other = stream(FleetSpec(devices=8, sensors=16, seed=SPEC.seed + 1), 5)
    assert [r.to_json() for r in other] != [r.to_json() for r in readings[:40]]
    assert np.array_equal(normal_matrix(SPEC, 500), normal_matrix(SPEC, 500))
    assert not np.array_equal(normal_matrix(SPEC, 500), normal_matrix(SPEC, 500, seed=1))

    ids = device_ids(SPEC)
    assert len(readings) == SPEC.devices * PER_DEVICE
    for i, r in enumerate(readings[: 3 * SPEC.devices]):
        step, d = divmod(i, SPEC.devices)
        assert r.device_id == ids[d]
        assert r.timestamp_ms == SPEC.start_ms + step * SPEC.period_ms


def test_normal_signal_independent_of_anomalies_and_length(
    readings: list[Reading], clean: list[Reading]
) -> None:
    # Anomalies displace readings; they never reshuffle the normal signal around them.
    for a, c in zip(readings, clean, strict=True):
        assert (a.values == c.values) == (a.anomaly is None)
    short = list(stream(SPEC, 300))
    assert [r.values for r in short] == [r.values for r in clean[: len(short)]]
    endless = list(itertools.islice(stream(SPEC, None), len(short)))
    assert [r.values for r in endless] == [r.values for r in short]


# ------------------------------------------------------------------------ normal structure


def test_correlation_structure_and_scales(train: np.ndarray) -> None:
    assert train.shape == (20_000, SPEC.sensors) and train.dtype == np.float64
    z = (train - train.mean(axis=0)) / train.std(axis=0)
    eigen = np.linalg.svd(z, compute_uv=False) ** 2
    assert eigen[:4].sum() / eigen.sum() > 0.90
    # Not a single factor either: each of the four latents carries real variance.
    assert eigen[3] / eigen.sum() > 0.08
    std = train.std(axis=0)
    assert std.min() < 0.05 and std.max() > 10  # scaling matters
    profiles = sensor_profiles(SPEC)
    assert [p.name for p in profiles] == feature_names(SPEC)
    # The profiles' mean/std are the sensors' normal marginal moments.
    mean_gap = np.abs(train.mean(axis=0) - [p.mean for p in profiles]) / std
    assert mean_gap.max() < 0.25  # sampling error: slow latents, 8 device offsets
    np.testing.assert_allclose(std, [p.std for p in profiles], rtol=0.15)


def test_streamed_normal_readings_match_training_distribution(
    clean: list[Reading], train: np.ndarray
) -> None:
    pca = _Pca(train)
    fit_err = pca.error(train)
    stream_err = pca.error(_matrix(clean))
    # A detector trained on normal_matrix sees the live fleet's normal readings as normal.
    assert np.median(stream_err) < 1.5 * np.median(fit_err)
    assert np.quantile(stream_err, 0.999) < 2 * np.quantile(fit_err, 0.999)
    unexplained = unexplained_deviation(SPEC, _matrix(clean))
    assert unexplained.max() < 1.6


# ------------------------------------------------------------------------ anomaly schedule


def _segments(readings: list[Reading]) -> list[tuple[str, str, int, int]]:
    """(device, kind, first step, length) of each run of anomalous readings."""
    by_device: dict[str, list[str | None]] = defaultdict(list)
    for r in readings:
        by_device[r.device_id].append(r.anomaly)
    out = []
    for device, labels in by_device.items():
        step = 0
        for kind, run in itertools.groupby(labels):
            n = len(list(run))
            if kind is not None:
                out.append((device, kind, step, n))
            step += n
    return out


@pytest.mark.parametrize("fraction", [0.01, FRACTION, 0.2])
def test_anomaly_fraction_and_segments(
    fraction: float, readings: list[Reading], clean: list[Reading]
) -> None:
    rs = readings if fraction == FRACTION else list(stream(SPEC, PER_DEVICE, fraction))
    labels = _labels(rs)
    assert abs((labels != "").mean() - fraction) < 0.1 * fraction
    counts = Counter(labels[labels != ""])
    assert set(counts) == set(ANOMALY_KINDS)

    segs = _segments(rs)
    for _device, kind, _start, n in segs:
        # Adjacent segments of one kind would merge above; lengths prove they never touch.
        assert n == (1 if kind == "spike" else 5)
    per_device: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for device, _kind, start, n in segs:
        per_device[device].append((start, n))
    assert set(per_device) == set(device_ids(SPEC))  # spread over devices
    for spans in per_device.values():
        spans.sort()
        assert spans[0][0] >= 1 and spans[-1][0] + spans[-1][1] <= PER_DEVICE - 1
        for (a, n), (b, _) in itertools.pairwise(spans):
            assert b - (a + n) >= 2  # at least two normal readings between segments
    # Spread over time: every fifth of the stream has its share of segments.
    starts = np.array([start for _, _, start, _ in segs])
    per_fifth = np.bincount(starts * 5 // PER_DEVICE, minlength=5)
    assert per_fifth.min() >= 0.5 * per_fifth.mean()


def test_kind_selection_and_segment_length() -> None:
    rs = list(stream(SPEC, 400, 0.1, kinds=["stuck", "drift"], segment_length=8))
    segs = _segments(rs)
    assert {k for _, k, _, _ in segs} == {"stuck", "drift"}
    assert {n for _, _, _, n in segs} == {8}
    assert list(stream(SPEC, 3, 0.3, kinds=["drift"])) == list(stream(SPEC, 3))  # cannot fit


def test_stuck_freezes_one_sensor(readings: list[Reading]) -> None:
    by_device: dict[str, list[Reading]] = defaultdict(list)
    for r in readings:
        by_device[r.device_id].append(r)
    seen = 0
    for device, kind, start, n in _segments(readings):
        if kind != "stuck":
            continue
        seg = _matrix(by_device[device][start : start + n])
        frozen = np.flatnonzero(np.ptp(seg, axis=0) == 0)
        assert frozen.size == 1
        seen += 1
    assert seen > 0


# --------------------------------------------------------------------------- detectability


def test_each_kind_is_detectable_by_reconstruction_error(
    readings: list[Reading], train: np.ndarray
) -> None:
    err = _Pca(train).error(_matrix(readings))
    labels = _labels(readings)
    normal = err[labels == ""]
    for kind in ANOMALY_KINDS:
        assert _auc(err[labels == kind], normal) > 0.95, kind
    # Stronger than the AUC: at magnitude 1 no injected reading hides among normal ones.
    assert err[labels != ""].min() > 2 * normal.max()


def test_unexplained_deviation_of_injected_readings(readings: list[Reading]) -> None:
    values = _matrix(readings)
    assert values.min() > 0  # at magnitude 1 nothing reaches the physical floor
    dev = unexplained_deviation(SPEC, values)
    labels = _labels(readings)
    assert np.median(dev[labels == ""]) < 0.8
    for kind in ANOMALY_KINDS:
        floor = 3.0 if kind == "correlated_fault" else 4.0  # own normal part may subtract
        assert dev[labels == kind].min() > floor, kind


def test_correlated_fault_stays_in_marginal_range(
    readings: list[Reading], train: np.ndarray
) -> None:
    # Invisible sensor by sensor: no per-sensor z-score catches it that would not also fire on
    # normal readings. Only the broken relationship between sensors gives it away.
    values, labels = _matrix(readings), _labels(readings)
    z = np.abs((values - train.mean(axis=0)) / train.std(axis=0)).max(axis=1)
    faulty = z[labels == "correlated_fault"]
    assert faulty.size and faulty.max() <= z[labels == ""].max()


def test_magnitude_scales_displacement_linearly(clean: list[Reading]) -> None:
    kinds = ["spike", "drift", "noise_burst", "correlated_fault"]
    base = _matrix(clean[:4000])
    one = list(stream(SPEC, 500, 0.1, kinds=kinds))
    half = list(stream(SPEC, 500, 0.1, kinds=kinds, magnitude=0.5))
    assert _labels(one).tolist() == _labels(half).tolist()  # same schedule
    step = np.array([p.std for p in sensor_profiles(SPEC)])
    d1, d_half = (_matrix(one) - base) / step, (_matrix(half) - base) / step
    np.testing.assert_allclose(d_half, d1 / 2, atol=0.01)  # instrument rounding only


# ------------------------------------------------------------------------------- files/CLI


def test_truth_and_csv_files(tmp_path: Path, readings: list[Reading]) -> None:
    n = write_truth(tmp_path / "truth.jsonl", readings)
    truth = load_truth(tmp_path / "truth.jsonl")
    assert n == len(truth) == sum(r.anomaly is not None for r in readings)
    assert truth == {(r.device_id, r.timestamp_ms): r.anomaly for r in readings if r.anomaly}
    first = json.loads((tmp_path / "truth.jsonl").read_bytes().splitlines()[0])
    assert list(first) == ["device_id", "timestamp_ms", "kind"]

    write_normal_csv(tmp_path / "normal.csv", SPEC, 100)  # 12 rows per device, 4 get 13
    lines = (tmp_path / "normal.csv").read_text().splitlines()
    assert lines[0].split(",") == ["timestamp", "device_id", *feature_names(SPEC)]
    rows = [line.split(",") for line in lines[1:]]
    got = np.array([[float(v) for v in row[2:]] for row in rows])
    np.testing.assert_array_equal(got, normal_matrix(SPEC, 100))
    stamps = [(int(row[0]), row[1]) for row in rows]
    assert stamps == sorted(stamps) and stamps[-1][0] < SPEC.start_ms
    assert Counter(d for _, d in stamps) == {
        d: 12 + (i < 4) for i, d in enumerate(device_ids(SPEC))
    }


def test_cli_jsonl_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, truth, csv = tmp_path / "r.jsonl", tmp_path / "t.jsonl", tmp_path / "n.csv"
    argv = ["--devices", "3", "--seed", "5", "--anomaly-fraction", "0.1", "--truth", str(truth)]
    assert cli.main(["jsonl", str(out), "--per-device", "60", *argv]) == 0
    expected = list(stream(FleetSpec(devices=3, seed=5), 60, 0.1))
    assert out.read_bytes() == b"".join(r.to_json() + b"\n" for r in expected)
    assert load_truth(truth) == {
        (r.device_id, r.timestamp_ms): r.anomaly for r in expected if r.anomaly
    }
    assert cli.main(["normal-csv", str(csv), "--rows", "30", "--sensors", "12"]) == 0
    assert len(csv.read_text().splitlines()) == 31
    assert cli.main(["jsonl", "-", "--per-device", "2", "--devices", "1"]) == 0
    assert capsys.readouterr().out.count("\n") == 2


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["normal-csv", "x.csv"], "--rows"),
        (["jsonl", "-", "--per-device", "5", "--kinds", "spike,meteor"], "meteor"),
        (["jsonl", "-", "--per-device", "5", "--anomaly-fraction", "0.5"], "0..0.3"),
        (["jsonl", "-", "--per-device", "5", "--devices", "2000"], "1..1000"),
        (["produce", "--bootstrap", "nohost", "--topic", "t"], "HOST:PORT"),
        (
            [
                "produce",
                "--bootstrap",
                "h:1",
                "--topic",
                "t",
                "--per-device",
                "1",
                "--duration",
                "1",
            ],
            "not allowed",
        ),
        (
            ["produce", "--bootstrap", "h:1", "--topic", "t", "--security-protocol", "SASL_SSL"],
            "KAFKA_SASL_USERNAME",
        ),
        (["meteor"], "invalid choice"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(
    argv: list[str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KAFKA_SASL_USERNAME", raising=False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and needle in err


def test_cli_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["produce", "--help"]) == 0
    assert "--partitions" in capsys.readouterr().out
