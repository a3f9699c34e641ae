"""An in-process copy of the stock view for availability reads, kept current by position.

A storefront reads availability far more often than it changes, and a read that goes to
PostgreSQL costs more than the HTTP around it. Each API process keeps the entries of up
to `capacity` SKUs (those that changed last when it starts, then those read or changed
since), as read from the view at a known position, and every `refresh_seconds` reads
what changed since in one statement: the SKUs whose rows moved past that position, or
whose suppliers' terms did. One statement sees one snapshot, so the copy is always
exactly the view at one position.

The copy answers only when it is at least at the position a reader asks for and its last
refresh is recent; otherwise the reader goes to the view itself, as without it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import psycopg_pool
import structlog

from ledger.stock import second_floor
from projections.entries import CHANGES_SQL, RECENT_SQL, Snapshot, StockEntry, snapshot_from
from projections.store import ViewStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CachedRead:
    """Entries answered from the copy, current at `position`."""

    position: int
    entries: list[StockEntry]


class StockCache:
    """The entries of up to `capacity` SKUs, brought up to date every `refresh_seconds`."""

    def __init__(
        self,
        store: ViewStore,
        *,
        capacity: int,
        refresh_seconds: float,
        max_lag_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.capacity = capacity
        self.refresh_seconds = refresh_seconds
        self.max_lag_seconds = max_lag_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, StockEntry] = {}
        self._generation: int | None = None
        self._position = 0
        self._refreshed = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def position(self) -> int:
        return self._position

    @property
    def generation(self) -> int | None:
        return self._generation

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, skus: Iterable[str], wanted: int | None) -> CachedRead | None:
        """The entries of all these SKUs if the copy holds them all, is at `wanted` or
        beyond, and was refreshed within the lag allowed; None sends the reader to the view."""
        with self._lock:
            if self.clock() - self._refreshed > self.max_lag_seconds:
                return None
            if wanted is not None and wanted > self._position:
                return None
            entries = []
            for sku in skus:
                entry = self._entries.get(sku)
                if entry is None:
                    return None
                entries.append(entry)
            return CachedRead(self._position, entries)

    def offer(self, snapshot: Snapshot) -> None:
        """Keeps entries a reader fetched from the view, if no older than the copy.

        An older snapshot could hold a SKU that changed after it and before the copy's
        position: the refresh that covered that change passed it over (the copy did not
        hold it then), so it is turned away.
        """
        with self._lock:
            if snapshot.generation != self._generation or snapshot.position < self._position:
                return
            if self.capacity <= 0:
                return
            for sku, entry in snapshot.entries.items():
                if sku not in self._entries and len(self._entries) >= self.capacity:
                    del self._entries[next(iter(self._entries))]  # the oldest kept
                self._entries[sku] = entry

    def refresh(self) -> None:
        """Brings the copy to the view's current position: one statement, one snapshot."""
        started = self.clock()
        arguments = {
            "after": self._position,
            "now": second_floor(datetime.now(UTC)),
            "limit": self.capacity,
        }
        known = self._generation
        with self.store.connection() as conn:
            snapshot = None
            if known is not None:
                snapshot = snapshot_from(conn.execute(CHANGES_SQL, arguments).fetchall())
            if snapshot is None or snapshot.generation != known:
                # A new copy, or the view was rebuilt: start from its latest changes.
                snapshot = snapshot_from(conn.execute(RECENT_SQL, arguments).fetchall())
        if snapshot.generation == 0:
            return  # no live generation yet
        with self._lock:
            if snapshot.generation != self._generation:
                self._entries = {}
            for sku, entry in snapshot.entries.items():
                # SKUs it holds (offered meanwhile, too), and new ones while it has room.
                if sku in self._entries or len(self._entries) < self.capacity:
                    self._entries[sku] = entry
            self._generation, self._position = snapshot.generation, snapshot.position
            self._refreshed = started

    def start(self) -> StockCache:
        self._thread = threading.Thread(target=self._run, name="stock-cache", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
                log.warning("stock_cache.refresh_failed", error=str(error))
            self._stop.wait(self.refresh_seconds)
