"""Small helpers that put suppliers and stock into a ledger through its writer."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from ledger.base import Cause
from ledger.commands import Observation, PutSku, PutSupplier, ReportStock, Reserve
from ledger.supplier import SupplierTerms
from ledger.writer import LedgerWriter

CAUSE = Cause("integration-test", "test.setup", "test")


def now() -> datetime:
    return datetime.now(UTC)


def stock_sku(
    writer: LedgerWriter, sku: str, quantity: int, supplier_id: str = "acme", **terms: object
) -> None:
    """A SKU with one supplier reporting `quantity` of it now."""
    at = now()
    put_supplier(writer, supplier_id, at, **terms)
    writer.execute(PutSku(at=at, cause=CAUSE, sku=sku, safety_stock=0))
    report(writer, sku, quantity, supplier_id, at)


def report(
    writer: LedgerWriter,
    sku: str,
    quantity: int,
    supplier_id: str = "acme",
    at: datetime | None = None,
) -> None:
    """The supplier reports `quantity` of the SKU (now, unless `at`)."""
    at = at or now()
    writer.execute(
        ReportStock(
            at=at,
            cause=CAUSE,
            supplier_id=supplier_id,
            delivery_id=uuid.uuid4().hex,
            content_hash=uuid.uuid4().hex,
            source="test",
            rows=1,
            observations=[Observation(index=0, sku=sku, quantity=quantity, observed_at=at)],
        )
    )


def reserve(
    lines: list[tuple[str, int]],
    key: str | None = None,
    client: str = "oms",
    ttl: int = 600,
    order_id: str | None = None,
    at: datetime | None = None,
) -> Reserve:
    return Reserve(
        at=at or now(),
        cause=Cause(client, "oms.reserve", uuid.uuid4().hex),
        client=client,
        idempotency_key=key or uuid.uuid4().hex,
        order_id=order_id or f"order-{uuid.uuid4().hex[:8]}",
        lines=lines,
        ttl_seconds=ttl,
        default_ttl_seconds=900,
    )


def put_supplier(
    writer: LedgerWriter, supplier_id: str, at: datetime | None = None, **terms: object
) -> None:
    """The supplier, with these terms (its name its id)."""
    writer.execute(
        PutSupplier(
            at=at or now(),
            cause=CAUSE,
            supplier_id=supplier_id,
            terms=SupplierTerms(name=supplier_id, **terms),  # type: ignore[arg-type]
        )
    )
