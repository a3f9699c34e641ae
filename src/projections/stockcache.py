"""An in-process copy of the stock view for availability reads, kept current by position.

A storefront reads availability far more often than it changes, and a read that goes to
PostgreSQL costs more than the HTTP around it. Each API process keeps the entries of up
to `capacity` SKUs (those that changed last when it starts, then those new to the
catalogue and those read since), as read from the view at a known position. Every
`refresh_seconds` it reads, in one snapshot of the view, which SKUs moved past that
position (their rows, or their suppliers' terms), and the entries of those among them it
follows: the SKUs read within `follow_seconds`, and, while it has room, SKUs it has never
held (new ones: without them, a process that never read a SKU created after it started
sends every first read of it to the view). Another SKU of the copy that moved is dropped,
not read again; its next read goes to the view and brings it back. So the copy costs in
proportion to the changes of what is being read, not to every change of the catalogue
(following every change of 10,000 SKUs took ~12% of the machine's CPU under a reservation
load, in both API processes). Both statements see one snapshot, so the copy is always
exactly the view at one position.

The copy answers only when it is at least at the position a reader asks for and its last
refresh is recent; otherwise the reader asks the copy to `fetch` its SKUs from the view.
One thread of the copy reads the SKUs of every reader waiting, in one statement (up to
`FETCH_SKUS`), keeps them, and hands each reader its own. A reader on a worker thread of
its own waited for the interpreter in turn with every other one while the event loop
answered hits: with two API processes, 16 clients and copies that did not hold the SKUs
yet, p99 was 129-131 ms in the first 8 s of reads, against 12.6-15.0 ms read for.

To tell a new SKU from one it dropped, the copy remembers the SKUs it has held, up to
`SEEN_PER_ENTRY` times its capacity (~80 bytes each); past that it remembers only those it
holds. A SKU it forgot counts as new again: taken, while there is room, the next time it
moves, and dropped like any other if nobody reads it. Without the bound, a process that
over time held every SKU of a 1,000,000-SKU catalogue kept ~80 MB of names.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import psycopg_pool
import structlog

from ledger.stock import second_floor
from projections.entries import (
    CHANGED_SQL,
    ENTRIES_AT_SQL,
    RECENT_SQL,
    Snapshot,
    StockEntry,
    read_entries,
    snapshot_from,
)
from projections.store import ViewStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CachedRead:
    """Entries answered from the copy, current at `position`."""

    position: int
    entries: list[StockEntry]


# The SKUs a copy remembers having held, at most, per SKU it can hold (see above).
SEEN_PER_ENTRY = 4

# What a lookup can come to (see `StockCache.lookups`).
LOOKUP_RESULTS = ("hit", "absent", "behind", "stale")

# The SKUs `fetch` reads in one statement, at most (a reader asking for more is read alone).
FETCH_SKUS = 1000


@dataclass(frozen=True)
class _Fetch:
    """A reader's SKUs, the second it reads at, and where its answer goes."""

    skus: list[str]
    now: int
    answer: Future[Snapshot | None]


class StockCache:
    """The entries of up to `capacity` SKUs, brought up to date every `refresh_seconds`;
    those not read within `follow_seconds` are dropped when they change."""

    def __init__(
        self,
        store: ViewStore,
        *,
        capacity: int,
        refresh_seconds: float,
        max_lag_seconds: float,
        follow_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        seen_limit: int | None = None,
        report: Callable[[dict[str, int]], None] | None = None,
        fetch_wait_seconds: float = 2.0,
    ) -> None:
        self.store = store
        self.capacity = capacity
        self.seen_limit = SEEN_PER_ENTRY * capacity if seen_limit is None else seen_limit
        self.refresh_seconds = refresh_seconds
        self.max_lag_seconds = max_lag_seconds
        self.follow_seconds = follow_seconds
        self.clock = clock
        self._lock = threading.Lock()
        # In the order taken: the first is the oldest kept, dropped first when full (an
        # OrderedDict drops it in ~1 us; a dict's first key, once many were dropped before
        # it, took ~19 us to find at 100,000 SKUs, under the lock lookups wait for).
        self._entries: OrderedDict[str, StockEntry] = OrderedDict()
        # When each SKU of the copy was last read (from the copy or, offered, the view).
        self._read_at: dict[str, float] = {}
        # The SKUs whose entries a reader offered from a position beyond the copy's, and
        # that position: each is the view at its own position until the next refresh
        # brings the copy there. Answered as at the copy's, a read could name a position
        # older than its numbers (an OMS walkthrough: 13 reads in 40).
        self._ahead: dict[str, int] = {}
        # The SKUs this copy of the generation has held (up to `seen_limit`): one that
        # moves and is not among them is new to the catalogue, taken while there is room.
        self._seen: set[str] = set()
        self._generation: int | None = None
        self._position = 0
        self._refreshed = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Lookups by result (see `lookups`), and as last handed to `report`.
        self._lookups = dict.fromkeys(LOOKUP_RESULTS, 0)
        self._reported = dict(self._lookups)
        self._reporting = threading.Lock()
        self.report = report
        # The readers waiting for `fetch`, and the thread that reads for them.
        self.fetch_wait_seconds = fetch_wait_seconds
        self._fetches: list[_Fetch] = []
        self._fetching = threading.Condition()
        self._fetching_on = False  # the thread that reads for them takes readers
        self._fetcher: threading.Thread | None = None
        self._reading_since: float | None = None  # when its read in progress began
        self.fetch_reads = 0  # statements it has read

    @property
    def position(self) -> int:
        return self._position

    @property
    def generation(self) -> int | None:
        return self._generation

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def remembered(self) -> int:
        """How many SKUs the copy would know it held before (at most `seen_limit`, or
        those it holds if more)."""
        return len(self._seen)

    def lookup(
        self, skus: Iterable[str], wanted: int | None, *, count_miss: bool = True
    ) -> CachedRead | None:
        """The entries of all these SKUs if the copy holds them all, is at `wanted` or
        beyond, and was refreshed within the lag allowed; None sends the reader to the view.
        `count_miss=False`: a miss is not counted (the reader will look again, and that
        lookup counts)."""
        now = self.clock()
        with self._lock:
            missed = None
            if now - self._refreshed > self.max_lag_seconds:
                missed = "stale"
            entries = []
            positions = set()
            for sku in () if missed else skus:
                entry = self._entries.get(sku)
                if entry is None:
                    missed = "absent"
                    break
                entries.append(entry)
                positions.add(self._ahead.get(sku, self._position))
            if missed is None and len(positions) > 1:
                missed = "absent"  # not all at one position: the view reads them so
            position = positions.pop() if positions else self._position
            if missed is None and wanted is not None and wanted > position:
                missed = "behind"
            if missed is not None:
                if count_miss:
                    self._lookups[missed] += 1
                return None
            for entry in entries:
                self._read_at[entry.sku] = now
            self._lookups["hit"] += 1
            return CachedRead(position, entries)

    def lookups(self) -> dict[str, int]:
        """Lookups so far, by result: answered (`hit`), or sent to the view because a SKU
        was not held (`absent`), the reader asked for a later position (`behind`), or the
        copy was not refreshed within its lag (`stale`)."""
        with self._lock:
            return dict(self._lookups)

    def report_lookups(self) -> None:
        """Hands `report` the lookups since it last did, by result (those with any)."""
        if self.report is None:
            return
        with self._reporting:
            counted = self.lookups()
            since = {
                why: n - self._reported[why]
                for why, n in counted.items()
                if n != self._reported[why]
            }
            # Taken as reported before they are: a report that fails loses them rather
            # than counting some twice, and never stops the copy.
            self._reported = counted
            if since:
                try:
                    self.report(since)
                except Exception as error:
                    log.warning("stock_cache.lookups_not_reported", error=str(error))

    def offer(self, snapshot: Snapshot) -> None:
        """Keeps entries a reader fetched from the view, if no older than the copy.

        An older snapshot could hold a SKU that changed after it and before the copy's
        position: the refresh that covered that change passed it over (the copy did not
        hold it then), so it is turned away.
        """
        now = self.clock()
        with self._lock:
            if snapshot.generation != self._generation or snapshot.position < self._position:
                return
            if self.capacity <= 0:
                return
            for sku, entry in snapshot.entries.items():
                if sku not in self._entries and len(self._entries) >= self.capacity:
                    oldest, _ = self._entries.popitem(last=False)
                    self._read_at.pop(oldest, None)
                    self._ahead.pop(oldest, None)
                self._entries[sku] = entry
                self._read_at[sku] = now
                self._seen.add(sku)
                if snapshot.position > self._position:
                    self._ahead[sku] = snapshot.position
                else:
                    self._ahead.pop(sku, None)
            self._forget_beyond_limit()

    def refresh(self) -> None:
        """Brings the copy to the view's current position, in one snapshot of the view."""
        arguments = {
            "after": self._position,
            "now": second_floor(datetime.now(UTC)),
            "limit": self.capacity,
        }
        known = self._generation
        moved: list[str] = []
        with self.store.connection() as conn, conn.transaction():
            # Both statements read the same snapshot: the SKUs that moved, then the entries
            # of those the copy follows, at exactly the position the first one names.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            # The next statement takes the snapshot: the copy is the view as of no earlier
            # than now. Not the time the refresh began: waiting for a connection and for
            # the transaction to begin took up to a second under load (PostgreSQL waiting
            # for a CPU), and a copy so refreshed counted as stale as soon as it was.
            started = self.clock()
            snapshot = None
            if known is not None:
                rows = conn.execute(CHANGED_SQL, arguments).fetchall()
                if rows and rows[0]["generation"] == known:
                    moved = [row["sku"] for row in rows if row["sku"] is not None]
                    followed = self._followed(moved, started)
                    entries: dict[str, StockEntry] = {}
                    if followed:
                        read = conn.execute(ENTRIES_AT_SQL, {**arguments, "skus": followed})
                        entries = snapshot_from(read.fetchall()).entries
                    snapshot = Snapshot(known, int(rows[0]["position"]), entries)
            if snapshot is None:
                # A new copy, or the view was rebuilt: start from its latest changes.
                snapshot = snapshot_from(conn.execute(RECENT_SQL, arguments).fetchall())
        if snapshot.generation == 0:
            return  # no live generation yet
        with self._lock:
            known_at = (self._generation or 0, self._position)
            if (snapshot.generation, snapshot.position) < known_at:
                # Another refresh that started later already took the copy further (a
                # refresh can take a second when PostgreSQL waits for a CPU): this one
                # must not take it back.
                return
            if snapshot.generation != self._generation:
                self._entries, self._read_at, self._seen = OrderedDict(), {}, set()
                self._ahead = {}
            for sku in moved:
                # Followed, it was read again; else (not followed, or offered by a reader
                # since the SKUs were split) it may be stale at the new position.
                if sku not in snapshot.entries:
                    self._drop(sku)
            for sku, entry in snapshot.entries.items():
                if sku in self._entries or len(self._entries) < self.capacity:
                    self._entries[sku] = entry
                    self._seen.add(sku)
                    self._ahead.pop(sku, None)
            self._forget_beyond_limit()
            self._generation, self._position = snapshot.generation, snapshot.position
            # Every entry is now the view at the new position (those that moved since the
            # old one were read again or dropped), but one offered from beyond it.
            self._ahead = {
                sku: at
                for sku, at in self._ahead.items()
                if at > snapshot.position and sku in self._entries
            }
            self._refreshed = max(self._refreshed, started)

    def _followed(self, moved: list[str], now: float) -> list[str]:
        """The SKUs among those that moved that the copy reads again: those it holds that
        were read lately, and those new to it (never held) while it has room. A new SKU
        is not counted as read: unread when it next moves, it is dropped like any other."""
        with self._lock:
            room = self.capacity - len(self._entries)
            followed = []
            for sku in moved:
                if sku in self._entries:
                    if now - self._read_at.get(sku, -math.inf) <= self.follow_seconds:
                        followed.append(sku)
                elif room > 0 and sku not in self._seen:
                    followed.append(sku)
                    room -= 1
            return followed

    def _forget_beyond_limit(self) -> None:
        """Past `seen_limit`, remembers only the SKUs the copy holds (under the lock)."""
        if len(self._seen) > self.seen_limit:
            self._seen = set(self._entries)

    def _drop(self, sku: str) -> None:
        self._entries.pop(sku, None)
        self._read_at.pop(sku, None)
        self._ahead.pop(sku, None)

    def fetch(self, skus: list[str], at: datetime) -> Future[Snapshot | None] | None:
        """The view's entries of these SKUs (those it knows) at its current position, read
        with those of the other readers waiting and kept in the copy; holds are counted as
        at `at`. None, now or as the answer, sends the reader to the view itself: the copy
        is not running, its read failed, or the read before has taken longer than
        `fetch_wait_seconds` (the database is slow or away: readers then wait for it each on
        their own, as without the copy, instead of queueing behind one stuck statement)."""
        fetch = _Fetch(skus, second_floor(at), Future())
        with self._fetching:
            stuck = (
                self._reading_since is not None
                and time.monotonic() - self._reading_since > self.fetch_wait_seconds
            )
            if not self._fetching_on or self._stop.is_set() or stuck:
                return None
            self._fetches.append(fetch)
            self._fetching.notify()
        return fetch.answer

    def _fetch_run(self) -> None:
        """Reads for the readers waiting, until stopped and none is left waiting; whatever
        ends it, no reader is left without an answer."""
        batch: list[_Fetch] = []
        try:
            while True:
                with self._fetching:
                    self._reading_since = None
                    while not self._fetches and not self._stop.is_set():
                        self._fetching.wait()
                    if not self._fetches:
                        return
                    taken, count = 0, 0
                    while taken < len(self._fetches) and (
                        taken == 0 or count + len(self._fetches[taken].skus) <= FETCH_SKUS
                    ):
                        count += len(self._fetches[taken].skus)
                        taken += 1
                    batch, self._fetches = self._fetches[:taken], self._fetches[taken:]
                    self._reading_since = time.monotonic()
                # A reader that gave up waiting (its request cancelled) is not read for.
                self._read_for([f for f in batch if f.answer.set_running_or_notify_cancel()])
        finally:
            with self._fetching:
                self._fetching_on = False
                left, self._fetches = self._fetches, []
            for fetch in batch + left:
                answer = fetch.answer
                if answer.running() or (
                    not answer.done() and answer.set_running_or_notify_cancel()
                ):
                    answer.set_result(None)

    def _read_for(self, batch: list[_Fetch]) -> None:
        """Reads the SKUs of these readers in one statement, keeps them, and answers each."""
        if not batch:
            return  # all gave up waiting
        skus = list(dict.fromkeys(sku for fetch in batch for sku in fetch.skus))
        try:
            with self.store.connection(timeout=self.fetch_wait_seconds) as conn:
                # The earliest second any of them reads at: a hold that runs out later
                # still counts for it, and stops counting for the others when they read.
                snapshot = read_entries(conn, skus, min(fetch.now for fetch in batch))
            self.fetch_reads += 1
            self.offer(snapshot)
        except Exception as error:
            # Each reader then reads the view itself, and meets the failure (its own) there.
            for fetch in batch:
                fetch.answer.set_result(None)
            log.warning("stock_cache.fetch_failed", readers=len(batch), error=str(error))
            return
        for fetch in batch:
            entries = {sku: snapshot.entries[sku] for sku in fetch.skus if sku in snapshot.entries}
            fetch.answer.set_result(Snapshot(snapshot.generation, snapshot.position, entries))

    def start(self) -> StockCache:
        self._thread = threading.Thread(target=self._run, name="stock-cache", daemon=True)
        self._thread.start()
        with self._fetching:
            self._fetching_on = True
            self._fetcher = threading.Thread(
                target=self._fetch_run, name="stock-cache-fetch", daemon=True
            )
            self._fetcher.start()
        return self

    def stop(self) -> None:
        """Stops refreshing; the readers already waiting are read for first."""
        with self._fetching:
            self._stop.set()
            self._fetching.notify()
        if self._thread is not None:
            self._thread.join(5)
        if self._fetcher is not None:
            self._fetcher.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
                log.warning("stock_cache.refresh_failed", error=str(error))
            self.report_lookups()
            self._stop.wait(self.refresh_seconds)
        self.report_lookups()  # those since the last refresh
