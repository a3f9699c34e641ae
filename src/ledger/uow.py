"""The aggregates one command reads and changes, loaded once each."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from ledger.base import LedgerAggregate
from ledger.errors import UnknownSupplier
from ledger.supplier import Supplier, SupplierTerms

A = TypeVar("A", bound=LedgerAggregate)


class UnitOfWork:
    """Loads aggregates for a handler and hands the changed ones to the writer."""

    def __init__(self, load: Callable[[UUID], LedgerAggregate]) -> None:
        self._load = load
        self._aggregates: dict[UUID, LedgerAggregate | None] = {}

    def get(self, kind: type[A], aggregate_id: UUID) -> A | None:
        if aggregate_id not in self._aggregates:
            try:
                self._aggregates[aggregate_id] = self._load(aggregate_id)
            except AggregateNotFoundError:
                self._aggregates[aggregate_id] = None
        aggregate = self._aggregates[aggregate_id]
        if aggregate is not None and not isinstance(aggregate, kind):
            return None
        return aggregate

    def add(self, aggregate: LedgerAggregate) -> None:
        self._aggregates[aggregate.id] = aggregate

    def changed(self) -> list[LedgerAggregate]:
        return [a for a in self._aggregates.values() if a is not None and a.pending_events]

    def supplier_terms(self, supplier_ids: Iterable[str]) -> dict[str, SupplierTerms]:
        terms: dict[str, SupplierTerms] = {}
        for supplier_id in supplier_ids:
            supplier = self.get(Supplier, Supplier.id_for(supplier_id))
            if supplier is None:
                raise UnknownSupplier(f"unknown supplier {supplier_id!r}", supplier_id=supplier_id)
            terms[supplier_id] = supplier.terms
        return terms
