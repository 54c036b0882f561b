"""Logging set-up shared by the commands: text or JSON lines, and a throttle for client noise.

``log.format: json`` writes one JSON object a line: ``time`` (RFC 3339, UTC), ``level``,
``logger``, ``message``, plus the structured fields a call passes in ``extra=`` (topic,
partition, offset, model, ...). kafka-python logs every failed connection attempt, often with
a traceback; during a broker outage that is hundreds of lines a minute. Its records go through
:class:`Throttle`: one line per distinct message template per ``window_s`` (a count of the
suppressed ones is added to the next), tracebacks dropped below DEBUG, and its ERRORs about
connections re-levelled to WARNING (our own loop reports the outage once, with its cause).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

_STD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; extra fields are kept, values made JSON-safe."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                doc[k] = (
                    v if isinstance(v, str | int | float | bool | dict | list | None) else str(v)
                )
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class Throttle(logging.Filter):
    """Rate-limit records per (logger, template); see the module docstring."""

    def __init__(
        self,
        prefixes: tuple[str, ...] = ("kafka",),
        window_s: float = 30.0,
        keep_tracebacks: bool = False,
    ) -> None:
        super().__init__()
        # A handler filter (logger filters do not apply to child loggers' records).
        self.prefixes = tuple(p for p in prefixes) + tuple(f"{p}." for p in prefixes)
        self.window_s = window_s
        self.keep_tracebacks = keep_tracebacks
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name in self.prefixes or record.name.startswith(self.prefixes)):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.window_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            record.msg = f"{record.msg} (and {n} similar in the last {self.window_s:.0f}s)"
        if not self.keep_tracebacks:
            record.exc_info = None
            record.exc_text = None
        if record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        if len(self._last) > 10_000:  # bounded memory
            self._last.clear()
        return True


def setup_logging(
    level: str, fmt: str = "text", client_loggers: tuple[str, ...] = ("kafka",)
) -> None:
    """Configure the root logger for a command (call once, at the edge)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    debug = logging.getLevelName(level) == logging.DEBUG
    handler.addFilter(Throttle(client_loggers, keep_tracebacks=debug))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    for name in client_loggers:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
