"""The encoder's Kafka loop: consume a batch, transform, publish, and only then commit.

At-least-once: vector records (each a product's vector and the fields its hits show) go to
Kafka first; offsets are committed only after every produced record (vectors and dead letters)
is acknowledged. Two kinds of failure are told apart:

- the world's (the broker unreachable, a commit refused): nothing is committed, the
  batch is rewound and tried again after a backoff; idempotent apply downstream absorbs the
  repeat, and no event is blamed;
- an event's: the transform dead-letters it with its stage and the rest of the batch goes on.
  Whatever escapes that (a bug, a record the broker refuses for good) is found by going event
  by event, and the culprit is quarantined. A process that dies on an event is caught by the
  `AttemptLedger`: after `max_attempts` tries the event is quarantined, never tried again.

A batch that runs longer than `stall_timeout_s` fails /healthz, so a hang the timeouts did not
foresee ends in a restart, and the ledger then counts it as a try.
Covered by tests/encoder/test_hostile_events.py and tests/e2e/test_chaos.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from proto.dlq import DeadLetter
from services.encoder.attempts import AttemptLedger, position
from services.encoder.metrics import EncoderMetrics
from services.encoder.pipeline import BatchOutput, EventTransform, Publication, RawEvent
from services.encoder.settings import EncoderSettings
from vitrine.kafka import AsyncConsumer, LagTracker, consumer_config, partition_for

log = structlog.get_logger()

# the broker refuses this message, and would refuse it again: it is the message's fault
_REFUSED_FOR_GOOD = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_RECORD,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError._INVALID_ARG,
}


class DeliveryFailed(Exception):
    """The broker did not acknowledge everything: the batch is tried again, nobody blamed."""


INFRASTRUCTURE = (DeliveryFailed, KafkaException)
DeliveryReport = Callable[[KafkaError | None, Message], None]


@dataclass(frozen=True)
class _Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    partition: int = -1  # librdkafka's "unassigned": the producer's partitioner picks


class EncoderWorker:
    def __init__(
        self,
        settings: EncoderSettings,
        consumer: AsyncConsumer,
        producer: Producer,
        transform: EventTransform,
        metrics: EncoderMetrics,
        ledger: AttemptLedger,
    ) -> None:
        self._s = settings
        self._consumer = consumer
        self._producer = producer
        self._transform = transform
        self._metrics = metrics
        self._ledger = ledger
        self._busy_since: float | None = None
        self._backoff_s = 0.0
        self._rewound = False
        self.totals: Counter[str] = Counter()  # outcome -> events, for /stats
        self.lag = LagTracker(consumer, metrics.lag, labels=(settings.events_topic,))
        self.backfill_lag = LagTracker(consumer, metrics.lag, labels=(settings.backfill_from,)) \
            if settings.backfill_from else None

    def stalled(self) -> str | None:
        """The liveness check: a batch that never ends is a hang, and a restart the cure."""
        if self._busy_since is None:
            return None
        busy = time.monotonic() - self._busy_since
        if busy <= self._s.stall_timeout_s:
            return None
        return f"one batch has run for {busy:.0f}s (stall timeout {self._s.stall_timeout_s:g}s)"

    async def run(self) -> None:
        kafka = self._consumer.consumer
        sources = [self._s.events_topic, *([self._s.backfill_from] if self._s.backfill_from
                                           else [])]
        await self._consumer.call(kafka.subscribe, sources, on_assign=self._on_assign)
        while True:
            messages = await self._consumer.next_batch(
                self._s.batch_size, self._s.batch_timeout_ms / 1000
            )
            await self._refresh_lags()
            batch = [_raw(m) for m in messages if not _is_error(m)]
            if batch:
                await self.handle(batch)
            if self._rewound:  # the world failed us: wait before the next go (not a stall)
                self._rewound = False
                await asyncio.sleep(self._backoff_s)

    def _on_assign(self, kafka: Consumer, partitions: list[TopicPartition]) -> None:
        """On the consumer's thread: event partitions this group never committed start where
        the followed model's encoders have (`events_from_group`); everything before that is
        in the vector log the backfill reads, so it need not be encoded twice."""
        source = self._s.events_from_group
        events = [tp for tp in partitions if tp.topic == self._s.events_topic]
        if source is None or not events:
            return
        fresh = [tp for tp in kafka.committed(events, timeout=10) if tp.offset < 0]
        if not fresh:
            return
        reader = Consumer(consumer_config(self._s.kafka_bootstrap, source))
        try:
            theirs = {tp.partition: tp.offset for tp in reader.committed(fresh, timeout=10)}
        finally:
            reader.close()
        starts = {p: o for p, o in theirs.items() if o >= 0}
        for tp in partitions:
            if tp.topic == self._s.events_topic and tp.partition in starts:
                tp.offset = starts[tp.partition]
        log.info("events start where the followed model's encoders are", group=source,
                 offsets=starts)
        kafka.assign(partitions)

    async def _refresh_lags(self) -> None:
        trackers = [(self.lag, self._s.events_topic)]
        if self.backfill_lag is not None and self._s.backfill_from:
            trackers.append((self.backfill_lag, self._s.backfill_from))
        if not any(tracker.due() for tracker, _ in trackers):
            return
        assigned = await self._consumer.call(self._consumer.consumer.assignment)
        for tracker, topic in trackers:
            await tracker.maybe_refresh([tp for tp in assigned if tp.topic == topic])

    async def handle(self, batch: Sequence[RawEvent]) -> None:
        self._busy_since = time.monotonic()
        try:
            if self._ledger.inherited(batch):
                log.warning("a previous process died on this batch: going event by event",
                            events=len(batch))
                await self._one_by_one(batch)
            else:
                await self._as_a_batch(batch)
        finally:
            self._busy_since = None

    async def _as_a_batch(self, batch: Sequence[RawEvent]) -> None:
        self._ledger.begin(batch)
        try:
            await self._process(batch)
        except INFRASTRUCTURE as exc:
            await self._retry_later(batch, exc)
            return
        except Exception as exc:  # escaped the transform's isolation: find the culprit
            log.error("batch failed, retrying event by event", error=repr(exc), events=len(batch))
            self._metrics.isolation_retries.inc()
            await self._one_by_one(batch)
            return
        self._ledger.settle(batch)
        self._backoff_s = 0.0

    async def _one_by_one(self, batch: Sequence[RawEvent]) -> None:
        for index, raw in enumerate(batch):
            tries = self._ledger.begin([raw])[position(raw)]
            try:
                if tries > self._s.max_attempts:
                    await self._quarantine(raw, tries - 1, "the encoder died on it each time")
                else:
                    await self._process([raw], tries)
            except INFRASTRUCTURE as exc:
                await self._retry_later(batch[index:], exc)
                return
            except Exception as exc:  # fails alone, every time: it is this event's fault
                try:
                    await self._quarantine(raw, tries, f"processing raised {exc!r}")
                except INFRASTRUCTURE as infra:
                    await self._retry_later(batch[index:], infra)
                    return
            self._ledger.settle([raw])
        self._backoff_s = 0.0

    async def _quarantine(self, raw: RawEvent, tries: int, why: str) -> None:
        out = BatchOutput(max_original_bytes=self._s.dead_letter_max_bytes)
        out.refuse(raw, "quarantine", f"tried {tries} times: {why}", attempts=tries)
        log.error("event quarantined", partition=raw.partition, offset=raw.offset, tries=tries,
                  reason=why)
        self._metrics.quarantined.inc()
        await self._publish(out)
        await self._consumer.call(self._commit, [raw])
        self._record([raw], out)

    async def _retry_later(self, batch: Sequence[RawEvent], exc: BaseException) -> None:
        """Not the events' fault: forget their tries, rewind; the loop waits out the backoff
        outside the batch, so /healthz does not take an outage for a hang."""
        self._ledger.settle(batch)
        self._backoff_s = min(30.0, max(0.5, self._backoff_s * 2))
        log.warning("batch not delivered, rewinding", error=str(exc), retry_in_s=self._backoff_s)
        self._metrics.delivery_failures.inc()
        try:
            await self._consumer.call(self._rewind, batch)
        except KafkaException as rewind_error:  # e.g. the partition moved in a rebalance
            log.warning("rewind failed", error=str(rewind_error))
        self._rewound = True

    async def _process(self, batch: Sequence[RawEvent], attempts: int = 1) -> None:
        with self._metrics.batch_seconds.time():
            out = await self._transform.run(batch, attempts)
            await self._publish(out)
            await self._consumer.call(self._commit, batch)
        self._record(batch, out)

    async def _publish(self, out: BatchOutput) -> None:
        """Vectors, then dead letters. A vector record refused for good (too large, invalid)
        is dead-lettered in its place."""
        refused = await self._produce([self._vector_message(p) for p in out.published])
        for index, error in refused.items():
            publication = out.published[index]
            out.refuse(publication.raw, "produce", f"the broker refused the vector record: {error}")
        delivered = [p for i, p in enumerate(out.published) if i not in refused]
        out.published = delivered
        letters = [self._letter_message(letter) for letter in out.dead_letters]
        refused = await self._produce(letters)
        if refused:  # even a bounded letter was too large for this broker: send the bare facts
            bare = [self._letter_message(out.dead_letters[i], bare=True) for i in refused]
            still = await self._produce(bare)
            if still:
                raise DeliveryFailed(f"dead letters refused: {list(still.values())[:3]}")

    def _vector_message(self, publication: Publication) -> _Outgoing:
        return _Outgoing(
            self._s.vectors_topic, publication.product_id.encode(), publication.record,
            partition_for(publication.product_id, self._s.vector_partitions),
        )

    def _letter_message(self, letter: DeadLetter, bare: bool = False) -> _Outgoing:
        if bare:
            letter = letter.model_copy(update={"original": b"", "truncated": True})
        return _Outgoing(self._s.dlq_topic, letter.key, letter.to_wire())

    async def _produce(self, messages: list[_Outgoing]) -> dict[int, str]:
        """Produce and wait for every acknowledgement. Returns the messages the broker refused
        for good (index -> why); any other failure raises `DeliveryFailed`."""
        refused: dict[int, str] = {}
        transient: list[str] = []

        def on_delivery(index: int) -> DeliveryReport:
            def report(err: KafkaError | None, _msg: Message) -> None:
                if err is None:
                    return
                if err.code() in _REFUSED_FOR_GOOD:
                    refused[index] = err.str()
                else:
                    transient.append(err.str())

            return report

        for index, message in enumerate(messages):
            refusal = await self._produce_one(message, on_delivery(index))
            if refusal is not None:
                refused[index] = refusal
        remaining = await asyncio.to_thread(self._producer.flush, 30.0)
        if remaining or transient:
            raise DeliveryFailed(f"{remaining} undelivered, errors: {transient[:3]}")
        return refused

    async def _produce_one(self, message: _Outgoing, report: DeliveryReport) -> str | None:
        """Hand one message to the producer; the broker's refusal if it is known already."""
        for _ in range(100):
            try:
                self._producer.produce(
                    message.topic, key=message.key, value=message.value,
                    partition=message.partition, on_delivery=report,
                )
                return None
            except BufferError:  # the local queue is full: let deliveries drain, then retry
                await asyncio.to_thread(self._producer.poll, 0.5)
            except KafkaException as exc:
                error = exc.args[0]
                if isinstance(error, KafkaError) and error.code() in _REFUSED_FOR_GOOD:
                    return str(error.str())
                raise
        raise DeliveryFailed("the producer queue stayed full")

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
            "indexed": sum(not p.deleted for p in out.published),
            "deleted": sum(p.deleted for p in out.published),
            "dead_lettered": len(out.dead_letters),
        }
        for outcome, count in outcomes.items():
            self._metrics.events.labels(outcome).inc(count)
            self.totals[outcome] += count
        for letter in out.dead_letters:
            self._metrics.dead_letters.labels(letter.stage).inc()
            log.warning(
                "dead-lettered event", stage=letter.stage, reason=letter.reason[:500],
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
