"""Seeded synthetic catalogs for the benchmarks: clustered unit vectors, like real embeddings
(uniformly random vectors have no neighbourhoods, so no ANN index can do well on them)."""

from __future__ import annotations

import numpy as np


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int) -> np.ndarray:
    """float32 unit vectors around `clusters` centres, made in chunks to bound memory."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        x = centres[rng.integers(0, clusters, stop - start)]
        x += 0.35 * rng.standard_normal(x.shape).astype(np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def near(rng: np.random.Generator, vectors: np.ndarray, nq: int, noise: float = 0.3) -> np.ndarray:
    """Queries in distribution: catalog vectors plus noise of norm about `noise` (cosine to
    the vector they came from about 0.96), normalised."""
    picked = vectors[rng.integers(0, len(vectors), nq)].astype(np.float32)
    scale = noise / np.sqrt(picked.shape[1])
    q = picked + scale * rng.standard_normal(picked.shape).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)
