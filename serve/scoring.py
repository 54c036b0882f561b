"""The API's work, without HTTP: request bytes in, a response document out, or an ApiError.

Readings go through the worker's own :class:`worker.decode.ReadingDecoder` (same contract,
same validation, same dead-letter reasons) and the detector's numpy scoring, and an
anomalous reading's contributors come from :meth:`Detector.contributions_many` with the
``events`` settings, exactly as :class:`worker.pipeline.Scorer` builds an event; the
integration tests compare the two to 1e-9. What differs, on purpose:

- ``device_id`` and ``timestamp`` are optional: a reading without them is scored as if
  sent by device ``"-"`` at the server's clock (and echoed back as ``null``);
- a feature the model does not know fails the *request* (422): it means the client and the
  model disagree on the feature set, which no per-reading answer would fix;
- the API is stateless: ``is_anomaly`` is ``score > threshold`` for each reading on its own,
  so the worker's per-device debounce (``events.min_consecutive``) does not apply.

Every other problem with one reading (a missing or null feature beyond
``reading.max_imputed_features``, a string or out-of-range number, a bad timestamp or device
id, a non-finite score) is reported in that reading's ``error`` without failing the others;
when *no* reading of a request can be used, the whole request is a 422 that names the first
problem.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from detector import Contribution
from detector.halves import decode, encode
from serve.config import ServeConfig
from serve.models import ModelSlot
from worker.config import ReadingSettings
from worker.decode import DecodedBatch, Failure
from worker.reasons import Reason, Stage

ANONYMOUS_DEVICE = "-"


class ApiError(Exception):
    """A request the server will not process: HTTP ``status`` and a JSON body.

    Attributes:
        status: 4xx (the client's fault) or 5xx.
        message: what is wrong, one line.
        field: JSON path of the offending part of the request, if any (e.g. ``readings[3]``).
        fix: what to do instead.
        extra: more members of the error body.
    """

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        fix: str | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.fix = fix
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """``{"error": message, "field"?, "fix"?, ...}`` (OIP v2 clients read ``error``)."""
        out: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.fix is not None:
            out["fix"] = self.fix
        out.update(self.extra)
        return out


class ReadingsBody(msgspec.Struct, forbid_unknown_fields=True):
    readings: list[msgspec.Raw]


class CodesBody(msgspec.Struct, forbid_unknown_fields=True):
    codes: list[list[float]]


class OipTensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class OipRequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] | None = None


class OipRequest(msgspec.Struct):
    inputs: list[OipTensor]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[OipRequestedOutput] | None = None


OIP_OUTPUTS = ("score", "is_anomaly", "score_ratio")
_OIP_DATATYPES = {"FP32": np.float32, "FP64": np.float64}


def parse_json(body: bytes, tp: type[Any], what: str) -> Any:
    """Decode ``body`` as ``tp``; malformed JSON is a 400, the wrong shape a 422."""
    try:
        return msgspec.json.decode(body, type=tp)
    except msgspec.ValidationError as e:
        msg = str(e)
        path = msg.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in msg else "$"
        raise ApiError(
            422,
            f"request body does not match the {what} schema: {msg}",
            field=path,
            fix="see /openapi.json for the request schema",
        ) from None
    except msgspec.DecodeError as e:
        raise ApiError(
            400,
            f"request body is not valid JSON: {e}",
            field="$",
            fix="send one JSON document (JSON has no NaN or Infinity literals: leave a "
            "missing feature out, or send null)",
        ) from None


def _require_point_model(slot: ModelSlot) -> None:
    w = slot.detector.window
    if w != 1:
        raise ApiError(
            422,
            f"model {slot.name!r} scores windows of {w} readings per device; the HTTP API "
            "serves per-point models (window 1) only",
            field="name",
            fix="score this model with the Kafka worker, or serve a per-point model",
        )


def _check_count(n: int, cfg: ServeConfig, what: str) -> None:
    limit = cfg.serve.max_readings
    if n > limit:
        raise ApiError(
            422,
            f"{n} {what} in one request; the limit is {limit}",
            field=what,
            fix=f"split the request into batches of at most {limit} (serve.max_readings)",
        )
    if n == 0:
        raise ApiError(422, f"no {what} in the request", field=what, fix="send at least one")


@dataclass(frozen=True, eq=False)
class _Parsed:
    """Readings of one request, decoded by the worker's decoder."""

    n: int
    batch: DecodedBatch
    anonymous: list[bool]  # per input reading: device_id was absent


_ABSENT = msgspec.Raw()  # the default of every head field: identity means "not sent"


def _head_decoder(reading: ReadingSettings, names: tuple[str, ...]) -> msgspec.json.Decoder[Any]:
    """Reads which header fields a reading has, and refuses feature names not in ``names``.

    Values are parsed untyped; the typed checks are the worker decoder's.
    ``forbid_unknown_fields`` makes the parser itself name the first unknown feature, so a
    good reading costs a few microseconds here.
    """
    s = reading
    # Any, not Raw, for the values: measured faster (a Raw object per value costs more than
    # parsing the number); the worker's decoder does the typed checks afterwards.
    feats = [(f"f{i}", Any, None) for i in range(len(names))]
    rename = {f"f{i}": n for i, n in enumerate(names)}
    head = [("device", msgspec.Raw, _ABSENT), ("ts", msgspec.Raw, _ABSENT)]
    head_names = {"device": s.device_field, "ts": s.timestamp_field}
    if s.values_field:
        values_t = msgspec.defstruct("Values", feats, rename=rename, forbid_unknown_fields=True)
        tp = msgspec.defstruct(
            "Head",
            [*head, ("values", values_t | None, None)],
            rename={**head_names, "values": s.values_field},
        )
    else:
        tp = msgspec.defstruct(
            "Head", [*head, *feats], rename={**head_names, **rename}, forbid_unknown_fields=True
        )
    return msgspec.json.Decoder(tp)


_HEADS: dict[tuple[ReadingSettings, tuple[str, ...]], msgspec.json.Decoder[Any]] = {}


def _heads(cfg: ServeConfig, slot: ModelSlot) -> msgspec.json.Decoder[Any]:
    """The head decoder for these reading settings and this model's features (cached)."""
    det = slot.detector
    key = (cfg.reading, det.feature_names + tuple(c.name for c in det.constants))
    d = _HEADS.get(key)
    if d is None:
        if len(_HEADS) > 64:  # reloads bring new feature sets; keep the cache bounded
            _HEADS.clear()
        d = _HEADS[key] = _head_decoder(*key)
    return d


def _complete(raw: bytes, fields: list[bytes]) -> bytes:
    """``raw`` (a JSON object) with ``fields`` (``b'"k":v'``) added at its start."""
    start = raw.index(b"{") + 1
    rest = raw[start:].lstrip()
    sep = b"" if rest.startswith(b"}") else b","
    return raw[:start] + b",".join(fields) + sep + raw[start:]


def _unknown_features_error(i: int, unknown: str, slot: ModelSlot, cfg: ServeConfig) -> ApiError:
    values = cfg.reading.values_field
    where = f"readings[{i}].{values}" if values else f"readings[{i}]"
    return ApiError(
        422,
        f"readings[{i}] has feature {unknown!r}, which model {slot.name!r} version "
        f"{slot.version} does not know",
        field=f"{where}.{unknown}",
        fix="send only the model's features (GET /v1/models/{name} lists them)",
        expected_features=list(slot.detector.feature_names),
    )


def _complete_readings(
    raw_values: list[bytes], head: Any, slot: ModelSlot, cfg: ServeConfig
) -> tuple[list[bytes], list[bool]]:
    """Reading by reading: refuse unknown features, add an absent device id or timestamp."""
    s = cfg.reading
    values: list[bytes] = []
    anonymous: list[bool] = []
    now_ms: int | None = None
    dev_key = msgspec.json.encode(s.device_field)
    ts_key = msgspec.json.encode(s.timestamp_field)
    for i, raw in enumerate(raw_values):
        try:
            h = head(raw)
        except msgspec.ValidationError as e:
            msg = str(e)
            if msg.startswith("Object contains unknown field `"):
                raise _unknown_features_error(i, msg.split("`")[1], slot, cfg) from None
            # Not an object, values not an object: the worker's decoder names the reason.
            values.append(raw)
            anonymous.append(False)
            continue
        except msgspec.DecodeError:
            values.append(raw)
            anonymous.append(False)
            continue
        has_dev, has_ts = h.device is not _ABSENT, h.ts is not _ABSENT
        if has_dev and has_ts:
            values.append(raw)
            anonymous.append(False)
            continue
        add = []
        if not has_dev:
            add.append(dev_key + b':"' + ANONYMOUS_DEVICE.encode() + b'"')
        if not has_ts:
            now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
            add.append(ts_key + b":" + str(now_ms).encode())
        values.append(_complete(raw, add))
        anonymous.append(not has_dev)
    return values, anonymous


def parse_readings(body: bytes, slot: ModelSlot, cfg: ServeConfig) -> _Parsed:
    """Request bytes → the worker's :class:`DecodedBatch`; request-level problems raise."""
    _require_point_model(slot)
    raws = parse_json(body, ReadingsBody, "readings").readings
    _check_count(len(raws), cfg, "readings")
    head = _heads(cfg, slot).decode
    raw_values = [bytes(r) for r in raws]
    # Fast path: every reading is an object of known features with a device id and a
    # timestamp, checked with one C-level pass per reading and no Python branching.
    try:
        heads = list(map(head, raw_values))
    except (msgspec.ValidationError, msgspec.DecodeError):
        heads = []
    if heads and all(h.device is not _ABSENT and h.ts is not _ABSENT for h in heads):
        values, anonymous = raw_values, [False] * len(raw_values)
    else:
        values, anonymous = _complete_readings(raw_values, head, slot, cfg)
    batch = slot.reading_decoder(cfg).decode(values)
    if not batch.index:
        f = batch.failures[0]
        raise ApiError(
            422,
            f"no reading could be used; readings[{f.index}]: {f.message}",
            field=f"readings[{f.index}]",
            fix=_FIXES.get(f.reason, "see the reading contract in /openapi.json"),
            reason=f.reason.value,
            errors=[_error_doc(x) for x in batch.failures[:100]],
        )
    return _Parsed(n=len(raws), batch=batch, anonymous=anonymous)


_FIXES = {
    Reason.DECODE_ERROR: "send each reading as a JSON object",
    Reason.INVALID_SHAPE: 'send {"values": {"<sensor>": <number>, ...}} for each reading',
    Reason.INVALID_NUMBER: "send feature values as JSON numbers within float64 range",
    Reason.MISSING_FIELD: "send every feature of the model (GET /v1/models/{name} lists them)",
    Reason.INVALID_TIMESTAMP: "send epoch milliseconds or RFC 3339 with an offset, or omit it",
    Reason.INVALID_DEVICE_ID: "send a non-empty device id without control characters",
    Reason.OVERSIZE: "send smaller readings (reading.max_value_bytes)",
    Reason.NON_FINITE_SCORE: "send values within the sensors' physical range",
}


def _error_doc(f: Failure) -> dict[str, Any]:
    return {
        "index": f.index,
        "error": {"reason": f.reason.value, "stage": f.stage.value, "message": f.message},
    }


def _non_finite(index: int, what: str) -> dict[str, Any]:
    return {
        "index": index,
        "error": {
            "reason": Reason.NON_FINITE_SCORE.value,
            "stage": Stage.SCORE.value,
            "message": f"{what} is not finite: an input overflows the model's range",
        },
    }


def _results_frame(p: _Parsed) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = [None] * p.n
    for f in p.batch.failures:
        out[f.index] = _error_doc(f)
    return out


def _device(p: _Parsed, j: int) -> str | None:
    i = p.batch.index[j]
    return None if p.anonymous[i] else p.batch.device_ids[j]


def _model_doc(slot: ModelSlot) -> dict[str, str]:
    return {"name": slot.name, "version": slot.version}


def _finish(slot: ModelSlot, results: list[dict[str, Any] | None], **counts: int) -> bytes:
    errors = sum(1 for r in results if r is not None and "error" in r)
    doc = {"model": _model_doc(slot), **counts, "errors": errors, "results": results}
    return msgspec.json.encode(doc)


def _contributor_docs(found: list[Contribution]) -> list[dict[str, Any]]:
    # Rounded as in the worker's events (worker.events.build_event).
    return [
        {
            "sensor": c.sensor,
            "share": round(c.share, 6),
            "value": c.value,
            "expected": c.expected,
            "error_z": round(c.error_z, 3),
        }
        for c in found
    ]


def score(body: bytes, slot: ModelSlot, cfg: ServeConfig) -> tuple[bytes, int, int, int]:
    """``POST /v1/models/{name}/score``.

    Returns ``(response JSON, readings scored, anomalies, per-reading errors)``.
    """
    p = parse_readings(body, slot, cfg)
    det = slot.detector
    batch = p.batch
    scores = det.score(batch.x)
    s = scores.score
    finite = np.isfinite(s)
    anomalous = det.is_anomaly(s) & finite
    hot = np.flatnonzero(anomalous).tolist()
    ev = cfg.events
    contributors = dict(
        zip(
            hot,
            det.contributions_many(
                batch.x, scores, hot, top=ev.top_sensors, min_share=ev.min_share
            ),
            strict=True,
        )
    )
    oor = det.out_of_range(batch.x)
    oor_rows = set(np.flatnonzero(oor.any).tolist())
    thr = det.threshold.value
    names = det.feature_names
    results = _results_frame(p)
    s_list = s.tolist()
    ts_list = batch.timestamps_ms.tolist()
    for j, i in enumerate(batch.index):
        sj = s_list[j]
        if not math.isfinite(sj):
            results[i] = _non_finite(i, f"score ({sj})")
            continue
        results[i] = {
            "index": i,
            "device_id": _device(p, j),
            "timestamp_ms": ts_list[j],
            "score": sj,
            "threshold": thr,
            "score_ratio": sj / thr,
            "is_anomaly": j in contributors,
            # Rounded as in the worker's events.
            "contributors": _contributor_docs(contributors[j]) if j in contributors else [],
            "out_of_range": (
                [{"sensor": f, "excess": e} for f, e in oor.features(j)] if j in oor_rows else []
            ),
            "imputed_sensors": (
                [names[k] for k in np.flatnonzero(np.isnan(batch.x[j]))] if batch.missing[j] else []
            ),
        }
    n_scored = int(finite.sum())
    n_anom = len(hot)
    body_out = _finish(slot, results, scored=n_scored, anomalies=n_anom)
    return body_out, n_scored, n_anom, p.n - n_scored


def _raw_dicts(names: Sequence[str], rows: npt.NDArray[np.float64]) -> list[dict[str, float]]:
    return [dict(zip(names, r, strict=True)) for r in rows.tolist()]


def reconstruct(body: bytes, slot: ModelSlot, cfg: ServeConfig) -> tuple[bytes, int]:
    """``POST /v1/models/{name}/reconstruct``: the autoencoder's output in raw units.

    Returns ``(response JSON, readings reconstructed)``.
    """
    p = parse_readings(body, slot, cfg)
    det = slot.detector
    scores = det.score(p.batch.x)
    raw = det.preprocessor.inverse_transform(scores.reconstruction)
    ok = np.isfinite(scores.score) & np.isfinite(raw).all(axis=1)
    rows = _raw_dicts(det.feature_names, raw)
    results = _results_frame(p)
    s_list = scores.score.tolist()
    for j, i in enumerate(p.batch.index):
        if not ok[j]:
            results[i] = _non_finite(i, "the reconstruction")
            continue
        results[i] = {
            "index": i,
            "device_id": _device(p, j),
            "reconstruction": rows[j],
            "score": s_list[j],
        }
    n = int(ok.sum())
    return _finish(slot, results, reconstructed=n), n


def encode_readings(body: bytes, slot: ModelSlot, cfg: ServeConfig) -> tuple[bytes, int]:
    """``POST /v1/models/{name}/encode``: the bottleneck code of each reading.

    Returns ``(response JSON, readings encoded)``.
    """
    p = parse_readings(body, slot, cfg)
    det = slot.detector
    with np.errstate(over="ignore", invalid="ignore"):
        code = encode(det.network, det.preprocessor.transform(p.batch.x))
    ok = np.asarray(np.isfinite(code).all(axis=1)).tolist()
    codes = code.tolist()
    results = _results_frame(p)
    for j, i in enumerate(p.batch.index):
        if not ok[j]:
            results[i] = _non_finite(i, "the code")
            continue
        results[i] = {"index": i, "device_id": _device(p, j), "code": codes[j]}
    n = sum(ok)
    return _finish(slot, results, encoded=n, code_width=slot.code_width), n


def decode_codes(body: bytes, slot: ModelSlot, cfg: ServeConfig) -> tuple[bytes, int]:
    """``POST /v1/models/{name}/decode``: latent codes → readings in raw units.

    Returns ``(response JSON, codes decoded)``.
    """
    _require_point_model(slot)
    if slot.decoder_net is None:
        raise ApiError(
            422,
            f"model {slot.name!r} has no decoder half",
            field="name",
            fix="re-train it with a code layer before the output",
        )
    codes = parse_json(body, CodesBody, "codes").codes
    _check_count(len(codes), cfg, "codes")
    width = slot.code_width
    for i, c in enumerate(codes):
        if len(c) != width:
            raise ApiError(
                422,
                f"codes[{i}] has {len(c)} values; model {slot.name!r} version {slot.version} "
                f"has a code of width {width}",
                field=f"codes[{i}]",
                fix=f"send {width} numbers per code (the output of /encode for this model)",
            )
    det = slot.detector
    with np.errstate(over="ignore", invalid="ignore"):
        out = det.preprocessor.inverse_transform(
            decode(det.network, np.asarray(codes, dtype=np.float64), slot.decoder_net)
        )
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ApiError(
            422,
            f"codes[{i}] decodes to non-finite values",
            field=f"codes[{i}]",
            fix="send codes in the range /encode produces for real readings",
        )
    rows = _raw_dicts(det.feature_names, out)
    doc = {
        "model": _model_doc(slot),
        "decoded": len(rows),
        "readings": [{"index": i, "values": r} for i, r in enumerate(rows)],
    }
    return msgspec.json.encode(doc), len(rows)


def oip_metadata(slot: ModelSlot) -> dict[str, Any]:
    """``GET /v2/models/{name}`` (Open Inference Protocol v2 model metadata)."""
    d = slot.detector.n_features
    return {
        "name": slot.name,
        "versions": [slot.version],
        "platform": "sensor-anomaly-numpy",
        "inputs": [{"name": "readings", "datatype": "FP32", "shape": [-1, d]}],
        "outputs": [
            {"name": "score", "datatype": "FP64", "shape": [-1]},
            {"name": "is_anomaly", "datatype": "BOOL", "shape": [-1]},
            {"name": "score_ratio", "datatype": "FP64", "shape": [-1]},
        ],
        "parameters": {"feature_names": list(slot.detector.feature_names)},
    }


def _oip_matrix(t: OipTensor, d: int, cfg: ServeConfig) -> npt.NDArray[np.float64]:
    dtype = _OIP_DATATYPES.get(t.datatype)
    if dtype is None:
        raise ApiError(
            400,
            f"input {t.name!r} has datatype {t.datatype!r}",
            field="inputs[0].datatype",
            fix="send FP32 (or FP64) data",
        )
    if len(t.shape) != 2 or t.shape[1] != d or t.shape[0] < 0:
        raise ApiError(
            400,
            f"input {t.name!r} has shape {t.shape}; this model takes [n, {d}]",
            field="inputs[0].shape",
            fix=f"send shape [n, {d}] with the features in the order of GET /v2/models/{{name}}",
        )
    _check_count(t.shape[0], cfg, "rows")
    nested = bool(t.data) and isinstance(t.data[0], list)
    try:
        flat = (
            [v for row in msgspec.convert(t.data, list[list[float]]) for v in row]
            if nested
            else msgspec.convert(t.data, list[float])
        )
    except msgspec.ValidationError as e:
        raise ApiError(
            400,
            f"input {t.name!r} data must be numbers: {e}",
            field="inputs[0].data",
            fix="send a flat row-major list of numbers (or one list per row)",
        ) from None
    n = t.shape[0]
    if len(flat) != n * d:
        raise ApiError(
            400,
            f"input {t.name!r} has {len(flat)} values; shape {t.shape} needs {n * d}",
            field="inputs[0].data",
            fix="send exactly shape[0] * shape[1] values, row-major",
        )
    x = np.asarray(flat, dtype=np.float64).reshape(n, d)
    if not np.isfinite(x).all():
        raise ApiError(
            400,
            f"input {t.name!r} holds non-finite values",
            field="inputs[0].data",
            fix="send finite numbers (the tensor form has no missing values)",
        )
    # The declared precision is applied: FP32 data is scored as the float32 it stands for.
    return x.astype(dtype).astype(np.float64)


def oip_infer(body: bytes, slot: ModelSlot, cfg: ServeConfig) -> tuple[bytes, int, int]:
    """``POST /v2/models/{name}/infer``: an ``[n, features]`` tensor → score and is_anomaly.

    Returns ``(response JSON, rows scored, anomalies)``.
    """
    _require_point_model(slot)
    req = parse_json(body, OipRequest, "Open Inference Protocol v2 inference request")
    if len(req.inputs) != 1:
        raise ApiError(
            400,
            f"expected one input tensor, got {len(req.inputs)}",
            field="inputs",
            fix="send one FP32 tensor of shape [n, features]",
        )
    det = slot.detector
    x = _oip_matrix(req.inputs[0], det.n_features, cfg)
    wanted = [o.name for o in req.outputs] if req.outputs else list(OIP_OUTPUTS[:2])
    for name in wanted:
        if name not in OIP_OUTPUTS:
            raise ApiError(
                400,
                f"unknown output {name!r}",
                field="outputs",
                fix=f"request any of {list(OIP_OUTPUTS)}",
            )
    s = det.score(x).score
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ApiError(
            422,
            f"row {int(bad[0])} has a non-finite score: an input overflows the model's range",
            field="inputs[0].data",
            fix="send values within the sensors' physical range",
        )
    anomalous = det.is_anomaly(s)
    n = len(s)
    tensors = {
        "score": {"name": "score", "datatype": "FP64", "shape": [n], "data": s.tolist()},
        "is_anomaly": {
            "name": "is_anomaly",
            "datatype": "BOOL",
            "shape": [n],
            "data": anomalous.tolist(),
        },
        "score_ratio": {
            "name": "score_ratio",
            "datatype": "FP64",
            "shape": [n],
            "data": (s / det.threshold.value).tolist(),
        },
    }
    doc: dict[str, Any] = {
        "model_name": slot.name,
        "model_version": slot.version,
        "outputs": [tensors[name] for name in wanted],
    }
    if req.id is not None:
        doc["id"] = req.id
    return msgspec.json.encode(doc), n, int(anomalous.sum())
