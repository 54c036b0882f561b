"""One training run: load → split → fit preprocessing → fit autoencoder → threshold →
evaluate → report → save. Usable from Python (:func:`train`) as well as from the CLI.

Contract of :func:`train`:
    1. everything the user can get wrong (config, files, columns, values, row counts) is
       checked *before* TensorFlow is imported or anything is fitted, and raised as a
       :class:`~trainer.errors.TrainerError` with the fix;
    2. normal rows are split into train / validation / threshold-holdout. Imputer and scaler
       are fitted on the train split only; the model fits on train and early-stops on
       validation; the threshold and per-feature error statistics come from the holdout,
       which neither step saw;
    3. holdout errors are computed by :meth:`detector.Detector.score`, the worker's own
       scoring code, so the threshold is in exactly the units the worker compares;
    4. the registry is written last, in one atomic :meth:`detector.Registry.save` (model,
       config, report, metrics); any failure before it leaves the registry untouched.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from detector import (
    DenseNetwork,
    Detector,
    ModelInfo,
    Preprocessor,
    Registry,
    Scores,
    Threshold,
    fit_threshold,
)
from detector.artifact import fingerprint
from trainer import data as datalib
from trainer.config import TrainConfig, delimiter_char, resolve_format, to_mapping, to_yaml
from trainer.errors import DataError, TrainerError
from trainer.evaluate import evaluate_detector, reconstruction_metrics
from trainer.model import FitHistory
from trainer.report import ReportInputs, build_report
from trainer.tune import Trial, params_of, valid_bottleneck

Progress = Callable[[str], None]
F64 = npt.NDArray[np.float64]
MIN_SPLIT_ROWS = 10
"""Fewest rows allowed in the validation or holdout split (a threshold from fewer is noise)."""


def stderr_progress(stream: TextIO | None = None) -> Progress:
    """A progress sink printing ``[  12.3s] message`` lines (elapsed seconds) to stderr."""
    t0 = time.perf_counter()

    def emit(msg: str) -> None:
        out = stream or sys.stderr
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=out, flush=True)

    return emit


def _silent(_msg: str) -> None:
    return None


@dataclass(frozen=True)
class Splits:
    """Row indices into the training :class:`~trainer.data.Dataset` of each split."""

    train: npt.NDArray[np.intp]
    validation: npt.NDArray[np.intp]
    holdout: npt.NDArray[np.intp]


@dataclass(frozen=True, eq=False)
class TrainResult:
    """The outcome of :func:`train`.

    Attributes:
        detector: the fitted detector (``info.version`` is the saved version, if saved).
        artifact: the saved version directory, or None when not saved.
        metrics: the ``metrics.json`` document.
        history: the final model's fit history.
        trials: the tuning trials (empty without a search).
        dataset: the normal training data actually used (after dropping labelled rows and
            constant columns).
        splits: indices of each split into ``dataset``.
        keras_model: the fitted Keras model.
        report_files: ``{"report/...": bytes}`` as stored in the artifact.
    """

    detector: Detector
    artifact: Path | None
    metrics: dict[str, Any]
    history: FitHistory
    trials: tuple[Trial, ...]
    dataset: datalib.Dataset
    splits: Splits
    keras_model: Any
    report_files: dict[str, bytes]


# --------------------------------------------------------------------------------------
# Stage 1: data (no TensorFlow)
# --------------------------------------------------------------------------------------


def _slice(table: datalib.RawTable, rows: tuple[int | None, ...] | None) -> datalib.RawTable:
    if rows is not None and rows[0] is not None and rows[0] >= table.n_rows:
        raise DataError(
            f"the row slice {list(rows)} starts past the end of {table.source} "
            f"({table.n_rows} rows)",
            "lower the slice start",
        )
    return table.sliced(rows)


def load_training_data(cfg: TrainConfig, progress: Progress = _silent) -> datalib.Dataset:
    """Read the configured normal data and apply the column rules (see :mod:`trainer.data`)."""
    d = cfg.data
    fmt = cfg.data_format
    if fmt == "kafka":
        from trainer.replay import read_kafka

        table = read_kafka(d.kafka, progress)
        timestamp: str | None = d.kafka.timestamp_field
        device: str | None = d.kafka.device_field
    else:
        fields = datalib.RecordFields(
            d.kafka.device_field, d.kafka.timestamp_field, d.kafka.values_field
        )
        table = datalib.read_table(
            fmt,
            d.path,
            delimiter=delimiter_char(d.delimiter, "data.delimiter"),
            decimal=d.decimal,
            fields=fields,
        )
        timestamp, device = d.timestamp_column, d.device_column
    table = _slice(table, d.rows)
    return datalib.select(
        table,
        d.features,
        exclude=d.exclude,
        timestamp_column=timestamp,
        device_column=device,
        label_column=d.label_column,
        require_label=d.label_column is not None,
    )


def load_labelled_data(
    path: str,
    features: tuple[str, ...],
    label_column: str,
    *,
    fmt: str = "auto",
    delimiter: str = "auto",
    decimal: str = ".",
    rows: tuple[int | None, ...] | None = None,
    truth: str | None = None,
    device_column: str = "device_id",
    timestamp_column: str = "timestamp",
) -> datalib.Dataset:
    """Read labelled data with exactly the model's ``features`` (a missing one is an error).

    Labels come from ``label_column``, or, when ``truth`` is given, from a ground-truth
    JSONL file matched on ``(device_column, timestamp_column)``.
    """
    if label_column in features:
        raise DataError(
            f"the label column {label_column!r} is one of the model's features",
            "choose the column that holds the 0/1 labels",
        )
    table = datalib.read_table(
        resolve_format(fmt, path, "evaluate"),
        path,
        delimiter=delimiter_char(delimiter, "evaluate.delimiter"),
        decimal=decimal,
    )
    table = _slice(table, rows)
    if truth is None:
        return datalib.select(table, features, label_column=label_column, require_label=True)
    keys = datalib.read_truth(truth)
    labels = datalib.labels_from_truth(table, keys, device_column, timestamp_column)
    ds = datalib.select(
        table, features, timestamp_column=timestamp_column, device_column=device_column
    )
    return dataclasses.replace(ds, labels=labels)


def split_rows(n: int, cfg: TrainConfig) -> Splits:
    """Train / validation / holdout indices; random (seeded) or chronological.

    Raises:
        DataError: too few rows for a validation and a holdout split of at least
            :data:`MIN_SPLIT_ROWS` rows each and a training split at least as large.
    """
    s = cfg.split
    n_val = round(n * s.validation)
    n_hold = round(n * s.holdout)
    n_train = n - n_val - n_hold
    if min(n_val, n_hold) < MIN_SPLIT_ROWS or n_train < MIN_SPLIT_ROWS:
        need = math.ceil(MIN_SPLIT_ROWS / min(s.validation, s.holdout))
        raise DataError(
            f"only {n} normal rows to fit on; the split needs at least {need} "
            f"(>= {MIN_SPLIT_ROWS} rows each for validation and holdout)",
            "provide more rows of normal data",
        )
    order = np.random.default_rng(cfg.model.seed).permutation(n) if s.shuffle else np.arange(n)
    return Splits(
        train=np.sort(order[:n_train]),
        validation=np.sort(order[n_train : n_train + n_val]),
        holdout=np.sort(order[n_train + n_val :]),
    )


def constant_columns(x: F64) -> tuple[list[int], list[int]]:
    """Indices of all-missing and of constant columns of ``x`` (NaN ignored).

    A column counts as constant when its spread is at most 1e-9 of its magnitude: scaling
    by such a spread would turn float noise into huge model inputs.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: handled below
        lo = np.nanmin(x, axis=0)
        hi = np.nanmax(x, axis=0)
    empty = np.isnan(lo)
    spread = hi - lo
    tol = 1e-9 * np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)))
    constant = ~empty & (spread <= tol)
    return np.flatnonzero(empty).tolist(), np.flatnonzero(constant).tolist()


def _handle_constant(
    ds: datalib.Dataset, splits: Splits, cfg: TrainConfig
) -> tuple[datalib.Dataset, tuple[str, ...]]:
    """Refuse, or drop, features that are constant or all-missing in the training split."""
    empty, constant = constant_columns(ds.x[splits.train])
    if not empty and not constant:
        return ds, ()
    names = ds.feature_names
    desc = "; ".join(
        part
        for part in (
            f"all missing: {[names[i] for i in empty]}" if empty else "",
            f"constant: {[names[i] for i in constant]}" if constant else "",
        )
        if part
    )
    if cfg.preprocess.constant_columns == "error":
        raise DataError(
            f"training split has unusable feature columns ({desc})",
            "remove them from data.features (or data.exclude), or set "
            "preprocess.constant_columns: drop",
        )
    keep = [i for i in range(len(names)) if i not in set(empty) | set(constant)]
    if not keep:
        raise DataError(
            f"every feature column is constant or all missing ({desc})", "check the data"
        )
    dropped = tuple(names[i] for i in range(len(names)) if i not in keep)
    kept = dataclasses.replace(
        ds, feature_names=tuple(names[i] for i in keep), x=np.ascontiguousarray(ds.x[:, keep])
    )
    return kept, dropped


@dataclass(frozen=True, eq=False)
class Prepared:
    """The checked inputs of a run (stage 1 output)."""

    dataset: datalib.Dataset
    rows_read: int
    dropped_anomalies: int
    dropped_columns: tuple[str, ...]
    splits: Splits
    evaluation: datalib.Dataset | None


def prepare(cfg: TrainConfig, progress: Progress = _silent) -> Prepared:
    """Load, filter and split the data, and load the evaluation data: every user error here."""
    ds = load_training_data(cfg, progress)
    rows_read = ds.n_rows
    dropped_anomalies = 0
    if ds.labels is not None and cfg.data.drop_anomalies:
        normal = ds.labels == 0
        dropped_anomalies = int((~normal).sum())
        ds = dataclasses.replace(ds, x=np.ascontiguousarray(ds.x[normal]), labels=ds.labels[normal])
    progress(
        f"read {rows_read} rows x {len(ds.feature_names)} features from {ds.source}"
        + (f" (delimiter {ds.delimiter!r})" if ds.delimiter else "")
        + (f"; dropped {dropped_anomalies} labelled anomalous" if dropped_anomalies else "")
        + (f"; skipped {ds.skipped_records} undecodable" if ds.skipped_records else "")
    )
    splits = split_rows(ds.n_rows, cfg)
    ds, dropped = _handle_constant(ds, splits, cfg)
    if dropped:
        progress(f"dropped constant/all-missing columns: {', '.join(dropped)}")
    evaluation = None
    e = cfg.evaluate
    if e.path is not None:
        evaluation = load_labelled_data(
            e.path,
            ds.feature_names,
            e.label_column,
            fmt=e.format,
            delimiter=e.delimiter,
            decimal=e.decimal,
            rows=e.rows,
            truth=e.truth,
            device_column=e.device_column,
            timestamp_column=e.timestamp_column,
        )
        progress(
            f"evaluation data: {evaluation.n_rows} rows "
            f"({int(evaluation.labels.sum()) if evaluation.labels is not None else 0} "
            f"anomalous) from {evaluation.source}"
        )
    return Prepared(ds, rows_read, dropped_anomalies, dropped, splits, evaluation)


# --------------------------------------------------------------------------------------
# Stage 2: fitting
# --------------------------------------------------------------------------------------


def fit_preprocessor(x_train: F64, scaler: str, impute: str) -> Preprocessor:
    """Fit SimpleImputer + MinMaxScaler/StandardScaler on the training split and freeze them."""
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    imputer = SimpleImputer(strategy=impute).fit(x_train)
    sk_scaler = MinMaxScaler() if scaler == "minmax" else StandardScaler()
    sk_scaler.fit(imputer.transform(x_train))
    try:
        return Preprocessor.from_sklearn(imputer, sk_scaler)
    except ValueError as e:  # constant columns are caught earlier; keep the message anyway
        raise DataError(str(e), "set preprocess.constant_columns: drop") from None


def _fit_model(
    cfg: TrainConfig,
    z_train: npt.NDArray[np.float32],
    z_val: npt.NDArray[np.float32],
    progress: Progress,
) -> tuple[Any, FitHistory, tuple[Trial, ...], int, Any]:
    """Fit one model, or run the search; returns (model, history, trials, best, hp)."""
    from trainer.model import build_autoencoder, fit_autoencoder, seed_everything
    from trainer.tune import search

    out_act = cfg.output_activation
    if cfg.tune.method != "none":
        res = search(z_train, z_val, cfg.model, cfg.tune, out_act, progress)
        return res.model, res.history, res.trials, res.best, res.hp
    hp = cfg.model
    if not valid_bottleneck(hp):
        raise TrainerError(
            f"model.code_size {hp.code_size} is not smaller than every hidden width "
            f"{list(hp.hidden)}",
            "make the code layer the narrowest layer",
        )
    seed_everything(hp.seed, hp.deterministic)
    model = build_autoencoder(z_train.shape[1], hp, out_act)
    progress(
        f"fitting autoencoder {_architecture(z_train.shape[1], hp.hidden, hp.code_size)} "
        f"on {len(z_train)} rows, validating on {len(z_val)}"
    )
    hist = fit_autoencoder(model, z_train, z_val, hp, progress)
    return model, hist, (), -1, hp


def _architecture(n: int, hidden: tuple[int, ...], code: int) -> str:
    widths = [n, *hidden, code, *reversed(hidden), n]
    return " → ".join(str(w) for w in widths)


def train(cfg: TrainConfig, progress: Progress | None = None, *, save: bool = True) -> TrainResult:
    """Run the whole pipeline (see the module contract) and save a new registry version.

    Args:
        cfg: a validated config (:func:`trainer.config.load_config`).
        progress: sink for progress lines; None for silence.
        save: write the artifact to ``cfg.registry`` (and the report to ``cfg.report.dir``).

    Raises:
        TrainerError: a user error (nothing was written).
        detector.DetectorError: the fitted model is unusable (e.g. a zero threshold).
    """
    say = progress or _silent
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    # Progress of the checking stage is held back until it passes, so a user error is the
    # only line the user sees.
    held: list[str] = []
    prep = prepare(cfg, held.append)
    for line in held:
        say(line)
    ds, splits = prep.dataset, prep.splits
    timings["load_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x_train, x_val, x_hold = ds.x[splits.train], ds.x[splits.validation], ds.x[splits.holdout]
    pre = fit_preprocessor(x_train, cfg.preprocess.scaler, cfg.preprocess.impute)
    z_train, z_val = pre.transform(x_train), pre.transform(x_val)
    timings["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, hist, trials, best, hp = _fit_model(cfg, z_train, z_val, say)
    if not math.isfinite(hist.best_val_loss):
        raise TrainerError(
            "training diverged: the validation loss is not finite",
            "lower model.learning_rate or check the data for extreme values",
        )
    timings["fit"] = time.perf_counter() - t0
    say(
        f"fit done: best epoch {hist.best_epoch}/{len(hist.loss)}, val_loss "
        f"{hist.best_val_loss:.6f}, {hist.seconds:.1f} s"
    )

    t0 = time.perf_counter()
    network = DenseNetwork.from_keras(model)
    n = len(ds.feature_names)
    info = ModelInfo(
        name=cfg.name,
        trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training_fingerprint=fingerprint(x_train),
    )
    # Score the holdout through Detector.score, the worker's code path; the provisional
    # threshold is replaced right after.
    provisional = Detector(
        feature_names=ds.feature_names,
        preprocessor=pre,
        network=network,
        threshold=Threshold("mean_k_std", cfg.threshold.k, 1.0, 0.0, 0.0, 0),
        feature_error_mean=np.zeros(n),
        feature_error_std=np.zeros(n),
        info=info,
    )
    hold_scores = provisional.score(x_hold)
    t = cfg.threshold
    param = t.k if t.method == "mean_k_std" else t.percentile
    threshold = fit_threshold(hold_scores.score, t.method, param)
    fe = hold_scores.feature_error.astype(np.float64)
    det = dataclasses.replace(
        provisional,
        threshold=threshold,
        feature_error_mean=fe.mean(axis=0),
        feature_error_std=fe.std(axis=0),
        extra={
            "trainer": "anomaly-train",
            "hyperparameters": _plain(params_of(hp)),
            "output_activation": cfg.output_activation,
            "dropped_columns": list(prep.dropped_columns),
            "training_rows": len(splits.train),
            "holdout_rows": len(splits.holdout),
        },
    )
    timings["threshold"] = time.perf_counter() - t0
    say(
        f"threshold {threshold.value:.6g} ({t.method}, param {param:g}) from "
        f"{threshold.n} holdout errors (mean {threshold.error_mean:.6g}, "
        f"std {threshold.error_std:.6g})"
    )

    t0 = time.perf_counter()
    metrics = _metrics(cfg, prep, det, hist, trials, best, hp, model, hold_scores)
    ev = prep.evaluation
    eval_score = codes_eval = None
    if ev is not None and ev.labels is not None:
        em = evaluate_detector(det, ev.x, ev.labels)
        metrics["evaluation"] = {"source": ev.source} | em
        eval_score = det.score(ev.x).score
        codes_eval = network.encode(pre.transform(ev.x))
        say(
            f"evaluation: precision {em['precision']:.3f} recall {em['recall']:.3f} "
            f"F1 {em['f1']:.3f} ROC-AUC {_fmt_opt(em['roc_auc'])}"
        )
    timings["evaluate"] = time.perf_counter() - t0
    timings["total_before_report"] = time.perf_counter() - t_all
    metrics["timings_s"] = {k: round(v, 3) for k, v in timings.items()}

    t0 = time.perf_counter()
    config_yaml = to_yaml(cfg)
    report = build_report(
        ReportInputs(
            name=cfg.name,
            metrics=metrics,
            config_yaml=config_yaml,
            history=hist,
            holdout=hold_scores,
            threshold=threshold,
            feature_names=ds.feature_names,
            feature_error_mean=det.feature_error_mean,
            feature_error_std=det.feature_error_std,
            codes_holdout=network.encode(pre.transform(x_hold)),
            eval_score=eval_score,
            eval_labels=ev.labels if ev is not None else None,
            codes_eval=codes_eval,
            plots=cfg.report.plots,
            max_points=cfg.report.max_points,
            seed=cfg.model.seed,
        )
    )
    timings["report"] = time.perf_counter() - t0

    artifact = None
    if save:
        t0 = time.perf_counter()
        extra = {"config.yaml": config_yaml.encode()} | report
        artifact = Registry(cfg.registry).save(det, keras_model=model, extra_files=extra)
        det = dataclasses.replace(det, info=dataclasses.replace(det.info, version=artifact.name))
        timings["save"] = time.perf_counter() - t0
        say(f"saved {artifact} (model {cfg.name} {artifact.name}, now current)")
        if cfg.report.dir:
            out = copy_report(report, Path(cfg.report.dir))
            say(f"report copied to {out / 'report.md'}")
    timings["total"] = time.perf_counter() - t_all
    metrics["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return TrainResult(
        detector=det,
        artifact=artifact,
        metrics=metrics,
        history=hist,
        trials=trials,
        dataset=ds,
        splits=splits,
        keras_model=model,
        report_files=report,
    )


def copy_report(report: dict[str, bytes], target: Path) -> Path:
    """Write the report files into ``target`` (created; a previous report there is replaced)."""
    if target.exists() and not target.is_dir():
        raise DataError(f"report.dir {target} is a file", "point report.dir at a directory")
    stale = target / "report.md"
    if stale.exists():
        # Only our own files are removed, so a mistyped report.dir cannot wipe a folder.
        for name in ("report.md", "metrics.json", *(f"{p}.png" for p in _PLOTS)):
            (target / name).unlink(missing_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    for rel, blob in report.items():
        (target / Path(rel).name).write_bytes(blob)
    return target


_PLOTS = ("loss", "errors", "latent", "pr_curve", "feature_errors")


def _fmt_opt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def _metrics(
    cfg: TrainConfig,
    prep: Prepared,
    det: Detector,
    hist: FitHistory,
    trials: tuple[Trial, ...],
    best: int,
    hp: Any,
    model: Any,
    hold: Scores,
) -> dict[str, Any]:
    ds = prep.dataset
    n = len(ds.feature_names)
    return {
        "name": cfg.name,
        "trained_at": det.info.trained_at,
        "data": {
            "source": ds.source,
            "format": cfg.data_format,
            "delimiter": ds.delimiter,
            "rows": prep.rows_read,
            "dropped_anomalies": prep.dropped_anomalies,
            "skipped_records": ds.skipped_records,
            "ignored_columns": list(ds.ignored_columns),
            "dropped_columns": list(prep.dropped_columns),
            "fingerprint": det.info.training_fingerprint,
        },
        "splits": {
            "train": len(prep.splits.train),
            "validation": len(prep.splits.validation),
            "holdout": len(prep.splits.holdout),
            "shuffle": cfg.split.shuffle,
        },
        "model": {
            "feature_names": list(ds.feature_names),
            "architecture": _architecture(n, hp.hidden, hp.code_size),
            "hyperparameters": to_mapping(hp),
            "output_activation": cfg.output_activation,
            "scaler": cfg.preprocess.scaler,
            "imputer": cfg.preprocess.impute,
            "parameters": int(model.count_params()),
        },
        "training": hist.to_dict() | {"epochs_run": len(hist.loss)},
        "tuning": (
            {
                "method": cfg.tune.method,
                "trials": [t.to_dict() for t in trials],
                "best_trial": trials[best].index,
            }
            if trials
            else None
        ),
        "threshold": det.threshold.to_dict(),
        "holdout": reconstruction_metrics(hold),
        "holdout_flagged_pct": float(100 * np.mean(hold.score > det.threshold.value)),
        "feature_error": {
            "mean": det.feature_error_mean.tolist(),
            "std": det.feature_error_std.tolist(),
        },
        "evaluation": None,
    }
