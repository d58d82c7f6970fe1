from __future__ import annotations

import numpy as np
import pytest

from proto.vectors import VectorRecord
from services.shard.index import ExactIndex, gpu_available
from services.shard.store import ShardStore
from vitrine.errors import InvalidMessage


def unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def found_ids(index: ExactIndex, queries: np.ndarray, k: int) -> list[list[str]]:
    _, rows = index.search(queries, k)
    return [[index.product_id(r) for r in row if r >= 0] for row in rows.tolist()]


def test_search_matches_brute_force_after_churn() -> None:
    rng = np.random.default_rng(1)
    index = ExactIndex(16, use_gpu=False, capacity=4)
    truth: dict[str, np.ndarray] = {}
    for step, vector in enumerate(unit(rng, 400)):
        pid = f"p{rng.integers(0, 150)}"
        if step % 5 == 4 and truth:
            gone = sorted(truth)[int(rng.integers(0, len(truth)))]
            assert index.remove(gone)
            del truth[gone]
        index.upsert(pid, vector)
        truth[pid] = vector
    assert len(index) == len(truth)
    queries = unit(rng, 3)
    scores, _ = index.search(queries, 10)
    ids = found_ids(index, queries, 10)
    names = sorted(truth)
    matrix = np.stack([truth[n] for n in names])
    for q, row_ids, row_scores in zip(queries, ids, scores, strict=True):
        exact = matrix @ q
        best = np.argsort(-exact)[:10]
        assert row_ids == [names[i] for i in best]
        np.testing.assert_allclose(row_scores, exact[best], rtol=1e-5)


def test_search_of_an_empty_or_small_index() -> None:
    index = ExactIndex(4, use_gpu=False)
    scores, rows = index.search(np.ones((2, 4), dtype=np.float32), 5)
    assert rows.shape == scores.shape == (2, 0)
    index.upsert("a", np.ones(4, dtype=np.float32))
    assert found_ids(index, np.ones((1, 4), dtype=np.float32), 5) == [["a"]]
    with pytest.raises(InvalidMessage):
        index.search(np.ones((1, 3), dtype=np.float32), 5)


def test_store_applies_by_version_only() -> None:
    store = ShardStore(use_gpu=False)
    v1, v2 = np.eye(4, dtype=np.float32)[:2]
    assert store.apply(VectorRecord.upsert("a", 2, "m", v1))
    assert not store.apply(VectorRecord.upsert("a", 2, "m", v2))  # duplicate
    assert not store.apply(VectorRecord.upsert("a", 1, "m", v2))  # stale replay
    assert store.search(v1[None], 1)[1] == [["a"]]
    assert store.apply(VectorRecord.tombstone("a", 3, "m"))
    assert len(store) == 0
    assert not store.apply(VectorRecord.upsert("a", 2, "m", v1))  # cannot resurrect
    assert store.apply(VectorRecord.upsert("a", 4, "m", v2))
    assert len(store) == 1


def test_store_refuses_a_vector_of_another_dimension() -> None:
    store = ShardStore(use_gpu=False)
    store.apply(VectorRecord.upsert("a", 1, "m", np.ones(4)))
    with pytest.raises(InvalidMessage, match="dim"):
        store.apply(VectorRecord.upsert("b", 1, "m", np.ones(8)))


@pytest.mark.skipif(not gpu_available(), reason="no GPU visible to FAISS")
def test_gpu_index_agrees_with_cpu() -> None:
    rng = np.random.default_rng(2)
    data, queries = unit(rng, 500), unit(rng, 4)
    cpu, gpu = ExactIndex(16, use_gpu=False), ExactIndex(16, use_gpu=True)
    for i, vector in enumerate(data):
        cpu.upsert(str(i), vector)
        gpu.upsert(str(i), vector)
    assert found_ids(cpu, queries, 5) == found_ids(gpu, queries, 5)


def test_each_row_keeps_its_own_fields_through_swap_removes() -> None:
    """A removal moves the last row into the hole: its fields must move with it."""
    rng = np.random.default_rng(3)
    index = ExactIndex(16, use_gpu=False, capacity=2)
    held = {}
    for step, vector in enumerate(unit(rng, 200)):
        pid = f"p{step % 37}"
        held[pid] = f"fields of {pid} at step {step}".encode()
        index.upsert(pid, vector, fields=held[pid])
        if step % 3 == 2:
            gone = sorted(held)[step % len(held)]
            index.remove(gone)
            del held[gone]
    assert {pid: index.fields_of(pid) for pid in held} == held
    _, rows = index.search(unit(rng, 2), 50)
    for row in rows.ravel().tolist():
        if row >= 0:
            assert index.product_fields(row) == held[index.product_id(row)]
    ids, _, _, fields = index.export()
    assert dict(zip(ids, fields, strict=True)) == held
    assert index.nbytes() == len(index) * 0 + index._vectors.nbytes + index._codes.nbytes \
        + sum(map(len, held.values()))
