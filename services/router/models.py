"""The models the router encodes queries with: every model the registry serves, each loaded
once with its own query encoder (and cache keys), the active one for queries that name none.

A query names a model with `model=<id>` or the `X-Vitrine-Model` header (offline comparison,
A/B); its vector then goes only to that model's indexes (the shard request names the model,
and an answer from another model's index is refused: services/router/fanout.py). A query that
names none goes to the active model, or, for a `canary_share` of them, to a candidate whose
indexes cover the catalog on every shard (read from the shards' /stats every
`canary_check_s`). The router is ready once it has read the registry and loaded its active
model; a candidate loads beside it, in a worker thread, while the active one serves.
Covered by tests/e2e/test_models.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import aiohttp
import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError

from proto.models import ModelEntry, ModelRegistry
from proto.stats import ShardStats
from services.router.encoding import QueryEncoder
from services.router.fleet import FleetSwitch
from services.router.metrics import EncodingMetrics
from services.router.settings import RouterSettings
from vitrine.errors import VitrineError
from vitrine.model import DualEncoder, ModelSpec, load_dual_encoder
from vitrine.registry import IndexCoverage
from vitrine.service import Readiness

log = structlog.get_logger()

MODEL_HEADER = "X-Vitrine-Model"


class UnknownModel(VitrineError):
    """A query names a model that is not served (never added, or retired)."""

    http_status = 404


class ModelLoading(VitrineError):
    """A query names a model that is served but still loading on this router."""

    http_status = 503


Loader = Callable[[ModelEntry], DualEncoder]


class RouterModels:
    """Model id -> its query encoder, changed only by the registry."""

    def __init__(
        self, settings: RouterSettings, redis: aioredis.Redis | None, metrics: EncodingMetrics,
        readiness: Readiness, loader: Loader | None = None,
    ) -> None:
        self._s = settings
        self._redis = redis
        self._metrics = metrics
        self._readiness = readiness
        self._load = loader or self._load_model
        self.encoders: dict[str, QueryEncoder] = {}
        self.failed: dict[str, str] = {}  # candidate -> why it did not load here
        self.registry: ModelRegistry | None = None
        self.covering: list[str] = []  # candidates whose indexes cover the catalog
        self.active_loaded = asyncio.Event()
        self._random = random.Random()

    @property
    def active(self) -> QueryEncoder | None:
        return self.encoders.get(self.registry.active) if self.registry else None

    def encoder_for(self, model_id: str | None) -> QueryEncoder:
        """The named model's encoder; None: the active model's."""
        registry = self.registry
        if registry is None:
            raise ModelLoading("the model registry is still being read")
        wanted = model_id or self._canary() or registry.active
        found = self.encoders.get(wanted)
        if found is not None:
            return found
        if wanted in self.failed:
            raise ModelLoading(f"model {wanted!r} failed to load on this router: "
                               f"{self.failed[wanted]}")
        if any(m.model_id == wanted for m in registry.models):
            raise ModelLoading(f"model {wanted!r} is still loading on this router")
        raise UnknownModel(f"no model {wanted[:300]!r} is served (served: {registry.served()})")

    async def apply(self, registry: ModelRegistry) -> None:
        """Load every new model (the active one first), let retired ones go."""
        self.registry = registry
        wanted = {m.model_id: m for m in registry.models}
        for model_id in [m for m in self.encoders if m not in wanted]:
            await self.encoders.pop(model_id).aclose()
            log.warning("retired model", model_id=model_id)
        order = sorted(wanted.values(), key=lambda m: m.model_id != registry.active)
        for entry in order:
            active = entry.model_id == registry.active
            if entry.model_id not in self.encoders:
                try:
                    model = await asyncio.to_thread(self._load, entry)
                except Exception as exc:  # the active model must load; a candidate may not
                    if active:
                        raise
                    self.failed[entry.model_id] = repr(exc)
                    log.error("candidate model failed to load", model_id=entry.model_id,
                              error=repr(exc))
                    continue
                self.failed.pop(entry.model_id, None)
                self.encoders[entry.model_id] = QueryEncoder(
                    model, self._redis, self._s, self._metrics
                )
                log.info("model loaded", model_id=model.model_id, active=active)
            if active:
                self.active_loaded.set()
                self._readiness.set_ready()

    async def aclose(self) -> None:
        for encoder in self.encoders.values():
            await encoder.aclose()

    def _canary(self) -> str | None:
        """A candidate for this query, by the canary share (None: the active model)."""
        share = self._s.canary_share
        if not share or not self.covering or self._random.random() >= share:
            return None
        rolling = {m.model_id for m in _rolling_forward(self.registry)}
        loaded = [m for m in self.covering if m in self.encoders and m in rolling]
        return loaded[-1] if loaded else None  # the newest candidate that covers

    async def watch_coverage(self, fleets: FleetSwitch, session: aiohttp.ClientSession) -> None:
        """Keep `covering` current: candidates every shard of the fleet holds in full."""
        timeout = aiohttp.ClientTimeout(total=self._s.canary_check_s)
        while True:
            registry = self.registry
            if registry is not None and _rolling_forward(registry):
                groups = fleets.current.replicas.groups
                stats = await asyncio.gather(*(_stats(session, g.replicas[0].url, timeout)
                                               for g in groups))
                covering = [m.model_id for m in _rolling_forward(registry)
                            if not IndexCoverage.of(stats, m.model_id, registry.active).problems()]
                if covering != self.covering:
                    log.info("candidates covering the catalog", models=covering,
                             canary_share=self._s.canary_share)
                self.covering = covering
            else:
                self.covering = []
            await asyncio.sleep(self._s.canary_check_s)

    def _load_model(self, entry: ModelEntry) -> DualEncoder:
        settings = self._s
        model = load_dual_encoder(
            ModelSpec(entry.architecture, entry.weights, entry.seed),
            precision=settings.model_precision, text_runtime=entry.text_runtime,
            compute_threads=settings.compute_threads,
        )
        if model.model_id != entry.model_id:  # the registry and this build disagree on the space
            raise VitrineError(f"the registry's model {entry.model_id!r} loads here as "
                               f"{model.model_id!r}: not served")
        model.warm_up()  # text and image queries: no cold first call
        return model


async def _stats(
    session: aiohttp.ClientSession, url: str, limit: aiohttp.ClientTimeout
) -> ShardStats | None:
    try:
        async with session.get(f"{url}/stats", timeout=limit) as response:
            if response.status != 200:
                return None
            return ShardStats.model_validate(await response.json())
    except (aiohttp.ClientError, TimeoutError, ValueError, ValidationError):
        return None


def _rolling_forward(registry: ModelRegistry | None) -> list[ModelEntry]:
    """The candidates a canary may try: never the model active before (after a promotion it is
    the fallback, after a rollback the model just rolled back)."""
    if registry is None:
        return []
    return [m for m in registry.candidates if m.model_id != registry.previous]
