"""The trainer config: one frozen object; unknown keys and bad values are refused clearly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from trainer.config import (
    TrainConfig,
    apply_overrides,
    from_mapping,
    load_config,
    reference,
    to_yaml,
)
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
BASE = {"data": {"path": "normal.csv"}}


def _err(doc: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as e:
        from_mapping(doc)
    msg = str(e.value)
    assert "\n" not in msg and "; " in msg  # one line: what is wrong; how to fix it
    return msg


def test_defaults_and_frozen() -> None:
    cfg = from_mapping(BASE)
    # Issue 11: the shape is auto (null) by default, resolved from the input width; for the
    # tutorial's 38 sensors it is the old fixed default 38 → 32 → 16 → 8.
    assert cfg.model.hidden is None and cfg.model.code_size is None and cfg.threshold.k == 2.0
    from trainer.pipeline import auto_shape

    assert auto_shape(38) == ((32, 16), 8)
    assert cfg.split.shuffle is False and cfg.preprocess.constant_columns == "drop"
    assert cfg.output_activation == "sigmoid"  # minmax scaler by default
    assert cfg.data_format == "csv"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]


def test_standard_scaler_gets_linear_output() -> None:
    cfg = from_mapping(BASE | {"preprocess": {"scaler": "standard"}})
    assert cfg.output_activation == "linear"


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"model": {"epoch": 3}}, "unknown config key model.epoch; did you mean model.epochs?"),
        ({"modle": {}}, "did you mean model?"),
        ({"model": {"epochs": "ten"}}, "model.epochs = 'ten' must be an integer"),
        ({"model": {"epochs": 2.5}}, "must be an integer"),
        ({"model": {"epochs": True}}, "must be an integer"),
        ({"model": {"epochs": 0}}, "model.epochs = 0 is out of range; use a value >= 1"),
        ({"model": {"activation": "rellu"}}, "did you mean 'relu'?"),
        ({"model": {"activation": "softplus"}}, "use one of 'relu', 'tanh'"),
        ({"model": {"hidden": [32, 0]}}, "model.hidden[1] = 0 is out of range"),
        ({"model": {"hidden": "wide"}}, "must be a list of an integer"),
        ({"model": {"learning_rate": "fast"}}, "model.learning_rate = 'fast' must be a number"),
        ({"threshold": {"k": -1}}, "threshold.k = -1.0 is out of range"),
        ({"threshold": {"method": "mean"}}, "is not allowed"),
        ({"split": {"holdout": 0.5, "validation": 0.3}}, "exceed 0.6"),
        ({"data": {"path": "x.parquet"}}, "set data.format to csv or jsonl"),
        ({"data": {"path": "x.csv", "delimiter": ";;"}}, "is not a delimiter"),
        ({"data": {"path": "x.csv", "rows": [400, 10]}}, "selects no rows"),
        ({"data": {"format": "kafka"}}, "data.kafka.topic is empty"),
        (
            {"data": {"format": "kafka", "kafka": {"topic": "t", "start_time": "soon"}}},
            "data.kafka.start_time = 'soon' is not a time",
        ),
        (
            {
                "data": {
                    "format": "kafka",
                    "kafka": {"topic": "t", "start_offset": 5, "end_offset": 5},
                }
            },
            "end_offset 5 is not after start_offset 5",
        ),
        ({"data": {}}, "data.path is not set"),
        ({"name": "my model"}, "not a valid model name"),
        (
            {"preprocess": {"scaler": "standard"}, "model": {"output_activation": "sigmoid"}},
            "negative",
        ),
        ({"tune": {"method": "grid"}}, "search space is empty"),
        ({"data": "normal.csv"}, "data must be a mapping"),
    ],
)
def test_bad_config_is_refused_naming_key_and_fix(doc: dict[str, object], needle: str) -> None:
    assert needle in _err({**BASE, **doc})


def test_label_or_timestamp_column_among_features_is_refused() -> None:
    msg = _err(
        {"data": {"path": "x.csv", "features": ["s1", "anomaly"], "label_column": "anomaly"}}
    )
    assert "remove 'anomaly' from data.features" in msg
    msg = _err({"data": {"path": "x.csv", "features": ["timestamp", "s1"]}})
    assert "'timestamp'" in msg
    msg = _err(
        {"data": {"path": "x.csv", "features": ["s1", "anomaly"]}, "evaluate": {"path": "e.csv"}}
    )
    assert "evaluate.label_column" in msg


def test_yaml_quirk_1e_minus_3_is_a_number() -> None:
    # PyYAML reads `1e-3` as a string (YAML 1.1); the natural spelling must still work.
    doc = yaml.safe_load("data: {path: a.csv}\nmodel: {learning_rate: 1e-3}")
    assert from_mapping(doc).model.learning_rate == 0.001


def test_overrides_are_parsed_as_yaml() -> None:
    doc = apply_overrides(BASE, ["model.hidden=[64, 32]", "model.epochs=7", "evaluate.path=e.csv"])
    cfg = from_mapping(doc)
    assert cfg.model.hidden == (64, 32) and cfg.model.epochs == 7 and cfg.evaluate.path == "e.csv"
    with pytest.raises(ConfigError, match="is not key=value"):
        apply_overrides(BASE, ["model.epochs"])


def test_load_config_file_overrides_and_registry(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: pumps\ndata:\n  path: a.csv\nmodel:\n  epochs: 3\n")
    cfg = load_config(p, ["model.epochs=4"], registry=str(tmp_path / "reg"))
    assert (cfg.name, cfg.model.epochs, cfg.registry) == ("pumps", 4, str(tmp_path / "reg"))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("data: [unclosed", "is not valid YAML at line"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(p)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist; check the --config path"):
        load_config("/nonexistent/config.yaml")


def test_effective_config_round_trips_through_yaml() -> None:
    cfg = from_mapping(
        BASE
        | {
            "model": {"hidden": [8, 4], "code_size": 2},
            "tune": {"method": "grid", "hidden": [[8], [16, 8]]},
        }
    )
    assert from_mapping(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize("name", ["trainer-synthetic.yaml", "trainer-skab.yaml"])
def test_example_configs_are_valid(name: str) -> None:
    cfg = load_config(REPO / "examples" / name)
    assert isinstance(cfg, TrainConfig)


def test_every_setting_is_documented() -> None:
    rows = reference()
    assert all(doc for _, _, doc in rows)
    keys = {k for k, _, _ in rows}
    assert {"model.code_size", "data.kafka.end_offset", "threshold.k", "tune.hidden"} <= keys
    doc = (REPO / "docs" / "trainer.md").read_text()
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/trainer.md lacks {missing}"
