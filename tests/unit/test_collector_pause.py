"""Projection pages are applied with the cyclic collector paused, and it always comes back."""

from __future__ import annotations

import gc

import pytest

from projections.runner import _collector_paused


def test_the_collector_is_paused_for_a_page_and_resumes_even_after_a_failure() -> None:
    assert gc.isenabled()
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _collector_paused():
        raise RuntimeError("a page failed")
    assert gc.isenabled()


def test_a_pause_inside_another_or_with_the_collector_off_leaves_it_as_found() -> None:
    with _collector_paused():
        with _collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause does not end the outer one
    assert gc.isenabled()
    gc.disable()
    try:
        with _collector_paused():
            pass
        assert not gc.isenabled()  # whoever turned it off keeps it off
    finally:
        gc.enable()
