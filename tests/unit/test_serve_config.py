"""anomaly-serve's configuration and command line: defaults, overrides, refusals, exit codes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detector import Registry
from serve import cli
from serve.config import DEFAULT_MAX_PAST_S, ConfigError, bearer_token, load_config
from serve.models import ModelStore
from tests.support.detectors import linear_detector


def test_defaults_bind_loopback_on_8080_without_auth() -> None:
    cfg = load_config(env={})
    s = cfg.serve
    assert (s.host, s.port, s.token_env, s.models) == ("127.0.0.1", 8080, "", ("sensors",))
    assert cfg.reading.max_past_s == DEFAULT_MAX_PAST_S  # backfills score old readings
    assert cfg.events.top_sensors == 5
    assert bearer_token(cfg, env={}) == ""


def test_yaml_then_environment_later_wins(tmp_path: Path) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text(
        "serve:\n  port: 9000\n  models: [a, b]\n  max_readings: 50\n"
        "reading:\n  max_imputed_features: 2\n  max_past_s: 60\n"
    )
    env = {
        "SENSOR_ANOMALY_SERVE__PORT": "9100",
        "SENSOR_ANOMALY_SERVE__MODELS": "c, d",
        "SENSOR_ANOMALY_EVENTS__TOP_SENSORS": "3",
        # The worker's sections are not the server's business: ignored, not refused.
        "SENSOR_ANOMALY_KAFKA__BOOTSTRAP_SERVERS": "x:1",
        "SENSOR_ANOMALY_MODEL__NAME": "other",
    }
    cfg = load_config(p, env=env)
    assert cfg.serve.port == 9100 and cfg.serve.models == ("c", "d")
    assert cfg.serve.max_readings == 50
    assert cfg.reading.max_imputed_features == 2 and cfg.reading.max_past_s == 60
    assert cfg.events.top_sensors == 3
    assert load_config(p, env={}, model_path="/m").serve.model_path == "/m"


@pytest.mark.parametrize(
    ("yaml_text", "env", "message"),
    [
        ("serve:\n  prot: 1\n", {}, r"unknown key\(s\) \['prot'\] in section 'serve'"),
        ("kafka:\n  bootstrap_servers: x\n", {}, r"unknown key\(s\) \['kafka'\]"),
        ("", {"SENSOR_ANOMALY_SERVE__PORT": "http"}, "serve.port: expected an integer"),
        ("", {"SENSOR_ANOMALY_SERVE__PORT": "70000"}, r"serve.port: 70000 is out of range"),
        ("serve:\n  max_readings: 0\n", {}, "serve.max_readings: 0 is out of range"),
        ("serve:\n  access_log: maybe\n", {}, "expected true or false"),
        ("serve:\n  token_env: API_TOKEN\n", {}, "'API_TOKEN' but that environment variable"),
        ("serve:\n  registry: ''\n", {}, "set serve.registry"),
        ("serve: [1, 2\n", {}, "not valid YAML at line"),
        ("- 1\n", {}, "must hold a mapping"),
    ],
)
def test_bad_config_is_one_clear_error(
    tmp_path: Path, yaml_text: str, env: dict[str, str], message: str
) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(p, env=env)


def test_token_comes_from_the_named_variable(tmp_path: Path) -> None:
    env = {"SENSOR_ANOMALY_SERVE__TOKEN_ENV": "API_TOKEN", "API_TOKEN": "t0k"}
    cfg = load_config(env=env)
    assert bearer_token(cfg, env=env) == "t0k"
    assert "t0k" not in repr(cfg.masked())


def _registry(tmp_path: Path) -> Path:
    x = np.random.default_rng(0).normal(size=(400, 4))
    Registry(tmp_path / "reg").save(linear_detector(x, ["a", "b", "c", "d"], code=2))
    return tmp_path / "reg"


def test_cli_exit_codes_and_messages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in [k for k in os.environ if k.startswith("SENSOR_ANOMALY_")]:
        monkeypatch.delenv(k)
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  hosts: 0.0.0.0\n")
    assert cli.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key(s) ['hosts']") and err.count("\n") == 1
    # No model in the registry: exit 2 with the fix, no traceback.
    monkeypatch.setenv("SENSOR_ANOMALY_SERVE__REGISTRY", str(tmp_path / "empty"))
    assert cli.main(["check-config"]) == 2
    err = capsys.readouterr().err
    assert "train one first" in err and "Traceback" not in err
    assert cli.main(["--model", str(tmp_path / "nowhere"), "check-config"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    reg = _registry(tmp_path)
    monkeypatch.setenv("SENSOR_ANOMALY_SERVE__REGISTRY", str(reg))
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert '"version": "v0001"' in out and '"features": [' in out
    assert cli.main(["--model", str(reg / "sensors" / "v0001"), "check-config"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("anomaly-serve ")


def test_a_port_in_use_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _registry(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setenv("SENSOR_ANOMALY_SERVE__REGISTRY", str(reg))
        monkeypatch.setenv("SENSOR_ANOMALY_SERVE__PORT", str(port))
        assert cli.main([]) == 2


def test_the_server_never_imports_tensorflow() -> None:
    code = (
        "import sys, serve.cli, serve.app, serve.scoring\n"
        "heavy = {'tensorflow', 'keras', 'sklearn'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_a_broken_new_version_is_refused_and_the_old_one_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reg = _registry(tmp_path)
    cfg = load_config(env={"SENSOR_ANOMALY_SERVE__REGISTRY": str(reg)})
    store = ModelStore(cfg)
    store.load_initial()
    assert store.poll() == {}
    x = np.random.default_rng(1).normal(size=(400, 4))
    v2 = Registry(reg).save(linear_detector(x, ["a", "b", "c", "d"], code=2))
    (v2 / "weights.npz").write_bytes(b"tampered")
    assert store.poll() == {}
    assert "new version refused, still serving v0001" in caplog.text
    assert store.slots["sensors"].version == "v0001"
    v3 = Registry(reg).save(linear_detector(x, ["a", "b", "c", "d"], code=3))
    fresh = store.poll()
    assert fresh["sensors"].version == v3.name and fresh["sensors"].code_width == 3
