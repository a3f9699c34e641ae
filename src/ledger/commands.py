"""What the ledger can be asked to do. Each command carries its time and its cause."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from ledger.base import Cause
from ledger.delivery import Rejection
from ledger.mapping import MappingSpec, SkuMapping
from ledger.reservation import Reservation
from ledger.stock import IncomingStock, StockItem
from ledger.supplier import Supplier, SupplierTerms
from ledger.uow import ReadAhead

# A command carrying this many records or more is bulk: the writer decides it in a batch
# of its own (see LedgerWriter._run).
BULK_FROM = 100


@dataclass(frozen=True, kw_only=True)
class Command:
    at: datetime
    cause: Cause

    def aggregate_ids(self) -> list[UUID]:
        """The aggregates the command will surely read, loaded with its batch in one go."""
        return []

    def shared_ids(self) -> list[UUID]:
        """The streams many writers change at once (a SKU being ordered): writers in other
        processes take turns on them rather than race."""
        return []

    def new_ids(self) -> list[UUID]:
        """Among `aggregate_ids`, the streams the command means to start (a new order's
        reservation): a writer that has seen no other process write lately may take them
        as absent without asking the store (see `ledger.hot`). One that exists after all
        makes the save fail (a collision if the batch starts it, else the save's check
        that none exists), and the batch is decided again on what the store holds."""
        return []

    @property
    def bulk(self) -> bool:
        """Whether the command carries many records (a part of a large delivery)."""
        return False

    def take_ahead(self) -> ReadAhead | None:
        """What its sender read ahead for it, on its first try only (see ReadAhead)."""
        return None


@dataclass(frozen=True, kw_only=True)
class PutSupplier(Command):
    supplier_id: str
    terms: SupplierTerms
    # The terms the request did not name: an existing supplier keeps its own (its feed,
    # its webhook secret, its time zone), whatever `terms` holds for them.
    kept: frozenset[str] = frozenset()

    def aggregate_ids(self) -> list[UUID]:
        return [Supplier.id_for(self.supplier_id)]


@dataclass(frozen=True, kw_only=True)
class PutMappings(Command):
    supplier_id: str
    mappings: list[MappingSpec]
    # SKUs of ours that other SKUs of the supplier map to, as the API found them in the
    # mappings view, each with one such supplier SKU: where a mapping moves away from such
    # a SKU (the ledger's own mapping confirming it), the level there is not the leaving
    # supplier SKU's alone, and does not move with it.
    kept: frozenset[tuple[str, str]] = frozenset()
    # Whether the view had every mapping made before the PUT when `kept` was read: where
    # it had not, `kept` may miss one, and no level moves. (True by default: commands
    # built in code, the demo's and the tests', name every other supplier SKU in `kept`.)
    view_complete: bool = True

    def aggregate_ids(self) -> list[UUID]:
        return [
            Supplier.id_for(self.supplier_id),
            *(SkuMapping.id_for(self.supplier_id, m.supplier_sku) for m in self.mappings),
            *(StockItem.id_for(m.sku) for m in self.mappings),
        ]


@dataclass(frozen=True, kw_only=True)
class PutSku(Command):
    sku: str
    safety_stock: int

    def aggregate_ids(self) -> list[UUID]:
        return [StockItem.id_for(self.sku)]


@dataclass(frozen=True, kw_only=True)
class Observation:
    """One absolute level a supplier reported, by its own SKU or by ours; `index` is its place."""

    index: int
    quantity: int
    observed_at: datetime
    supplier_sku: str | None = None
    sku: str | None = None
    unit: str | None = None
    # Stock the supplier expects, as (expected on: ISO date or None, quantity), in the
    # units of `quantity`; None: the report says nothing of it (its format cannot).
    incoming: IncomingStock | None = None
    # Base units in one unit of `quantity` by the supplier's unit table (1 in a base unit),
    # where the report named such a unit; the mapping's own `unit`, where the report names
    # it, comes first. None: the mapping's factor, or 1 for our own SKU, where the report
    # named no unit; a unit that neither the table nor the mapping knows is refused.
    factor: int | None = None

    def as_record(self) -> dict[str, Any]:
        """The observation as received, for the record of a refusal."""
        record = {
            "supplier_sku": self.supplier_sku,
            "sku": self.sku,
            "quantity": self.quantity,
            "unit": self.unit,
            "observed_at": self.observed_at.isoformat(),
            "incoming": None if self.incoming is None else [list(e) for e in self.incoming],
        }
        return {name: value for name, value in record.items() if value is not None}


# The source of a delivery that applies dead letters again (connectors.deadletters): its
# records were received before any report since, so a tie in time goes to the report.
RETRY_SOURCE = "dead-letter-retry"


@dataclass(frozen=True, kw_only=True)
class ReportStock(Command):
    supplier_id: str
    delivery_id: str
    content_hash: str
    source: str
    rows: int
    observations: list[Observation]
    rejected: list[Rejection] = field(default_factory=list)
    # The supplier's ceiling on a quantity in base units, where its feed rules set one
    # (the ledger's own bound applies besides).
    ceiling: int | None = None
    # Read by the sender while the writer applied the part before (connectors.parts).
    ahead: ReadAhead | None = field(default=None, compare=False, repr=False)

    @property
    def bulk(self) -> bool:
        return len(self.observations) >= BULK_FROM

    def take_ahead(self) -> ReadAhead | None:
        return None if self.ahead is None else self.ahead.take()


@dataclass(frozen=True, kw_only=True)
class Reserve(Command):
    client: str
    idempotency_key: str
    order_id: str
    lines: list[tuple[str, int]]
    ttl_seconds: int | None
    default_ttl_seconds: int

    @functools.cached_property
    def reservation_id(self) -> UUID:
        return Reservation.id_for(self.client, self.idempotency_key)

    def aggregate_ids(self) -> list[UUID]:
        return [self.reservation_id, *self.shared_ids()]

    def shared_ids(self) -> list[UUID]:
        return [StockItem.id_for(sku) for sku, _ in self.lines]

    def new_ids(self) -> list[UUID]:
        return [self.reservation_id]

    @functools.cached_property
    def fingerprint(self) -> str:
        """What makes two requests with one idempotency key the same request."""
        body = {"order_id": self.order_id, "lines": self.lines, "ttl_seconds": self.ttl_seconds}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def summed_lines(self) -> dict[str, int]:
        """Lines for the same SKU are one claim: summed, in order of first appearance."""
        summed: dict[str, int] = {}
        for sku, quantity in self.lines:
            summed[sku] = summed.get(sku, 0) + quantity
        return summed


# CLIENT_SCOPED: the commands on a reservation name the OMS client that sends them (the
# API key's name, as `Reserve.client` does), and a reservation another client placed is
# not found for it: a second OMS key could read, confirm, release, fulfil and return
# another's orders, whose ids follow from the client's name and its Idempotency-Key (a
# security review). An admin's name none, and act on any.
@dataclass(frozen=True, kw_only=True)
class Confirm(Command):
    reservation_id: UUID
    client: str | None = None  # the OMS client acting; None: an admin (see CLIENT_SCOPED)

    def aggregate_ids(self) -> list[UUID]:
        return [self.reservation_id]


@dataclass(frozen=True, kw_only=True)
class Extend(Command):
    reservation_id: UUID
    ttl_seconds: int  # the hold runs this long from the command's time, if that is longer
    client: str | None = None  # the OMS client acting; None: an admin (see CLIENT_SCOPED)

    def aggregate_ids(self) -> list[UUID]:
        return [self.reservation_id]


@dataclass(frozen=True, kw_only=True)
class Release(Command):
    reservation_id: UUID
    note: str | None = None
    client: str | None = None  # the OMS client acting; None: an admin (see CLIENT_SCOPED)

    def aggregate_ids(self) -> list[UUID]:
        return [self.reservation_id]


@dataclass(frozen=True, kw_only=True)
class Fulfil(Command):
    reservation_id: UUID
    lines: list[tuple[str, int, str | None]]
    request_key: str | None = None
    client: str | None = None  # the OMS client acting; None: an admin (see CLIENT_SCOPED)

    def aggregate_ids(self) -> list[UUID]:
        return [self.reservation_id]


@dataclass(frozen=True, kw_only=True)
class Cancel(Command):
    """Units of some lines cancelled before they ship (`Reservation.cancel`)."""

    reservation_id: UUID
    lines: list[tuple[str, int, str | None]]
    note: str | None = None
    request_key: str | None = None
    client: str | None = None  # the OMS client acting; None: an admin (see CLIENT_SCOPED)

    def aggregate_ids(self) -> list[UUID]:
        return [self.reservation_id]


@dataclass(frozen=True, kw_only=True)
class Return(Command):
    reservation_id: UUID
    lines: list[tuple[str, int, str | None]]  # sku, quantity, the supplier that shipped them
    restock: bool
    request_key: str | None = None
    client: str | None = None  # the OMS client acting; None: an admin (see CLIENT_SCOPED)

    def aggregate_ids(self) -> list[UUID]:
        return [self.reservation_id]


@dataclass(frozen=True, kw_only=True)
class ExpireHolds(Command):
    reservation_ids: list[UUID]

    def aggregate_ids(self) -> list[UUID]:
        return list(self.reservation_ids)


@dataclass(frozen=True, kw_only=True)
class NoteLastReports(Command):
    """When each supplier last reported, as the views see it; stale ones are recorded."""

    last_reports: dict[str, datetime]


@dataclass(frozen=True, kw_only=True)
class AcknowledgeConflict(Command):
    conflict_id: UUID
    note: str | None = None
