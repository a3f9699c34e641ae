"""A realistic mixed workload through the ledger's writer, for the projection tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from ledger.base import Cause
from ledger.commands import (
    Cancel,
    Confirm,
    ExpireHolds,
    Extend,
    Fulfil,
    NoteLastReports,
    Observation,
    PutMappings,
    PutSku,
    PutSupplier,
    Release,
    ReportStock,
    Return,
)
from ledger.errors import InsufficientStock
from ledger.mapping import MappingSpec
from ledger.stock import IncomingStock
from ledger.supplier import SupplierTerms
from ledger.writer import LedgerWriter
from tests.integration.ledger_setup import reserve

CAUSE = Cause("workload", "test.workload", "workload")


def report(
    writer: LedgerWriter,
    supplier: str,
    levels: dict[str, int],
    at: datetime,
    incoming: IncomingStock | None = None,
    **by: str,
) -> int | None:
    """A stock report of internal SKUs (or supplier SKUs with by_supplier_sku="y"), each
    saying the supplier expects `incoming` (None: the report says nothing of it)."""
    key = "supplier_sku" if by.get("by_supplier_sku") else "sku"
    observations = [
        Observation(index=i, quantity=q, observed_at=at, incoming=incoming, **{key: sku})
        for i, (sku, q) in enumerate(levels.items())
    ]
    outcome = writer.execute(
        ReportStock(
            at=at,
            cause=CAUSE,
            supplier_id=supplier,
            delivery_id=uuid.uuid4().hex,
            content_hash=uuid.uuid4().hex,
            source="test",
            rows=len(observations),
            observations=observations,
        )
    )
    return outcome.position


def mixed_workload(writer: LedgerWriter, skus: int = 12) -> list[str]:
    """Suppliers of every kind, mappings, reports (late, short, jumping, unmapped),
    and reservations through their whole lifecycle. Returns the SKUs."""
    now = datetime.now(UTC)
    names = [f"MIX-{uuid.uuid4().hex[:6]}-{i}" for i in range(skus)]
    terms = {
        "north": SupplierTerms("North", priority=1, lead_time_days=2, buffer=1),
        "south": SupplierTerms(
            "South", priority=2, lead_time_days=1, reports_net_of_our_orders=True
        ),
        "east": SupplierTerms("East", priority=3, stale_after_seconds=3600),
    }
    for supplier, supplier_terms in terms.items():
        writer.execute(PutSupplier(at=now, cause=CAUSE, supplier_id=supplier, terms=supplier_terms))
    writer.execute(
        PutMappings(
            at=now,
            cause=CAUSE,
            supplier_id="north",
            mappings=[MappingSpec(f"N-{sku}", sku, 2) for sku in names],
        )
    )
    for sku in names:
        writer.execute(PutSku(at=now, cause=CAUSE, sku=sku, safety_stock=1))
    report(
        writer,
        "north",
        {f"N-{sku}": 20 for sku in names} | {"N-UNKNOWN": 3},
        now,
        by_supplier_sku="y",
    )
    # The unknown one again, alone (a repeat of its conflict), then with another (a new one).
    report(writer, "north", {"N-UNKNOWN": 4}, now + timedelta(seconds=1), by_supplier_sku="y")
    report(
        writer,
        "north",
        {"N-UNKNOWN": 5, "N-OTHER": 1},
        now + timedelta(seconds=2),
        by_supplier_sku="y",
    )
    report(writer, "south", dict.fromkeys(names, 15), now)
    report(writer, "east", dict.fromkeys(names[: skus // 2], 500), now)
    report(writer, "east", dict.fromkeys(names[: skus // 2], 5), now + timedelta(seconds=1))
    report(writer, "south", dict.fromkeys(names[:2], 99), now - timedelta(minutes=5))  # late

    reservations = []
    for index, sku in enumerate(names):
        other = names[(index + 1) % skus]
        try:
            outcome = writer.execute(reserve([(sku, 30 + index), (other, 2)], ttl=600))
        except InsufficientStock:
            continue
        reservations.append(outcome.value.reservation.id)
    short = writer.execute(reserve([(names[0], 1)], ttl=1)).value.reservation
    waiting = writer.execute(reserve([(names[1], 1)], ttl=3600)).value.reservation
    # Still held when the views are read: its hold moved to a later expiry.
    writer.execute(
        Extend(at=datetime.now(UTC), cause=CAUSE, reservation_id=waiting.id, ttl_seconds=7200)
    )
    # A hold of two units, one of them cancelled, still held when the views are read.
    halved = writer.execute(reserve([(names[1], 2)], ttl=3600)).value.reservation
    writer.execute(
        Cancel(
            at=datetime.now(UTC), cause=CAUSE, reservation_id=halved.id, lines=[(names[1], 1, None)]
        )
    )
    for index, rid in enumerate(reservations):
        at = datetime.now(UTC)
        if index % 4 == 0:
            writer.execute(Release(at=at, cause=CAUSE, reservation_id=rid, note="changed mind"))
            continue
        writer.execute(Confirm(at=at, cause=CAUSE, reservation_id=rid))
        if index % 4 == 1:  # a short pick: one unit of its second line cancelled
            other = names[(index + 1) % skus]
            writer.execute(Cancel(at=at, cause=CAUSE, reservation_id=rid, lines=[(other, 1, None)]))
        if index % 4 >= 2:
            line = names[index]
            writer.execute(Fulfil(at=at, cause=CAUSE, reservation_id=rid, lines=[(line, 5, None)]))
        if index % 4 == 3:
            writer.execute(
                Return(
                    at=at,
                    cause=CAUSE,
                    reservation_id=rid,
                    lines=[(names[index], 2, None)],
                    restock=True,
                )
            )
    report(
        writer,
        "north",
        {f"N-{sku}": 1 for sku in names[:3]},
        datetime.now(UTC),
        by_supplier_sku="y",
    )  # below what is promised: exposure
    later = short.expires_at + timedelta(seconds=1)
    writer.execute(ExpireHolds(at=later, cause=CAUSE, reservation_ids=[short.id]))
    writer.execute(
        NoteLastReports(at=now + timedelta(hours=2), cause=CAUSE, last_reports={"east": now})
    )
    return names
