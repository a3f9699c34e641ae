"""Availability as it changes, for storefronts: `GET /v1/stream/availability`, server-sent events.

Each API process follows the stock view by position for all its streams at once (one
reader, `AvailabilityFeed`, however many clients listen): every `refresh_seconds`, in one
snapshot of the view, the SKUs whose rows moved past the last position, then the entries
of those someone listens to. A stream gets each change as an `availability` event whose
`id` is the view's position, so a client that reconnects with `Last-Event-ID` (as
EventSource does by itself) first gets what changed since, read from the view, and then
follows on: nothing is missed, a SKU may come twice. A client too far behind (more SKUs
changed than `MAX_ENTRIES`) gets a `reset` event: read afresh what you show, then follow.

What changes with the clock alone (a hold running out before the sweeper records it, a
report ageing) reaches the view, and so the streams, when the events that record it do
(for a hold, the sweeper's `StockItem.HoldsExpired`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg_pool
import structlog

from ledger.stock import second_floor
from projections.entries import (
    CHANGED_AMONG_SQL,
    CHANGED_SQL,
    ENTRIES_AT_SQL,
    LIVE_SQL,
    StockEntry,
    entries_from,
)
from projections.store import Connection, ViewStore

log = structlog.get_logger(__name__)

# The most SKUs one event burst carries; past that a stream is told to read afresh.
MAX_ENTRIES = 10_000
# Bursts queued for a stream that reads slower than the view changes; past that it ends,
# and its client, reconnecting from the last event it got, catches up from the view.
MAX_QUEUED = 1_000
KEEP_ALIVE_SECONDS = 15.0
RETRY_MILLISECONDS = 2_000


@dataclass(frozen=True)
class Changed:
    """The SKUs that moved after position `after`, as the view holds them at `position`
    (a stream's own, once handed to it); `entries` None: too many to send."""

    after: int
    position: int
    entries: dict[str, StockEntry] | None
    # Why `entries` is None: what a `reset` event says.
    reason: str = "too_many_changes"


@dataclass(eq=False)
class Listener:
    """One stream: the SKUs it follows (None: all), and what the feed has for it."""

    skus: frozenset[str] | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Changed | None] = field(default_factory=asyncio.Queue)
    # Set once the stream is to end (it fell too far behind, or the feed stopped): it
    # ends at once, whatever is still queued for it.
    ended: threading.Event = field(default_factory=threading.Event)

    def offer(self, changed: Changed) -> None:
        """From the feed's thread: keeps this stream's share of what moved (even none of
        its SKUs: the stream then knows it has seen up to there)."""
        if self.ended.is_set():
            return
        entries = changed.entries
        if entries is not None and self.skus is not None:
            entries = {sku: entries[sku] for sku in self.skus if sku in entries}
        if self.queue.qsize() >= MAX_QUEUED:  # read from another thread: near enough
            self.end()
            return
        share = Changed(changed.after, changed.position, entries)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, share)

    def end(self) -> None:
        """Ends the stream (from any thread); its client reconnects from its last event."""
        self.ended.set()
        with suppress(RuntimeError):  # its loop is closed: the stream is gone already
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class AvailabilityFeed:
    """Follows the stock view for this process's streams, while any listens."""

    def __init__(self, store: ViewStore, refresh_seconds: float) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._listeners: set[Listener] = set()
        self._position: int | None = None  # None: until a listener says where to start
        # The earliest start of the listeners that began while a step was reading (see
        # `step`); None: none did.
        self._since: int | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def listen(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.add(listener)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="availability-feed", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def begin_at(self, position: int) -> None:
        """A new listener's catch-up reached `position`: the next step reads from there
        at the latest (a feed nobody listened to starts there; one running further on
        reads a little again, so that no listener misses what lies between)."""
        with self._lock:
            self._position = position if self._position is None else min(self._position, position)
            self._since = position if self._since is None else min(self._since, position)

    def leave(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.discard(listener)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for listener in self._listeners:
                listener.end()
            self._listeners.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                listening = bool(self._listeners)
                if not listening:
                    self._position = None  # nobody follows what moves meanwhile
            if not listening:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self.step()
            except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
                log.warning("availability_feed.read_failed", error=str(error))
            except Exception:  # a bug: said, and the streams keep their feed
                log.exception("availability_feed.failed")
            self._stop.wait(self.refresh_seconds)

    def step(self) -> None:
        """Reads what moved since the last step and hands each listener its share."""
        with self._lock:
            listeners = list(self._listeners)
            after, self._since = self._position, None
        if after is None:
            return  # until a listener's catch-up says where to start
        everything = any(listener.skus is None for listener in listeners)
        followed = set().union(*(listener.skus or () for listener in listeners))
        with self.store.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            rows = conn.execute(CHANGED_SQL, {"after": after}).fetchall()
            if not rows:
                return  # no live generation
            position = int(rows[0]["position"])
            moved = [row["sku"] for row in rows if row["sku"] is not None]
            few = [sku for sku in moved if sku in followed]
            whole: Changed | None = None
            if everything and len(moved) <= MAX_ENTRIES:
                read = _entries(conn, moved) if moved else {}
                whole = Changed(after, position, read)
            else:
                # Too many for the streams of everything; those of a few SKUs get theirs.
                read = _entries(conn, few) if few else {}
                whole = Changed(after, position, None) if everything else None
        with self._lock:
            # A listener that began meanwhile may have read its start before `position`
            # and not be among those this step hands its share to: the next step reads
            # again from that start (a start at or past `position` holds nothing back).
            since = self._since
            self._position = position if since is None else min(position, since)
        if position == after:
            return
        # Every stream hears of every step, even one that moved none of its SKUs: it has
        # then seen up to `position`, and the ids it sends say so.
        share = Changed(after, position, read)
        for listener in listeners:
            try:
                listener.offer(whole if whole is not None and listener.skus is None else share)
            except Exception:  # one broken stream never starves the others
                log.exception("availability_feed.offer_failed")
                listener.end()


def _entries(conn: Connection, skus: list[str]) -> dict[str, StockEntry]:
    now = second_floor(datetime.now(UTC))
    rows = conn.execute(ENTRIES_AT_SQL, {"skus": skus, "now": now}).fetchall()
    return entries_from([row for row in rows if row["sku"] is not None])


LOG_END_SQL = "SELECT max(notification_id) AS position FROM inventoryledger_events"


def catch_up(store: ViewStore, skus: frozenset[str] | None, after: int | None) -> Changed:
    """Where a new stream starts: what moved since `after` among its SKUs, or, without
    `after`, the current entries of its SKUs (none when it follows all)."""
    with store.connection() as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if after is None:
            live = conn.execute(LIVE_SQL).fetchone()
            position = int(live["position"]) if live else 0
            return Changed(position, position, _entries(conn, sorted(skus)) if skus else {})
        arguments = {
            "after": after,
            "skus": None if skus is None else sorted(skus),
            "limit": MAX_ENTRIES + 1,
        }
        rows = conn.execute(CHANGED_AMONG_SQL, arguments).fetchall()
        if not rows:
            return Changed(0, 0, {})  # no live view yet: everything it will hold is new
        position = int(rows[0]["position"])
        if after > position:
            end = conn.execute(LOG_END_SQL).fetchone()
            if end is not None and after <= int(end["position"] or 0):
                # Only the view behind the log (a write's own position, say, read back
                # at once): nothing moved since `after` that the view has; follow on
                # from its position (a SKU may come again).
                return Changed(position, position, {})
            # A start beyond the log: an id from another database, or from a view since
            # rebuilt. What the client shows is not this view's: it reads afresh (it
            # followed from here, shown nothing, before 2026-12-06).
            return Changed(position, position, None, "ahead_of_the_view")
        moved = [row["sku"] for row in rows if row["sku"] is not None]
        if len(moved) > MAX_ENTRIES:
            return Changed(min(after, position), position, None)
        return Changed(min(after, position), position, _entries(conn, moved) if moved else {})


def shutting_down() -> Callable[[], bool]:
    """Whether the server is stopping: uvicorn's flag, found through the SIGTERM handler it
    installs (a stream never ends on its own, and uvicorn waits for every response to end
    before it stops). Never, where the server is not uvicorn's."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if server is None or not hasattr(server, "should_exit"):
        return lambda: False
    return lambda: bool(server.should_exit)


async def events(
    feed: AvailabilityFeed,
    store: ViewStore,
    skus: frozenset[str] | None,
    after: int | None,
    render: Callable[[StockEntry, int], dict[str, Any]],
    stopping: Callable[[], bool],
) -> AsyncIterator[str]:
    """The text of one stream: its catch-up, then each change, keep-alives between."""
    loop = asyncio.get_running_loop()
    listener = Listener(skus, loop)
    feed.listen(listener)  # before the catch-up is read: nothing falls between the two
    try:
        yield f"retry: {RETRY_MILLISECONDS}\n\n"
        try:
            start = await asyncio.to_thread(catch_up, store, skus, after)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
            # The answer has begun: the stream ends, and its client tries again.
            log.warning("availability_stream.catch_up_failed", error=str(error))
            return
        feed.begin_at(start.position)
        for text in _burst(start, render, start.position):
            yield text
        seen = start.position
        sent_at = loop.time()
        while not (stopping() or listener.ended.is_set()):
            try:
                changed = await asyncio.wait_for(listener.queue.get(), 1.0)
            except TimeoutError:
                pass
            else:
                if changed is None:
                    return  # the feed stopped, or this stream fell too far behind
                texts, seen = deliver(changed, seen, render)
                if texts:
                    for text in texts:
                        yield text
                    sent_at = loop.time()
            if loop.time() - sent_at >= KEEP_ALIVE_SECONDS:
                yield ": keep-alive\n\n"
                sent_at = loop.time()
    finally:
        feed.leave(listener)


def deliver(
    changed: Changed, seen: int, render: Callable[[StockEntry, int], dict[str, Any]]
) -> tuple[list[str], int]:
    """The events a stream that has seen everything up to `seen` sends for `changed`, and
    what it has seen then. What ends at or before `seen` is not sent again. An `id` says a
    client has seen everything up to it (its `Last-Event-ID` when it reconnects), so a
    share that starts after `seen` (the feed was ahead of the stream's catch-up, and reads
    the gap again next) is sent without one."""
    if changed.position <= seen:
        return [], seen
    whole = changed.after <= seen
    texts = list(_burst(changed, render, changed.position if whole else None))
    return texts, changed.position if whole else seen


def _burst(
    changed: Changed, render: Callable[[StockEntry, int], dict[str, Any]], ident: int | None
) -> Iterable[str]:
    """The events of one share; `ident` (if any) goes on its last event only, so that a
    client cut off in the middle of it does not claim to have seen it whole."""
    line = "" if ident is None else f"id: {ident}\n"
    if changed.entries is None:
        body = json.dumps({"position": changed.position, "reason": changed.reason})
        yield f"event: reset\n{line}data: {body}\n\n"
        return
    skus = sorted(changed.entries)
    for number, sku in enumerate(skus, 1):
        body = json.dumps(render(changed.entries[sku], changed.position), separators=(",", ":"))
        last = line if number == len(skus) else ""
        yield f"event: availability\n{last}data: {body}\n\n"
