from __future__ import annotations

import faiss
import torch

from vitrine.service import limit_compute_threads


def test_compute_threads_bound_faiss_and_torch() -> None:
    faiss_before, torch_before = faiss.omp_get_max_threads(), torch.get_num_threads()
    try:
        limit_compute_threads(1)
        assert faiss.omp_get_max_threads() == 1
        assert torch.get_num_threads() == 1
        limit_compute_threads(None)  # unset: left as it is
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(faiss_before)
        torch.set_num_threads(torch_before)
