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
from detector.core import WatchedConstant
from detector.offline import device_groups, score_rows
from detector.smoothing import ewma_series
from trainer import data as datalib
from trainer.config import (
    ModelConfig,
    TrainConfig,
    delimiter_char,
    from_mapping,
    resolve_format,
    split_size,
    to_mapping,
    to_yaml,
)
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


def load_training_data(
    cfg: TrainConfig, progress: Progress = _silent, table: datalib.RawTable | None = None
) -> datalib.Dataset:
    """Read the configured normal data and apply the column rules (see :mod:`trainer.data`).

    ``table``: already read rows (one entity's, :func:`train_many`) instead of ``data.path``.
    """
    d = cfg.data
    fmt = cfg.data_format
    timestamp: str | None = d.timestamp_column
    device: str | None = d.device_column
    if table is not None:
        pass
    elif fmt == "kafka":
        from trainer.replay import read_kafka

        table = read_kafka(d.kafka, progress)
        timestamp = d.kafka.timestamp_field
        device = d.kafka.device_field
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
    entity = (d.entity_column,) if d.entity_column and d.entity_column in table.cells else ()
    return datalib.select(
        table,
        d.features,
        exclude=(*d.exclude, *entity),
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
        # Device and timestamp columns (when present) group and order rows for windows.
        return datalib.select(
            table,
            features,
            label_column=label_column,
            require_label=True,
            timestamp_column=timestamp_column if timestamp_column in table.cells else None,
            device_column=device_column if device_column in table.cells else None,
        )
    keys = datalib.read_truth(truth)
    labels = datalib.labels_from_truth(table, keys, device_column, timestamp_column)
    ds = datalib.select(
        table, features, timestamp_column=timestamp_column, device_column=device_column
    )
    return dataclasses.replace(ds, labels=labels)


def time_order(ds: datalib.Dataset) -> npt.NDArray[np.intp]:
    """Row indices in time order: by timestamp (stable) when every row has one, else row order."""
    if ds.times_ms is None:
        return np.arange(ds.n_rows, dtype=np.intp)
    return np.argsort(ds.times_ms, kind="stable").astype(np.intp)


def _split_count(value: int | float | str, key: str, n: int, times: F64 | None, end: int) -> int:
    """Rows of a split of size ``value`` ending just before row ``end`` of the time order."""
    kind, amount = split_size(value, key)
    if kind == "fraction":
        return round(n * amount)
    if kind == "rows":
        return int(amount)
    if times is None:
        raise DataError(
            f"{key} = {value!r} is a duration but the data has no readable timestamps",
            "give the size as a fraction or a number of rows, or set data.timestamp_column",
        )
    if end <= 0:
        return 0
    last = times[end - 1]
    # Rows whose time lies within the duration before the last row of this part.
    first = int(np.searchsorted(times[:end], last - amount, side="right"))
    return end - first


def split_rows(ds: datalib.Dataset, cfg: TrainConfig) -> Splits:
    """Train / validation / holdout indices: chronological by default, or random (seeded).

    Chronological (``split.shuffle: false``): rows in time order (timestamps, else row
    order); the holdout is the latest ``split.holdout`` of them, validation the
    ``split.validation`` before it, training the rest. Sizes are fractions, rows or
    durations (:func:`trainer.config.split_size`).

    Raises:
        DataError: too few rows for a validation and a holdout split of at least
            :data:`MIN_SPLIT_ROWS` rows each and a training split at least as large.
    """
    s = cfg.split
    n = ds.n_rows
    if s.shuffle:
        order = np.random.default_rng(cfg.model.seed).permutation(n).astype(np.intp)
        times = None
        for key in ("validation", "holdout"):
            if split_size(getattr(s, key), f"split.{key}")[0] == "ms":
                raise DataError(
                    f"split.{key} is a duration but split.shuffle is true",
                    "durations select the latest data: set split.shuffle: false",
                )
    else:
        order = time_order(ds)
        times = None if ds.times_ms is None else ds.times_ms[order]
    n_hold = _split_count(s.holdout, "split.holdout", n, times, n)
    n_val = _split_count(s.validation, "split.validation", n, times, n - n_hold)
    n_train = n - n_val - n_hold
    if min(n_val, n_hold) < MIN_SPLIT_ROWS or n_train < MIN_SPLIT_ROWS:
        fracs = [v for v in (s.validation, s.holdout) if isinstance(v, float)]
        need = math.ceil(MIN_SPLIT_ROWS / min(fracs)) if fracs else 3 * MIN_SPLIT_ROWS
        raise DataError(
            f"only {n} normal rows to fit on; the split ({n_train} train / {n_val} validation / "
            f"{n_hold} holdout) needs at least {need} "
            f"(>= {MIN_SPLIT_ROWS} rows each for training, validation and holdout)",
            "provide more rows of normal data, or smaller split sizes",
        )
    return Splits(
        train=np.sort(order[:n_train]),
        validation=np.sort(order[n_train : n_train + n_val]),
        holdout=np.sort(order[n_train + n_val :]),
    )


def window_rows(ds: datalib.Dataset, w: int) -> npt.NDArray[np.intp]:
    """For every row, the rows of its window (its device's last ``w`` rows in time order,
    oldest first), int (n, w); ``-1`` in every column for a row without ``w`` readings yet
    since the device's first row or its last gap (:data:`GAP_FACTOR`)."""
    n = ds.n_rows
    out = np.full((n, w), -1, dtype=np.intp)
    order = time_order(ds)
    devs = ds.device_ids
    keys = [devs[i] for i in order] if devs is not None else None
    groups = device_groups(n, keys)
    for g in groups:
        rows = order[g]  # this device's rows in time order
        for seg in _contiguous(rows, ds.times_ms):
            if len(seg) >= w:
                out[seg[w - 1 :]] = np.lib.stride_tricks.sliding_window_view(seg, w)
    return out


GAP_FACTOR = 3.0
"""A step longer than this many times a device's median step between readings is a gap:
no window spans it (the readings on either side were not taken one after the other)."""


def _contiguous(rows: npt.NDArray[np.intp], times: F64 | None) -> list[npt.NDArray[np.intp]]:
    """One device's time-ordered ``rows`` cut at gaps (all of them without timestamps)."""
    if times is None or len(rows) < 3:
        return [rows]
    dt = np.diff(times[rows])
    median = float(np.median(dt))
    if median <= 0:
        return [rows]
    cuts = np.flatnonzero(dt > GAP_FACTOR * median) + 1
    return list(np.split(rows, cuts))


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
) -> tuple[datalib.Dataset, tuple[str, ...], tuple[str, ...], tuple[WatchedConstant, ...]]:
    """Refuse, or drop, features that are constant or all-missing in the training split.

    Returns the dataset without them, the names dropped as all-missing, as constant, and
    the constant ones as :class:`~detector.WatchedConstant` (training value, tolerance).
    """
    empty, constant = constant_columns(ds.x[splits.train])
    if not empty and not constant:
        return ds, (), (), ()
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
    tol = cfg.preprocess.constant_tolerance
    watched = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.nanmin(ds.x[splits.train], axis=0)
    for i in constant:
        v = float(values[i])
        watched.append(WatchedConstant(names[i], v, tol * max(1.0, abs(v))))
    kept = dataclasses.replace(
        ds, feature_names=tuple(names[i] for i in keep), x=np.ascontiguousarray(ds.x[:, keep])
    )
    return (
        kept,
        tuple(names[i] for i in empty),
        tuple(names[i] for i in constant),
        tuple(watched),
    )


@dataclass(frozen=True, eq=False)
class Prepared:
    """The checked inputs of a run (stage 1 output).

    ``dropped_columns`` = ``dropped_empty`` + ``dropped_constant``; ``imputed`` counts the
    missing values per kept feature over the rows used (filled with the imputer's value).
    """

    dataset: datalib.Dataset
    rows_read: int
    dropped_anomalies: int
    dropped_columns: tuple[str, ...]
    splits: Splits
    evaluation: datalib.Dataset | None
    dropped_empty: tuple[str, ...] = ()
    dropped_constant: tuple[str, ...] = ()
    constants: tuple[WatchedConstant, ...] = ()
    imputed: dict[str, int] = dataclasses.field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def prepare(
    cfg: TrainConfig, progress: Progress = _silent, table: datalib.RawTable | None = None
) -> Prepared:
    """Load, filter and split the data, and load the evaluation data: every user error here."""
    ds = load_training_data(cfg, progress, table)
    rows_read = ds.n_rows
    dropped_anomalies = 0
    if ds.labels is not None and cfg.data.drop_anomalies:
        normal = ds.labels == 0
        dropped_anomalies = int((~normal).sum())
        ds = ds.rows(np.flatnonzero(normal))
    progress(
        f"read {rows_read} rows x {len(ds.feature_names)} features from {ds.source}"
        + (f" (delimiter {ds.delimiter!r})" if ds.delimiter else "")
        + (f"; dropped {dropped_anomalies} labelled anomalous" if dropped_anomalies else "")
        + (f"; skipped {ds.skipped_records} undecodable" if ds.skipped_records else "")
    )
    notes: list[str] = []
    if ds.ignored_columns:
        notes.append(
            f"ignored {len(ds.ignored_columns)} non-numeric column(s): "
            f"{', '.join(ds.ignored_columns)}"
        )
    if ds.time_note and not cfg.split.shuffle:
        notes.append(f"timestamps unreadable ({ds.time_note}); row order stands for time")
    splits = split_rows(ds, cfg)
    ds, empty, constant, watched = _handle_constant(ds, splits, cfg)
    dropped = empty + constant
    if empty:
        notes.append(
            f"dropped {len(empty)} all-missing column(s) (no value in the training split): "
            f"{', '.join(empty)}"
        )
    if constant:
        notes.append(
            f"dropped {len(constant)} constant column(s), watched at scoring time "
            f"(a change makes a reading anomalous): "
            + ", ".join(f"{c.name}={c.value:g}" for c in watched)
        )
    missing = np.isnan(ds.x).sum(axis=0)
    imputed = {ds.feature_names[j]: int(c) for j, c in enumerate(missing.tolist()) if c}
    if imputed:
        notes.append(
            f"{sum(imputed.values())} missing value(s) in {len(imputed)} feature(s) will be "
            f"imputed ({cfg.preprocess.impute} of the training split): "
            + ", ".join(f"{k} {v}" for k, v in imputed.items())
        )
    for line in notes:
        progress(f"warning: {line}")
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
    return Prepared(
        ds,
        rows_read,
        dropped_anomalies,
        dropped,
        splits,
        evaluation,
        dropped_empty=empty,
        dropped_constant=constant,
        constants=watched,
        imputed=imputed,
        warnings=tuple(notes),
    )


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


def step_units(hp: ModelConfig, n_features: int) -> int:
    """Width of the per-reading layer of a windowed model (0 = none, and always for w = 1)."""
    if hp.window == 1:
        return 0
    if hp.step_units is not None:
        return hp.step_units
    return max(2, min(8, round(n_features / 2)))


def auto_shape(n_inputs: int) -> tuple[tuple[int, ...], int]:
    """The default architecture for ``n_inputs`` model inputs: hidden ``[4c, 2c]``, code ``c``.

    ``c = clamp(round(n_inputs / 3), 1, 8)``: strictly narrower than the input from two
    inputs up (8 → 3, 16 → 5, 38 → 8 as the classic tutorial's 38 → 32 → 16 → 8), so the
    bottleneck always compresses.
    """
    code = max(1, min(8, round(n_inputs / 3)))
    return (4 * code, 2 * code), code


def auto_batch(n_train: int) -> int:
    """Default batch size: 256, but small enough for ~20 optimiser steps per epoch (at
    least 16), so epochs and patience mean the same on 300 rows as on 300,000."""
    return min(256, max(16, n_train // 20))


def resolve_shape(
    hp: ModelConfig, n_inputs: int, n_train: int = 1_000_000
) -> tuple[ModelConfig, list[str]]:
    """``hp`` with ``hidden``/``code_size`` (and ``batch_size``) filled in, and warnings.

    A configured code size as wide as the input or wider is kept, with a warning: such a
    network can learn the identity, and its errors then say little.
    """
    hidden, code = auto_shape(n_inputs)
    out = dataclasses.replace(
        hp,
        hidden=hp.hidden if hp.hidden is not None else hidden,
        code_size=hp.code_size if hp.code_size is not None else code,
        batch_size=hp.batch_size if hp.batch_size is not None else auto_batch(n_train),
    )
    notes = []
    assert out.code_size is not None
    if out.code_size >= n_inputs:
        notes.append(
            f"model.code_size {out.code_size} is not narrower than the {n_inputs} model inputs: "
            "the autoencoder can copy its input and its errors lose meaning; set "
            f"model.code_size below {n_inputs} (or null for auto)"
        )
    return out, notes


def _fit_model(
    cfg: TrainConfig,
    hp: ModelConfig,
    z_train: npt.NDArray[np.float32],
    z_val: npt.NDArray[np.float32],
    progress: Progress,
    units: int = 0,
) -> tuple[Any, FitHistory, tuple[Trial, ...], int, Any]:
    """Fit one model, or run the search; returns (model, history, trials, best, hp)."""
    from trainer.model import build_autoencoder, fit_autoencoder, seed_everything
    from trainer.tune import search

    out_act = cfg.output_activation
    w = hp.window
    if cfg.tune.method != "none":
        res = search(z_train, z_val, hp, cfg.tune, out_act, progress, w, units)
        return res.model, res.history, res.trials, res.best, res.hp
    if not valid_bottleneck(hp):
        raise TrainerError(
            f"model.code_size {hp.code_size} is not smaller than every hidden width "
            f"{list(hp.hidden or ())}",
            "make the code layer the narrowest layer",
        )
    seed_everything(hp.seed, hp.deterministic)
    model = build_autoencoder(z_train.shape[1], hp, out_act, w, units)
    progress(
        f"fitting autoencoder {_describe(z_train.shape[1], hp, w, units)} "
        f"on {len(z_train)} rows, validating on {len(z_val)}"
    )
    hist = fit_autoencoder(model, z_train, z_val, hp, progress)
    return model, hist, (), -1, hp


def _describe(n: int, hp: Any, w: int = 1, units: int = 0) -> str:
    """The layer widths of the model ``hp`` builds on ``n`` inputs (progress line, report)."""
    if getattr(hp, "architecture", "dense") == "conv1d":
        d = n // max(w, 1)
        k, st = hp.conv_kernel, hp.conv_stride
        enc = [f"conv {f}×k{k}/s{st}" for f in hp.conv_filters]
        dec = [f"deconv {f}×k{k}/s{st}" for f in reversed(hp.conv_filters)]
        return " → ".join([f"{w}×{d}", *enc, *dec, f"deconv {d}×k{k}", f"{w}×{d}"])
    return _architecture(n, hp.hidden, hp.code_size, w, units)


def _architecture(
    n: int, hidden: tuple[int, ...] | None, code: int | None, w: int = 1, units: int = 0
) -> str:
    mid = [*(hidden or ()), code, *reversed(hidden or ())]
    if w > 1 and units > 0:
        step = f"{w}×{n // w}"
        widths = [step, f"{w}×{units}", *mid, f"{w}×{units}", step]
    else:
        widths = [n, *mid, n]
    return " → ".join(str(v) for v in widths)


def _windows(
    x: F64, win: npt.NDArray[np.intp], rows: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.intp]]:
    """Raw windows (m, w, d) of those ``rows`` that have a full window, and those rows."""
    ok = rows[win[rows, 0] >= 0]
    return x[win[ok]].astype(np.float32), ok


def _flat(pre: Preprocessor, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    m, w, d = windows.shape
    return pre.transform(windows.reshape(m * w, d)).reshape(m, w * d)


def _decision(
    scores: F64, rows: npt.NDArray[np.intp], ds: datalib.Dataset, alpha: float | None
) -> F64:
    """Per-device EWMA of ``scores`` (one per entry of ``rows``) in time order.

    Without ``alpha``, the raw scores."""
    if alpha is None:
        return scores
    out = np.empty_like(scores)
    rank = np.empty(ds.n_rows, dtype=np.intp)
    rank[time_order(ds)] = np.arange(ds.n_rows)
    devs = None if ds.device_ids is None else [ds.device_ids[r] for r in rows]
    for g in device_groups(len(rows), devs):
        g = g[np.argsort(rank[rows[g]], kind="stable")]
        # The state restarts after a time gap, as a stream's smoothing would have forgotten.
        for seg in _contiguous(
            np.arange(len(g)), None if ds.times_ms is None else ds.times_ms[rows[g]]
        ):
            out[g[seg]] = ewma_series(scores[g[seg]], alpha)
    return out


def train(
    cfg: TrainConfig,
    progress: Progress | None = None,
    *,
    save: bool = True,
    table: datalib.RawTable | None = None,
) -> TrainResult:
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
    prep = prepare(cfg, held.append, table)
    for line in held:
        say(line)
    ds, splits = prep.dataset, prep.splits
    w = cfg.model.window
    win = window_rows(ds, w)
    x_train_w, r_train = _windows(ds.x, win, splits.train)
    x_val_w, r_val = _windows(ds.x, win, splits.validation)
    x_hold_w, r_hold = _windows(ds.x, win, splits.holdout)
    if min(len(r_val), len(r_hold)) < MIN_SPLIT_ROWS or len(r_train) < MIN_SPLIT_ROWS:
        raise DataError(
            f"with model.window {w}, only {len(r_train)} / {len(r_val)} / {len(r_hold)} "
            "train / validation / holdout readings have a full window of their device",
            "lower model.window or provide more rows per device",
        )
    warn = list(prep.warnings)
    d = len(ds.feature_names)
    units = step_units(cfg.model, d)
    hp, shape_notes = resolve_shape(cfg.model, w * (units or d), len(r_train))
    for line in shape_notes:
        say(f"warning: {line}")
    warn += shape_notes
    timings["load_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x_train = ds.x[splits.train]
    pre = fit_preprocessor(x_train, cfg.preprocess.scaler, cfg.preprocess.impute)
    z_train, z_val = _flat(pre, x_train_w), _flat(pre, x_val_w)
    timings["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, hist, trials, best, hp = _fit_model(cfg, hp, z_train, z_val, say, units)
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
    if not hist.stopped_early:
        note = (
            f"training stopped at the epoch cap ({len(hist.loss)} epochs, best epoch "
            f"{hist.best_epoch}) before early stopping: the model may still improve; raise "
            "model.epochs (or model.learning_rate)"
        )
        say(f"warning: {note}")
        warn.append(note)

    t0 = time.perf_counter()
    network = DenseNetwork.from_keras(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanmin(x_train, axis=0), np.nanmax(x_train, axis=0)
    info = ModelInfo(
        name=cfg.name,
        trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training_fingerprint=fingerprint(x_train),
    )
    alpha = cfg.scoring.ewma_alpha
    # Score the holdout through Detector.score_windows, the worker's code path; the
    # provisional threshold is replaced right after.
    provisional = Detector(
        feature_names=ds.feature_names,
        preprocessor=pre,
        network=network,
        threshold=Threshold("mean_k_std", cfg.threshold.k, 1.0, 0.0, 0.0, 0),
        feature_error_mean=np.zeros(d),
        feature_error_std=np.zeros(d),
        info=info,
        window=w,
        ewma_alpha=alpha,
        train_min=np.asarray(lo, dtype=np.float64),
        train_max=np.asarray(hi, dtype=np.float64),
        constants=prep.constants,
    )
    hold_scores = provisional.score_windows(x_hold_w)
    hold_decision = _decision(hold_scores.score, r_hold, ds, alpha)
    t = cfg.threshold
    param = t.k if t.method == "mean_k_std" else t.percentile
    threshold = fit_threshold(hold_decision, t.method, param)
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
        f"{threshold.n} holdout {'smoothed ' if alpha else ''}"
        f"{'window ' if w > 1 else ''}errors (mean {threshold.error_mean:.6g}, "
        f"std {threshold.error_std:.6g})"
    )

    t0 = time.perf_counter()
    metrics = _metrics(cfg, prep, det, hist, trials, best, hp, model, hold_scores, w * d, units)
    metrics["warnings"] = warn
    ev = prep.evaluation
    eval_score = eval_labels = codes_eval = None
    if ev is not None and ev.labels is not None:
        rs = score_rows(det, ev.x, ev.device_ids)
        em = evaluate_detector(det, ev.x, ev.labels, ev.device_ids, rows=rs)
        metrics["evaluation"] = {"source": ev.source} | em
        eval_score = rs.decision[rs.scored]
        eval_labels = ev.labels[rs.scored]
        if w == 1:
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
            holdout=Scores(hold_decision, hold_scores.feature_error, hold_scores.reconstruction),
            threshold=threshold,
            feature_names=ds.feature_names,
            feature_error_mean=det.feature_error_mean,
            feature_error_std=det.feature_error_std,
            codes_holdout=network.encode(_flat(pre, x_hold_w)),
            eval_score=eval_score,
            eval_labels=eval_labels,
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


_DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".ndjson", ".json")


def _entity_name(base: str, entity: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in entity).strip("._-")
    return f"{base}-{safe or 'entity'}"[:64]


def entities(cfg: TrainConfig) -> list[tuple[str, TrainConfig, datalib.RawTable | None]]:
    """The per-entity runs of a config: ``(entity, config, rows)``.

    ``data.per_file`` (``data.path`` a folder): one run per data file in it (sorted;
    ``rows`` None, each file is read by its run). ``data.entity_column``: the file is read
    once and split by that column's value (first-seen order). Otherwise: one run, the config itself.
    """
    d = cfg.data
    if d.per_file and d.path is not None:
        files = sorted(p for p in Path(d.path).iterdir() if p.suffix.lower() in _DATA_SUFFIXES)
        if not files:
            raise DataError(f"folder {d.path} holds no CSV or JSON Lines files", "check data.path")
        out: list[tuple[str, TrainConfig, datalib.RawTable | None]] = []
        for f in files:
            doc = to_mapping(cfg)
            doc["data"]["path"] = str(f)
            doc["data"]["per_file"] = False
            doc["name"] = _entity_name(cfg.name, f.stem)
            if cfg.report.dir:
                doc["report"]["dir"] = str(Path(cfg.report.dir) / f.stem)
            out.append((f.stem, from_mapping(doc), None))
        return out
    if d.entity_column is None:
        return [("", cfg, None)]
    if cfg.data_format == "kafka":
        raise DataError("data.entity_column is not supported for Kafka replays", "export to a file")
    table = datalib.read_table(
        cfg.data_format,
        d.path,
        delimiter=delimiter_char(d.delimiter, "data.delimiter"),
        decimal=d.decimal,
        fields=datalib.RecordFields(
            d.kafka.device_field, d.kafka.timestamp_field, d.kafka.values_field
        ),
    )
    if d.entity_column not in table.cells:
        raise datalib.missing_column(table, d.entity_column, "entity")
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(table.cells[d.entity_column]):
        groups.setdefault("" if v is None else str(v), []).append(i)
    out = []  # same type as above
    for value, rows in groups.items():
        doc = to_mapping(cfg)
        doc["name"] = _entity_name(cfg.name, value)
        if cfg.report.dir:
            doc["report"]["dir"] = str(Path(cfg.report.dir) / doc["name"])
        out.append((value, from_mapping(doc), table.take(rows)))
    return out


def train_many(
    cfg: TrainConfig, progress: Progress | None = None, *, save: bool = True
) -> list[tuple[str, TrainResult | TrainerError]]:
    """:func:`train` once per entity (:func:`entities`), in this one process, so TensorFlow
    is imported once. A user error of one entity is returned in its place; the others run.
    """
    say = progress or _silent
    out: list[tuple[str, TrainResult | TrainerError]] = []
    runs = entities(cfg)
    for i, (entity, sub, table) in enumerate(runs, start=1):
        say(f"entity {i}/{len(runs)}: {entity} -> model {sub.name}")
        try:
            out.append((entity, train(sub, progress, save=save, table=table)))
        except TrainerError as e:
            say(f"error: entity {entity}: {e}")
            out.append((entity, e))
    return out


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
    n_inputs: int,
    units: int = 0,
) -> dict[str, Any]:
    ds = prep.dataset
    n = n_inputs
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
            "dropped_all_missing": list(prep.dropped_empty),
            "dropped_constant": list(prep.dropped_constant),
            "watched_constants": [c.to_dict() for c in det.constants],
            "imputed_values": prep.imputed,
            "imputed_total": sum(prep.imputed.values()),
            "time_order": "timestamp" if ds.times_ms is not None else "row order",
            "fingerprint": det.info.training_fingerprint,
        },
        "splits": {
            "train": len(prep.splits.train),
            "validation": len(prep.splits.validation),
            "holdout": len(prep.splits.holdout),
            "shuffle": cfg.split.shuffle,
            "method": "random" if cfg.split.shuffle else "chronological",
        },
        "model": {
            "feature_names": list(ds.feature_names),
            "window": det.window,
            "ewma_alpha": det.ewma_alpha,
            "architecture": _describe(n, hp, det.window, units),
            "step_units": units,
            "hyperparameters": to_mapping(hp),
            "output_activation": cfg.output_activation,
            "scaler": cfg.preprocess.scaler,
            "imputer": cfg.preprocess.impute,
            "parameters": int(model.count_params()),
        },
        "training": hist.to_dict()
        | {"epochs_run": len(hist.loss), "stopped_at_cap": not hist.stopped_early},
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
