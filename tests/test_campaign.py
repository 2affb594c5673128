"""campaign.frozen_heap: a run's collector settings, given back to the caller's process afterwards."""

from __future__ import annotations

import gc

import pytest

from mergekit.campaign import RUN_GC_THRESHOLD, frozen_heap


def test_frozen_heap_sets_the_run_threshold_and_gives_back_the_callers() -> None:
    before = gc.get_threshold()
    with frozen_heap():
        assert gc.get_threshold() == (RUN_GC_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0  # the heap made before the run is out of every pass
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_frozen_heap_gives_back_the_callers_settings_after_an_error() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("the run failed")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
