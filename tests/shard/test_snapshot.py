from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from proto.vectors import VectorRecord
from services.shard.segments import IndexSpec, IndexType
from services.shard.snapshot import Snapshot, load_latest, write_snapshot
from services.shard.store import ShardStore

FIELDS = ["colour"]


def filled_store(
    n: int, sealed: bool = True, kind: IndexType = "hnsw", raw: bool = True
) -> ShardStore:
    """n products, the first ones sealed, a few updated and deleted after sealing."""
    store = ShardStore(IndexSpec(kind=kind, raw_vectors=raw), FIELDS, seal_threshold=10**9)
    vectors = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
    for i, vector in enumerate(vectors):
        colour = {"colour": "red" if i % 2 else "blue"}
        store.apply(VectorRecord.upsert(f"p{i}", 1, "m", vector, attributes=colour))
    if sealed:
        asyncio.run(store.seal())
    store.apply(VectorRecord.tombstone("p1", 2, "m"))
    store.apply(VectorRecord.upsert("p0", 2, "m", -vectors[0], attributes={"colour": "green"}))
    store.apply(VectorRecord.upsert("late", 1, "m", vectors[2], attributes={"colour": "red"}))
    return store


def snapshot(n: int, offset: int) -> Snapshot:
    return Snapshot(
        state=filled_store(n).export(), next_offsets={0: offset, 2: offset + 1},
        topic="catalog.vectors", num_shards=2, shard_id=0,
    )


def load(directory: Path) -> Snapshot | None:
    return load_latest(directory, "catalog.vectors", 2, 0, IndexSpec(kind="hnsw"))


def restored(found: Snapshot | None) -> ShardStore:
    assert found is not None
    store = ShardStore(IndexSpec(kind="hnsw"), FIELDS)
    store.load(found.state)
    return store


@pytest.mark.parametrize(("kind", "raw"), [("hnsw", True), ("ivf_flat", True),
                                            ("torch", True), ("ivf_flat", False)])
def test_a_snapshot_round_trips_both_segments(tmp_path: Path, kind: IndexType, raw: bool) -> None:
    original = filled_store(40, kind=kind, raw=raw)
    write_snapshot(tmp_path, Snapshot(original.export(), {0: 40, 2: 41}, "catalog.vectors", 2, 0))
    found = load(tmp_path)
    assert found is not None and found.next_offsets == {0: 40, 2: 41}
    store = ShardStore(IndexSpec(kind=kind, raw_vectors=raw), FIELDS)
    store.load(found.state)
    assert store.sealed is not None and (store.sealed.vectors is not None) == raw
    assert store.live_versions() == original.live_versions()
    known = [f"p{i}" for i in range(40)] + ["late", "never published"]
    assert [store.version_of(p) for p in known] == [original.version_of(p) for p in known]
    assert store.version_of("p1") == 2 and store.product("p1") is None  # its tombstone
    assert store.sealed is not None and store.sealed.dead_count == 2  # p0 updated, p1 deleted
    queries = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    assert store.search(queries, 7) == original.search(queries, 7)
    red = {"colour": ["red"]}
    assert store.search(queries, 7, red) == original.search(queries, 7, red)
    assert not store.apply(VectorRecord.upsert("p1", 1, "m", queries[0]))  # tombstone kept


def test_a_torn_snapshot_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    write_snapshot(tmp_path, snapshot(30, 10))
    newest = write_snapshot(tmp_path, snapshot(40, 20))
    vectors = newest / "sealed_vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-16])  # a write cut short
    found = load(tmp_path)
    assert found is not None and found.next_offsets[0] == 10
    assert len(restored(found)) == 30  # 30 products, one deleted, one added late


def test_a_half_written_or_foreign_snapshot_is_ignored(tmp_path: Path) -> None:
    write_snapshot(tmp_path, snapshot(20, 5))
    (tmp_path / ".snapshot-99999999999999999999.tmp").mkdir()  # crashed before the rename
    newest = write_snapshot(tmp_path, snapshot(30, 9))
    (newest / "manifest.json").write_text("{not json")
    assert load(tmp_path).next_offsets[0] == 5  # type: ignore[union-attr]
    assert load_latest(tmp_path, "catalog.vectors", 3, 0) is None  # another shard layout


def test_only_the_newest_snapshots_are_kept(tmp_path: Path) -> None:
    for offset in range(4):
        write_snapshot(tmp_path, snapshot(20, offset), keep=2)
    assert len(list(tmp_path.glob("snapshot-*"))) == 2
    assert load(tmp_path).next_offsets[0] == 3  # type: ignore[union-attr]


def test_a_growing_only_store_round_trips(tmp_path: Path) -> None:
    original = filled_store(12, sealed=False)
    write_snapshot(tmp_path, Snapshot(original.export(), {0: 1}, "catalog.vectors", 2, 0))
    store = restored(load(tmp_path))
    assert store.sealed is None and store.live_versions() == original.live_versions()
