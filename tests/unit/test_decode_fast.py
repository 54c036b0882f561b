"""Differential test of the reading decode: the bulk fast path against the record-by-record path.

Both decoders of a pair see the same batches; one has its fast path switched off. Every
field of the result must agree: row index, the float matrix bit for bit (NaN where missing,
the sign of zero), device ids, timestamps, missing counts and each dead letter's index,
reason, stage, exception and message. The corpus is generated from the simulator: good
readings with awkward but valid content (unicode ids, extra fields, RFC 3339 timestamps,
huge, tiny and negative-zero numbers, integers, missing and null features within the
imputation limit) and every bad-record kind of the chaos catalogue.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from simulator.fleet import FleetSpec, feature_names, stream
from tests.chaos.inputs import BAD_KINDS
from worker.config import ReadingSettings
from worker.decode import DecodedBatch, ReadingDecoder, _missing_per_row

NOW = 1_800_000_000_000
SPEC = FleetSpec(devices=12, sensors=16, seed=5, start_ms=NOW - 200_000)
NAMES = feature_names(SPEC)  # sensor_00 ... sensor_15: the names BAD_KINDS edits

# Valid JSON numbers that decode to unusual floats (or ints read as floats).
NUMBERS = [
    "0",
    "-0",
    "-0.0",
    "0.0",
    "1e308",
    "-1.7976931348623157e308",
    "5e-324",
    "2.2250738585072014e-308",
    "1e-400",  # underflows to 0.0: valid, not out of range
    "123456789012345678901234567890",
    "9007199254740993",
    "-12.5E+3",
    "0.1",
    "3.141592653589793238462643383279",
    "1E2",
]


def _docs(n_per_device: int = 8) -> list[dict[str, Any]]:
    return [json.loads(r.to_json()) for r in stream(SPEC, n_per_device)]


def _with_number(doc: dict[str, Any], sensor: str, text: str) -> bytes:
    marker = 987654.25
    values = dict(doc["values"])
    values[sensor] = marker
    return (
        json.dumps({**doc, "values": values})
        .encode()
        .replace(json.dumps(marker).encode(), text.encode())
    )


def _rfc3339(rng: random.Random, d: dict[str, Any]) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW / 1000 - rng.randrange(1, 3000)))
    d["timestamp"] = stamp + rng.choice(["Z", "+00:00", ".250Z", "+02:00"])


def _drop_or_null(rng: random.Random, d: dict[str, Any], imputed: int, null: bool) -> None:
    for s in rng.sample(NAMES, rng.randint(1, imputed) if imputed else 0):
        if null and rng.random() < 0.5:
            d["values"][s] = None
        else:
            del d["values"][s]


def _ignored_extras(d: dict[str, Any]) -> bytes:
    d["site"] = {"name": "Zürich", "tags": [1, 2.5, None, True, "x"], "n": "N"}
    # an out-of-range number in an ignored field is valid JSON, and ignored
    return json.dumps(d).encode().replace(b'"N"', b"1e999")


_UNICODE_IDS = ["pompe-é", "насос-1", "泵-7", "pump-🚀", "p" * 128]
# Harmless edits of a good reading: (rng, doc copy, imputed) -> the value, or None to
# serialise the edited doc with json.dumps.
_GOOD_EDITS: list[Callable[[random.Random, dict[str, Any], int], bytes | None]] = [
    lambda rng, d, imp: _with_number(d, rng.choice(NAMES), rng.choice(NUMBERS)),
    lambda rng, d, imp: d.update(device_id=rng.choice(_UNICODE_IDS)),
    lambda rng, d, imp: _ignored_extras(d),
    lambda rng, d, imp: _rfc3339(rng, d),
    lambda rng, d, imp: _drop_or_null(rng, d, imp, null=True),
    lambda rng, d, imp: _drop_or_null(rng, d, imp, null=False),  # NaN default of the fast path
    lambda rng, d, imp: d.update(values=dict(reversed(list(d["values"].items())))),
    lambda rng, d, imp: d["values"].update(not_a_feature="ignored"),
    # duplicate key: the last one wins
    lambda rng, d, imp: json.dumps(d).encode()[:-1] + b', "device_id": "pump-dup"}',
    lambda rng, d, imp: d["values"].update({rng.choice(NAMES): rng.randint(-(10**6), 10**6)}),
    lambda rng, d, imp: json.dumps(d, indent=rng.choice([None, 2]), separators=(",", ":")).encode(),
    lambda rng, d, imp: json.dumps(d, ensure_ascii=False).encode(),
    lambda rng, d, imp: None,
]


def _good_variants(rng: random.Random, doc: dict[str, Any], imputed: int) -> bytes:
    """A valid reading, ``doc`` changed in one of many harmless ways."""
    d: dict[str, Any] = {**doc, "values": dict(doc["values"])}
    raw = rng.choice(_GOOD_EDITS)(rng, d, imputed)
    return raw if isinstance(raw, bytes) else json.dumps(d).encode()


# Bad records beyond the chaos catalogue: deterministic functions of a good reading.
EXTRA_BAD: dict[str, Any] = {
    "infinity_literal": lambda o: _with_number(o, "sensor_06", "Infinity"),
    "minus_infinity_literal": lambda o: _with_number(o, "sensor_07", "-Infinity"),
    "null_value_not_imputed": lambda o: _with_number(o, "sensor_08", "null"),
    "three_missing": lambda o: json.dumps(
        {**o, "values": {k: v for k, v in o["values"].items() if k not in NAMES[:3]}}
    ).encode(),
    # invalid UTF-8 where the typed parser does not look (it skips ignored fields unchecked)
    "utf8_in_ignored_value": lambda o: json.dumps(o).encode()[:-1] + b', "n": "\xff"}',
    "utf8_in_ignored_key": lambda o: json.dumps(o).encode()[:-1] + b', "\xc3": 1}',
    "number_out_of_range": lambda o: _with_number(o, "sensor_09", "-1e309"),
    "integer_out_of_range": lambda o: _with_number(o, "sensor_10", "9" * 400),
    "oversize": lambda o: json.dumps({**o, "pad": "x" * 1_000_001}).encode(),
    "empty_device_id": lambda o: json.dumps({**o, "device_id": ""}).encode(),
    "timestamp_overflows_int64": lambda o: json.dumps({**o, "timestamp": 10**20}).encode(),
    "timestamp_float": lambda o: json.dumps({**o, "timestamp": 1.5e12}).encode(),
    "timestamp_no_offset": lambda o: json.dumps({**o, "timestamp": "2027-01-15T08:00:00"}).encode(),
}
ALL_BAD = {**BAD_KINDS, **EXTRA_BAD}


def _bad_variant(rng: random.Random, doc: dict[str, Any]) -> bytes | None:
    bad: bytes | None = ALL_BAD[rng.choice(sorted(ALL_BAD))](doc)
    return bad


def _pair(settings: ReadingSettings) -> tuple[ReadingDecoder, ReadingDecoder]:
    fast = ReadingDecoder(NAMES, settings, now_ms=lambda: NOW)
    slow = ReadingDecoder(NAMES, settings, now_ms=lambda: NOW)
    slow._decode_fast = lambda values: None  # type: ignore[method-assign]
    return fast, slow


def _same(a: DecodedBatch, b: DecodedBatch) -> None:
    assert a.index == b.index
    assert a.device_ids == b.device_ids
    assert a.x.dtype == b.x.dtype == np.float64
    assert a.x.shape == b.x.shape
    assert a.x.tobytes() == b.x.tobytes()  # bit for bit: NaN positions, -0.0
    assert a.timestamps_ms.dtype == b.timestamps_ms.dtype == np.int64
    assert np.array_equal(a.timestamps_ms, b.timestamps_ms)
    assert a.missing.dtype == b.missing.dtype
    assert np.array_equal(a.missing, b.missing)
    assert [(f.index, f.reason, f.stage, f.exception, f.message) for f in a.failures] == [
        (f.index, f.reason, f.stage, f.exception, f.message) for f in b.failures
    ]
    assert sorted(a.index + [f.index for f in a.failures]) == list(
        range(len(a.index) + len(a.failures))
    )


@pytest.mark.parametrize("imputed", [0, 3])
def test_fast_path_equals_record_by_record_on_a_generated_corpus(imputed: int) -> None:
    rng = random.Random(1000 + imputed)
    docs = _docs()
    fast, slow = _pair(ReadingSettings(max_imputed_features=imputed))
    took_fast = 0
    for round_ in range(300):
        n = rng.choice([1, 2, 5, 64, 257])
        bad_share = rng.choice([0.0, 0.0, 0.01, 0.2])
        batch = [
            _bad_variant(rng, rng.choice(docs))
            if rng.random() < bad_share
            else _good_variants(rng, rng.choice(docs), imputed)
            for _ in range(n)
        ]
        if round_ % 3 == 0:  # the decoders cache good ids: also start from a cold cache
            fast, slow = _pair(ReadingSettings(max_imputed_features=imputed))
        took_fast += fast._decode_fast(batch) is not None
        _same(fast.decode(batch), slow.decode(batch))
    assert took_fast > 50  # the comparison covered the fast path, not only its refusals


@pytest.mark.parametrize("imputed", [0, 3])
@pytest.mark.parametrize("kind", sorted(ALL_BAD))
def test_every_bad_kind_amid_good_readings(kind: str, imputed: int) -> None:
    docs = _docs(2)
    fast, slow = _pair(ReadingSettings(max_imputed_features=imputed))
    bad = ALL_BAD[kind](docs[3])
    imputable = ("missing_feature", "null_feature", "three_missing", "null_value_not_imputed")
    batch = [json.dumps(d).encode() for d in docs[:3]] + [bad] + [json.dumps(docs[4]).encode()]
    a, b = fast.decode(batch), slow.decode(batch)
    _same(a, b)
    expected = [] if imputed and kind in imputable else [3]  # within the imputation limit
    assert [f.index for f in a.failures] == expected, (kind, a.failures)
    _same(fast.decode([bad]), slow.decode([bad]))


def test_flat_readings_fast_path_equals_record_by_record() -> None:
    rng = random.Random(7)
    settings = ReadingSettings(values_field="", max_imputed_features=1)
    fast = ReadingDecoder(NAMES, settings, now_ms=lambda: NOW)
    slow = ReadingDecoder(NAMES, settings, now_ms=lambda: NOW)
    slow._decode_fast = lambda values: None  # type: ignore[method-assign]
    flat = [
        {"device_id": d["device_id"], "timestamp": d["timestamp"], **d["values"]} for d in _docs()
    ]
    for _ in range(60):
        batch: list[bytes | None] = []
        for _ in range(rng.choice([1, 16, 100])):
            d = dict(rng.choice(flat))
            r = rng.random()
            if r < 0.1:
                d[rng.choice(NAMES)] = None
            elif r < 0.15:
                d[rng.choice(NAMES)] = "1.0"
            elif r < 0.2:
                d["other"] = [1, {"x": None}]
            raw = json.dumps(d).encode()
            if rng.random() < 0.05:
                raw = raw.replace(b"pump", b"pump-\xff", 1)
            batch.append(raw)
        _same(fast.decode(batch), slow.decode(batch))


def test_good_batches_take_the_fast_path() -> None:
    # Nulls (imputed) are left out: the fast decoder refuses them, by design.
    fast, _ = _pair(ReadingSettings(max_imputed_features=3))
    rng = random.Random(3)
    docs = _docs()
    for _ in range(50):
        batch = [_good_variants(rng, rng.choice(docs), 0) for _ in range(20)]
        assert fast._decode_fast(batch) is not None


def test_missing_per_row_counts_nan_exactly() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 7)) * 1e307
    specials = [np.nan, np.inf, -np.inf, 1.7e308, -1.7e308, 0.0, -0.0]
    for _ in range(800):
        x[rng.integers(500), rng.integers(7)] = specials[rng.integers(len(specials))]
    assert np.array_equal(_missing_per_row(x), np.isnan(x).sum(axis=1))
    assert _missing_per_row(np.empty((0, 7))).shape == (0,)
    assert _missing_per_row(np.empty((3, 0))).tolist() == [0, 0, 0]
