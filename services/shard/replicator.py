"""Keeps one model's store on a shard in step with the partitions of its vector topic that the
shard owns (`services/shard/models.py` runs one per served model).

Explicit assignment, not a consumer group: ownership is p % S == s, fixed by settings, so a
shard never waits on a rebalance. "Caught up" is the first end-of-partition event on every
owned partition (watermarks are unreliable on some brokers; EOF events are not).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition

from proto.models import ModelEntry
from proto.vectors import VectorRecord
from services.shard.metrics import ShardMetrics
from services.shard.settings import ShardSettings
from services.shard.snapshot import Snapshot, load_latest, write_snapshot
from services.shard.store import ShardStore
from vitrine.errors import InvalidMessage
from vitrine.kafka import AsyncConsumer, LagTracker, owned_partitions
from vitrine.service import Readiness

log = structlog.get_logger()

WATERMARK_SETTLE_S = 5.0  # how long a trailing high watermark may take to catch up


class VectorReplicator:
    def __init__(
        self,
        settings: ShardSettings,
        consumer: AsyncConsumer,
        store: ShardStore,
        readiness: Readiness,
        metrics: ShardMetrics,
        model: ModelEntry,
        snapshot_dir: Path | None,
    ) -> None:
        """`snapshot_dir`: this model's own (None: no snapshots)."""
        self._s = settings
        self.model = model
        self.topic = model.vectors_topic
        self._snapshot_dir = snapshot_dir
        self._consumer = consumer
        self._store = store
        self._readiness = readiness
        self._metrics = metrics
        self.partitions = owned_partitions(
            settings.shard_id, settings.num_shards, settings.vector_partitions
        )
        self.next_offsets: dict[int, int] = {}
        self.lag = LagTracker(consumer, metrics.lag, labels=(model.model_id,))
        self.restored_from: str | None = None
        self._changed_since_snapshot = False
        self._last_snapshot = time.monotonic()
        self._seal_task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        kafka = self._consumer.consumer
        await self._restore()
        assignment = [
            TopicPartition(self.topic, p, self.next_offsets.get(p, OFFSET_BEGINNING))
            for p in self.partitions
        ]
        await self._consumer.call(kafka.assign, assignment)
        owned = [TopicPartition(self.topic, p) for p in self.partitions]
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
            if self._readiness.ready:  # lexical searches see the writes within REFRESH_S
                self._store.lexical.refresh()
            elif not not_caught_up:  # a catch-up commits once, at its end, not per batch
                self._store.lexical.refresh(force=True)
                log.info("caught up", model_id=self.model.model_id, vectors=len(self._store),
                         partitions=self.partitions)
                self._readiness.set_ready()
            model, store = self.model.model_id, self._store
            self._metrics.vectors.labels(model).set(len(store))
            self._metrics.index_bytes.labels(model).set(store.nbytes())
            self._metrics.segment_rows.labels(model, "growing").set(len(store.growing or ()))
            self._metrics.segment_rows.labels(model, "sealed").set(len(store.sealed or ()))
            if self._store.wants_seal():
                self._seal_task = asyncio.create_task(self._seal())
            await self.lag.maybe_refresh(owned)
            if time.monotonic() - self._last_snapshot >= self._s.snapshot_interval_s:
                await self.snapshot()

    async def _restore(self) -> None:
        """Start from the newest valid snapshot unless the log no longer has its offsets
        (a new or emptied cluster): then rebuild from the start rather than serve stale data."""
        if self._snapshot_dir is None:
            return
        found = await asyncio.to_thread(
            load_latest, self._snapshot_dir, self.topic,
            self._s.num_shards, self._s.shard_id, self._s.index_spec(),
        )
        if found is None:
            return
        behind = await self._snapshot_ahead_of_log(found.next_offsets)
        if behind:
            log.warning("snapshot is ahead of the log: rebuilding from the start",
                        snapshot_offsets=behind)
            return
        # on a worker thread: rebuilding the lexical index of millions of products takes seconds
        await asyncio.to_thread(self._store.load, found.state)
        self.next_offsets = dict(found.next_offsets)
        self.restored_from = "snapshot"
        log.info("restored snapshot", vectors=len(self._store), offsets=self.next_offsets)

    async def _seal(self) -> None:
        """Merge the growing buffer into the sealed segment; searches go on meanwhile."""
        started = time.monotonic()
        growing = len(self._store.growing or ())
        try:
            await self._store.seal()
        except Exception:  # a failed build leaves the old segments serving: retried later
            log.exception("sealing failed", growing=growing)
            self._metrics.seals.labels("failed").inc()
            return
        sealed = self._store.sealed
        log.info(
            "sealed", growing=growing, seconds=round(time.monotonic() - started, 3),
            sealed_rows=len(sealed) if sealed else 0,
            dead_rows=sealed.dead_count if sealed else 0,
        )
        self._metrics.seals.labels("ok").inc()
        self._metrics.seal_seconds.observe(time.monotonic() - started)

    async def _snapshot_ahead_of_log(self, offsets: dict[int, int]) -> dict[int, int]:
        """The partitions where the snapshot has consumed past the log's end. Tansu's high
        watermark can trail the true end for a moment after writes: ask again for a few
        seconds before calling the snapshot ahead (which means a new or emptied cluster)."""
        deadline = time.monotonic() + WATERMARK_SETTLE_S
        while True:
            ends = await self._consumer.call(self._log_ends)
            behind = {p: o for p, o in offsets.items() if o > ends.get(p, 0)}
            if not behind or time.monotonic() >= deadline:
                if behind:
                    log.info("the log ends before the snapshot", log_ends=ends)
                return behind
            await asyncio.sleep(0.25)

    def _log_ends(self) -> dict[int, int]:
        """Upper bound of each owned partition's end. Tansu's high watermark can trail the true
        end by one batch, which only makes us rebuild when we did not have to: never unsafe."""
        kafka = self._consumer.consumer
        ends = {}
        for p in self.partitions:
            tp = TopicPartition(self.topic, p)
            ends[p] = kafka.get_watermark_offsets(tp, timeout=5.0, cached=False)[1]
        return ends

    async def snapshot(self) -> None:
        """Write a consistent cut now (content and offsets copied together on this loop)."""
        self._last_snapshot = time.monotonic()
        if self._snapshot_dir is None or not self._changed_since_snapshot:
            return
        cut = Snapshot(
            state=self._store.export(), next_offsets=dict(self.next_offsets),
            topic=self.topic, num_shards=self._s.num_shards, shard_id=self._s.shard_id,
        )
        self._changed_since_snapshot = False
        path = await asyncio.to_thread(
            write_snapshot, self._snapshot_dir, cut, self._s.snapshot_keep
        )
        log.info("snapshot written", path=str(path), vectors=len(self._store))

    def _apply(self, message: Message) -> None:
        partition, offset = message.partition() or 0, message.offset() or 0
        self.next_offsets[partition] = offset + 1
        self._changed_since_snapshot = True
        try:
            record = VectorRecord.from_wire(message.value() or b"")
            if record.model_id != self.model.model_id:  # never one index for two models
                raise InvalidMessage(f"a vector of model {record.model_id[:300]!r} on the topic "
                                     f"of model {self.model.model_id!r}")
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
                partition=partition, offset=offset, model_id=self.model.model_id,
            )
        self._metrics.records.labels(self.model.model_id, outcome).inc()
