"""The chaos harness's own checks, without a broker: if these fail, its counts mean nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chaos import oracle
from tests.chaos.inputs import BAD_KINDS, InputSpec, generate
from tests.chaos.oracle import Expected, ExpectedEvent
from tests.chaos.scenarios import ensure_registry
from tests.chaos.verify import _count_dead, _count_events
from worker.records import SimpleRecord


class _Msg:
    def __init__(self, value: bytes | None, headers: list[tuple[str, bytes]], offset: int) -> None:
        self._v, self._h, self._o = value, headers, offset

    def value(self) -> bytes | None:
        return self._v

    def headers(self) -> list[tuple[str, bytes]]:
        return self._h

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._o


def _event(eid: str, score: float, dev: str = "pump-000", ts: int = 1) -> _Msg:
    doc = {"event_id": eid, "score": score, "device_id": dev, "reading_timestamp_ms": ts}
    return _Msg(json.dumps(doc).encode(), [], 0)


def _dead(part: int, off: int, reason: str) -> _Msg:
    h = [
        ("__connect.errors.partition", str(part).encode()),
        ("__connect.errors.offset", str(off).encode()),
        ("sensor_anomaly.error.reason", reason.encode()),
    ]
    return _Msg(None, h, 0)


def test_event_counts_lost_duplicated_inconsistent_unexpected() -> None:
    exp = Expected(
        events={
            "t/0/1": ExpectedEvent("pump-000", 1, 0.5),
            "t/0/2": ExpectedEvent("pump-000", 1, 0.7),
            "t/0/3": ExpectedEvent("pump-000", 1, 0.9),
        }
    )
    msgs = [
        _event("t/0/1", 0.5),
        _event("t/0/1", 0.5),  # identical copy: a duplicate, consistent
        _event("t/0/2", 0.7),
        _event("t/0/2", 0.71),  # a copy with another score: inconsistent
        _event("t/0/9", 1.0),  # not expected at all
    ]
    c = _count_events(msgs, exp)
    assert (c.lost, c.dup, c.dup_inconsistent, c.unexpected, c.wrong) == (1, 2, 1, 1, 0)


def test_scores_compare_to_float32_precision() -> None:
    """A last-bit difference of a float32 score (another batch shape) is the same score; a
    difference past float32 precision is not (the pair is what a chaos run published)."""
    got, oracle = 6.403442479944715, 6.403443085213439
    exp = Expected(events={"t/0/1": ExpectedEvent("pump-000", 1, oracle)})
    c = _count_events([_event("t/0/1", got), _event("t/0/1", oracle)], exp)
    assert (c.wrong, c.dup, c.dup_inconsistent) == (0, 1, 0)
    c = _count_events([_event("t/0/1", oracle * (1 + 1e-5))], exp)
    assert c.wrong == 1


def test_event_naming_another_reading_is_wrong() -> None:
    exp = Expected(events={"t/0/1": ExpectedEvent("pump-000", 1, 0.5)})
    c = _count_events([_event("t/0/1", 0.5, dev="pump-001")], exp)
    assert (c.lost, c.wrong) == (0, 1)


def test_dead_letter_counts() -> None:
    exp = Expected(dead={(0, 5): "decode_error", (1, 7): "missing_field", (2, 1): "oversize"})
    msgs = [
        _dead(0, 5, "decode_error"),
        _dead(0, 5, "decode_error"),
        _dead(1, 7, "invalid_number"),
        _dead(2, 9, "decode_error"),
    ]
    c = _count_dead(msgs, exp)
    assert (c.lost, c.dup, c.unexpected, c.wrong) == (1, 1, 1, 1)


def test_input_is_deterministic_and_keeps_partitions() -> None:
    spec = InputSpec(readings=2000, start_ms=1_764_201_600_000, flood=30)
    a, b = generate(spec), generate(spec)
    assert a.records == b.records
    assert a.bad == round(2000 * spec.bad_fraction) + 30
    assert a.injected, "no extreme anomaly injected"
    for r in a.records:
        if r.device_id is not None:
            assert r.partition == int(r.device_id[-3:]) % spec.partitions


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chaos-oracle")
    reg = ensure_registry(root / "registry", InputSpec())
    doc: dict[str, Any] = {"model": {"registry": str(reg), "name": "sensors"}}
    path = root / "w.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_oracle_flags_every_injected_anomaly_and_dead_letters_every_bad_record(
    config: Path,
) -> None:
    inp = generate(InputSpec(readings=8000, bad_fraction=0.02))
    offsets: dict[int, int] = {}
    recs = []
    kinds: dict[tuple[int, int], str] = {}
    for r in inp.records:
        off = offsets.get(r.partition, 0)
        offsets[r.partition] = off + 1
        recs.append(SimpleRecord("in", r.partition, off, r.key, r.value, []))
        if r.bad is not None:
            kinds[(r.partition, off)] = r.bad
    exp = oracle.compute(config, recs)
    flagged = {(e.device_id, e.timestamp_ms) for e in exp.events.values()}
    assert inp.injected <= flagged
    # Every bad kind of the catalogue is really unscorable: a kind the worker accepted would
    # silently test nothing.
    assert set(exp.dead) == set(kinds)
    assert set(kinds.values()) == set(BAD_KINDS)
    assert not exp.ambiguous
