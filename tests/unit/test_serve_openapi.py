"""The OpenAPI document: committed copy current, every route documented, and the API's real
responses (from :mod:`serve.scoring`, the code behind the routes) valid against its schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from serve.app import ROUTES
from serve.cli import openapi_text
from serve.config import load_config
from serve.models import make_slot
from serve.openapi import document
from serve.scoring import (
    ApiError,
    decode_codes,
    encode_readings,
    oip_infer,
    oip_metadata,
    reconstruct,
    score,
)
from tests.support.detectors import linear_detector

REPO = Path(__file__).resolve().parents[2]
FEATURES = ["a", "b", "c", "d", "e"]


def test_the_committed_document_is_current() -> None:
    committed = (REPO / "schemas" / "openapi.json").read_text()
    assert committed == openapi_text(), (
        "schemas/openapi.json is stale: run anomaly-serve openapi --output schemas/openapi.json"
    )


def test_every_route_is_documented_and_nothing_else() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    served = {(path, m.lower()) for path, methods, _, _ in ROUTES for m in methods}
    documented = {(path, m) for path, ops in doc["paths"].items() for m in ops}
    assert served == documented


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema: dict[str, Any] = {**document(), "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema)


def test_component_schemas_are_valid_json_schema() -> None:
    for s in document()["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(s)


@pytest.fixture(scope="module")
def slot() -> Any:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 2)) @ rng.normal(size=(2, 5)) + rng.normal(0, 0.05, (800, 5))
    return make_slot("sensors", linear_detector(x, FEATURES, code=2))


def _readings() -> bytes:
    good = {"device_id": "p-1", "timestamp": "2026-01-01T00:00:00Z",
            "values": {f: 0.1 * i for i, f in enumerate(FEATURES)}}  # fmt: skip
    hot = {"values": {f: 9.0 * (-1) ** i for i, f in enumerate(FEATURES)}}
    bad = {"values": {"a": 1.0}}
    return json.dumps({"readings": [good, hot, bad]}).encode()


def test_v1_responses_match_their_schemas(slot: Any) -> None:
    cfg = load_config(env={})
    body, scored, anomalies, errors = score(_readings(), slot, cfg)
    doc = json.loads(body)
    _validator("ScoreResponse").validate(doc)
    assert (scored, errors) == (2, 1) and anomalies >= 1
    assert doc["results"][1]["is_anomaly"] and doc["results"][1]["contributors"]
    _validator("ReconstructResponse").validate(json.loads(reconstruct(_readings(), slot, cfg)[0]))
    enc = json.loads(encode_readings(_readings(), slot, cfg)[0])
    _validator("EncodeResponse").validate(enc)
    codes = {"codes": [enc["results"][0]["code"]]}
    _validator("DecodeResponse").validate(
        json.loads(decode_codes(json.dumps(codes).encode(), slot, cfg)[0])
    )
    _validator("ModelDetail").validate(json.loads(json.dumps(slot.describe())))


def test_oip_responses_match_their_schemas(slot: Any) -> None:
    cfg = load_config(env={})
    _validator("OipModelMetadata").validate(oip_metadata(slot))
    req = {"inputs": [{"name": "readings", "shape": [2, 5], "datatype": "FP32",
                       "data": [0.0] * 10}], "outputs": [{"name": "score"},
                                                         {"name": "is_anomaly"}]}  # fmt: skip
    _validator("OipInferResponse").validate(
        json.loads(oip_infer(json.dumps(req).encode(), slot, cfg)[0])
    )


def test_errors_match_the_error_schema(slot: Any) -> None:
    cfg = load_config(env={})
    with pytest.raises(ApiError) as e:
        score(b'{"readings": [{"values": {"a": 1}}]}', slot, cfg)
    assert e.value.status == 422 and e.value.field == "readings[0]"
    _validator("Error").validate(json.loads(json.dumps(e.value.body())))
