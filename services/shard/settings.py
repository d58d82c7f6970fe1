from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.shard.index import gpu_available
from services.shard.segments import IndexSpec, IndexType, resolve_index_type
from services.shard.store import ShardStore
from vitrine.settings import CommonSettings


class ShardSettings(CommonSettings):
    shard_id: int = Field(default=0, ge=0)
    num_shards: int = Field(default=2, ge=1)
    shard_port: int = Field(default=8100, ge=0, le=65535)
    consume_batch: int = Field(default=500, ge=1)
    use_gpu: bool | None = Field(default=None, description="None: use a GPU when FAISS sees one")
    snapshot_dir: Path | None = Field(default=None, description="unset: no snapshots")
    snapshot_interval_s: float = Field(default=60.0, gt=0, description="while content changes")
    snapshot_keep: int = Field(default=2, ge=1)
    # segments (services/shard/store.py, services/shard/segments.py)
    seal_threshold: int = Field(
        default=20_000, ge=1, description="growing-buffer size that triggers a seal"
    )
    rebuild_dead_ratio: float = Field(
        default=0.2, gt=0, le=1, description="dead sealed rows that trigger a full rebuild"
    )
    index_type: IndexType | Literal["auto"] = Field(
        default="auto",
        description="flat, ivf_flat, ivf_pq, hnsw, torch; auto: an exact fp16 scan on a GPU "
        "(FAISS GPU flat, else torch), else ivf_flat",
    )
    index_fp16: bool = Field(
        default=True, description="fp16 codes (flat, ivf_flat, hnsw): the sealed vectors are "
        "fp16-rounded already, so the same answers from half the bytes scanned",
    )
    ivf_nlist: int = Field(default=0, ge=0, description="0: about 2*sqrt(n)")
    ivf_nprobe: int = Field(default=32, ge=1)
    pq_m: int = Field(default=64, ge=1, description="IVF-PQ bytes per vector; divides dim")
    pq_refine_factor: int = Field(default=64, ge=1, description="IVF-PQ exact re-rank of k*f")
    hnsw_m: int = Field(default=32, ge=4)
    hnsw_ef_construction: int = Field(default=80, ge=8)
    hnsw_ef_search: int = Field(default=160, ge=1)
    keep_raw_vectors: bool = Field(
        default=True, description="fp16 raw vectors beside the sealed index (exact re-rank, "
        "exact selective filters, lossless rebuilds); off when they do not fit in memory",
    )
    search_batch_max: int = Field(
        default=256, ge=1, description="queries of concurrent requests per index call"
    )
    exact_filter_below: int = Field(
        default=20_000, ge=0, description="filters passing fewer rows are answered exactly"
    )
    # hybrid retrieval (services/shard/hybrid.py)
    hybrid_candidates: int = Field(
        default=100, ge=1, le=1000,
        description="candidates each retriever gives reciprocal rank fusion (at least k)",
    )
    hybrid_fusion: Literal["rrf", "weighted"] = Field(
        default="weighted", description="rrf (ranks only) or weighted (cosine and BM25)"
    )
    hybrid_weight: float = Field(
        default=0.5, ge=0, le=1, description="weighted fusion: the share of normalised BM25"
    )
    rrf_k: float = Field(default=60.0, gt=0, description="rrf fusion: the rank constant")
    lexical_match: Literal["all", "any"] = Field(
        default="all", description="lexical search: a product must hold all query words, or any"
    )

    def index_spec(self) -> IndexSpec:
        return IndexSpec(
            kind=resolve_index_type(self.index_type), fp16=self.index_fp16, nlist=self.ivf_nlist,
            nprobe=self.ivf_nprobe, pq_m=self.pq_m, refine_factor=self.pq_refine_factor,
            hnsw_m=self.hnsw_m, ef_construction=self.hnsw_ef_construction,
            ef_search=self.hnsw_ef_search, exact_filter_below=self.exact_filter_below,
            raw_vectors=self.keep_raw_vectors,
            gpu=gpu_available() if self.use_gpu is None else self.use_gpu,
        )

    def new_store(self, snapshot_dir: Path | None = None) -> ShardStore:
        """`snapshot_dir`: where this store's snapshots go (unset: the settings')."""
        directory = snapshot_dir or self.snapshot_dir
        return ShardStore(
            self.index_spec(), self.filter_fields, self.seal_threshold,
            self.rebuild_dead_ratio, self.use_gpu, self.lexical_match == "all",
            directory / "lexical" if directory is not None else None,
        )

    @model_validator(mode="after")
    def _shard_in_range(self) -> ShardSettings:
        if self.shard_id >= self.num_shards:
            raise ValueError(f"shard_id {self.shard_id} must be below num_shards {self.num_shards}")
        if self.num_shards > self.vector_partitions:
            raise ValueError(
                f"{self.num_shards} shards but only {self.vector_partitions} vector partitions: "
                "some shards would own nothing"
            )
        return self
