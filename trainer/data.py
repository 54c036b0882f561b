"""Loading training and evaluation data into a numeric feature matrix.

Two steps, so every source gets the same column rules:

1. a *reader* turns a source into a :class:`RawTable` (column name → list of cells):
   :func:`read_csv` (delimiter detected or given, BOM and CRLF tolerated, decimal comma
   optional), :func:`read_jsonl` (flat objects or reading records with a nested values
   object), or :func:`trainer.replay.read_kafka` (a bounded topic replay);
2. :func:`select` picks the features (given, or every numeric column), refuses timestamp,
   device and label columns as features, parses numbers and labels, and returns a
   :class:`Dataset`.

Every problem a user can fix raises :class:`~trainer.errors.DataError` naming the file, the
column (with the closest existing name, via difflib) or the row, and the fix.
"""

from __future__ import annotations

import csv
import difflib
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from trainer.errors import DataError

F64 = npt.NDArray[np.float64]
_MISSING_TOKENS = frozenset({"", "na", "nan", "n/a", "null", "none"})
_NORMAL_LABELS = frozenset({"", "0", "0.0", "false", "no", "normal", "none", "null"})
_ANOMALY_LABELS = frozenset({"1", "1.0", "true", "yes", "anomaly"})
_DELIMITER_CANDIDATES = (",", ";", "\t", "|")
_SNIFF_LINES = 50


@dataclass(frozen=True, eq=False)
class RawTable:
    """Cells by column, straight from a source, before any column rule is applied.

    Attributes:
        source: human-readable origin, used in messages (a path, or ``kafka topic t``).
        columns: column names in source order.
        cells: per column, one cell per row: ``str`` from CSV, JSON values (``None`` when a
            record lacks the field) from JSON Lines and Kafka.
        locate: maps a 0-based row index to a phrase for messages (``line 17``).
        skipped: records dropped because they could not be decoded (Kafka only).
        delimiter: the CSV delimiter used (detected or configured), else None.
    """

    source: str
    columns: list[str]
    cells: dict[str, Any]  # column -> list of cells, or a float64 array (fast CSV path)
    locate: Callable[[int], str]
    skipped: int = 0
    delimiter: str | None = None

    @property
    def n_rows(self) -> int:
        return len(self.cells[self.columns[0]]) if self.columns else 0

    def take(self, rows: Sequence[int]) -> RawTable:
        """The table restricted to ``rows`` (in that order); messages keep true row numbers."""
        idx = list(rows)
        cells = {
            c: (
                v[np.asarray(idx, dtype=np.intp)]
                if isinstance(v, np.ndarray)
                else [v[i] for i in idx]
            )
            for c, v in self.cells.items()
        }
        base = self.locate
        return RawTable(
            self.source, self.columns, cells, lambda i: base(idx[i]), self.skipped, self.delimiter
        )

    def sliced(self, rows: Sequence[int | None] | None) -> RawTable:
        """The ``[start, stop)`` row slice (None = unbounded); messages keep true row numbers."""
        if rows is None:
            return self
        start, stop = rows[0] or 0, rows[1]
        cells = {c: v[start:stop] for c, v in self.cells.items()}
        base = self.locate
        return RawTable(
            self.source,
            self.columns,
            cells,
            lambda i: base(i + start),
            self.skipped,
            self.delimiter,
        )


@dataclass(frozen=True, eq=False)
class Dataset:
    """A numeric feature matrix ready for training or scoring.

    Attributes:
        source: where it came from.
        feature_names: column order of ``x``.
        x: (rows, features) float64 in raw sensor units; NaN marks a missing value.
        labels: (rows,) int8, 1 = anomalous, when a label column was read; else None.
        ignored_columns: non-numeric columns skipped because features were not listed.
        skipped_records: undecodable records dropped by the reader (Kafka replay).
        delimiter: the CSV delimiter used, if CSV.
        device_ids: per row, the device id (``device_column``), when the data has one.
        times_ms: per row, the timestamp as epoch milliseconds (numbers are taken as epoch
            ms, strings as ISO 8601, UTC without a zone), when every row has a readable one;
            else None and row order stands for time.
        time_note: why ``times_ms`` is None although a timestamp column exists, else "".
    """

    source: str
    feature_names: tuple[str, ...]
    x: F64
    labels: npt.NDArray[np.int8] | None = None
    ignored_columns: tuple[str, ...] = ()
    skipped_records: int = 0
    delimiter: str | None = None
    device_ids: tuple[str, ...] | None = None
    times_ms: F64 | None = None
    time_note: str = ""

    def rows(self, idx: npt.ArrayLike) -> Dataset:
        """The dataset restricted to rows ``idx`` (in that order)."""
        i = np.asarray(idx, dtype=np.intp)
        return Dataset(
            source=self.source,
            feature_names=self.feature_names,
            x=np.ascontiguousarray(self.x[i]),
            labels=None if self.labels is None else self.labels[i],
            ignored_columns=self.ignored_columns,
            skipped_records=self.skipped_records,
            delimiter=self.delimiter,
            device_ids=None if self.device_ids is None else tuple(self.device_ids[j] for j in i),
            times_ms=None if self.times_ms is None else self.times_ms[i],
            time_note=self.time_note,
        )

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])


# --------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------


def _read_text(path: Path, what: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} file {path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise DataError(f"{what} path {path} is a directory", "give a CSV or JSONL file") from None
    except OSError as e:
        raise DataError(
            f"cannot read {what} file {path}: {e.strerror or e}", "check the path and permissions"
        ) from None
    if not raw.strip():
        raise DataError(f"{what} file {path} is empty", "give a file with a header and rows")
    if b"\x00" in raw[:4096]:
        raise DataError(f"{what} file {path} is not a text file", "give a CSV or JSON Lines file")
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet exports put first.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} file {path} is not UTF-8 text (bad byte at offset {e.start})",
            "re-export it as UTF-8",
        ) from None


def detect_delimiter(sample_lines: Sequence[str]) -> str:
    """The delimiter among ``, ; tab |`` that splits the sample into the most columns consistently.

    Consistency (every non-empty line has the header's field count) wins over width, so a
    decimal comma in a ``;`` file does not fool it. A one-column file gets ``,``.
    """
    lines = [ln for ln in sample_lines if ln.strip()]
    best, best_key = ",", (False, 1, 0.0)
    for d in _DELIMITER_CANDIDATES:
        counts = [len(r) for r in csv.reader(lines, delimiter=d)]
        if not counts or counts[0] < 2:
            continue
        agree = sum(c == counts[0] for c in counts) / len(counts)
        key = (agree == 1.0, counts[0], agree)
        if key > best_key:
            best, best_key = d, key
    return best


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _fast_columns(text: str, d: str, names: list[str]) -> dict[str, Any] | None:
    """Columns parsed by numpy's C reader, or None when the file needs the careful path.

    Taken only for plain files (no quotes) whose field count is right on every line; any
    parse failure (an empty cell, a stray word) returns None, and the csv-module path then
    parses the file again and reports the exact problem. About 2-3x faster on big files.
    """
    if '"' in text or len(names) < 2:
        return None
    lines = text.splitlines()
    body = [ln for ln in lines[1:] if ln.strip()]
    if not body or text.count(d) != (len(names) - 1) * (len(body) + 1):
        return None
    sample = [ln.split(d) for ln in body[:20]]
    numeric = [j for j in range(len(names)) if all(_is_number(r[j]) for r in sample)]
    other = [j for j in range(len(names)) if j not in numeric]

    def load(cols: list[int], dtype: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "line contained no data"
            return np.loadtxt(
                io.StringIO(text),
                delimiter=d,
                skiprows=1,
                usecols=cols,
                dtype=dtype,
                ndmin=2,
                comments=None,
            )

    try:
        num = load(numeric, np.float64) if numeric else np.empty((len(body), 0))
        txt = load(other, str) if other else np.empty((len(body), 0), dtype=str)
    except ValueError:
        return None
    if num.shape[0] != len(body) or txt.shape[0] != len(body):
        return None
    cells: dict[str, Any] = {names[j]: num[:, i].copy() for i, j in enumerate(numeric)}
    cells |= {names[j]: txt[:, i].tolist() for i, j in enumerate(other)}
    return {n: cells[n] for n in names}


def read_csv(path: str | Path, delimiter: str | None = None, decimal: str = ".") -> RawTable:
    """Read a delimited text file with a header row.

    Args:
        path: the file.
        delimiter: one character, or None to detect it from the first lines.
        decimal: ``.`` or ``,`` (a decimal comma is turned into a point before parsing).
    """
    p = Path(path)
    text = _read_text(p, "data")
    d = delimiter or detect_delimiter(text.splitlines()[:_SNIFF_LINES])
    first = next(csv.reader(io.StringIO(text.split("\n", 1)[0], newline=""), delimiter=d), [])
    names = [h.strip() for h in first]
    if decimal == "." and names and all(names) and len(set(names)) == len(names):
        fast = _fast_columns(text, d, names)
        if fast is not None:
            return RawTable(
                source=str(p),
                columns=names,
                cells=fast,
                locate=lambda i: f"line {i + 2}",
                delimiter=d,
            )
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=d)
    try:
        header = next(reader)
        # any(r) is C-speed on strings; a row of only blanks/whitespace-free empties is
        # skipped (a trailing blank line, as spreadsheets write).
        rows = [r for r in reader if r and any(r)]
    except csv.Error as e:
        raise DataError(f"{p} is not valid CSV: {e}", "fix the quoting in the file") from None
    names = [h.strip() for h in header]
    if len(names) < 1 or not any(names):
        raise DataError(f"{p} has no header row", "put the column names on the first line")
    dup = sorted({n for n in names if n and names.count(n) > 1})
    if dup:
        raise DataError(f"{p} has duplicate column names {dup}", "rename the columns to be unique")
    for i, r in enumerate(rows):
        if len(r) != len(names):
            raise DataError(
                f"{p} line {i + 2} has {len(r)} fields but the header has {len(names)} "
                f"(delimiter {d!r})",
                "fix that row, or set data.delimiter if the detected delimiter is wrong",
            )
    columns = [n or f"<unnamed {j}>" for j, n in enumerate(names)]
    values: list[list[str]] = [list(col) for col in zip(*rows, strict=True)] if rows else []
    if not rows:
        raise DataError(f"{p} has a header but no data rows", "give a file with data rows")
    if decimal == ",":
        values = [[v.replace(",", ".") for v in col] for col in values]
    return RawTable(
        source=str(p),
        columns=columns,
        cells=dict(zip(columns, values, strict=True)),
        locate=lambda i: f"line {i + 2}",
        delimiter=d,
    )


@dataclass(frozen=True)
class RecordFields:
    """Field names of a reading record: ``{device, timestamp, values: {sensor: number}}``."""

    device: str = "device_id"
    timestamp: str = "timestamp"
    values: str = "values"


def flatten_record(obj: dict[str, Any], fields: RecordFields) -> dict[str, Any]:
    """One table row from a reading record: the values object's keys become columns.

    A flat record (no values object) is used as it is, so both
    ``{"device_id": "d1", "timestamp": 1, "values": {"s0": 1.0}}`` and
    ``{"device_id": "d1", "timestamp": 1, "s0": 1.0}`` give columns device_id, timestamp, s0.
    """
    nested = obj.get(fields.values)
    if not isinstance(nested, dict):
        return obj
    row = {k: v for k, v in obj.items() if k != fields.values}
    for k, v in nested.items():
        # A sensor named like a top-level field would be ambiguous; the sensor wins, since
        # it is what the model is about, and top-level duplicates are metadata.
        row[str(k)] = v
    return row


def table_from_rows(
    source: str,
    rows: Sequence[dict[str, Any]],
    locate: Callable[[int], str],
    skipped: int = 0,
) -> RawTable:
    """A :class:`RawTable` from row dicts; columns in first-seen order, None where absent."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    columns = list(seen)
    cells = {c: [r.get(c) for r in rows] for c in columns}
    return RawTable(source=source, columns=columns, cells=cells, locate=locate, skipped=skipped)


def read_jsonl(path: str | Path, fields: RecordFields | None = None) -> RawTable:
    """Read JSON Lines: one object per line, flat or a reading record (see :func:`flatten_record`).

    NaN/Infinity literals are refused (msgspec is strict JSON); ``null`` is a missing value.
    """
    p = Path(path)
    text = _read_text(p, "data")
    f = fields or RecordFields()
    decoder = msgspec.json.Decoder()
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = decoder.decode(line)
        except msgspec.DecodeError as e:
            raise DataError(
                f"{p} line {n} is not valid JSON ({e})", "fix or remove that line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{p} line {n} is a JSON {type(obj).__name__}, not an object",
                "write one JSON object per line",
            )
        rows.append(flatten_record(obj, f))
        lines.append(n)
    return table_from_rows(str(p), rows, lambda i: f"line {lines[i]}")


# --------------------------------------------------------------------------------------
# Column rules
# --------------------------------------------------------------------------------------


def _closest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(repr(o) for o in list(options)[:12])
    more = " ..." if len(options) > 12 else ""
    return f"available columns: {shown}{more}"


def missing_column(table: RawTable, name: str, role: str) -> DataError:
    """The error for a configured column that the data lacks, with the closest name."""
    return DataError(
        f"{role} column {name!r} is not in {table.source}", _closest(name, table.columns)
    )


def _parse_number(cell: Any) -> float | None:
    """A cell as a float, NaN for missing, None when it is not a number."""
    if cell is None:
        return float("nan")
    if isinstance(cell, str):
        s = cell.strip()
        if s.lower() in _MISSING_TOKENS:
            return float("nan")
        try:
            return float(s)
        except ValueError:
            return None
    # bool is an int in Python; a true/false sensor value is a data error, not 1/0.
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        return float(cell)
    return None


def _to_numeric(cells: Any) -> tuple[F64, int | None]:
    """Parse a column; returns the values and the index of the first non-number (or None)."""
    if isinstance(cells, np.ndarray) and cells.dtype.kind == "f":
        return np.asarray(cells, dtype=np.float64), None  # already parsed (fast CSV path)
    if cells and all(type(c) is float or type(c) is int for c in cells):
        return np.asarray(cells, dtype=np.float64), None  # JSON fast path
    if cells and isinstance(cells[0], str):
        try:
            # float() over the column is the fastest pure-Python parse (faster than
            # np.asarray on strings); anything unusual (blanks, words) takes the slow path.
            return np.fromiter(map(float, cells), dtype=np.float64, count=len(cells)), None
        except ValueError:
            pass
    out = np.empty(len(cells), dtype=np.float64)
    for i, c in enumerate(cells):
        v = _parse_number(c)
        if v is None:
            return out, i
        out[i] = v
    return out, None


def _check_finite(table: RawTable, name: str, col: F64) -> None:
    bad = np.flatnonzero(np.isinf(col))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"column {name!r} has an infinite value at {table.locate(i)} of {table.source}",
            "replace it with a real measurement or leave it empty for missing",
        )


def parse_labels(table: RawTable, name: str) -> npt.NDArray[np.int8]:
    """0/1 labels: numbers 0/1, booleans, ``true``/``false``; in JSON, ``null`` is normal and
    any other string (an anomaly kind such as ``spike``) is anomalous."""
    cells = table.cells[name]
    out = np.zeros(len(cells), dtype=np.int8)
    for i, c in enumerate(cells):
        if c is None or c is False:
            continue
        if c is True:
            out[i] = 1
        elif isinstance(c, (int, float)):
            if c not in (0, 1):
                raise DataError(
                    f"label column {name!r} has {c!r} at {table.locate(i)} of {table.source}",
                    "labels must be 0 (normal) or 1 (anomalous)",
                )
            out[i] = int(c)
        elif isinstance(c, str):
            s = c.strip().lower()
            if s in _NORMAL_LABELS:
                continue
            if s in _ANOMALY_LABELS or table.delimiter is None:
                out[i] = 1
                continue
            raise DataError(
                f"label column {name!r} has {c!r} at {table.locate(i)} of {table.source}",
                "labels must be 0 (normal) or 1 (anomalous)",
            )
        else:
            raise DataError(
                f"label column {name!r} has {c!r} at {table.locate(i)} of {table.source}",
                "labels must be 0 (normal) or 1 (anomalous)",
            )
    return out


def _auto_features(table: RawTable, never: set[str]) -> tuple[list[str], list[str], dict[str, F64]]:
    """Every numeric column not in ``never``; mostly-text columns are ignored, but a mostly
    numeric column with a stray word is an error (silently dropping a sensor is worse)."""
    chosen: list[str] = []
    ignored: list[str] = []
    parsed: dict[str, F64] = {}
    for c in table.columns:
        if c in never or c.startswith("<unnamed"):
            continue
        values, bad = _to_numeric(table.cells[c])
        if bad is None:
            chosen.append(c)
            parsed[c] = values
            continue
        numeric = sum(_parse_number(v) is not None for v in table.cells[c])
        if numeric > table.n_rows / 2:
            raise _not_numeric(table, c, bad, auto=True)
        ignored.append(c)
    return chosen, ignored, parsed


def _not_numeric(table: RawTable, name: str, row: int, auto: bool) -> DataError:
    value = table.cells[name][row]
    fix = "fix the value or leave it empty for a missing reading"
    if auto:
        fix += f", or add {name!r} to data.exclude"
    return DataError(
        f"feature column {name!r} has {value!r} at {table.locate(row)} of {table.source}, "
        "not a number",
        fix,
    )


def select(
    table: RawTable,
    features: Sequence[str] | None,
    *,
    exclude: Sequence[str] = (),
    timestamp_column: str | None = None,
    device_column: str | None = None,
    label_column: str | None = None,
    require_label: bool = False,
) -> Dataset:
    """Apply the column rules to a raw table.

    Args:
        table: a reader's output.
        features: feature columns in model order, or None for every numeric column other
            than the timestamp, device, label and excluded columns.
        exclude: columns never used as features when ``features`` is None (must exist).
        timestamp_column, device_column: never features; may be absent from the data.
        label_column: 0/1 labels; never a feature; must exist when ``require_label``.

    Raises:
        DataError: a missing column (with the closest name), a non-numeric or infinite
            value, a label column listed as a feature, no numeric columns at all.
    """
    if table.n_rows == 0:
        raise DataError(f"{table.source} has no rows", "give data with at least one row")
    present = set(table.columns)
    if label_column is not None and label_column not in present and require_label:
        raise missing_column(table, label_column, "label")
    has_label = label_column is not None and label_column in present
    never = {c for c in (timestamp_column, device_column, label_column) if c is not None}
    for name in exclude:
        if name not in present:
            raise missing_column(table, name, "excluded")
    ignored: list[str] = []
    if features is None:
        names, ignored, parsed = _auto_features(table, never | set(exclude))
        if not names:
            raise DataError(
                f"{table.source} has no numeric feature columns (columns: {table.columns})",
                "check the delimiter (data.delimiter) or list data.features",
            )
    else:
        names = list(features)
        parsed = {}
        for name in names:
            if name in never:
                raise DataError(
                    f"feature list includes {name!r}, which is the label, timestamp or device "
                    "column",
                    f"remove {name!r} from the features",
                )
            if name not in present:
                raise missing_column(table, name, "feature")
            values, bad = _to_numeric(table.cells[name])
            if bad is not None:
                raise _not_numeric(table, name, bad, auto=False)
            parsed[name] = values
    for name in names:
        _check_finite(table, name, parsed[name])
    x = np.column_stack([parsed[n] for n in names]) if names else np.empty((table.n_rows, 0))
    labels = parse_labels(table, label_column) if has_label and label_column else None
    devices, times, note = _devices_and_times(table, device_column, timestamp_column)
    return Dataset(
        source=table.source,
        feature_names=tuple(names),
        x=np.ascontiguousarray(x, dtype=np.float64),
        labels=labels,
        ignored_columns=tuple(ignored),
        skipped_records=table.skipped,
        delimiter=table.delimiter,
        device_ids=devices,
        times_ms=times,
        time_note=note,
    )


def _devices_and_times(
    table: RawTable, device_column: str | None, timestamp_column: str | None
) -> tuple[tuple[str, ...] | None, F64 | None, str]:
    devices = None
    if device_column is not None and device_column in table.cells:
        devices = tuple("" if c is None else str(c) for c in table.cells[device_column])
    times, note = None, ""
    if timestamp_column is not None and timestamp_column in table.cells:
        times, note = parse_times(table.cells[timestamp_column])
    return devices, times, note


def parse_times(cells: Any) -> tuple[F64 | None, str]:
    """Timestamps as epoch ms: numbers as they are, strings as numbers or ISO 8601 (UTC if
    no zone). Returns ``(None, reason)`` if any row has none, so row order stands for time."""
    values, bad = _to_numeric(cells)
    if bad is None and not np.isnan(values).any():
        return values, ""
    from datetime import UTC, datetime

    out = np.empty(len(cells), dtype=np.float64)
    for i, c in enumerate(cells):
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            out[i] = float(c)
            continue
        try:
            t = datetime.fromisoformat(str(c).strip().replace("Z", "+00:00"))
        except ValueError:
            return None, f"row {i + 1} has timestamp {c!r}, not epoch ms or ISO 8601"
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        out[i] = t.timestamp() * 1000.0
    return out, ""


def read_truth(path: str | Path) -> set[tuple[str, int]]:
    """The ``(device_id, timestamp_ms)`` keys of a ground-truth JSONL file.

    Format (``anomaly-simulate jsonl --truth``): one ``{"device_id", "timestamp_ms", "kind"}``
    object per anomalous reading.
    """
    p = Path(path)
    text = _read_text(p, "truth")
    keys: set[tuple[str, int]] = set()
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = msgspec.json.decode(line)
            keys.add((str(obj["device_id"]), int(obj["timestamp_ms"])))
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            raise DataError(
                f"truth file {p} line {n} is not a {{device_id, timestamp_ms, kind}} object",
                "give the file written by anomaly-simulate jsonl --truth",
            ) from None
    return keys


def labels_from_truth(
    table: RawTable, truth: set[tuple[str, int]], device_column: str, timestamp_column: str
) -> npt.NDArray[np.int8]:
    """1 for each row whose ``(device, timestamp)`` is in ``truth``, else 0."""
    for col, role in ((device_column, "device"), (timestamp_column, "timestamp")):
        if col not in table.cells:
            raise missing_column(table, col, role)
    devices = table.cells[device_column]
    stamps, bad = _to_numeric(table.cells[timestamp_column])
    if bad is not None or np.isnan(stamps).any():
        raise DataError(
            f"timestamp column {timestamp_column!r} of {table.source} has a non-numeric value",
            "timestamps must be epoch milliseconds to match a truth file",
        )
    return np.fromiter(
        ((str(d), int(t)) in truth for d, t in zip(devices, stamps, strict=True)),
        dtype=np.int8,
        count=len(devices),
    )


def read_table(
    fmt: str,
    path: str | None,
    *,
    delimiter: str | None = None,
    decimal: str = ".",
    fields: RecordFields | None = None,
) -> RawTable:
    """Dispatch to the CSV or JSONL reader (Kafka has its own entry, :mod:`trainer.replay`)."""
    if path is None:
        raise DataError("no data path given", "set data.path (or evaluate.path)")
    if fmt == "csv":
        return read_csv(path, delimiter, decimal)
    if fmt == "jsonl":
        return read_jsonl(path, fields)
    raise DataError(f"unsupported data format {fmt!r}", "use csv or jsonl")
