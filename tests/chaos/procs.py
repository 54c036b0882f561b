"""Worker subprocesses under a tiny supervisor, signalled only through their own ``Popen``.

A :class:`WorkerSlot` is one worker *instance* (one ``kafka.instance_id``, so under
exactly-once one transactional id) that may be started many times. While a slot is wanted
up, the :class:`Supervisor` restarts it after any exit, as Kubernetes or systemd would:
after a kill -9 by the chaos driver (expected), and after an exit the worker chose (exit 1 or
3 — recorded as such, so the table shows it, but the run goes on and loss is still measured).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.broker import REPO


@dataclass
class Exit:
    slot: str
    rc: int
    at: float  # monotonic
    cause: str  # "SIGKILL" / "SIGTERM" (sent by the driver) or "self" (the worker chose to exit)

    @property
    def bad(self) -> bool:
        """An exit that fails the run: a bug (1, a traceback), any non-zero exit after
        SIGTERM, or an exit nobody asked for (3 is judged by the scenario)."""
        if self.cause == "SIGKILL":
            return False
        if self.cause == "SIGTERM":
            # -15: the signal's default action, i.e. it came before the worker installed its
            # handler (still importing); nothing was held, so that is a clean stop too.
            return self.rc not in (0, -signal.SIGTERM)
        return self.rc != 3


@dataclass
class WorkerSlot:
    name: str
    config: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    wanted: bool = False
    starts: int = 0
    _cause: str = "self"
    restart_at: float | None = None
    started_at: float = 0.0

    def start(self) -> None:
        """Start the worker from ``$CHAOS_WORKER_SRC`` (default: this checkout), so a run can
        measure a given commit while the working tree changes."""
        assert not self.running(), f"{self.name} already running"
        src = os.environ.get("CHAOS_WORKER_SRC", str(REPO))
        path = os.pathsep.join(dict.fromkeys([src, str(REPO)]))
        with self.log_path.open("ab") as log:
            log.write(
                f"\n===== chaos: start #{self.starts + 1} of {self.name} "
                f"at {time.time():.3f}\n".encode()
            )
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "--config", str(self.config)],
                cwd=src,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path, **self.env},
            )
        self.starts += 1
        self.started_at = time.monotonic()
        self.wanted = True
        self._cause = "self"
        self.restart_at = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        """Signal this slot's current process (ours: its Popen), if it is running."""
        if self.running():
            assert self.proc is not None
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self._cause = signal.Signals(sig).name
            self.proc.send_signal(sig)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Supervisor:
    """Watches slots; restarts a wanted slot ``restart_delay`` s after any exit."""

    def __init__(self, restart_delay: float = 1.0) -> None:
        self.slots: dict[str, WorkerSlot] = {}
        self.exits: list[Exit] = []
        self.restart_delay = restart_delay
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="chaos-supervisor", daemon=True)

    def add(self, slot: WorkerSlot) -> WorkerSlot:
        self.slots[slot.name] = slot
        return slot

    def begin(self) -> None:
        self._thread.start()

    def _reap(self, slot: WorkerSlot) -> Exit | None:
        p = slot.proc
        if p is None or p.poll() is None:
            return None
        e = Exit(slot.name, int(p.returncode), time.monotonic(), slot._cause)
        self.exits.append(e)
        slot.proc = None
        return e

    def _watch(self) -> None:
        while not self._halt.wait(0.2):
            with self._lock:
                for slot in self.slots.values():
                    if self._reap(slot) is not None and slot.wanted:
                        slot.restart_at = time.monotonic() + self.restart_delay
                    due = slot.restart_at is not None and time.monotonic() >= slot.restart_at
                    if slot.wanted and slot.proc is None and due:
                        slot.start()

    # -- driver operations (all under the lock, so the watcher never races a restart) ----------

    def start(self, name: str) -> None:
        with self._lock:
            self.slots[name].start()

    def kill9(self, name: str) -> bool:
        """SIGKILL the slot's process; the supervisor restarts it. False if it was not running."""
        with self._lock:
            slot = self.slots[name]
            if not slot.running():
                return False
            slot.send(signal.SIGKILL)
            return True

    def sigterm(self, name: str) -> bool:
        """SIGTERM (graceful restart: the supervisor starts it again once it exits)."""
        with self._lock:
            slot = self.slots[name]
            if not slot.running():
                return False
            slot.send(signal.SIGTERM)
            return True

    def pause(self, name: str) -> None:
        with self._lock:
            self.slots[name].send(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        with self._lock:
            self.slots[name].send(signal.SIGCONT)

    def stop_slot(self, name: str, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Take a slot down for good (no restart): ``sig`` once, wait, SIGKILL after ``timeout``."""
        with self._lock:
            slot = self.slots[name]
            slot.wanted = False
            slot.restart_at = None
            p = slot.proc
            if p is None:
                return None
            slot.send(signal.SIGCONT)
            slot.send(sig)
        return self._wait_down(slot, p, timeout)

    def _wait_down(self, slot: WorkerSlot, p: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with self._lock:
                p.kill()
            p.wait(timeout=10)
            # Record the forced kill as what it is: the worker did not stop on SIGTERM.
            with self._lock:
                self.exits.append(Exit(slot.name, -9, time.monotonic(), "SIGTERM-timeout"))
                slot.proc = None
            return -9
        with self._lock:
            e = self._reap(slot)
        return e.rc if e else int(p.returncode)

    def stop_all(self, timeout: float = 60.0) -> None:
        """SIGTERM every running worker once (a group's members leave together), then wait."""
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        waiting = []
        with self._lock:
            for slot in self.slots.values():
                slot.wanted = False
                slot.restart_at = None
                if slot.proc is not None:
                    slot.send(signal.SIGCONT)
                    slot.send(signal.SIGTERM)
                    waiting.append((slot, slot.proc))
        for slot, p in waiting:
            self._wait_down(slot, p, timeout)

    def exit_summary(self) -> str:
        c = Counter(
            f"{e.rc}" if e.cause in ("self", "SIGTERM") else f"{e.rc}({e.cause})"
            for e in self.exits
        )
        return " ".join(f"{k}×{v}" for k, v in sorted(c.items()))

    def bad_exits(self, allow_give_up: bool = False) -> list[Exit]:
        return [e for e in self.exits if e.bad or (e.rc == 3 and not allow_give_up)]

    def any_running(self) -> bool:
        with self._lock:
            return any(s.running() for s in self.slots.values())
