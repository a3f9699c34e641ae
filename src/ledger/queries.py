"""Reads straight from the aggregates, for the API until projections serve them."""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from ledger.application import InventoryLedger
from ledger.base import LedgerAggregate
from ledger.errors import ReservationNotFound, UnknownSku
from ledger.reservation import Reservation
from ledger.stock import StockItem, StockLevels
from ledger.supplier import Supplier, SupplierTerms

A = TypeVar("A", bound=LedgerAggregate)


class LedgerQueries:
    def __init__(self, app: InventoryLedger) -> None:
        self.app = app

    def _get(self, kind: type[A], aggregate_id: UUID) -> A | None:
        try:
            aggregate: LedgerAggregate = self.app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        return aggregate if isinstance(aggregate, kind) else None

    def supplier(self, supplier_id: str) -> Supplier | None:
        return self._get(Supplier, Supplier.id_for(supplier_id))

    def stock_levels(self, sku: str, at: datetime) -> StockLevels:
        item = self._get(StockItem, StockItem.id_for(sku))
        if item is None:
            raise UnknownSku(f"unknown SKU {sku!r}", skus=[sku])
        terms: dict[str, SupplierTerms] = {}
        for supplier_id in item.supplier_ids:
            supplier = self.supplier(supplier_id)
            if supplier is not None:
                terms[supplier_id] = supplier.terms
        return item.levels(at, terms)

    def reservation(self, reservation_id: UUID) -> Reservation:
        reservation = self._get(Reservation, reservation_id)
        if reservation is None:
            raise ReservationNotFound(f"no reservation {reservation_id}")
        return reservation
