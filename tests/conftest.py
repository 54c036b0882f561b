"""Shared fixtures. The ``broker`` fixture starts the real local Kafka if none answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.kafka import Broker


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    b = Broker.ensure()
    print(f"\n[broker] using Kafka at {b.bootstrap} (started by tests: {b.started_here})")
    yield b
    b.stop()
