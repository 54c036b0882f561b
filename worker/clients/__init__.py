"""Kafka client adapters behind one interface.

The loop's delivery contract lives in :mod:`worker.loop`, once; what is specific to one
client library lives here, one module per library, each providing the functions of
:class:`ClientAdapter`. The consumer and producer an adapter builds speak kafka-python's
interface (``poll`` → ``{TopicPartition: [records]}``, ``send`` → a future with
``is_done`` / ``failed()`` / ``exception``, ``commit(offsets, timeout_ms)``, ``seek``,
``committed``, ``assignment``, rebalance listeners with ``on_partitions_revoked`` /
``on_partitions_assigned`` / ``on_partitions_lost`` coroutines); kafka-python's objects do so
natively, the confluent-kafka adapter wraps librdkafka's.

``kafka.client`` picks the adapter: ``kafka-python`` (default, the design card's client) or
``confluent`` (``pip install 'sensor-anomaly[confluent]'``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from worker.config import WorkerConfig


class ClientAdapter(Protocol):
    """What the loop needs from a Kafka library (module-level functions of an adapter)."""

    def build_consumer(self, cfg: WorkerConfig, instance_id: str = "") -> Any: ...

    def build_producer(self, cfg: WorkerConfig, instance_id: str = "") -> Any: ...

    def ensure_topics(self, cfg: WorkerConfig, timeout_ms: int = 5000) -> list[str]:
        """Missing input topics; creates missing outputs; raises StartupError/KafkaError."""
        ...

    def membership(self, consumer: Any) -> Any | None:
        """Group metadata for a transactional offset commit, None without a valid generation."""
        ...

    def is_stable_member(self, consumer: Any) -> bool: ...

    async def commit_in_listener(self, consumer: Any, offsets: Any, timeout_s: float) -> None:
        """Commit offsets from inside the rebalance listener, bounded by ``timeout_s``."""
        ...

    def send_offsets_to_transaction(
        self, producer: Any, offsets: Any, group_metadata: Any, timeout_s: float
    ) -> None: ...

    def commit_transaction(self, producer: Any, timeout_s: float) -> None:
        """Raises TxnOutcomeUnknown (a KafkaError) when not done within ``timeout_s``."""
        ...

    def abort_transaction(self, producer: Any, timeout_s: float) -> None: ...

    def abort_hanging(
        self, cfg: WorkerConfig, producer: Any, topics: list[str], timeout_ms: int = 10_000
    ) -> list[str]:
        """After ``init_transactions``: abort any transaction of this producer id still open
        on ``topics`` (they would be committed by our next commit marker); returns them."""
        ...

    def discard_producer(self, producer: Any, timeout_s: float) -> bool:
        """Close a transactional producer being replaced so that nothing of its open
        transaction can reach the broker after the replacement initialises; waits at most
        ``timeout_s``; False if the old one may still send."""
        ...

    def build_restore_consumer(self, cfg: WorkerConfig) -> Any:
        """A group-less, ``read_committed`` consumer with the subset of ``KafkaConsumer``
        that :meth:`worker.state.StateStore.restore` uses (``partitions_for_topic``,
        ``assign``, ``seek_to_beginning``, ``end_offsets`` = last stable offsets,
        ``position`` = next offset past every record and control marker read, ``poll``,
        ``close``)."""
        ...

    def ensure_changelog(self, cfg: WorkerConfig, topic: str, partitions: int) -> bool:
        """Create or check the compacted changelog topic (True if created); raises
        ChangelogError if it exists with fewer partitions or without compaction."""
        ...


_MODULES = {"kafka-python": "worker.clients.kafka_python", "confluent": "worker.clients.confluent"}


def adapter_for(cfg: WorkerConfig) -> ClientAdapter:
    """The adapter module named by ``kafka.client``."""
    name = getattr(cfg.kafka, "client", "kafka-python")
    module: Any = importlib.import_module(_MODULES[name])
    return module  # type: ignore[no-any-return]
