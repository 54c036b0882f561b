"""The optimised paths give exactly what the straightforward ones give."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import numpy as np
import pytest

from detector import Detector
from simulator.fleet import FleetSpec, feature_names, normal_matrix, stream
from tests.support.detectors import linear_detector
from worker.config import ReadingSettings
from worker.decode import DecodedBatch, ReadingDecoder

NOW = int(time.time() * 1000)
SPEC = FleetSpec(devices=20, sensors=12, seed=3, start_ms=NOW - 100_000)
NAMES = feature_names(SPEC)


def _set(path: tuple[str, ...], value: Any) -> Any:
    def apply(d: dict[str, Any]) -> None:
        target = d
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return apply


_DELETE = object()
_RAW: dict[int, bytes | None] = {
    0: None,
    1: b"",
    2: b"{",
    3: b"[1,2]",
    4: b"x" * 2000,
    5: b'{"device_id": "pump-001", "timestamp": NaN}',
    6: b'{"device_id": 7, "timestamp": 1',  # a schema problem before the truncation
    7: b'{"device_id": "pump-001", "note": "\xff"}',  # bad UTF-8 in an ignored field
}
_EDITS = [
    _set(("values", NAMES[0]), None),
    _set(("values", NAMES[1]), _DELETE),
    _set(("timestamp",), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW / 1000 - 5))),
    _set(("timestamp",), "garbage"),
    _set(("timestamp",), 10**30),
    _set(("timestamp",), 1234),
    _set(("timestamp",), NOW + 10**7),
    _set(("device_id",), "bad\x01id"),
    _set(("device_id",), "x" * 200),
    _set(("device_id",), _DELETE),
    _set(("values", NAMES[2]), "1.5"),
    _set(("values", NAMES[2]), True),
    _set(("values", NAMES[3]), 1e300),
    _set(("extra",), {"a": [1, 2, 3]}),
]


def _variant(rng: random.Random, d: dict[str, Any]) -> bytes | None:
    """A copy of reading ``d`` broken (or not) in one of many ways."""
    k = rng.randrange(len(_RAW) + len(_EDITS) + 4)
    if k in _RAW:
        return _RAW[k]
    if k == len(_RAW) + len(_EDITS):  # a good reading with bad UTF-8 in an ignored field
        return json.dumps(d).encode()[:-1] + b', "note": "\xc3"}'
    d = {**d, "values": dict(d["values"])}
    if k - len(_RAW) < len(_EDITS):
        _EDITS[k - len(_RAW)](d)
    return json.dumps(d).encode()


def _same(a: DecodedBatch, b: DecodedBatch) -> None:
    assert a.index == b.index
    assert a.device_ids == b.device_ids
    assert a.x.dtype == b.x.dtype and np.array_equal(a.x, b.x, equal_nan=True)
    assert np.array_equal(a.timestamps_ms, b.timestamps_ms)
    assert np.array_equal(a.missing, b.missing)
    assert [(f.index, f.reason, f.stage, f.exception, f.message) for f in a.failures] == [
        (f.index, f.reason, f.stage, f.exception, f.message) for f in b.failures
    ]


@pytest.mark.parametrize("imputed", [0, 2])
def test_bulk_decode_equals_record_by_record(imputed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(imputed)
    docs = [json.loads(r.to_json()) for r in stream(SPEC, 30)]
    settings = ReadingSettings(max_imputed_features=imputed)
    fast = ReadingDecoder(NAMES, settings, now_ms=lambda: NOW)
    slow = ReadingDecoder(NAMES, settings, now_ms=lambda: NOW)
    monkeypatch.setattr(slow, "_decode_fast", lambda values: None)
    for _ in range(200):
        n = rng.choice([1, 2, 8, 64])
        batch = [
            _variant(rng, rng.choice(docs))
            if rng.random() < 0.3
            else json.dumps(rng.choice(docs)).encode()
            for _ in range(n)
        ]
        _same(fast.decode(batch), slow.decode(batch))


@pytest.fixture(scope="module")
def det() -> Detector:
    return linear_detector(normal_matrix(SPEC, 6000), NAMES, code=3)


def test_contributions_many_equals_per_row(det: Detector) -> None:
    readings = list(stream(SPEC, 40, anomaly_fraction=0.2))
    x = np.array([[r.values[f] for f in NAMES] for r in readings])
    x[3, 2] = np.nan
    scores = det.score(x)
    rows = list(range(len(readings)))
    many = det.contributions_many(x, scores, rows, top=4, min_share=0.05)
    for r in rows:
        # repr compares NaN values (an imputed sensor's observed value) as equal.
        assert repr(many[r]) == repr(det.contributions(x[r], scores, r, top=4, min_share=0.05))
