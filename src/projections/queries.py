"""Reads of the views, with read-your-writes: wait until a view has reached a position."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

from eventsourcing.utils import get_topic
from psycopg import sql

from ledger.application import InventoryLedger
from ledger.base import LedgerSnapshot
from ledger.reservation import Reservation
from ledger.stock import REMAP_SOURCE, StockLevels, second_floor
from projections.entries import Snapshot, read_entries
from projections.stockcache import StockCache
from projections.store import ViewStore

# The least time `Views.reach` gives one read of a position.
READ_SECONDS = 1.0

POSITION_SQL = """
SELECT g.position FROM ledger_projection_generations g
JOIN ledger_projections p ON p.name = g.name AND p.live_generation = g.generation
WHERE g.name = %s
"""


# A reservation's status as answered at %(at)s (ledger.reservation.status_at), as SQL:
# `held` and `expired` by the time; any other as recorded; none (%(status)s null), any.
_STATUS_AT = {
    "held": sql.SQL("status = 'held' AND expires_at > %(at)s"),
    "expired": sql.SQL("(status = 'expired' OR (status = 'held' AND expires_at <= %(at)s))"),
}
_STATUS_IS = sql.SQL("(%(status)s::text IS NULL OR status = %(status)s)")
# Which reservations `reservations_query` reads: by id after `after`, or an order's.
BY_STATUS = "{status} AND (%(after)s::uuid IS NULL OR id > %(after)s) AND {client} ORDER BY id"
FOR_ORDER = "order_id = %(order)s AND {status} AND {client} ORDER BY created_at"


def reservations_query(where: str, params: dict[str, Any]) -> sql.Composed:
    """The reservations `where` (BY_STATUS or FOR_ORDER) picks, of `params["status"]` (see
    _STATUS_AT) and of `params["client"]` where one is given, the first `params["limit"]`."""
    condition = _STATUS_AT.get(params["status"] or "", _STATUS_IS)
    client = sql.SQL("client = %(client)s" if params.get("client") is not None else "true")
    picked = sql.SQL(where).format(status=condition, client=client)
    query = sql.SQL("SELECT id, version, state FROM view_reservations WHERE {}").format(picked)
    return query + sql.SQL(" LIMIT %(limit)s")


_CONFLICTS = (
    "SELECT conflict_id, kind, sku, supplier_id, occurred_at, position,"
    " originator_id, originator_version, topic, actor, correlation_id, detail,"
    " acknowledged_at, acknowledged_by, note FROM view_conflicts"
    " WHERE (%(kind)s::text IS NULL OR kind = %(kind)s)"
    " AND (%(sku)s::text IS NULL OR sku = %(sku)s)"
    " AND (%(supplier)s::text IS NULL OR supplier_id = %(supplier)s)"
    " AND (%(ack)s::boolean IS NULL OR (acknowledged_at IS NOT NULL) = %(ack)s)"
)
_ORDER = " ORDER BY position, conflict_id"
_PAGE = _ORDER + " LIMIT %(limit)s"


class PositionNotReached(Exception):
    """The view did not reach the wanted position within the bound."""

    def __init__(self, projection: str, wanted: int, reached: int, head: int | None = None) -> None:
        super().__init__(f"view {projection} is at {reached}, not yet at {wanted}")
        self.projection = projection
        self.wanted = wanted
        self.reached = reached
        # The log's own last position, where the wanted one lies beyond it: no write
        # has reached it, and none waited for would (a position from another database).
        self.head = head


class Views:
    def __init__(
        self, store: ViewStore, app: InventoryLedger, cache: StockCache | None = None
    ) -> None:
        self.store = store
        self.app = app
        self.cache = cache
        # Reads of a view's position for requests waiting on the event loop (`reach`):
        # on a thread of their own, one at a time a view, shared by every waiter.
        self._position_reader: ThreadPoolExecutor | None = None
        self._reader_lock = threading.Lock()
        self._position_reads: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Future[int]] = {}

    def position(self, projection: str) -> int:
        with self.store.connection() as conn:
            row = conn.execute(POSITION_SQL, (projection,)).fetchone()
        return 0 if row is None else int(row["position"])

    def wait_for(self, projection: str, wanted: int | None, timeout: float) -> int:
        """The view's position once it is at least `wanted`; raises if the bound passes first."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        head: int | None = None
        while True:
            reached = self.position(projection)
            if wanted is None or reached >= wanted:
                return reached
            if head is None:
                # Every position a write answered is in the log when it is answered: one
                # beyond the log's end is refused at once, not waited for on a thread.
                head = self.app.recorder.max_notification_id() or 0
                if wanted > head:
                    raise PositionNotReached(projection, wanted, reached, head)
            if time.monotonic() >= deadline:
                raise PositionNotReached(projection, wanted, reached)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def reach(self, projection: str, wanted: int | None, timeout: float) -> int | None:
        """Waits on the event loop until the view is at `wanted`, as `wait_for` does on a
        thread; returns the position it read (None: nothing wanted). No shared thread is
        held meanwhile: a hundred reads behind a stopped projections worker held every
        one, each of them up to three times `timeout` (its clock started when a thread
        took it up), and a read that asked for no position waited 9-15 s behind them (a
        walkthrough). The bound counts from the call, so from the request's arrival."""
        if wanted is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.005
        reached, head = 0, None
        while True:
            # Each read within what is left of the bound, and at least READ_SECONDS: reads
            # queue on one thread, and a bound of 0 still reads once.
            try:
                reached = await asyncio.wait_for(
                    self._shared(loop, projection, self.position, projection),
                    max(READ_SECONDS, deadline - loop.time()),
                )
                if reached >= wanted:
                    return reached
                if head is None:
                    # The log's end, read for this request alone: one read begun before
                    # the write it asks for would put that write beyond the log (a review).
                    head = await asyncio.wait_for(
                        loop.run_in_executor(self._reader(), self._head),
                        max(READ_SECONDS, deadline - loop.time()),
                    )
                    if wanted > head:
                        raise PositionNotReached(projection, wanted, reached, head)
            except TimeoutError:
                raise PositionNotReached(projection, wanted, reached) from None
            if loop.time() >= deadline:
                raise PositionNotReached(projection, wanted, reached)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _head(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def _reader(self) -> ThreadPoolExecutor:
        with self._reader_lock:
            if self._position_reader is None:
                self._position_reader = ThreadPoolExecutor(1, thread_name_prefix="view-positions")
            return self._position_reader

    async def _shared(
        self, loop: asyncio.AbstractEventLoop, key: str, read: Callable[..., int], *args: Any
    ) -> int:
        """What `read` answers (a view's position), read once, on the reader's thread, for
        every waiter that asks while it is read."""
        done = self._position_reads.get((loop, key))
        if done is None and len(self._position_reads) > 32:  # loops closed since (tests')
            self._position_reads = {
                k: r for k, r in self._position_reads.items() if not k[0].is_closed()
            }
        if done is None or done.done():
            done = loop.run_in_executor(self._reader(), read, *args)
            self._position_reads[(loop, key)] = done
        return await asyncio.shield(done)

    def close(self) -> None:
        """Stops the thread that reads positions for waiting requests, if it started."""
        with self._reader_lock:
            if self._position_reader is not None:
                self._position_reader.shutdown(wait=False)
                self._position_reader = None

    def availability(self, skus: list[str], at: datetime) -> dict[str, StockLevels]:
        """The numbers of each known SKU at `at`, by the same rules the ledger enforces."""
        return self.availability_after(skus, at, None, 0.0)[1]

    def availability_after(
        self, skus: list[str], at: datetime, wanted: int | None, timeout: float
    ) -> tuple[int, dict[str, StockLevels]]:
        """The stock view's position and `availability`, once the view reached `wanted`.

        One statement reads both, so the numbers are those of exactly that position. A
        view that is behind is waited for without holding a connection. What was read is
        offered to the in-process copy, if there is one.
        """
        now = second_floor(at)

        def read() -> Snapshot:
            with self.store.connection() as conn:
                return read_entries(conn, skus, now)

        deadline = time.monotonic() + timeout
        snapshot = read()
        while wanted is not None and snapshot.position < wanted:
            # Read again until the read itself is at the position: the view may switch
            # between the wait and the read, to a generation rebuilt in place that is
            # still filling (a reader got 404 for the SKU it had just reserved).
            self.wait_for("stock", wanted, max(0.0, deadline - time.monotonic()))
            snapshot = read()
        if self.cache is not None:
            self.cache.offer(snapshot)
        return snapshot.position, {sku: entry.levels(at) for sku, entry in snapshot.entries.items()}

    def reservation(self, reservation_id: UUID) -> Reservation | None:
        with self.store.connection() as conn:
            row = conn.execute(
                "SELECT id, version, state FROM view_reservations WHERE id = %s",
                (reservation_id,),
            ).fetchone()
        return None if row is None else self._reservation(row)

    def skus(self, after: str, limit: int) -> list[dict[str, Any]]:
        """The catalogue's SKUs after `after`, in order, with their safety stock."""
        with self.store.connection() as conn:
            return conn.execute(
                "SELECT sku, safety_stock FROM view_availability WHERE sku > %s"
                " ORDER BY sku LIMIT %s",
                (after, limit),
            ).fetchall()

    def reservations_by_status(
        self,
        status: str | None,
        at: datetime,
        after: UUID | None,
        limit: int,
        client: str | None = None,
    ) -> list[Reservation]:
        """Reservations by id after `after`, of a status as it is answered at `at` (a hold
        past its expiry is `expired` before the sweeper records it; `held`, one that is
        not), or of any; of one OMS `client`, or of every one. Each status its own
        statement, so that the planner sees which."""
        return self._reservations(
            BY_STATUS,
            {"after": after, "status": status, "at": at, "limit": limit, "client": client},
        )

    def reservations_for_order(
        self,
        order_id: str,
        limit: int = 100,
        status: str | None = None,
        at: datetime | None = None,
        client: str | None = None,
    ) -> list[Reservation]:
        """An order's reservations, the first `limit` made, of a status as `reservations_by_
        status` reads it, if one is given, and of one OMS `client`, if one is given."""
        return self._reservations(
            FOR_ORDER,
            {"order": order_id, "status": status, "at": at, "limit": limit, "client": client},
        )

    def _reservations(self, where: str, params: dict[str, Any]) -> list[Reservation]:
        """The reservations `where` picks (see `reservations_query`)."""
        with self.store.connection() as conn:
            rows = conn.execute(reservations_query(where, params), params).fetchall()
        return [self._reservation(row) for row in rows]

    def due_holds(self, at: datetime, limit: int) -> list[UUID]:
        with self.store.connection() as conn:
            rows = conn.execute(
                "SELECT id FROM view_reservations WHERE status = 'held' AND expires_at <= %s"
                " ORDER BY expires_at LIMIT %s",
                (at, limit),
            ).fetchall()
        return [row["id"] for row in rows]

    def last_reports(self) -> dict[str, datetime]:
        """When each supplier with a staleness limit last reported any level."""
        with self.store.connection() as conn:
            rows = conn.execute(
                "SELECT l.supplier_id, max(l.observed_at) AS last FROM view_levels l"
                " JOIN view_suppliers s ON s.supplier_id = l.supplier_id"
                " WHERE s.stale_after_seconds IS NOT NULL AND l.observed_at IS NOT NULL"
                # a level a remap retired is not a report (it gave the remap's time); one
                # it moved keeps its report's (a review: a supplier whose every level a
                # remap moved was never found stale)
                " AND NOT (l.source = %s AND l.quantity = 0)"
                " GROUP BY l.supplier_id",
                (REMAP_SOURCE,),
            ).fetchall()
        return {row["supplier_id"]: row["last"] for row in rows}

    def conflicts(
        self,
        *,
        kind: str | None = None,
        sku: str | None = None,
        supplier_id: str | None = None,
        acknowledged: bool | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Conflicts after a position, in log order, `limit` of them or a few more: a page
        holds every conflict of its last position (one event can raise several), since
        the next page starts after that position."""
        params = {
            "after": after,
            "kind": kind,
            "sku": sku,
            "supplier": supplier_id,
            "ack": acknowledged,
            "limit": limit,
        }
        with self.store.connection() as conn:
            rows = conn.execute(_CONFLICTS + " AND position > %(after)s" + _PAGE, params).fetchall()
            if len(rows) == limit:
                last = rows[-1]
                rows += conn.execute(
                    _CONFLICTS + " AND position = %(last)s AND conflict_id > %(id)s" + _ORDER,
                    {**params, "last": last["position"], "id": last["conflict_id"]},
                ).fetchall()
            return rows

    def conflict_exists(self, conflict_id: UUID) -> bool:
        with self.store.connection() as conn:
            row = conn.execute(
                "SELECT 1 FROM view_conflicts WHERE conflict_id = %s", (conflict_id,)
            ).fetchone()
        return row is not None

    def mappings(self, supplier_id: str, after: str, limit: int) -> list[dict[str, Any]]:
        with self.store.connection() as conn:
            return conn.execute(
                "SELECT supplier_sku, sku, units_per_supplier_unit, upc, unit FROM view_mappings"
                " WHERE supplier_id = %s AND supplier_sku > %s ORDER BY supplier_sku LIMIT %s",
                (supplier_id, after, limit),
            ).fetchall()

    def _reservation(self, row: dict[str, Any]) -> Reservation:
        state = self.app.mapper.transcoder.decode(bytes(row["state"]))
        snapshot = LedgerSnapshot(
            originator_id=row["id"],
            originator_version=row["version"],
            timestamp=datetime.now(UTC),
            topic=get_topic(Reservation),
            state=state,
        )
        return cast(Reservation, snapshot.mutate(None))
