"""The router's search core: a query in, a typed `SearchAnswer` out, under one deadline.

Encode the query (text through the cache and batcher, pictures directly), fan out to the
current fleet with what is left of the budget, merge the complete hits. The HTTP handlers
(services/router/app.py) only decode, call and encode. Covered by tests/router/test_api.py
and the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import structlog

from proto.search import SearchRequest
from proto.storefront import Coverage, Hit, SearchAnswer
from proto.vectors import ProductFields
from services.router.encoding import QueryEncoder
from services.router.fanout import fan_out
from services.router.fleet import FleetSwitch
from services.router.merge import Merged, merge_topk
from services.router.metrics import RouterMetrics
from services.router.query import Query
from vitrine.errors import InvalidMessage, InvalidQuery

log = structlog.get_logger()


class SearchCore:
    """A query in, a typed answer out, under one deadline."""

    def __init__(
        self,
        encoder: QueryEncoder,
        shards: aiohttp.ClientSession,
        fleets: FleetSwitch,
        metrics: RouterMetrics,
    ) -> None:
        self._encoder = encoder
        self._shards = shards
        self._fleets = fleets
        self._metrics = metrics

    async def answer(
        self, query: Query, budget_ms: float, request_id: str, started: float
    ) -> SearchAnswer:
        """Encoding spends from the budget (which began at `started`, a time.monotonic()
        instant) and the shards get what is left."""
        metrics = self._metrics
        deadline = started + budget_ms / 1000
        with metrics.stage_seconds.labels("encode").time():
            vector = await _encode(self._encoder, query)
        encoded = time.monotonic()
        fleet = self._fleets.current  # one fleet per answer: a re-shard never splits a query
        sizes = fleet.sizes
        if encoded >= deadline:  # nothing left to give the shards: say whose time it was
            metrics.encode_overruns.inc()
            metrics.queries.labels(query.kind, "false").inc()
            spent = (encoded - started) * 1000
            reason = (f"query encoding took {spent:.0f} ms of the {budget_ms:g} ms budget: "
                      "no time was left to ask the shards")
            return SearchAnswer(
                results=[], partial=True, missing_shards=[], partial_reason=reason,
                coverage=coverage(0, fleet.num_shards, 0, sizes),
                took_ms=round(spent, 3),
            )
        shard_query = SearchRequest.build(
            vector, query.k, (deadline - encoded) * 1000, request_id, query.filters
        )
        with metrics.stage_seconds.labels("fanout").time():
            fanned = await fan_out(self._shards, fleet.replicas, shard_query, deadline, metrics)
        with metrics.stage_seconds.labels("merge").time():
            hits = [_hit(merged) for merged in merge_topk(fanned.responses, query.k)]
        for shard in fanned.missing:
            metrics.shard_failures.labels(str(shard)).inc()
        sizes.update({r.shard_id: r.searched for r in fanned.responses})
        searched = sum(r.searched for r in fanned.responses)
        partial = bool(fanned.missing)
        metrics.queries.labels(query.kind, str(not partial).lower()).inc()
        return SearchAnswer(
            results=hits,
            partial=partial,
            missing_shards=sorted(fanned.missing),
            partial_reason="; ".join(
                f"shard {shard}: {why}" for shard, why in sorted(fanned.missing.items())
            ) or None,
            coverage=coverage(len(fanned.responses), fleet.num_shards, searched, sizes),
            took_ms=round((time.monotonic() - started) * 1000, 3),
        )


def _hit(merged: Merged) -> Hit:
    try:
        fields = ProductFields.unpack(merged.fields)
    except InvalidMessage as exc:  # a shard's bug: the hit still counts, without its fields
        log.warning("unreadable product fields", product_id=merged.product_id, reason=str(exc))
        fields = ProductFields()
    return Hit(
        product_id=merged.product_id, score=round(merged.score, 6), title=fields.title,
        image_uri=fields.image_uri, attributes=fields.attributes,
    )


def coverage(answered: int, shards: int, searched: int, sizes: dict[int, int]) -> Coverage:
    """How much of the catalog this answer looked at. A missing shard counts with the size it
    last reported (0 if it never answered)."""
    total = max(searched, sum(sizes.values()))
    return Coverage(
        shards_answered=answered,
        shards_total=shards,
        vectors_searched=searched,
        vectors_total=total,
        ratio=round(searched / total, 6) if total else float(answered == shards),
    )


async def _encode(encoder: QueryEncoder, query: Query) -> np.ndarray:
    """The query as a (1, dim) matrix: text through the cache and batcher, images directly."""
    if query.text is not None:
        return (await encoder.encode_text(query.text))[np.newaxis]
    assert query.image is not None
    model = encoder.model
    try:  # any aspect ratio the encoder accepts; whatever else the picture holds is its fault
        pixels = await asyncio.to_thread(model.preprocess_image, query.image)
    except Exception as exc:
        raise InvalidQuery(f"image_b64 cannot be prepared for the model: {exc}") from exc
    return await asyncio.to_thread(model.encode_pixels, [pixels])
