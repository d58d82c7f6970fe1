from __future__ import annotations

from pathlib import Path

import numpy as np

from proto.vectors import VectorRecord
from services.shard.snapshot import Snapshot, load_latest, write_snapshot
from services.shard.store import ShardStore


def snapshot(n: int, offset: int) -> Snapshot:
    vectors = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
    return Snapshot(
        ids=[f"p{i}" for i in range(n)], vectors=vectors,
        versions={**{f"p{i}": 1 for i in range(n)}, "gone": 7},
        next_offsets={0: offset, 2: offset + 1}, topic="catalog.vectors", num_shards=2, shard_id=0,
    )


def load(directory: Path) -> Snapshot | None:
    return load_latest(directory, "catalog.vectors", 2, 0)


def test_a_snapshot_round_trips(tmp_path: Path) -> None:
    written = snapshot(5, 40)
    write_snapshot(tmp_path, written)
    found = load(tmp_path)
    assert found is not None
    assert found.ids == written.ids and found.versions == written.versions
    assert found.next_offsets == {0: 40, 2: 41}
    np.testing.assert_array_equal(found.vectors, written.vectors)


def test_a_torn_snapshot_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    write_snapshot(tmp_path, snapshot(3, 10))
    newest = write_snapshot(tmp_path, snapshot(4, 20))
    vectors = newest / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-16])  # a write cut short
    found = load(tmp_path)
    assert found is not None and found.next_offsets[0] == 10 and len(found.ids) == 3


def test_a_half_written_or_foreign_snapshot_is_ignored(tmp_path: Path) -> None:
    write_snapshot(tmp_path, snapshot(2, 5))
    (tmp_path / ".snapshot-99999999999999999999.tmp").mkdir()  # crashed before the rename
    newest = write_snapshot(tmp_path, snapshot(3, 9))
    (newest / "manifest.json").write_text("{not json")
    assert load(tmp_path).next_offsets[0] == 5  # type: ignore[union-attr]
    assert load_latest(tmp_path, "catalog.vectors", 3, 0) is None  # another shard layout


def test_only_the_newest_snapshots_are_kept(tmp_path: Path) -> None:
    for offset in range(4):
        write_snapshot(tmp_path, snapshot(2, offset), keep=2)
    assert len(list(tmp_path.glob("snapshot-*"))) == 2
    assert load(tmp_path).next_offsets[0] == 3  # type: ignore[union-attr]


def test_a_store_restored_from_its_export_behaves_the_same() -> None:
    store = ShardStore(use_gpu=False)
    for i, vector in enumerate(np.eye(6, dtype=np.float32)):
        store.apply(VectorRecord.upsert(f"p{i}", 1, "m", vector))
    store.apply(VectorRecord.tombstone("p2", 2, "m"))
    restored = ShardStore(use_gpu=False)
    restored.load(*store.export())
    queries = np.eye(6, dtype=np.float32)
    assert restored.search(queries, 3)[1] == store.search(queries, 3)[1]
    assert not restored.apply(VectorRecord.upsert("p2", 1, "m", queries[0]))  # tombstone kept
