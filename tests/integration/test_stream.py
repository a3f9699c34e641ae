"""The availability streams' reader of the stock view: each stream's share, resets, catch-up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from api import stream
from api.runtime import Runtime
from api.stream import AvailabilityFeed, Changed, Listener, catch_up
from tests.conftest import random_sku
from tests.integration.ledger_setup import reserve, stock_sku


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    opened = asyncio.new_event_loop()
    yield opened
    opened.close()


def received(loop: asyncio.AbstractEventLoop, listener: Listener) -> list[Changed | None]:
    loop.run_until_complete(asyncio.sleep(0))  # runs what the feed handed over
    found = []
    while not listener.queue.empty():
        found.append(listener.queue.get_nowait())
    return found


def settled(runtime: Runtime) -> int:
    head = runtime.app.recorder.max_notification_id() or 0
    runtime.views.wait_for("stock", head, timeout=20)
    return head


def test_each_stream_gets_its_share_of_what_moved_and_everything_too_much_is_a_reset(
    runtime: Runtime, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = random_sku(), random_sku()
    stock_sku(runtime.writer, first, 5)
    stock_sku(runtime.writer, second, 5)
    feed = AvailabilityFeed(runtime.store, refresh_seconds=60)
    everything, named = Listener(None, loop), Listener(frozenset({first}), loop)
    feed._listeners = {everything, named}  # listened to, without the feed's own thread
    feed.begin_at(settled(runtime))

    runtime.writer.execute(reserve([(first, 1)]))
    runtime.writer.execute(reserve([(second, 2)]))
    position = settled(runtime)
    feed.step()

    [whole] = received(loop, everything)
    [share] = received(loop, named)
    assert whole is not None
    assert share is not None
    assert whole.position == share.position == position
    assert whole.entries is not None
    assert share.entries is not None
    assert sorted(whole.entries) == sorted([first, second])
    assert list(share.entries) == [first]
    assert share.entries[first].levels(datetime.now(UTC)).held == 1

    feed.step()  # nothing moved since
    assert received(loop, everything) == received(loop, named) == []

    monkeypatch.setattr(stream, "MAX_ENTRIES", 1)
    runtime.writer.execute(reserve([(first, 1)]))
    runtime.writer.execute(reserve([(second, 1)]))
    position = settled(runtime)
    feed.step()
    [reset] = received(loop, everything)
    [share] = received(loop, named)
    assert reset == Changed(position, None)  # too much for one burst: read afresh
    assert share is not None
    assert share.entries is not None
    assert list(share.entries) == [first]


def test_a_new_stream_starts_from_its_skus_now_or_from_what_moved_after_a_position(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = random_sku(), random_sku()
    stock_sku(runtime.writer, first, 5)
    stock_sku(runtime.writer, second, 5)
    before = settled(runtime)
    runtime.writer.execute(reserve([(second, 2)]))
    position = settled(runtime)

    fresh = catch_up(runtime.store, frozenset({first}), None)
    assert fresh.position == position
    assert fresh.entries is not None
    assert list(fresh.entries) == [first]
    assert catch_up(runtime.store, None, None) == Changed(position, {})

    resumed = catch_up(runtime.store, None, before)
    assert resumed.entries is not None
    assert list(resumed.entries) == [second]
    assert catch_up(runtime.store, frozenset({first}), before) == Changed(position, {})
    monkeypatch.setattr(stream, "MAX_ENTRIES", 1)
    assert catch_up(runtime.store, None, 0) == Changed(position, None)


def test_a_stream_that_reads_slower_than_the_view_changes_is_ended_not_kept_growing(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "MAX_QUEUED", 3)
    slow = Listener(None, loop)
    for position in range(1, 10):
        slow.offer(Changed(position, {}))
        loop.run_until_complete(asyncio.sleep(0))
    got = received(loop, slow)
    assert got[:3] == [Changed(1, {}), Changed(2, {}), Changed(3, {})]
    assert got[3:] == [None]  # ended: its client reconnects from its last event
