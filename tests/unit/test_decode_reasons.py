"""Dead-letter reasons are decided by a value's bytes alone, in the documented order.

Each case is decoded three ways: alone, amid good readings through the bulk fast path,
and amid good readings record by record; all three must give the same reason and message.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from worker.config import ReadingSettings
from worker.decode import DecodedBatch, ReadingDecoder
from worker.reasons import Reason

REPO = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000_000
FEATURES = ("a", "b", "c")


def _reading(**extra: object) -> dict[str, object]:
    return {
        "device_id": "pump-1",
        "timestamp": NOW - 1000,
        "values": {"a": 1.0, "b": 2.0, "c": 3.0},
        **extra,
    }


GOOD = json.dumps(_reading()).encode()
GOOD_NON_ASCII = json.dumps(_reading(site="Zürich"), ensure_ascii=False).encode()
_PREFIX = GOOD[:-1]  # '{"device_id": ..., "values": {...}' without the closing brace

CASES: list[tuple[str, bytes, Reason]] = [
    # invalid UTF-8 where the typed parser does not look: ignored fields' values and keys
    ("bad utf-8 in ignored value", _PREFIX + b', "note": "\xff\xfe"}', Reason.DECODE_ERROR),
    ("bad utf-8 in ignored key", _PREFIX + b', "\xc3": 1}', Reason.DECODE_ERROR),
    ("utf-8 encoded surrogate", _PREFIX + b', "note": "\xed\xa0\x80"}', Reason.DECODE_ERROR),
    ("overlong utf-8", _PREFIX + b', "note": "\xc0\xaf"}', Reason.DECODE_ERROR),
    ("bad utf-8 in device id", GOOD.replace(b"pump-1", b"pump-\xff"), Reason.DECODE_ERROR),
    # malformed JSON after a schema problem the typed parser meets first
    ("truncated after a wrong type", b'{"device_id": 7, "timestamp": 1', Reason.DECODE_ERROR),
    ("truncated after a string feature", b'{"values": {"a": "1.0"', Reason.DECODE_ERROR),
    ("missing field, trailing garbage", b'{"values": {}} ,', Reason.DECODE_ERROR),
    ("array, truncated", b"[1, 2", Reason.DECODE_ERROR),
    ("NaN after a wrong type", b'{"device_id": 7, "timestamp": NaN}', Reason.DECODE_ERROR),
    ("BOM", b"\xef\xbb\xbf" + GOOD, Reason.DECODE_ERROR),
    ("trailing garbage", GOOD + b"x", Reason.DECODE_ERROR),
    # well-formed: the schema reason stands
    ("wrong device type", GOOD.replace(b'"pump-1"', b"7"), Reason.INVALID_DEVICE_ID),
    ("string feature", GOOD.replace(b"1.0", b'"1.0"'), Reason.INVALID_NUMBER),
    ("array", b"[1, 2]", Reason.INVALID_SHAPE),
    ("no device id", json.dumps({"timestamp": NOW, "values": {}}).encode(), Reason.MISSING_FIELD),
    # an out-of-range number in an ignored field is well-formed JSON and ignored
    ("huge ignored number, bad device", b'{"x": 1e999, "device_id": 7}', Reason.INVALID_DEVICE_ID),
]


def _decoders() -> tuple[ReadingDecoder, ReadingDecoder]:
    fast = ReadingDecoder(FEATURES, ReadingSettings(), now_ms=lambda: NOW)
    slow = ReadingDecoder(FEATURES, ReadingSettings(), now_ms=lambda: NOW)
    slow._decode_fast = lambda values: None  # type: ignore[method-assign]
    return fast, slow


def _failures(b: DecodedBatch) -> list[tuple[int, Reason, str, str]]:
    return [(f.index, f.reason, f.exception, f.message) for f in b.failures]


@pytest.mark.parametrize(("name", "raw", "reason"), CASES, ids=[c[0] for c in CASES])
def test_reason_is_decided_by_the_bytes_alone(name: str, raw: bytes, reason: Reason) -> None:
    fast, slow = _decoders()
    alone = fast.decode([raw])
    assert [f.reason for f in alone.failures] == [reason], alone.failures
    assert alone.index == []
    batch = [GOOD, GOOD_NON_ASCII, raw, GOOD]
    a, b = fast.decode(batch), slow.decode(batch)
    assert _failures(a) == _failures(b) == [(2, *_failures(alone)[0][1:])]
    assert a.index == b.index == [0, 1, 3]


def test_invalid_utf8_passes_the_typed_parser_but_not_the_decoder() -> None:
    # The premise of the UTF-8 check: without it, this reading would be scored.
    import msgspec

    fast, _ = _decoders()
    raw = _PREFIX + b', "note": "\xff"}'
    fast._fast_decoder.decode(raw)  # no error: msgspec skips the ignored field's bytes
    (f,) = fast.decode([raw]).failures
    assert f.exception == "UnicodeDecodeError"
    assert re.fullmatch(r"value is not valid UTF-8: invalid start byte at byte \d+", f.message)
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(raw)


def test_valid_non_ascii_readings_take_the_fast_path() -> None:
    fast, _ = _decoders()
    calls = []
    real = fast._finish
    fast._finish = lambda *a: calls.append(1) or real(*a)  # type: ignore[method-assign]
    out = fast.decode([GOOD_NON_ASCII, GOOD])
    assert out.index == [0, 1] and not out.failures
    assert calls == []  # _finish is the record-by-record path's ending


def test_readme_lists_exactly_the_closed_set_of_reasons() -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("## Dead letters", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert sorted(listed) == sorted(r.value for r in Reason)
