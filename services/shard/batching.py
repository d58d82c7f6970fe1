"""One index call for the /search requests that reach the shard together.

A GPU scan costs about the same for 1 query as for 64 (it is bound by reading the vectors),
and FAISS on the CPU also amortises its passes over a batch. Each request parks its queries
here; a flush scheduled with `call_soon` runs after every request already readable on this
loop iteration has parked, so batching adds no waiting. Requests batch together only when they
share dim and filters; each gets its own k back (and the hits' vectors if any asked).
Covered by tests/shard/test_batching.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.shard.attributes import RowFilter
from services.shard.store import Hits

SearchFn = Callable[[np.ndarray, int, RowFilter | None, bool], Hits]


@dataclass
class _Parked:
    queries: np.ndarray
    k: int
    with_vectors: bool
    future: asyncio.Future[Hits]


class QueryBatcher:
    def __init__(
        self,
        search: SearchFn,
        max_rows: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._search = search
        self._max_rows = max_rows
        self._on_batch = on_batch  # (queries in the call, seconds it took)
        self._parked: dict[tuple[int, tuple[object, ...]], list[_Parked]] = {}
        self._filters: dict[tuple[int, tuple[object, ...]], RowFilter | None] = {}
        self._flush_scheduled = False

    async def search(
        self, queries: np.ndarray, k: int,
        filters: RowFilter | Mapping[str, Sequence[str]] | None = None,
        with_vectors: bool = False,
    ) -> Hits:
        loop = asyncio.get_running_loop()
        if filters is not None and not isinstance(filters, RowFilter):
            filters = RowFilter(attributes=filters)
        key = (queries.shape[1], filters.key() if filters else ())
        parked = _Parked(queries, k, with_vectors, loop.create_future())
        self._parked.setdefault(key, []).append(parked)
        self._filters[key] = filters or None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await parked.future

    def _flush(self) -> None:
        self._flush_scheduled = False
        parked, self._parked = self._parked, {}
        filters, self._filters = self._filters, {}
        for key, group in parked.items():
            for batch in self._batches(group):
                self._run(batch, filters[key])

    def _batches(self, group: list[_Parked]) -> list[list[_Parked]]:
        batches: list[list[_Parked]] = [[]]
        rows = 0
        for item in group:
            if batches[-1] and rows + len(item.queries) > self._max_rows:
                batches.append([])
                rows = 0
            batches[-1].append(item)
            rows += len(item.queries)
        return batches

    def _run(self, batch: list[_Parked], filters: RowFilter | None) -> None:
        live = [item for item in batch if not item.future.done()]  # a cancelled request
        if not live:
            return
        queries = np.concatenate([item.queries for item in live])
        started = asyncio.get_running_loop().time()
        try:
            hits = self._search(queries, max(item.k for item in live), filters,
                                any(item.with_vectors for item in live))
        except Exception as exc:  # the same error for every request of the batch
            for item in live:
                item.future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(len(queries), asyncio.get_running_loop().time() - started)
        start = 0
        for item in live:
            stop = start + len(item.queries)
            item.future.set_result(hits.head(item.k, start, stop))
            start = stop
