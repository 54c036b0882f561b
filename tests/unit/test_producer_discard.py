"""Retiring a transactional producer before its replacement starts (worker/clients).

kafka-python's ``close(timeout)`` flushes first and ``flush`` raises for unacknowledged
batches, so ``close(0)`` on a producer cut off from the broker used to leave its sender
thread running (and its abandoned transaction's requests reaching the broker after the
replacement had initialised: duplicates under broker SIGKILL). These tests pin the order
``discard_producer`` relies on with a stand-in whose ``close`` raises like kafka-python's;
the broker-level proof is the chaos scenario broker_kill, exactly-once.
"""

from __future__ import annotations

import threading
from typing import Any

from kafka.errors import KafkaTimeoutError

from worker.clients import kafka_python


class _Sender(threading.Thread):
    """Runs until force-closed, like kafka-python's Sender with batches it cannot send."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.force_closed_before_close = False

    def force_close(self) -> None:
        self.stop.set()

    def run(self) -> None:
        self.stop.wait(30)


class _Producer:
    def __init__(self) -> None:
        self._sender = _Sender()
        self._sender.start()
        self.closed_with: list[Any] = []

    def close(self, timeout: float | None = None) -> None:
        self.closed_with.append(timeout)
        self._sender.force_closed_before_close = self._sender.stop.is_set()
        raise KafkaTimeoutError("Timeout waiting for future")  # flush(0) with a pending batch


def test_sender_is_force_closed_first_and_waited_for_although_close_raises() -> None:
    p = _Producer()
    assert kafka_python.discard_producer(p, timeout_s=5) is True  # type: ignore[arg-type]
    assert p._sender.force_closed_before_close
    assert p.closed_with == [0]
    assert not p._sender.is_alive()


def test_a_sender_that_does_not_stop_is_reported() -> None:
    p = _Producer()
    p._sender.force_close = lambda: None  # type: ignore[method-assign]
    assert kafka_python.discard_producer(p, timeout_s=0.2) is False  # type: ignore[arg-type]
    p._sender.stop.set()
