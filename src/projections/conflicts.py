"""Conflict analysis: what needs an operator's eye, each with the event that caused it.

Kinds: oversell exposure (a report below what is promised against the supplier),
anomalous jumps (a change beyond both thresholds), late reports ignored, suppliers gone
stale, and deliveries with unmapped supplier SKUs. An acknowledgement is itself an event.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args
from uuid import UUID

from psycopg import sql

from ledger.application import InventoryLedger
from ledger.conflict import ConflictAcknowledgement, conflict_id
from ledger.delivery import FeedDelivery
from ledger.stock import REMAP_SOURCE, StockItem
from ledger.supplier import Supplier
from projections.base import Logged, Notified, Projection, table
from projections.store import Connection

ConflictKind = Literal[
    "oversell_exposure", "anomalous_jump", "late_report", "supplier_stale", "unmapped_sku"
]
KINDS: tuple[str, ...] = get_args(ConflictKind)


@dataclass(frozen=True)
class JumpThresholds:
    """A change is anomalous when both `absolute` units and `relative` of the old level."""

    absolute: int = 100
    relative: float = 0.5

    def anomalous(self, previous: int, quantity: int) -> bool:
        change = abs(quantity - previous)
        return change >= self.absolute and change >= self.relative * max(previous, 1)


class ConflictsProjection(Projection):
    name = "conflicts"
    schema_version = 1
    tables: ClassVar[list[str]] = ["conflicts"]

    def __init__(self, app: InventoryLedger, jumps: JumpThresholds | None = None) -> None:
        super().__init__(app)
        self.jumps = jumps or JumpThresholds()
        self.reset()

    def reset(self) -> None:
        self._names: dict[UUID, str] = {}
        self._new_names: dict[UUID, str] = {}
        self._conflicts: list[dict[str, Any]] = []
        # Conflicts raised before the name of their stream was at hand: (row, column, id).
        self._unnamed: list[tuple[dict[str, Any], str, UUID]] = []
        self._acknowledgements: list[dict[str, Any]] = []
        # Each supplier's latest unmapped_sku conflict (None: not read yet), and the
        # repeats of those written.
        self._unmapped: dict[str, _OpenUnmapped] | None = None
        self._repeats: dict[UUID, dict[str, Any]] = {}

    @property
    def topics(self) -> list[str]:
        return [
            StockItem.Registered.TOPIC,
            StockItem.Observed.TOPIC,
            StockItem.LateReportIgnored.TOPIC,
            Supplier.Registered.TOPIC,
            Supplier.WentStale.TOPIC,
            FeedDelivery.Recorded.TOPIC,
            ConflictAcknowledgement.Acknowledged.TOPIC,
        ]

    def ddl(self) -> list[str]:
        return [
            """CREATE TABLE {schema}.conflicts (
                conflict_id uuid PRIMARY KEY, kind text NOT NULL, sku text, supplier_id text,
                occurred_at timestamptz NOT NULL, position bigint NOT NULL,
                originator_id uuid NOT NULL, originator_version integer NOT NULL,
                topic text NOT NULL, actor text NOT NULL, correlation_id text NOT NULL,
                detail jsonb NOT NULL, acknowledged_at timestamptz, acknowledged_by text,
                note text)""",
            "CREATE INDEX ON {schema}.conflicts (kind, position)",
            "CREATE INDEX ON {schema}.conflicts (sku, position)",
            "CREATE INDEX ON {schema}.conflicts (supplier_id, position)",
            # Names of the streams the conflicts mention; internal to this projection.
            "CREATE TABLE {schema}.names (id uuid PRIMARY KEY, name text NOT NULL)",
        ]

    def begin(self, conn: Connection, schema: str, page: Sequence[Logged]) -> None:
        """Reads each supplier's open unmapped_sku conflict once, before the first delivery
        that may repeat it (see `_unmapped_skus`). Nothing else to read ahead: a name not
        at hand is read for the conflicts that need it, when they are written (`flush`).
        Reading those of every stream in the page cost a delivery of 50,000 changes ~0.7 s
        of lookups, for a handful of conflicts."""
        if self._unmapped is not None:
            return
        if not any(n.topic == FeedDelivery.Recorded.TOPIC for n in page):
            return
        rows = conn.execute(
            sql.SQL(
                "SELECT DISTINCT ON (supplier_id) supplier_id, conflict_id, detail,"
                " acknowledged_at IS NOT NULL AS acknowledged FROM {}"
                " WHERE kind = 'unmapped_sku' ORDER BY supplier_id, position DESC"
            ).format(table(schema, "conflicts"))
        ).fetchall()
        self._unmapped = {
            row["supplier_id"]: _OpenUnmapped(
                row["conflict_id"], row["detail"], None, row["acknowledged"]
            )
            for row in rows
        }

    def handle(self, notified: Notified) -> None:
        event = notified.event
        if isinstance(event, StockItem.Registered):
            self._name(event.originator_id, event.sku)
        elif isinstance(event, Supplier.Registered):
            self._name(event.originator_id, event.supplier_id)
        elif isinstance(event, StockItem.Observed):
            if event.exposure > 0:
                self._raise(
                    "oversell_exposure",
                    notified,
                    named="sku",
                    supplier_id=event.supplier_id,
                    quantity=event.quantity,
                    previous_quantity=event.previous_quantity,
                    exposure=event.exposure,
                    delivery_id=event.delivery_id,
                )
            previous = event.previous_quantity
            # A remap's 0 is the operator's own doing, not a supplier's jump: a PUT of 1,000
            # remaps raised 1,000 of them (an operator's walkthrough).
            remap = event.source == REMAP_SOURCE
            if (
                previous is not None
                and not remap
                and self.jumps.anomalous(previous, event.quantity)
            ):
                self._raise(
                    "anomalous_jump",
                    notified,
                    named="sku",
                    supplier_id=event.supplier_id,
                    previous_quantity=previous,
                    quantity=event.quantity,
                    change=event.quantity - previous,
                    delivery_id=event.delivery_id,
                )
        elif isinstance(event, StockItem.LateReportIgnored):
            self._raise(
                "late_report",
                notified,
                named="sku",
                supplier_id=event.supplier_id,
                quantity=event.quantity,
                observed_at=event.observed_at.isoformat(),
                current_observed_at=event.current_observed_at.isoformat(),
                delivery_id=event.delivery_id,
            )
        elif isinstance(event, Supplier.WentStale):
            self._raise(
                "supplier_stale",
                notified,
                named="supplier_id",
                last_report_at=event.last_report_at.isoformat(),
            )
        elif isinstance(event, FeedDelivery.Recorded):
            self._unmapped_skus(event, notified)
        elif isinstance(event, ConflictAcknowledgement.Acknowledged):
            if self._unmapped is not None:
                for latest in self._unmapped.values():
                    if latest.conflict_id == event.originator_id:
                        latest.acknowledged = True
            self._acknowledgements.append(
                {
                    "id": event.originator_id,
                    "at": event.timestamp,
                    "by": event.actor,
                    "note": event.note,
                }
            )

    def _unmapped_skus(self, event: FeedDelivery.Recorded, notified: Notified) -> None:
        """An unmapped_sku conflict for a delivery with unmapped supplier SKUs, unless the
        supplier's latest one is open and names them all already: that one counts the
        delivery as a repeat (`repeats`, `last_delivery_id`, `last_position`,
        `last_occurred_at`). A feed read again and again with a record nobody mapped (a poll
        every minute) raised a conflict at each delivery: 166 from 165 (an operator
        walkthrough). New supplier SKUs, or the latest acknowledged, raise a new one."""
        unmapped = [r for r in event.rejected if r["reason"] == "unmapped_supplier_sku"]
        if not unmapped:
            return
        skus = sorted({_supplier_sku(r.get("record") or {}) for r in unmapped})
        assert self._unmapped is not None  # read by `begin`
        latest = self._unmapped.get(event.supplier_id)
        named = set(latest.detail.get("supplier_skus", [])) if latest is not None else set()
        if (
            latest is not None
            and not latest.acknowledged
            and len(skus) <= MAX_NAMED
            and named.issuperset(skus)
        ):
            repeat = {
                "repeats": int(latest.detail.get("repeats", 0)) + 1,
                "last_delivery_id": event.delivery_id,
                "last_position": notified.position,
                "last_occurred_at": event.timestamp.isoformat(),
            }
            latest.detail.update(repeat)
            if latest.row is not None:  # not written yet: written so
                latest.row["detail"] = json.dumps(latest.detail)
            else:
                self._repeats[latest.conflict_id] = repeat
            return
        detail: dict[str, Any] = {
            "delivery_id": event.delivery_id,
            "records": len(unmapped),
            "supplier_skus": skus[:MAX_NAMED],
        }
        row = self._raise("unmapped_sku", notified, supplier_id=event.supplier_id, **detail)
        self._unmapped[event.supplier_id] = _OpenUnmapped(row["conflict_id"], detail, row)

    def _name(self, originator_id: UUID, name: str) -> None:
        self._names[originator_id] = name
        self._new_names[originator_id] = name

    def _raise(
        self,
        kind: str,
        notified: Notified,
        *,
        named: Literal["sku", "supplier_id"] | None = None,
        supplier_id: str | None = None,
        **detail: Any,
    ) -> dict[str, Any]:
        """Keeps a conflict to write; `named`: the column (the SKU, or the supplier) that
        takes the name of the event's stream."""
        event = notified.event
        row = {
            "conflict_id": conflict_id(kind, event.originator_id, event.originator_version),
            "kind": kind,
            "sku": None,
            "supplier_id": supplier_id,
            "occurred_at": event.timestamp,
            "position": notified.position,
            "originator_id": event.originator_id,
            "originator_version": event.originator_version,
            "topic": notified.topic,
            "actor": event.actor,
            "correlation_id": event.correlation_id,
            "detail": json.dumps(detail),
        }
        self._conflicts.append(row)
        if named is not None:
            name = self._names.get(event.originator_id)
            if name is None:
                self._unnamed.append((row, named, event.originator_id))
            else:
                row[named] = name
        return row

    def flush(self, conn: Connection, schema: str) -> None:
        self._name_the_unnamed(conn, schema)
        names, conflicts, acknowledgements = (
            self._new_names,
            self._conflicts,
            self._acknowledgements,
        )
        self._new_names, self._conflicts, self._acknowledgements = {}, [], []
        repeats, self._repeats = self._repeats, {}
        for latest in (self._unmapped or {}).values():
            latest.row = None  # written below
        if len(self._names) > 100_000:
            self._names = {}
        with conn.cursor() as cursor:
            if names:
                cursor.executemany(
                    sql.SQL("INSERT INTO {} (id, name) VALUES (%s, %s)").format(
                        table(schema, "names")
                    ),
                    list(names.items()),
                )
            if conflicts:
                columns = list(conflicts[0])
                cursor.executemany(
                    sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                        table(schema, "conflicts"),
                        sql.SQL(", ").join(map(sql.Identifier, columns)),
                        sql.SQL(", ").join(sql.Placeholder(c) for c in columns),
                    ),
                    conflicts,
                )
            if repeats:
                cursor.executemany(
                    sql.SQL(
                        "UPDATE {} SET detail = detail || %(repeat)s::jsonb"
                        " WHERE conflict_id = %(id)s"
                    ).format(table(schema, "conflicts")),
                    [{"id": i, "repeat": json.dumps(r)} for i, r in repeats.items()],
                )
            if acknowledgements:
                cursor.executemany(
                    sql.SQL(
                        "UPDATE {} SET acknowledged_at = %(at)s, acknowledged_by = %(by)s,"
                        " note = %(note)s WHERE conflict_id = %(id)s"
                    ).format(table(schema, "conflicts")),
                    acknowledgements,
                )

    def _name_the_unnamed(self, conn: Connection, schema: str) -> None:
        """Gives the conflicts raised without their stream's name at hand that name, from
        the names written before (every stream is named by its first event)."""
        if not self._unnamed:
            return
        ids = list({originator_id for _, _, originator_id in self._unnamed})
        rows = conn.execute(
            sql.SQL("SELECT id, name FROM {} WHERE id = ANY(%b::uuid[])").format(
                table(schema, "names")
            ),
            (ids,),
        ).fetchall()
        self._names.update({row["id"]: row["name"] for row in rows})
        for row, column, originator_id in self._unnamed:
            row[column] = self._names[originator_id]
        self._unnamed = []


# The supplier SKUs an unmapped_sku conflict names, at most.
MAX_NAMED = 100


@dataclass
class _OpenUnmapped:
    """A supplier's latest unmapped_sku conflict: its detail, its row while unwritten, and
    whether it was acknowledged. Only the latest takes repeats, and only while open: kept
    so, the rule reads the same from memory and from the rows (after a reset, a handover or
    in a rebuild). "The newest open one" was not: acknowledging the latest left an older
    open one, which the rows then offered and memory did not (a review)."""

    conflict_id: UUID
    detail: dict[str, Any]
    row: dict[str, Any] | None
    acknowledged: bool = False


def _supplier_sku(record: dict[str, Any]) -> str:
    """The supplier SKU of a refused record, as the API or a feed recorded it."""
    fields = record.get("fields") or {}
    return str(record.get("supplier_sku") or fields.get("supplier_sku") or fields.get("upc") or "?")
