"""Running the real worker as a subprocess against the real broker, for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support.kafka import REPO, Broker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_worker_config(path: Path, **sections: dict[str, Any]) -> Path:
    """A worker YAML config; each keyword is a section (kafka=..., model=..., ...)."""
    doc: dict[str, Any] = {"log_level": "INFO"}
    doc.update(sections)
    path.write_text(yaml.safe_dump(doc))
    return path


class WorkerProcess:
    """``python -m worker.cli --config ...`` with its log captured to a file."""

    def __init__(
        self,
        config: Path,
        log: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "--config", str(config), *(args or [])],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 40.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


def wait_until_committed(
    broker: Broker, group: str, topic: str, workers: list[WorkerProcess], timeout: float = 90.0
) -> dict[int, int]:
    """Wait until ``group``'s committed offsets equal the end of every partition of ``topic``."""
    end = broker.end_offsets(topic)
    deadline = time.monotonic() + timeout
    committed: dict[int, int] = {}
    while time.monotonic() < deadline:
        committed = broker.committed(group, topic)
        # An empty partition has nothing to commit.
        if all(committed.get(p) == e or e == 0 for p, e in end.items()):
            return committed
        for w in workers:
            if not w.alive():
                raise AssertionError(
                    f"worker exited early ({w.proc.returncode}):\n{w.log()[-4000:]}"
                )
        time.sleep(0.5)
    logs = "\n---\n".join(w.log()[-3000:] for w in workers)
    raise AssertionError(f"committed {committed} never reached end {end}\n{logs}")
