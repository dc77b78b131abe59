"""Open counts per key (per client, per session, per run): a key is present only while its
count is above 0, so a count map stays as small as what is open."""

from __future__ import annotations


def increment(counts: dict[str, int], key: str) -> None:
    """One more open for `key`."""
    counts[key] = counts.get(key, 0) + 1


def decrement(counts: dict[str, int], key: str) -> None:
    """One fewer open for `key` (which must be counted); the key goes when it reaches 0."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
