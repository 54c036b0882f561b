"""Plain record types that cross the boundary between the Kafka adapter and the pure core."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class InputRecord(Protocol):
    """What the core needs of a consumed record (kafka-python's ConsumerRecord fits)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> list[tuple[str, bytes]]: ...


@dataclass(frozen=True)
class SimpleRecord:
    """An :class:`InputRecord` for files, stdin and tests."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class OutputMessage:
    """A record to publish: where to, key, value and headers."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
