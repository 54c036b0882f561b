"""The worker's one immutable configuration object, built at the edge.

Sources, later wins: built-in defaults < YAML file < environment variables named
``SENSOR_ANOMALY_<SECTION>__<KEY>`` (e.g. ``SENSOR_ANOMALY_KAFKA__BOOTSTRAP_SERVERS``).
Unknown keys and bad values are refused with a :class:`ConfigError` naming the key and the
fix. Secrets (SASL password, TLS key password) are accepted only from the environment and
are masked by :meth:`WorkerConfig.masked`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from worker.alertmanager import AlertmanagerConfigError, AlertmanagerSettings
from worker.incidents import IncidentConfigError, IncidentSettings

ENV_PREFIX = "SENSOR_ANOMALY_"
SECRET_KEYS = frozenset({"sasl_password", "ssl_password"})


class ConfigError(ValueError):
    """A configuration file or variable is invalid; the message says how to fix it."""


@dataclass(frozen=True)
class KafkaSettings:
    """Connection, topics and delivery. Durations in milliseconds where the name says ``_ms``."""

    bootstrap_servers: str = "127.0.0.1:39092"
    # The Kafka library: kafka-python (the design card's) or confluent (librdkafka; needs
    # the `confluent` extra). Same delivery contract, same settings (worker/clients/).
    client: Literal["kafka-python", "confluent"] = "kafka-python"
    input_topics: tuple[str, ...] = ("sensor-readings",)
    output_topic: str = "sensor-anomalies"
    dead_letter_topic: str = "sensor-readings-dlq"
    group_id: str = "sensor-anomaly-worker"
    client_id: str = "sensor-anomaly-worker"
    # Identifies this worker across restarts: exactly-once derives its transactional id
    # from it, so a restarted instance fences (and aborts) its predecessor's transaction.
    # Empty = automatic (worker.identity): "<host name>-<slot>", the slot being the lowest
    # number whose lock file no running worker of this group on this host holds. Unique
    # among live instances (two workers on one host no longer fence each other), stable
    # across restarts (a restarted single instance takes slot 0 again; in Kubernetes the
    # host name is the pod name, so a StatefulSet pod keeps its id).
    instance_id: str = ""
    # Where the automatic instance id's lock files live (default: $XDG_RUNTIME_DIR or /tmp).
    instance_lock_dir: str = ""
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    transactional_id_prefix: str = "sensor-anomaly"
    transaction_timeout_ms: int = 30000
    # Offsets (and, exactly-once, transactions) are committed at most this often; outputs
    # are sent as each batch is scored. Longer amortises the commit round trip; with
    # exactly-once it is also how long events stay invisible to read_committed readers.
    commit_interval_ms: int = 100
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000
    # Also the group's rebalance timeout: a rebalance waits this long for every member
    # to rejoin. The loop never blocks longer than request_timeout_ms between polls, so
    # 60 s is ample and bounds how long one slow member can hold the whole group at 0
    # partitions (the Java default of 300 s kept restarted workers idle for minutes).
    max_poll_interval_ms: int = 60000
    # How long the broker may hold a fetch waiting for data. With read_committed, fetches
    # often wait it out in full, so it bounds latency (docs/benchmarks.md): keep it small.
    fetch_max_wait_ms: int = 10
    max_partition_fetch_bytes: int = 1048576
    fetch_max_bytes: int = 52428800
    request_timeout_ms: int = 30000
    linger_ms: int = 2
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_password: str = ""
    ssl_check_hostname: bool = True
    # kafka-python backs off reconnects exponentially up to 30 s by default, which can keep
    # a worker idle long after the broker is back; Java clients use 1 s.
    reconnect_backoff_max_ms: int = 1000
    # Give up (exit non-zero, so an orchestrator restarts us) after the broker has been
    # unreachable this long.
    outage_give_up_s: float = 300.0
    # Create missing output / dead-letter topics at start (admin API). Partitions 0 = as
    # many as the first input topic; replication -1 = the broker's default.
    create_topics: bool = True
    topic_partitions: int = 0
    topic_replication: int = -1
    # Liveness fails when the consumer has not been a stable group member for this long
    # (a join that never completes): an orchestrator then restarts the worker.
    rejoin_stuck_s: float = 120.0


@dataclass(frozen=True)
class ModelSettings:
    """Where the detector comes from and how often to look for a new version."""

    registry: str = "./artifacts"
    name: str = "sensors"
    # A fixed artifact directory instead of the registry's CURRENT version (no reloads).
    path: str = ""
    reload_interval_s: float = 10.0


@dataclass(frozen=True)
class ReadingSettings:
    """The input contract: field names and validation limits."""

    device_field: str = "device_id"
    timestamp_field: str = "timestamp"
    # Object holding the feature values; empty string = features are top-level fields.
    values_field: str = "values"
    # Readings missing more features than this are dead-lettered; fewer are imputed.
    max_imputed_features: int = 0
    max_device_id_length: int = 128
    max_value_bytes: int = 1_000_000
    # Timestamps further than this in the future / past are refused (seconds).
    max_future_s: float = 300.0
    max_past_s: float = 30 * 86400.0


@dataclass(frozen=True)
class BatchSettings:
    """A batch closes at ``max_size`` readings or ``max_wait_ms`` after its first one."""

    max_size: int = 1024
    max_wait_ms: int = 10


@dataclass(frozen=True)
class EventSettings:
    """What an anomaly event says."""

    top_sensors: int = 5
    # Publish only once a device has been anomalous for this many consecutive readings
    # (events then start at the N-th, with anomaly_since = the first). 1 = every anomalous
    # reading. Raise it to damp isolated false alarms; single-reading spikes then go unsaid.
    min_consecutive: int = 1
    min_share: float = 0.02
    # Devices are grouped for metrics by the first capture group of this pattern (a
    # bounded label, never the raw id); ids that do not match go to "other".
    device_group_pattern: str = r"^([A-Za-z]+)"
    max_device_groups: int = 50


@dataclass(frozen=True)
class HttpSettings:
    """The metrics and health endpoint."""

    host: str = "127.0.0.1"
    port: int = 9108
    enabled: bool = True


@dataclass(frozen=True)
class WorkerConfig:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    reading: ReadingSettings = field(default_factory=ReadingSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    events: EventSettings = field(default_factory=EventSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    # Incidents (open/update/resolve per device, durable state): worker/incidents.py.
    incidents: IncidentSettings = field(default_factory=IncidentSettings)
    # Push open incidents to Prometheus Alertmanager (off by default): worker/alertmanager.py.
    alertmanager: AlertmanagerSettings = field(default_factory=AlertmanagerSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # text: human-readable lines; json: one JSON object a line (time, level, logger,
    # message and structured fields), for log shippers.
    log_format: Literal["text", "json"] = "text"

    def masked(self) -> dict[str, Any]:
        """The config as a dict with secrets replaced by ``***`` (for the start-up log)."""
        d = dataclasses.asdict(self)
        for k in SECRET_KEYS:
            if d["kafka"].get(k):
                d["kafka"][k] = "***"
        return d


_RANGES: dict[str, tuple[float, float]] = {
    "batch.max_size": (1, 100_000),
    "batch.max_wait_ms": (0, 60_000),
    "http.port": (0, 65535),
    "events.top_sensors": (1, 1000),
    "events.min_consecutive": (1, 100_000),
    "events.min_share": (0.0, 1.0),
    "events.max_device_groups": (1, 10_000),
    "reading.max_imputed_features": (0, 100_000),
    "reading.max_device_id_length": (1, 10_000),
    "reading.max_value_bytes": (64, 100_000_000),
    "model.reload_interval_s": (0.1, 86_400),
    "kafka.outage_give_up_s": (1, 86_400 * 7),
    "kafka.transaction_timeout_ms": (1000, 900_000),
    "kafka.commit_interval_ms": (0, 60_000),
    "kafka.reconnect_backoff_max_ms": (50, 60_000),
    "kafka.topic_partitions": (0, 100_000),
    "kafka.topic_replication": (-1, 100),
    "kafka.rejoin_stuck_s": (5, 86_400),
    "kafka.max_poll_interval_ms": (1000, 3_600_000),
    "kafka.session_timeout_ms": (1000, 3_600_000),
    "kafka.request_timeout_ms": (1000, 3_600_000),
}


def _as_literal(key: str, tp: Any, value: Any) -> Any:
    choices = typing.get_args(tp)
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    return value


def _as_str_tuple(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    if not value:
        raise ConfigError(f"{key}: must not be empty")
    return tuple(value)


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    words = {"1": True, "true": True, "yes": True, "on": True}
    words |= {"0": False, "false": False, "no": False, "off": False}
    if isinstance(value, str) and value.lower() in words:
        return words[value.lower()]
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _as_number(key: str, tp: type[Any], value: Any) -> Any:
    what = "an integer" if tp is int else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    try:
        if tp is int and not isinstance(value, str):
            return _exact_int(value)
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {what}, got {value!r}") from None


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or an env string) to field type ``tp`` or raise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _as_literal(key, tp, value)
    if origin is tuple:
        return _as_str_tuple(key, value)
    if tp is bool:
        return _as_bool(key, value)
    if tp in (int, float):
        return _as_number(key, tp, value)
    if value is None:
        return ""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


def _exact_int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


def _build(cls: type[Any], section: str, data: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"section {section!r}" if section else "the top level"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys are {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{section}.{name}" if section else name
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
            kwargs[name] = _build(tp, name, value)
            continue
        if (
            name in SECRET_KEYS
            and value not in ("", None)
            and not getattr(data, "_from_env", False)
        ):
            raise ConfigError(
                f"{key}: secrets are not read from files; set {ENV_PREFIX}"
                f"{section.upper()}__{name.upper()} in the environment instead"
            )
        v = _coerce(key, tp, value)
        if key in _RANGES and not (_RANGES[key][0] <= v <= _RANGES[key][1]):
            lo, hi = _RANGES[key]
            raise ConfigError(f"{key}: {v} is out of range [{lo}, {hi}]")
        kwargs[name] = v
    return cls(**kwargs)


class _EnvLayer(dict[str, Any]):
    """Marks values that came from the environment (where secrets are allowed)."""

    _from_env = True


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in env.items():
        if not k.startswith(ENV_PREFIX):
            continue
        parts = k[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) == 1:
            out[parts[0]] = v
        elif len(parts) == 2:
            out.setdefault(parts[0], _EnvLayer())[parts[1]] = v
        else:
            raise ConfigError(
                f"{k}: use {ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}KAFKA__GROUP_ID"
            )
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            layer: dict[str, Any] = _EnvLayer() if isinstance(v, _EnvLayer) else {}
            layer.update(merged[k])
            layer.update(v)
            merged[k] = layer
        else:
            merged[k] = v
    return merged


def load_config(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> WorkerConfig:
    """Build the config from an optional YAML file and the environment.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key, bad type or value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text())
        except OSError as e:
            raise ConfigError(
                f"cannot read config file {p}: {e.strerror}; check the path"
            ) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p} is not valid YAML{where}; fix the syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded
    data = _merge(data, _env_overrides(os.environ if env is None else env))
    cfg: WorkerConfig = _build(WorkerConfig, "", data)
    _cross_check(cfg)
    return cfg


def _cross_check(cfg: WorkerConfig) -> None:
    k = cfg.kafka
    if k.output_topic in k.input_topics or k.dead_letter_topic in k.input_topics:
        raise ConfigError(
            "kafka.output_topic and kafka.dead_letter_topic must differ from the inputs"
        )
    if k.sasl_mechanism and not k.security_protocol.startswith("SASL"):
        raise ConfigError("kafka.sasl_mechanism needs security_protocol SASL_PLAINTEXT or SASL_SSL")
    if k.security_protocol.startswith("SASL") and not (
        k.sasl_mechanism and k.sasl_username and k.sasl_password
    ):
        raise ConfigError(
            "SASL needs kafka.sasl_mechanism and the username and password in "
            f"{ENV_PREFIX}KAFKA__SASL_USERNAME / {ENV_PREFIX}KAFKA__SASL_PASSWORD"
        )
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(k, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"kafka.{name}: {value} is not a readable file; fix the path")
    if not cfg.model.path and not cfg.model.registry:
        raise ConfigError("set model.registry (and model.name) or model.path")
    try:
        cfg.incidents.validate()
        cfg.alertmanager.validate()
    except (IncidentConfigError, AlertmanagerConfigError) as e:
        raise ConfigError(str(e)) from None
    if cfg.incidents.enabled and cfg.incidents.topic in (*k.input_topics, k.output_topic):
        raise ConfigError("incidents.topic must differ from the input and output topics")
    if cfg.alertmanager.enabled and not cfg.incidents.enabled:
        raise ConfigError("alertmanager.enabled needs incidents.enabled: true")
    if k.heartbeat_interval_ms >= k.session_timeout_ms:
        raise ConfigError("kafka.heartbeat_interval_ms must be below kafka.session_timeout_ms")


def kafka_security_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """kafka-python keyword arguments for TLS/SASL, shared by consumer, producer and admin."""
    out: dict[str, Any] = {"security_protocol": k.security_protocol}
    if k.security_protocol in ("SSL", "SASL_SSL"):
        out["ssl_check_hostname"] = k.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password"):
            if getattr(k, name):
                out[name] = getattr(k, name)
    if k.security_protocol.startswith("SASL"):
        out["sasl_mechanism"] = k.sasl_mechanism
        out["sasl_plain_username"] = k.sasl_username
        out["sasl_plain_password"] = k.sasl_password
    return out
