"""The API server's one immutable configuration object, built at the edge.

Sources, later wins: built-in defaults < YAML file < environment variables named
``SENSOR_ANOMALY_<SECTION>__<KEY>`` (e.g. ``SENSOR_ANOMALY_SERVE__PORT=8080``), parsed and
checked by the same code as the worker's (:mod:`worker.config`). Sections:

- ``serve``: :class:`ServeSettings` (listening address, limits, models, auth);
- ``reading`` and ``events``: the worker's sections of the same name and meaning, so the API
  decodes, validates and explains readings exactly as the worker does;
- ``log_level``.

Unknown keys in these sections are refused with a :class:`ConfigError` naming the key.
Environment variables of sections the server does not have (``KAFKA``, ``MODEL``, ``HTTP``,
``BATCH``: the worker's) are ignored, so one environment file can configure both. The bearer
token itself is never configuration: ``serve.token_env`` names the environment variable
that holds it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from worker.config import (
    ENV_PREFIX,
    ConfigError,
    EventSettings,
    ReadingSettings,
    _build,
    _env_overrides,
    _merge,
)

__all__ = ["ConfigError", "ServeConfig", "ServeSettings", "load_config"]

# A backfill scores old readings on purpose: the worker's 30-day limit on a reading's age
# would refuse them, so the API's default allows 100 years (future readings are still
# refused after reading.max_future_s).
DEFAULT_MAX_PAST_S = 100 * 365 * 86400.0


@dataclass(frozen=True)
class ServeSettings:
    """The ``serve`` section. Durations in seconds (``_s``), sizes in bytes."""

    host: str = "127.0.0.1"
    port: int = 8080
    # Registry root and the model names served from it (each at its CURRENT version, hot
    # reloaded); ignored when model_path is set.
    registry: str = "./artifacts"
    models: tuple[str, ...] = ("sensors",)
    # One fixed artifact directory instead of the registry (no reloads); --model sets it.
    model_path: str = ""
    reload_interval_s: float = 10.0
    # Per request: readings (or latent codes, or tensor rows) and body size.
    max_readings: int = 10_000
    max_body_bytes: int = 16 * 1024 * 1024
    # Longest a client may take to send its body; the request then gets a 408.
    request_timeout_s: float = 10.0
    # Name of the environment variable holding the bearer token; "" = no authentication.
    token_env: str = ""
    # On SIGTERM: stop accepting, let in-flight requests finish for at most this long.
    shutdown_grace_s: float = 10.0
    # Keep-alive connections idle longer than this are closed.
    keep_alive_s: float = 5.0
    access_log: bool = False


@dataclass(frozen=True)
class ServeConfig:
    serve: ServeSettings = field(default_factory=ServeSettings)
    reading: ReadingSettings = field(
        default_factory=lambda: ReadingSettings(max_past_s=DEFAULT_MAX_PAST_S)
    )
    events: EventSettings = field(default_factory=EventSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def masked(self) -> dict[str, Any]:
        """The config as a dict (it holds no secrets: only the token's variable name)."""
        return dataclasses.asdict(self)


_SECTIONS = ("serve", "reading", "events")
_RANGES: dict[str, tuple[float, float]] = {
    "port": (0, 65535),
    "reload_interval_s": (0.1, 86_400),
    "max_readings": (1, 10_000_000),
    "max_body_bytes": (64, 2**31),
    "request_timeout_s": (0.01, 3600),
    "shutdown_grace_s": (0, 3600),
    "keep_alive_s": (0.1, 3600),
}


def _server_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables meant for this server: its sections and the top-level log level."""
    wanted = tuple(f"{ENV_PREFIX}{s.upper()}__" for s in _SECTIONS)
    return {k: v for k, v in env.items() if k.startswith(wanted) or k == f"{ENV_PREFIX}LOG_LEVEL"}


def _read_yaml(p: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}; check the path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p} is not valid YAML{where}; fix the syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p} must hold a mapping of sections, not {type(loaded).__name__}")
    return loaded


def load_config(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    model_path: str | None = None,
) -> ServeConfig:
    """Build the config from an optional YAML file, the environment and ``--model``.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key, bad type or value, a token
            variable that is named but not set.
    """
    environ = os.environ if env is None else env
    data: dict[str, Any] = {"reading": {"max_past_s": DEFAULT_MAX_PAST_S}}
    if path is not None:
        data = _merge(data, _read_yaml(Path(path)))
    data = _merge(data, _env_overrides(_server_env(environ)))
    if model_path is not None:
        data = _merge(data, {"serve": {"model_path": model_path}})
    cfg: ServeConfig = _build(ServeConfig, "", data)
    s = cfg.serve
    for key, (lo, hi) in _RANGES.items():
        v = getattr(s, key)
        if not (lo <= v <= hi):
            raise ConfigError(f"serve.{key}: {v} is out of range [{lo}, {hi}]")
    if not s.model_path and not s.registry:
        raise ConfigError("set serve.registry and serve.models, or serve.model_path (--model)")
    if s.token_env and not environ.get(s.token_env):
        raise ConfigError(
            f"serve.token_env names {s.token_env!r} but that environment variable is not set "
            "or empty; set it to the bearer token, or set serve.token_env to '' to disable auth"
        )
    return cfg


def bearer_token(cfg: ServeConfig, env: Mapping[str, str] | None = None) -> str:
    """The bearer token from the environment ("" when authentication is off)."""
    if not cfg.serve.token_env:
        return ""
    return (os.environ if env is None else env).get(cfg.serve.token_env, "")
