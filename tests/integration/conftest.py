"""The Kafka client under test: every worker integration test runs on both adapters.

Tests in :data:`BOTH_CLIENTS` modules are parametrised over ``kafka.client`` (``kafka-python``
and ``confluent``); the worker subprocesses they start inherit it through
``SENSOR_ANOMALY_KAFKA__CLIENT`` (``WorkerProcess`` passes the environment on), so the tests
themselves need no change. Tests listed in :data:`DEFAULT_CLIENT_ONLY` run on the default client
only, to keep ``make test`` within its time budget: start-up checks decided before any client
exists, and two long lifecycle tests whose subject (model reload; join timing after restarts)
the confluent runs of the other tests and of the chaos suite already cover.
``KAFKA_CLIENTS=kafka-python`` (or ``confluent``) narrows the matrix, e.g. for a quick run.
"""

from __future__ import annotations

import os

import pytest

CLIENTS = ("kafka-python", "confluent")
# Modules whose tests start workers: each test runs once per client.
BOTH_CLIENTS = frozenset(
    {
        "tests.integration.test_worker_kafka",
        "tests.integration.test_worker_reliability",
        "tests.integration.test_worker_lifecycle",
        "tests.integration.test_worker_startup",
        # Incidents and their durable state: the changelog is created and restored with the
        # worker's own client (StatefulStage uses the adapter).
        "tests.integration.test_incidents_kafka",
        "tests.integration.test_worker_self_heal",
    }
)
# (module, test) pairs that run on kafka-python only (see the module docstring).
_STARTUP = "tests.integration.test_worker_startup"
DEFAULT_CLIENT_ONLY = frozenset(
    {
        # Decided before any client is built (config, CLI, HTTP port, score-file): one run.
        (_STARTUP, "test_metrics_port_in_use_is_exit_2"),
        (_STARTUP, "test_sasl_mechanism_without_password_is_a_config_error"),
        (_STARTUP, "test_missing_tls_file_is_a_config_error"),
        (_STARTUP, "test_score_file_with_a_missing_input_is_exit_2"),
        (_STARTUP, "test_options_after_the_subcommand_and_version"),
        (
            "tests.integration.test_worker_reliability",
            "test_restarted_worker_gets_its_partitions_back_promptly",
        ),
        (
            "tests.integration.test_worker_lifecycle",
            "test_new_model_version_is_picked_up_without_restart_and_bad_one_refused",
        ),
        # The stall it heals is kafka-python's (never seen with librdkafka), and its stand-in
        # (poll, then seek back) models kafka-python's position; librdkafka's position moves
        # with what was consumed, so the stand-in would show no lag there.
        (
            "tests.integration.test_worker_self_heal",
            "test_assigned_consumer_that_fetches_nothing_is_recreated",
        ),
    }
)


def _clients() -> tuple[str, ...]:
    wanted = os.environ.get("KAFKA_CLIENTS", "")
    if not wanted:
        return CLIENTS
    chosen = tuple(c.strip() for c in wanted.split(",") if c.strip())
    unknown = set(chosen) - set(CLIENTS)
    if unknown:
        raise pytest.UsageError(
            f"KAFKA_CLIENTS: unknown client(s) {sorted(unknown)}; use {CLIENTS}"
        )
    return chosen


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kafka_client" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__
    if module not in BOTH_CLIENTS:
        return
    clients = _clients()
    if (module, metafunc.function.__name__) in DEFAULT_CLIENT_ONLY:
        clients = tuple(c for c in clients if c == CLIENTS[0]) or clients[:1]
    metafunc.parametrize("kafka_client", clients, indirect=True)


@pytest.fixture(autouse=True)
def kafka_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ``kafka.client`` the worker processes of this test use (via the environment)."""
    client = str(getattr(request, "param", CLIENTS[0]))
    if hasattr(request, "param"):
        monkeypatch.setenv("SENSOR_ANOMALY_KAFKA__CLIENT", client)
    return client
