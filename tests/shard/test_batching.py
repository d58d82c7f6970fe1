"""Concurrent searches share one index call and each gets exactly its own answer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from proto.vectors import VectorRecord
from services.shard.batching import QueryBatcher
from services.shard.store import ShardStore
from vitrine.errors import InvalidQuery


def store_of(n: int = 200) -> tuple[ShardStore, np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    store = ShardStore(filter_fields=["colour"])
    for i, v in enumerate(vectors):
        colour = {"colour": "red" if i % 2 else "blue"}
        store.apply(VectorRecord.upsert(f"p{i}", 1, "m", v, attributes=colour))
    return store, vectors


def test_concurrent_requests_share_a_call_and_get_their_own_k() -> None:
    store, vectors = store_of()
    calls: list[int] = []
    batcher = QueryBatcher(store.search, on_batch=lambda n, _s: calls.append(n))

    async def together() -> list:
        return await asyncio.gather(
            batcher.search(vectors[[0]], 3),
            batcher.search(vectors[[1, 2]], 5),
            batcher.search(vectors[[3]], 1),
            batcher.search(vectors[[4]], 4, {"colour": ["red"]}),
        )

    answers = asyncio.run(together())
    assert sorted(calls) == [1, 4]  # the filtered one runs apart from the other three
    assert answers[0] == store.search(vectors[[0]], 3)
    assert answers[1] == store.search(vectors[[1, 2]], 5)
    assert answers[2] == store.search(vectors[[3]], 1)
    assert answers[3] == store.search(vectors[[4]], 4, {"colour": ["red"]})


def test_a_batch_is_split_at_max_rows() -> None:
    store, vectors = store_of()
    calls: list[int] = []
    batcher = QueryBatcher(store.search, max_rows=4, on_batch=lambda n, _s: calls.append(n))

    async def together() -> list:
        return await asyncio.gather(*(batcher.search(vectors[[i, i + 1]], 2) for i in range(5)))

    answers = asyncio.run(together())
    assert calls == [4, 4, 2]
    assert answers[4] == store.search(vectors[[4, 5]], 2)


def test_an_error_reaches_only_the_requests_of_its_call() -> None:
    store, vectors = store_of()
    batcher = QueryBatcher(store.search)

    async def together() -> list:
        return await asyncio.gather(
            batcher.search(vectors[[0]], 2, {"brand": ["x"]}),
            batcher.search(vectors[[0]], 2),
            return_exceptions=True,
        )

    bad, good = asyncio.run(together())
    assert isinstance(bad, InvalidQuery)
    assert good == store.search(vectors[[0]], 2)


def test_queries_of_another_dimension_do_not_spoil_a_batch() -> None:
    store, vectors = store_of()
    batcher = QueryBatcher(store.search)

    async def together() -> list:
        return await asyncio.gather(
            batcher.search(np.ones((1, 4), dtype=np.float32), 2),
            batcher.search(vectors[[0]], 2),
            return_exceptions=True,
        )

    bad, good = asyncio.run(together())
    assert isinstance(bad, Exception) and "dim" in str(bad)
    assert good == store.search(vectors[[0]], 2)
    with pytest.raises(Exception, match="dim"):
        store.search(np.ones((1, 4), dtype=np.float32), 2)
