"""The stock items and suppliers a writer keeps between batches.

A flash sale orders one SKU in batch after batch; loading it again each time (its latest
snapshot and up to a hundred events since) costs more than deciding the batch. The writer
keeps what it loaded and saved, and the next batch that names it asks the store only for
the events written since (by other processes: optimistic concurrency on save guards the
rest, as for a fresh load). An aggregate is taken out while a batch uses it and comes
back only when that batch saved; a batch that failed leaves it out, to be loaded anew.

While no other process writes, even that round trip tells the writer nothing. Every save
numbers its events holding the event table's lock, so a save whose numbers follow the
writer's save before directly shows that no other process saved between the two (see
`saved`). A kept aggregate is known current as long as no such sign of another process
(a gap, a collision) has come since it was last read or saved; a batch that needs only
such aggregates, and streams it means to start, may decide without asking the store, and
its save then checks, in its own transaction, that no other process saved since the
writer's last save, and that none of the streams it took as new and did not start
exists (else it saves nothing, `NotAsKept`, and the batch is decided again on what the
store holds). What the batch read is then what the store held when it saved; a batch
with nothing to save has nothing to check, and is decided again.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from ledger.application import InventoryLedger
from ledger.base import LedgerAggregate
from ledger.stock import StockItem
from ledger.supplier import Supplier

log = logging.getLogger(__name__)

# Long-lived and shared by many commands; reservations and mappings are read once or twice.
KEPT_KINDS = (StockItem, Supplier)

# When a batch tries without asking the store. Neither is needed for correctness (the
# save checks, and a batch with nothing to save is decided again), both for speed: a
# try whose save finds the store not as kept is decided again. Within this long of the
# writer's last save (about one batch under load, when the next starts as soon as a
# save is answered)...
QUIET_SECONDS = 0.02
# ... by a writer that has seen no sign of another process saving for this long: where
# another process saves too, its saves fall between this one's often (two API workers
# across 10,000 SKUs, measured: more collisions, fewer orders).
LONE_SECONDS = 1.0


class NotAsKept(IntegrityError):
    """The store is not as a batch decided on what was kept took it to be: another
    process saved since the writer's last save, or a stream taken as new exists. The
    save wrote nothing, and the batch is decided again on what the store holds."""


class HotAggregates:
    """Up to `capacity` stock items and suppliers, least recently used dropped first."""

    def __init__(
        self,
        app: InventoryLedger,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.capacity = capacity
        self.clock = clock
        self._kept: OrderedDict[UUID, LedgerAggregate] = OrderedDict()
        # Those taken out by the batch under way, over all its tries (see `keep`).
        self._taken: set[UUID] = set()
        # Signs of another process saving so far (gaps, collisions): a kept aggregate is
        # known current while `_current` has it at this count (see `keep`); those the
        # batch under way took out, at the count when they were last read or saved.
        self._epoch = 0
        self._current: dict[UUID, int] = {}
        self._read_at: dict[UUID, int] = {}
        # The last notification this writer saved, when it last saw a sign of another
        # process, and until when a batch may try without asking the store.
        self.last_saved: int | None = None
        self._others_seen = clock()
        self._quiet_until = -math.inf
        # Whether saves' numbers can tell (asked of the store at the first save; a store
        # that cannot say, in memory, has no other process to tell of).
        self._numbers_tell: bool | None = None
        # Loads answered from what is kept, without asking the store, and the streams
        # they took as absent since `guessed` was last emptied.
        self.unasked = 0
        self.guessed: set[UUID] = set()

    def __contains__(self, aggregate_id: object) -> bool:
        return aggregate_id in self._kept

    def load_many(
        self, aggregate_ids: Iterable[UUID], new: Iterable[UUID] = ()
    ) -> dict[UUID, LedgerAggregate]:
        """The aggregates that exist, in one round trip: kept ones brought up to date.

        None without asking the store, if the writer may try so (`saved`) and every one
        is kept and known current, or in `new` (streams the batch means to start, taken
        as absent): its save must then check that no other process saved meanwhile
        (`last_saved`, `NotAsKept`)."""
        wanted = list(dict.fromkeys(aggregate_ids))
        known = {i: self._kept.pop(i) for i in wanted if i in self._kept}
        stamps = {i: self._current.pop(i) for i in known}
        self._taken.update(known)
        if self.clock() < self._quiet_until:
            fresh = set(new)
            if all(stamps.get(i) == self._epoch if i in known else i in fresh for i in wanted):
                self.unasked += 1
                self._read_at.update(stamps)
                self.guessed.update(i for i in wanted if i not in known)
                return known
        epoch = self._epoch
        found = self.app.get_many(wanted, known)
        self._read_at.update(dict.fromkeys(found, epoch))
        return found

    def saved(self, first: int, last: int, began: float) -> None:
        """The writer saved notifications `first` to `last` in a save it began at `began`
        (`clock`). A gap since its save before (or a first save) is a sign of another
        process; once it has seen none for LONE_SECONDS, the writer may try without
        asking the store until QUIET_SECONDS after this save began."""
        now = self.clock()
        if self._numbers_tell is None:
            recorder = getattr(self.app, "recorder", None)
            follow = getattr(recorder, "numbers_follow_saves", None)
            self._numbers_tell = follow is None or bool(follow())
            if not self._numbers_tell:
                log.warning("writer.kept_tries_off: the event numbers' sequence caches numbers")
        if self.last_saved is None or first != self.last_saved + 1:
            self._other_process(now)
        self.last_saved = last
        lone = self._numbers_tell and now - self._others_seen >= LONE_SECONDS
        self._quiet_until = began + QUIET_SECONDS if lone else -math.inf

    def doubt(self, *, collided: bool = False) -> None:
        """The next batches ask the store, until a save shows quiet again; `collided`:
        another process saved (a stream this writer was saving, or since its last save)."""
        self._quiet_until = -math.inf
        if collided:
            self._other_process(self.clock())

    def _other_process(self, now: float) -> None:
        self._others_seen = now
        self._epoch += 1  # what was read before may have moved since

    def load(self, aggregate_id: UUID) -> LedgerAggregate:
        """One aggregate, as `load_many` gives it; raises if the store has no such stream."""
        if aggregate_id not in self._kept:
            epoch = self._epoch
            aggregate: LedgerAggregate = self.app.repository.get(aggregate_id)
            self._read_at[aggregate_id] = epoch
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
        self._read_at = {}

    def keep(
        self,
        aggregates: Iterable[LedgerAggregate],
        *,
        new: bool = True,
        saved: Iterable[UUID] = (),
    ) -> None:
        """Keeps aggregates a batch has just saved (`saved`: their ids) or read, at the
        version they reached: one saved is known current now (its save found no other
        version), one read as of when it was read.

        `new=False` (a part of a large delivery) keeps again only those the batch took
        out of here (in any of its tries: one that failed leaves what it took out, to be
        loaded anew), and suppliers: the thousands of stock items a part changes, most
        not to be seen again soon, would push out the busy SKUs every reservation reads."""
        taken, self._taken = self._taken, set()
        read_at, self._read_at = self._read_at, {}
        if self.capacity <= 0:
            return
        written = set(saved)
        for aggregate in aggregates:
            if (
                isinstance(aggregate, KEPT_KINDS)
                and not aggregate.pending_events
                and (new or aggregate.id in taken or isinstance(aggregate, Supplier))
            ):
                self._kept[aggregate.id] = aggregate
                self._kept.move_to_end(aggregate.id)
                # Never read nor saved here (made by the batch and not saved): unknown.
                known = self._epoch if aggregate.id in written else read_at.get(aggregate.id)
                self._current[aggregate.id] = -1 if known is None else known
        while len(self._kept) > self.capacity:
            dropped, _ = self._kept.popitem(last=False)
            self._current.pop(dropped, None)
