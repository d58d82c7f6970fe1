"""Keeps a shard's store in step with the partitions of catalog.vectors it owns.

Explicit assignment, not a consumer group: ownership is p % S == s, fixed by settings, so a
shard never waits on a rebalance. "Caught up" is the first end-of-partition event on every
owned partition (watermarks are unreliable on some brokers; EOF events are not).
"""

from __future__ import annotations

import time

import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition

from proto.vectors import VectorRecord
from services.shard.metrics import ShardMetrics
from services.shard.settings import ShardSettings
from services.shard.store import ShardStore
from vitrine.errors import InvalidMessage
from vitrine.kafka import AsyncConsumer, LagTracker, owned_partitions
from vitrine.service import Readiness

log = structlog.get_logger()


class VectorReplicator:
    def __init__(
        self,
        settings: ShardSettings,
        consumer: AsyncConsumer,
        store: ShardStore,
        readiness: Readiness,
        metrics: ShardMetrics,
    ) -> None:
        self._s = settings
        self._consumer = consumer
        self._store = store
        self._readiness = readiness
        self._metrics = metrics
        self.partitions = owned_partitions(
            settings.shard_id, settings.num_shards, settings.vector_partitions
        )
        self.next_offsets: dict[int, int] = {}
        self.lag = LagTracker(consumer, metrics.lag)

    async def run(self) -> None:
        kafka = self._consumer.consumer
        assignment = [
            TopicPartition(self._s.vectors_topic, p, OFFSET_BEGINNING) for p in self.partitions
        ]
        await self._consumer.call(kafka.assign, assignment)
        owned = [TopicPartition(self._s.vectors_topic, p) for p in self.partitions]
        self._readiness.set_not_ready(f"catching up on partitions {self.partitions}")
        not_caught_up = set(self.partitions)
        while True:
            messages = await self._consumer.next_batch(self._s.consume_batch, 0.05, 0.1)
            for message in messages:
                error = message.error()
                if error is None:
                    self._apply(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    not_caught_up.discard(message.partition())
                else:
                    log.warning("consumer error", error=str(error))
            if not not_caught_up and not self._readiness.ready:
                log.info("caught up", vectors=len(self._store), partitions=self.partitions)
                self._readiness.set_ready()
            self._metrics.vectors.set(len(self._store))
            self._metrics.index_bytes.set(self._store.nbytes())
            await self.lag.maybe_refresh(owned)

    def _apply(self, message: Message) -> None:
        partition, offset = message.partition() or 0, message.offset() or 0
        self.next_offsets[partition] = offset + 1
        try:
            record = VectorRecord.from_wire(message.value() or b"")
            applied = self._store.apply(record)
            outcome = "applied" if applied else "stale"
            if applied and record.event_time_ms:
                self._metrics.freshness_seconds.observe(
                    max(0.0, time.time() - record.event_time_ms / 1000)
                )
        except InvalidMessage as exc:
            outcome = "rejected"
            log.warning(
                "rejected vector record", reason=str(exc),
                partition=partition, offset=offset,
            )
        self._metrics.records.labels(outcome).inc()
