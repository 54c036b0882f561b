"""Detection quality of each scoring mode on the simulated fleet (docs/detection.md).

    python -m trainer.fleet_eval [--json out/fleet-eval.json] [--modes point,point+ewma,...]

For each mode a model is trained with ``examples/trainer-synthetic.yaml`` (but the
chronological split, for every mode) on the demo
fleet's normal history (12 pumps × 16 sensors, seed 42, 60,000 rows, as ``make demo``),
and scored offline exactly as the worker decides (:func:`detector.offline.score_rows`:
per-device windows and smoothing) on two labelled streams:

- ``demo``: 500 readings per pump, 5 % injected anomalies of every kind (``make demo``'s);
- ``drift``: a long run, 5,000 readings per pump with 1 % injected anomalies, *plus a slow
  drift in normal operation*: on every pump two sensors ramp linearly to +1.5 σ (their
  normal std) by the end of the run. The ramp is labelled normal: a detector should not
  alarm on it (it is how real plants age), and false alarms on it count.

Reported per mode and stream: false alarms per 1,000 normal readings (readings the model
scored), reading-level recall per anomaly kind, segment-level recall per kind (a segment is
detected when any of its readings is flagged) and the first-reading delay. Rows a windowed
model cannot score yet (a pump's first ``w - 1`` readings) are left out of both counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detector.offline import score_rows
from simulator.fleet import FleetSpec, feature_names, sensor_profiles, stream, write_normal_csv
from trainer.config import apply_overrides, from_mapping
from trainer.pipeline import train

REPO = Path(__file__).resolve().parents[1]
SPEC = FleetSpec(devices=12, sensors=16, seed=42)
MODES: dict[str, list[str]] = {
    "point": [],
    "point+ewma0.3": ["scoring.ewma_alpha=0.3"],
    "window5": ["model.window=5"],
    "window10": ["model.window=10"],
    "window10+ewma0.3": ["model.window=10", "scoring.ewma_alpha=0.3"],
}
DRIFT_SENSORS = (1, 6)
DRIFT_SIGMA = 1.5


def labelled_stream(
    per_device: int, fraction: float, drift: bool
) -> tuple[np.ndarray, list[str], list[str | None]]:
    """Values (n, d), device ids and anomaly kinds (None = normal) of a simulated stream."""
    names = feature_names(SPEC)
    rows = list(stream(SPEC, per_device, anomaly_fraction=fraction))
    x = np.array([[r.values[n] for n in names] for r in rows])
    devs = [r.device_id for r in rows]
    kinds = [r.anomaly for r in rows]
    if drift:
        std = np.array([p.std for p in sensor_profiles(SPEC)])
        step = np.array([r.timestamp_ms for r in rows], dtype=np.float64)
        frac = (step - step.min()) / max(1.0, step.max() - step.min())
        for s in DRIFT_SENSORS:
            x[:, s] += DRIFT_SIGMA * std[s] * frac
    return x, devs, kinds


def quality(
    flagged: np.ndarray, scored: np.ndarray, devs: list[str], kinds: list[str | None]
) -> dict[str, Any]:
    """False alarms per 1,000 normal readings and recall per kind (readings and segments)."""
    normal = np.array([k is None for k in kinds]) & scored
    out: dict[str, Any] = {
        "normal_scored": int(normal.sum()),
        "false_alarms_per_1000": round(1000 * float(flagged[normal].mean()), 2),
    }
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for f, k, sc in zip(flagged.tolist(), kinds, scored.tolist(), strict=True):
        if k is not None and sc:
            by_kind[k].append(f)
    out["reading_recall"] = {k: round(float(np.mean(v)), 3) for k, v in sorted(by_kind.items())}
    # Segments: consecutive anomalous readings of one device with the same kind.
    segs: dict[str, list[tuple[bool, int]]] = defaultdict(list)
    current: dict[str, tuple[str, list[bool]]] = {}

    def close(dev: str) -> None:
        if dev in current:
            kind, fl = current.pop(dev)
            hit = any(fl)
            segs[kind].append((hit, fl.index(True) if hit else -1))

    for i, (dev, k) in enumerate(zip(devs, kinds, strict=True)):
        if not scored[i]:
            continue
        if k is None or (dev in current and current[dev][0] != k):
            close(dev)
        if k is not None:
            current.setdefault(dev, (k, []))[1].append(bool(flagged[i]))
    for dev in list(current):
        close(dev)
    out["segment_recall"] = {
        k: round(float(np.mean([h for h, _ in v])), 3) for k, v in sorted(segs.items())
    }
    out["mean_delay_readings"] = {
        k: round(float(np.mean([d for h, d in v if h])), 2) if any(h for h, _ in v) else None
        for k, v in sorted(segs.items())
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    p.add_argument("--json", type=Path)
    p.add_argument("--rows", type=int, default=60_000, help="normal training rows")
    p.add_argument(
        "--random-split",
        action="store_true",
        help="the example config's random split instead (per-point modes only)",
    )
    a = p.parse_args(argv)
    base = yaml.safe_load((REPO / "examples" / "trainer-synthetic.yaml").read_text())
    streams = {
        "demo": labelled_stream(500, 0.05, drift=False),
        "drift": labelled_stream(5000, 0.01, drift=True),
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        train_csv = Path(tmp) / "train.csv"
        write_normal_csv(train_csv, SPEC, a.rows)
        for mode in a.modes.split(","):
            doc = apply_overrides(
                base,
                [
                    f"data.path={train_csv}",
                    "evaluate.path=null",
                    "report.dir=null",
                    "report.plots=false",
                    f"registry={tmp}/registry",
                    # Every mode on the same chronological split (windows and smoothing
                    # need one; the example config's random split would differ per mode).
                    f"split.shuffle={'true' if a.random_split else 'false'}",
                    *MODES[mode],
                ],
            )
            t0 = time.process_time()
            res = train(from_mapping(doc), save=False)
            fit_cpu = time.process_time() - t0
            det = res.detector
            row: dict[str, Any] = {
                "window": det.window,
                "ewma_alpha": det.ewma_alpha,
                "architecture": res.metrics["model"]["architecture"],
                "epochs": len(res.history.loss),
                "stopped_at_cap": not res.history.stopped_early,
                "train_cpu_s": round(fit_cpu, 1),
                "train_cpu_us_per_row": round(1e6 * fit_cpu / a.rows, 1),
                "threshold": det.threshold.value,
            }
            for name, (x, devs, kinds) in streams.items():
                rs = score_rows(det, x, devs)
                row[name] = quality(rs.anomalous, rs.scored, devs, kinds)
            results[mode] = row
            print(json.dumps({mode: row}), file=sys.stderr, flush=True)
    print(
        "| mode | stream | FA / 1000 normal | "
        + " | ".join(
            f"{k} (readings / segments)"
            for k in sorted(results[next(iter(results))]["demo"]["reading_recall"])
        )
        + " |"
    )
    for mode, row in results.items():
        for name in streams:
            q = row[name]
            cells = [
                f"{q['reading_recall'][k]:.2f} / {q['segment_recall'][k]:.2f}"
                for k in sorted(q["reading_recall"])
            ]
            print(
                f"| {mode} | {name} | {q['false_alarms_per_1000']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
