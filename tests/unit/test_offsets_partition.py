"""``offsets_partition``: the group's partition of ``__consumer_offsets``, as the broker
computes it (``Utils.abs(groupId.hashCode()) % partitions``).

The expected values were printed by Java 17 on this machine (``String.hashCode``, then
``h == Integer.MIN_VALUE ? 0 : Math.abs(h)``, then ``% 50``), including a negative hash,
the one string whose hash is ``Integer.MIN_VALUE`` and a non-ASCII group id.
"""

from __future__ import annotations

import pytest

from worker.clients.kafka_python import offsets_partition


@pytest.mark.parametrize(
    ("group", "partition"),
    [
        ("polygenelubricants", 0),  # hashCode == Integer.MIN_VALUE
        ("sensor-anomaly", 2),  # hashCode -1014260752
        ("chaos-g-broker_kill-exa-8b767c", 4),  # hashCode -2146378704
        ("grüße-gruppe", 5),  # 80269105
        ("zzzzzzzzzzzz", 42),  # 1097476992
        ("foo", 24),  # 101574
    ],
)
def test_matches_the_broker(group: str, partition: int) -> None:
    assert offsets_partition(group, 50) == partition


def test_one_partition_and_astral_characters() -> None:
    assert offsets_partition("anything", 1) == 0
    # Outside the BMP: Java hashes the two UTF-16 code units of the surrogate pair.
    assert offsets_partition("g-\U0001f600", 50) == 17  # Java: hashCode 4884617
