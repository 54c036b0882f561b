"""The README's "By hand" commands run as printed, on the real broker (issue 13).

The block is taken from README.md itself, so the test and the documentation cannot drift
apart. Two lines are left out: ``deploy/kafka/kafka.sh start`` / ``stop`` (the session's
broker stands in for them; stopping it would end the other tests' broker). The commands run
in a fresh folder holding only links to the project's ``.venv`` and ``examples``, as a user's
clone would after ``make install``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.kafka import REPO, Broker

pytestmark = pytest.mark.integration


def by_hand_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    m = re.search(r"### By hand\n+```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no ### By hand bash block"
    lines = m.group(1).replace("\\\n", " ").splitlines()
    return [ln for ln in lines if ln.strip()]


def test_readme_by_hand_commands_run_as_printed(broker: Broker, tmp_path: Path) -> None:
    commands = by_hand_block()
    assert any("anomaly-worker" in c for c in commands)
    script = ["set -euo pipefail"]
    for c in commands:
        if c.startswith("deploy/kafka/kafka.sh"):
            continue
        script.append(c.replace("127.0.0.1:39092", broker.bootstrap))
    script.append("wait")  # the worker's own exit status after `kill %1`
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = {**os.environ, "SENSOR_ANOMALY_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap}
    r = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n---\n{r.stderr[-4000:]}"
    events = []
    for line in r.stdout.splitlines():
        if line.startswith("{") and '"payload"' in line:
            payload = json.loads(line).get("payload")
            if payload:
                events.append(json.loads(payload))
    assert events, f"kcat showed no events:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert all("score_ratio" in e and e["contributors"] for e in events)
    # Event time kept pace with wall time: readings were scored, not refused as too far in
    # the future (30 s at 1000/s with 2 % injected: ~600 anomalies, plus false alarms).
    assert len(events) >= 300, len(events)
    dead = broker.read_all("sensor-readings-dlq", timeout=10)
    reasons = [dict(m.headers() or []).get("sensor_anomaly.error.reason") for m in dead]
    assert b"invalid_timestamp" not in reasons, f"{len(dead)} dead letters: {set(reasons)}"
