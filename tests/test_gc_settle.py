"""`python -m app` settles the garbage collector once serving: start-up objects frozen out of
the collector's view, the young generation collected less often (shorter full-collection
pauses, less collector CPU per request)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from app.__main__ import _GC_GEN0_THRESHOLD, _settle_garbage_collector


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restore_gc")
def test_settling_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    before = gc.get_threshold()

    _settle_garbage_collector()

    assert gc.get_freeze_count() > 10_000, "the start-up objects are frozen"
    assert gc.get_threshold() == (_GC_GEN0_THRESHOLD, before[1], before[2])
    assert before[0] < _GC_GEN0_THRESHOLD
