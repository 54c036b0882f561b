"""The trainer's one immutable configuration object, read from YAML at the edge.

Every setting is declared once, below, with its type, default and a docstring
(:func:`setting`), in the manner of faust's settings. :func:`load_config` reads a YAML file,
applies ``--set key.sub=value`` overrides, and builds a frozen :class:`TrainConfig`.
Unknown keys and bad values are refused with a :class:`~trainer.errors.ConfigError` whose one
line names the key and the fix (and the closest known key, for a typo).

Relative paths in the config are relative to the current working directory, like paths
given on the command line, so ``--set data.path=...`` behaves the same as the file.
"""

# ruff: noqa: RUF009 -- `setting()` returns a `dataclasses.field` with an immutable default.
from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from trainer.errors import ConfigError

Activation = Literal["relu", "tanh", "sigmoid", "elu", "linear"]
"""Activations the numpy scorer (:mod:`detector.network`) can run; nothing else is allowed."""

DataFormat = Literal["auto", "csv", "jsonl", "kafka"]

_CSV_SUFFIXES = {".csv", ".tsv", ".txt"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}


def setting(default: Any, doc: str, **bounds: float) -> Any:
    """Declare a config field: its default, a one-line doc, and numeric bounds.

    ``bounds`` keys: ``ge``, ``gt``, ``le``, ``lt`` (inclusive/exclusive limits), applied to a
    number or to every number in a list.
    """
    meta = {"doc": doc, **bounds}
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaSource:
    """A bounded replay of a Kafka topic (``data.format: kafka``).

    The replay reads from ``start_offset`` (or the first record at/after ``start_time``) up
    to ``end_offset`` (or ``end_time``), exclusive, on every selected partition, and then
    stops: it never waits for new records. ``latest`` means the high watermark at the moment
    the replay starts. Times select by the Kafka record timestamp (producer CreateTime).
    """

    bootstrap: str = setting("127.0.0.1:39092", "Kafka bootstrap servers, host:port[,host:port]")
    topic: str = setting("", "topic holding reading records")
    partitions: tuple[int, ...] | None = setting(None, "partitions to read; null = all", ge=0)
    start_offset: int | Literal["earliest"] = setting(
        "earliest", "first offset to read on each partition, or earliest", ge=0
    )
    end_offset: int | Literal["latest"] = setting(
        "latest", "stop before this offset on each partition, or latest (high watermark now)", ge=0
    )
    start_time: int | str | None = setting(
        None, "alternative to start_offset: epoch ms or ISO 8601 time (UTC if no zone)"
    )
    end_time: int | str | None = setting(
        None, "alternative to end_offset: epoch ms or ISO 8601 time, exclusive"
    )
    device_field: str = setting("device_id", "record field holding the device id")
    timestamp_field: str = setting("timestamp", "record field holding the reading time, epoch ms")
    values_field: str = setting("values", "record field holding the {sensor: value} object")
    timeout_s: float = setting(60.0, "give up if the bounded replay has not finished by then", gt=0)
    max_records: int | None = setting(None, "stop after this many records in total", ge=1)
    client_id: str = setting("anomaly-train", "Kafka client id, for broker logs and quotas")


@dataclass(frozen=True)
class DataConfig:
    """Where the normal training data comes from and which columns are features."""

    path: str | None = setting(None, "CSV or JSON Lines file (not used for format kafka)")
    format: DataFormat = setting("auto", "auto (from the file suffix), csv, jsonl or kafka")
    delimiter: str = setting("auto", "CSV delimiter: auto (detected), or one character, or tab")
    decimal: Literal[".", ","] = setting(".", "CSV decimal mark; ',' for some European exports")
    features: tuple[str, ...] | None = setting(
        None, "feature columns in model order; null = every numeric column"
    )
    exclude: tuple[str, ...] = setting((), "columns never used as features (with features: null)")
    timestamp_column: str | None = setting("timestamp", "timestamp column; never a feature")
    device_column: str | None = setting("device_id", "device id column; never a feature")
    label_column: str | None = setting(
        None, "0/1 anomaly label column in the training data, if any; never a feature"
    )
    entity_column: str | None = setting(
        None,
        "one model per distinct value of this column, named <name>-<value>, in one run; "
        "never a feature",
    )
    per_file: bool = setting(
        False,
        "data.path is a folder: one model per CSV/JSONL file in it, named <name>-<file stem>, "
        "in one run",
    )
    drop_anomalies: bool = setting(
        True, "with label_column: drop rows labelled anomalous before training"
    )
    rows: tuple[int | None, ...] | None = setting(
        None, "[start, stop] row slice (0-based, stop exclusive, null = open); e.g. [0, 400]"
    )
    kafka: KafkaSource = setting(KafkaSource(), "the bounded Kafka replay (format kafka)")


@dataclass(frozen=True)
class PreprocessConfig:
    """Imputation and scaling, fitted on the training split only."""

    scaler: Literal["minmax", "standard"] = setting(
        "minmax", "minmax (to [0, 1], as in the classic tutorial) or standard (z-scores)"
    )
    impute: Literal["mean", "median", "most_frequent"] = setting(
        "mean", "SimpleImputer strategy for missing values"
    )
    constant_columns: Literal["error", "drop"] = setting(
        "drop",
        "a constant or all-missing training column: drop it (a warning; constant ones are "
        "watched at scoring time), or error",
    )
    constant_tolerance: float = setting(
        1e-6,
        "a watched constant has changed when |value - training value| > this × max(1, |training "
        "value|)",
        ge=0,
    )


@dataclass(frozen=True)
class SplitConfig:
    """Normal rows are split into train / validation (early stopping) / threshold holdout."""

    validation: int | float | str = setting(
        0.15,
        "validation size (early stopping): a fraction < 1, a number of rows, or a duration "
        "like 10m / 2h / 1d (needs timestamps)",
    )
    holdout: int | float | str = setting(
        0.15,
        "threshold-holdout size: a fraction < 1, a number of rows, or a duration like 10m",
    )
    shuffle: bool = setting(
        False,
        "false = chronological (default): train, then validation, then holdout, in timestamp "
        "order (row order without one); true = random (seeded)",
    )


@dataclass(frozen=True)
class ModelConfig:
    """The dense autoencoder and how it is fitted."""

    hidden: tuple[int, ...] | None = setting(
        None,
        "encoder layer widths; the decoder mirrors; null = auto from the input width "
        "[4c, 2c] for code size c",
        ge=1,
    )
    code_size: int | None = setting(
        None,
        "width of the bottleneck (code) layer; null = auto: clamp(round(inputs / 3), 1, 8), "
        "always narrower than the input",
        ge=1,
    )
    window: int = setting(
        1,
        "readings per model input: the model sees a device's last `window` readings "
        "(flattened); 1 = per point",
        ge=1,
        le=512,
    )
    architecture: Literal["dense", "conv1d"] = setting(
        "dense",
        "dense = dense layers (on the flattened window when window > 1); conv1d = a 1-D "
        "convolutional autoencoder over the (window, features) input, shaped like SKAB's "
        "published Conv-AE (needs window >= 4, a multiple of conv_stride ** len(conv_filters))",
    )
    conv_filters: tuple[int, ...] = setting(
        (32, 16),
        "conv1d: encoder Conv1D filters; the decoder mirrors them with Conv1DTranspose, then a "
        "Conv1DTranspose to the feature count (SKAB's Conv-AE: 32, 16)",
        ge=1,
    )
    conv_kernel: int = setting(7, "conv1d: kernel size of every convolution", ge=1, le=64)
    conv_stride: int = setting(
        2, "conv1d: stride of the encoder convolutions and their mirrors", ge=1, le=8
    )
    conv_dropout: float = setting(
        0.2,
        "conv1d: dropout after each encoder/decoder convolution but the innermost and the "
        "last (training only; SKAB's Conv-AE: 0.2)",
        ge=0,
        lt=1,
    )
    step_units: int | None = setting(
        None,
        "windowed models: width of a per-reading layer shared by every step of the window "
        "(and its mirror before the output); null = auto clamp(round(features / 2), 2, 8); "
        "0 = none (dense layers on the whole flattened window)",
        ge=0,
    )
    activation: Activation = setting("relu", "hidden/code activation: relu tanh sigmoid elu linear")
    output_activation: Literal["auto", "relu", "tanh", "sigmoid", "elu", "linear"] = setting(
        "auto", "auto = sigmoid for the minmax scaler, linear for standard"
    )
    dropout: float = setting(
        0.0, "dropout rate after each hidden layer (training only)", ge=0, lt=1
    )
    l2: float = setting(0.0, "L2 weight penalty on every kernel", ge=0)
    learning_rate: float = setting(1e-3, "Adam learning rate", gt=0, le=1)
    epochs: int = setting(300, "maximum epochs (the report says when training stopped at it)", ge=1)
    batch_size: int | None = setting(
        None,
        "mini-batch size; null = auto: min(256, max(16, training rows // 20)), so a small "
        "export still gets ~20 steps per epoch",
        ge=1,
    )
    patience: int = setting(10, "early stopping: epochs without val_loss improvement", ge=1)
    min_delta: float = setting(0.0, "early stopping: smallest val_loss change that counts", ge=0)
    seed: int = setting(42, "seed for the split, weight init, shuffling and dropout", ge=0)
    deterministic: bool = setting(
        True, "enable TensorFlow op determinism, so one seed always gives the same weights"
    )


@dataclass(frozen=True)
class ScoringConfig:
    """How scores become decisions; stored in the artifact, applied by the worker."""

    ewma_alpha: float | None = setting(
        None,
        "per-device EWMA of the score before the threshold (0 < alpha <= 1; the threshold is "
        "fitted on smoothed holdout scores); null = off",
        gt=0,
        le=1,
    )


@dataclass(frozen=True)
class TuneConfig:
    """Hyperparameter search selected by validation loss. An empty list keeps the model value."""

    method: Literal["none", "grid", "random"] = setting("none", "none, grid or random search")
    trials: int = setting(10, "random search: number of distinct combinations tried", ge=1)
    code_size: tuple[int, ...] = setting((), "candidate code sizes", ge=1)
    hidden: tuple[tuple[int, ...], ...] = setting((), "candidate encoder widths lists", ge=1)
    learning_rate: tuple[float, ...] = setting((), "candidate learning rates", gt=0, le=1)
    batch_size: tuple[int, ...] = setting((), "candidate batch sizes", ge=1)
    epochs: tuple[int, ...] = setting((), "candidate maximum epochs", ge=1)


@dataclass(frozen=True)
class ThresholdConfig:
    """The alarm threshold on per-reading reconstruction MSE, fitted on the holdout split."""

    method: Literal["mean_k_std", "percentile"] = setting(
        "mean_k_std", "mean_k_std (mean + k·std) or percentile"
    )
    k: float = setting(2.0, "k for mean_k_std", ge=0, le=100)
    percentile: float = setting(99.0, "q for percentile", gt=0, lt=100)


@dataclass(frozen=True)
class EvaluateConfig:
    """Optional labelled data scored after training, for precision/recall/F1/ROC-AUC."""

    path: str | None = setting(None, "labelled CSV or JSON Lines file; null = no labelled eval")
    format: Literal["auto", "csv", "jsonl"] = setting("auto", "auto, csv or jsonl")
    delimiter: str = setting("auto", "CSV delimiter: auto, one character, or tab")
    decimal: Literal[".", ","] = setting(".", "CSV decimal mark")
    label_column: str = setting("anomaly", "0/1 label column (1 = anomalous)")
    truth: str | None = setting(
        None,
        "instead of a label column: ground-truth JSONL from `anomaly-simulate jsonl --truth`; "
        "readings listed there (by device and timestamp) are anomalous",
    )
    device_column: str = setting("device_id", "with truth: the device id column of the data")
    timestamp_column: str = setting("timestamp", "with truth: the epoch-ms timestamp column")
    rows: tuple[int | None, ...] | None = setting(None, "[start, stop] row slice of the file")


@dataclass(frozen=True)
class ReportConfig:
    """The training report (always stored in the artifact under ``report/``)."""

    dir: str | None = setting(None, "also copy the report to this directory")
    plots: bool = setting(True, "draw the PNG plots (matplotlib, Agg)")
    max_points: int = setting(5000, "at most this many points in scatter plots", ge=100)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Build with :func:`load_config` or :func:`from_mapping`."""

    name: str = setting("detector", "model name in the registry (letters, digits, . _ -)")
    registry: str = setting("artifacts", "registry root directory")
    data: DataConfig = setting(DataConfig(), "training data")
    preprocess: PreprocessConfig = setting(PreprocessConfig(), "imputation and scaling")
    split: SplitConfig = setting(SplitConfig(), "train / validation / holdout split")
    model: ModelConfig = setting(ModelConfig(), "autoencoder and fitting")
    tune: TuneConfig = setting(TuneConfig(), "hyperparameter search")
    threshold: ThresholdConfig = setting(ThresholdConfig(), "alarm threshold")
    scoring: ScoringConfig = setting(ScoringConfig(), "score smoothing")
    evaluate: EvaluateConfig = setting(EvaluateConfig(), "labelled evaluation data")
    report: ReportConfig = setting(ReportConfig(), "report")

    @property
    def output_activation(self) -> str:
        """The resolved output activation (``auto`` → sigmoid for minmax, linear for standard)."""
        if self.model.output_activation != "auto":
            return self.model.output_activation
        return "sigmoid" if self.preprocess.scaler == "minmax" else "linear"

    @property
    def data_format(self) -> Literal["csv", "jsonl", "kafka"]:
        """The resolved training data format (validated when the config was built)."""
        return resolve_format(self.data.format, self.data.path, "data")  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Building and validating
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _bad(key: str, value: Any, tp: Any, default: Any) -> ConfigError:
    shown = "null" if value is None else repr(value)
    if dataclasses.is_dataclass(default):
        fix = f"write {key} as a mapping of its keys"
    else:
        dflt = "null" if default is None else repr(default)
        fix = f"set {key} to {_type_name(tp)} (default {dflt})"
    return ConfigError(f"config key {key} = {shown} must be {_type_name(tp)}", fix)


def _convert_scalar(value: Any, tp: Any, key: str, default: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML 1.1 (PyYAML) reads `1e-3` as a string; accept numeric strings so the
        # natural spelling of a learning rate works.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _bad(key, value, tp, default) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(
                    f"config key {key} = {value!r} is not finite", "use a finite number"
                )
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module
    raise _bad(key, value, tp, default)


def _convert(value: Any, tp: Any, key: str, default: Any) -> Any:
    """``value`` checked against (and converted to) type ``tp``; ``key`` names it in errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, default)
            except ConfigError:
                continue
        raise _bad(key, value, tp, default)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"config key {key} = {value!r} is not allowed",
            f"{hint}use one of {', '.join(repr(a) for a in args)}",
        )
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, tp, default)
        return tuple(_convert(v, args[0], f"{key}[{i}]", default) for i, v in enumerate(value))
    return _convert_scalar(value, tp, key, default)


_BOUNDS = (
    ("ge", operator.ge, ">="),
    ("gt", operator.gt, ">"),
    ("le", operator.le, "<="),
    ("lt", operator.lt, "<"),
)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _check_bounds(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if isinstance(value, tuple):
        for i, v in enumerate(value):
            _check_bounds(f"{key}[{i}]", v, meta)
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for op, ok, word in _BOUNDS:
        bound = meta.get(op)
        if bound is not None and not ok(value, bound):
            raise ConfigError(
                f"config key {key} = {value!r} is out of range",
                f"use a value {word} {bound:g}",
            )


def _build(cls: type[Any], doc: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from mapping ``doc``; ``prefix`` is its dotted key."""
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        where = prefix or "the config file"
        raise ConfigError(f"{where} must be a mapping of keys, got {doc!r}", "see docs/trainer.md")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in doc.items():
        key = str(raw_key)
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            if close:
                fix = f"did you mean {(prefix + '.') if prefix else ''}{close[0]}?"
            else:
                fix = f"known keys{' under ' + prefix if prefix else ''}: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {dotted}", fix)
        f = fields[key]
        default = _default(f)
        converted = _convert(value, hints[key], dotted, default)
        _check_bounds(dotted, converted, f.metadata)
        kwargs[key] = converted
    return cls(**kwargs)


def parse_time_ms(value: int | str, key: str) -> int:
    """Epoch milliseconds from an int (already ms) or an ISO 8601 string (UTC if no zone)."""
    if isinstance(value, int):
        return value
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"config key {key} = {value!r} is not a time",
            "use epoch milliseconds or ISO 8601 like 2024-05-01T12:00:00Z",
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


def resolve_format(fmt: str, path: str | None, section: str) -> str:
    """The concrete format of a data section; ``auto`` is decided by the file suffix."""
    if fmt != "auto":
        return fmt
    if path is None:
        raise ConfigError(
            f"{section}.path is not set", f"set {section}.path to a CSV or JSONL file"
        )
    suffix = Path(path).suffix.lower()
    if suffix in _CSV_SUFFIXES:
        return "csv"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    raise ConfigError(
        f"cannot tell the format of {section}.path {path!r} from its suffix",
        f"set {section}.format to csv or jsonl",
    )


def delimiter_char(value: str, key: str) -> str | None:
    """The configured CSV delimiter as one character, or None for auto-detection."""
    if value == "auto":
        return None
    if value in ("tab", "\\t"):
        return "\t"
    if len(value) != 1 or value in '"\r\n':
        raise ConfigError(
            f"config key {key} = {value!r} is not a delimiter",
            "use auto, tab, or one character such as ',' or ';'",
        )
    return value


def _check_rows(rows: tuple[int | None, ...] | None, key: str) -> None:
    if rows is None:
        return
    if len(rows) != 2:
        raise ConfigError(
            f"config key {key} must have two items", "write [start, stop], e.g. [0, 400]"
        )
    start, stop = rows
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        raise ConfigError(f"config key {key} = {list(rows)} has a negative row", "use rows >= 0")
    if start is not None and stop is not None and stop <= start:
        raise ConfigError(f"config key {key} = {list(rows)} selects no rows", "make stop > start")


def _check_columns(d: DataConfig) -> None:
    if d.features is None:
        return
    if not d.features:
        raise ConfigError(
            "data.features is an empty list", "list feature columns or use null for all"
        )
    dup = sorted({f for f in d.features if d.features.count(f) > 1})
    if dup:
        raise ConfigError(f"data.features lists {dup} more than once", "list each feature once")
    for key, col in (
        ("entity_column", d.entity_column),
        ("label_column", d.label_column),
        ("timestamp_column", d.timestamp_column),
        ("device_column", d.device_column),
    ):
        if col is not None and col in d.features:
            raise ConfigError(
                f"data.features includes {col!r}, the data.{key}",
                f"remove {col!r} from data.features: "
                f"{key.split('_')[0]} columns are never features",
            )


def _check_kafka(k: KafkaSource) -> None:
    if not k.topic:
        raise ConfigError(
            "data.format is kafka but data.kafka.topic is empty", "set data.kafka.topic"
        )
    if k.start_time is not None and k.start_offset != "earliest":
        raise ConfigError(
            "both data.kafka.start_offset and data.kafka.start_time are set",
            "bound the replay by offsets or by time, not both",
        )
    if k.end_time is not None and k.end_offset != "latest":
        raise ConfigError(
            "both data.kafka.end_offset and data.kafka.end_time are set",
            "bound the replay by offsets or by time, not both",
        )
    start = (
        parse_time_ms(k.start_time, "data.kafka.start_time") if k.start_time is not None else None
    )
    end = parse_time_ms(k.end_time, "data.kafka.end_time") if k.end_time is not None else None
    if start is not None and end is not None and end <= start:
        raise ConfigError(
            "data.kafka.end_time is not after start_time", "make end_time > start_time"
        )
    so, eo = k.start_offset, k.end_offset
    if isinstance(so, int) and isinstance(eo, int) and eo <= so:
        raise ConfigError(
            f"data.kafka.end_offset {eo} is not after start_offset {so}",
            "make end_offset > start_offset",
        )


def _check_tune(t: TuneConfig) -> None:
    if t.method == "none":
        return
    if not (t.code_size or t.hidden or t.learning_rate or t.batch_size or t.epochs):
        raise ConfigError(
            f"tune.method is {t.method} but the search space is empty",
            "list candidates under tune.code_size, tune.hidden, tune.learning_rate, "
            "tune.batch_size or tune.epochs",
        )
    for i, widths in enumerate(t.hidden):
        if not widths:
            raise ConfigError(f"tune.hidden[{i}] is empty", "give at least one layer width")


def _check_temporal(cfg: TrainConfig) -> None:
    """Windows and smoothing need the chronological split (consecutive holdout readings)."""
    if not cfg.split.shuffle:
        return
    if cfg.scoring.ewma_alpha is not None:
        raise ConfigError(
            "scoring.ewma_alpha needs consecutive holdout readings but split.shuffle is true",
            "use the chronological split (split.shuffle: false): smoothing a random sample "
            "shrinks the holdout's spread and gives a threshold far too low for a stream",
        )
    if cfg.model.window > 1:
        raise ConfigError(
            "model.window > 1 with split.shuffle: true would put holdout readings inside "
            "training windows",
            "use the chronological split (split.shuffle: false)",
        )


def _check_conv(m: ModelConfig) -> None:
    """A conv1d model must give back as many time steps as it was given."""
    if m.architecture != "conv1d":
        return
    if not m.conv_filters:
        raise ConfigError("model.conv_filters is empty", "give at least one filter count")
    factor = m.conv_stride ** len(m.conv_filters)
    if m.window < 4 or m.window % factor:
        raise ConfigError(
            f"model.architecture conv1d needs model.window >= 4 and a multiple of "
            f"{factor} (conv_stride ** len(conv_filters)), got {m.window}",
            f"set model.window to a multiple of {factor}, e.g. 60 (SKAB's Conv-AE)",
        )


def validate(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks that one field's type and bounds cannot express."""
    from detector.artifact import validate_name  # light import: no TensorFlow
    from detector.errors import ArtifactError

    try:
        validate_name(cfg.name)
    except ArtifactError:
        raise ConfigError(
            f"config key name = {cfg.name!r} is not a valid model name",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        ) from None
    d = cfg.data
    if d.per_file:
        if d.path is None or not Path(d.path).is_dir():
            raise ConfigError(
                f"data.per_file is true but data.path {d.path!r} is not a folder",
                "point data.path at the folder of per-entity files",
            )
        return cfg  # one model per file: each file's config is validated on its own
    fmt = resolve_format(d.format, d.path, "data")
    if fmt == "kafka":
        _check_kafka(d.kafka)
    elif d.path is None:
        raise ConfigError(
            "data.path is not set", "set data.path to the normal-data CSV or JSONL file"
        )
    delimiter_char(d.delimiter, "data.delimiter")
    _check_rows(d.rows, "data.rows")
    _check_columns(d)
    if cfg.model.hidden is not None and not cfg.model.hidden:
        raise ConfigError(
            "model.hidden is empty", "give at least one hidden layer width, e.g. [32, 16]"
        )
    for key in ("validation", "holdout"):
        split_size(getattr(cfg.split, key), f"split.{key}")
    v, h = cfg.split.validation, cfg.split.holdout
    if isinstance(v, float) and isinstance(h, float) and v + h > 0.6:
        raise ConfigError(
            "split.validation + split.holdout exceed 0.6 of the data",
            "keep at least 40% for training, e.g. validation 0.15 and holdout 0.15",
        )
    if cfg.preprocess.scaler == "standard" and cfg.output_activation in ("sigmoid", "relu"):
        raise ConfigError(
            f"model.output_activation {cfg.output_activation} cannot output the negative "
            "values of standard-scaled data",
            "use output_activation linear (or auto) with scaler standard",
        )
    _check_temporal(cfg)
    _check_conv(cfg.model)
    _check_tune(cfg.tune)
    e = cfg.evaluate
    if e.path is not None:
        resolve_format(e.format, e.path, "evaluate")
        delimiter_char(e.delimiter, "evaluate.delimiter")
        _check_rows(e.rows, "evaluate.rows")
        if d.features is not None and e.label_column in d.features:
            raise ConfigError(
                f"data.features includes {e.label_column!r}, the evaluate.label_column",
                f"remove {e.label_column!r} from data.features: labels are never features",
            )
    return cfg


_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def split_size(value: int | float | str, key: str) -> tuple[str, float]:
    """A split size as ``("fraction", f)``, ``("rows", n)`` or ``("ms", duration)``.

    Raises:
        ConfigError: a fraction outside (0, 1), fewer than 1 row, or an unreadable duration.
    """
    if isinstance(value, float):
        if not 0 < value < 1:
            raise ConfigError(
                f"config key {key} = {value!r} is out of range",
                "use a fraction between 0 and 1, a row count like 500, or a duration like 10m",
            )
        return "fraction", value
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"config key {key} = {value!r} is out of range", "use >= 1 rows")
        return "rows", float(value)
    text = value.strip().lower()
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                amount = float(text[: -len(unit)])
            except ValueError:
                break
            if amount > 0 and math.isfinite(amount):
                return "ms", amount * _DURATION_UNITS[unit]
            break
    raise ConfigError(
        f"config key {key} = {value!r} is not a split size",
        "use a fraction like 0.15, a row count like 500, or a duration like 90s, 10m, 2h, 1d",
    )


def from_mapping(doc: Any) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a parsed YAML document."""
    cfg: TrainConfig = _build(TrainConfig, doc, "")
    return validate(cfg)


def apply_overrides(doc: Any, overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a config document (values are parsed as YAML)."""
    out: dict[str, Any] = dict(doc) if isinstance(doc, Mapping) else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"--set {item!r} is not key=value", "write e.g. --set model.epochs=20"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # not YAML: take it as a plain string
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), registry: str | None = None
) -> TrainConfig:
    """Read a YAML config file, apply ``--set`` overrides and ``--registry``, and validate.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key, bad value.
    """
    doc: Any = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"config file {p} does not exist", "check the --config path"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}", "check the file") from None
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise ConfigError(
                f"config file {p} is not valid YAML{where}: {problem}", "fix the YAML syntax"
            ) from None
        if not isinstance(doc, Mapping):
            raise ConfigError(
                f"config file {p} must be a mapping of keys, got a {type(doc).__name__}",
                "see docs/trainer.md for the layout",
            )
    doc = apply_overrides(doc, overrides)
    if registry is not None:
        doc["registry"] = registry
    return from_mapping(doc)


def to_mapping(cfg: Any) -> dict[str, Any]:
    """A plain YAML/JSON-able mapping of a config (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_mapping(v) if dataclasses.is_dataclass(v) else to_mapping_value(v)
    return out


def to_yaml(cfg: TrainConfig) -> str:
    """The effective config as YAML (stored in every artifact as ``config.yaml``)."""
    return yaml.safe_dump(to_mapping(cfg), sort_keys=False, allow_unicode=True)


def reference(cls: type[Any] = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, doc)`` for every setting, for the documentation's config table."""
    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = _default(f)
        if dataclasses.is_dataclass(default):
            rows.extend(reference(type(default), key + "."))
            continue
        shown = yaml.safe_dump(to_mapping_value(default), default_flow_style=True).strip()
        shown = shown.removesuffix("...").strip()
        rows.append((key, shown, str(f.metadata.get("doc", ""))))
    return rows


def to_mapping_value(v: Any) -> Any:
    """Tuples to lists, recursively (for YAML output)."""
    if isinstance(v, tuple):
        return [to_mapping_value(x) for x in v]
    return v
