"""The models a shard serves side by side: one index per model, each fed by its own topic.

The model registry (`catalog.models`, followed by `vitrine.registry.RegistryFollower`) says
which models exist; each gets a `ModelIndex` here: its own store, query batcher, replicator,
consumer and snapshots. A search names its model and is answered from that model's index
alone, so a query vector of one model is never compared with product vectors of another.
The shard is ready when its active model's index has caught up; a candidate catches up
beside it and reports its own coverage in `/stats`. A retired model's index, consumer and
snapshots are dropped.

The model of revision 0 (the settings' own, on the settings' vector topic) keeps its
snapshots where the release before wrote them, so an upgrade restarts from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from confluent_kafka import Consumer

from proto.models import ModelEntry, ModelRegistry
from services.shard.batching import QueryBatcher
from services.shard.metrics import ShardMetrics
from services.shard.replicator import VectorReplicator
from services.shard.settings import ShardSettings
from services.shard.store import ShardStore
from vitrine.errors import VitrineError
from vitrine.kafka import AsyncConsumer, consumer_config, ensure_topics
from vitrine.registry import vector_topic_spec
from vitrine.service import Readiness

log = structlog.get_logger()


class UnknownModel(VitrineError):
    """A search names a model this shard holds no index of."""

    http_status = 404


@dataclass
class _ModelReadiness(Readiness):
    """A model index's own readiness; every change is passed on to the shard's."""

    on_change: Callable[[], None] = field(default=lambda: None)

    def set_ready(self) -> None:
        super().set_ready()
        self.on_change()

    def set_not_ready(self, reason: str) -> None:
        super().set_not_ready(reason)
        self.on_change()


@dataclass
class ModelIndex:
    entry: ModelEntry
    store: ShardStore
    batcher: QueryBatcher
    replicator: VectorReplicator
    readiness: Readiness
    consumer: AsyncConsumer
    snapshot_dir: Path | None
    task: asyncio.Task[None] | None = None

    @property
    def model_id(self) -> str:
        return self.entry.model_id


class ServedModels:
    """Model id -> its index on this shard, changed only by the registry."""

    def __init__(self, settings: ShardSettings, metrics: ShardMetrics, readiness: Readiness,
                 observe_batch: Callable[[int, float], None]) -> None:
        self._s = settings
        self._metrics = metrics
        self._readiness = readiness  # the shard's: ready when the active index has caught up
        self._observe_batch = observe_batch
        self.indexes: dict[str, ModelIndex] = {}
        self.registry: ModelRegistry | None = None

    @property
    def active(self) -> ModelIndex | None:
        return self.indexes.get(self.registry.active) if self.registry else None

    def index_for(self, model_id: str | None) -> ModelIndex:
        """The named model's index; None: the active model's (a router of the release before
        names none)."""
        found = self.active if model_id is None else self.indexes.get(model_id)
        if found is None:
            held = ", ".join(self.indexes) or "none yet"
            raise UnknownModel(f"shard {self._s.shard_id} holds no index of model "
                               f"{(model_id or 'active')[:300]!r} (it holds: {held})")
        return found

    async def apply(self, registry: ModelRegistry) -> None:
        """Start an index for every new model, drop every retired one, follow the active."""
        self.registry = registry
        wanted = {entry.model_id: entry for entry in registry.models}
        for model_id in [m for m in self.indexes if m not in wanted]:
            await self._retire(self.indexes.pop(model_id))
        for model_id, entry in wanted.items():
            if model_id not in self.indexes:
                self.indexes[model_id] = await self._start(entry)
        self._sync_readiness()

    async def snapshot_all(self) -> None:
        for index in self.indexes.values():
            await index.replicator.snapshot()

    async def aclose(self) -> None:
        """Graceful stop: each index snapshots, so a restart begins from here."""
        for index in self.indexes.values():
            await self._stop(index)
            await index.replicator.snapshot()
            await index.consumer.close()

    def nbytes(self) -> int:
        return sum(index.store.nbytes() for index in self.indexes.values())

    async def _start(self, entry: ModelEntry) -> ModelIndex:
        settings = self._s
        await asyncio.to_thread(ensure_topics, settings.kafka_bootstrap,
                                [vector_topic_spec(settings, entry.vectors_topic)])
        directory = self._snapshot_dir(entry)
        store = settings.new_store(directory)
        consumer = AsyncConsumer(Consumer(consumer_config(
            settings.kafka_bootstrap, f"vitrine-shard-{settings.shard_id}",
            **{"enable.partition.eof": True},
        )))
        readiness = _ModelReadiness(on_change=self._sync_readiness)
        replicator = VectorReplicator(settings, consumer, store, readiness, self._metrics,
                                      entry, directory)
        batcher = QueryBatcher(store.search, settings.search_batch_max, self._observe_batch)
        index = ModelIndex(entry, store, batcher, replicator, readiness, consumer, directory)
        index.task = asyncio.create_task(replicator.run(), name=f"replicator {entry.model_id}")
        index.task.add_done_callback(self._crashed)
        log.info("serving model", model_id=entry.model_id, topic=entry.vectors_topic)
        return index

    def _snapshot_dir(self, entry: ModelEntry) -> Path | None:
        root = self._s.snapshot_dir
        if root is None or entry.vectors_topic == self._s.vectors_topic:
            return root
        return root / "models" / entry.vectors_topic

    async def _retire(self, index: ModelIndex) -> None:
        await self._stop(index)
        await index.consumer.close()
        if index.snapshot_dir is not None and index.snapshot_dir != self._s.snapshot_dir:
            await asyncio.to_thread(shutil.rmtree, index.snapshot_dir, True)
        for gauge, extra in ((self._metrics.vectors, ()), (self._metrics.index_bytes, ()),
                             (self._metrics.segment_rows, ("growing",)),
                             (self._metrics.segment_rows, ("sealed",))):
            with contextlib.suppress(KeyError):
                gauge.remove(index.model_id, *extra)
        log.warning("retired model", model_id=index.model_id, vectors=len(index.store))

    @staticmethod
    async def _stop(index: ModelIndex) -> None:
        if index.task is not None:
            index.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await index.task

    def _crashed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("replicator crashed", loop=task.get_name(), error=repr(task.exception()))
            self._readiness.set_failed(f"{task.get_name()} crashed: {task.exception()!r}")

    def _sync_readiness(self) -> None:
        if not self._readiness.alive:
            return
        active = self.active
        if active is None:
            self._readiness.set_not_ready("reading the model registry")
        elif active.readiness.ready:
            self._readiness.set_ready()
        else:
            self._readiness.set_not_ready(f"model {active.model_id}: {active.readiness.reason}")
