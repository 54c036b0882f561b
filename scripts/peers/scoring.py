"""What both peers score with: the bench's artifact, the project's numpy ``Detector``.

Imports only numpy, msgspec and the project's ``detector`` package (numpy only), so it runs
in the peers' own venv with the repository on ``sys.path``. Decisions are the worker's for a
per-point model without smoothing or watched constants (the bench's model): anomalous when
the reconstruction score is finite and above ``threshold.value``; one event per anomalous
reading, ``event_id`` = ``topic/partition/offset`` like the worker's, so the bench compares
distinct event ids. Models the worker would treat differently (windows, smoothing, watched
constants) are refused rather than mis-scored.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from detector import Detector, Registry, Scores, load  # noqa: E402

TOP = 5  # the worker's events.top_sensors default
MIN_SHARE = 0.02  # the worker's events.min_share default


class Reading(msgspec.Struct, gc=False):
    device_id: str
    timestamp: int
    values: dict[str, float]


def load_detector(registry: str | Path, name: str = "sensors") -> Detector:
    det = load(Registry(registry).current_path(name))
    if det.window != 1 or det.ewma_alpha is not None or det.constants:
        raise SystemExit(
            "the peers score per-point models without smoothing or watched constants only "
            f"(window {det.window}, ewma {det.ewma_alpha}, constants {len(det.constants)})"
        )
    return det


def event(
    det: Detector,
    topic: str,
    partition: int,
    offset: int,
    device_id: str,
    ts_ms: int,
    score: float,
    contributors: list[Any],
) -> dict[str, Any]:
    """The peer's anomaly event (a subset of the worker's schema)."""
    thr = det.threshold.value
    return {
        "event_id": f"{topic}/{partition}/{offset}",
        "device_id": device_id,
        "reading_timestamp_ms": ts_ms,
        "score": score,
        "threshold": thr,
        "score_ratio": score / thr,
        "contributors": [
            {
                "sensor": c.sensor,
                "share": round(c.share, 6),
                "value": c.value,
                "expected": c.expected,
                "error_z": round(c.error_z, 3),
            }
            for c in contributors
        ],
    }


def hot_rows(det: Detector, scores: Scores) -> npt.NDArray[np.intp]:
    s = scores.score
    return np.flatnonzero(np.isfinite(s) & (s > det.threshold.value))
