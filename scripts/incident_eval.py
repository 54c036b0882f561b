"""Offline evaluation of the incident layer: simulated fleet (ground truth) and SKAB (labels).

    .venv/bin/python scripts/incident_eval.py [--hours 1] [--normal-hours 24] [--devices 12]
        [--detector trainer|linear] [--skab ../shared/data/skab | --no-skab] [--json FILE]

Simulated fleet: a detector is trained on the fleet's normal history (the trainer's Keras
autoencoder with ``examples/trainer-synthetic.yaml``, threshold mean + 2·std — the card's
k = 2; cached in ``--out``/registry and reused), then

* an *anomalous* run: ``--hours`` of event time, 1 reading/s per device, every anomaly kind
  injected (``--anomaly-fraction``, ``--segment-length``), and
* a *normal* run: the ``--normal-hours`` that follow it, nothing injected,

are scored with ``worker.pipeline.Scorer`` (the worker's own path: decode, score,
contributions) in batches of 1024, and every incident configuration of the sweep is replayed
over the same scores. Per configuration:

* an injected *run* is one segment of consecutive anomalous readings of a device (segments
  never touch). It **opens** an incident if one opens at a reading inside it; it is
  **covered** if an incident already open at its start is still open; **exactly one** = one
  incident opened inside it.
* a **false incident** overlaps no injected run (its interval started → resolved, against the
  run's first → last reading). Rate per device-day = false incidents / (devices × days), on
  the normal run (and, separately, on the anomalous run).
* **time to open** = opened_at − run start; **time to resolve** = resolved_at − last reading
  of the run, for the incident opened in it.

SKAB: the per-point scores of ``scripts/skab_eval.py``'s protocol (one model per experiment,
trained on its first 400 rows, threshold mean + 2·std; cached as ``skab-scores.npz``), fed to
the same tracker, one experiment = one device at 1 reading/s: a labelled segment is
**detected** if an incident opens inside it; an incident overlapping no segment is false;
delay = opened_at − segment start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the repo's packages first

from detector import Detector, Registry, load  # noqa: E402
from simulator.fleet import (  # noqa: E402
    FleetSpec,
    Reading,
    feature_names,
    normal_matrix,
    stream,
    write_normal_csv,
)
from worker.config import EventSettings, ReadingSettings  # noqa: E402
from worker.incidents import (  # noqa: E402
    IncidentEvent,
    IncidentSettings,
    IncidentTracker,
    ScoredBatch,
)
from worker.pipeline import Scorer  # noqa: E402
from worker.records import SimpleRecord  # noqa: E402

BATCH = 1024
DAY_MS = 86_400_000


# ----------------------------------------------------------------------------- detectors


def fleet_detector(spec: FleetSpec, out: Path, kind: str) -> Detector:
    """The fleet's detector: trained once, then reused from ``out/registry``."""
    name = f"incident-eval-{kind}-s{spec.seed}-d{spec.devices}-f{spec.sensors}"
    reg = Registry(out / "registry")
    if reg.current_version(name):
        return load(reg.current_path(name))
    if kind == "linear":
        sys.path.insert(0, str(REPO / "tests"))
        from tests.support.detectors import linear_detector

        det = linear_detector(normal_matrix(spec, 40_000), feature_names(spec), code=4, name=name)
    else:
        import yaml

        from trainer.config import apply_overrides, from_mapping
        from trainer.pipeline import train

        csv = out / "fleet-normal.csv"
        write_normal_csv(csv, spec, 50_000)
        doc = yaml.safe_load((REPO / "examples" / "trainer-synthetic.yaml").read_text())
        doc = apply_overrides(
            doc,
            [
                f"data.path={csv}",
                f"name={name}",
                f"registry={out / 'registry'}",
                "evaluate.path=null",
                "report.dir=null",
            ],
        )
        t0 = time.process_time()
        det = train(from_mapping(doc), save=False).detector
        print(f"trained {name} in {time.process_time() - t0:.0f} s CPU", file=sys.stderr)
    reg.save(det)
    return load(reg.current_path(name))


# ----------------------------------------------------------------------------- scoring


@dataclass
class Scored:
    """Scores of one run, as the tracker sees them, plus the scoring CPU time."""

    batches: list[ScoredBatch]
    readings: int
    scorer_cpu_s: float
    per_reading_events: int


def score_readings(det: Detector, readings: Iterable[Reading], groups_pattern: str) -> Scored:
    """Score with ``worker.pipeline.Scorer`` and rebuild per-row columns from its result."""
    events = EventSettings(device_group_pattern=groups_pattern, top_sensors=5)
    scorer = Scorer(det, ReadingSettings(max_past_s=1e11, max_future_s=1e11), events)
    thr = float(det.threshold.value)
    out: list[ScoredBatch] = []
    cpu = 0.0
    n = 0
    n_events = 0
    for chunk in _chunks(readings, BATCH):
        recs = [
            SimpleRecord("fleet", 0, n + i, r.key(), r.to_json(), []) for i, r in enumerate(chunk)
        ]
        t0 = time.process_time()
        res = scorer.process(recs)
        cpu += time.process_time() - t0
        if res.dead_letters:
            raise SystemExit(f"{len(res.dead_letters)} readings were dead-lettered; check the spec")
        contrib: dict[int, list[Any]] = {}
        for m in res.events:
            doc = json.loads(m.value or b"")
            contrib[doc["source"]["offset"] - n] = [_C(**c) for c in doc["contributors"]]
        n_events += len(res.events)
        devs = [r.device_id for r in chunk]
        out.append(
            ScoredBatch(
                device_ids=devs,
                device_groups=[scorer.groups(d) for d in devs],
                ts_ms=np.array([r.timestamp_ms for r in chunk], dtype=np.int64),
                scores=np.asarray(res.score_ratio, dtype=np.float64) * thr,
                threshold=thr,
                topics=["fleet"] * len(chunk),
                partitions=np.zeros(len(chunk), dtype=np.int64),
                offsets=np.arange(n, n + len(chunk), dtype=np.int64),
                contributors=contrib,
                model_name=det.info.name,
                model_version=det.info.version,
            )
        )
        n += len(chunk)
    return Scored(out, n, cpu, n_events)


def save_scored(path: Path, sc: Scored) -> None:
    """Cache a run's scores (npz + JSON contributors; no pickle)."""
    devs = [d for b in sc.batches for d in b.device_ids]
    names = sorted(set(devs))
    code = {d: i for i, d in enumerate(names)}
    contrib = {
        str(int(b.offsets[j])): [asdict(c) for c in cs]
        for b in sc.batches
        for j, cs in b.contributors.items()
    }
    b0 = sc.batches[0]
    np.savez_compressed(
        path,
        names=np.array(names),
        dev=np.array([code[d] for d in devs], dtype=np.int32),
        groups=np.array([g for b in sc.batches for g in b.device_groups]),
        ts=np.concatenate([b.ts_ms for b in sc.batches]),
        scores=np.concatenate([b.scores for b in sc.batches]),
        meta=np.array(
            json.dumps(
                {
                    "threshold": b0.threshold,
                    "model": [b0.model_name, b0.model_version],
                    "scorer_cpu_s": sc.scorer_cpu_s,
                    "events": sc.per_reading_events,
                    "contrib": contrib,
                }
            )
        ),
    )


def load_scored(path: Path) -> Scored:
    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    names = [str(x) for x in z["names"]]
    dev, groups, ts, scores = z["dev"], z["groups"].tolist(), z["ts"], z["scores"]
    contrib = {int(k): [_C(**c) for c in v] for k, v in meta["contrib"].items()}
    batches = []
    for i in range(0, len(dev), BATCH):
        sl = slice(i, i + BATCH)
        n = len(dev[sl])
        batches.append(
            ScoredBatch(
                device_ids=[names[c] for c in dev[sl].tolist()],
                device_groups=groups[sl],
                ts_ms=ts[sl],
                scores=scores[sl],
                threshold=meta["threshold"],
                topics=["fleet"] * n,
                partitions=np.zeros(n, dtype=np.int64),
                offsets=np.arange(i, i + n, dtype=np.int64),
                contributors={o - i: contrib[o] for o in range(i, i + n) if o in contrib},
                model_name=meta["model"][0],
                model_version=meta["model"][1],
            )
        )
    return Scored(batches, len(dev), meta["scorer_cpu_s"], meta["events"])


def scored_cached(path: Path, make: Any) -> Scored:
    if path.is_file():
        return load_scored(path)
    sc: Scored = make()
    save_scored(path, sc)
    return sc


@dataclass(frozen=True)
class _C:
    sensor: str
    share: float
    value: float | None
    expected: float
    error_z: float = 0.0


def _chunks(it: Iterable[Reading], size: int) -> Iterator[list[Reading]]:
    buf: list[Reading] = []
    for r in it:
        buf.append(r)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


# ----------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class Run:
    device: str
    kind: str
    start_ms: int
    end_ms: int


def truth_runs(readings: Sequence[Reading], period_ms: int) -> list[Run]:
    """Segments of consecutive anomalous readings per device."""
    runs: list[Run] = []
    open_: dict[str, list[Any]] = {}
    for r in readings:
        cur = open_.get(r.device_id)
        if r.anomaly is None:
            if cur is not None:
                runs.append(Run(r.device_id, cur[0], cur[1], cur[2]))
                del open_[r.device_id]
            continue
        if cur is not None and r.timestamp_ms - cur[2] == period_ms and cur[0] == r.anomaly:
            cur[2] = r.timestamp_ms
        else:
            if cur is not None:
                runs.append(Run(r.device_id, cur[0], cur[1], cur[2]))
            open_[r.device_id] = [r.anomaly, r.timestamp_ms, r.timestamp_ms]
    runs.extend(Run(d, c[0], c[1], c[2]) for d, c in open_.items())
    return runs


# ----------------------------------------------------------------------------- replay


@dataclass
class Incident:
    device: str
    id: str
    started_ms: int
    opened_ms: int
    resolved_ms: int | None
    peak_ratio: float


def replay(settings: IncidentSettings, scored: Scored) -> tuple[list[Incident], float]:
    """Run the tracker over the scores; incidents and tracker CPU seconds."""
    tr = IncidentTracker(settings)
    evs: list[IncidentEvent] = []
    t0 = time.process_time()
    for b in scored.batches:
        evs += tr.process(b).events
    cpu = time.process_time() - t0
    by_id: dict[str, Incident] = {}
    for e in evs:
        inc = e.incident
        if e.state == "opened":
            if inc.id in by_id:
                raise AssertionError(f"incident {inc.id} opened twice")
            by_id[inc.id] = Incident(e.device_id, inc.id, inc.started_ms, inc.opened_ms, None, 0)
        cur = by_id[inc.id]
        cur.peak_ratio = inc.peak_ratio
        if e.state == "resolved":
            cur.resolved_ms = e.resolved_ms
    return list(by_id.values()), cpu


def _pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def count_false(
    inc_by_dev: dict[str, list[Incident]], runs_by_dev: dict[str, list[Run]], end_ms: int
) -> int:
    """Incidents whose started → resolved interval overlaps no injected run of the device."""
    false = 0
    for d, incs in inc_by_dev.items():
        for i in incs:
            end = i.resolved_ms if i.resolved_ms is not None else end_ms
            if not any(i.started_ms <= r.end_ms and end >= r.start_ms for r in runs_by_dev[d]):
                false += 1
    return false


def fleet_metrics(
    incidents: Sequence[Incident], runs: Sequence[Run], device_days: float, end_ms: int
) -> dict[str, Any]:
    runs_by_dev: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        runs_by_dev[r.device].append(r)
    inc_by_dev: dict[str, list[Incident]] = defaultdict(list)
    for i in incidents:
        inc_by_dev[i.device].append(i)
    exactly, more, missed, covered = 0, 0, 0, 0
    t_open: list[float] = []
    t_resolve: list[float] = []
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # [runs, opened or covered]
    for r in runs:
        incs = inc_by_dev[r.device]
        opened = [i for i in incs if r.start_ms <= i.opened_ms <= r.end_ms]
        cov = any(
            i.opened_ms < r.start_ms and (i.resolved_ms is None or i.resolved_ms >= r.start_ms)
            for i in incs
        )
        per_kind[r.kind][0] += 1
        if opened or cov:
            per_kind[r.kind][1] += 1
        if len(opened) == 1:
            exactly += 1
        elif len(opened) > 1:
            more += 1
        elif cov:
            covered += 1
        else:
            missed += 1
        if opened:
            first = min(opened, key=lambda i: i.opened_ms)
            t_open.append((first.opened_ms - r.start_ms) / 1000)
            if first.resolved_ms is not None:
                t_resolve.append((first.resolved_ms - r.end_ms) / 1000)
    false = count_false(inc_by_dev, runs_by_dev, end_ms)
    return {
        "runs": len(runs),
        "exactly_one": exactly,
        "more_than_one": more,
        "covered_only": covered,
        "missed": missed,
        "recall": (exactly + more + covered) / len(runs) if runs else None,
        "incidents": len(incidents),
        "false_incidents": false,
        "false_per_device_day": false / device_days if device_days else None,
        "open_p50_s": _pct(t_open, 50),
        "open_p95_s": _pct(t_open, 95),
        "resolve_p50_s": _pct(t_resolve, 50),
        "resolve_p95_s": _pct(t_resolve, 95),
        "per_kind": {k: {"runs": v[0], "detected": v[1]} for k, v in sorted(per_kind.items())},
    }


# ----------------------------------------------------------------------------- the sweep


def sweep_settings(default: IncidentSettings) -> list[tuple[str, IncidentSettings]]:
    """The configurations compared, the project default first."""
    d = default
    plain = replace(d, open_ratio=0.0, min_peak_ratio=1.0, min_mean_ratio=1.0)
    out = [("default", d)]
    for n, k in ((1, 1), (3, 2), (5, 3), (10, 3), (10, 5)):
        out.append((f"{k} in {n} s only", replace(plain, window_s=float(n), min_anomalous=k)))
    for p in (3.0, 5.0, 8.0):
        out.append((f"3 in 10 s, peak >= {p:g}", replace(plain, min_peak_ratio=p)))
    for m in (2.0, 3.0, 4.0, 5.0):
        out.append((f"3 in 10 s, mean >= {m:g}", replace(plain, min_mean_ratio=m)))
    for r in (5.0, 8.0, 10.0, 15.0):
        # k-of-n off (no stretch reaches a peak of 1e9): single readings only.
        out.append((f"one reading >= {r:g} only", replace(plain, min_peak_ratio=1e9, open_ratio=r)))
    for k, n, m, r in ((3, 10, 3.0, 10.0), (3, 10, 4.0, 10.0), (5, 10, 3.0, 10.0)):
        out.append(
            (
                f"{k} in {n} s mean >= {m:g}, or one >= {r:g}",
                replace(plain, window_s=float(n), min_anomalous=k, min_mean_ratio=m, open_ratio=r),
            )
        )
    out.append(("default + min_duration 3 s", replace(d, min_duration_s=3.0)))
    for m, t in ((3, 30.0), (5, 30.0), (30, 120.0)):
        out.append(
            (
                f"default, resolve {m} normal / {t:g} s",
                replace(d, resolve_normal_readings=m, resolve_quiet_s=t),
            )
        )
    out.append(("default, cooldown 0", replace(d, cooldown_s=0.0)))
    out.append(("default, cooldown 60 s", replace(d, cooldown_s=60.0)))
    return out


def fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


# ----------------------------------------------------------------------------- SKAB


def skab_linear_scores(skab: Path) -> dict[str, dict[str, Any]]:
    """Per-point scores of a PCA (linear autoencoder) detector per experiment: seconds, not minutes.

    Same protocol as ``skab_eval.py`` (fit on rows [0, 400), score the rest), same Detector
    class and threshold rule (mean + 2·std of held-out normal error: the last 100 of the 400
    rows); the model is ``tests/support/detectors.linear_detector`` (code size 3, like the
    trainer's SKAB config), not the trainer's Keras autoencoder.
    """
    sys.path.insert(0, str(REPO / "scripts"))
    import skab_eval

    from tests.support.detectors import linear_detector

    results: dict[str, dict[str, Any]] = {}
    for exp in skab_eval.EXPERIMENTS:
        stamps, x, y = skab_eval.load_experiment(skab / "data" / exp)
        train_x = x[: skab_eval.TRAIN_ROWS]
        keep = train_x.std(axis=0) > 0  # constant columns: dropped, as the trainer does
        det = linear_detector(train_x[:, keep], [f"f{i}" for i in range(int(keep.sum()))], code=3)
        score = det.score(x[skab_eval.TRAIN_ROWS :, keep]).score
        ts = np.array(
            [
                int(datetime.fromisoformat(t).timestamp() * 1000)
                for t in stamps[skab_eval.TRAIN_ROWS :]
            ],
            dtype=np.int64,
        )
        results[exp] = {
            "ratio": score / det.threshold.value,
            "labels": y[skab_eval.TRAIN_ROWS :].astype(np.int8),
            "ts_ms": ts,
        }
    return results


def skab_scores(skab: Path, out: Path, jobs: int) -> dict[str, dict[str, Any]]:
    """Per-point scores (÷ the k = 2 threshold) and labels of the 34 SKAB test parts (cached)."""
    cache = out / "skab-scores.npz"
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        names = [str(s) for s in z["names"]]
        return {
            n: {"ratio": z[f"ratio_{i}"], "labels": z[f"labels_{i}"], "ts_ms": z[f"ts_{i}"]}
            for i, n in enumerate(names)
        }
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    sys.path.insert(0, str(REPO / "scripts"))
    import skab_eval
    import yaml

    from trainer.config import apply_overrides

    base = yaml.safe_load((REPO / "examples" / "trainer-skab.yaml").read_text())
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        docs = [
            apply_overrides(
                base,
                [
                    f"data.path={skab / 'data' / exp}",
                    f"data.rows=[0, {skab_eval.TRAIN_ROWS}]",
                    "evaluate.path=null",
                    "report.dir=null",
                    "report.plots=false",
                    f"registry={tmp}",
                ],
            )
            for exp in skab_eval.EXPERIMENTS
        ]
        pairs = list(zip(skab_eval.EXPERIMENTS, docs, strict=True))
        if jobs <= 1:
            skab_eval._worker_init()  # one TensorFlow thread: the machine is shared
            for exp, doc in pairs:
                results[exp] = _skab_one(skab / "data" / exp, doc)
                print(f"skab {exp} scored", file=sys.stderr, flush=True)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                jobs, mp_context=ctx, initializer=skab_eval._worker_init
            ) as pool:
                futs = [pool.submit(_skab_one, skab / "data" / exp, doc) for exp, doc in pairs]
                for (exp, _), fut in zip(pairs, futs, strict=True):
                    results[exp] = fut.result()
                    print(f"skab {exp} scored", file=sys.stderr, flush=True)
    arrays: dict[str, Any] = {"names": np.array(list(results))}
    for i, r in enumerate(results.values()):
        arrays[f"ratio_{i}"], arrays[f"labels_{i}"], arrays[f"ts_{i}"] = (
            r["ratio"],
            r["labels"],
            r["ts_ms"],
        )
    np.savez_compressed(cache, **arrays)
    return results


def _skab_one(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "scripts"))
    import skab_eval

    from trainer.config import from_mapping
    from trainer.pipeline import train

    res = train(from_mapping(doc), save=False)
    stamps, x, y = skab_eval.load_experiment(path)
    t = res.detector.threshold
    score = res.detector.score(x[skab_eval.TRAIN_ROWS :]).score
    thr = t.error_mean + 2 * t.error_std
    ts = np.array(
        [int(datetime.fromisoformat(s).timestamp() * 1000) for s in stamps[skab_eval.TRAIN_ROWS :]],
        dtype=np.int64,
    )
    return {"ratio": score / thr, "labels": y[skab_eval.TRAIN_ROWS :].astype(np.int8), "ts_ms": ts}


def skab_segments(labels: np.ndarray, ts: np.ndarray) -> list[tuple[int, int]]:
    segs: list[tuple[int, int]] = []
    start = None
    for j, v in enumerate(labels.tolist()):
        if v and start is None:
            start = j
        if not v and start is not None:
            segs.append((int(ts[start]), int(ts[j - 1])))
            start = None
    if start is not None:
        segs.append((int(ts[start]), int(ts[-1])))
    return segs


def skab_metrics(settings: IncidentSettings, data: dict[str, dict[str, Any]]) -> dict[str, Any]:
    detected = 0
    segments = 0
    false = 0
    delays: list[float] = []
    incidents = 0
    hours = 0.0
    for i, (name, d) in enumerate(data.items()):
        ratio, ts = d["ratio"], d["ts_ms"]
        ok = np.isfinite(ratio)
        n = len(ratio)
        b = ScoredBatch(
            device_ids=[name] * n,
            device_groups=["skab"] * n,
            ts_ms=ts,
            # A NaN score (none expected) counts as anomalous, as in skab_eval.py.
            scores=np.where(ok, ratio, 1e9).astype(np.float64),
            threshold=1.0,
            topics=["skab"] * n,
            partitions=np.full(n, i, dtype=np.int64),
            offsets=np.arange(n, dtype=np.int64),
            contributors={},
            model_name="skab",
            model_version="k2",
        )
        tr = IncidentTracker(settings)
        evs = tr.process(b).events + tr.expire(int(ts[-1]) + 10**9).events
        opened = [e for e in evs if e.state == "opened"]
        ends = {e.incident.id: e.resolved_ms for e in evs if e.state == "resolved"}
        incidents += len(opened)
        hours += (int(ts[-1]) - int(ts[0])) / 3_600_000
        segs = skab_segments(d["labels"], ts)
        segments += len(segs)
        for s0, s1 in segs:
            inside = [e for e in opened if s0 <= e.incident.opened_ms <= s1]
            if inside:
                detected += 1
                delays.append((min(e.incident.opened_ms for e in inside) - s0) / 1000)
        for e in opened:
            end = ends.get(e.incident.id) or int(ts[-1])
            if not any(e.incident.started_ms <= s1 and end >= s0 for s0, s1 in segs):
                false += 1
    return {
        "segments": segments,
        "detected": detected,
        "incidents": incidents,
        "false_incidents": false,
        "false_per_hour": false / hours if hours else None,
        "delay_p50_s": _pct(delays, 50),
        "delay_p95_s": _pct(delays, 95),
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=12)
    p.add_argument("--sensors", type=int, default=16)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--hours", type=float, default=1.0, help="event time of the anomalous run")
    p.add_argument("--normal-hours", type=float, default=24.0, help="event time of the normal run")
    p.add_argument("--anomaly-fraction", type=float, default=0.02)
    p.add_argument("--segment-length", type=int, default=10)
    p.add_argument("--magnitude", type=float, default=1.0, help="simulator anomaly magnitude")
    p.add_argument("--detector", choices=("trainer", "linear"), default="trainer")
    p.add_argument("--out", type=Path, default=REPO / "out" / "incident-eval")
    p.add_argument("--skab", type=Path, default=REPO.parent / "shared" / "data" / "skab")
    p.add_argument("--no-skab", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="SKAB training processes")
    p.add_argument(
        "--skab-detector",
        choices=("trainer", "linear"),
        default="trainer",
        help="SKAB per-point scores: the trainer's autoencoder (34 trainings, minutes) or a "
        "PCA detector (seconds)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.hours > 0 and args.normal_hours >= 0 and 1 <= args.devices <= 1000):
        p.error("--hours > 0, --normal-hours >= 0 and --devices in 1..1000")

    spec = FleetSpec(devices=args.devices, sensors=args.sensors, seed=args.seed, period_ms=1000)
    det = fleet_detector(spec, args.out, args.detector)
    per_dev = round(args.hours * 3600)
    print(f"detector {det.info.name} {det.info.version}: threshold {det.threshold.value:.5g}")
    readings = list(
        stream(
            spec,
            per_dev,
            anomaly_fraction=args.anomaly_fraction,
            segment_length=args.segment_length,
            magnitude=args.magnitude,
        )
    )
    runs = truth_runs(readings, spec.period_ms)
    kinds = sorted({r.kind for r in runs})
    print(
        f"anomalous run: {len(readings)} readings ({args.devices} devices x {per_dev} s), "
        f"{len(runs)} injected runs of kinds {kinds}"
    )
    tag = (
        f"{det.info.name}-{det.info.version}-h{args.hours:g}-f{args.anomaly_fraction:g}"
        f"-l{args.segment_length}-m{args.magnitude:g}"
    )
    anom = scored_cached(
        args.out / f"scored-{tag}.npz", lambda: score_readings(det, readings, r"^([A-Za-z]+)")
    )
    end_anom = int(readings[-1].timestamp_ms)
    normal_spec = replace(spec, start_ms=spec.start_ms + per_dev * spec.period_ms)
    per_dev_n = round(args.normal_hours * 3600)
    ntag = f"{det.info.name}-{det.info.version}-from{normal_spec.start_ms}-n{per_dev_n}"
    normal = (
        scored_cached(
            args.out / f"scored-normal-{ntag}.npz",
            lambda: score_readings(det, stream(normal_spec, per_dev_n), r"^([A-Za-z]+)"),
        )
        if per_dev_n
        else None
    )
    dd_anom = args.devices * per_dev / 86400
    dd_norm = args.devices * per_dev_n / 86400
    if normal is not None:
        fa = normal.per_reading_events / max(normal.readings, 1)
        print(
            f"normal run: {normal.readings} readings ({dd_norm:.1f} device-days); per-reading "
            f"anomaly events (today's alerts): {normal.per_reading_events} = {100 * fa:.2f} % "
            f"of readings = {normal.per_reading_events / dd_norm:.0f} per device-day"
        )

    results: list[dict[str, Any]] = []
    cpu_ratio: list[float] = []
    for label, s in sweep_settings(IncidentSettings()):
        incs, _ = replay(s, anom)
        m = fleet_metrics(incs, runs, dd_anom, end_anom)
        row: dict[str, Any] = {"config": label, "settings": asdict(s), "fleet": m}
        if normal is not None:
            incs_n, cpu_n = replay(s, normal)
            row["normal"] = fleet_metrics(incs_n, [], dd_norm, 0)
            cpu_ratio.append(cpu_n / normal.scorer_cpu_s)
        results.append(row)

    print(
        "\n| config | runs | exactly one | >1 | missed | false / device-day (normal run) "
        "| false (anomalous run) | open p50 / p95 s | resolve p50 / p95 s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results:
        m = row["fleet"]
        nm = row.get("normal", {})
        print(
            f"| {row['config']} | {m['runs']} | {m['exactly_one']} | {m['more_than_one']} | "
            f"{m['missed'] + 0} | {fmt(nm.get('false_per_device_day'))} "
            f"({nm.get('false_incidents', '-')}) | {m['false_incidents']} | "
            f"{fmt(m['open_p50_s'], '.0f')} / {fmt(m['open_p95_s'], '.0f')} | "
            f"{fmt(m['resolve_p50_s'], '.0f')} / {fmt(m['resolve_p95_s'], '.0f')} |"
        )
    d = results[0]["fleet"]
    print("\nper kind (default):", json.dumps(d["per_kind"]))
    if cpu_ratio:
        print(
            "tracker CPU / Scorer CPU per reading (normal run): "
            f"default {100 * cpu_ratio[0]:.1f} %, range {100 * min(cpu_ratio):.1f}-"
            f"{100 * max(cpu_ratio):.1f} % over the sweep"
        )

    skab_rows: list[dict[str, Any]] = []
    if not args.no_skab and (args.skab / "data").is_dir():
        if args.skab_detector == "linear":
            data = skab_linear_scores(args.skab)
        else:
            data = skab_scores(args.skab, args.out, args.jobs)
        print(
            f"\nSKAB ({args.skab_detector} detector per experiment, threshold mean + 2·std, "
            "one incident tracker per file):"
        )
        pts = np.concatenate([d["ratio"] > 1 for d in data.values()])
        lab = np.concatenate([d["labels"] for d in data.values()])
        tp, fp = int((pts & (lab == 1)).sum()), int((pts & (lab == 0)).sum())
        fn, tn = int((~pts & (lab == 1)).sum()), int((~pts & (lab == 0)).sum())
        print(
            f"per point: F1 {tp / (tp + (fn + fp) / 2):.2f}, FAR {100 * fp / (fp + tn):.2f} %, "
            f"MAR {100 * fn / (fn + tp):.2f} % (pooled as skab_eval.py does)"
        )
        print(
            "| config | segments detected | incidents | false incidents (per hour) "
            "| delay p50 / p95 s |"
        )
        print("|---|---|---|---|---|")
        for label, s in sweep_settings(IncidentSettings()):
            m = skab_metrics(s, data)
            skab_rows.append({"config": label, "skab": m})
            print(
                f"| {label} | {m['detected']}/{m['segments']} | {m['incidents']} | "
                f"{m['false_incidents']} ({fmt(m['false_per_hour'])}) | "
                f"{fmt(m['delay_p50_s'], '.0f')} / {fmt(m['delay_p95_s'], '.0f')} |"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"fleet": results, "skab": skab_rows, "args": vars(args) | {"out": str(args.out)}},
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
