"""The worker's liveness and readiness verdicts (served by :mod:`worker.health`).

Readiness means "a member of the group and able to work": a model is loaded, the consumer
is a stable group member (with any assignment, including none: a standby worker in a group
with more members than partitions is ready), the broker answers, outputs are being
acknowledged, no input topic is missing, and the worker is not stopping.

Liveness fails (so an orchestrator restarts the worker) when the loop has not iterated for
``stall_after_s``, when it owns partitions with records waiting but has consumed nothing for
``stall_after_s``, or when the consumer has not been a stable group member for
``rejoin_stuck_s`` (a join or sync that never completes; a healthy rejoin takes at most the
group's rebalance timeout, ``kafka.max_poll_interval_ms``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from worker.health import HealthState


@dataclass
class WorkerStatus(HealthState):
    rejoin_stuck_s: float = 120.0
    member_stable: bool = False
    unstable_since: float | None = field(default_factory=time.monotonic)
    assignment: tuple[str, ...] = ()
    delivery_ok: bool = True
    problem: str = ""  # one line: why not ready (missing topic, delivery failing, ...)
    # Records waiting in owned partitions (from the last lag refresh) and when the loop last
    # consumed any: a member that owns work but consumes nothing for stall_after_s is stuck
    # (seen once after many broker restarts: assigned, then silent for minutes).
    lag: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    drift: dict[str, Any] = field(default_factory=dict)  # DriftWindow's latest verdict

    def progress(self) -> None:
        self.last_progress = time.monotonic()  # a float store is atomic in CPython

    def set_member(self, stable: bool) -> None:
        with self._lock:
            if stable:
                self.unstable_since = None
            elif self.member_stable or self.unstable_since is None:
                self.unstable_since = time.monotonic()
            self.member_stable = stable

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        ok, facts = super().liveness()
        with self._lock:
            since = self.unstable_since
        idle = time.monotonic() - self.last_progress
        working = self.broker_ok and self.delivery_ok and not self.stopping
        if self.lag > 0 and working and idle > self.stall_after_s:
            ok = False
            facts["reason"] = (
                f"{self.lag} records waiting in owned partitions but nothing consumed for "
                f"{idle:.0f}s (limit {self.stall_after_s:.0f}s)"
            )
        if since is not None and not self.stopping:
            out = time.monotonic() - since
            facts["not_group_member_s"] = round(out, 1)
            if out > self.rejoin_stuck_s:
                ok = False
                facts["reason"] = (
                    f"not a stable group member for {out:.0f}s (limit {self.rejoin_stuck_s:.0f}s)"
                )
        return ok, facts

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        alive, live = self.liveness()
        with self._lock:
            facts: dict[str, Any] = {
                "model_version": self.model_version or None,
                "group_member": self.member_stable,
                "assigned_partitions": self.assigned_partitions,
                "assignment": list(self.assignment),
                "standby": self.member_stable and self.assigned_partitions == 0,
                "broker_ok": self.broker_ok,
                "delivery_ok": self.delivery_ok,
                "stopping": self.stopping,
                # Shown, not a readiness condition: a drifting model still scores.
                "drift": dict(self.drift) or None,
            }
            reasons = []
            if not self.model_version:
                reasons.append("no model loaded")
            if not self.member_stable:
                reasons.append("not (yet) a stable consumer-group member")
            if not self.broker_ok:
                reasons.append("broker not answering")
            if not self.delivery_ok:
                reasons.append("outputs not being acknowledged")
            if self.problem:
                reasons.append(self.problem)
            if self.stopping:
                reasons.append("stopping")
        if not alive:
            reasons.append(str(live.get("reason", "loop stalled")))
        if reasons:
            facts["reason"] = "; ".join(reasons)
        return not reasons, {**facts, **live}


class DriftWindow:
    """The ``drift`` state in ``/readyz``: the last ``size`` scored readings against training.

    ``drifting`` when more than ``max_out_of_range`` of them carry a feature outside the
    training range, or their above-threshold share exceeds ``max_rate_ratio`` × the holdout's
    expected share (the same signals as the drift metrics and alert rules).
    """

    def __init__(
        self,
        on_change: Any,
        size: int = 5000,
        max_out_of_range: float = 0.5,
        max_rate_ratio: float = 5.0,
    ) -> None:
        self._on_change = on_change
        self.size = size
        self.max_out_of_range = max_out_of_range
        self.max_rate_ratio = max_rate_ratio
        self._chunks: list[tuple[int, int, int]] = []  # (scored, out of range, above)
        self._expected = float("nan")

    def add(self, result: Any) -> None:
        scored = int(getattr(result, "scored", 0))
        if not scored:
            return
        oor = sum(getattr(result, "out_of_range_by_group", {}).values())
        above = sum(getattr(result, "above_threshold_by_group", {}).values())
        self._expected = float(getattr(result, "expected_rate", float("nan")))
        self._chunks.append((scored, oor, above))
        n = sum(c[0] for c in self._chunks)
        while self._chunks and n - self._chunks[0][0] >= self.size:
            n -= self._chunks.pop(0)[0]
        o = sum(c[1] for c in self._chunks) / n
        a = sum(c[2] for c in self._chunks) / n
        exp = self._expected
        ratio = a / exp if exp == exp and exp > 0 else None
        drifting = o > self.max_out_of_range or (ratio is not None and ratio > self.max_rate_ratio)
        self._on_change(
            {
                "state": "drifting" if drifting else "ok",
                "readings": n,
                "out_of_range_share": round(o, 4),
                "above_threshold_share": round(a, 4),
                "expected_share": None if exp != exp else round(exp, 4),
            }
        )
