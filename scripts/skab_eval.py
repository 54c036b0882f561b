"""SKAB benchmark of the trainer's dense autoencoder, by the benchmark's own protocol.

    .venv/bin/python scripts/skab_eval.py [--skab ../shared/data/skab] [--set key=value ...]
                                          [--json out/skab.json]

Protocol (``shared/data/skab/SOURCE.md``): one model per experiment file (34 files), fitted
on the file's first 400 rows (no shuffling), scoring the remaining rows; true/false
positives/negatives are pooled point by point over all 34 test parts, and

    F1 = TP / (TP + (FN + FP) / 2),  FAR = FP / (FP + TN) · 100,  MAR = FN / (FN + TP) · 100.

Each model is trained by :func:`trainer.pipeline.train` with ``examples/trainer-skab.yaml``
(plus ``--set`` overrides) on rows ``[0, 400)`` of the file: the 400 rows are split
chronologically into train / validation / threshold-holdout, so the threshold (mean + k·std,
k = 2) is fitted on the last 60 of the 400 normal rows, which the model never fitted.

Before scoring our model, the metric code is checked against the published methods'
predictions in ``reference_predictions/``: pooling them must reproduce the leaderboard
(Conv-AE 0.78 / 13.55 / 28.02); the script exits 1 if it does not.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from detector import fit_threshold
from detector.offline import score_rows
from detector.smoothing import ewma_series
from trainer.config import apply_overrides, from_mapping
from trainer.data import read_csv, select
from trainer.evaluate import confusion, rates
from trainer.pipeline import train

REPO = Path(__file__).resolve().parents[1]

TRAIN_ROWS = 400
EXPERIMENTS = (
    [f"valve1/{i}.csv" for i in range(16)]
    + [f"valve2/{i}.csv" for i in range(4)]
    + [f"other/{i}.csv" for i in range(1, 15)]
)
# Published leaderboard (SOURCE.md): prediction file stem -> (name, F1, FAR %, MAR %).
PUBLISHED = {
    "Conv_AE": ("Conv-AE (60-step windows)", 0.78, 13.55, 28.02),
    "MSET": ("MSET", 0.78, 39.73, 14.13),
    "T2-q": ("T-squared + Q (PCA)", 0.76, 26.62, 24.92),
    "LSTM_AE": ("LSTM-AE (10-step windows)", 0.74, 29.96, 25.92),
    "T2": ("T-squared", 0.66, 19.21, 42.60),
    "Vanilla_LSTM": ("Vanilla LSTM", 0.54, 12.54, 59.53),
    "Vanilla_AE": ("Vanilla AE (dense, per-point)", 0.39, 2.59, 75.15),
    "MSCRED": ("MSCRED", 0.36, 49.94, 69.88),
    "Isolation_Forest": ("Isolation forest", 0.29, 2.56, 82.89),
    "Arima_anomaly_detection": ("ARIMA (not in the published table)", None, None, None),
}


def load_experiment(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Datetimes, sensor matrix and 0/1 labels of one SKAB file, via the trainer's reader."""
    table = read_csv(path)
    ds = select(
        table, None, exclude=("changepoint",), timestamp_column="datetime", label_column="anomaly"
    )
    assert ds.labels is not None
    return [str(v) for v in table.cells["datetime"]], ds.x, ds.labels


def pooled(counts: list[dict[str, int]]) -> dict[str, float]:
    total = {k: sum(c[k] for c in counts) for k in ("tp", "fp", "fn", "tn")}
    return rates(total) | total  # type: ignore[operator]


def check_reference(
    skab: Path, tests: dict[str, tuple[list[str], np.ndarray]]
) -> list[dict[str, Any]]:
    """Pool every published method's predictions with our metric code."""
    out = []
    for stem, (name, f1, far, mar) in PUBLISHED.items():
        path = skab / "reference_predictions" / f"{stem}.csv.gz"
        if not path.is_file():
            continue
        preds: dict[str, list[tuple[str, float]]] = defaultdict(list)
        with gzip.open(path, "rt", newline="") as f:
            for row in csv.DictReader(f):
                preds[row["file"].removeprefix("data/")].append(
                    (row["datetime"], float(row["pred"]))
                )
        counts = []
        covered = 0
        for exp, (stamps, labels) in tests.items():
            # Windowed methods (Vanilla LSTM, MSCRED) predict no label for the first rows
            # of a test part; they are scored on the rows they predicted, as published.
            label_at = dict(zip(stamps, labels.tolist(), strict=True))
            got = preds[exp]
            if any(d not in label_at for d, _ in got):
                raise SystemExit(f"{path.name}: a prediction for {exp} is outside its test part")
            flagged = np.array([p >= 0.5 for _, p in got])
            truth = np.array([label_at[d] for d, _ in got], dtype=np.int8)
            counts.append(confusion(flagged, truth))
            covered += len(got)
        m = pooled(counts)
        out.append({"method": name, "stem": stem, "published": (f1, far, mar), "rows": covered} | m)
    return out


def _worker_init() -> None:
    # One TF thread per process: the models are tiny, so parallel processes (one per core)
    # beat TF's own threading, and two pools of threads would oversubscribe the cores.
    from trainer.model import import_keras

    import_keras()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def runs_ahead(a: np.ndarray, length: int) -> np.ndarray:
    """``out[i] = all(a[i : i + length])``; False where fewer than ``length`` values remain."""
    c = np.concatenate([[0], np.cumsum(np.asarray(a, dtype=np.int64))])
    out = np.zeros(len(a), dtype=bool)
    m = len(a) - length + 1
    if m > 0:
        out[:m] = (c[length:] - c[:m]) == length
    return out


# Point label mappings of a windowed model's window decisions (``--mappings``), besides
# the default "end" (a reading's decision = the window ending at it, what the worker does):
#   published  reading p flagged iff the w - 1 windows ending at p .. p + w - 2 all exceed
#              the threshold: SKAB's Conv-AE notebook's rule ("data i is an anomaly if
#              samples [(i - timesteps + 1) to (i)] are anomalies"); it needs w - 2 later
#              readings, so a stream could only apply it w - 2 readings late.
#   run        reading t flagged iff the w - 1 windows ending at t - w + 2 .. t all exceed
#              it: the causal form (an alarm after w - 1 consecutive window alarms).
MAPPINGS = ("published", "run")


def _one(
    path: Path,
    doc: dict[str, Any],
    ks: tuple[float, ...],
    alphas: tuple[float, ...] = (),
    mappings: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train on rows [0, 400) of one experiment, score the rest; confusion counts per k."""
    t0, c0 = time.perf_counter(), time.process_time()
    res = train(from_mapping(doc), save=False)
    _, x, y = load_experiment(path)
    det = res.detector
    y_test = y[TRAIN_ROWS:]
    # A windowed model scores test row 400 with the window ending there: its w - 1 earlier
    # readings are the end of the training part, as in a worker that kept its per-device
    # buffer. Smoothing (if any) starts fresh at the first test row.
    ctx = det.window - 1
    rs = score_rows(det, x[TRAIN_ROWS - ctx :])
    score = rs.decision[ctx:]
    assert rs.scored[ctx:].all()
    t = det.threshold
    row: dict[str, Any] = {
        "file": f"{path.parent.name}/{path.name}",
        "test_rows": len(y_test),
        "anomalous": int(y_test.sum()),
        "epochs": len(res.history.loss),
        "stopped_at_cap": not res.history.stopped_early,
        "window": det.window,
        "ewma_alpha": det.ewma_alpha,
        "dropped": res.metrics["data"]["dropped_columns"],
        "threshold_k2": t.error_mean + 2 * t.error_std,
    }
    for k in ks:
        # A NaN score (none expected: SKAB has no gaps) counts as flagged.
        flagged = ~(score <= t.error_mean + k * t.error_std)
        row[f"k={k:g}"] = rates(confusion(flagged, y_test)) | confusion(flagged, y_test)
    if mappings and det.window > 1:
        # Same fitted model; raw (unsmoothed) window errors of the whole file (rows < w - 1
        # have no window and never count as flagged). Thresholds: the trainer's (mean + k·std
        # of the holdout windows) and, as a diagnostic, the published Conv-AE notebook's
        # rule on our error: 4/3 × the 0.999 quantile of the errors of every window inside
        # the 400 fitting rows (their model saw all of them; ours the first 280 rows').
        w = det.window
        raw = dataclasses.replace(det, ewma_alpha=None)
        full = score_rows(raw, x)
        fit_part = full.score[w - 1 : TRAIN_ROWS]
        thresholds = {f"k={k:g}": t.error_mean + k * t.error_std for k in ks}
        thresholds["ucl"] = float(np.quantile(fit_part, 0.999) * 4 / 3)
        row["ucl"] = thresholds["ucl"]
        row["window_scores"] = [
            None if not ok else float(v) for ok, v in zip(full.scored, full.score, strict=True)
        ]
        for tname, thr in thresholds.items():
            above = full.scored & ~(full.score <= thr)
            for name in ("end", *mappings):
                if name == "end":
                    flagged = above[TRAIN_ROWS:]
                elif name == "published":
                    flagged = runs_ahead(above[TRAIN_ROWS:], w - 1)
                elif name == "run":
                    flagged = runs_ahead(above, w - 1)[TRAIN_ROWS - w + 2 :][: len(y_test)]
                else:
                    raise ValueError(f"unknown mapping {name!r}; use {', '.join(MAPPINGS)}")
                row[f"map={name},{tname}"] = rates(confusion(flagged, y_test)) | confusion(
                    flagged, y_test
                )
    if alphas:
        # Sensitivity to smoothing, same fitted models: the raw scores of the holdout (the
        # last 60 of the 400 rows) and of the test part, smoothed with each alpha; the
        # threshold is re-fitted on the smoothed holdout exactly as the trainer does.
        raw = dataclasses.replace(det, ewma_alpha=None)
        hold = res.splits.holdout
        h0 = int(hold.min())
        hold_raw = score_rows(raw, x[h0 - ctx : TRAIN_ROWS]).score[ctx:]
        test_raw = score_rows(raw, x[TRAIN_ROWS - ctx :]).score[ctx:]
        for a in alphas:
            hs = hold_raw if a == 1 else ewma_series(hold_raw, a)
            ts = test_raw if a == 1 else ewma_series(test_raw, a)
            for k in ks:
                thr = fit_threshold(hs, "mean_k_std", k).value
                flagged = ~(ts <= thr)
                row[f"alpha={a:g},k={k:g}"] = rates(confusion(flagged, y_test)) | confusion(
                    flagged, y_test
                )
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["cpu_seconds"] = round(time.process_time() - c0, 2)
    return row


def pool_rows(per_file: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Pooled rates of every decision variant the per-file rows hold."""
    keys = [key for key in per_file[0] if key.startswith(("k=", "alpha=", "map="))]
    return {
        key: pooled([{c: row[key][c] for c in ("tp", "fp", "fn", "tn")} for row in per_file])
        for key in keys
    }


def run_ours(
    skab: Path,
    overrides: list[str],
    ks: tuple[float, ...],
    jobs: int,
    alphas: tuple[float, ...] = (),
    mappings: tuple[str, ...] = (),
    experiments: Sequence[str] | None = None,
    rows_out: Path | None = None,
) -> dict[str, Any]:
    """Train and score all 34 experiments (``jobs`` processes); pooled and per-file results."""
    import yaml

    base_doc = yaml.safe_load((REPO / "examples" / "trainer-skab.yaml").read_text())
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        docs = []
        experiments = EXPERIMENTS if experiments is None else experiments
        for exp in experiments:
            docs.append(
                apply_overrides(
                    base_doc,
                    [
                        f"data.path={skab / 'data' / exp}",
                        f"data.rows=[0, {TRAIN_ROWS}]",
                        "evaluate.path=null",
                        "report.dir=null",
                        "report.plots=false",
                        f"registry={tmp}",
                        *overrides,
                    ],
                )
            )
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
            futures = [
                pool.submit(_one, skab / "data" / exp, doc, ks, alphas, mappings)
                for exp, doc in zip(experiments, docs, strict=True)
            ]
            per_file = []
            for fut in futures:
                row = fut.result()
                per_file.append(row)
                if rows_out is not None:  # as each file ends, so a stopped run keeps them
                    with rows_out.open("a") as f:
                        f.write(json.dumps(row | {"overrides": overrides}, default=str) + "\n")
                r = row[f"k={ks[0]:g}"]
                print(
                    f"{row['file']:<14} test {row['test_rows']:5d} anomalous "
                    f"{row['anomalous']:5d}  F1 {r['f1']:.3f} FAR {r['far_pct']:6.2f} "
                    f"MAR {r['mar_pct']:6.2f}  epochs {row['epochs']:3d}  {row['seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return {
        "per_file": per_file,
        "pooled": pool_rows(per_file),
        "seconds": round(time.perf_counter() - t_all, 1),
        "config": docs[0] | {"data": docs[0]["data"] | {"path": "<each experiment>"}},
    }


def pool_files(paths: list[Path]) -> int:
    """Pool per-experiment rows written by ``--rows-out`` (possibly several partial runs of
    the same settings: every model is seeded and deterministic, so a file's row does not
    depend on the run that produced it)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows.setdefault(row["file"], row)
    if not rows:
        print("no rows")
        return 1
    settings = {json.dumps(r.get("overrides")) for r in rows.values()}
    if len(settings) > 1:
        print(f"refusing to pool rows of different settings: {sorted(settings)}")
        return 1
    missing = [e for e in EXPERIMENTS if e not in rows]
    per_file = [rows[e] for e in EXPERIMENTS if e in rows]
    print(f"{len(per_file)} of {len(EXPERIMENTS)} experiments; missing: {missing or 'none'}")
    print(f"training + scoring {sum(r['seconds'] for r in per_file):.0f} s wall in total")
    print("| threshold | F1 | FAR % | MAR % | TP | FP | FN | TN |")
    print("|---|---|---|---|---|---|---|---|")
    for key, m in pool_rows(per_file).items():
        print(
            f"| {key} | {m['f1']:.2f} | {m['far_pct']:.2f} | {m['mar_pct']:.2f} | "
            f"{m['tp']} | {m['fp']} | {m['fn']} | {m['tn']} |"
        )
    return 0


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the training processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skab", type=Path, default=REPO.parent / "shared" / "data" / "skab")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--k", type=float, action="append", help="threshold k values (default 2, 3)")
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument(
        "--alphas",
        default="",
        help="also report these EWMA alphas (comma list; 1 = unsmoothed) on the same models",
    )
    p.add_argument(
        "--mappings",
        default="",
        help="windowed models: also report these point label mappings of the same window "
        f"decisions (comma list of {', '.join(MAPPINGS)}; see MAPPINGS in the source)",
    )
    p.add_argument(
        "--files",
        default="",
        help="comma list of experiments (e.g. valve1/0.csv) to run instead of all 34: a quick "
        "check only, the pooled figures are not the benchmark's",
    )
    p.add_argument(
        "--rows-out",
        type=Path,
        help="append each experiment's result to this JSON-lines file as it finishes",
    )
    p.add_argument(
        "--pool",
        default="",
        help="only pool the rows of these --rows-out files (comma list; an experiment in "
        "several is taken once, the first seen) and print the table; trains nothing",
    )
    p.add_argument("--check-only", action="store_true", help="only verify the metric code")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes")
    args = p.parse_args(argv)
    ks = tuple(args.k or (2.0, 3.0))
    if args.pool:
        return pool_files([Path(f) for f in args.pool.split(",") if f.strip()])

    tests: dict[str, tuple[list[str], np.ndarray]] = {}
    for exp in EXPERIMENTS:
        stamps, _, labels = load_experiment(args.skab / "data" / exp)
        tests[exp] = (stamps[TRAIN_ROWS:], labels[TRAIN_ROWS:])
    n = sum(len(s) for s, _ in tests.values())
    a = sum(int(lab.sum()) for _, lab in tests.values())
    print(f"{len(tests)} experiments, {n} test rows, {a} anomalous ({100 * a / n:.1f} %)")

    ref = check_reference(args.skab, tests)
    print("\n| method | rows | F1 | FAR % | MAR % | published F1 / FAR / MAR |")
    print("|---|---|---|---|---|---|")
    ok = True
    for r in ref:
        f1, far, mar = r["published"]
        pub = "-" if f1 is None else f"{f1:.2f} / {far:.2f} / {mar:.2f}"
        print(
            f"| {r['method']} | {r['rows']} | {r['f1']:.2f} | {r['far_pct']:.2f} | "
            f"{r['mar_pct']:.2f} | {pub} |"
        )
        same = (round(r["f1"], 2), round(r["far_pct"], 2), round(r["mar_pct"], 2)) == (f1, far, mar)
        # Methods predicting every test row must match exactly; MSCRED's published file
        # covers fewer rows than its published figures were computed on (see docs/skab.md).
        if f1 is not None and r["rows"] == n:
            ok &= same
    all_flag = pooled([confusion(np.ones(len(lab), bool), lab) for _, lab in tests.values()])
    print(f"| (flag everything) | {n} | {all_flag['f1']:.3f} | 100.00 | 0.00 | |")
    if not ok:
        print("metric check FAILED: pooled reference predictions do not match the leaderboard")
        return 1
    print(
        "\nmetric check passed: every method with predictions for all test rows reproduces "
        "its published F1/FAR/MAR exactly"
    )
    if args.check_only:
        return 0

    alphas = tuple(float(a) for a in args.alphas.split(",") if a.strip())
    mappings = tuple(m.strip() for m in args.mappings.split(",") if m.strip())
    if bad := sorted(set(mappings) - set(MAPPINGS)):
        p.error(f"unknown --mappings {bad}; use {', '.join(MAPPINGS)}")
    exps = [f.strip() for f in args.files.split(",") if f.strip()] or EXPERIMENTS
    if bad := sorted(set(exps) - set(EXPERIMENTS)):
        p.error(f"unknown --files {bad}")
    cpu0 = _cpu_seconds()
    ours = run_ours(args.skab, args.overrides, ks, args.jobs, alphas, mappings, exps, args.rows_out)
    ours["cpu_seconds"] = round(_cpu_seconds() - cpu0, 1)
    print(
        f"\nour autoencoder ({ours['seconds']:.0f} s wall, {ours['cpu_seconds']:.0f} s CPU "
        f"for {len(exps)} models):\n"
    )
    print("| threshold | F1 | FAR % | MAR % | TP | FP | FN | TN |")
    print("|---|---|---|---|---|---|---|---|")
    for key, m in ours["pooled"].items():
        print(
            f"| {key} | {m['f1']:.2f} | {m['far_pct']:.2f} | {m['mar_pct']:.2f} | "
            f"{m['tp']} | {m['fp']} | {m['fn']} | {m['tn']} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"reference": ref, "ours": ours}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
