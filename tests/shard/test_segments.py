"""Growing + sealed segments against real FAISS: churn, concurrent writes, filters, recall."""

from __future__ import annotations

import asyncio

import faiss
import numpy as np
import pytest

from proto.vectors import VectorRecord
from services.shard.index import gpu_available
from services.shard.segments import GPU_MAX_K, IndexSpec, IndexType, oversampled_search
from services.shard.store import ShardStore
from vitrine.errors import InvalidQuery

KINDS: list[IndexType] = ["flat", "ivf_flat", "ivf_pq", "hnsw", "torch"]


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 200), dim))
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fill(store: ShardStore, vectors: np.ndarray, version: int = 1) -> None:
    for i, vector in enumerate(vectors):
        attributes = {"colour": ["red", "blue", "green"][i % 3]}
        store.apply(VectorRecord.upsert(f"p{i}", version, "m", vector, attributes=attributes))


def exact_top(vectors: dict[str, np.ndarray], query: np.ndarray, k: int) -> list[str]:
    ids = list(vectors)
    scores = np.stack([vectors[i] for i in ids]) @ query
    return [ids[j] for j in np.argsort(-scores)[:k]]


@pytest.mark.parametrize(
    ("kind", "raw"), [(kind, True) for kind in KINDS] + [("ivf_pq", False), ("hnsw", False)]
)
def test_updates_and_deletes_of_sealed_vectors_are_respected(kind: IndexType, raw: bool) -> None:
    vectors = clustered(10_000 if kind == "ivf_pq" else 2_000, 32)
    spec = IndexSpec(kind=kind, pq_m=8, nprobe=64, raw_vectors=raw)
    store = ShardStore(spec, ["colour"], seal_threshold=500)
    fill(store, vectors)
    asyncio.run(store.seal())
    assert store.sealed is not None and len(store.sealed) == len(vectors)
    assert store.growing is not None and len(store.growing) == 0
    assert store.growing.nbytes() < 1024 * 40 * 4  # the emptied buffer gave its memory back

    store.apply(VectorRecord.tombstone("p5", 2, "m"))
    store.apply(VectorRecord.upsert("p7", 2, "m", -vectors[7]))  # moved far away
    store.apply(VectorRecord.upsert("p9", 2, "m", vectors[5]))  # took p5's place

    ids = store.search(vectors[[5, 7]], 5)[1]
    assert "p5" not in ids[0] and ids[0][0] == "p9"  # deleted: gone; updated: found at its new
    assert "p7" not in ids[1]  # the stale sealed copy of p7 is never returned
    assert store.search(-vectors[7][None], 1)[1] == [["p7"]]
    assert len(store) == len(vectors) - 1 and "p5" not in store.live_versions()


def test_writes_during_a_build_win_over_the_frozen_rows() -> None:
    vectors = clustered(600, 16)
    store = ShardStore(IndexSpec(kind="hnsw"), ["colour"], seal_threshold=100)
    fill(store, vectors[:300])

    async def seal_while_writing() -> None:
        sealing = asyncio.create_task(store.seal())
        await asyncio.sleep(0)  # the buffer is frozen and the build runs on a thread
        assert store.sealing
        store.apply(VectorRecord.tombstone("p1", 2, "m"))
        store.apply(VectorRecord.upsert("p2", 2, "m", vectors[500]))
        store.apply(VectorRecord.upsert("p400", 1, "m", vectors[400]))
        assert store.search(vectors[500][None], 1)[1] == [["p2"]]  # searches never wait
        await sealing

    asyncio.run(seal_while_writing())
    assert store.sealed is not None and store.growing is not None
    assert set(store.growing._slots) == {"p2", "p400"}  # changed during the build: they stay
    assert store.sealed.dead_count == 2  # p1 and p2's frozen rows
    assert "p1" not in store.live_versions() and store.live_versions()["p2"] == 2
    assert store.search(vectors[2][None], 1)[1] != [["p2"]]
    assert store.search(vectors[1][None], 1)[1] != [["p1"]]


@pytest.mark.parametrize("raw", [True, False], ids=["raw vectors kept", "decoded from index"])
def test_a_sealed_segment_full_of_dead_rows_is_rebuilt_without_them(raw: bool) -> None:
    vectors = clustered(1_000, 16)
    spec = IndexSpec(kind="ivf_flat", raw_vectors=raw)
    store = ShardStore(spec, seal_threshold=10**6, rebuild_dead_ratio=0.2)
    fill(store, vectors)
    asyncio.run(store.seal())
    for i in range(300):
        store.apply(VectorRecord.tombstone(f"p{i}", 2, "m"))
    assert store.wants_seal()
    asyncio.run(store.seal())
    assert store.sealed is not None and len(store.sealed) == 700 and store.sealed.dead_count == 0
    assert sorted(store.live_versions()) == sorted(f"p{i}" for i in range(300, 1000))
    assert not store.wants_seal()
    assert (store.sealed.vectors is not None) == raw
    assert store.search(vectors[[500, 900]], 1)[1] == [["p500"], ["p900"]]


@pytest.mark.parametrize("exact_below", [0, 10**6], ids=["in-index selector", "brute force"])
@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_filters_apply_before_the_top_k_is_cut(kind: IndexType, exact_below: int) -> None:
    vectors = clustered(3_000, 16)
    spec = IndexSpec(kind=kind, exact_filter_below=exact_below, nprobe=64, ef_search=256)
    store = ShardStore(spec, ["colour", "gender"], seal_threshold=10**6)
    fill(store, vectors[:2_500])
    asyncio.run(store.seal())
    fill(store, vectors[2_500:])  # ids p0.. again at version 1: stale, ignored
    for i in range(2_500, 3_000):
        store.apply(VectorRecord.upsert(f"g{i}", 1, "m", vectors[i], attributes={"colour": "Red"}))

    query = vectors[1][None]  # p1 is blue: its neighbours are mostly blue and green
    found = store.search(query, 20, {"colour": ["RED "]})
    scores, ids = found.scores, found.ids
    assert len(ids[0]) == 20 and all(pid.startswith("g") or int(pid[1:]) % 3 == 0 for pid in ids[0])
    red = {pid: v for pid, v in _live_vectors(store, vectors).items()
           if pid.startswith("g") or int(pid[1:]) % 3 == 0}
    assert len(set(ids[0]) & set(exact_top(red, query[0], 20))) >= 19
    assert scores[0] == sorted(scores[0], reverse=True)
    assert store.search(query, 5, {"colour": ["purple"]}) == ([[]], [[]], [[]], None)
    assert store.search(query, 5, {"colour": ["red"], "gender": ["women"]}) == \
        ([[]], [[]], [[]], None)
    with pytest.raises(InvalidQuery, match="filterable fields are colour, gender"):
        store.search(query, 5, {"brand": ["x"]})


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_default_parameters_reach_the_recall_target(kind: IndexType) -> None:
    vectors = clustered(20_000, 64)
    store = ShardStore(IndexSpec(kind=kind), seal_threshold=10**6)
    fill(store, vectors)
    asyncio.run(store.seal())
    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(0, len(vectors), 100)] + 0.2 * rng.standard_normal((100, 64))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    found = store.search(queries, 10)[1]
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    hits = [len(set(f) & {f"p{j}" for j in t}) for f, t in zip(found, truth, strict=True)]
    recall = sum(hits) / (10 * len(hits))
    assert recall >= 0.95


def _live_vectors(store: ShardStore, vectors: np.ndarray) -> dict[str, np.ndarray]:
    return {pid: vectors[int(pid[1:])] for pid in store.live_versions()}


# --- searching without selectors, as on FAISS GPU ----------------------------------------------


def test_oversampling_finds_what_a_selector_finds() -> None:
    """A FAISS GPU index ignores IDSelectors; a flat CPU index searched without one returns
    the same rows, so it checks the oversample-and-drop logic exactly."""
    vectors = clustered(6_000, 32)
    index = faiss.IndexFlatIP(32)
    index.add(vectors)
    queries = vectors[[3, 1_000, 4_500]]
    rng = np.random.default_rng(2)
    for kept_fraction in (0.9, 0.3, 0.05):
        keep = rng.random(len(vectors)) < kept_fraction
        selector = faiss.IDSelectorBatch(np.flatnonzero(keep))
        expected = index.search(queries, 25, params=faiss.SearchParameters(sel=selector))
        found = oversampled_search(index, queries, 25, keep)
        assert found is not None
        np.testing.assert_array_equal(found[1], expected[1])
        np.testing.assert_allclose(found[0], expected[0], rtol=1e-6)
    # kept rows that even the widest search (GPU_MAX_K neighbours) does not reach: no answer,
    # so the caller falls back to the CPU index with its selector
    far = np.argsort(queries[:1] @ vectors.T)[0, :3]  # the query's three worst matches
    assert len(vectors) > GPU_MAX_K
    assert oversampled_search(index, queries[:1], 3, np.isin(np.arange(len(vectors)), far)) is None
    empty = oversampled_search(index, queries, 5, np.zeros(len(vectors), dtype=bool))
    assert empty is not None and empty[1].shape == (3, 0)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq"])
def test_a_segment_searched_without_selectors_skips_dead_and_filtered_rows(
    kind: IndexType,
) -> None:
    vectors = clustered(10_000, 32)
    spec = IndexSpec(kind=kind, pq_m=8, nprobe=64, refine_factor=16, exact_filter_below=0)
    store = ShardStore(spec, ["colour"], seal_threshold=10**6)
    fill(store, vectors)
    asyncio.run(store.seal())
    for i in range(0, 10_000, 2):  # half of the sealed rows die
        store.apply(VectorRecord.tombstone(f"p{i}", 2, "m"))
    queries = vectors[[2, 5, 4_000]]
    with_selector = [store.search(queries, 10), store.search(queries, 10, {"colour": ["red"]})]
    assert store.sealed is not None
    stand_in = faiss.clone_index(store.sealed.index)  # searched as a GPU copy is: no selector,
    if kind != "flat":  # and the probe count gpu_copy sets
        faiss.extract_index_ivf(stand_in).nprobe = spec.nprobe
    store.sealed.device_index = stand_in
    without = [store.search(queries, 10), store.search(queries, 10, {"colour": ["red"]})]
    assert without[0][1] == with_selector[0][1] and without[1][1] == with_selector[1][1]
    assert all(int(pid[1:]) % 2 for row in without[0][1] for pid in row)  # no dead row
    assert all(int(pid[1:]) % 6 == 3 for row in without[1][1] for pid in row)  # odd and red


@pytest.mark.skipif(not gpu_available(), reason="no GPU visible to FAISS")
@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq"])
def test_faiss_gpu_segments_answer_like_the_cpu_ones(kind: IndexType) -> None:
    vectors = clustered(20_000, 64)
    queries = vectors[:50]
    answers = []
    for gpu in (False, True):
        spec = IndexSpec(kind=kind, pq_m=16, nprobe=64, gpu=gpu, exact_filter_below=0)
        store = ShardStore(spec, ["colour"], seal_threshold=10**6, use_gpu=gpu)
        fill(store, vectors)
        asyncio.run(store.seal())
        store.apply(VectorRecord.tombstone("p1", 2, "m"))
        assert store.sealed is not None and (store.sealed.device_index is not None) == gpu
        red = store.search(queries, 10, {"colour": ["red"]})[1]
        answers.append([store.search(queries, 10)[1], red])
    for cpu, gpu in zip(answers[0], answers[1], strict=True):
        overlap = [len(set(a) & set(b)) / 10 for a, b in zip(cpu, gpu, strict=True)]
        assert np.mean(overlap) >= 0.95  # fp16 on the GPU may swap near-ties
        assert not any("p1" in row for row in gpu)
