"""A worker's instance id: unique among running instances, stable across restarts.

Exactly-once derives the transactional id from the instance id, and two live producers with
one transactional id fence each other. The host name alone is not unique (two workers on
one machine); a random id is unique but not stable (a restarted worker could not fence and
abort its crashed predecessor's open transaction, which then blocks read_committed readers
until ``transaction.timeout.ms``).

The rule: ``kafka.instance_id`` when set; otherwise ``<host name>-<slot>``, where the slot
is the lowest number ``n >= 0`` whose lock file
``<lock dir>/sensor-anomaly-<group>-<host>-<n>.lock`` this process can lock exclusively
(``flock``; released by the kernel when the process ends, ``kill -9`` included). So:

- a single worker per host (every Kubernetes pod: the host name is the pod name) is always
  ``<host>-0``, across restarts;
- N workers on one host hold slots 0..N-1; a restarted one takes the lowest free slot, which
  was held by a process that has ended, so no live producer is ever fenced by a sibling.

The lock directory is ``kafka.instance_lock_dir``, else ``$XDG_RUNTIME_DIR``, else the
system temporary directory.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import IO

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_held: list[IO[bytes]] = []  # keep the locked files open for the life of the process


def lock_dir(configured: str = "") -> Path:
    if configured:
        return Path(configured)
    value = os.environ.get("XDG_RUNTIME_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    return Path(tempfile.gettempdir())


def resolve_instance_id(
    configured: str, group_id: str, directory: str = "", max_slots: int = 1024
) -> str:
    """The configured id, or the automatic ``<host>-<slot>`` (see the module docstring).

    The slot's lock is held until the process exits. Raises ``OSError`` only when the lock
    directory is unusable (the caller reports it as a start-up problem).
    """
    if configured:
        return configured
    host = _UNSAFE.sub("_", socket.gethostname()) or "worker"
    group = _UNSAFE.sub("_", group_id)[:80]
    base = lock_dir(directory)
    for slot in range(max_slots):
        path = base / f"sensor-anomaly-{group}-{host}-{slot}.lock"
        f = path.open("ab")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        _held.append(f)
        return f"{host}-{slot}"
    raise OSError(f"no free instance slot under {base} (more than {max_slots} workers?)")
