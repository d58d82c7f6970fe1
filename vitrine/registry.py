"""The model registry on `catalog.models` (proto/models.py): read, followed, changed.

Shards, routers and encoders follow the topic from its start and keep its newest revision;
`vitrine model ...` changes it with one write. An empty topic is a stack that never changed
models: the settings' own model on the settings' vector topic, which is how the release
before this one ran, so its logs and snapshots keep serving unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from proto.models import REGISTRY_KEY, ModelEntry, ModelRegistry, candidate_topic
from proto.stats import ShardStats
from vitrine.errors import InvalidMessage, VitrineError
from vitrine.kafka import AsyncConsumer, TopicSpec, consumer_config, ensure_topics, producer_config
from vitrine.settings import CommonSettings

log = structlog.get_logger()

Changed = Callable[[ModelRegistry], Awaitable[None]]


def settings_entry(settings: CommonSettings) -> ModelEntry:
    """The model the settings name, on the settings' vector topic: revision 0's only model."""
    return ModelEntry(
        model_id=model_id_of(settings.model_arch, settings.model_weights or None,
                             settings.model_seed, settings.text_runtime),
        architecture=settings.model_arch, weights=settings.model_weights or None,
        seed=settings.model_seed, text_runtime=settings.text_runtime,
        vectors_topic=settings.vectors_topic,
    )


def candidate_entry(
    settings: CommonSettings, registry: ModelRegistry, architecture: str, weights: str | None,
    seed: int = 0, text_runtime: str = "auto",
) -> ModelEntry:
    """A new model with a vector topic of its own, backfilled from the active model's."""
    model_id = model_id_of(architecture, weights, seed, text_runtime)
    return ModelEntry.model_validate({
        "model_id": model_id, "architecture": architecture, "weights": weights, "seed": seed,
        "text_runtime": text_runtime,
        "vectors_topic": candidate_topic(settings.vectors_topic, model_id),
        "added_ms": int(time.time() * 1000),
        "backfill_from": registry.active_entry.vectors_topic,
    })


def model_id_of(architecture: str, weights: str | None, seed: int, text_runtime: str) -> str:
    """The id `load_dual_encoder` gives this model (the spec's, plus a lossy text runtime)."""
    from vitrine.model.spec import ModelSpec, runtime_model_id

    return runtime_model_id(ModelSpec(architecture, weights, seed).model_id, text_runtime)


def encoder_env(entry: ModelEntry, settings_topic: str) -> dict[str, str]:
    """The settings that make an encoder encode this entry's model into its own topic (and
    backfill it), in its own consumer group."""
    env = {
        "VITRINE_MODEL_ARCH": entry.architecture, "VITRINE_MODEL_WEIGHTS": entry.weights or "",
        "VITRINE_MODEL_SEED": str(entry.seed), "VITRINE_TEXT_RUNTIME": entry.text_runtime,
        "VITRINE_VECTORS_TOPIC": entry.vectors_topic,
        "VITRINE_GROUP_ID": encoder_group(entry.vectors_topic, settings_topic),
    }
    if entry.backfill_from:
        env["VITRINE_BACKFILL_FROM"] = entry.backfill_from
        env["VITRINE_EVENTS_FROM_GROUP"] = encoder_group(entry.backfill_from, settings_topic)
    return env


def encoder_group(vectors_topic: str, settings_topic: str) -> str:
    """The consumer group of the encoders writing `vectors_topic`: the settings' own group for
    the settings' topic, else one per topic."""
    return "vitrine-encoder" if vectors_topic == settings_topic else \
        f"vitrine-encoder.{vectors_topic}"


@dataclass(frozen=True)
class IndexCoverage:
    """How much of the catalog one model's indexes hold over a fleet, from the shards' /stats:
    what a promotion (`vitrine model promote`) and a canary (the router) wait for."""

    model_id: str
    vectors: int  # live products over the shards
    catalog: int  # the active model's live products over the shards
    shards_caught_up: int  # shards whose index of it is ready with no lag
    shards: int

    @classmethod
    def of(cls, stats: Sequence[ShardStats | None], model_id: str, active: str) -> IndexCoverage:
        """`stats`: one per shard of the fleet (None: it did not answer)."""
        def held(shard: ShardStats | None, model: str) -> tuple[int, bool]:
            index = shard.models.get(model) if shard is not None else None
            if index is None:
                return 0, False
            return index.vectors, index.ready and index.total_lag == 0

        per_shard = [held(shard, model_id) for shard in stats]
        return cls(model_id, sum(n for n, _ in per_shard),
                   sum(held(shard, active)[0] for shard in stats),
                   sum(ok for _, ok in per_shard), len(stats))

    @property
    def ratio(self) -> float:
        return self.vectors / self.catalog if self.catalog else float(self.vectors == 0)

    def problems(self) -> list[str]:
        """Why this model's indexes do not cover the catalog yet ([]: they do)."""
        found = []
        if self.shards_caught_up < self.shards:
            found.append(f"{self.shards - self.shards_caught_up} of {self.shards} shards have "
                         "not caught up on its vectors")
        if self.vectors < self.catalog:
            found.append(f"it holds {self.vectors:,} of the catalog's {self.catalog:,} products")
        return found


def vector_topic_spec(settings: CommonSettings, topic: str) -> TopicSpec:
    return TopicSpec(topic, settings.vector_partitions, {"cleanup.policy": "compact"})


class RegistryFollower:
    """Keeps the newest registry revision of `catalog.models`, calling `on_change` with each.

    `loaded` is set once the topic has been read to its end the first time: before that a
    service does not know which models it serves and must not say it is ready.
    """

    def __init__(self, settings: CommonSettings, on_change: Changed | None = None) -> None:
        self._settings = settings
        self._on_change = on_change
        self.current = ModelRegistry.initial(settings_entry(settings))
        self.loaded = asyncio.Event()

    async def run(self) -> None:
        settings = self._settings
        await asyncio.to_thread(ensure_topics, settings.kafka_bootstrap, settings.topics())
        consumer = AsyncConsumer(Consumer(consumer_config(
            settings.kafka_bootstrap, "vitrine-registry-reader", **{"enable.partition.eof": True}
        )))
        try:
            await consumer.call(consumer.consumer.assign,
                                [TopicPartition(settings.models_topic, 0, OFFSET_BEGINNING)])
            while True:
                changed = False
                for message in await consumer.next_batch(100, 0.05, 0.5):
                    error = message.error()
                    if error is None:
                        changed |= self._read(message.value() or b"")
                    elif error.code() == KafkaError._PARTITION_EOF:
                        changed |= not self.loaded.is_set()  # the first answer: the newest
                        self.loaded.set()
                    else:
                        log.warning("model registry consumer error", error=str(error))
                if changed and self.loaded.is_set() and self._on_change is not None:
                    await self._on_change(self.current)
        finally:
            await consumer.close()

    def _read(self, data: bytes) -> bool:
        """Whether `data` is a newer revision (then it is `current`)."""
        try:
            registry = ModelRegistry.from_wire(data)
        except InvalidMessage as exc:  # a bad write must not take the fleet down: keep ours
            log.error("unreadable model registry record", reason=str(exc))
            return False
        if registry.revision <= self.current.revision:
            return False
        self.current = registry
        log.info("model registry", revision=registry.revision, active=registry.active,
                 models=[m.model_id for m in registry.models])
        return True


def read_registry(settings: CommonSettings, timeout_s: float = 30.0) -> ModelRegistry:
    """The newest revision, read synchronously (the CLI)."""
    ensure_topics(settings.kafka_bootstrap, settings.topics())
    consumer = Consumer(consumer_config(
        settings.kafka_bootstrap, "vitrine-registry-cli", **{"enable.partition.eof": True}
    ))
    current = ModelRegistry.initial(settings_entry(settings))
    try:
        consumer.assign([TopicPartition(settings.models_topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                return current
            if error is not None:
                raise VitrineError(f"reading {settings.models_topic}: {error}")
            try:
                found = ModelRegistry.from_wire(message.value() or b"")
            except InvalidMessage as exc:
                log.error("unreadable model registry record", reason=str(exc))
                continue
            if found.revision > current.revision:
                current = found
        raise VitrineError(f"{settings.models_topic} could not be read within {timeout_s:g} s")
    finally:
        consumer.close()


def change_registry(
    settings: CommonSettings, change: Callable[[ModelRegistry], ModelRegistry]
) -> ModelRegistry:
    """Read, change, write, read back: the write counts only if it is what readers now see
    (two changes at once: one wins, the other is told)."""
    before = read_registry(settings)
    after = change(before)
    for entry in after.models:
        ensure_topics(settings.kafka_bootstrap, [vector_topic_spec(settings, entry.vectors_topic)])
    producer = Producer(producer_config(settings.kafka_bootstrap))
    failures: list[str] = []
    producer.produce(
        settings.models_topic, key=REGISTRY_KEY, value=after.to_wire(),
        on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
    )
    if producer.flush(30) or failures:
        raise VitrineError(f"the registry change was not written: {failures or 'timed out'}")
    seen = read_registry(settings)
    if seen != after:
        raise VitrineError(f"another change won (revision {seen.revision}); nothing of this "
                           "one applies: look at `vitrine model status` and try again")
    return after
