"""The encoder's Kafka loop: consume a batch, transform, publish, and only then commit.

At-least-once: metadata goes to Redis and records to Kafka first; offsets are committed only
after every produced record (vectors and dead letters) is acknowledged. If a delivery fails
the batch is rewound and processed again; idempotent apply downstream absorbs the repeat.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import structlog
from confluent_kafka import KafkaError, Message, Producer, TopicPartition
from redis.exceptions import RedisError

from services.encoder.metrics import EncoderMetrics
from services.encoder.pipeline import BatchOutput, EventTransform, RawEvent
from services.encoder.settings import EncoderSettings
from vitrine.kafka import AsyncConsumer, LagTracker, partition_for
from vitrine.metadata import MetadataStore

log = structlog.get_logger()


class DeliveryFailed(Exception):
    pass


class EncoderWorker:
    def __init__(
        self,
        settings: EncoderSettings,
        consumer: AsyncConsumer,
        producer: Producer,
        transform: EventTransform,
        metadata: MetadataStore,
        metrics: EncoderMetrics,
    ) -> None:
        self._s = settings
        self._consumer = consumer
        self._producer = producer
        self._transform = transform
        self._metadata = metadata
        self._metrics = metrics
        self.totals: Counter[str] = Counter()  # outcome -> events, for /stats
        self.lag = LagTracker(consumer, metrics.lag)

    async def run(self) -> None:
        kafka = self._consumer.consumer
        await self._consumer.call(kafka.subscribe, [self._s.events_topic])
        while True:
            messages = await self._consumer.next_batch(
                self._s.batch_size, self._s.batch_timeout_ms / 1000
            )
            await self.lag.maybe_refresh()
            batch = [_raw(m) for m in messages if not _is_error(m)]
            if not batch:
                continue
            try:
                await self._process(batch)
            except (DeliveryFailed, RedisError) as exc:
                # nothing was committed: rewind and try again; downstream apply is idempotent
                log.warning("batch not delivered, rewinding", error=str(exc))
                self._metrics.delivery_failures.inc()
                await self._consumer.call(self._rewind, batch)
                await asyncio.sleep(1.0)

    async def _process(self, batch: Sequence[RawEvent]) -> None:
        with self._metrics.batch_seconds.time():
            out = await self._transform.run(batch)
            await self._write_metadata(out)
            await self._publish(out)
            await self._consumer.call(self._commit, batch)
        self._record(batch, out)

    async def _write_metadata(self, out: BatchOutput) -> None:
        """Before the vectors: a hit must never come back without its title."""
        await asyncio.gather(
            *(self._metadata.upsert(m) for m in out.metadata),
            *(self._metadata.delete(pid, version) for pid, version in out.deletes),
        )

    async def _publish(self, out: BatchOutput) -> None:
        errors: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(str(err))

        for record in out.vectors:
            self._producer.produce(
                self._s.vectors_topic,
                key=record.product_id.encode(),
                value=record.to_wire(),
                partition=partition_for(record.product_id, self._s.vector_partitions),
                on_delivery=on_delivery,
            )
        for letter in out.dead_letters:
            self._producer.produce(
                self._s.dlq_topic, key=letter.key, value=letter.to_wire(), on_delivery=on_delivery
            )
        remaining = await asyncio.to_thread(self._producer.flush, 30.0)
        if remaining or errors:
            raise DeliveryFailed(f"{remaining} undelivered, errors: {errors[:3]}")

    def _commit(self, batch: Sequence[RawEvent]) -> None:
        self._consumer.consumer.commit(offsets=_next_offsets(batch), asynchronous=False)

    def _rewind(self, batch: Sequence[RawEvent]) -> None:
        firsts: dict[tuple[str, int], int] = {}
        for raw in batch:
            key = (raw.topic, raw.partition)
            firsts[key] = min(firsts.get(key, raw.offset), raw.offset)
        for (topic, partition), offset in firsts.items():
            self._consumer.consumer.seek(TopicPartition(topic, partition, offset))

    def _record(self, batch: Sequence[RawEvent], out: BatchOutput) -> None:
        self._metrics.batch_size.observe(len(batch))
        outcomes = {
            "indexed": len(out.metadata),
            "deleted": len(out.deletes),
            "dead_lettered": len(out.dead_letters),
        }
        for outcome, count in outcomes.items():
            self._metrics.events.labels(outcome).inc(count)
            self.totals[outcome] += count
        for letter in out.dead_letters:
            self._metrics.dead_letters.labels(letter.stage).inc()
            log.warning(
                "dead-lettered event", stage=letter.stage, reason=letter.reason,
                partition=letter.source_partition, offset=letter.source_offset,
            )


def _is_error(message: Message) -> bool:
    error = message.error()
    if error is not None and error.code() != KafkaError._PARTITION_EOF:
        log.warning("consumer error", error=str(error))
    return error is not None


def _raw(message: Message) -> RawEvent:
    return RawEvent(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=message.key(), value=message.value() or b"",
        timestamp_ms=max(0, message.timestamp()[1]),
    )


def _next_offsets(batch: Sequence[RawEvent]) -> list[TopicPartition]:
    latest: dict[tuple[str, int], int] = {}
    for raw in batch:
        key = (raw.topic, raw.partition)
        latest[key] = max(latest.get(key, -1), raw.offset)
    return [TopicPartition(t, p, offset + 1) for (t, p), offset in latest.items()]
