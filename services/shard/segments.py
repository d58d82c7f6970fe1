"""The sealed segment: an immutable FAISS ANN index over vectors that left the growing buffer.

FAISS ANN indexes (HNSW, GPU IVF) cannot remove ids cheaply, so, as in Milvus' sealed segments,
the index is never modified in place: an update or delete only flips the row's bit in `dead`,
and searches skip dead rows with an IDSelector applied inside the index scan. Merging the
growing buffer in is `clone + add` on a background thread; a full rebuild (retrain, dead rows
dropped) happens when the dead ratio or the growth since training passes its threshold.

Where FAISS sees a GPU (`IndexSpec.gpu`), flat, IVF-Flat and IVF-PQ segments also get a copy on
the GPU (`GpuIndexFlat` / `GpuIndexIVFFlat` / `GpuIndexIVFPQ`, fp16 where the spec asks) that
answers the searches, while the CPU index stays the one that is cloned, merged and snapshotted.
FAISS GPU indexes ignore IDSelectors, so there dead and filtered rows are dropped after an
oversampled search; a search that oversampling cannot satisfy (FAISS GPU returns at most 2048
neighbours) falls back to the CPU index with its selector.

The raw vectors stay beside the index in fp16 (unless `raw_vectors` is off, for catalogs whose
raw vectors do not fit in memory): they make rebuilds and snapshots independent of the index
type, re-rank IVF-PQ candidates exactly, and answer selective filters by brute force (exact,
and faster than an ANN scan that rejects most rows). Without them a rebuild decodes the vectors
from the index (lossy for PQ) and filters always run inside the index scan.
The index holds the same fp16-rounded vectors, so its fp16 codes (`fp16`, the default) answer
exactly as fp32 codes would while a scan reads half the bytes: at 1M vectors that took 25% of
the shards' CPU per query and left more of the cache to the router's text tower beside them.
Covered by tests/shard/test_segments.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from services.shard.attributes import CompiledFilter
from services.shard.index import gpu_available, gpu_resources
from services.shard.packed import IdLookup, PackedBytes

IndexType = Literal["flat", "ivf_flat", "ivf_pq", "hnsw", "torch"]
GPU_KINDS = ("flat", "ivf_flat", "ivf_pq")  # the sealed kinds FAISS GPU can hold
GPU_MAX_K = 2048  # the most neighbours (and IVF lists probed) a FAISS GPU search returns
OVERSAMPLE_MARGIN = 1.25  # fetch this much more than the live fraction says is needed
TRAINING_POINTS_PER_LIST = 64  # FAISS wants >= 39; more costs build time, not recall


def resolve_index_type(kind: IndexType | Literal["auto"]) -> IndexType:
    """"auto": an exact scan where there is a GPU: FAISS GPU's fp16 flat index where the
    installed FAISS sees one, else the torch CUDA scan (FAISS GPU wheels need CUDA 12 libraries
    a CUDA 13 machine may lack; checked without importing torch on machines with no NVIDIA
    driver); IVF-Flat on the CPU."""
    if kind != "auto":
        return kind
    if gpu_available():
        return "flat"
    if Path("/dev/nvidiactl").exists():
        from services.shard.torch_index import cuda_available

        if cuda_available():
            return "torch"
    return "ivf_flat"


@dataclass(frozen=True)
class IndexSpec:
    """How a sealed segment is built and searched (ShardSettings.index_spec())."""

    kind: IndexType = "ivf_flat"
    fp16: bool = True  # fp16 codes for flat / ivf_flat / hnsw storage
    nlist: int = 0  # 0: about 2 * sqrt(n), at least 39 training points per list
    nprobe: int = 32
    pq_m: int = 64  # PQ sub-quantizers (bytes per vector at 8 bits); must divide dim
    refine_factor: int = 64  # IVF-PQ: re-rank k * refine_factor candidates with the raw vectors
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 160
    exact_filter_below: int = 20_000  # a filter passing fewer rows is answered by brute force
    retrain_growth: float = 4.0  # retrain IVF once the segment is this many times its training
    raw_vectors: bool = True  # keep fp16 raw vectors beside the index (see the module doc)
    gpu: bool = False  # search a FAISS GPU copy of flat / IVF segments (see the module doc)

    def nlist_for(self, n: int) -> int:
        wanted = self.nlist or int(2 * math.sqrt(n))
        return max(1, min(wanted, n // 39))

    def factory_string(self, n: int, dim: int) -> str:
        codes = "SQfp16" if self.fp16 else "Flat"
        if self.kind == "flat":
            return "Flat" if self.gpu else codes  # FAISS GPU makes its fp16 copy from Flat
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m},{codes}"
        if self.kind == "torch":
            return "torch"
        nlist = self.nlist_for(n)
        if self.kind == "ivf_pq" and dim % self.pq_m == 0 and n >= 256 * 39:
            return f"IVF{nlist},PQ{self.pq_m}x8"
        return f"IVF{nlist},{codes}"  # PQ needs 256 training points per code: small is Flat


@dataclass
class SealedSegment:
    """Every per-row table is a numpy array (services/shard/packed.py): the segment holds no
    Python object per product, so millions of rows cost their data and a few offsets."""

    index: Any  # a faiss.Index, or a TorchFlatIndex for kind "torch"
    ids: PackedBytes  # row -> product id, UTF-8
    seqs: np.ndarray  # row -> the store's change number of that vector (int64)
    versions: np.ndarray  # row -> the product version of that vector (int64)
    vectors: np.ndarray | None  # row -> raw vector, float16 (n, dim); None: not kept
    codes: np.ndarray  # row -> filter columns: attribute codes, price, stock (float32)
    fields: PackedBytes  # row -> packed ProductFields: what a hit shows
    spec: IndexSpec  # how it is searched (and rebuilt): the current settings
    trained_on: int  # rows the index was trained on (0: needs no training)
    kind: IndexType  # what it was built as: a rebuild follows a change of settings
    lookup: IdLookup | None = None  # product id -> rows; built from `ids` when not given
    dead: np.ndarray = field(init=False)  # row -> updated or deleted since sealing
    device_index: Any = field(init=False, default=None)  # the FAISS GPU copy that searches
    _live_bits: np.ndarray | None = field(init=False, default=None)
    _dead_count: int = field(init=False, default=0)  # kept, not summed: read on every query

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.seqs) == len(self.versions) == len(self.fields):
            raise ValueError("sealed segment tables do not line up")
        self.dead = np.zeros(len(self.ids), dtype=bool)
        if self.lookup is None:
            self.lookup = IdLookup.of(self.ids)
        if self.spec.gpu and self.kind in GPU_KINDS and len(self.ids):
            self.device_index = gpu_copy(self.index, self.spec)

    def __len__(self) -> int:
        return len(self.ids)

    def kill(self, row: int) -> None:
        if not self.dead[row]:
            self.dead[row] = True
            self._dead_count += 1
            self._live_bits = None

    def mark_dead(self, dead: np.ndarray) -> None:
        """Rows killed elsewhere (a snapshot's, or the base's during a merge): the first
        len(dead) rows take these bits."""
        self.dead[: len(dead)] = dead
        self._dead_count = int(self.dead.sum())
        self._live_bits = None

    @property
    def dead_count(self) -> int:
        return self._dead_count

    def product_id(self, row: int) -> str:
        return self.ids[row].decode()

    def live_row(self, product_id: str) -> int | None:
        """The row that holds `product_id` now (older rows of it are dead), or None."""
        assert self.lookup is not None
        wanted = product_id.encode()
        for row in self.lookup.rows_of(wanted).tolist():
            if not self.dead[row] and self.ids[row] == wanted:
                return int(row)
        return None

    def live_rows_of(self, product_ids: Sequence[str]) -> list[int | None]:
        """`live_row` of many products, their hashes looked up together."""
        assert self.lookup is not None
        wanted = [pid.encode() for pid in product_ids]
        if not wanted:
            return []
        lows, highs = self.lookup.spans_of(wanted)
        found: list[int | None] = []
        for pid, lo, hi in zip(wanted, lows.tolist(), highs.tolist(), strict=True):
            rows = self.lookup.rows[lo:hi].tolist()
            found.append(next((row for row in rows
                               if not self.dead[row] and self.ids[row] == pid), None))
        return found

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.dead)

    def product_fields(self, row: int) -> bytes:
        return self.fields[row]

    def search(
        self, queries: np.ndarray, k: int, where: CompiledFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the best live rows passing the filter, best first, -1 padded."""
        allowed = None if where is None else where.mask(self.codes) & ~self.dead
        brute_force = self.vectors is not None and allowed is not None and \
            allowed.sum() <= self.spec.exact_filter_below
        if brute_force:
            assert allowed is not None
            return self._brute_force(queries, k, np.flatnonzero(allowed))
        if self.kind == "torch":  # a mask, not an IDSelector
            live = ~self.dead if self.dead.any() else None
            return self.index.search(queries, k, live if allowed is None else allowed)
        pq = self.kind == "ivf_pq" and "PQ" in type(faiss.downcast_index(self.index)).__name__
        pq = pq and self.vectors is not None  # re-ranking needs the raw vectors
        wanted = min(k * self.spec.refine_factor if pq else k, len(self))
        found = None
        if self.device_index is not None:
            keep = allowed if allowed is not None else (~self.dead if self.dead.any() else None)
            found = oversampled_search(self.device_index, queries, wanted, keep)
        if found is None:
            bits = self._live_bitmap() if allowed is None else _pack(allowed)
            params, selector = self._params(bits)
            found = self.index.search(queries, wanted, params=params)
            del selector  # FAISS held a raw pointer to it (and to `bits`) until here
        scores, rows = found
        if pq:
            return self._rerank(queries, rows, k)
        return scores, rows

    def _params(
        self, bits: np.ndarray | None
    ) -> tuple[faiss.SearchParameters, faiss.IDSelector | None]:
        selector = None if bits is None else faiss.IDSelectorBitmap(len(self), faiss.swig_ptr(bits))
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=self.spec.ef_search)  # type: ignore[attr-defined]
        elif self.kind in ("ivf_flat", "ivf_pq"):
            params = faiss.SearchParametersIVF(nprobe=self.spec.nprobe)  # type: ignore[call-arg]
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        return params, selector

    def _live_bitmap(self) -> np.ndarray | None:
        """Packed live rows, cached until the next kill; None while nothing is dead."""
        if self._live_bits is None and self.dead.any():
            self._live_bits = _pack(~self.dead)
        return self._live_bits

    def _brute_force(
        self, queries: np.ndarray, k: int, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(rows) == 0:
            nq = len(queries)
            return np.zeros((nq, 0), dtype=np.float32), np.zeros((nq, 0), dtype=np.int64)
        scores, picked = faiss.knn(
            queries, self.raw(rows), min(k, len(rows)),
            metric=faiss.METRIC_INNER_PRODUCT,
        )
        return scores, np.where(picked >= 0, rows[np.maximum(picked, 0)], -1)

    def _rerank(
        self, queries: np.ndarray, rows: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores from the raw vectors for the PQ candidates (FAISS' IndexRefine idea)."""
        safe = np.maximum(rows, 0)
        exact = np.einsum("qcd,qd->qc", self.raw(safe), queries)
        exact[rows < 0] = -np.inf
        order = np.argsort(-exact, axis=1)[:, :k]
        scores = np.take_along_axis(exact, order, axis=1)
        picked = np.take_along_axis(rows, order, axis=1)
        picked[~np.isfinite(scores)] = -1
        return scores.astype(np.float32), picked

    def vectors16(self, rows: np.ndarray) -> np.ndarray:
        """float16 vectors of `rows` (what hits carry to the router's collapse)."""
        if self.vectors is not None:
            return self.vectors[rows]
        return self.raw(rows).astype(np.float16)

    def raw(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of `rows`: kept ones, else decoded from the index (lossy for PQ)."""
        if self.vectors is not None:
            return self.vectors[rows].astype(np.float32)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:  # type: ignore[attr-defined]
            ivf.make_direct_map()
        flat = np.asarray(rows, dtype=np.int64).reshape(-1)
        return self.index.reconstruct_batch(flat).reshape(*np.shape(rows), -1)

    def index_bytes(self) -> int:
        """Memory of the ANN structure, the raw vectors and the row tables."""
        raw = self.vectors.nbytes if self.vectors is not None else 0
        assert self.lookup is not None
        tables = self.codes.nbytes + self.fields.nbytes + self.ids.nbytes + self.seqs.nbytes \
            + self.versions.nbytes + self.dead.nbytes + self.lookup.nbytes
        return index_bytes(self.index) + raw + tables


def gpu_copy(index: Any, spec: IndexSpec) -> Any:
    """A FAISS GPU copy of a CPU index, or None where this FAISS cannot hold that index on a
    GPU (e.g. fp16 flat codes, which FAISS GPU has only inside IVF): the CPU index serves."""
    options = faiss.GpuClonerOptions()  # type: ignore[attr-defined]  # GPU builds only
    # Flat: GpuIndexFlatIP in fp16 (half the memory and bandwidth of a scan); PQ: fp16 lookup
    # tables, which 64-byte codes need; IVF-Flat: fp16 lists where the spec asks.
    options.useFloat16 = spec.fp16 or spec.kind in ("flat", "ivf_pq")
    try:
        device = faiss.index_cpu_to_gpu(gpu_resources(), 0, index, options)  # type: ignore[attr-defined]
    except RuntimeError:
        return None
    if spec.kind != "flat":
        faiss.GpuParameterSpace().set_index_parameter(  # type: ignore[attr-defined]
            device, "nprobe", min(spec.nprobe, GPU_MAX_K)
        )
    return device


def oversampled_search(
    index: Any, queries: np.ndarray, k: int, keep: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The best `k` rows with `keep` set, from an index that cannot skip rows itself: fetch
    k over the kept fraction (with a margin), drop the rest, widen until every query has
    enough. None when even the widest search cannot (the caller falls back to a selector)."""
    if keep is None:
        return index.search(queries, k) if k <= GPU_MAX_K else None
    passing, total = int(keep.sum()), len(keep)
    nq = len(queries)
    if passing == 0 or k == 0:
        return np.zeros((nq, 0), dtype=np.float32), np.zeros((nq, 0), dtype=np.int64)
    needed, widest = min(k, passing), min(total, GPU_MAX_K)
    fetch = min(widest, math.ceil(k * total / passing * OVERSAMPLE_MARGIN) + 8)
    while True:
        scores, rows = index.search(queries, fetch)
        kept = (rows >= 0) & keep[np.maximum(rows, 0)]
        if kept.sum(axis=1).min() >= needed:
            break
        if fetch >= widest:
            return None
        fetch = min(widest, fetch * 4)
    order = np.argsort(~kept, axis=1, kind="stable")[:, :k]  # kept first, in score order
    picked = np.take_along_axis(rows, order, axis=1)
    picked[~np.take_along_axis(kept, order, axis=1)] = -1
    return np.take_along_axis(scores, order, axis=1), picked


def build_sealed(
    spec: IndexSpec,
    ids: PackedBytes,
    seqs: np.ndarray,
    versions: np.ndarray,
    vectors: np.ndarray,
    codes: np.ndarray,
    fields: PackedBytes,
    base: SealedSegment | None = None,
) -> SealedSegment:
    """A new sealed segment: `base`'s rows followed by the given ones (clone + add, its dead
    rows still dead), or a freshly trained index over the given rows when `base` is None.
    Runs on a worker thread; FAISS releases the GIL while it trains and adds."""
    vectors16 = np.ascontiguousarray(vectors, dtype=np.float16)
    index: Any
    if base is not None:
        index = base.index.clone() if base.kind == "torch" else faiss.clone_index(base.index)
        index.add(vectors16.astype(np.float32))
        assert base.lookup is not None
        merged = SealedSegment(
            index=index,
            ids=base.ids.concat(ids),
            seqs=np.concatenate([base.seqs, seqs]),
            versions=np.concatenate([base.versions, versions]),
            vectors=None if base.vectors is None else np.concatenate([base.vectors, vectors16]),
            codes=np.concatenate([base.codes, codes]),
            fields=base.fields.concat(fields),
            spec=spec,
            trained_on=base.trained_on,
            kind=base.kind,
            lookup=base.lookup.extended(ids, len(base)),
        )
        merged.mark_dead(base.dead)
        return merged
    full = vectors16.astype(np.float32)
    if spec.kind == "torch":
        from services.shard.torch_index import TorchFlatIndex  # torch loads only if asked

        index, trained_on = TorchFlatIndex(full.shape[1]), 0
    else:
        index, trained_on = trained_faiss_index(spec, full)
    index.add(full)
    return SealedSegment(
        index=index, ids=ids, seqs=np.asarray(seqs, dtype=np.int64),
        versions=np.asarray(versions, dtype=np.int64),
        vectors=vectors16 if spec.raw_vectors or spec.kind == "torch" else None,
        codes=np.asarray(codes, dtype=np.float32), fields=fields, spec=spec,
        trained_on=trained_on,
        kind=spec.kind,
    )


def trained_faiss_index(spec: IndexSpec, vectors: np.ndarray) -> tuple[faiss.Index, int]:
    """An empty index of the spec's kind, trained on a sample of `vectors` where it needs it;
    with the number of rows it was trained for (0: needs no training)."""
    n, dim = vectors.shape
    index = faiss.index_factory(dim, spec.factory_string(n, dim), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = spec.ef_construction  # type: ignore[attr-defined]
    if index.is_trained:
        return index, 0
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))  # the stubs lack IVF fields
    ivf.cp.niter = 10  # k-means converges enough for IVF lists; 25 triples the build
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False  # type: ignore[attr-defined]  # slow and unused
        ivf.pq.cp.niter = 10
    index.train(_training_sample(vectors, TRAINING_POINTS_PER_LIST * ivf.nlist))
    return index, n


def needs_rebuild(segment: SealedSegment, adding: int, dead_ratio: float) -> bool:
    """Rebuild rather than append: too many dead rows, an IVF trained on far fewer rows, or an
    index type the settings no longer ask for."""
    if segment.dead_count > dead_ratio * len(segment) or segment.kind != segment.spec.kind:
        return True
    grown = len(segment) + adding > segment.spec.retrain_growth * segment.trained_on
    return bool(segment.trained_on) and grown


def index_bytes(index: Any) -> int:
    """Bytes FAISS holds for `index` (codes, ids, centroids, graph links), without a copy."""
    if not isinstance(index, faiss.Index):
        return int(index.nbytes())  # TorchFlatIndex
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        links = 4 * index.hnsw.neighbors.size()  # type: ignore[attr-defined]
        return index_bytes(index.storage) + links + 4 * index.ntotal
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        centroids = ivf.nlist * ivf.d * 4
        return int(ivf.ntotal * (ivf.code_size + 8) + centroids)
    return int(index.sa_code_size()) * index.ntotal


def _training_sample(vectors: np.ndarray, size: int) -> np.ndarray:
    if len(vectors) <= size:
        return vectors
    rows = np.random.default_rng(0).choice(len(vectors), size, replace=False)
    return vectors[np.sort(rows)]


def _pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask, bitorder="little")
