"""The router's search core: a query in, a typed `SearchAnswer` out, under one deadline.

Encode the query (text through the cache and batcher, pictures directly; a lexical query needs
no vector), fan out to the current fleet with what is left of the budget, merge the complete
hits, collapse duplicate pictures, cut the page, sum the facet counts. The HTTP handlers
(services/router/app.py) only decode, call and encode. Covered by tests/router/test_api.py,
tests/router/test_collapse.py and the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import structlog

from proto.search import MAX_K, SearchRequest, SearchResponse
from proto.storefront import Coverage, FacetValue, Hit, SearchAnswer
from proto.vectors import ProductFields
from services.router.encoding import QueryEncoder
from services.router.fanout import fan_out
from services.router.fleet import FleetSwitch
from services.router.merge import Merged, merge_topk
from services.router.metrics import RouterMetrics
from services.router.models import RouterModels
from services.router.query import Query
from services.router.settings import RouterSettings
from vitrine.errors import InvalidMessage, InvalidQuery

log = structlog.get_logger()

COLLAPSE_FETCH = 3  # collapsing asks the shards for this many times the page's depth


class SearchCore:
    """A query in, a typed answer out, under one deadline."""

    def __init__(
        self,
        models: RouterModels,
        shards: aiohttp.ClientSession,
        fleets: FleetSwitch,
        metrics: RouterMetrics,
        settings: RouterSettings,
    ) -> None:
        self._models = models
        self._shards = shards
        self._fleets = fleets
        self._metrics = metrics
        self._settings = settings

    async def answer(
        self, query: Query, budget_ms: float, request_id: str, started: float
    ) -> SearchAnswer:
        """Encoding spends from the budget (which began at `started`, a time.monotonic()
        instant) and the shards get what is left."""
        metrics = self._metrics
        deadline = started + budget_ms / 1000
        encoder = self._models.encoder_for(query.model)
        model_id = encoder.model.model_id
        with metrics.stage_seconds.labels("encode").time():
            vector = await self._encode(query, encoder)
        encoded = time.monotonic()
        fleet = self._fleets.current  # one fleet per answer: a re-shard never splits a query
        sizes = fleet.sizes
        if encoded >= deadline:  # nothing left to give the shards: say whose time it was
            metrics.encode_overruns.inc()
            metrics.queries.labels(query.kind, "false", model_id).inc()
            spent = (encoded - started) * 1000
            reason = (f"query encoding took {spent:.0f} ms of the {budget_ms:g} ms budget: "
                      "no time was left to ask the shards")
            return SearchAnswer(
                results=[], partial=True, missing_shards=[], partial_reason=reason,
                coverage=coverage(0, fleet.num_shards, 0, sizes), mode=query.mode,
                offset=query.offset, next_offset=None, model_id=model_id,
                took_ms=round(spent, 3),
            )
        depth = query.offset + query.k
        # one more than the page: whether a next page exists
        fetch = min(MAX_K, depth * COLLAPSE_FETCH if query.collapse else depth + 1)
        shard_query = self._shard_request(
            query, vector, fetch, deadline - encoded, request_id, model_id
        )
        with metrics.stage_seconds.labels("fanout").time():
            fanned = await fan_out(self._shards, fleet.replicas, shard_query, deadline, metrics)
        with metrics.stage_seconds.labels("merge").time():
            merged = exact_picture_first(merge_topk(fanned.responses, fetch), query.image_digest)
            ranked = collapse(merged, self._settings.collapse_cosine) if query.collapse \
                else [Group(hit) for hit in merged]
            page = [_hit(group) for group in ranked[query.offset: depth]]
        for shard in fanned.missing:
            metrics.shard_failures.labels(str(shard)).inc()
        sizes.update({r.shard_id: r.searched for r in fanned.responses})
        searched = sum(r.searched for r in fanned.responses)
        partial = bool(fanned.missing)
        metrics.queries.labels(query.kind, str(not partial).lower(), model_id).inc()
        return SearchAnswer(
            results=page,
            partial=partial,
            missing_shards=sorted(fanned.missing),
            partial_reason="; ".join(
                f"shard {shard}: {why}" for shard, why in sorted(fanned.missing.items())
            ) or None,
            coverage=coverage(len(fanned.responses), fleet.num_shards, searched, sizes),
            mode=query.mode,
            offset=query.offset,
            next_offset=depth if len(ranked) > depth and depth <= self._settings.max_offset
            else None,
            facets=merge_facets(fanned.responses) if query.facets else {},
            facet_candidates=sum(sum(r.facet_candidates) for r in fanned.responses),
            model_id=model_id,
            took_ms=round((time.monotonic() - started) * 1000, 3),
        )

    def _shard_request(
        self, query: Query, vector: np.ndarray, fetch: int, left_s: float, request_id: str,
        model_id: str,
    ) -> SearchRequest:
        return SearchRequest.build(
            vector, fetch, left_s * 1000, request_id, query.filters,
            model_id=model_id, mode=query.mode,
            texts=[query.text] if query.mode != "dense" and query.text is not None else [],
            price_min=query.price_min, price_max=query.price_max, in_stock=query.in_stock,
            facets=query.facets,
            facet_candidates=self._settings.facet_candidates if query.facets else 0,
            with_vectors=query.collapse,
        )

    @staticmethod
    async def _encode(query: Query, encoder: QueryEncoder) -> np.ndarray:
        """The query as a (1, dim) matrix: text through the cache and batcher, images
        directly; a lexical query needs no vector (the shards ignore it)."""
        if query.mode == "lexical":
            return np.zeros((1, encoder.model.dim), dtype=np.float32)
        if query.text is not None:
            return (await encoder.encode_text(query.text))[np.newaxis]
        assert query.image is not None
        model = encoder.model
        try:  # any aspect ratio the encoder accepts; whatever else the picture holds is its fault
            pixels = await asyncio.to_thread(model.preprocess_image, query.image)
        except Exception as exc:
            raise InvalidQuery(f"image_b64 cannot be prepared for the model: {exc}") from exc
        return await asyncio.to_thread(model.encode_pixels, [pixels])


@dataclass
class Group:
    """One result: the best hit of a picture, and the products that show it too."""

    best: Merged
    also: list[str] = field(default_factory=list)

    def fields(self) -> ProductFields:
        """Decoded only for the results an answer shows."""
        try:
            return ProductFields.unpack(self.best.fields)
        except InvalidMessage as exc:  # a shard's bug: the hit still counts, without fields
            log.warning("unreadable product fields", product_id=self.best.product_id,
                        reason=str(exc))
            return ProductFields()


def exact_picture_first(hits: list[Merged], digest: str) -> list[Merged]:
    """An image query whose bytes are a product's own picture ranks that product first (the
    products sharing the file next), whatever the fused vectors of look-alikes score: a
    shopper who uploads a catalog photo means that product. The rest keep their order."""
    if not digest:
        return hits
    exact: list[Merged] = []
    rest: list[Merged] = []
    for hit in hits:
        (exact if ProductFields.digest_of(hit.fields) == digest else rest).append(hit)
    return exact + rest


def collapse(hits: Sequence[Merged], cosine: float) -> list[Group]:
    """Best first, each hit joins the first better one with the same picture digest or a
    vector at least `cosine` close; the rest are results. Across shards, since the hits are
    merged already. The closeness of every pair is one matrix product."""
    closeness, has_vector = _closeness([hit.vector for hit in hits])
    groups: list[Group] = []
    group_of: list[int] = []  # hit -> the group it went to
    by_digest: dict[str, int] = {}
    leaders: list[int] = []  # the hits that lead a group and have a vector
    for i, hit in enumerate(hits):
        digest = ProductFields.digest_of(hit.fields)
        twin = by_digest.get(digest) if digest else None
        if twin is None and has_vector[i] and leaders:
            near = closeness[i, leaders]
            best = int(np.argmax(near))  # the first of equals, as the hits are ranked
            if near[best] >= cosine:
                twin = group_of[leaders[best]]
        if twin is not None:
            groups[twin].also.append(hit.product_id)
            group_of.append(twin)
            continue
        group_of.append(len(groups))
        groups.append(Group(hit))
        if digest:
            by_digest[digest] = group_of[i]
        if has_vector[i]:
            leaders.append(i)
    return groups


def _closeness(vectors: Sequence[np.ndarray | None]) -> tuple[np.ndarray, list[bool]]:
    """Pairwise cosine of the hits' vectors (0 where one has none, another size, or zeros)."""
    lengths = [0 if v is None else len(v) for v in vectors]
    sizes = Counter(n for n in lengths if n)
    if not sizes:
        return np.zeros((len(vectors), len(vectors)), np.float32), [False] * len(vectors)
    dim = sizes.most_common(1)[0][0]
    rows = [i for i, n in enumerate(lengths) if n == dim]
    matrix = np.zeros((len(vectors), dim), dtype=np.float32)
    matrix[rows] = np.stack([vectors[i] for i in rows])  # type: ignore[misc]
    norms = np.linalg.norm(matrix, axis=1)
    matrix /= np.maximum(norms, 1e-12)[:, np.newaxis]
    return matrix @ matrix.T, (norms > 0).tolist()


def merge_facets(responses: Sequence[SearchResponse]) -> dict[str, list[FacetValue]]:
    """The shards' facet counts summed; a value counts case-insensitively and shows as most
    often spelled; most frequent first, then alphabetical."""
    counts: dict[str, Counter[str]] = {}
    spellings: dict[str, dict[str, Counter[str]]] = {}
    for response in responses:
        for facets in response.facets[:1]:  # the router asks one query per request
            for name, values in facets.items():
                for value, count in values.items():
                    key = value.strip().casefold()
                    counts.setdefault(name, Counter())[key] += count
                    spellings.setdefault(name, {}).setdefault(key, Counter())[value] += count
    return {
        name: [
            FacetValue(value=spellings[name][key].most_common(1)[0][0], count=count)
            for key, count in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        for name, values in counts.items()
    }


def _hit(group: Group) -> Hit:
    fields, best = group.fields(), group.best
    return Hit(
        product_id=best.product_id, score=round(best.score, 6), title=fields.title,
        image_uri=fields.image_uri, attributes=fields.attributes, price=fields.price,
        in_stock=fields.in_stock, also=group.also,
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
