"""The torch backend against FAISS' exact search on the same vectors: on the CPU everywhere,
and in fp16 on CUDA wherever CUDA is available."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

import services.shard.torch_index as torch_index
from services.shard.torch_index import TorchFlatIndex, cuda_available

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not cuda_available(), reason="CUDA is not available")
    ),
]


def unit(rng: np.random.Generator, n: int, dim: int = 32) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("device", DEVICES)
def test_results_equal_faiss_exact_search(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_index, "CHUNK_ROWS", 700)  # several chunks, merged
    rng = np.random.default_rng(0)
    data, queries = unit(rng, 3_000), unit(rng, 20)
    index = TorchFlatIndex(32, device)
    index.add(data[:1_000])
    index.add(data[1_000:])
    assert index.ntotal == 3_000 and len(index._chunks) == 5
    scores, rows = index.search(queries, 10)
    want_scores, want_rows = faiss.knn(queries, data, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(rows, want_rows)
    tolerance = 2e-3 if device == "cuda" else 1e-5  # fp16 storage on the GPU
    np.testing.assert_allclose(scores, want_scores, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_rows_are_never_returned(device: str) -> None:
    rng = np.random.default_rng(1)
    data = unit(rng, 500)
    index = TorchFlatIndex(32, device)
    index.add(data)
    allowed = np.zeros(500, dtype=bool)
    allowed[[3, 70, 499]] = True
    scores, rows = index.search(data[[70]], 5, allowed)
    assert rows[0].tolist() == [70, *sorted([3, 499], key=lambda r: -float(data[r] @ data[70])),
                                -1, -1]
    assert np.isneginf(scores[0, 3:]).all()


def test_a_clone_shares_nothing_that_a_later_add_changes() -> None:
    rng = np.random.default_rng(2)
    index = TorchFlatIndex(32, "cpu")
    index.add(unit(rng, 10))
    twin = index.clone()
    twin.add(unit(rng, 5))
    assert (index.ntotal, twin.ntotal) == (10, 15)
