"""Metrics of a fitted detector: reconstruction quality on normal data and, given labels,
detection quality.

All errors are in *scaled* units (the model's space), the same units as the threshold.
A reading whose score is not finite (NaN/inf input) is counted as flagged: the worker must
treat an unscorable reading as not normal, so evaluation does too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from detector import Scores
from detector.offline import RowScores, score_rows

F64 = npt.NDArray[np.float64]
TRADEOFF_KS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0)


def reconstruction_metrics(scores: Scores) -> dict[str, float]:
    """MSE, RMSE and MAE over every cell, and score quantiles, for (normally) normal data.

    ``mse`` is the mean of the per-reading scores (each a mean over features), so it is in
    the threshold's units; ``rmse = sqrt(mse)``; ``mae`` is the mean absolute cell error.
    """
    fe = scores.feature_error.astype(np.float64)
    mse = float(fe.mean())
    s = scores.score
    return {
        "n": int(s.size),
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(np.sqrt(fe).mean()),
        "score_p50": float(np.percentile(s, 50)),
        "score_p95": float(np.percentile(s, 95)),
        "score_p99": float(np.percentile(s, 99)),
        "score_max": float(s.max()),
    }


def confusion(flagged: npt.NDArray[np.bool_], labels: npt.NDArray[np.int8]) -> dict[str, int]:
    """Counts of true/false positives/negatives (positive = anomalous)."""
    y = labels.astype(bool)
    return {
        "tp": int(np.sum(flagged & y)),
        "fp": int(np.sum(flagged & ~y)),
        "fn": int(np.sum(~flagged & y)),
        "tn": int(np.sum(~flagged & ~y)),
    }


def rates(c: dict[str, int]) -> dict[str, float]:
    """Precision, recall, F1, and SKAB's FAR and MAR (percent), from confusion counts.

    F1 = TP / (TP + (FN + FP) / 2); FAR = FP / (FP + TN) × 100; MAR = FN / (FN + TP) × 100.
    An empty denominator gives 0.
    """
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]

    def div(a: float, b: float) -> float:
        return a / b if b else 0.0

    return {
        "precision": div(tp, tp + fp),
        "recall": div(tp, tp + fn),
        "f1": div(tp, tp + (fn + fp) / 2),
        "far_pct": 100 * div(fp, fp + tn),
        "mar_pct": 100 * div(fn, fn + tp),
    }


def _finite_scores(score: F64) -> F64:
    # Non-finite scores rank above everything, as flagged readings.
    s = np.asarray(score, dtype=np.float64).copy()
    bad = ~np.isfinite(s)
    if bad.any():
        top = float(np.max(s[~bad])) if (~bad).any() else 1.0
        s[bad] = top * 10 + 1
    return s


def labelled_metrics(
    score: F64,
    labels: npt.NDArray[np.int8],
    threshold: float,
    normal_mean: float,
    normal_std: float,
) -> dict[str, Any]:
    """Detection metrics of ``score > threshold`` against 0/1 ``labels``.

    Args:
        score: per-reading scores of the labelled data.
        labels: 1 = anomalous.
        threshold: the detector's threshold.
        normal_mean, normal_std: holdout error statistics, for the trade-off table of
            thresholds ``mean + k·std``.

    Returns:
        precision, recall, f1, far_pct, mar_pct, confusion counts, roc_auc and pr_auc (None
        when only one class is present), ``tradeoff`` rows, and a down-sampled PR curve.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    s = _finite_scores(score)
    flagged = ~(np.asarray(score) <= threshold)  # NaN counts as flagged
    c = confusion(flagged, labels)
    out: dict[str, Any] = {"n": int(s.size), "anomalous": int(labels.sum())}
    out |= rates(c) | {"confusion": c}
    both = 0 < labels.sum() < labels.size
    out["roc_auc"] = float(roc_auc_score(labels, s)) if both else None
    out["pr_auc"] = float(average_precision_score(labels, s)) if both else None
    out["tradeoff"] = [
        {"k": k, "threshold": normal_mean + k * normal_std}
        | rates(confusion(~(np.asarray(score) <= normal_mean + k * normal_std), labels))
        for k in TRADEOFF_KS
    ]
    if both:
        prec, rec, thr = precision_recall_curve(labels, s)
        idx = np.unique(np.linspace(0, len(thr) - 1, min(len(thr), 200)).astype(int))
        out["pr_curve"] = {
            "threshold": thr[idx].tolist(),
            "precision": prec[idx].tolist(),
            "recall": rec[idx].tolist(),
        }
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)[:-1]
        best = int(np.argmax(f1))
        out["best_f1"] = {"threshold": float(thr[best]), "f1": float(f1[best])}
    return out


def evaluate_detector(
    det: Any,
    x: F64,
    labels: npt.NDArray[np.int8],
    device_ids: Sequence[str] | None = None,
    rows: RowScores | None = None,
) -> dict[str, Any]:
    """Score labelled raw readings ``x`` with detector ``det`` and compute every metric.

    Rows are scored as the worker would (:func:`detector.offline.score_rows`: windows per
    device, smoothing); a device's first ``window - 1`` rows are not scored and not counted.
    Returns :func:`labelled_metrics` of the decision score plus ``normal_reconstruction``
    (the :func:`reconstruction_metrics` of the rows labelled normal, if any), ``threshold``
    and ``unscored_rows``.
    """
    rs = rows if rows is not None else score_rows(det, x, device_ids)
    keep = rs.scored
    labels = labels[keep]
    scores = Scores(rs.score[keep], rs.feature_error[keep], rs.reconstruction[keep])
    t = det.threshold
    out = labelled_metrics(rs.decision[keep], labels, t.value, t.error_mean, t.error_std)
    out["threshold"] = t.value
    out["unscored_rows"] = int((~keep).sum())
    normal = labels == 0
    if normal.any():
        out["normal_reconstruction"] = reconstruction_metrics(
            Scores(
                score=scores.score[normal],
                feature_error=scores.feature_error[normal],
                reconstruction=scores.reconstruction[normal],
            )
        )
    return out
