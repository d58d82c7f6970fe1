"""Text queries to vectors: an in-process LRU, then Redis, then a micro-batched text tower.

Cache keys are the exact normalised query text (`services.router.query` collapses whitespace).
Case is kept even for uncased towers: open_clip's HF tokenizer runs ftfy and html.unescape
before the tokenizer lowercases, so "&NotEqual;" and "&notequal;" embed differently.
Redis is shared by every router replica and is only ever an optimisation: an error or a slow
answer is logged, counted and treated as a miss. Images are not cached.

Text queries that miss both layers are coalesced: the first opens a batch; an idle tower runs
it after `encode_batch_wait_ms` (default 0: on the next turn of the event loop, so the
requests already read join it, and a lone query waits for nothing), and while a pass runs the
batch keeps filling until that pass ends; `encode_batch_max` distinct texts close it at once.
One `encode_texts` call in a worker thread per batch; identical texts in flight share one row.
One pass runs at a time, so concurrent batches do not fight over the cores.

Covered by tests/router/test_encoding.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from services.router.metrics import EncodingMetrics
from services.router.settings import RouterSettings
from vitrine.model import DualEncoder

log = structlog.get_logger()

KEY_PREFIX = "vitrine:qvec:"
_REDIS_FAILURES = (RedisError, OSError, TimeoutError)


def cache_key(model_id: str, text: str) -> str:
    """The Redis key of a text query's vector under one model."""
    return f"{KEY_PREFIX}{model_id}:{hashlib.sha256(text.encode()).hexdigest()}"


class QueryEncoder:
    """Encodes storefront text queries through the cache layers and the batcher."""

    def __init__(
        self,
        model: DualEncoder,
        redis: aioredis.Redis | None,
        settings: RouterSettings,
        metrics: EncodingMetrics,
    ) -> None:
        self.model = model
        self._redis = redis if settings.query_cache_ttl_s > 0 else None
        self._ttl_s = settings.query_cache_ttl_s
        self._timeout_s = settings.query_cache_timeout_ms / 1000
        self._metrics = metrics
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._max_entries = settings.query_cache_entries
        self._batcher = TextBatcher(
            self._run_tower, settings.encode_batch_wait_ms / 1000, settings.encode_batch_max
        )
        self._writes: set[asyncio.Task[None]] = set()

    async def encode_text(self, text: str) -> np.ndarray:
        """The L2-normalised float32 vector (dim,) of one normalised query text."""
        vector = self._memory_get(text)
        if vector is None:
            vector = await self._redis_get(text)
            if vector is None:
                vector = await self._batcher.encode(text)
                self._redis_set_later(text, vector)
            self._memory_put(text, vector)
        return vector

    async def flush(self) -> None:
        """Wait for the Redis writes still under way."""
        if self._writes:
            await asyncio.gather(*self._writes)

    async def aclose(self) -> None:
        await self.flush()
        await self._batcher.aclose()

    def _run_tower(self, texts: Sequence[str]) -> np.ndarray:  # in a worker thread
        self._metrics.tower_runs.inc()
        self._metrics.batch_size.observe(len(texts))
        with self._metrics.tower_seconds.time():
            return self.model.encode_texts(texts)

    # --- in-process LRU ----------------------------------------------------------------------

    def _memory_get(self, text: str) -> np.ndarray | None:
        vector = self._memory.get(text)
        self._metrics.cache.labels("memory", "miss" if vector is None else "hit").inc()
        if vector is not None:
            self._memory.move_to_end(text)
        return vector

    def _memory_put(self, text: str, vector: np.ndarray) -> None:
        if self._max_entries == 0:
            return
        self._memory[text] = vector
        self._memory.move_to_end(text)
        while len(self._memory) > self._max_entries:
            self._memory.popitem(last=False)

    # --- Redis, shared by the replicas -------------------------------------------------------

    async def _redis_get(self, text: str) -> np.ndarray | None:
        if self._redis is None:
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                data = await self._redis.get(cache_key(self.model.model_id, text))
        except _REDIS_FAILURES as exc:
            self._redis_failed("get", exc)
            return None
        vector = _decode(data, self.model.dim)
        self._metrics.cache.labels("redis", "miss" if vector is None else "hit").inc()
        return vector

    def _redis_set_later(self, text: str, vector: np.ndarray) -> None:
        """Store without holding up the query; `flush` waits for it."""
        if self._redis is None:
            return
        task = asyncio.create_task(self._redis_set(text, vector))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _redis_set(self, text: str, vector: np.ndarray) -> None:
        assert self._redis is not None
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.set(
                    cache_key(self.model.model_id, text), vector.tobytes(), ex=self._ttl_s
                )
        except _REDIS_FAILURES as exc:
            self._redis_failed("set", exc)

    def _redis_failed(self, op: str, exc: BaseException) -> None:
        self._metrics.cache_errors.labels(op).inc()
        log.warning("query cache unavailable", op=op, error=repr(exc))


class TextBatcher:
    """Coalesces concurrent texts into one call of `run` (texts -> one row each) in a thread."""

    def __init__(
        self, run: Callable[[Sequence[str]], np.ndarray], wait_s: float, max_size: int
    ) -> None:
        self._run = run
        self._wait_s = wait_s
        self._max_size = max_size
        self._open: dict[str, asyncio.Future[np.ndarray]] = {}  # the batch still filling
        self._in_flight: dict[str, asyncio.Future[np.ndarray]] = {}  # open or running
        self._timer: asyncio.Handle | None = None
        self._running = 0  # batches started and not finished
        self._tower = asyncio.Lock()
        self._batches: set[asyncio.Task[None]] = set()

    async def encode(self, text: str) -> np.ndarray:
        future = self._in_flight.get(text)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(_consume_exception)
            self._open[text] = self._in_flight[text] = future
            if len(self._open) >= self._max_size:
                self._close_batch()
            elif self._timer is None and not self._running:  # busy: the pass ending closes it
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._wait_s, self._close_batch) \
                    if self._wait_s > 0 else loop.call_soon(self._close_batch)
        return await asyncio.shield(future)  # a cancelled query leaves the batch running

    async def aclose(self) -> None:
        if self._timer is not None:
            self._close_batch()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    def _close_batch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._open = self._open, {}
        if not batch:
            return
        self._running += 1
        task = asyncio.create_task(self._encode_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _encode_batch(self, batch: dict[str, asyncio.Future[np.ndarray]]) -> None:
        texts = list(batch)
        try:
            async with self._tower:
                vectors = await asyncio.to_thread(self._run, texts)
        except Exception as exc:  # every waiter gets the error, none waits forever
            for future in batch.values():
                if not future.done():
                    future.set_exception(exc)
        else:
            for row, future in zip(vectors, batch.values(), strict=True):
                if not future.done():
                    future.set_result(_frozen(row.copy()))
        finally:
            for text in texts:
                self._in_flight.pop(text, None)
            self._running -= 1
            if self._open and self._timer is None:  # what queued during this pass goes next
                self._close_batch()


def _decode(data: bytes | str | None, dim: int) -> np.ndarray | None:
    """A cached vector, or None when absent or not a vector of this model's size."""
    if not isinstance(data, bytes) or len(data) != dim * 4:
        return None
    return np.frombuffer(data, dtype=np.float32)  # read-only, like every vector handed out


def _frozen(vector: np.ndarray) -> np.ndarray:
    vector.flags.writeable = False
    return vector


def _consume_exception(future: asyncio.Future[np.ndarray]) -> None:
    """Mark an error as seen when every waiter went away, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()
