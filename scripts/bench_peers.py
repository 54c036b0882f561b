"""Peers of the worker for ``scripts/bench_clients.py``: an idiomatic quixstreams app and a
minimal hand-written confluent-kafka batch worker, on the same topic and the same model.

* :func:`ensure_venv` builds ``bench-out/peers-venv`` (``python -m venv``, then pip:
  quixstreams pinned, numpy and msgspec at the main venv's versions so the scoring is the
  same numpy code on the same numpy); it returns the venv's python or why it could not;
* :func:`peer_run` runs one peer (``scripts/peers/quix_app.py`` in that venv,
  ``scripts/peers/ck_batch.py`` in this one) on a fresh group over the pre-filled topic,
  writing its events to a fresh topic, and returns its self-measured CPU per reading;
* :func:`count_events` reads an events topic back (``read_committed``): events in all and
  distinct ``event_id`` s (an at-least-once redelivery repeats an id; that is the only
  tolerance allowed when comparing with the worker's events).

Standalone, it only builds the venv: ``.venv/bin/python scripts/bench_peers.py``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import msgspec
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as B

VENV = B.OUT / "peers-venv"
QUIX = "quixstreams==3.28.1"  # the version measured; a newer one is a deliberate change
PEERS = Path(__file__).resolve().parent / "peers"


def _pins() -> list[str]:
    out = [QUIX]
    for pkg in ("numpy", "msgspec"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(B.REPO))
    except ValueError:
        return str(path)


def ensure_venv(log: Path) -> tuple[Path | None, str]:
    """The peers venv's python, building it if needed; (None, reason) when that fails."""
    py, marker = VENV / "bin" / "python", VENV / ".installed"
    want = " ".join(_pins())
    if py.exists() and marker.exists() and marker.read_text().strip() == want:
        return py, f"{_rel(VENV)} ({want})"
    t = time.monotonic()
    with log.open("a") as f:
        try:
            if not py.exists():
                subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True,
                               stdout=f, stderr=subprocess.STDOUT, timeout=300)  # fmt: skip
            subprocess.run([str(py), "-m", "pip", "install", "-q", *_pins()], check=True,
                           stdout=f, stderr=subprocess.STDOUT, timeout=900)  # fmt: skip
            subprocess.run([str(py), "-c", "import quixstreams, numpy, msgspec"], check=True,
                           stdout=f, stderr=subprocess.STDOUT, timeout=120)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as e:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [str(e)]
            why = tail[0].replace("|", "/")[:160]
            return None, f"could not install {QUIX} into {_rel(VENV)} ({why}; log {_rel(log)})"
    marker.write_text(want + "\n")
    B.note(f"peers venv built in {time.monotonic() - t:.0f} s: {want}")
    return py, f"{_rel(VENV)} ({want})"


def peer_run(
    ctx: B.Ctx, key: str, i: int, kind: str, delivery: str, python: Path | None
) -> dict[str, Any]:
    """One run of a peer on a fresh group and a fresh events topic; its JSON line."""
    group = ctx.kafka.group(f"{key}{i}")
    out = ctx.kafka.topic(f"events-{key}{i}", 1)
    common = [
        *("--bootstrap", ctx.kafka.bootstrap, "--topic", ctx.topic, "--out", out),
        *("--group", group, "--registry", str(ctx.registry), "--expect", str(ctx.total)),
    ]
    if kind == "quix":
        if python is None:
            raise RuntimeError("no peers venv")
        state = ctx.run_dir / f"quix-state-{key}{i}"
        guarantee = "exactly-once" if delivery == "exactly_once" else "at-least-once"
        cmd = [str(python), str(PEERS / "quix_app.py"), *common, "--state-dir", str(state),
               "--guarantee", guarantee]  # fmt: skip
    else:
        cmd = [sys.executable, str(PEERS / "ck_batch.py"), *common]
    log = ctx.run_dir / f"{key}{i}.log"
    p = B.start(cmd, log, stdout=subprocess.PIPE)
    try:
        stdout, _ = p.communicate(timeout=900)
    finally:
        B.stop(p, grace=10)
    if p.returncode != 0:
        raise RuntimeError(f"{key} failed (rc {p.returncode}), see {log}: {stdout[-500:]!r}")
    res: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    res["events_topic"] = out
    return res


def count_events(bootstrap: str, topic: str, idle_s: float = 2.0) -> dict[str, int]:
    """Events in ``topic`` (one partition) as a read_committed reader sees them."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"count-{topic}",
                  "isolation.level": "read_committed", "enable.auto.commit": False})  # fmt: skip
    ids: set[str] = set()
    total = 0
    get_id = msgspec.json.Decoder(dict[str, Any]).decode
    try:
        _, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        last = -1
        quiet_until = time.monotonic() + idle_s
        while last < high - 1 and time.monotonic() < quiet_until:
            msgs = c.consume(1000, 0.2)
            for m in msgs:
                if m.error() is not None:
                    continue
                total += 1
                ids.add(str(get_id(m.value() or b"{}").get("event_id")))
                last = m.offset()
            if msgs:
                quiet_until = time.monotonic() + idle_s
    finally:
        with contextlib.suppress(Exception):
            c.close()
    return {"events": total, "distinct": len(ids)}


if __name__ == "__main__":
    B.OUT.mkdir(exist_ok=True)
    python, why = ensure_venv(B.OUT / "peers-venv.log")
    print(why)
    sys.exit(0 if python else 1)
