"""serve.scoring under other reading contracts: flat features and renamed fields."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from serve.config import load_config
from serve.models import make_slot
from serve.scoring import ApiError, score
from tests.support.detectors import linear_detector

FEATURES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def slot() -> Any:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 2)) @ rng.normal(size=(2, 4)) + rng.normal(0, 0.05, (600, 4))
    return make_slot("sensors", linear_detector(x, FEATURES, code=2))


def _values(i: int) -> dict[str, float]:
    return {f: float(np.sin(i + k)) for k, f in enumerate(FEATURES)}


def test_flat_readings_with_renamed_fields_score_like_nested_ones(slot: Any) -> None:
    nested_cfg = load_config(env={})
    flat_cfg = load_config(
        env={
            "SENSOR_ANOMALY_READING__VALUES_FIELD": "",
            "SENSOR_ANOMALY_READING__DEVICE_FIELD": "id",
            "SENSOR_ANOMALY_READING__TIMESTAMP_FIELD": "ts",
        }
    )
    nested = [{"device_id": "p-1", "values": _values(i)} for i in range(5)]
    flat: list[dict[str, Any]] = [{"id": "p-1", **_values(i)} for i in range(5)]
    del flat[2]["id"]
    a = json.loads(score(json.dumps({"readings": nested}).encode(), slot, nested_cfg)[0])
    b = json.loads(score(json.dumps({"readings": flat}).encode(), slot, flat_cfg)[0])
    assert [r["score"] for r in a["results"]] == [r["score"] for r in b["results"]]
    assert [r["device_id"] for r in b["results"]] == ["p-1", "p-1", None, "p-1", "p-1"]
    with pytest.raises(ApiError) as e:
        score(json.dumps({"readings": [{**_values(0), "site": "x"}]}).encode(), slot, flat_cfg)
    assert e.value.status == 422 and e.value.field == "readings[0].site"
    with pytest.raises(ApiError) as e:
        bad = {"readings": [nested[0], {"values": {**_values(0), "z": 1}}]}
        score(json.dumps(bad).encode(), slot, nested_cfg)
    assert e.value.field == "readings[1].values.z"
    assert e.value.extra["expected_features"] == FEATURES


def test_other_top_level_fields_of_a_nested_reading_are_ignored_as_by_the_worker(
    slot: Any,
) -> None:
    cfg = load_config(env={})
    r = {"device_id": "p-1", "site": "north", "values": _values(1)}
    doc = json.loads(score(json.dumps({"readings": [r]}).encode(), slot, cfg)[0])
    assert doc["scored"] == 1 and doc["errors"] == 0
