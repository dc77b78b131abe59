"""Run events as Redis stream entries (app/runs/store.py): an entry holds consecutive framed
events (`Entry`), at most `ENTRY_BYTES` of them per write (`groups_of`, a larger event alone),
recorded with the run's largest-entry bucket (`entry_bucket`); catch-up reads ask for about
`CATCHUP_BYTES` (`next_catchup_count`, `PLAIN_READ_ENTRIES`); replies parsed back
(`entries_of`, `pairs_of`, `text_of`)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Entry:
    """One stream entry: framed events `first`..`seq` (`data`), the end (`end`), or both.
    Weakly referenceable: readers of one run share the large ones (`SharedEntries`)."""

    seq: int
    data: bytes | None = None
    end: str | None = None
    first: int = 0

    def after(self, pos: int) -> bytes:
        """The framed events of this entry after sequence number `pos` (`pos >= first - 1`)."""
        assert self.data is not None
        skip = pos + 1 - self.first
        if skip <= 0:
            return self.data
        parts = self.data.split(b"\n\n")[skip:-1]
        return b"".join(part + b"\n\n" for part in parts)


def text_of(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pairs_of(raw: Any) -> dict[str, Any]:
    """A hash or an entry's fields, from raw RESP2 (a flat list) or a parsed dict."""
    if isinstance(raw, dict):
        return {text_of(k): v for k, v in raw.items()}
    items = list(raw or [])
    return {text_of(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def entries_of(raw: Any) -> list[Entry]:
    """`XRANGE` entries (raw or parsed: `[id, fields]` pairs) as `Entry`s."""
    out: list[Entry] = []
    for item in raw or []:
        entry_id, fields = item[0], pairs_of(item[1])
        seq = int(text_of(entry_id).partition("-")[2])
        end = text_of(fields["x"]) if "x" in fields else None
        if "d" in fields:
            first = int(text_of(fields.get("f", seq)))
            out.append(Entry(seq, data=bytes(fields["d"]), end=end, first=first))
        else:
            out.append(Entry(seq, end=end, first=seq))
    return out


CATCHUP_BYTES = 256 * 1024
"""About what one catch-up read (`range_after`) returns at most: once a batch held more, the
next asks for one entry."""


def next_catchup_count(count: int, entries: Sequence[Entry], most: int) -> int:
    """How many entries the next catch-up read asks for, after one of `count` gave
    `entries`: one when they held over `CATCHUP_BYTES` of events, else twice as many (up to
    `most`), so a run of small events still goes in few round trips."""
    if sum(len(entry.data or b"") for entry in entries) > CATCHUP_BYTES:
        return 1
    return min(most, count * 2)


# Fewer of a run's largest entries than this fit in `CATCHUP_BYTES`: its catch-up reads go
# through `CATCHUP_RANGE` (bounded by the bytes read, a few entries per `XRANGE`).
PLAIN_READ_ENTRIES = 16


def entry_bucket(size: int) -> int:
    """The largest-entry bucket of an entry of `size` bytes: the power of two at or above it,
    at least 1 KiB (a run's bucket grows a few times at most)."""
    return max(1024, 1 << max(0, size - 1).bit_length())


ENTRY_BYTES = 256 * 1024
"""About the most bytes of events one stream entry carries (one larger event: its own entry):
a reader on another replica holds an `XRANGE` batch while it drains to a slow browser
(app/runs/feed.py), so a burst of events grouped in one commit is never one huge entry."""


def groups_of(entries: Sequence[tuple[int, bytes]]) -> list[list[tuple[int, bytes]]]:
    """`entries` in consecutive groups of at most `ENTRY_BYTES` (a larger event alone)."""
    if sum(map(len, map(itemgetter(1), entries))) <= ENTRY_BYTES:  # most writes: one group
        return [list(entries)] if entries else []
    groups: list[list[tuple[int, bytes]]] = []
    size = 0
    for entry in entries:
        if not groups or size + len(entry[1]) > ENTRY_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += len(entry[1])
    return groups


def kept_of(entries: Sequence[tuple[int, bytes]], first_kept: int) -> Sequence[tuple[int, bytes]]:
    """`entries` from sequence number `first_kept` on (the run's log dropped the others)."""
    if not entries or entries[0][0] >= first_kept:
        return entries
    return [entry for entry in entries if entry[0] >= first_kept]


SHARED_ENTRY_BYTES = 64 * 1024
"""Entries of at least this many bytes of events are shared by the readers of a process
(`SharedEntries`); smaller ones are not worth the lookup."""


class SharedEntries:
    """The large entries of runs that readers in this process hold now, by (run, first event
    number), weakly: as long as one reader holds an entry, another reader of that run gets
    the same object (from a read of its own, or instead of one) rather than a copy. So
    readers that read slowly or not at all hold each entry of a run once per process, not
    once each (attack-replay-7: 64 silent readers of 8 runs of one 4.1 MB event grew a
    replica by ~290 MiB). Sharing is safe: an entry id is written once with its data, and the
    caller has checked that the reader may read the run."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: weakref.WeakValueDictionary[tuple[str, int], Entry] = (
            weakref.WeakValueDictionary()
        )

    def starting_at(self, run_id: str, first: int) -> Entry | None:
        """The held entry of `run_id` whose events start at `first`, if a reader holds one."""
        return self._held.get((run_id, first))

    def share(self, run_id: str, entries: list[Entry]) -> list[Entry]:
        """`entries` of `run_id` just read, each large one replaced by the held one of the same
        entry (the copy just read is then dropped) or held from now on."""
        out = entries
        for index, entry in enumerate(entries):
            if entry.data is None or len(entry.data) < SHARED_ENTRY_BYTES:
                continue
            key = (run_id, entry.first)
            held = self._held.get(key)
            if held is not None and held.seq == entry.seq and held.end == entry.end:
                if out is entries:
                    out = list(entries)
                out[index] = held
            else:
                self._held[key] = entry
        return out
