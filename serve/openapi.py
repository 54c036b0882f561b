"""The OpenAPI 3.1 document of the API, written by hand from the routes in :mod:`serve.app`.

``GET /openapi.json`` serves it; ``schemas/openapi.json`` is the committed copy
(``anomaly-serve openapi --output schemas/openapi.json``), and
``tests/unit/test_serve_openapi.py`` checks that the two agree and that every route of the
application is documented.
"""

from __future__ import annotations

from typing import Any

from serve import version

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON or an invalid tensor",
        401: "Missing or wrong bearer token (only when the server has one)",
        404: "No such model (or model version)",
        408: "The body did not arrive within serve.request_timeout_s",
        413: "Body larger than serve.max_body_bytes",
        415: "Content-Type is not JSON",
        422: "Well-formed JSON that cannot be used (see `field` and `fix`)",
        500: "Internal error (the body has an id; the server log has the details)",
    }
    return {str(c): _json(_ref("Error"), text[c]) for c in codes}


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "Model name (GET /v1/models lists them)",
}
_VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "Model version; must be the one currently served",
}
_READING_POST = (400, 401, 404, 408, 413, 415, 422, 500)


def _post(summary: str, request: str, response: str, tag: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "tags": [tag],
            "parameters": [_NAME],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {"200": _json(_ref(response), "OK"), **_errors(*_READING_POST)},
        }
    }


def _get(summary: str, response: dict[str, Any], tag: str, *codes: int, params: Any = ()) -> Any:
    op: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "responses": {"200": _json(response, "OK"), **_errors(*codes)},
    }
    if params:
        op["parameters"] = list(params)
    return {"get": op}


_NUM = {"type": "number"}
_STR = {"type": "string"}
_NULLABLE_STR = {"type": ["string", "null"]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string", "description": "What is wrong (one line)"},
            "field": {"type": "string", "description": "The offending part of the request"},
            "fix": {"type": "string", "description": "What to do instead"},
        },
        "additionalProperties": True,
    },
    "Reading": {
        "type": "object",
        "description": "One reading, as on the Kafka topic (schemas/reading.v1.json), with "
        "device_id and timestamp optional. Field names follow the reading config section.",
        "required": ["values"],
        "properties": {
            "device_id": {"type": "string", "minLength": 1},
            "timestamp": {
                "oneOf": [
                    {"type": "integer", "description": "epoch milliseconds"},
                    {"type": "string", "description": "RFC 3339 with an offset"},
                ]
            },
            "values": {
                "type": "object",
                "description": "Feature values by sensor name; null or absent = missing",
                "additionalProperties": {"type": ["number", "null"]},
            },
        },
    },
    "ReadingsRequest": {
        "type": "object",
        "required": ["readings"],
        "additionalProperties": False,
        "properties": {
            "readings": {"type": "array", "minItems": 1, "items": _ref("Reading")},
        },
    },
    "CodesRequest": {
        "type": "object",
        "required": ["codes"],
        "additionalProperties": False,
        "properties": {
            "codes": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "array", "items": _NUM},
                "description": "Latent codes, each of the model's code_width",
            }
        },
    },
    "ModelRef": {
        "type": "object",
        "required": ["name", "version"],
        "properties": {"name": _STR, "version": _STR},
    },
    "ReadingError": {
        "type": "object",
        "required": ["index", "error"],
        "properties": {
            "index": {"type": "integer"},
            "error": {
                "type": "object",
                "required": ["reason", "stage", "message"],
                "properties": {
                    "reason": {
                        "type": "string",
                        "enum": [
                            "decode_error",
                            "invalid_shape",
                            "invalid_number",
                            "missing_field",
                            "invalid_timestamp",
                            "invalid_device_id",
                            "oversize",
                            "non_finite_score",
                        ],
                        "description": "The worker's dead-letter reason",
                    },
                    "stage": {"type": "string", "enum": ["decode", "validate", "score"]},
                    "message": _STR,
                },
            },
        },
    },
    "Contributor": {
        "type": "object",
        "required": ["sensor", "share", "value", "expected", "error_z"],
        "properties": {
            "sensor": _STR,
            "share": {"type": "number", "description": "Fraction of the squared error, 0..1"},
            "value": {"type": ["number", "null"], "description": "Observed, raw units"},
            "expected": {"type": "number", "description": "Reconstruction, raw units"},
            "error_z": {"type": "number"},
        },
    },
    "ScoreResult": {
        "type": "object",
        "required": [
            "index",
            "device_id",
            "timestamp_ms",
            "score",
            "threshold",
            "score_ratio",
            "is_anomaly",
            "contributors",
            "out_of_range",
            "imputed_sensors",
        ],
        "properties": {
            "index": {"type": "integer"},
            "device_id": _NULLABLE_STR,
            "timestamp_ms": {"type": "integer"},
            "score": {"type": "number", "description": "Reconstruction MSE, scaled units"},
            "threshold": _NUM,
            "score_ratio": _NUM,
            "is_anomaly": {"type": "boolean"},
            "contributors": {
                "type": "array",
                "items": _ref("Contributor"),
                "description": "Ranked, as in anomaly events; empty for normal readings",
            },
            "out_of_range": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["sensor", "excess"],
                    "properties": {"sensor": _STR, "excess": _NUM},
                },
            },
            "imputed_sensors": {"type": "array", "items": _STR},
        },
    },
    "ScoreResponse": {
        "type": "object",
        "required": ["model", "scored", "anomalies", "errors", "results"],
        "properties": {
            "model": _ref("ModelRef"),
            "scored": {"type": "integer"},
            "anomalies": {"type": "integer"},
            "errors": {"type": "integer"},
            "results": {
                "type": "array",
                "items": {"oneOf": [_ref("ScoreResult"), _ref("ReadingError")]},
            },
        },
    },
    "ReconstructResponse": {
        "type": "object",
        "required": ["model", "reconstructed", "errors", "results"],
        "properties": {
            "model": _ref("ModelRef"),
            "reconstructed": {"type": "integer"},
            "errors": {"type": "integer"},
            "results": {
                "type": "array",
                "items": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["index", "device_id", "reconstruction", "score"],
                            "properties": {
                                "index": {"type": "integer"},
                                "device_id": _NULLABLE_STR,
                                "reconstruction": {
                                    "type": "object",
                                    "additionalProperties": _NUM,
                                    "description": "Raw units, by sensor",
                                },
                                "score": _NUM,
                            },
                        },
                        _ref("ReadingError"),
                    ]
                },
            },
        },
    },
    "EncodeResponse": {
        "type": "object",
        "required": ["model", "encoded", "code_width", "errors", "results"],
        "properties": {
            "model": _ref("ModelRef"),
            "encoded": {"type": "integer"},
            "code_width": {"type": "integer"},
            "errors": {"type": "integer"},
            "results": {
                "type": "array",
                "items": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["index", "device_id", "code"],
                            "properties": {
                                "index": {"type": "integer"},
                                "device_id": _NULLABLE_STR,
                                "code": {"type": "array", "items": _NUM},
                            },
                        },
                        _ref("ReadingError"),
                    ]
                },
            },
        },
    },
    "DecodeResponse": {
        "type": "object",
        "required": ["model", "decoded", "readings"],
        "properties": {
            "model": _ref("ModelRef"),
            "decoded": {"type": "integer"},
            "readings": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "values"],
                    "properties": {
                        "index": {"type": "integer"},
                        "values": {"type": "object", "additionalProperties": _NUM},
                    },
                },
            },
        },
    },
    "ModelSummary": {
        "type": "object",
        "required": ["name", "version", "n_features", "threshold", "trained_at"],
        "properties": {
            "name": _STR,
            "version": _STR,
            "n_features": {"type": "integer"},
            "threshold": _NUM,
            "trained_at": _STR,
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["models"],
        "properties": {"models": {"type": "array", "items": _ref("ModelSummary")}},
    },
    "ModelDetail": {
        "type": "object",
        "required": ["name", "version", "features", "n_features", "threshold", "code_width"],
        "properties": {
            "name": _STR,
            "version": _STR,
            "trained_at": _STR,
            "training_fingerprint": _STR,
            "features": {
                "type": "array",
                "items": _STR,
                "description": "Feature names in the model's input order",
            },
            "n_features": {"type": "integer"},
            "code_width": {"type": "integer"},
            "window": {"type": "integer"},
            "threshold": {
                "type": "object",
                "properties": {
                    "value": _NUM,
                    "method": _STR,
                    "param": _NUM,
                    "holdout_error_mean": _NUM,
                    "holdout_error_std": _NUM,
                    "holdout_n": {"type": "integer"},
                },
            },
            "scaler": _STR,
            "training": {"type": "object", "description": "The trainer's summary"},
            "loaded_at": {"type": "number", "description": "Unix seconds"},
        },
    },
    "Health": {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}},
    "Readiness": {
        "type": "object",
        "required": ["ok", "stopping", "models"],
        "properties": {
            "ok": {"type": "boolean"},
            "stopping": {"type": "boolean"},
            "models": {"type": "object", "additionalProperties": _STR},
        },
    },
    "OipTensor": {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": _STR,
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "enum": ["FP32", "FP64"]},
            "parameters": {"type": "object"},
            "data": {
                "type": "array",
                "description": "Row-major flat numbers, or one array per row",
                "items": {"oneOf": [_NUM, {"type": "array", "items": _NUM}]},
            },
        },
    },
    "OipInferRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": _STR,
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _ref("OipTensor")},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "enum": ["score", "is_anomaly", "score_ratio"]},
                        "parameters": {"type": "object"},
                    },
                },
            },
        },
    },
    "OipOutputTensor": {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": _STR,
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "enum": ["FP64", "BOOL"]},
            "data": {"type": "array", "items": {"type": ["number", "boolean"]}},
        },
    },
    "OipInferResponse": {
        "type": "object",
        "required": ["model_name", "model_version", "outputs"],
        "properties": {
            "model_name": _STR,
            "model_version": _STR,
            "id": _STR,
            "outputs": {"type": "array", "items": _ref("OipOutputTensor")},
        },
    },
    "OipTensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": _STR,
            "datatype": _STR,
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "OipModelMetadata": {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": _STR,
            "versions": {"type": "array", "items": _STR},
            "platform": _STR,
            "inputs": {"type": "array", "items": _ref("OipTensorMetadata")},
            "outputs": {"type": "array", "items": _ref("OipTensorMetadata")},
            "parameters": {"type": "object"},
        },
    },
    "OipServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": _STR,
            "version": _STR,
            "extensions": {"type": "array", "items": _STR},
        },
    },
    "OipReady": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
    "OipLive": {"type": "object", "properties": {"live": {"type": "boolean"}}},
}


def _paths() -> dict[str, Any]:
    v1, v2, ops = "v1", "Open Inference Protocol v2", "operations"
    infer = _post("Score a tensor [n, features] (features in model order)", "OipInferRequest",
                  "OipInferResponse", v2)  # fmt: skip
    versioned_infer = {"post": {**infer["post"], "parameters": [_NAME, _VERSION]}}
    ready_503 = {"503": _json(_ref("Readiness"), "Not ready (starting or stopping)")}
    return {
        "/healthz": _get("Liveness", _ref("Health"), ops),
        "/readyz": {
            "get": {
                **_get("Readiness: models loaded and not stopping", _ref("Readiness"), ops)["get"],
                "responses": {"200": _json(_ref("Readiness"), "Ready"), **ready_503},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                "tags": [ops],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": _get("This document", {"type": "object"}, ops),
        "/v1/models": _get("Served models", _ref("ModelList"), v1, 401),
        "/v1/models/{name}": _get(
            "One model: versions, features in order, threshold, training summary",
            _ref("ModelDetail"),
            v1,
            401,
            404,
            params=[_NAME],
        ),
        "/v1/models/{name}/score": _post(
            "Score readings: per reading score, threshold, anomaly flag, contributors",
            "ReadingsRequest",
            "ScoreResponse",
            v1,
        ),
        "/v1/models/{name}/reconstruct": _post(
            "The autoencoder's reconstruction of each reading, raw units",
            "ReadingsRequest",
            "ReconstructResponse",
            v1,
        ),
        "/v1/models/{name}/encode": _post(
            "The latent (bottleneck) code of each reading", "ReadingsRequest", "EncodeResponse", v1
        ),
        "/v1/models/{name}/decode": _post(
            "Latent codes to readings, raw units", "CodesRequest", "DecodeResponse", v1
        ),
        "/v2": _get("Server metadata", _ref("OipServerMetadata"), v2, 401),
        "/v2/health/live": _get("Server live", _ref("OipLive"), v2),
        "/v2/health/ready": _get("Server ready (503 when not)", _ref("OipReady"), v2),
        "/v2/models/{name}": _get(
            "Model metadata", _ref("OipModelMetadata"), v2, 401, 404, params=[_NAME]
        ),
        "/v2/models/{name}/ready": _get(
            "Model ready (503 when not)", _ref("OipReady"), v2, 401, 404, params=[_NAME]
        ),
        "/v2/models/{name}/infer": infer,
        "/v2/models/{name}/versions/{version}": _get(
            "Model metadata (this version)",
            _ref("OipModelMetadata"),
            v2,
            401,
            404,
            params=[_NAME, _VERSION],
        ),
        "/v2/models/{name}/versions/{version}/infer": versioned_infer,
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "anomaly-serve",
            "version": version(),
            "description": "Scoring API of sensor-anomaly: the same detector artifacts and "
            "scoring core as the Kafka worker. Errors are JSON objects with `error`, `field` "
            "and `fix`. With a bearer token configured (serve.token_env), every route except "
            "the health, metrics and OpenAPI routes needs 'Authorization: Bearer <token>'.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
