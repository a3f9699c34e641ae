"""The stock items and suppliers a writer keeps between batches.

A flash sale orders one SKU in batch after batch; loading it again each time (its latest
snapshot and up to a hundred events since) costs more than deciding the batch. The writer
keeps what it loaded and saved, and the next batch that names it asks the store only for
the events written since (by other processes: optimistic concurrency on save guards the
rest, as for a fresh load). An aggregate is taken out while a batch uses it and comes
back only when that batch saved; a batch that failed leaves it out, to be loaded anew.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from ledger.application import InventoryLedger
from ledger.base import LedgerAggregate
from ledger.stock import StockItem
from ledger.supplier import Supplier

# Long-lived and shared by many commands; reservations and mappings are read once or twice.
KEPT_KINDS = (StockItem, Supplier)


class HotAggregates:
    """Up to `capacity` stock items and suppliers, least recently used dropped first."""

    def __init__(self, app: InventoryLedger, capacity: int) -> None:
        self.app = app
        self.capacity = capacity
        self._kept: OrderedDict[UUID, LedgerAggregate] = OrderedDict()
        # Those taken out by the batch under way, over all its tries (see `keep`).
        self._taken: set[UUID] = set()

    def __contains__(self, aggregate_id: object) -> bool:
        return aggregate_id in self._kept

    def load_many(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, LedgerAggregate]:
        """The aggregates that exist, in one round trip: kept ones brought up to date."""
        wanted = list(dict.fromkeys(aggregate_ids))
        known = {i: self._kept.pop(i) for i in wanted if i in self._kept}
        self._taken.update(known)
        return self.app.get_many(wanted, known)

    def load(self, aggregate_id: UUID) -> LedgerAggregate:
        """One aggregate, as `load_many` gives it; raises if the store has no such stream."""
        if aggregate_id not in self._kept:
            aggregate: LedgerAggregate = self.app.repository.get(aggregate_id)
            return aggregate
        found = self.load_many([aggregate_id])
        if aggregate_id not in found:
            raise AggregateNotFoundError(aggregate_id)
        return found[aggregate_id]

    def related(self, aggregate_ids: Iterable[UUID]) -> list[UUID]:
        """The suppliers that kept stock items among these name: a batch ordering a SKU
        will read their terms, so they are loaded with it."""
        suppliers: dict[UUID, None] = {}
        for aggregate_id in aggregate_ids:
            item = self._kept.get(aggregate_id)
            if isinstance(item, StockItem):
                suppliers.update(dict.fromkeys(Supplier.id_for(s) for s in item.supplier_ids))
        return list(suppliers)

    def begin_batch(self) -> None:
        """A new batch: none of what earlier ones took out is its own."""
        self._taken = set()

    def keep(self, aggregates: Iterable[LedgerAggregate], *, new: bool = True) -> None:
        """Keeps aggregates a batch has just saved (or read), at the version they reached.

        `new=False` (a part of a large delivery) keeps again only those the batch took
        out of here (in any of its tries: one that failed leaves what it took out, to be
        loaded anew), and suppliers: the thousands of stock items a part changes, most
        not to be seen again soon, would push out the busy SKUs every reservation reads."""
        taken, self._taken = self._taken, set()
        if self.capacity <= 0:
            return
        for aggregate in aggregates:
            if (
                isinstance(aggregate, KEPT_KINDS)
                and not aggregate.pending_events
                and (new or aggregate.id in taken or isinstance(aggregate, Supplier))
            ):
                self._kept[aggregate.id] = aggregate
                self._kept.move_to_end(aggregate.id)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)
