"""The attempt ledger outlives the process that wrote it: a restart knows what killed it."""

from __future__ import annotations

from pathlib import Path

from services.encoder.attempts import AttemptLedger
from services.encoder.pipeline import RawEvent


def events(*offsets: int, partition: int = 0) -> list[RawEvent]:
    return [RawEvent("catalog.events", partition, o, b"k", b"v") for o in offsets]


def test_a_batch_in_flight_when_the_process_died_is_inherited(tmp_path: Path) -> None:
    path = tmp_path / "attempts.json"
    first = AttemptLedger(path)
    assert first.begin(events(10, 11, 12)) == {
        ("catalog.events", 0, 10): 1, ("catalog.events", 0, 11): 1, ("catalog.events", 0, 12): 1
    }
    # the process dies here; the next one reads the file
    second = AttemptLedger(path)
    assert second.inherited(events(11, 12, 13))
    assert not second.inherited(events(11, partition=1))
    assert second.begin(events(11)) == {("catalog.events", 0, 11): 2}


def test_settled_events_are_forgotten_on_disk_too(tmp_path: Path) -> None:
    path = tmp_path / "attempts.json"
    ledger = AttemptLedger(path)
    ledger.begin(events(1, 2))
    ledger.settle(events(1, 2))
    assert not AttemptLedger(path).inherited(events(1, 2))


def test_tries_add_up_across_restarts_until_the_event_settles(tmp_path: Path) -> None:
    path = tmp_path / "attempts.json"
    for expected in (1, 2, 3):
        assert AttemptLedger(path).begin(events(7)) == {("catalog.events", 0, 7): expected}
    AttemptLedger(path).settle(events(7))
    assert AttemptLedger(path).begin(events(7)) == {("catalog.events", 0, 7): 1}


def test_a_torn_ledger_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "attempts.json"
    path.write_text('[["catalog.events", 0, 1')
    ledger = AttemptLedger(path)
    assert not ledger.inherited(events(1))
    assert ledger.begin(events(1)) == {("catalog.events", 0, 1): 1}


def test_without_a_path_the_ledger_lives_in_memory() -> None:
    ledger = AttemptLedger(None)
    ledger.begin(events(1))
    assert ledger.inherited(events(1))
