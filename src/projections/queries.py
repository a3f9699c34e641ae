"""Reads of the views, with read-your-writes: wait until a view has reached a position."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

from eventsourcing.utils import get_topic

from ledger.application import InventoryLedger
from ledger.base import LedgerSnapshot
from ledger.reservation import Reservation
from ledger.stock import StockLevels, second_floor, stock_levels
from ledger.supplier import SupplierTerms
from projections.store import ViewStore

POSITION_SQL = """
SELECT g.position FROM ledger_projection_generations g
JOIN ledger_projections p ON p.name = g.name AND p.live_generation = g.generation
WHERE g.name = %s
"""

# The stock view's position and the numbers, read in one statement (one snapshot): the
# numbers are exactly those of that position, and a read costs one round trip.
AVAILABILITY_AT_SQL = """
SELECT p.position, x.*
FROM (SELECT g.position FROM ledger_projection_generations g
      JOIN ledger_projections lp ON lp.name = g.name AND lp.live_generation = g.generation
      WHERE g.name = 'stock') p
LEFT JOIN (
  SELECT a.sku, a.safety_stock, l.supplier_id, l.quantity, l.observed_at, l.committed,
         l.unreported,
         coalesce((SELECT sum(h.quantity) FROM view_holds h
                   WHERE h.sku = l.sku AND h.supplier_id = l.supplier_id
                     AND h.expires_s > %(now)s), 0) AS held,
         s.name, s.priority, s.lead_time_days, s.buffer, s.stale_after_seconds,
         s.exclude_after_seconds, s.reports_net_of_our_orders
  FROM view_availability a
  LEFT JOIN view_levels l ON l.sku = a.sku
  LEFT JOIN view_suppliers s ON s.supplier_id = l.supplier_id
  WHERE a.sku = ANY(%(skus)s)
) x ON true
ORDER BY x.sku, x.supplier_id
"""


class PositionNotReached(Exception):
    """The view did not reach the wanted position within the bound."""

    def __init__(self, projection: str, wanted: int, reached: int) -> None:
        super().__init__(f"view {projection} is at {reached}, not yet at {wanted}")
        self.projection = projection
        self.wanted = wanted
        self.reached = reached


@dataclass(frozen=True)
class ViewPosition:
    """A supplier position as the stock view holds it, with holds live at the read time."""

    quantity: int
    observed_at: datetime | None
    committed: int
    effective: int
    held: int

    def effective_level(self) -> int:
        return self.effective

    def live_held(self, now: int) -> int:
        return self.held


class Views:
    def __init__(self, store: ViewStore, app: InventoryLedger) -> None:
        self.store = store
        self.app = app

    def position(self, projection: str) -> int:
        with self.store.connection() as conn:
            row = conn.execute(POSITION_SQL, (projection,)).fetchone()
        return 0 if row is None else int(row["position"])

    def wait_for(self, projection: str, wanted: int | None, timeout: float) -> int:
        """The view's position once it is at least `wanted`; raises if the bound passes first."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            reached = self.position(projection)
            if wanted is None or reached >= wanted:
                return reached
            if time.monotonic() >= deadline:
                raise PositionNotReached(projection, wanted, reached)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def availability(self, skus: list[str], at: datetime) -> dict[str, StockLevels]:
        """The numbers of each known SKU at `at`, by the same rules the ledger enforces."""
        return self.availability_after(skus, at, None, 0.0)[1]

    def availability_after(
        self, skus: list[str], at: datetime, wanted: int | None, timeout: float
    ) -> tuple[int, dict[str, StockLevels]]:
        """The stock view's position and `availability`, once the view reached `wanted`.

        One statement reads both, so the numbers are those of exactly that position. A
        view that is behind is waited for without holding a connection.
        """
        arguments = {"skus": skus, "now": second_floor(at)}

        def read() -> tuple[int, list[dict[str, Any]]]:
            with self.store.connection() as conn:
                rows = conn.execute(AVAILABILITY_AT_SQL, arguments).fetchall()
            return (int(rows[0]["position"]) if rows else 0), rows

        position, rows = read()
        if wanted is not None and position < wanted:
            self.wait_for("stock", wanted, timeout)
            position, rows = read()
        return position, self._levels([row for row in rows if row["sku"] is not None], at)

    def _levels(self, rows: list[dict[str, Any]], at: datetime) -> dict[str, StockLevels]:
        safety: dict[str, int] = {}
        positions: dict[str, dict[str, ViewPosition]] = defaultdict(dict)
        terms: dict[str, SupplierTerms] = {}
        for row in rows:
            safety[row["sku"]] = row["safety_stock"]
            supplier = row["supplier_id"]
            if supplier is None:
                continue
            positions[row["sku"]][supplier] = ViewPosition(
                quantity=row["quantity"],
                observed_at=row["observed_at"],
                committed=row["committed"],
                effective=max(0, row["quantity"] + row["unreported"]),
                held=int(row["held"]),
            )
            if row["name"] is not None:
                terms[supplier] = SupplierTerms(
                    name=row["name"],
                    priority=row["priority"],
                    lead_time_days=row["lead_time_days"],
                    buffer=row["buffer"],
                    stale_after_seconds=row["stale_after_seconds"],
                    exclude_after_seconds=row["exclude_after_seconds"],
                    reports_net_of_our_orders=row["reports_net_of_our_orders"],
                )
        return {
            sku: stock_levels(sku, safety[sku], positions.get(sku, {}), at, terms) for sku in safety
        }

    def reservation(self, reservation_id: UUID) -> Reservation | None:
        with self.store.connection() as conn:
            row = conn.execute(
                "SELECT id, version, state FROM view_reservations WHERE id = %s",
                (reservation_id,),
            ).fetchone()
        return None if row is None else self._reservation(row)

    def reservations_for_order(self, order_id: str, limit: int = 100) -> list[Reservation]:
        with self.store.connection() as conn:
            rows = conn.execute(
                "SELECT id, version, state FROM view_reservations WHERE order_id = %s"
                " ORDER BY created_at LIMIT %s",
                (order_id, limit),
            ).fetchall()
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
                " GROUP BY l.supplier_id"
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
        with self.store.connection() as conn:
            return conn.execute(
                "SELECT conflict_id, kind, sku, supplier_id, occurred_at, position,"
                " originator_id, originator_version, topic, actor, correlation_id, detail,"
                " acknowledged_at, acknowledged_by, note FROM view_conflicts"
                " WHERE position > %(after)s"
                " AND (%(kind)s::text IS NULL OR kind = %(kind)s)"
                " AND (%(sku)s::text IS NULL OR sku = %(sku)s)"
                " AND (%(supplier)s::text IS NULL OR supplier_id = %(supplier)s)"
                " AND (%(ack)s::boolean IS NULL OR (acknowledged_at IS NOT NULL) = %(ack)s)"
                " ORDER BY position, conflict_id LIMIT %(limit)s",
                {
                    "after": after,
                    "kind": kind,
                    "sku": sku,
                    "supplier": supplier_id,
                    "ack": acknowledged,
                    "limit": limit,
                },
            ).fetchall()

    def conflict_exists(self, conflict_id: UUID) -> bool:
        with self.store.connection() as conn:
            row = conn.execute(
                "SELECT 1 FROM view_conflicts WHERE conflict_id = %s", (conflict_id,)
            ).fetchone()
        return row is not None

    def mappings(self, supplier_id: str, after: str, limit: int) -> list[dict[str, Any]]:
        with self.store.connection() as conn:
            return conn.execute(
                "SELECT supplier_sku, sku, units_per_supplier_unit, upc FROM view_mappings"
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
