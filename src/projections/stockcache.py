"""An in-process copy of the stock view for availability reads, kept current by position.

A storefront reads availability far more often than it changes, and a read that goes to
PostgreSQL costs more than the HTTP around it. Each API process keeps the entries of the
SKUs it was asked about, as read from the view at a known position, and every
`refresh_seconds` reads what changed since: the SKUs whose rows moved past that position,
in one REPEATABLE READ snapshot, so the copy is always exactly the view at one position.

The copy answers only when it is at least at the position a reader asks for and its last
refresh is recent; otherwise the reader goes to the view itself, as without it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import psycopg_pool
import structlog

from ledger.stock import second_floor
from ledger.supplier import SupplierTerms
from projections.entries import (
    CHANGED_SKUS_SQL,
    ENTRIES_SQL,
    LIVE_SQL,
    RECENT_ENTRIES_SQL,
    TERMS_SQL,
    Snapshot,
    StockEntry,
    entries_from,
    terms_from,
)
from projections.store import ViewStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CachedRead:
    """Entries answered from the copy, current at `position`, with the terms to read them by."""

    position: int
    entries: list[StockEntry]
    terms: Mapping[str, SupplierTerms]


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
        self._terms: dict[str, SupplierTerms] = {}
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
            return CachedRead(self._position, entries, self._terms)

    def offer(self, snapshot: Snapshot) -> None:
        """Keeps entries a reader fetched from the view, if no older than the copy.

        An older snapshot could hold a SKU that changed after it and before the copy's
        position: the refresh that covered that change did not know the SKU, so it is
        turned away.
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
        """Brings the copy to the view's current position (one snapshot of the view)."""
        started = self.clock()
        now = second_floor(datetime.now(UTC))
        with self.store.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            live = conn.execute(LIVE_SQL).fetchone()
            if live is None:
                return
            generation, position = int(live["generation"]), int(live["position"])
            with self._lock:
                same = generation == self._generation
                after = self._position if same else -1
            if same and position == after:
                self._refreshed = started
                return
            changed: list[str] = []
            rows = []
            if same:
                changed = [row["sku"] for row in conn.execute(CHANGED_SKUS_SQL, {"after": after})]
                kept = self._to_read(changed)
                if kept:
                    rows = conn.execute(ENTRIES_SQL, {"skus": kept, "now": now}).fetchall()
            else:  # a new copy: the SKUs that changed last are the likeliest to be read
                arguments = {"limit": self.capacity, "now": now}
                rows = conn.execute(RECENT_ENTRIES_SQL, arguments).fetchall()
            terms = {
                row["supplier_id"]: terms_from(row)
                for row in conn.execute(TERMS_SQL, {"after": after})
            }
        entries = entries_from(rows)
        with self._lock:
            if generation != self._generation:
                self._entries = {}
                self._terms = {}
            else:
                # A SKU that changed and was not read again (a reader offered it meanwhile)
                # may be older than `position`: forget it, the next read fetches it anew.
                for sku in changed:
                    if sku not in entries:
                        self._entries.pop(sku, None)
            self._entries.update(entries)
            if terms:
                self._terms = {**self._terms, **terms}
            self._generation, self._position = generation, position
            self._refreshed = started

    def _to_read(self, changed: list[str]) -> list[str]:
        """Of the SKUs that changed, those the copy keeps: the ones it holds, and new ones
        while it has room."""
        with self._lock:
            room = self.capacity - len(self._entries)
            kept = []
            for sku in changed:
                if sku in self._entries:
                    kept.append(sku)
                elif room > 0:
                    kept.append(sku)
                    room -= 1
            return kept

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
