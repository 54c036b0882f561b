"""The state store's changelog bookkeeping (no broker: restore is tested in integration)."""

from __future__ import annotations

import pytest

from worker.state import StateStore


def test_flush_failed_resends_in_flight_changes_before_newer_ones() -> None:
    s = StateStore()
    s.assign(0)
    s.put(0, "a", b"1")
    s.put(0, "b", b"1")
    assert sorted(s.changelog_records(0)) == [(b"a", b"1"), (b"b", b"1")]
    s.put(0, "a", b"2")  # newer than the in-flight value
    s.flush_failed(0)
    assert sorted(s.changelog_records(0)) == [(b"a", b"2"), (b"b", b"1")]
    s.mark_flushed(0)
    assert s.changelog_records(0) == []
    s.put(0, "never", None)  # deleting an absent key writes no tombstone
    assert s.changelog_records(0) == []
    s.drop(0)
    with pytest.raises(KeyError):
        s.put(0, "a", b"1")
