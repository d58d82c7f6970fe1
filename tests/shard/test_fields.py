"""A hit's product fields live with its vector: growing, sealed, rebuilt, snapshotted."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import msgpack
import numpy as np
import pytest

from proto.vectors import ProductFields, VectorRecord
from services.shard.packed import PackedBytes
from services.shard.segments import IndexSpec, IndexType
from services.shard.snapshot import MANIFEST, Snapshot, load_latest, write_snapshot
from services.shard.store import ShardStore


def unit_vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Catalog:
    """What the log said last, per product: the expectation every hit is checked against."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self.vectors: dict[str, np.ndarray] = {}
        self.fields: dict[str, ProductFields] = {}
        self.versions: dict[str, int] = {}

    def upsert(self, pid: str, vector: np.ndarray, title: str) -> None:
        version = self.versions.get(pid, 0) + 1
        fields = ProductFields(title=title, image_uri=f"file:///img/{pid}-{version}.jpg",
                               attributes={"colour": "red" if version % 2 else "blue"})
        assert self.store.apply(VectorRecord.upsert(
            pid, version, "m", vector, title=fields.title, image_uri=fields.image_uri,
            attributes=fields.attributes,
        ))
        self.vectors[pid], self.fields[pid], self.versions[pid] = vector, fields, version

    def delete(self, pid: str) -> None:
        self.versions[pid] += 1
        assert self.store.apply(VectorRecord.tombstone(pid, self.versions[pid], "m"))
        del self.vectors[pid], self.fields[pid]

    def check(self, store: ShardStore | None = None) -> None:
        store = store or self.store
        assert len(store) == len(self.vectors)
        for pid, fields in self.fields.items():
            found = store.product(pid)
            assert found is not None and ProductFields.unpack(found[1]) == fields, pid
        for pid in set(self.versions) - set(self.fields):
            assert store.product(pid) is None
        pids = sorted(self.vectors)
        hits = store.search(np.stack([self.vectors[p] for p in pids]), 3)
        for ids, fields in zip(hits.ids, hits.fields, strict=True):
            assert ids, "every live product's own vector finds something"
            for pid, packed in zip(ids, fields, strict=True):
                assert ProductFields.unpack(packed) == self.fields[pid], pid
        self.check_vectors(store, np.stack([self.vectors[p] for p in pids]), hits.ids)

    def check_vectors(self, store: ShardStore, queries: np.ndarray, ids: list[list[str]]) -> None:
        """The vectors a search gathers from its rows are the ones a lookup by id finds: the
        latest each product was given, in float16; a product not held has none."""
        found = store.search(queries, 3, with_vectors=True)
        assert found.ids == ids and found.vectors is not None
        for pids, vectors in zip(found.ids, found.vectors, strict=True):
            assert vectors == store.vectors_of(pids)
            assert vectors == [self.vectors[p].astype(np.float16).tobytes() for p in pids]
        gone = sorted(set(self.versions) - set(self.fields))
        assert store.vectors_of([*gone, "never-held"]) == [b""] * (len(gone) + 1)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw", "torch"])
def test_hits_carry_the_latest_fields_through_seals_and_rebuilds(kind: IndexType) -> None:
    vectors = unit_vectors(1_200)
    store = ShardStore(IndexSpec(kind=kind, nprobe=64), ["colour"], seal_threshold=10**9,
                       rebuild_dead_ratio=0.2)
    catalog = Catalog(store)
    for i in range(800):
        catalog.upsert(f"p{i}", vectors[i], f"product {i}")
    asyncio.run(store.seal())  # a fresh sealed segment
    for i in range(0, 800, 10):
        catalog.upsert(f"p{i}", vectors[i], f"retitled {i}")  # title-only: the same vector
    for i in range(5, 800, 50):
        catalog.delete(f"p{i}")
    for i in range(800, 1_000):
        catalog.upsert(f"p{i}", vectors[i], f"late {i}")
    catalog.check()
    asyncio.run(store.seal())  # appended to the sealed segment
    assert store.sealed is not None and store.sealed.kind == kind
    catalog.check()
    for i in range(0, 1_000, 3):  # a third of the sealed rows die: the next seal rebuilds
        catalog.upsert(f"p{i}", vectors[i], f"third {i}")
    asyncio.run(store.seal())
    assert store.sealed.dead_count == 0  # rebuilt: dead rows (and their fields) dropped
    catalog.check()


def test_fields_of_the_growing_and_sealed_rows_survive_a_snapshot(tmp_path: Path) -> None:
    vectors = unit_vectors(300, seed=1)
    store = ShardStore(IndexSpec(kind="hnsw"), ["colour"], seal_threshold=10**9)
    catalog = Catalog(store)
    for i in range(200):
        catalog.upsert(f"p{i}", vectors[i], f"product {i}")
    asyncio.run(store.seal())
    for i in range(200, 300):
        catalog.upsert(f"p{i}", vectors[i], f"growing {i}")
    catalog.upsert("p3", vectors[3], "retitled after the seal")
    catalog.delete("p4")
    write_snapshot(tmp_path, Snapshot(store.export(), {0: 1}, "catalog.vectors", 1, 0))
    found = load_latest(tmp_path, "catalog.vectors", 1, 0, IndexSpec(kind="hnsw"))
    assert found is not None
    restored = ShardStore(IndexSpec(kind="hnsw"), ["colour"])
    restored.load(found.state)
    catalog.check(restored)


def test_a_snapshot_of_the_release_before_still_loads(tmp_path: Path) -> None:
    """Format 2 had no fields files: its rows load without fields, searchable as before."""
    vectors = unit_vectors(120, seed=2)
    store = ShardStore(IndexSpec(kind="ivf_flat"), ["colour"], seal_threshold=10**9)
    for i in range(100):
        store.apply(VectorRecord.upsert(f"p{i}", 1, "m", vectors[i]))
    asyncio.run(store.seal())
    for i in range(100, 120):
        store.apply(VectorRecord.upsert(f"p{i}", 1, "m", vectors[i]))
    path = write_snapshot(tmp_path, Snapshot(store.export(), {0: 9}, "catalog.vectors", 1, 0))
    _as_format_2(path)
    found = load_latest(tmp_path, "catalog.vectors", 1, 0, IndexSpec(kind="ivf_flat"))
    assert found is not None and found.next_offsets == {0: 9}
    restored = ShardStore(IndexSpec(kind="ivf_flat"), ["colour"])
    restored.load(found.state)
    assert len(restored) == 120
    hits = restored.search(vectors[[5, 110]], 1)
    assert hits.ids == [["p5"], ["p110"]] and hits.fields == [[b""], [b""]]
    assert restored.product("p5") == (1, b"")
    new = unit_vectors(1, seed=3)[0]
    restored.apply(VectorRecord.upsert("p5", 2, "m", new, title="now with a title",
                                       image_uri="file:///p5.jpg"))
    assert ProductFields.unpack(restored.search(new[None], 1).fields[0][0]).title == \
        "now with a title"


def _as_format_2(path: Path) -> None:
    """Rewrite a snapshot as the release before wrote it: no fields files, format 2."""
    manifest = json.loads((path / MANIFEST).read_text())
    for name in ("growing_fields.msgpack", "sealed_fields.npy", "sealed_field_offsets.npy",
                 "sealed_ids.npy", "sealed_id_offsets.npy", "sealed_versions.npy"):
        (path / name).unlink()
        del manifest["sha256"][name]
    # format 2 kept the sealed ids as a msgpack list, and every version in one dict
    ids = [f"p{i}" for i in range(100)]
    every = dict.fromkeys(ids, 1) | msgpack.unpackb((path / "versions.msgpack").read_bytes())
    for name, data in (("sealed_ids.msgpack", msgpack.packb(ids)),
                       ("versions.msgpack", msgpack.packb(every))):
        (path / name).write_bytes(data)
        manifest["sha256"][name] = hashlib.sha256(data).hexdigest()
    assert set(manifest["sha256"]) == {
        "versions.msgpack", "vocab.msgpack", "growing_ids.msgpack", "growing_vectors.npy",
        "growing_codes.npy", "sealed.faiss", "sealed_ids.msgpack", "sealed_vectors.npy",
        "sealed_codes.npy", "sealed_dead.npy",
    }
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest
    manifest["format"] = 2
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_packed_bytes() -> None:
    rows = [b"alpha", b"", b"\x00\xff" * 300, "ünïcode".encode()]
    packed = PackedBytes.of(rows)
    assert len(packed) == 4 and [packed[i] for i in range(4)] == rows
    assert packed.nbytes == sum(map(len, rows)) + 8 * 5
    taken = packed.take(np.array([3, 0, 0]))
    assert [taken[i] for i in range(3)] == [rows[3], rows[0], rows[0]]
    both = packed.concat(PackedBytes.of([b"z"]))
    assert [both[i] for i in range(5)] == [*rows, b"z"]
    assert len(PackedBytes.of([])) == 0 and len(PackedBytes.of([]).concat(packed)) == 4
    with pytest.raises(ValueError, match="offsets"):
        PackedBytes(np.zeros(3, np.uint8), np.array([0, 2], np.int64))
    with pytest.raises(ValueError, match="offsets"):
        PackedBytes(np.zeros(3, np.uint8), np.array([0, 2, 1, 3], np.int64))


def test_ids_looked_up_together_find_what_one_at_a_time_finds() -> None:
    """The batched lookup (hits' vectors, lexical candidates) against the single one, in a
    merged segment where updated products have a dead old row beside their live new one."""
    vectors = unit_vectors(600)
    store = ShardStore(IndexSpec(kind="flat"), seal_threshold=10**9, rebuild_dead_ratio=1.0)
    catalog = Catalog(store)
    for i in range(400):
        catalog.upsert(f"p{i}", vectors[i], f"product {i}")
    asyncio.run(store.seal())
    for i in range(0, 400, 3):
        catalog.upsert(f"p{i}", vectors[400 + i % 200], f"moved {i}")
    for i in range(1, 400, 7):
        catalog.delete(f"p{i}")
    asyncio.run(store.seal())  # clone + add: the old rows stay, dead
    sealed = store.sealed
    assert sealed is not None and sealed.dead_count > 0 and not len(store.growing or ())
    asked = [f"p{i}" for i in range(450)] + ["", "p" * 128, "p1"]
    rows = sealed.live_rows_of(asked)
    assert rows == [sealed.live_row(pid) for pid in asked]
    assert {pid for pid, row in zip(asked, rows, strict=True) if row is not None} == \
        set(catalog.vectors)
    catalog.check()
