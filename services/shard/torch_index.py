"""Exact inner-product search on a torch device: the GPU path where FAISS has no GPU build.

The FAISS GPU wheels need CUDA 12 libraries that a CUDA 13 machine may lack, while torch ships
its own CUDA. On CUDA the vectors live on the device in fp16 and a scan is one fp16 matrix
product plus `topk` per chunk (tensor cores; about HBM speed); on CPU the same code runs in
fp32, which is how the tests compare it with FAISS everywhere. It quacks like the small part of
a FAISS index the sealed segment uses (`add`, `ntotal`, `is_trained`), so the growing / sealed
/ dead-row structure around it is unchanged; dead and filtered rows are masked to -inf before
the top-k. Covered by tests/shard/test_torch_index.py.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK_ROWS = 1 << 20  # bounds the (nq, rows) score matrix of one step


def cuda_available() -> bool:
    return torch.cuda.is_available()


class TorchFlatIndex:
    is_trained = True

    def __init__(self, dim: int, device: str | None = None) -> None:
        self.d = dim
        self.device = torch.device(device or ("cuda" if cuda_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self._chunks: list[torch.Tensor] = []  # never modified in place: clones share them

    @property
    def ntotal(self) -> int:
        return sum(len(chunk) for chunk in self._chunks)

    def add(self, vectors: np.ndarray) -> None:
        rows = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        rows = rows.to(self.device, self.dtype)
        if self._chunks and len(self._chunks[-1]) + len(rows) <= CHUNK_ROWS:
            rows = torch.cat([self._chunks.pop(), rows])  # a new tensor: clones keep the old
        self._chunks.extend(rows.split(CHUNK_ROWS))

    def clone(self) -> TorchFlatIndex:
        twin = TorchFlatIndex(self.d, str(self.device))
        twin._chunks = list(self._chunks)
        return twin

    def nbytes(self) -> int:
        return sum(chunk.numel() * chunk.element_size() for chunk in self._chunks)

    @torch.inference_mode()
    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), best first; rows -1 where fewer than k rows are allowed."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        q = q.to(self.device, self.dtype)
        mask = None if allowed is None else torch.from_numpy(allowed).to(self.device)
        best_scores = torch.full((len(q), 0), float("-inf"), device=self.device)
        best_rows = torch.zeros((len(q), 0), dtype=torch.long, device=self.device)
        offset = 0
        for chunk in self._chunks:
            scores = (q @ chunk.T).float()
            if mask is not None:
                scores.masked_fill_(~mask[offset : offset + len(chunk)], float("-inf"))
            top = scores.topk(min(k, len(chunk)), dim=1)
            best_scores = torch.cat([best_scores, top.values], dim=1)
            best_rows = torch.cat([best_rows, top.indices + offset], dim=1)
            if best_scores.shape[1] > k:
                kept = best_scores.topk(k, dim=1)
                best_scores, best_rows = kept.values, best_rows.gather(1, kept.indices)
            offset += len(chunk)
        order = best_scores.argsort(dim=1, descending=True)
        scores_np = best_scores.gather(1, order).cpu().numpy()
        rows_np = best_rows.gather(1, order).cpu().numpy()
        rows_np[~np.isfinite(scores_np)] = -1
        return scores_np, rows_np
