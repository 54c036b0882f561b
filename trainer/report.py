"""The training report: PNG plots, ``report.md`` referencing them, and ``metrics.json``.

:func:`build_report` returns ``{relative path: bytes}`` for ``Registry.save(extra_files=)``,
so the report is written atomically with the model and covered by the manifest's
checksums. Plots use matplotlib's object API on an Agg canvas: no pyplot global state, no
display needed, safe in any process.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from detector import Scores, Threshold
from trainer.model import FitHistory

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
REPORT_DIR = "report"
_NORMAL = "#4C72B0"
_ANOMALY = "#C44E52"
_HOLDOUT = "#333333"


@dataclass(frozen=True, eq=False)
class ReportInputs:
    """Everything the report shows. Scores/errors in scaled units (the threshold's units).

    Attributes:
        name: model name.
        metrics: the ``metrics.json`` document (see :func:`trainer.pipeline.train`).
        config_yaml: the effective configuration.
        history: the final model's fit.
        holdout: scores of the threshold-holdout split (normal data).
        threshold: the fitted threshold.
        feature_names, feature_error_mean, feature_error_std: per-feature holdout error stats.
        codes_holdout: bottleneck codes of the holdout rows.
        eval_score, eval_labels, codes_eval: labelled evaluation data, if any.
        plots: draw PNGs (False gives a text-only report).
        max_points: cap on scatter points per group.
        seed: for the scatter sub-sample.
    """

    name: str
    metrics: dict[str, Any]
    config_yaml: str
    history: FitHistory
    holdout: Scores
    threshold: Threshold
    feature_names: Sequence[str]
    feature_error_mean: F64
    feature_error_std: F64
    codes_holdout: F32
    eval_score: F64 | None = None
    eval_labels: npt.NDArray[np.int8] | None = None
    codes_eval: F32 | None = None
    plots: bool = True
    max_points: int = 5000
    seed: int = 0


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _figure(width: float = 7.5, height: float = 4.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No "Software"/date metadata: the same model gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def plot_loss(h: FitHistory) -> bytes:
    """Training and validation loss per epoch (log y), best epoch marked."""
    fig = _figure()
    ax = fig.add_subplot()
    epochs = np.arange(1, len(h.loss) + 1)
    ax.plot(epochs, h.loss, marker="o", ms=3, label="training loss", color=_NORMAL)
    ax.plot(epochs, h.val_loss, marker="o", ms=3, label="validation loss", color="#DD8452")
    ax.axvline(h.best_epoch, color="k", ls="--", lw=1, label=f"best epoch ({h.best_epoch})")
    if min(min(h.loss), min(h.val_loss)) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (scaled units)")
    ax.set_title("Autoencoder loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _png(fig)


def _skewed(values: F64) -> bool:
    pos = values[values > 0]
    if pos.size < 2:
        return False
    med = float(np.median(pos))
    return med > 0 and float(np.percentile(pos, 99)) / med > 20


def plot_errors(
    holdout: F64, threshold: float, eval_score: F64 | None, labels: npt.NDArray[np.int8] | None
) -> bytes:
    """Histogram of reconstruction errors with the threshold line; log x when skewed."""
    groups: list[tuple[str, F64, str]] = [("holdout normal (threshold fit)", holdout, _HOLDOUT)]
    if eval_score is not None and labels is not None:
        groups.append(("evaluation: normal", eval_score[labels == 0], _NORMAL))
        groups.append(("evaluation: anomalous", eval_score[labels == 1], _ANOMALY))
    groups = [(n, v[np.isfinite(v)], c) for n, v, c in groups if np.isfinite(v).any()]
    every = np.concatenate([v for _, v, _ in groups] + [np.array([threshold])])
    log_x = _skewed(every)
    if log_x:
        lo = max(float(every[every > 0].min()), 1e-12)
        bins: Any = np.geomspace(lo, float(every.max()) * 1.01, 70)
        hidden = 0
    else:
        # A few far outliers would squash everything into the first bins: show up to the
        # 99.5th percentile (and the threshold), and say how many readings lie beyond.
        top = max(float(np.percentile(every, 99.5)), threshold) * 1.15
        top = float(every.max()) * 1.01 if every.max() <= top * 1.5 else top
        hidden = int(sum(int(np.sum(v > top)) for _, v, _ in groups))
        bins = np.linspace(0.0, top, 70)
    fig = _figure()
    ax = fig.add_subplot()
    for name, v, color in groups:
        # The holdout is drawn as an outline so the evaluation's normal bars cannot hide it.
        style = {"histtype": "step", "lw": 1.5} if color == _HOLDOUT else {"alpha": 0.5}
        shown = np.clip(v, bins[0], None)
        ax.hist(shown[shown <= bins[-1]], bins=bins, color=color, label=name, **style)
    ax.axvline(threshold, color="k", ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
    if log_x:
        ax.set_xscale("log")
    if len(groups) > 1:
        ax.set_yscale("log")
    ax.set_xlabel(
        "reconstruction error per reading (MSE, scaled units)" + (", log" if log_x else "")
    )
    ax.set_ylabel("readings" + (" (log)" if len(groups) > 1 else ""))
    ax.set_title(
        "Reconstruction error"
        + (f" ({hidden} readings beyond the axis not shown)" if hidden else "")
    )
    ax.legend()
    return _png(fig)


def _sample(n: int, cap: int, rng: np.random.Generator) -> npt.NDArray[np.intp]:
    if n <= cap:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


def plot_latent(
    codes_holdout: F32,
    codes_eval: F32 | None,
    labels: npt.NDArray[np.int8] | None,
    max_points: int,
    seed: int,
) -> bytes:
    """The bottleneck code: directly when 2-D, else its 2-D PCA (fitted on holdout codes)."""
    rng = np.random.default_rng(seed)
    dim = codes_holdout.shape[1]
    if dim == 2:

        def project(c: F32) -> F64:
            return c.astype(np.float64)

        xlabel, ylabel, title = "code[0]", "code[1]", "Latent space (2-D code)"
    elif dim == 1:

        def project(c: F32) -> F64:
            return np.column_stack([c[:, 0], rng.uniform(-1, 1, len(c))])

        xlabel, ylabel, title = "code[0]", "jitter", "Latent space (1-D code, jittered)"
    else:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(codes_holdout)
        ev = pca.explained_variance_ratio_

        def project(c: F32) -> F64:
            return np.asarray(pca.transform(c), dtype=np.float64)

        xlabel, ylabel = f"PC1 ({ev[0]:.0%} of variance)", f"PC2 ({ev[1]:.0%})"
        title = f"Latent space ({dim}-D code, PCA)"
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    groups = [("holdout normal", codes_holdout, "#A0A0A0")]
    if codes_eval is not None and labels is not None:
        groups.append(("evaluation: normal", codes_eval[labels == 0], _NORMAL))
        groups.append(("evaluation: anomalous", codes_eval[labels == 1], _ANOMALY))
    for name, c, color in groups:
        if len(c) == 0:
            continue
        p = project(c[_sample(len(c), max_points, rng)])
        ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.5, color=color, label=name, linewidths=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(markerscale=3)
    return _png(fig)


def plot_pr(evaluation: dict[str, Any], threshold: float) -> bytes:
    """Precision/recall curve with the operating point, and P/R/F1 against the threshold."""
    curve = evaluation["pr_curve"]
    thr = np.asarray(curve["threshold"])
    prec = np.asarray(curve["precision"])
    rec = np.asarray(curve["recall"])
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    fig = _figure(11, 4.5)
    left, right = fig.subplots(1, 2)
    left.plot(rec, prec, color=_NORMAL, label=f"PR curve (AP {evaluation['pr_auc']:.3f})")
    left.scatter(
        [evaluation["recall"]],
        [evaluation["precision"]],
        color="k",
        zorder=3,
        label=f"threshold {threshold:.4g}: P {evaluation['precision']:.2f} "
        f"R {evaluation['recall']:.2f}",
    )
    left.set_xlabel("recall")
    left.set_ylabel("precision")
    left.set_xlim(0, 1.02)
    left.set_ylim(0, 1.02)
    left.set_title("Precision / recall")
    left.grid(True, alpha=0.3)
    left.legend(loc="lower left")
    right.plot(thr, prec, label="precision", color=_NORMAL)
    right.plot(thr, rec, label="recall", color=_ANOMALY)
    right.plot(thr, f1, label="F1", color="#55A868")
    right.axvline(threshold, color="k", ls="--", lw=1, label="chosen threshold")
    if thr.size and thr.min() > 0 and _skewed(thr):
        right.set_xscale("log")
    elif thr.size:
        # As in the histogram: a far outlier must not squash the interesting range.
        top = max(float(np.percentile(thr, 99.5)), threshold) * 1.15
        if thr.max() > top * 1.5:
            right.set_xlim(0.0, top)
    right.set_xlabel("threshold on reconstruction error")
    right.set_ylim(0, 1.02)
    right.set_title("Trade-off across thresholds")
    right.grid(True, alpha=0.3)
    right.legend(loc="best")
    return _png(fig)


def plot_feature_errors(names: Sequence[str], mean: F64, std: F64, top: int = 40) -> bytes:
    """Mean (± std) squared error per feature on the holdout, largest first."""
    order = np.argsort(-mean)[:top]
    fig = _figure(7.5, max(2.5, 0.22 * len(order) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(order))[::-1]
    # One-sided error bars: a squared error cannot be negative.
    xerr = np.vstack([np.zeros(len(order)), std[order]])
    ax.barh(y, mean[order], xerr=xerr, color=_NORMAL, alpha=0.8, ecolor="#555555")
    ax.set_yticks(y, [names[i] for i in order], fontsize=8)
    ax.set_xlabel("squared error on holdout (scaled units), mean + std")
    ax.set_title("Per-feature reconstruction error" + (f" (top {top})" if len(names) > top else ""))
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _md_data(m: dict[str, Any]) -> list[str]:
    d = m["data"]
    s = m["splits"]
    rows = [
        ("source", d["source"]),
        (
            "format",
            d["format"] + (f" (delimiter {d['delimiter']!r})" if d.get("delimiter") else ""),
        ),
        ("rows read", d["rows"]),
        ("rows labelled anomalous, dropped", d["dropped_anomalies"]),
        ("undecodable records skipped", d["skipped_records"]),
        ("features", len(m["model"]["feature_names"])),
        ("non-numeric columns ignored", ", ".join(d["ignored_columns"]) or "none"),
        ("constant/all-missing columns dropped", ", ".join(d["dropped_columns"]) or "none"),
        (
            "constant columns watched (value)",
            ", ".join(f"{c['name']} ({c['value']:g})" for c in d.get("watched_constants", []))
            or "none",
        ),
        (
            "missing values imputed",
            f"{d.get('imputed_total', 0)}"
            + (
                " (" + ", ".join(f"{k} {v}" for k, v in d["imputed_values"].items()) + ")"
                if d.get("imputed_values")
                else ""
            ),
        ),
        (
            "split (train / validation / holdout)",
            f"{s['train']} / {s['validation']} / {s['holdout']}",
        ),
        (
            "split order",
            "random (seeded)"
            if s["shuffle"]
            else f"chronological (by {d.get('time_order', 'row order')})",
        ),
        ("training-data fingerprint", f"`{d['fingerprint'][:16]}…`"),
    ]
    return ["## Data", "", _table(("", ""), rows), ""]


def _md_model(m: dict[str, Any], h: FitHistory) -> list[str]:
    mod = m["model"]
    hp = mod["hyperparameters"]
    rows = [
        ("architecture", mod["architecture"]),
        ("window (readings) / EWMA alpha", f"{mod.get('window', 1)} / {mod.get('ewma_alpha')}"),
        ("activation / output", f"{hp['activation']} / {mod['output_activation']}"),
        ("scaler / imputer", f"{mod['scaler']} / {mod['imputer']}"),
        ("dropout / L2", f"{hp['dropout']:g} / {hp['l2']:g}"),
        ("learning rate / batch size", f"{hp['learning_rate']:g} / {hp['batch_size']}"),
        ("parameters", mod["parameters"]),
        ("epochs run (max)", f"{len(h.loss)} ({hp['epochs']})"),
        ("best epoch / val_loss", f"{h.best_epoch} / {h.best_val_loss:.6g}"),
        ("stopped early", h.stopped_early),
        ("stopped at the epoch cap", not h.stopped_early),
        ("fit time", f"{h.seconds:.1f} s ({h.seconds / max(len(h.loss), 1):.2f} s/epoch)"),
        ("seed / deterministic", f"{hp['seed']} / {_fmt(hp['deterministic'])}"),
    ]
    return ["## Model and training", "", _table(("", ""), rows), ""]


def _md_tuning(m: dict[str, Any]) -> list[str]:
    t = m.get("tuning")
    if not t:
        return []
    rows = []
    for tr in t["trials"]:
        p = tr["params"]
        mark = " **best**" if tr["index"] == t["best_trial"] else ""
        rows.append(
            (
                f"{tr['index']}{mark}",
                p["code_size"],
                p["hidden"],
                p["learning_rate"],
                p["batch_size"],
                p["epochs"],
                tr["epochs_run"],
                tr["best_epoch"],
                f"{tr['val_loss']:.6g}",
                f"{tr['seconds']:.1f}",
            )
        )
    head = (
        "trial",
        "code",
        "hidden",
        "lr",
        "batch",
        "max epochs",
        "epochs run",
        "best epoch",
        "val_loss",
        "s",
    )
    return [
        "## Hyperparameter search",
        "",
        f"{t['method']} search, {len(t['trials'])} trials, selected by lowest validation loss.",
        "",
        _table(head, rows),
        "",
    ]


def _md_threshold(m: dict[str, Any]) -> list[str]:
    t = m["threshold"]
    rule = (
        f"mean + {t['param']:g}·std"
        if t["method"] == "mean_k_std"
        else f"{t['param']:g}th percentile"
    )
    h = m["holdout"]
    rows = [
        ("rule", rule),
        ("threshold", f"{t['value']:.6g}"),
        ("holdout error mean / std", f"{t['error_mean']:.6g} / {t['error_std']:.6g}"),
        ("holdout readings", t["n"]),
        ("holdout flagged (expected false alarms)", f"{m['holdout_flagged_pct']:.2f} %"),
    ]
    rec = [
        (k, h[k])
        for k in ("mse", "rmse", "mae", "score_p50", "score_p95", "score_p99", "score_max")
    ]
    return [
        "## Threshold",
        "",
        "Fitted on the reconstruction errors of the holdout split, which the model neither "
        "trained nor early-stopped on.",
        "",
        _table(("", ""), rows),
        "",
        "## Reconstruction on held-out normal data",
        "",
        _table(("metric (scaled units)", "value"), rec),
        "",
    ]


def _md_eval(m: dict[str, Any]) -> list[str]:
    e = m.get("evaluation")
    if not e:
        return ["## Detection on labelled data", "", "No labelled evaluation data configured.", ""]
    c = e["confusion"]
    rows = [
        ("source", e["source"]),
        ("readings (anomalous)", f"{e['n']} ({e['anomalous']})"),
        ("precision", e["precision"]),
        ("recall", e["recall"]),
        ("F1", e["f1"]),
        ("ROC-AUC", e["roc_auc"]),
        ("PR-AUC (average precision)", e["pr_auc"]),
        ("false alarm rate (FAR)", f"{e['far_pct']:.2f} %"),
        ("missed alarm rate (MAR)", f"{e['mar_pct']:.2f} %"),
    ]
    if "best_f1" in e:
        b = e["best_f1"]
        rows.append(
            ("best possible F1 (oracle threshold)", f"{b['f1']:.4g} at {b['threshold']:.4g}")
        )
    trade = [
        (
            t["k"],
            f"{t['threshold']:.4g}",
            t["precision"],
            t["recall"],
            t["f1"],
            f"{t['far_pct']:.2f}",
        )
        for t in e["tradeoff"]
    ]
    out = [
        "## Detection on labelled data",
        "",
        _table(("", ""), rows),
        "",
        "Confusion matrix (rows: truth, columns: prediction):",
        "",
        _table(
            ("", "predicted normal", "predicted anomalous"),
            [("normal", c["tn"], c["fp"]), ("anomalous", c["fn"], c["tp"])],
        ),
        "",
        "Precision/recall trade-off for thresholds mean + k·std of the holdout errors:",
        "",
        _table(("k", "threshold", "precision", "recall", "F1", "FAR %"), trade),
        "",
    ]
    if "pr_curve" in e:
        out += ["![precision/recall](pr_curve.png)", ""]
    return out


def _markdown(inp: ReportInputs, images: set[str]) -> str:
    m = inp.metrics
    lines = [
        f"# Training report: {inp.name}",
        "",
        f"Trained {m['trained_at']} on {m['data']['rows']} rows of `{m['data']['source']}`; "
        f"threshold **{inp.threshold.value:.6g}** on per-reading reconstruction MSE "
        f"(scaled units).",
        "",
    ]
    if m.get("warnings"):
        lines += ["## Warnings", "", *(f"- {w}" for w in m["warnings"]), ""]
    lines += _md_data(m) + _md_model(m, inp.history)
    if "loss.png" in images:
        lines += ["![loss curves](loss.png)", ""]
    lines += _md_tuning(m) + _md_threshold(m)
    if "errors.png" in images:
        lines += ["![error histogram](errors.png)", ""]
    lines += _md_eval(m)
    if "latent.png" in images:
        lines += ["## Latent space", "", "![latent space](latent.png)", ""]
    fe_rows = sorted(
        zip(inp.feature_names, inp.feature_error_mean, inp.feature_error_std, strict=True),
        key=lambda r: -r[1],
    )
    lines += [
        "## Per-feature error on the holdout",
        "",
        _table(
            ("feature", "mean squared error", "std"),
            [(n, float(a), float(b)) for n, a, b in fe_rows[:15]],
        ),
        "",
    ]
    if "feature_errors.png" in images:
        lines += ["![per-feature error](feature_errors.png)", ""]
    lines += ["## Timings", "", _table(("stage", "seconds"), list(m["timings_s"].items())), ""]
    lines += ["## Configuration", "", "```yaml", inp.config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def json_safe(v: Any) -> Any:
    """``v`` with numpy scalars made plain and NaN/inf replaced by None (strict JSON)."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def build_report(inp: ReportInputs) -> dict[str, bytes]:
    """Render the report; returns ``{"report/<file>": bytes}`` (md, json and PNGs)."""
    images: dict[str, bytes] = {}
    if inp.plots:
        images["loss.png"] = plot_loss(inp.history)
        images["errors.png"] = plot_errors(
            inp.holdout.score, inp.threshold.value, inp.eval_score, inp.eval_labels
        )
        images["latent.png"] = plot_latent(
            inp.codes_holdout, inp.codes_eval, inp.eval_labels, inp.max_points, inp.seed
        )
        ev = inp.metrics.get("evaluation")
        if ev and "pr_curve" in ev:
            images["pr_curve.png"] = plot_pr(ev, inp.threshold.value)
        images["feature_errors.png"] = plot_feature_errors(
            inp.feature_names, inp.feature_error_mean, inp.feature_error_std
        )
    files = {f"{REPORT_DIR}/{k}": v for k, v in images.items()}
    files[f"{REPORT_DIR}/report.md"] = _markdown(inp, set(images)).encode()
    files[f"{REPORT_DIR}/metrics.json"] = (
        json.dumps(json_safe(inp.metrics), indent=2, sort_keys=True, allow_nan=False) + "\n"
    ).encode()
    return files
