"""The availability streams' reader of the stock view: each stream's share, resets, catch-up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from api import stream
from api.runtime import Runtime
from api.stream import AvailabilityFeed, Changed, Listener, catch_up
from projections.entries import CHANGED_SQL
from projections.store import ViewStore
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
    start = settled(runtime)
    feed.begin_at(start)

    runtime.writer.execute(reserve([(first, 1)]))
    runtime.writer.execute(reserve([(second, 2)]))
    position = settled(runtime)
    feed.step()

    [whole] = received(loop, everything)
    [share] = received(loop, named)
    assert whole is not None
    assert share is not None
    assert (whole.after, whole.position) == (share.after, share.position) == (start, position)
    assert whole.entries is not None
    assert share.entries is not None
    assert sorted(whole.entries) == sorted([first, second])
    assert list(share.entries) == [first]
    assert share.entries[first].levels(datetime.now(UTC)).held == 1

    feed.step()  # nothing moved since: nothing to hear
    assert received(loop, everything) == received(loop, named) == []

    runtime.writer.execute(reserve([(second, 1)]))
    later = settled(runtime)
    feed.step()  # none of `named`'s SKUs moved: it hears of it all the same, empty
    assert received(loop, named) == [Changed(position, later, {})]
    received(loop, everything)

    monkeypatch.setattr(stream, "MAX_ENTRIES", 1)
    runtime.writer.execute(reserve([(first, 1)]))
    runtime.writer.execute(reserve([(second, 1)]))
    last = settled(runtime)
    feed.step()
    [reset] = received(loop, everything)
    [share] = received(loop, named)
    assert reset == Changed(later, last, None)  # too much for one burst: read afresh
    assert share is not None
    assert share.entries is not None
    assert list(share.entries) == [first]


class _Hooked:
    """A view store whose connections call `hook` once, just before the feed reads what
    moved: a step under way, for something to happen in the middle of."""

    def __init__(self, store: ViewStore, hook: Callable[[], None]) -> None:
        self.store, self.hook = store, hook

    @contextmanager
    def connection(self) -> Iterator[Any]:
        with self.store.connection() as conn:
            yield _HookedConnection(conn, self)


class _HookedConnection:
    def __init__(self, conn: Any, owner: _Hooked) -> None:
        self.conn, self.owner = conn, owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def execute(self, query: Any, *args: Any) -> Any:
        if query == CHANGED_SQL and self.owner.hook is not None:
            hook, self.owner.hook = self.owner.hook, None  # type: ignore[assignment]
            hook()
        return self.conn.execute(query, *args)


def test_a_stream_that_begins_while_the_feed_reads_still_gets_what_moved_after_its_start(
    runtime: Runtime, loop: asyncio.AbstractEventLoop
) -> None:
    sku = random_sku()
    stock_sku(runtime.writer, sku, 5)
    start = settled(runtime)
    early, late = Listener(None, loop), Listener(None, loop)

    def late_stream_begins() -> None:
        # Its catch-up was read at `start`; it joins after this step chose whom to tell.
        feed._listeners.add(late)
        feed.begin_at(start)

    feed = AvailabilityFeed(_Hooked(runtime.store, late_stream_begins), 60)  # type: ignore[arg-type]
    feed._listeners = {early}
    feed.begin_at(start)
    runtime.writer.execute(reserve([(sku, 2)]))
    moved = settled(runtime)

    feed.step()  # `late` is not among those this step tells
    assert [c.position for c in received(loop, early) if c] == [moved]
    assert received(loop, late) == []
    feed.step()  # so the next reads again from its start

    [heard] = received(loop, late)
    assert heard is not None
    assert (heard.after, heard.position) == (start, moved)
    assert heard.entries is not None
    assert heard.entries[sku].levels(datetime.now(UTC)).held == 2


def test_streams_that_begin_at_or_past_what_a_step_reads_hold_nothing_back_and_the_earliest_wins(
    runtime: Runtime, loop: asyncio.AbstractEventLoop
) -> None:
    sku = random_sku()
    stock_sku(runtime.writer, sku, 5)
    start = settled(runtime)
    runtime.writer.execute(reserve([(sku, 1)]))
    moved = settled(runtime)
    listener = Listener(None, loop)
    feed = AvailabilityFeed(_Hooked(runtime.store, lambda: feed.begin_at(moved)), 60)  # type: ignore[arg-type]
    feed._listeners = {listener}
    feed.begin_at(start)

    feed.step()  # a stream began, mid-read, at the position this step reaches
    assert [(c.after, c.position) for c in received(loop, listener) if c] == [(start, moved)]
    feed.step()  # so the feed went on: nothing is read (and sent) again
    assert received(loop, listener) == []

    # Streams beginning between steps: the feed reads next from the earliest start.
    feed.begin_at(start)
    feed.begin_at(moved)
    feed.step()
    assert [(c.after, c.position) for c in received(loop, listener) if c] == [(start, moved)]


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
    assert (fresh.after, fresh.position) == (position, position)
    assert fresh.entries is not None
    assert list(fresh.entries) == [first]
    assert catch_up(runtime.store, None, None) == Changed(position, position, {})

    resumed = catch_up(runtime.store, None, before)
    assert (resumed.after, resumed.position) == (before, position)
    assert resumed.entries is not None
    assert list(resumed.entries) == [second]
    assert catch_up(runtime.store, frozenset({first}), before) == Changed(before, position, {})
    # A start beyond the view (an id from another database, or a view rebuilt since): what
    # the client shows is not this view's, and a reset says to read afresh.
    ahead = catch_up(runtime.store, None, position + 10**6)
    assert ahead == Changed(position, position, None, "ahead_of_the_view")
    [reset] = stream._burst(ahead, lambda entry, at: {}, position)
    assert reset.startswith("event: reset\n")
    assert f'"position": {position}, "reason": "ahead_of_the_view"' in reset
    monkeypatch.setattr(stream, "MAX_ENTRIES", 1)
    assert catch_up(runtime.store, None, 0) == Changed(0, position, None)


def test_a_stream_started_at_a_position_the_view_has_not_reached_yet_follows_on(
    runtime: Runtime,
) -> None:
    """A client that starts at its own write's position, before the view has it: the view
    is only behind the log, so the stream follows on from the view's position (it used
    to say `reset`, `ahead_of_the_view`, as for an id from another database)."""
    sku = random_sku()
    stock_sku(runtime.writer, sku, 5)
    position = settled(runtime)
    with psycopg.connect(runtime.database_url) as holding:
        # The projections cannot record a page while their positions are locked.
        holding.execute("SELECT * FROM ledger_projection_generations FOR UPDATE")
        written = runtime.writer.execute(reserve([(sku, 1)])).position
        assert written is not None
        assert written > position
        started = catch_up(runtime.store, frozenset({sku}), written)
        holding.rollback()
    assert started == Changed(position, position, {})


def test_a_stream_that_reads_slower_than_the_view_changes_is_ended_not_kept_growing(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "MAX_QUEUED", 3)
    slow = Listener(None, loop)
    for position in range(1, 10):
        slow.offer(Changed(position - 1, position, {}))
        loop.run_until_complete(asyncio.sleep(0))
    got = received(loop, slow)
    assert got == [Changed(0, 1, {}), Changed(1, 2, {}), Changed(2, 3, {}), None]
    assert slow.ended.is_set()  # it ends at once, whatever is queued: its client resumes
