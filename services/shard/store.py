"""A shard's content: which product holds which version, in a growing and a sealed segment.

A record is applied only if its version is newer than the one held (deletes included, so a
replayed old upsert cannot resurrect a deleted product). Replays and duplicates change nothing.

New vectors land in the exact growing buffer (services/shard/index.py). Past `seal_threshold`
the replicator calls `seal()`: the buffer is frozen, merged into a new sealed ANN segment on a
worker thread (services/shard/segments.py), and swapped in on the event loop. Writes keep
flowing during the build: every live vector carries a change number (`seq`), and at the swap a
row of the new segment counts only if its product still holds that exact change. Searches run
against whatever segments are current and never wait for a build.

Each row carries its product's packed fields (`proto.vectors.ProductFields`: title, image,
attributes) beside the vector, so a hit leaves the shard complete: the log is the only home of
what an answer shows.

Memory: the sealed segment, where nearly every product lives, keeps its ids, versions, change
numbers and fields in numpy tables with an id -> row lookup (services/shard/packed.py). Python
dicts hold only what is small: the growing buffer's products and the versions of deleted
products (their tombstones), plus products changed since the last seal.
"""

from __future__ import annotations

import asyncio
import heapq
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import structlog

from proto.vectors import ProductFields, VectorRecord
from services.shard.attributes import AttributeCodes, CompiledFilter, RowFilter
from services.shard.index import ExactIndex
from services.shard.lexical import LexicalIndex
from services.shard.packed import PackedBytes
from services.shard.segments import IndexSpec, SealedSegment, build_sealed, needs_rebuild
from vitrine.errors import InvalidMessage

log = structlog.get_logger()


class Segment(Protocol):
    """What the store searches: the exact growing buffer (ExactIndex) and the sealed ANN
    segment (SealedSegment, over a FAISS or a torch index). Rows are -1 where fewer than k
    pass; a row is read back with `product_id` / `product_fields` before the next change."""

    def __len__(self) -> int: ...

    def search(
        self, queries: np.ndarray, k: int, where: CompiledFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def product_id(self, row: int) -> str: ...

    def product_fields(self, row: int) -> bytes: ...

    def vectors16(self, rows: np.ndarray) -> np.ndarray: ...


class Hits(NamedTuple):
    """Per query, best first: scores, product ids and their packed fields, aligned; with
    each hit's float16 vector bytes when the search was asked for them (else None)."""

    scores: list[list[float]]
    ids: list[list[str]]
    fields: list[list[bytes]]
    vectors: list[list[bytes]] | None = None

    def head(self, k: int, start: int = 0, stop: int | None = None) -> Hits:
        """The best k of each query in [start, stop)."""
        rows = slice(start, stop)
        return Hits(
            [row[:k] for row in self.scores[rows]],
            [row[:k] for row in self.ids[rows]],
            [row[:k] for row in self.fields[rows]],
            None if self.vectors is None else [row[:k] for row in self.vectors[rows]],
        )


@dataclass
class StoreState:
    """A consistent cut of a store: what a snapshot writes and a restart loads."""

    dim: int
    versions: dict[str, int]  # every version a live sealed row does not carry: the growing
    # buffer's products and tombstones (a live sealed row carries its own, in the segment)
    vocab: dict[str, list[str]]
    growing_ids: list[str]
    growing_vectors: np.ndarray  # float32
    growing_codes: np.ndarray  # float32 filter columns (services/shard/attributes.py)
    growing_fields: list[bytes]
    sealed: SealedSegment | None  # immutable but for `dead`, which is copied below
    sealed_dead: np.ndarray
    lexical: Path | None = None  # a checkpoint of the lexical index's files (None: rebuild)


@dataclass
class _SealJob:
    """What a seal froze: the rows to build from, and the segment they extend (if any)."""

    base: SealedSegment | None
    ids: PackedBytes
    seqs: np.ndarray
    versions: np.ndarray
    vectors: np.ndarray
    codes: np.ndarray
    fields: PackedBytes
    from_growing: list[str]  # frozen growing products: they leave the buffer at the swap
    generation: int


class ShardStore:
    def __init__(
        self,
        spec: IndexSpec | None = None,
        filter_fields: Sequence[str] = (),
        seal_threshold: int = 20_000,
        rebuild_dead_ratio: float = 0.2,
        use_gpu: bool | None = None,
        lexical_match_all: bool = True,
        lexical_dir: Path | None = None,
    ) -> None:
        """`lexical_dir`: where the lexical index lives and checkpoints for snapshots (None:
        in memory, rebuilt from the products on a restore)."""
        self.spec = spec or IndexSpec()
        self.seal_threshold = seal_threshold
        self.rebuild_dead_ratio = rebuild_dead_ratio
        self._use_gpu = use_gpu
        self._fields = list(filter_fields)
        self._match_all = lexical_match_all
        self._lexical_dir = lexical_dir
        self.clear()

    def clear(self) -> None:
        self._generation = getattr(self, "_generation", 0) + 1
        self.attributes = AttributeCodes(self._fields)
        self.lexical = self._new_lexical()
        self.dim: int | None = None
        self.growing: ExactIndex | None = None
        self.sealed: SealedSegment | None = None
        self._versions: dict[str, int] = {}  # what live sealed rows do not say (StoreState)
        self._growing_seqs: dict[str, int] = {}  # growing product -> its change number
        self._next_seq = 0
        self._touched: set[str] | None = None  # products changed while a seal is building
        self.sealing = False

    def __len__(self) -> int:
        sealed = self.sealed
        live_sealed = len(sealed) - sealed.dead_count if sealed is not None else 0
        return len(self._growing_seqs) + live_sealed

    def version_of(self, product_id: str) -> int | None:
        """The version this shard holds for a product, deleted ones included (None: never)."""
        version = self._versions.get(product_id)
        if version is not None or self.sealed is None:
            return version
        row = self.sealed.live_row(product_id)
        return None if row is None else int(self.sealed.versions[row])

    def apply(self, record: VectorRecord) -> bool:
        """True if the record changed the shard; False for a stale or duplicate record."""
        pid = record.product_id
        held = self.version_of(pid)
        if held is not None and held >= record.version:
            return False
        if record.op == "delete":
            if self.growing is not None:
                self.growing.remove(pid)
            self._growing_seqs.pop(pid, None)
            self._kill_sealed(pid)
            self.lexical.delete(pid)
        else:
            growing = self._growing_for(record.dim)
            self._kill_sealed(pid)
            fields = record.fields()
            row = self.attributes.encode(record.attributes, record.price, record.in_stock)
            growing.upsert(pid, record.as_array(), row, fields.pack())
            self._growing_seqs[pid] = self._take_seqs(1)
            self.lexical.upsert(pid, fields)
        self._versions[pid] = record.version
        if self._touched is not None:
            self._touched.add(pid)
        return True

    def search(
        self, queries: np.ndarray, k: int,
        filters: RowFilter | Mapping[str, Sequence[str]] | None = None,
        with_vectors: bool = False,
    ) -> Hits:
        """Both segments searched, filters applied inside each scan, then merged by score.
        `with_vectors`: each hit's vector too, gathered from the rows the scan returned."""
        where = self.attributes.compile(filters) if filters else None
        nq = len(queries)
        if self.dim is not None and queries.shape[1] != self.dim:
            raise InvalidMessage(f"queries of dim {queries.shape[1]}, the shard holds {self.dim}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = []
        segments: list[Segment | None] = [self.growing, self.sealed]
        for segment in segments:
            if segment is not None and len(segment):
                found.append((segment, *segment.search(queries, k, where)))
        hits = Hits([], [], [], [] if with_vectors else None)
        for q in range(nq):
            candidates: list[tuple[float, str, bytes, bytes]] = []
            for segment, scores, rows in found:
                kept = rows[q] >= 0
                picked = rows[q][kept]
                vectors = segment.vectors16(picked) if with_vectors else None
                candidates.extend(
                    (score, segment.product_id(row), segment.product_fields(row),
                     vectors[i].tobytes() if vectors is not None else b"")
                    for i, (score, row) in enumerate(zip(scores[q][kept].tolist(),
                                                         picked.tolist(), strict=True))
                )
            best = heapq.nlargest(k, candidates, key=_by_score)
            hits.scores.append([hit[0] for hit in best])
            hits.ids.append([hit[1] for hit in best])
            hits.fields.append([hit[2] for hit in best])
            if hits.vectors is not None:
                hits.vectors.append([hit[3] for hit in best])
        return hits

    def lexical_search(
        self, texts: Sequence[str], k: int, filters: RowFilter | None = None
    ) -> Hits:
        """BM25 over the products' text, filters inside the search; every candidate checked
        against the store (a document the index has not refreshed yet never shows)."""
        where = self.attributes.compile(filters) if filters else None
        found = Hits([], [], [])
        for text in texts:
            hits = self.lexical.search(text, k, filters)
            rows = self._rows_of([pid for _, pid in hits])
            kept = [(score, pid, row) for (score, pid), row in zip(hits, rows, strict=True)
                    if row is not None and (where is None or where.mask(row[0][None])[0])]
            found.scores.append([score for score, _, _ in kept])
            found.ids.append([pid for _, pid, _ in kept])
            found.fields.append([row[1] for _, _, row in kept if row is not None])
        return found

    def vectors_of(self, product_ids: Sequence[str]) -> list[bytes]:
        """Each live product's vector as float16 bytes (b"" for one no longer held); the
        sealed ones looked up and read together."""
        out = [b""] * len(product_ids)
        sealed_rows = self._sealed_rows_of(product_ids)
        for i, pid in enumerate(product_ids):
            if pid in self._growing_seqs:
                assert self.growing is not None
                out[i] = self.growing.vector_of(pid).astype(np.float16).tobytes()
        held = [(i, row) for i, row in enumerate(sealed_rows) if row is not None]
        if held:
            assert self.sealed is not None
            vectors = self.sealed.vectors16(np.array([row for _, row in held]))
            for (i, _), vector in zip(held, vectors, strict=True):
                out[i] = vector.tobytes()
        return out

    def rebuild_lexical(self) -> None:
        """The lexical index from the products held (a snapshot without one): derived data."""
        self.lexical = self._new_lexical()
        if self.growing is not None:
            for pid in self._growing_seqs:
                fields = ProductFields.unpack(self.growing.fields_of(pid))
                self.lexical.upsert(pid, fields, fresh=True)
        sealed = self.sealed
        if sealed is not None:
            for row in sealed.live_rows().tolist():
                fields = ProductFields.unpack(sealed.fields[row])
                self.lexical.upsert(sealed.product_id(row), fields, fresh=True)
        self.lexical.refresh(force=True)

    def _new_lexical(self) -> LexicalIndex:
        """A fresh index; on disk in a directory of its own per generation (the one it
        replaces may still hold its writer's lock until it is dropped)."""
        if self._lexical_dir is None:
            return LexicalIndex(self._fields, self._match_all)
        directory = self._lexical_dir / f"index-{self._generation}-{time.time_ns()}"
        index = LexicalIndex(self._fields, self._match_all, directory)
        self._collect_lexical(keep=directory)
        return index

    def _collect_lexical(self, keep: Path) -> None:
        """Remove the directories of the indexes `keep` replaces (checkpoints are the
        snapshots' to move, and `export` clears the ones a failed snapshot left)."""
        assert self._lexical_dir is not None
        for old in self._lexical_dir.glob("index-*"):
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def _rows_of(self, product_ids: Sequence[str]) -> list[tuple[np.ndarray, bytes] | None]:
        """(filter columns, packed fields) of each product, None for one not held."""
        out: list[tuple[np.ndarray, bytes] | None] = [None] * len(product_ids)
        for i, (pid, row) in enumerate(zip(product_ids, self._sealed_rows_of(product_ids),
                                           strict=True)):
            if pid in self._growing_seqs:
                assert self.growing is not None
                out[i] = self.growing.codes_of(pid), self.growing.fields_of(pid)
            elif row is not None:
                assert self.sealed is not None
                out[i] = self.sealed.codes[row], self.sealed.fields[row]
        return out

    def _sealed_rows_of(self, product_ids: Sequence[str]) -> list[int | None]:
        """The live sealed row of each product outside the growing buffer, looked up
        together (None: in the buffer, or not held)."""
        rows: list[int | None] = [None] * len(product_ids)
        at = [i for i, pid in enumerate(product_ids) if pid not in self._growing_seqs]
        if self.sealed is not None and at:
            found = self.sealed.live_rows_of([product_ids[i] for i in at])
            for i, row in zip(at, found, strict=True):
                rows[i] = row
        return rows

    def product(self, product_id: str) -> tuple[int, bytes] | None:
        """(version, packed fields) of a live product, or None."""
        if product_id in self._growing_seqs:
            assert self.growing is not None
            return self._versions[product_id], self.growing.fields_of(product_id)
        row = self.sealed.live_row(product_id) if self.sealed is not None else None
        if row is None:
            return None
        assert self.sealed is not None
        return int(self.sealed.versions[row]), self.sealed.fields[row]

    def live_versions(self) -> dict[str, int]:
        """product_id -> version of every product this shard would return: for audits."""
        found = {pid: self._versions[pid] for pid in self._growing_seqs}
        sealed = self.sealed
        if sealed is not None:
            for row in sealed.live_rows().tolist():
                found[sealed.product_id(row)] = int(sealed.versions[row])
        return found

    def nbytes(self) -> int:
        growing = self.growing.nbytes() if self.growing is not None else 0
        return growing + (self.sealed.index_bytes() if self.sealed is not None else 0)

    # sealing

    def wants_seal(self) -> bool:
        if self.sealing or self.growing is None:
            return False
        if len(self.growing) >= self.seal_threshold:
            return True
        sealed = self.sealed
        return sealed is not None and sealed.dead_count > self.rebuild_dead_ratio * len(sealed)

    async def seal(self) -> None:
        """Freeze, build on a worker thread, swap: the loop only pays for freeze and swap."""
        job = self._freeze()

        def build() -> SealedSegment:
            return build_sealed(
                self.spec, job.ids, job.seqs, job.versions, job.vectors, job.codes, job.fields,
                job.base,
            )

        try:
            segment = await asyncio.to_thread(build)
            self._swap(job, segment)
        finally:
            self._touched, self.sealing = None, False

    def _freeze(self) -> _SealJob:
        assert self.growing is not None
        self.sealing, self._touched = True, set()
        growing_ids, vectors, codes, growing_fields = self.growing.export()
        ids = PackedBytes.of(pid.encode() for pid in growing_ids)
        seqs = np.array([self._growing_seqs[pid] for pid in growing_ids], dtype=np.int64)
        versions = np.array([self._versions[pid] for pid in growing_ids], dtype=np.int64)
        fields = PackedBytes.of(growing_fields)
        base = self.sealed
        if base is not None and needs_rebuild(base, len(growing_ids), self.rebuild_dead_ratio):
            live = base.live_rows()
            ids = base.ids.take(live).concat(ids)
            seqs = np.concatenate([base.seqs[live], seqs])
            versions = np.concatenate([base.versions[live], versions])
            vectors = np.concatenate([base.raw(live), vectors])
            codes = np.concatenate([base.codes[live], codes])
            fields = base.fields.take(live).concat(fields)
            base = None
        return _SealJob(base, ids, seqs, versions, vectors, codes, fields, growing_ids,
                        self._generation)

    def _swap(self, job: _SealJob, segment: SealedSegment) -> None:
        """A row of the new segment counts only if its product still holds that exact change;
        the growing products it took over leave the buffer (and their versions the dict)."""
        if job.generation != self._generation:
            return  # the store was cleared or reloaded meanwhile: this build is moot
        first_new = len(job.base) if job.base is not None else 0
        if job.base is not None:
            segment.mark_dead(job.base.dead)  # rows killed during the build
        for pid in self._touched or ():
            row = segment.live_row(pid)
            if row is not None and row >= first_new and \
                    self._growing_seqs.get(pid) != segment.seqs[row]:
                segment.kill(row)  # changed or deleted since the freeze: its newer state wins
        assert self.growing is not None
        for pid in job.from_growing:
            seq = self._growing_seqs.get(pid)
            row = segment.live_row(pid)
            if seq is not None and row is not None and segment.seqs[row] == seq:
                self.growing.remove(pid)
                del self._growing_seqs[pid]
                del self._versions[pid]  # the sealed row carries it now
        self.growing.shrink()
        self.sealed = segment

    # snapshots

    def export(self) -> StoreState:
        """Copied now, on the loop: with the consumed offsets, a consistent cut."""
        if self.growing is not None:
            ids, vectors, codes, fields = self.growing.export()
        else:
            ids, vectors, codes, fields = [], np.zeros((0, 0), np.float32), \
                np.zeros((0, 0), np.float32), []
        sealed = self.sealed
        lexical = None
        if self._lexical_dir is not None:  # hard links of the committed files, taken now
            for stale in self._lexical_dir.glob("checkpoint-*"):  # of a snapshot that failed
                shutil.rmtree(stale, ignore_errors=True)
            lexical = self._lexical_dir / f"checkpoint-{time.time_ns()}"
            self.lexical.checkpoint(lexical)
        return StoreState(
            dim=self.dim or 0,
            versions=dict(self._versions),
            lexical=lexical,
            vocab=self.attributes.export(),
            growing_ids=ids,
            growing_vectors=vectors,
            growing_codes=codes,
            growing_fields=fields,
            sealed=sealed,
            sealed_dead=sealed.dead.copy() if sealed is not None else np.zeros(0, bool),
        )

    def load(self, state: StoreState) -> None:
        """Replace the content with a snapshot's."""
        self.clear()
        self.attributes = AttributeCodes(self._fields, state.vocab)
        self._versions = dict(state.versions)
        if not state.dim:
            return
        self.dim = state.dim
        codes = state.growing_codes
        if codes.shape[1] != self.attributes.width:  # filter fields changed: codes start over
            codes = np.full((len(codes), self.attributes.width), -1, dtype=np.float32)
        self.growing = ExactIndex.from_arrays(
            state.growing_ids, state.growing_vectors.reshape(-1, state.dim), codes,
            self._use_gpu, state.growing_fields,
        )
        first = self._take_seqs(len(state.growing_ids))
        self._growing_seqs = {pid: first + i for i, pid in enumerate(state.growing_ids)}
        if state.sealed is not None:
            sealed = state.sealed
            sealed.mark_dead(state.sealed_dead)
            first = self._take_seqs(len(sealed))
            sealed.seqs = np.arange(first, first + len(sealed), dtype=np.int64)
            self.sealed = sealed
        if not self._open_lexical(state.lexical):
            self.rebuild_lexical()

    def _open_lexical(self, files: Path | None) -> bool:
        """The snapshot's own lexical index, if it has one that matches what it holds."""
        if files is None or self._lexical_dir is None:
            return False
        directory = self._lexical_dir / f"index-{self._generation}-{time.time_ns()}"
        try:
            self.lexical = LexicalIndex.opened(self._fields, self._match_all, directory, files)
        except (OSError, ValueError, RuntimeError) as exc:  # another schema, a damaged file
            log.warning("snapshot's lexical index unusable: rebuilding", reason=str(exc))
            return False
        self._collect_lexical(keep=directory)
        if len(self.lexical) != len(self):
            log.warning("snapshot's lexical index disagrees: rebuilding",
                        documents=len(self.lexical), products=len(self))
            return False
        return True

    def _take_seqs(self, n: int) -> int:
        """The first of `n` fresh change numbers."""
        first, self._next_seq = self._next_seq, self._next_seq + n
        return first

    def _growing_for(self, dim: int) -> ExactIndex:
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise InvalidMessage(f"record of dim {dim} for a shard of dim {self.dim}")
        if self.growing is None:
            self.growing = ExactIndex(dim, self._use_gpu, fields=self.attributes.width)
        return self.growing

    def _kill_sealed(self, pid: str) -> None:
        if self.sealed is not None:
            row = self.sealed.live_row(pid)
            if row is not None:
                self.sealed.kill(row)


def _by_score(hit: tuple[float, str, bytes, bytes]) -> tuple[float, str]:
    return hit[0], hit[1]
