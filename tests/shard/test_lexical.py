"""The shard's lexical index and hybrid fusion against real tantivy and a real store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from proto.vectors import ProductFields, VectorRecord
from services.shard.attributes import RowFilter
from services.shard.hybrid import count_facets, reciprocal_rank_fusion, weighted_fusion
from services.shard.lexical import LexicalIndex
from services.shard.segments import IndexSpec
from services.shard.snapshot import Snapshot, load_latest, write_snapshot
from services.shard.store import Hits, ShardStore

FIELDS = ["colour", "gender"]


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def upsert(store: ShardStore, pid: str, version: int, vector: np.ndarray, title: str,
           colour: str = "Black", price: float | None = None,
           in_stock: bool | None = None) -> None:
    assert store.apply(VectorRecord.upsert(
        pid, version, "m", vector, title=title, image_uri=f"file:///{pid}.jpg",
        attributes={"colour": colour, "gender": "Men"}, price=price, in_stock=in_stock,
    ))


def lexical_ids(store: ShardStore, text: str, k: int = 10, where: RowFilter | None = None):
    store.lexical.refresh(force=True)
    return store.lexical_search([text], k, where).ids[0]


def test_lexical_search_follows_versioned_upserts_deletes_seals_and_restores(
    tmp_path: Path,
) -> None:
    vectors = unit(300)
    store = ShardStore(IndexSpec(kind="ivf_flat"), FIELDS, seal_threshold=10**9)
    for i in range(200):
        upsert(store, f"p{i}", 1, vectors[i], f"Roadster Men Shirt {i}")
    upsert(store, "puma", 1, vectors[200], "Puma Men Black Sports Shoes")
    asyncio.run(store.seal())
    assert lexical_ids(store, "puma") == ["puma"]
    upsert(store, "puma", 2, vectors[200], "Nike Men Black Sports Shoes")  # title only
    assert not store.apply(VectorRecord.upsert("puma", 1, "m", vectors[200], title="Puma"))
    assert lexical_ids(store, "puma") == [] and lexical_ids(store, "nike") == ["puma"]
    assert store.apply(VectorRecord.tombstone("p7", 2, "m"))
    assert "p7" not in lexical_ids(store, "roadster shirt 7", k=300)
    for i in range(200, 300):
        upsert(store, f"late{i}", 1, vectors[i], f"Titan Women Watch {i}")
    asyncio.run(store.seal())  # an append: the lexical index is keyed by product, unchanged
    assert len(lexical_ids(store, "titan watch", k=500)) == 100

    write_snapshot(tmp_path, Snapshot(store.export(), {0: 1}, "t", 1, 0))
    found = load_latest(tmp_path, "t", 1, 0, IndexSpec(kind="ivf_flat"))
    assert found is not None
    restored = ShardStore(IndexSpec(kind="ivf_flat"), FIELDS)
    restored.load(found.state)  # rebuilt from the products the snapshot holds
    assert lexical_ids(restored, "nike") == ["puma"] and lexical_ids(restored, "puma") == []
    assert "p7" not in lexical_ids(restored, "roadster shirt 7", k=300)
    assert len(restored.lexical) == len(restored) == 300


def test_a_stale_document_never_shows_an_old_state() -> None:
    """Before the index refreshes, the store decides: a deleted product never comes back."""
    store = ShardStore(IndexSpec(kind="flat"), FIELDS)
    upsert(store, "a", 1, unit(1)[0], "Puma Shoes")
    store.lexical.refresh(force=True)
    store.apply(VectorRecord.tombstone("a", 2, "m"))  # not refreshed yet
    assert store.lexical_search(["puma"], 5).ids == [[]]


def test_filters_apply_inside_the_lexical_search() -> None:
    store = ShardStore(IndexSpec(kind="flat"), FIELDS)
    vectors = unit(40, seed=1)
    for i in range(40):
        upsert(store, f"s{i}", 1, vectors[i], f"Running Shoes {i}",
               colour="Red" if i % 2 else "Blue", price=float(i), in_stock=i % 3 != 0)
    where = RowFilter({"colour": ["red"]}, price_min=10, price_max=30, in_stock=True)
    found = lexical_ids(store, "running shoes", k=40, where=where)
    expected = {f"s{i}" for i in range(10, 31) if i % 2 and i % 3 != 0}
    assert set(found) == expected and len(found) == len(expected)
    dense = store.search(vectors[:1], 40, where).ids[0]
    assert set(dense) == expected  # the vector scan applies the same filter
    with pytest.raises(Exception, match="cannot filter on 'brand'"):
        store.lexical_search(["shoes"], 5, RowFilter({"brand": ["x"]}))


def test_query_text_is_never_the_query_language() -> None:
    index = LexicalIndex([])
    index.upsert("a", ProductFields(title="Titan Men Watches"))
    index.refresh(force=True)
    for text in ['titan:"watch" AND (', "NOT titan", "*", "titan^3 OR", "", "   ", "ünï 漢字"]:
        index.search(text, 5)  # never a syntax error
    found = {text: [pid for _, pid in index.search(text, 5)] for text in
             ["watch for men", "the titan watch", "titan NOT", "titan shoes", "TITÁN"]}
    assert found == {"watch for men": ["a"], "the titan watch": ["a"], "titan NOT": ["a"],
                     "titan shoes": [], "TITÁN": ["a"]}  # every word; stop words and case out
    anywhere = LexicalIndex([], match_all=False)
    anywhere.upsert("a", ProductFields(title="Titan Men Watches"))
    anywhere.refresh(force=True)
    assert [pid for _, pid in anywhere.search("titan shoes", 5)] == ["a"]


def hits(*lists: list[str]) -> Hits:
    return Hits([[1.0] * len(ids) for ids in lists], [list(ids) for ids in lists],
                [[pid.encode() for pid in ids] for ids in lists])


def test_reciprocal_rank_fusion() -> None:
    fused = reciprocal_rank_fusion(hits(["a", "b", "c"]), hits(["c", "d"]), k=4, rrf_k=60)
    assert fused.ids == [["c", "a", "d", "b"]]  # in both lists beats rank 1 of one
    assert fused.fields == [[b"c", b"a", b"d", b"b"]]
    assert fused.scores[0][0] == pytest.approx(1 / 63 + 1 / 61)
    # a product only BM25 ranked first beats one only the vectors ranked first
    assert reciprocal_rank_fusion(hits(["x"]), hits(["brand"]), 2, 60).ids == [["brand", "x"]]
    assert reciprocal_rank_fusion(hits([]), hits([]), 3, 60).ids == [[]]


def test_facet_counts() -> None:
    packed = [ProductFields(attributes={"colour": colour, "gender": "Men"}).pack()
              for colour in ["Red", "red ", "Blue", "Navy Blue", "Red"]] + [b""]
    assert count_facets(packed, ["colour", "gender"]) == {
        "colour": {"Red": 3, "Blue": 1, "Navy Blue": 1}, "gender": {"Men": 5},
    }


def test_hybrid_finds_the_product_only_its_brand_word_identifies() -> None:
    """Hand-built: every vector but the branded product's is closer to the query vector, so
    dense search ranks it last; its brand word is in no other product's text."""
    rng = np.random.default_rng(3)
    query = unit(1, seed=4)[0]
    store = ShardStore(IndexSpec(kind="flat"), FIELDS)
    for i in range(30):
        near = query + 0.15 * rng.standard_normal(16).astype(np.float32)
        upsert(store, f"shoe{i}", 1, near / np.linalg.norm(near), f"Men Black Sports Shoes {i}")
    other = unit(1, seed=5)[0]
    away = query + 1.5 * (other - (other @ query) * query)  # about 0.5 from the query
    upsert(store, "zorblax", 1, away / np.linalg.norm(away), "Zorblax Men Black Sports Shoes")
    store.lexical.refresh(force=True)
    dense = store.search(query[None], 31)
    lexical = store.lexical_search(["zorblax sports shoes"], 31)
    assert dense.ids[0][-1] == "zorblax" and lexical.ids[0] == ["zorblax"]
    assert weighted_fusion(dense, lexical, 10, weight=0.5).ids[0][0] == "zorblax"
    assert reciprocal_rank_fusion(dense, lexical, 10, rrf_k=60).ids[0][0] == "zorblax"
    # and where the words match everything equally, the vectors decide
    generic = store.lexical_search(["sports shoes"], 31)
    assert weighted_fusion(dense, generic, 5, weight=0.5).ids[0][:5] == dense.ids[0][:5]


def test_a_snapshot_carries_the_lexical_index_and_a_damaged_one_is_rebuilt(
    tmp_path: Path,
) -> None:
    vectors = unit(120, seed=6)

    def store() -> ShardStore:
        return ShardStore(IndexSpec(kind="flat"), FIELDS, seal_threshold=10**9,
                          lexical_dir=tmp_path / "lexical")

    original = store()
    for i in range(100):
        upsert(original, f"p{i}", 1, vectors[i], f"Roadster Shirt {i}")
    asyncio.run(original.seal())
    upsert(original, "p3", 2, vectors[3], "Titan Watch")  # growing, and the old row dead
    original.apply(VectorRecord.tombstone("p4", 2, "m"))
    snapshots = tmp_path / "snapshots"
    written = write_snapshot(snapshots, Snapshot(original.export(), {0: 1}, "t", 1, 0))
    assert sorted((written / "lexical").iterdir())  # the index's files went in
    assert not list((tmp_path / "lexical").glob("checkpoint-*"))  # moved, nothing left

    def restored(with_lexical: bool = True) -> ShardStore:
        found = load_latest(snapshots, "t", 1, 0, IndexSpec(kind="flat"))
        assert found is not None and (found.state.lexical is not None) == with_lexical
        fresh = store()
        fresh.load(found.state)
        return fresh

    opened = restored()
    assert opened.lexical.directory is not None
    assert opened.lexical.directory.parent == tmp_path / "lexical"
    assert lexical_ids(opened, "titan") == ["p3"] and lexical_ids(opened, "shirt 3") == []
    assert "p4" not in lexical_ids(opened, "roadster shirt 4", k=200)
    assert len(opened.lexical) == len(opened) == 99
    upsert(opened, "p5", 2, vectors[5], "Puma Shoes")  # the opened index takes writes
    assert lexical_ids(opened, "puma") == ["p5"]

    for path in (written / "lexical").iterdir():  # damage the snapshot's copy
        if path.suffix == ".idx":
            path.write_bytes(b"")
    rebuilt = restored(with_lexical=False)  # the rest of the snapshot still serves...
    assert lexical_ids(rebuilt, "titan") == ["p3"]  # ...and the index is rebuilt from it
    assert len(rebuilt.lexical) == len(rebuilt) == 99
