"""Kafka helpers shared by the services: client configs, topic creation, partitioning.

Code only against the Kafka protocol: the embedded Tansu broker and a real cluster are used the
same way. Consumer configs carry short session timeouts because a group (re)join waits about half
of `session.timeout.ms` on Tansu.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client import Gauge

from vitrine.errors import VitrineError

T = TypeVar("T")
log = structlog.get_logger()


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def vitrine_topics(
    events: str, vectors: str, dlq: str, event_partitions: int, vector_partitions: int,
    models: str,
) -> list[TopicSpec]:
    """The topics with their real partition counts and retention policies (a candidate
    model's own vector topic is made when it is added: `vitrine.registry`)."""
    return [
        TopicSpec(models, 1, {"cleanup.policy": "compact"}),
        TopicSpec(events, event_partitions, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
        TopicSpec(vectors, vector_partitions, {"cleanup.policy": "compact"}),
        TopicSpec(dlq, 1, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
    ]


def ensure_topics(bootstrap: str, topics: Iterable[TopicSpec], timeout_s: float = 30.0) -> None:
    """Create missing topics before any client touches them (auto-creation picks 4 partitions)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=timeout_s).topics
    wanted = [t for t in topics if t.name not in existing]
    for topic in topics:
        found = existing.get(topic.name)
        if found is not None and len(found.partitions) != topic.partitions:
            raise VitrineError(
                f"topic {topic.name} has {len(found.partitions)} partitions, "
                f"settings say {topic.partitions}"
            )
    if not wanted:
        return
    futures = admin.create_topics(
        [NewTopic(t.name, num_partitions=t.partitions, config=t.config) for t in wanted],
        operation_timeout=timeout_s,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        _wait_for_topic(admin, name, timeout_s)


def _wait_for_topic(admin: AdminClient, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if name in admin.list_topics(topic=name, timeout=timeout_s).topics:
            return
        time.sleep(0.05)
    raise VitrineError(f"topic {name} did not appear within {timeout_s}s")


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Idempotent, acks=all: a retried produce never duplicates or reorders a product."""
    return {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "none",
        **overrides,
    }


def consumer_config(bootstrap: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Manual commits only: offsets move after the outputs they produced are acknowledged."""
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        # the broker may hold a fetch this long waiting for data: it bounds each hop's latency
        # (librdkafka's default is 500 ms)
        "fetch.wait.max.ms": 50,
        **overrides,
    }


def murmur2(data: bytes) -> int:
    """Kafka's murmur2, so our partitions match the Java client's default partitioner."""
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    length = len(data)
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = data[length - length % 4 :]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_for(product_id: str, num_partitions: int) -> int:
    """Stable partition of a product: Java's `toPositive(murmur2(key)) % numPartitions`."""
    return (murmur2(product_id.encode()) & 0x7FFFFFFF) % num_partitions


def owned_partitions(shard_id: int, num_shards: int, num_partitions: int) -> list[int]:
    """Shard s of S owns every partition p with p % S == s."""
    if not 0 <= shard_id < num_shards:
        raise VitrineError(f"shard id {shard_id} is outside 0..{num_shards - 1}")
    return [p for p in range(num_partitions) if p % num_shards == shard_id]


class AsyncConsumer:
    """A confluent Consumer driven from asyncio through one dedicated thread.

    Every call (consume, commit, seek, close) runs on the same thread, one after another, so
    closing at shutdown can never race a consume that is still blocked in librdkafka.
    """

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-consumer")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, partial(fn, *args, **kwargs))

    async def next_batch(
        self, max_messages: int, max_wait_s: float, idle_wait_s: float = 1.0
    ) -> list[Message]:
        """Up to `max_messages`, closed by size or `max_wait_s` after the first message arrives.

        librdkafka's consume(n, timeout) waits the whole timeout unless n messages come, which
        would make a lone event wait for the batch to time out. Here the batch also closes as
        soon as the broker has nothing more right now, so a quiet stream stays fast and a busy
        one still fills whole batches.
        """
        batch = await self.call(self.consumer.consume, 1, idle_wait_s)  # returns on arrival
        closes_at = time.monotonic() + max_wait_s
        while batch and len(batch) < max_messages and time.monotonic() < closes_at:
            more = await self.call(self.consumer.consume, max_messages - len(batch), 0.005)
            if not more:
                break
            batch.extend(more)
        return batch

    async def close(self) -> None:
        await self.call(self.consumer.close)
        self._thread.shutdown(wait=True)


def partition_lag(consumer: Consumer, partitions: list[TopicPartition]) -> dict[int, int]:
    """Messages between the consumer's position and the end of each partition.

    Approximate where a broker's high watermark is (Tansu reports the first offset of the last
    batch + 1); exact on Kafka. A partition not consumed from yet counts from its start.
    """
    lags: dict[int, int] = {}
    for tp in consumer.position(partitions):
        low, high = consumer.get_watermark_offsets(tp, timeout=2.0, cached=False)
        position = tp.offset if tp.offset >= 0 else low
        lags[tp.partition] = max(0, high - position)
    return lags


def committed_lag(
    bootstrap: str, group_id: str, topic: str, timeout_s: float = 10.0
) -> dict[int, int]:
    """Messages of `topic` that `group_id` has not committed yet, per partition: what KEDA
    scales a Deployment on, read without joining the group (its members are undisturbed).

    A partition the group never committed counts from its start; approximate on Tansu like
    `partition_lag`, exact on Kafka.
    """
    consumer = Consumer(consumer_config(bootstrap, group_id))
    try:
        found = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if found is None or found.error is not None:
            raise VitrineError(f"topic {topic!r} cannot be read: "
                               f"{found.error if found is not None else 'unknown topic'}")
        wanted = [TopicPartition(topic, p) for p in sorted(found.partitions)]
        lags: dict[int, int] = {}
        for tp in consumer.committed(wanted, timeout=timeout_s):
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            lags[tp.partition] = max(0, high - (tp.offset if tp.offset >= 0 else low))
        return lags
    finally:
        consumer.close()


class LagTracker:
    """Refreshes a per-partition lag gauge at most every `interval_s`, from the consumer's
    own thread, so the loop that owns the consumer pays for it only now and then."""

    def __init__(
        self, consumer: AsyncConsumer, gauge: Gauge, interval_s: float = 5.0,
        labels: tuple[str, ...] = (),
    ) -> None:
        """`labels`: the gauge's label values before the partition's."""
        self._consumer = consumer
        self._gauge = gauge
        self._labels = labels
        self._interval_s = interval_s
        self._last = -interval_s
        self.lags: dict[int, int] = {}

    def due(self) -> bool:
        return time.monotonic() - self._last >= self._interval_s

    async def maybe_refresh(self, partitions: list[TopicPartition] | None = None) -> None:
        if not self.due():
            return
        self._last = time.monotonic()
        kafka = self._consumer.consumer
        wanted = partitions if partitions is not None else await self._consumer.call(
            kafka.assignment
        )
        try:
            self.lags = await self._consumer.call(partition_lag, kafka, wanted)
        except KafkaException as exc:  # a metric must never stop the loop it measures
            log.warning("lag refresh failed", error=str(exc))
            return
        for partition, lag in self.lags.items():
            self._gauge.labels(*self._labels, str(partition)).set(lag)
