"""Per-device state with a changelog: an in-memory store per input partition, restored from a
compacted Kafka topic on assignment (the Kafka Streams / quixstreams state-store pattern)."""

from worker.state.store import (
    ChangelogError,
    RestoreStats,
    StateStore,
    changelog_topic_name,
    ensure_changelog_topic,
)

__all__ = [
    "ChangelogError",
    "RestoreStats",
    "StateStore",
    "changelog_topic_name",
    "ensure_changelog_topic",
]
