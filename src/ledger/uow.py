"""The aggregates one command reads and changes, loaded once each."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from ledger.base import LedgerAggregate
from ledger.errors import UnknownSupplier
from ledger.supplier import Supplier, SupplierTerms

A = TypeVar("A", bound=LedgerAggregate)


class UnitOfWork:
    """Loads aggregates for a handler and hands the changed ones to the writer."""

    def __init__(
        self,
        load: Callable[[UUID], LedgerAggregate],
        load_many: Callable[[Iterable[UUID]], Mapping[UUID, LedgerAggregate]] | None = None,
    ) -> None:
        self._load = load
        self._load_many = load_many
        self._aggregates: dict[UUID, LedgerAggregate | None] = {}

    def preload(self, aggregate_ids: Iterable[UUID]) -> None:
        """Loads many aggregates in one go, ahead of the `get`s that will want them."""
        missing = [i for i in dict.fromkeys(aggregate_ids) if i not in self._aggregates]
        if self._load_many is None or len(missing) < 2:
            return
        found = self._load_many(missing)
        for aggregate_id in missing:
            self._aggregates[aggregate_id] = found.get(aggregate_id)

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

    def loaded_ids(self) -> list[UUID]:
        """The existing aggregates this unit of work read."""
        return [i for i, a in self._aggregates.items() if a is not None]

    def pending_counts(self) -> dict[UUID, int]:
        """How many new events each changed aggregate holds: a command's footprint."""
        return {
            i: len(a.pending_events)
            for i, a in self._aggregates.items()
            if a is not None and a.pending_events
        }

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
