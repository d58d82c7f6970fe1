"""Storefront-grade retrieval on the shared stack, through the router: price and stock filters
before the top-k, facets, pages, duplicate pictures collapsed across shards, and a brand word
that only lexical retrieval can see, in every mode."""

from __future__ import annotations

import base64
import itertools
import shutil
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from proto.catalog import CatalogEvent
from tests.conftest import stage_image
from tests.helpers import eventually, http_json
from vitrine.catalog import events_from_csv
from vitrine.cli.ingest import EventPublisher
from vitrine.cli.stack import LocalStack
from vitrine.kafka import partition_for

pytestmark = pytest.mark.stack

ROWS = (4700, 4760)  # rows of products.csv that no other test publishes
GROUP = "Retrievaltest"  # the usage of this module's products: a filter isolates them
MODES = ("dense", "lexical", "hybrid")


def search(router: str, **params: Any) -> dict[str, Any]:
    query = urllib.parse.urlencode({k: str(v).lower() if isinstance(v, bool) else v
                                    for k, v in params.items()})
    status, answer = http_json(f"{router}/search?{query}")
    assert status == 200, answer
    return answer


def ids(answer: dict[str, Any]) -> list[str]:
    return [hit["product_id"] for hit in answer["results"]]


@pytest.fixture(scope="module")
def catalog(stack: LocalStack, fashion_data: Path, image_root: Path) -> dict[str, Any]:
    """This module's products (priced, some out of stock, usage GROUP), three products that
    share one picture on both shards, and one whose title is only an unheard-of brand."""
    rows = list(itertools.islice(events_from_csv(fashion_data / "products.csv", image_root),
                                 *ROWS))
    products = []
    for i, event in enumerate(rows):
        stage_image(fashion_data, image_root, event.product_id)
        products.append(event.model_copy(update={
            "schema_version": 2, "price": float(10 * i), "in_stock": i % 3 != 0,
            "attributes": {**event.attributes, "usage": GROUP},
        }))
    brand = products[0].model_copy(update={"title": "Zorblax"})
    products[0] = brand
    picture = fashion_data / "images" / f"{rows[1].product_id}.jpg"
    twins = twin_ids(stack, 3)
    for n, pid in enumerate(twins):  # the same file under three ids, titled differently
        shutil.copyfile(picture, image_root / f"{pid}.jpg")
        products.append(CatalogEvent(
            schema_version=2, op="upsert", product_id=pid, version=1,
            image_uri=(image_root / f"{pid}.jpg").as_uri(), title=f"Twin listing {n}",
            attributes={"usage": "Twintest", "colour": "Black"}, price=1.0, in_stock=True,
        ))
    s = stack.settings
    publisher = EventPublisher(stack.kafka_bootstrap, s.events_topic, s.event_partitions)
    for event in products:
        publisher.publish(event)
    publisher.flush()
    mine = products[: len(rows)]
    for mode in ("dense", "lexical"):  # the lexical index refreshes a moment later
        eventually(lambda m=mode: len(ids(search(stack.router_url, q="retrievaltest",
                                                 usage=GROUP, k=100, mode=m,
                                                 collapse=False))) == len(mine),
                   what=f"this module's products indexed ({mode})")
    eventually(lambda: len(ids(search(stack.router_url, q="twin listing", usage="Twintest",
                                      mode="lexical", collapse=False))) == 3,
               what="the twins indexed")
    return {"products": mine, "twins": twins, "brand": brand, "picture": picture}


def twin_ids(stack: LocalStack, n: int) -> list[str]:
    """Ids that land on different shards (so collapse has to work across shards)."""
    s = stack.settings
    found: dict[int, list[str]] = {}
    for i in itertools.count():
        pid = f"twin-{i}"
        found.setdefault(partition_for(pid, s.vector_partitions) % s.num_shards, []).append(pid)
        if len(found) == s.num_shards and sum(map(len, found.values())) >= n:
            break
    picked = [pids[0] for pids in found.values()]
    rest = [pid for pids in found.values() for pid in pids[1:]]
    return (picked + rest)[:n]


@pytest.mark.parametrize("mode", MODES)
def test_price_and_stock_filters_apply_before_the_top_k(
    stack: LocalStack, catalog: dict[str, Any], mode: str
) -> None:
    wanted = {e.product_id for e in catalog["products"]
              if e.in_stock and 100 <= (e.price or 0) <= 400}
    answer = search(stack.router_url, q="retrievaltest", usage=GROUP, mode=mode,
                    price_min=100, price_max=400, in_stock=True, k=len(wanted), collapse=False)
    assert set(ids(answer)) == wanted  # k matches come back whenever k exist
    assert all(100 <= hit["price"] <= 400 and hit["in_stock"] for hit in answer["results"])


def test_facets_count_the_candidates(stack: LocalStack, catalog: dict[str, Any]) -> None:
    products = catalog["products"]
    answer = search(stack.router_url, q="retrievaltest", usage=GROUP, mode="dense",
                    facets="colour,article_type", k=5)
    assert answer["facet_candidates"] == len(products)  # fewer than the candidates per shard
    for facet in ("colour", "article_type"):
        expected = Counter(e.attributes[facet] for e in products if facet in e.attributes)
        counted = {v["value"]: v["count"] for v in answer["facets"][facet]}
        assert counted == dict(expected)
        counts = [v["count"] for v in answer["facets"][facet]]
        assert counts == sorted(counts, reverse=True)
    in_stock = search(stack.router_url, q="retrievaltest", usage=GROUP, mode="dense",
                      facets="colour", in_stock=True, k=5)
    assert in_stock["facet_candidates"] == sum(bool(e.in_stock) for e in products)


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_pages_neither_repeat_nor_skip_a_product(
    stack: LocalStack, catalog: dict[str, Any], mode: str
) -> None:
    router, total = stack.router_url, len(catalog["products"])
    whole = ids(search(router, q="red shirt", usage=GROUP, mode=mode, k=total, collapse=False))
    assert len(whole) == total
    pages, offset = [], 0
    while offset is not None:
        answer = search(router, q="red shirt", usage=GROUP, mode=mode, k=7, offset=offset,
                        collapse=False)
        assert answer["offset"] == offset
        pages.extend(ids(answer))
        offset = answer["next_offset"]
    assert pages == whole


def test_duplicate_pictures_collapse_into_one_result_across_shards(
    stack: LocalStack, catalog: dict[str, Any]
) -> None:
    twins = set(catalog["twins"])
    s = stack.settings
    assert len({partition_for(t, s.vector_partitions) % s.num_shards for t in twins}) > 1
    picture = base64.b64encode(catalog["picture"].read_bytes()).decode()
    status, answer = http_json(f"{stack.router_url}/search",
                               {"image_b64": picture, "k": 10, "filters": {"usage": "Twintest"}})
    assert status == 200, answer
    assert len(answer["results"]) == 1
    shown = answer["results"][0]
    assert {shown["product_id"], *shown["also"]} == twins
    status, answer = http_json(f"{stack.router_url}/search",
                               {"image_b64": picture, "k": 10, "collapse": False,
                                "filters": {"usage": "Twintest"}})
    assert set(ids(answer)) == twins and all(not hit["also"] for hit in answer["results"])


def test_a_brand_word_is_found_by_lexical_and_hybrid_search(
    stack: LocalStack, catalog: dict[str, Any]
) -> None:
    brand = catalog["brand"].product_id
    ranks = {}
    for mode in MODES:
        found = ids(search(stack.router_url, q="zorblax", mode=mode, k=100))
        ranks[mode] = found.index(brand) if brand in found else 100
    assert ranks["lexical"] == 0 and ranks["hybrid"] == 0
    assert ranks["hybrid"] <= ranks["dense"]
