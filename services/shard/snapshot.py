"""Shard snapshots: both segments (the sealed FAISS index with its per-row tables: ids,
versions, product fields, dead rows; the growing buffer), the versions no live sealed row
carries (growing products, tombstones), the attribute vocabulary and the offset consumed on
every owned partition, written as one consistent cut.

Formats: 3 adds the product fields of every row, keeps the sealed ids and versions as arrays,
and the filter columns as float32 with price and stock after the attribute codes. A format 2
snapshot (the release before) still loads, its rows without fields and of unknown price and
stock, exactly as a replay of the version 1 records it was built from would leave them.

Atomic by construction: files go to a temporary directory, are fsynced, and the directory is
renamed into place; a manifest with each file's SHA-256 is written last. Loading walks from
the newest snapshot back and skips any that is torn or corrupt, with a log line.
Covered by tests/shard/test_snapshot.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import msgpack
import numpy as np
import structlog

from services.shard.attributes import NUMBERS
from services.shard.packed import PackedBytes
from services.shard.segments import IndexSpec, SealedSegment
from services.shard.store import StoreState

log = structlog.get_logger()

MANIFEST = "manifest.json"
LEXICAL = "lexical"
FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)


@dataclass(frozen=True)
class Snapshot:
    state: StoreState
    next_offsets: dict[int, int]  # partition -> next offset to consume
    topic: str
    num_shards: int
    shard_id: int


def write_snapshot(directory: Path, snapshot: Snapshot, keep: int = 2) -> Path:
    """Write atomically and keep the newest `keep` snapshots. Runs on a worker thread: the
    sealed index is immutable, so serialising it here needs no copy on the event loop."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"snapshot-{time.time_ns():020d}"
    tmp = directory / f".{name}.tmp"
    tmp.mkdir()
    digests = {}
    for filename, data in _files_of(snapshot.state):
        digests[filename] = hashlib.sha256(data).hexdigest()
        _write_synced(tmp / filename, data)
    state = snapshot.state
    lexical = None
    if state.lexical is not None:  # the store's checkpoint: hard links, moved in whole
        shutil.move(str(state.lexical), tmp / LEXICAL)
        lexical = {f.name: f.stat().st_size for f in sorted((tmp / LEXICAL).iterdir())}
    manifest = {
        "format": FORMAT_VERSION,
        "topic": snapshot.topic,
        "num_shards": snapshot.num_shards,
        "shard_id": snapshot.shard_id,
        "next_offsets": {str(p): o for p, o in snapshot.next_offsets.items()},
        "dim": state.dim,
        "growing": len(state.growing_ids),
        "sealed": _sealed_manifest(state.sealed),
        "lexical": lexical,  # file -> size (tantivy checks its own files' contents)
        "sha256": digests,
    }
    _write_synced(tmp / MANIFEST, json.dumps(manifest).encode())
    _fsync_dir(tmp)
    final = directory / name
    tmp.rename(final)
    _fsync_dir(directory)
    for old in _snapshots(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(
    directory: Path, topic: str, num_shards: int, shard_id: int, spec: IndexSpec | None = None
) -> Snapshot | None:
    """The newest valid snapshot for this shard layout, or None. `spec` is how its sealed
    segment will be searched (the current settings, not the ones it was built with)."""
    for path in _snapshots(directory):
        try:
            snapshot = _load(path, spec or IndexSpec())
        except (OSError, ValueError, KeyError, TypeError, RuntimeError,
                msgpack.UnpackException) as exc:
            log.warning("skipping unreadable snapshot", path=str(path), reason=str(exc))
            continue
        layout = (snapshot.topic, snapshot.num_shards, snapshot.shard_id)
        if layout != (topic, num_shards, shard_id):
            log.warning("skipping snapshot of another layout", path=str(path), layout=layout)
            continue
        return snapshot
    return None


def _files_of(state: StoreState) -> Iterator[tuple[str, bytes]]:
    """One file at a time, so a snapshot never holds two serialised copies in memory."""
    yield "versions.msgpack", msgpack.packb(state.versions)
    yield "vocab.msgpack", msgpack.packb(state.vocab)
    yield "growing_ids.msgpack", msgpack.packb(state.growing_ids)
    yield "growing_vectors.npy", _npy_bytes(state.growing_vectors)
    yield "growing_codes.npy", _npy_bytes(state.growing_codes)
    yield "growing_fields.msgpack", msgpack.packb(state.growing_fields, use_bin_type=True)
    sealed = state.sealed
    if sealed is not None:
        if sealed.kind != "torch":  # a torch index is its raw vectors: rebuilt on load
            yield "sealed.faiss", faiss.serialize_index(sealed.index).tobytes()
        yield "sealed_ids.npy", _npy_bytes(sealed.ids.data)
        yield "sealed_id_offsets.npy", _npy_bytes(sealed.ids.offsets)
        yield "sealed_versions.npy", _npy_bytes(sealed.versions)
        if sealed.vectors is not None:
            yield "sealed_vectors.npy", _npy_bytes(sealed.vectors)
        yield "sealed_codes.npy", _npy_bytes(sealed.codes)
        yield "sealed_fields.npy", _npy_bytes(sealed.fields.data)
        yield "sealed_field_offsets.npy", _npy_bytes(sealed.fields.offsets)
        yield "sealed_dead.npy", _npy_bytes(state.sealed_dead)


def _sealed_manifest(sealed: SealedSegment | None) -> dict[str, Any] | None:
    if sealed is None:
        return None
    return {
        "rows": len(sealed), "kind": sealed.kind, "trained_on": sealed.trained_on,
        "raw_vectors": sealed.vectors is not None,
    }


def _load(path: Path, spec: IndexSpec) -> Snapshot:
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest["format"] not in READABLE_FORMATS:
        raise ValueError(f"snapshot format {manifest['format']} is not one of {READABLE_FORMATS}")
    with_fields = manifest["format"] >= 3

    def read(filename: str) -> bytes:
        data = (path / filename).read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["sha256"][filename]:
            raise ValueError(f"{filename} does not match its checksum (torn or corrupt)")
        return data

    versions = msgpack.unpackb(read("versions.msgpack"))
    growing_ids = msgpack.unpackb(read("growing_ids.msgpack"))
    growing_vectors = _npy(read("growing_vectors.npy"))
    growing_fields = (
        msgpack.unpackb(read("growing_fields.msgpack")) if with_fields
        else [b""] * len(growing_ids)
    )
    if not len(growing_ids) == manifest["growing"] == len(growing_vectors) == len(growing_fields):
        raise ValueError("snapshot counts do not match")
    sealed, dead = None, np.zeros(0, dtype=bool)
    if manifest["sealed"] is not None:
        meta = manifest["sealed"]
        if with_fields:
            ids = PackedBytes(_npy(read("sealed_ids.npy")), _npy(read("sealed_id_offsets.npy")))
            row_versions = _npy(read("sealed_versions.npy"))
        else:  # format 2: ids as a list, every version in the one dict
            listed = msgpack.unpackb(read("sealed_ids.msgpack"))
            ids = PackedBytes.of(pid.encode() for pid in listed)
            row_versions = np.array([versions.get(pid, 0) for pid in listed], dtype=np.int64)
        vectors = _npy(read("sealed_vectors.npy")) if meta["raw_vectors"] else None
        if meta["kind"] == "torch":
            from services.shard.torch_index import TorchFlatIndex

            assert vectors is not None  # a torch index is its raw vectors
            index: Any = TorchFlatIndex(vectors.shape[1])
            index.add(vectors)
        else:
            index = faiss.deserialize_index(np.frombuffer(read("sealed.faiss"), dtype=np.uint8))
        fields = (
            PackedBytes(_npy(read("sealed_fields.npy")), _npy(read("sealed_field_offsets.npy")))
            if with_fields else PackedBytes.of([b""] * len(ids))
        )
        if not len(ids) == len(row_versions) == len(fields):
            raise ValueError("sealed segment tables do not line up")
        sealed = SealedSegment(
            index=index, ids=ids, seqs=np.zeros(len(ids), dtype=np.int64),
            versions=row_versions, vectors=vectors,
            codes=_filter_columns(_npy(read("sealed_codes.npy")), with_fields),
            fields=fields, spec=spec, trained_on=meta["trained_on"], kind=meta["kind"],
        )
        dead = _npy(read("sealed_dead.npy")).astype(bool)
        raw_rows = len(ids) if vectors is None else len(vectors)
        if not len(ids) == meta["rows"] == index.ntotal == raw_rows == len(dead):
            raise ValueError("sealed segment counts do not match")
        if not with_fields:  # a live sealed row carries its version: keep the rest only
            for row in np.flatnonzero(~dead).tolist():
                versions.pop(sealed.product_id(row), None)
    lexical = None
    if manifest.get("lexical"):  # derived data: a damaged copy costs a rebuild, not the cut
        lexical = path / LEXICAL
        torn = [name for name, size in manifest["lexical"].items()
                if not (lexical / name).is_file() or (lexical / name).stat().st_size != size]
        if torn:
            log.warning("snapshot's lexical index is torn: it will be rebuilt", files=torn[:3])
            lexical = None
    state = StoreState(
        dim=manifest["dim"],
        lexical=lexical,
        versions=versions,
        vocab=msgpack.unpackb(read("vocab.msgpack")),
        growing_ids=growing_ids,
        growing_vectors=np.ascontiguousarray(growing_vectors, dtype=np.float32),
        growing_codes=_filter_columns(_npy(read("growing_codes.npy")), with_fields),
        growing_fields=growing_fields,
        sealed=sealed,
        sealed_dead=dead,
    )
    return Snapshot(
        state=state,
        next_offsets={int(p): int(o) for p, o in manifest["next_offsets"].items()},
        topic=manifest["topic"],
        num_shards=manifest["num_shards"],
        shard_id=manifest["shard_id"],
    )


def _filter_columns(codes: np.ndarray, current: bool) -> np.ndarray:
    """Format 2 kept int32 attribute codes only: as float32, with price and stock unknown."""
    if current:
        return codes
    unknown = np.full((len(codes), len(NUMBERS)), np.nan, dtype=np.float32)
    return np.concatenate([codes.astype(np.float32), unknown], axis=1)


def _snapshots(directory: Path) -> list[Path]:
    """Complete snapshot directories, newest first (temporary ones start with a dot)."""
    if not directory.exists():
        return []
    return sorted(directory.glob("snapshot-*"), reverse=True)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
