"""Shard snapshots: the index, id map, versions (tombstones included) and the offset consumed
on every owned partition, written as one consistent cut.

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
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import structlog

log = structlog.get_logger()

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    ids: list[str]
    vectors: np.ndarray  # float32 (n, dim)
    versions: dict[str, int]  # every product ever applied, deletes included
    next_offsets: dict[int, int]  # partition -> next offset to consume
    topic: str
    num_shards: int
    shard_id: int


def write_snapshot(directory: Path, snapshot: Snapshot, keep: int = 2) -> Path:
    """Write atomically and keep the newest `keep` snapshots."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"snapshot-{time.time_ns():020d}"
    tmp = directory / f".{name}.tmp"
    tmp.mkdir()
    files = {
        "vectors.npy": _npy_bytes(snapshot.vectors),
        "ids.msgpack": msgpack.packb(snapshot.ids),
        "versions.msgpack": msgpack.packb(snapshot.versions),
    }
    for filename, data in files.items():
        _write_synced(tmp / filename, data)
    manifest = {
        "format": FORMAT_VERSION,
        "topic": snapshot.topic,
        "num_shards": snapshot.num_shards,
        "shard_id": snapshot.shard_id,
        "next_offsets": {str(p): o for p, o in snapshot.next_offsets.items()},
        "count": len(snapshot.ids),
        "sha256": {filename: hashlib.sha256(data).hexdigest() for filename, data in files.items()},
    }
    _write_synced(tmp / MANIFEST, json.dumps(manifest).encode())
    _fsync_dir(tmp)
    final = directory / name
    tmp.rename(final)
    _fsync_dir(directory)
    for old in _snapshots(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(directory: Path, topic: str, num_shards: int, shard_id: int) -> Snapshot | None:
    """The newest valid snapshot for this shard layout, or None."""
    for path in _snapshots(directory):
        try:
            snapshot = _load(path)
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            log.warning("skipping unreadable snapshot", path=str(path), reason=str(exc))
            continue
        layout = (snapshot.topic, snapshot.num_shards, snapshot.shard_id)
        if layout != (topic, num_shards, shard_id):
            log.warning("skipping snapshot of another layout", path=str(path), layout=layout)
            continue
        return snapshot
    return None


def _load(path: Path) -> Snapshot:
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest["format"] != FORMAT_VERSION:
        raise ValueError(f"snapshot format {manifest['format']} is not {FORMAT_VERSION}")
    data = {}
    for filename, digest in manifest["sha256"].items():
        data[filename] = (path / filename).read_bytes()
        if hashlib.sha256(data[filename]).hexdigest() != digest:
            raise ValueError(f"{filename} does not match its checksum (torn or corrupt)")
    vectors = np.load(io.BytesIO(data["vectors.npy"]), allow_pickle=False)
    ids = msgpack.unpackb(data["ids.msgpack"])
    if len(ids) != manifest["count"] or len(vectors) != len(ids):
        raise ValueError("snapshot counts do not match")
    return Snapshot(
        ids=ids,
        vectors=np.ascontiguousarray(vectors, dtype=np.float32),
        versions=msgpack.unpackb(data["versions.msgpack"]),
        next_offsets={int(p): int(o) for p, o in manifest["next_offsets"].items()},
        topic=manifest["topic"],
        num_shards=manifest["num_shards"],
        shard_id=manifest["shard_id"],
    )


def _snapshots(directory: Path) -> list[Path]:
    """Complete snapshot directories, newest first (temporary ones start with a dot)."""
    if not directory.exists():
        return []
    return sorted(directory.glob("snapshot-*"), reverse=True)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


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
