"""Readers of one run in one process share the large entries they hold (app/runs/entries.py
`SharedEntries`, used by app/runs/store.py `range_after`): the silent-readers attack through
HTTP is tests/test_runs_budget_attacks4.py."""

from __future__ import annotations

import gc

from app.runs.entries import SHARED_ENTRY_BYTES, Entry, SharedEntries

BIG = b"data: " + b"x" * SHARED_ENTRY_BYTES + b"\n\n"


def _read(seq: int, data: bytes = BIG, first: int | None = None) -> Entry:
    """A fresh copy of an entry, as each `XRANGE` reply gives one."""
    return Entry(seq, data=bytes(bytearray(data)), first=seq if first is None else first)


def test_a_second_read_of_a_held_entry_gets_the_held_object() -> None:
    shared = SharedEntries()
    (first,) = shared.share("run1", [_read(3)])
    (second,) = shared.share("run1", [_read(3)])
    assert second is first and second.data is first.data
    assert shared.starting_at("run1", 3) is first


def test_entries_of_other_runs_or_positions_are_not_shared() -> None:
    shared = SharedEntries()
    (held,) = shared.share("run1", [_read(3)])
    (other_run,) = shared.share("run2", [_read(3)])
    assert other_run is not held
    assert shared.starting_at("run1", 4) is None
    assert shared.starting_at("run3", 3) is None


def test_an_entry_nobody_holds_is_forgotten() -> None:
    shared = SharedEntries()
    shared.share("run1", [_read(3)])  # read, written, dropped
    gc.collect()
    assert shared.starting_at("run1", 3) is None


def test_small_entries_are_not_shared() -> None:
    shared = SharedEntries()
    small = b"data: hi\n\n"
    (first,) = shared.share("run1", [_read(3, small)])
    (second,) = shared.share("run1", [_read(3, small)])
    assert second is not first
    assert shared.starting_at("run1", 3) is None


def test_a_rewritten_entry_with_other_events_replaces_the_held_one() -> None:
    """A stream written again (after a Redis restart) may group events otherwise: the same
    first event, a different last one, is another entry."""
    shared = SharedEntries()
    (held,) = shared.share("run1", [_read(5, first=3)])
    (regrouped,) = shared.share("run1", [_read(4, first=3)])
    assert regrouped is not held
    assert shared.starting_at("run1", 3) is regrouped
    assert held.seq == 5  # the reader holding the old one keeps it
