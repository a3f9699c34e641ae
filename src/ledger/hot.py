"""The stock items and suppliers a writer keeps between batches.

A flash sale orders one SKU in batch after batch; loading it again each time (its latest
snapshot and up to a hundred events since) costs more than deciding the batch. The writer
keeps what it loaded and saved, and the next batch that names it asks the store only for
the events written since (by other processes: optimistic concurrency on save guards the
rest, as for a fresh load). An aggregate is taken out while a batch uses it and comes
back only when that batch saved; a batch that failed leaves it out, to be loaded anew.

While no other process writes, even that round trip tells the writer nothing: a batch
right after a save that shows no other process saved since the one before may decide
on what is kept without asking the store (see `saved` and `load_many`).
"""

from __future__ import annotations

import math
import time
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

# How long after a save that shows no other process saved since the writer's save before
# it (`saved`) a batch may decide on what is kept without asking the store: about one
# batch under load, when the next batch starts as soon as a save is answered. Guarded
# all the same: a stream another process wrote meanwhile makes the writer's save collide,
# and the commands that read it are decided again on fresh state; a command refused on
# what was kept is decided again on what the store holds before it is answered (the
# writer's `_attempt`). What such a batch reads and does not write (a supplier's terms)
# is as of up to this long before it started, where a batch that asks has it as of its
# start.
QUIET_SECONDS = 0.02
# ... and only for a writer that has seen no sign of another process saving (a gap in the
# numbers, a collision) for this long: where another process is saving too, its saves
# fall between this one's often, and a batch that decided on what was kept would often
# collide (two API workers across 10,000 SKUs, measured: more collisions, fewer orders).
LONE_SECONDS = 1.0


class HotAggregates:
    """Up to `capacity` stock items and suppliers, least recently used dropped first."""

    def __init__(self, app: InventoryLedger, capacity: int) -> None:
        self.app = app
        self.capacity = capacity
        self._kept: OrderedDict[UUID, LedgerAggregate] = OrderedDict()
        # Those taken out by the batch under way, over all its tries (see `keep`).
        self._taken: set[UUID] = set()
        # The last notification this writer saved, when it last saw another process save
        # (time.monotonic), and until when what is kept may be taken as current.
        self._last_saved: int | None = None
        self._others_seen = time.monotonic()  # until a save shows otherwise
        self._quiet_until = -math.inf
        # Loads answered from what is kept, without asking the store, and those asked.
        self.unasked = 0
        self.asked = 0

    def __contains__(self, aggregate_id: object) -> bool:
        return aggregate_id in self._kept

    def load_many(
        self, aggregate_ids: Iterable[UUID], new: Iterable[UUID] = ()
    ) -> dict[UUID, LedgerAggregate]:
        """The aggregates that exist, in one round trip: kept ones brought up to date.

        Without the round trip while quiet (see `saved`) if every one is kept or in `new`
        (streams the batch means to start, taken as absent)."""
        wanted = list(dict.fromkeys(aggregate_ids))
        known = {i: self._kept.pop(i) for i in wanted if i in self._kept}
        self._taken.update(known)
        if time.monotonic() < self._quiet_until:
            fresh = set(new)
            if all(i in known or i in fresh for i in wanted):
                self.unasked += 1
                return known
        self.asked += 1
        return self.app.get_many(wanted, known)

    def saved(self, first: int, last: int) -> None:
        """The writer saved notifications `first` to `last`. Every save numbers its events
        holding the event table's lock, so if they follow the writer's save before
        directly, no other process saved between the two; if none has for LONE_SECONDS,
        what is kept is taken as current for QUIET_SECONDS. (A gap left by a save that
        failed counts as another process's.)"""
        now = time.monotonic()
        if self._last_saved is None or first != self._last_saved + 1:
            self._others_seen = now
        self._last_saved = last
        lone = now - self._others_seen >= LONE_SECONDS
        self._quiet_until = now + QUIET_SECONDS if lone else -math.inf

    def doubt(self, *, collided: bool = False) -> None:
        """Asks the store again from the next load on, until a save shows quiet again: a
        command was refused on what was kept, or (`collided`) another process saved a
        stream this writer was saving."""
        self._quiet_until = -math.inf
        if collided:
            self._others_seen = time.monotonic()

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
