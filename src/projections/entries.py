"""What the stock view holds of a SKU, read at one position: the input of `stock_levels`.

Rows carry only what follows from the events; holds keep their expiry, so a copy read
now still answers correctly later (a hold that ran out stops counting when read).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger.stock import IncomingStock, StockLevels, incoming_of, stock_levels
from ledger.supplier import SupplierTerms
from projections.store import Connection

# The live generation of the stock view and how far it has reached.
LIVE_SQL = """
SELECT g.generation, g.position FROM ledger_projection_generations g
JOIN ledger_projections lp ON lp.name = g.name AND lp.live_generation = g.generation
WHERE g.name = 'stock'
"""


def _at_live_position(skus: str) -> str:
    """The live position beside the entry rows (one per SKU and supplier) of the SKUs the
    query `skus` names, in one statement, so one snapshot. Each row is found by index
    lookups (LATERAL, OFFSET 0), however many rows the planner expects `skus` to give: a
    new or rebuilt view has no statistics yet, and a hash join over it costs milliseconds."""
    return f"""
SELECT p.generation, p.position, x.*
FROM ({LIVE_SQL}) p
LEFT JOIN (
  SELECT a.sku, a.safety_stock, l.supplier_id, l.quantity, l.observed_at, l.committed,
         l.net_committed, l.reported_net, l.unreported, l.incoming, l.source,
         (SELECT array_agg(ARRAY[h.expires_s, h.quantity] ORDER BY h.expires_s)
          FROM view_holds h
          WHERE h.sku = l.sku AND h.supplier_id = l.supplier_id
            AND h.expires_s > %(now)s) AS holds,
         s.name, s.priority, s.lead_time_days, s.buffer, s.stale_after_seconds,
         s.exclude_after_seconds, s.reports_net_of_our_orders
  FROM ({skus}) w
  CROSS JOIN LATERAL (SELECT sku, safety_stock FROM view_availability
                      WHERE sku = w.sku OFFSET 0) a
  LEFT JOIN LATERAL (SELECT * FROM view_levels WHERE sku = a.sku OFFSET 0) l ON true
  LEFT JOIN view_suppliers s ON s.supplier_id = l.supplier_id
) x ON true
ORDER BY x.sku, x.supplier_id
"""  # noqa: S608


# The entries of some SKUs: a read costs one round trip, and its numbers are exactly
# those of the position it names.
ENTRIES_AT_SQL = _at_live_position("SELECT DISTINCT unnest(%(skus)s::text[]) AS sku")


def _changed(among: str = "", limit: str = "") -> str:
    """The SKUs whose rows moved past `after`, and those of suppliers whose terms did, by
    name, beside the live position (one row with a null SKU when none moved). `among`: a
    further condition on each such SKU (`{sku}` where its column goes); `limit`: at most
    that many of them."""
    availability = f" AND {among.format(sku='sku')}" if among else ""
    levels = f" AND {among.format(sku='l.sku')}" if among else ""
    moved = f"""SELECT sku FROM view_availability WHERE position > %(after)s{availability}
  UNION SELECT l.sku FROM view_suppliers s CROSS JOIN LATERAL (
    SELECT sku FROM view_levels WHERE supplier_id = s.supplier_id OFFSET 0) l
  WHERE s.position > %(after)s{levels}"""  # noqa: S608 (constant fragments only)
    if limit:
        moved = f"SELECT sku FROM ({moved}) moved LIMIT {limit}"  # noqa: S608
    return f"""
SELECT p.generation, p.position, x.sku
FROM ({LIVE_SQL}) p
LEFT JOIN (
  {moved}
) x ON true
"""  # noqa: S608


# The SKUs a copy at position `after` may hold stale, so that it reads again only those
# it follows.
CHANGED_SQL = _changed()
# What moved past `after` among some SKUs (all, when `skus` is null), at most `limit` of
# them: where a stream of availability starts (api.stream).
CHANGED_AMONG_SQL = _changed(
    "(%(skus)s::text[] IS NULL OR {sku} = ANY(%(skus)s::text[]))", "%(limit)s"
)

# A new copy's first entries: the SKUs that changed last, the likeliest to be read.
RECENT_SQL = _at_live_position(
    "SELECT sku FROM view_availability ORDER BY position DESC LIMIT %(limit)s"
)


@dataclass(frozen=True, slots=True)
class ViewPosition:
    """A supplier position as the stock view holds it; its holds as (expires_s, quantity)."""

    quantity: int
    observed_at: datetime | None
    committed: int
    effective: int
    holds: tuple[tuple[int, int], ...] = ()
    incoming: IncomingStock = ()
    net_committed: int = 0
    source: str = ""
    reported_net: bool = True

    def effective_level(self) -> int:
        return self.effective

    def live_held(self, now: int) -> int:
        return sum(quantity for expires, quantity in self.holds if expires > now)


@dataclass(frozen=True, slots=True)
class StockEntry:
    """One SKU of the stock view, with the terms of its suppliers as they were read."""

    sku: str
    safety_stock: int
    positions: dict[str, ViewPosition] = field(default_factory=dict)
    terms: dict[str, SupplierTerms] = field(default_factory=dict)

    def levels(self, at: datetime) -> StockLevels:
        """The SKU's numbers at `at`."""
        return stock_levels(self.sku, self.safety_stock, self.positions, at, self.terms)


@dataclass(frozen=True)
class Snapshot:
    """Entries read at one position of one generation of the stock view."""

    generation: int
    position: int
    entries: dict[str, StockEntry]


def terms_from(row: dict[str, Any]) -> SupplierTerms:
    return SupplierTerms(
        name=row["name"],
        priority=row["priority"],
        lead_time_days=row["lead_time_days"],
        buffer=row["buffer"],
        stale_after_seconds=row["stale_after_seconds"],
        exclude_after_seconds=row["exclude_after_seconds"],
        reports_net_of_our_orders=row["reports_net_of_our_orders"],
    )


def entries_from(rows: list[dict[str, Any]]) -> dict[str, StockEntry]:
    """Entries from rows of `_at_live_position`, one per (SKU, supplier) or per bare SKU.

    Each supplier's terms are built once and shared by its entries: a copy of 100,000
    SKUs would otherwise hold 100,000 equal objects."""
    safety: dict[str, int] = {}
    positions: dict[str, dict[str, ViewPosition]] = defaultdict(dict)
    terms: dict[str, dict[str, SupplierTerms]] = defaultdict(dict)
    shared: dict[str, SupplierTerms] = {}
    for row in rows:
        sku = row["sku"]
        safety[sku] = row["safety_stock"]
        supplier = row["supplier_id"]
        if supplier is None:
            continue
        holds = row["holds"] or ()
        positions[sku][supplier] = ViewPosition(
            quantity=row["quantity"],
            observed_at=row["observed_at"],
            committed=row["committed"],
            effective=max(0, row["quantity"] + row["unreported"]),
            holds=tuple((int(expires), int(quantity)) for expires, quantity in holds),
            incoming=incoming_of(row["incoming"] or ()),
            net_committed=row["net_committed"],
            source=row["source"],
            reported_net=row["reported_net"],
        )
        if row["name"] is not None:
            if supplier not in shared:
                shared[supplier] = terms_from(row)
            terms[sku][supplier] = shared[supplier]
    return {
        sku: StockEntry(sku, safety_stock, positions.get(sku, {}), terms.get(sku, {}))
        for sku, safety_stock in safety.items()
    }


def read_entries(conn: Connection, skus: list[str], now: int) -> Snapshot:
    """The entries of these SKUs (the known ones) at the view's current position."""
    return snapshot_from(conn.execute(ENTRIES_AT_SQL, {"skus": skus, "now": now}).fetchall())


def snapshot_from(rows: list[dict[str, Any]]) -> Snapshot:
    """Rows of a statement that reads the live position beside entries (at least one row
    while the view has a live generation; none is generation 0)."""
    if not rows:
        return Snapshot(generation=0, position=0, entries={})
    first = rows[0]
    return Snapshot(
        generation=int(first["generation"]),
        position=int(first["position"]),
        entries=entries_from([row for row in rows if row["sku"] is not None]),
    )
