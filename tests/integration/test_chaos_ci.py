"""The chaos suite's CI profile (issue 9), run by ``make test``; ``make chaos`` runs the rest.

Against a private broker of its own (the shared one is never signalled): 30k readings at
3,000 records/s with 2 workers, kill -9 ×2, a zombie (SIGSTOP past the session timeout while
the other member takes over, then SIGCONT) and one broker SIGKILL restart; and a worker
started before its output topic exists. Both delivery modes. The oracle is the worker's own
Scorer run offline on the input topic; the verifier reads with confluent-kafka under
``read_committed``.

Pass means: exactly-once 0 lost and 0 duplicated events and dead letters; at-least-once 0
lost, duplicates only as identical copies (same ``event_id`` and score); nothing unexpected;
committed offsets at the log end; no hanging transaction; no worker exit other than the
kills the test itself sent (in particular no exit 1).
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import scenarios as sc
from tests.chaos.broker import PrivateBroker

pytestmark = pytest.mark.integration

READINGS = 30_000
RATE = 3000.0


def _port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def chaos_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivateBroker, Path]]:
    work = tmp_path_factory.mktemp("chaos")
    b = PrivateBroker(work / "broker", _port_pair())
    b.start()
    yield b, work
    b.stop()
    shutil.rmtree(work / "broker", ignore_errors=True)


def _explain(r: sc.Result) -> str:
    return (
        f"{r.scenario}/{r.mode}: {'; '.join(r.failures)}\n"
        f"faults: {r.faults}\nexits: {r.exits}\nexamples: {r.examples}\nnotes: {r.notes}\n"
        f"worker logs: {r.log_dir}"
    )


CASES = [
    pytest.param("ci", "at_least_once", id="ci-at_least_once"),
    pytest.param("ci", "exactly_once", id="ci-exactly_once"),
    pytest.param("output_missing", "at_least_once", id="output_missing-at_least_once"),
    pytest.param("output_missing", "exactly_once", id="output_missing-exactly_once"),
]


@pytest.mark.parametrize(("scenario", "mode"), CASES)
def test_chaos_ci_profile(
    chaos_broker: tuple[PrivateBroker, Path], scenario: str, mode: str
) -> None:
    broker, work = chaos_broker
    r = sc.run(scenario, mode, broker, work, READINGS, RATE, seed=11, drain_timeout=150)
    # The input side must be sound, or the counts below mean nothing.
    assert r.injected_missed == 0, _explain(r)
    harness = ("driver", "verifier", "producer", "input")
    assert not [f for f in r.failures if f.startswith(harness)], _explain(r)
    assert r.lost_events == 0 and r.lost_dead == 0, _explain(r)
    if mode == "exactly_once":
        assert r.dup_events == 0 and r.dup_dead == 0, _explain(r)
    assert r.dup_inconsistent == 0, _explain(r)
    assert r.unexpected == 0 and r.wrong == 0, _explain(r)
    assert r.passed, _explain(r)
    shutil.rmtree(r.log_dir, ignore_errors=True)
