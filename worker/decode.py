"""Decoding and validating readings: Kafka value bytes in, a float matrix and failures out.

Contract of a reading (see ``schemas/reading.v1.json``)::

    {"device_id": "pump-007", "timestamp": 1764201600123, "values": {"sensor_00": 0.12, ...}}

Field names are configurable; with ``values_field = ""`` the features are top-level fields.
``timestamp`` is epoch milliseconds (integer) or an RFC 3339 string. A feature that is
missing or ``null`` is imputed with the training fill value when at most
``max_imputed_features`` are missing, otherwise the reading is dead-lettered. Unknown extra
fields are ignored. Duplicate keys: the last one wins (as in msgspec, orjson and
``JSON.parse``). Decoding uses msgspec with a struct type generated from the model's feature
order, so type checks (no strings or booleans as numbers, no ``NaN``/``Infinity`` literals,
no out-of-range numbers) happen inside the parser at ~1 µs per reading.

Dead-letter reasons are a function of the value's bytes alone (never of the batch around it
or of which decode path ran), decided in this order, first match wins:

1. ``decode_error``: tombstone or empty value;
2. ``oversize``: longer than ``max_value_bytes``;
3. ``decode_error``: not valid UTF-8 anywhere in the value, ignored fields included (the
   typed parser skips unknown fields without checking their bytes);
4. ``decode_error``: not well-formed JSON anywhere in the value (truncated, trailing
   garbage, ``NaN`` literals, a BOM), even when a schema problem comes first in the text;
5. ``invalid_shape``: nesting too deep to parse;
6. the first schema problem in document order: ``missing_field``, ``invalid_timestamp``,
   ``invalid_device_id``, ``invalid_number`` (string, boolean or out-of-range feature) or
   ``invalid_shape`` (anything else, e.g. not an object);
7. checks after parsing: ``invalid_device_id``, ``invalid_timestamp``, ``missing_field``
   (more missing features than allowed).
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import starmap
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from worker.config import ReadingSettings
from worker.reasons import Reason, Stage

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Epoch-millisecond timestamps since 1973 have 12+ digits; smaller values are almost surely
# seconds, which would otherwise be read as 1970 and silently skew latency and "since when".
_MIN_PLAUSIBLE_MS = 100_000_000_000
_VALUES = attrgetter("values")
_DEVICE = attrgetter("device")
_TS = attrgetter("ts")
_astuple = msgspec.structs.astuple
# Untyped, with floats dropped: checks only UTF-8 and JSON syntax of a whole value (a float
# out of range, e.g. 1e999 in an ignored field, is well-formed JSON and must not count).
_syntax_check = msgspec.json.Decoder(float_hook=lambda _text: None).decode


def _utf8_problem(raw: bytes) -> str | None:
    """None if ``raw`` is valid UTF-8, else a one-line description (``isascii`` is a
    word-at-a-time scan, so the common all-ASCII reading costs almost nothing)."""
    if raw.isascii():
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"value is not valid UTF-8: {e.reason} at byte {e.start}"
    return None


def _all_utf8(values: Sequence[bytes]) -> bool:
    """Whether every value is valid UTF-8: the typed parser skips ignored fields unchecked."""
    return all(map(bytes.isascii, values)) or all(_utf8_problem(v) is None for v in values)


def _syntax_problem(raw: bytes) -> str | None:
    """None if ``raw`` is well-formed JSON (or too deep to tell), else the parser's message.

    Called when the typed parse stopped at a schema problem: it stops at the first one, so
    a truncated or garbled value would otherwise get a validation reason.
    """
    try:
        _syntax_check(raw)
    except msgspec.DecodeError as e:
        return str(e)[:500]
    except (msgspec.ValidationError, RecursionError):
        return None
    return None


@dataclass(frozen=True)
class Failure:
    """Why record ``index`` of a batch could not be scored."""

    index: int
    reason: Reason
    stage: Stage
    exception: str  # class name
    message: str


@dataclass(frozen=True, eq=False)
class DecodedBatch:
    """The scorable part of a batch.

    Attributes:
        index: position of each decoded row in the input list.
        x: raw feature values (rows, features) float64, NaN where a value is missing.
        device_ids: one per row.
        timestamps_ms: reading time, epoch milliseconds, int64 (rows,).
        missing: count of imputed features per row.
        failures: records that could not be decoded, in input order.
    """

    index: list[int]
    x: npt.NDArray[np.float64]
    device_ids: list[str]
    timestamps_ms: npt.NDArray[np.int64]
    missing: npt.NDArray[np.int64]
    failures: list[Failure]


def _classify_validation(msg: str, s: ReadingSettings) -> Reason:
    """Map a msgspec ValidationError message to a reason."""
    if "missing required field" in msg:
        return Reason.MISSING_FIELD
    if f"$.{s.timestamp_field}`" in msg or msg.endswith(f"$.{s.timestamp_field}"):
        return Reason.INVALID_TIMESTAMP
    if f"$.{s.device_field}`" in msg or msg.endswith(f"$.{s.device_field}"):
        return Reason.INVALID_DEVICE_ID
    if "Expected `float | null`" in msg or "Number out of range" in msg:
        return Reason.INVALID_NUMBER
    return Reason.INVALID_SHAPE


class ReadingDecoder:
    """Decodes batches of reading bytes for one model's feature order. Not thread-safe."""

    def __init__(
        self,
        feature_names: Sequence[str],
        settings: ReadingSettings,
        now_ms: Any = None,
    ) -> None:
        self.features = tuple(feature_names)
        self.settings = s = settings
        self._now_ms = now_ms  # injectable clock for tests: () -> int
        self._flat = not s.values_field
        # The careful decoder: a feature may be null (imputed later); its error messages
        # name the reason of a dead letter.
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
            _reading_type(self.features, s, float | None, None)
        )
        # The bulk decoder of the fast path: same contract, but a null feature fails, and a
        # missing one reads as NaN, so every row is plain floats (np.fromiter-able). Anything
        # it refuses is decoded again, record by record, by the careful decoder.
        self._fast_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
            _reading_type(self.features, s, float, float("nan"))
        )
        self._good_ids: set[str] = set()
        # Native mode ("@", the default): a memcpy per double; "=" (standard sizes) packs
        # each one through PyFloat_Pack8, ~1,500 more instructions per 38-value row.
        self._pack_row = struct.Struct(f"@{len(self.features)}d").pack

    def _now(self) -> int:
        if self._now_ms is not None:
            return int(self._now_ms())
        return time.time_ns() // 1_000_000

    def _check_device(self, dev: str) -> str | None:
        """None if ``dev`` is acceptable, else the reason text."""
        if dev in self._good_ids:
            return None
        if not dev:
            return "empty device id"
        if len(dev) > self.settings.max_device_id_length:
            return f"device id longer than {self.settings.max_device_id_length} characters"
        if _CONTROL.search(dev):
            return "device id contains control characters"
        if len(self._good_ids) < 1_000_000:  # bounded cache of ids already validated
            self._good_ids.add(dev)
        return None

    def _timestamp_ms(self, ts: int | str) -> int:
        if isinstance(ts, str):
            try:
                dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(
                    f"unparsable timestamp {ts[:64]!r}; use epoch ms or RFC 3339"
                ) from None
            if dt.tzinfo is None:
                raise ValueError(f"timestamp {ts[:64]!r} has no UTC offset; add 'Z' or '+00:00'")
            return int(dt.timestamp() * 1000)
        return ts

    def decode(self, values: Sequence[bytes | None]) -> DecodedBatch:
        """Decode and validate a batch. Never raises for bad input: failures are returned."""
        fast = self._decode_fast(values)
        if fast is not None:
            return fast
        s = self.settings
        failures: list[Failure] = []
        index: list[int] = []
        rows: list[tuple[float | None, ...]] = []
        devices: list[str] = []
        stamps: list[int] = []
        decode = self._decoder.decode
        astuple = msgspec.structs.astuple
        flat = self._flat
        for i, raw in enumerate(values):
            if raw is None or len(raw) == 0:
                what = "tombstone (null value)" if raw is None else "empty value"
                failures.append(Failure(i, Reason.DECODE_ERROR, Stage.DECODE, "EmptyValue", what))
                continue
            if len(raw) > s.max_value_bytes:
                failures.append(
                    Failure(
                        i,
                        Reason.OVERSIZE,
                        Stage.DECODE,
                        "Oversize",
                        f"value is {len(raw)} bytes, limit {s.max_value_bytes}",
                    )
                )
                continue
            bad_bytes = _utf8_problem(raw)
            if bad_bytes is not None:
                failures.append(
                    Failure(i, Reason.DECODE_ERROR, Stage.DECODE, "UnicodeDecodeError", bad_bytes)
                )
                continue
            try:
                r: Any = decode(raw)
            except msgspec.ValidationError as e:
                syntax = _syntax_problem(raw)
                if syntax is not None:
                    failures.append(
                        Failure(i, Reason.DECODE_ERROR, Stage.DECODE, "DecodeError", syntax)
                    )
                    continue
                failures.append(
                    Failure(
                        i,
                        _classify_validation(str(e), s),
                        Stage.DECODE,
                        "ValidationError",
                        str(e)[:500],
                    )
                )
                continue
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
                reason = (
                    Reason.INVALID_SHAPE if isinstance(e, RecursionError) else Reason.DECODE_ERROR
                )
                failures.append(Failure(i, reason, Stage.DECODE, type(e).__name__, str(e)[:500]))
                continue
            dev = r.device
            bad = self._check_device(dev)
            if bad is not None:
                failures.append(
                    Failure(i, Reason.INVALID_DEVICE_ID, Stage.VALIDATE, "InvalidDeviceId", bad)
                )
                continue
            try:
                ts = self._timestamp_ms(r.ts)
            except ValueError as e:
                failures.append(
                    Failure(i, Reason.INVALID_TIMESTAMP, Stage.VALIDATE, "ValueError", str(e))
                )
                continue
            index.append(i)
            devices.append(dev)
            stamps.append(ts)
            rows.append(astuple(r)[2:] if flat else astuple(r.values))
        return self._finish(index, rows, devices, stamps, failures)

    def _decode_fast(self, values: Sequence[bytes | None]) -> DecodedBatch | None:
        """A batch in bulk when every record decodes and has a known-good device id and a
        timestamp that fits int64; ``None`` sends the batch to the record-by-record path.

        Same results as that path (it is what any refusal here falls back to); about twice
        as fast, because the per-record work is a few C-level passes instead of a Python
        loop with a branch per check.
        """
        if not values:
            return None
        try:
            # None (tombstone) raises TypeError here; empty, oversize, malformed, null or
            # mistyped values raise below: all of them go the careful way.
            if max(map(len, values)) > self.settings.max_value_bytes:  # type: ignore[arg-type]
                return None
            recs: list[Any] = list(map(self._fast_decoder.decode, values))  # type: ignore[arg-type]
        except Exception:  # every failure is re-examined record by record
            return None
        if not _all_utf8(values):  # type: ignore[arg-type]
            return None
        devices: list[str] = list(map(_DEVICE, recs))
        good = self._good_ids
        if not good.issuperset(devices):
            for dev in set(devices).difference(good):
                if self._check_device(dev) is not None:
                    return None
        ts = self._fast_stamps(list(map(_TS, recs)))
        if ts is None:
            return None
        n, n_f = len(recs), len(self.features)
        rows = (_astuple(r)[2:] for r in recs) if self._flat else map(_astuple, map(_VALUES, recs))
        # struct.pack turns a row of Python floats into C doubles in one call: about 40 %
        # cheaper than np.fromiter's per-value conversion (docs/benchmarks.md). Every value
        # is a float here (the fast decoder's type), so the packing cannot fail.
        # bytearray.join: the matrix's own writable buffer, without a copy of the bytes.
        packed = bytearray().join(starmap(self._pack_row, rows))
        x = np.frombuffer(packed, dtype=np.float64).reshape(n, n_f)
        return self._validate(list(range(n)), x, devices, ts, [])

    def _fast_stamps(self, stamps: list[Any]) -> npt.NDArray[np.int64] | None:
        """Epoch-ms timestamps as int64, or None if one is unparsable or overflows int64."""
        if str in set(map(type, stamps)):  # RFC 3339 strings
            for j, t in enumerate(stamps):
                if isinstance(t, str):
                    try:
                        stamps[j] = self._timestamp_ms(t)
                    except ValueError:
                        return None
        try:
            return np.array(stamps, dtype=np.int64)
        except OverflowError:
            return None

    def _finish(
        self,
        index: list[int],
        rows: list[tuple[float | None, ...]],
        devices: list[str],
        stamps: list[int],
        failures: list[Failure],
    ) -> DecodedBatch:
        n_f = len(self.features)
        x = np.array(rows, dtype=np.float64).reshape(len(rows), n_f)  # None -> NaN
        # Python ints can exceed int64 (a malformed timestamp): clip before the cast, the
        # range check below refuses them anyway.
        ts = np.array([min(max(t, -(2**62)), 2**62) for t in stamps], dtype=np.int64)
        return self._validate(index, x, devices, ts, failures)

    def _validate(
        self,
        index: list[int],
        x: npt.NDArray[np.float64],
        devices: list[str],
        ts: npt.NDArray[np.int64],
        failures: list[Failure],
    ) -> DecodedBatch:
        """Range checks that need the whole batch: timestamps and missing features."""
        s = self.settings
        missing = _missing_per_row(x)
        now = self._now()
        keep = np.ones(len(index), dtype=bool)
        bad_ts = (
            (ts < _MIN_PLAUSIBLE_MS)
            | (ts > now + s.max_future_s * 1000)
            | (ts < now - s.max_past_s * 1000)
        )
        too_many_missing = missing > s.max_imputed_features
        if bad_ts.any() or too_many_missing.any():
            for j in np.flatnonzero(bad_ts | too_many_missing):
                keep[j] = False
                if bad_ts[j]:
                    failures.append(
                        Failure(
                            index[j],
                            Reason.INVALID_TIMESTAMP,
                            Stage.VALIDATE,
                            "ValueError",
                            _ts_message(int(ts[j]), now, s),
                        )
                    )
                else:
                    names = [self.features[k] for k in np.flatnonzero(np.isnan(x[j]))]
                    failures.append(
                        Failure(
                            index[j],
                            Reason.MISSING_FIELD,
                            Stage.VALIDATE,
                            "MissingFeature",
                            f"missing or null features {names[:10]} "
                            f"(more than {s.max_imputed_features} allowed)",
                        )
                    )
            failures.sort(key=lambda f: f.index)
            index = [k for k, ok in zip(index, keep, strict=True) if ok]
            devices = [d for d, ok in zip(devices, keep, strict=True) if ok]
            x, ts, missing = x[keep], ts[keep], missing[keep]
        return DecodedBatch(
            index=index,
            x=x,
            device_ids=devices,
            timestamps_ms=ts,
            missing=missing,
            failures=failures,
        )


def _missing_per_row(x: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Count of NaN per row; most batches have none, and ``any`` is a quarter of the cost
    of the per-row sum it then skips."""
    nan = np.isnan(x)
    if not nan.any():
        return np.zeros(len(x), dtype=np.int64)
    out: npt.NDArray[np.int64] = nan.sum(axis=1, dtype=np.int64)
    return out


def _reading_type(
    features: tuple[str, ...], s: ReadingSettings, feature_type: Any, default: Any
) -> type:
    """A msgspec Struct type of one reading, fields renamed to the configured JSON names.

    ``gc=False``: the structs hold only str, int and float, so they cannot form reference
    cycles, and untracked objects keep the garbage collector out of the decode loop.
    """
    feats = [(f"f{i}", feature_type, default) for i in range(len(features))]
    rename = {f"f{i}": name for i, name in enumerate(features)}
    head = [("device", str), ("ts", int | str)]
    head_names = {"device": s.device_field, "ts": s.timestamp_field}
    if s.values_field:
        values_t = msgspec.defstruct("Values", feats, rename=rename, gc=False)
        return msgspec.defstruct(
            "Reading",
            [*head, ("values", values_t)],
            rename={**head_names, "values": s.values_field},
            gc=False,
        )
    return msgspec.defstruct("Reading", [*head, *feats], rename={**head_names, **rename}, gc=False)


def _ts_message(ts: int, now: int, s: ReadingSettings) -> str:
    if ts < _MIN_PLAUSIBLE_MS:
        return f"timestamp {ts} looks like seconds or is before 1973; send epoch milliseconds"
    if ts > now:
        ahead = (ts - now) / 1000
        return f"timestamp {ts} is {ahead:.0f}s in the future (limit {s.max_future_s:.0f}s)"
    return f"timestamp {ts} is {(now - ts) / 1000:.0f}s old (limit {s.max_past_s:.0f}s)"
