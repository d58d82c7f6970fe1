"""How often each event in flight has been tried, in a file that outlives the process.

The encoder commits offsets only after a batch's outcomes are acknowledged, so a process that
dies on an event (a native crash, an OOM kill, a liveness kill after a hang) re-reads it on
restart and would die again, forever. The ledger breaks that loop: before a batch it counts a
try for each of its events, after the outcomes are acknowledged it forgets them. An entry still
there when a batch arrives was left by a process that died on it: the worker then goes event
by event, and an event tried `max_attempts` times is quarantined to the dead-letter topic
instead of being tried again. On Kubernetes the file lives in the pod's emptyDir, which
survives container restarts. Covered by tests/encoder/test_attempts.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import structlog

log = structlog.get_logger()


class Located(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


Position = tuple[str, int, int]


def position(event: Located) -> Position:
    return (event.topic, event.partition, event.offset)


class AttemptLedger:
    def __init__(self, path: Path | None) -> None:
        """`path` None keeps the counts in memory only (they then die with the process)."""
        self._path = path
        self._tries: dict[Position, int] = self._load()
        if self._tries:
            log.warning("events left in flight by a previous process", events=len(self._tries))

    def inherited(self, events: Iterable[Located]) -> bool:
        """Did a process die while one of these events was in flight?"""
        return any(position(event) in self._tries for event in events)

    def begin(self, events: Iterable[Located]) -> dict[Position, int]:
        """Count one more try of each event (and keep it on disk); returns the counts."""
        counts = {}
        for event in events:
            where = position(event)
            self._tries[where] = counts[where] = self._tries.get(where, 0) + 1
        self._save()
        return counts

    def settle(self, events: Iterable[Located]) -> None:
        """The events' outcomes are acknowledged, or their failure was not theirs: forget them."""
        for event in events:
            self._tries.pop(position(event), None)
        self._save()

    def _load(self) -> dict[Position, int]:
        if self._path is None or not self._path.exists():
            return {}
        try:
            rows = json.loads(self._path.read_text())
            return {(str(t), int(p), int(o)): int(n) for t, p, o, n in rows}
        except (OSError, ValueError, TypeError) as exc:  # torn or foreign: start afresh
            log.warning("attempt ledger unreadable, starting empty", path=str(self._path),
                        error=str(exc))
            return {}

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps([[*where, tries] for where, tries in self._tries.items()]))
        os.replace(tmp, self._path)  # whole or not at all; a process crash keeps the page cache
