from __future__ import annotations

import pytest

from vitrine.errors import VitrineError
from vitrine.kafka import murmur2, owned_partitions, partition_for


def _signed(value: int) -> int:
    return value - 2**32 if value >= 2**31 else value


@pytest.mark.parametrize(
    ("key", "expected"),
    [  # Apache Kafka's own test vectors for Utils.murmur2
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_the_java_client(key: bytes, expected: int) -> None:
    assert _signed(murmur2(key)) == expected


def test_partitions_are_stable_and_spread() -> None:
    ids = [str(i) for i in range(10_000)]
    parts = [partition_for(pid, 8) for pid in ids]
    assert parts == [partition_for(pid, 8) for pid in ids]
    counts = [parts.count(p) for p in range(8)]
    assert min(counts) > 1000  # about 1250 each


def test_each_partition_has_exactly_one_owner() -> None:
    for shards in (1, 2, 3, 4):
        owners = [owned_partitions(s, shards, 8) for s in range(shards)]
        assert sorted(p for owned in owners for p in owned) == list(range(8))
    with pytest.raises(VitrineError):
        owned_partitions(2, 2, 8)
