"""The aggregates one command reads and changes, loaded once each."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from ledger.base import LedgerAggregate
from ledger.errors import UnknownSupplier
from ledger.stock import LevelRow, LevelState, LevelTouch, StockItem
from ledger.supplier import Supplier, SupplierTerms

A = TypeVar("A", bound=LedgerAggregate)

# (supplier id, SKUs) -> when each SKU's level was last reported, recorded or not.
SeenLoader = Callable[[str, list[str]], Mapping[str, datetime]]
# (aggregate ids, those among them meant to be new) -> the aggregates that exist.
ManyLoader = Callable[[Iterable[UUID], Iterable[UUID]], Mapping[UUID, LedgerAggregate]]


@dataclass
class ReadAhead:
    """What a command's batch will load, read before the writer takes the command up: a
    part of a large delivery is read while the writer applies the part before it (see
    connectors.parts). The aggregates found, by id, and when each level was last reported
    by (supplier id, SKU).

    The writer decides on it on the command's first try only (`take`), less what it keeps
    itself (its copies are current). A save whose basis moved since it was read fails as
    any save on a stale read does (a stream's version, a level's report, see
    api.recorder), and the command is decided again on what the store holds."""

    aggregates: dict[UUID, LedgerAggregate]
    seen: dict[tuple[str, str], datetime | None]
    taken: bool = field(default=False, repr=False)

    def take(self) -> ReadAhead | None:
        """This read, the first time only (on the writer's thread)."""
        if self.taken:
            return None
        self.taken = True
        return self


class UnitOfWork:
    """Loads aggregates for a handler and hands the changed ones to the writer."""

    def __init__(
        self,
        load: Callable[[UUID], LedgerAggregate],
        load_many: ManyLoader | None = None,
        load_seen: SeenLoader | None = None,
        ahead: ReadAhead | None = None,
    ) -> None:
        self._load = load
        self._load_many = load_many
        self._load_seen = load_seen
        self._aggregates: dict[UUID, LedgerAggregate | None] = {}
        # Read ahead for the command (see ReadAhead), taken as the command asks for them.
        self._ahead: dict[UUID, LedgerAggregate] = dict(ahead.aggregates) if ahead else {}
        # The levels each stock item had when loaded, to save only the rows that change.
        self._levels_loaded: dict[UUID, LevelState] = {}
        self._seen: dict[tuple[str, str], datetime | None] = dict(ahead.seen) if ahead else {}
        self._touched: dict[tuple[str, str], datetime] = {}
        # Since `begin`: how many new events each aggregate handed out held, and the
        # reports noted, to tell whether a failed command changed anything.
        self._marks: dict[UUID, int] = {}
        self._touch_count = 0
        self._touch_count_at_begin = 0

    def preload(self, aggregate_ids: Iterable[UUID], new: Iterable[UUID] = ()) -> None:
        """Loads many aggregates in one go, ahead of the `get`s that will want them; `new`:
        those among them the commands mean to start (see `Command.new_ids`)."""
        missing = [i for i in dict.fromkeys(aggregate_ids) if i not in self._aggregates]
        if self._ahead:
            for aggregate_id in missing:
                if aggregate_id in self._ahead:
                    self._keep(aggregate_id, self._ahead.pop(aggregate_id))
            missing = [i for i in missing if i not in self._aggregates]
        if self._load_many is None or len(missing) < 2:
            return
        found = self._load_many(missing, new)
        for aggregate_id in missing:
            self._keep(aggregate_id, found.get(aggregate_id))

    def get(self, kind: type[A], aggregate_id: UUID) -> A | None:
        if aggregate_id not in self._aggregates:
            if aggregate_id in self._ahead:
                self._keep(aggregate_id, self._ahead.pop(aggregate_id))
            else:
                try:
                    self._keep(aggregate_id, self._load(aggregate_id))
                except AggregateNotFoundError:
                    self._aggregates[aggregate_id] = None
        aggregate = self._aggregates[aggregate_id]
        # Read, even when absent: a command that found no such stream read it too.
        self._marks.setdefault(
            aggregate_id, 0 if aggregate is None else len(aggregate.pending_events)
        )
        if aggregate is None or not isinstance(aggregate, kind):
            return None
        return aggregate

    def _keep(self, aggregate_id: UUID, aggregate: LedgerAggregate | None) -> None:
        self._aggregates[aggregate_id] = aggregate
        if isinstance(aggregate, StockItem):
            self._levels_loaded[aggregate_id] = aggregate.level_state()

    def add(self, aggregate: LedgerAggregate) -> None:
        self._marks.setdefault(aggregate.id, 0)
        self._aggregates[aggregate.id] = aggregate

    # Reports seen but not recorded --------------------------------------------

    def preload_seen(self, supplier_id: str, skus: Iterable[str]) -> None:
        """Reads when each level was last reported, in one go, ahead of `seen_at`."""
        missing = [s for s in dict.fromkeys(skus) if (supplier_id, s) not in self._seen]
        if not missing:
            return
        found = self._load_seen(supplier_id, missing) if self._load_seen is not None else {}
        for sku in missing:
            self._seen[(supplier_id, sku)] = found.get(sku)

    def seen_at(self, supplier_id: str, sku: str) -> datetime | None:
        """The newest report of the level the ledger has seen, recorded or not."""
        key = (supplier_id, sku)
        if key not in self._seen:
            self.preload_seen(supplier_id, [sku])
        return self._seen[key]

    def touch(self, supplier_id: str, sku: str, seen_at: datetime) -> None:
        """Notes a report that repeated the level on record (it leaves no event)."""
        key = (supplier_id, sku)
        self._touch_count += 1
        latest = max(seen_at, self._touched.get(key, seen_at))
        self._touched[key] = latest
        self._seen[key] = max(latest, self._seen.get(key) or latest)

    def touches(self) -> list[LevelTouch]:
        """The reports noted by `touch`, each with the level it repeated as it is now."""
        touches = []
        for (supplier_id, sku), seen_at in sorted(self._touched.items()):
            item = self.get(StockItem, StockItem.id_for(sku))
            row = (
                next((r for r in item.level_rows() if r.supplier_id == supplier_id), None)
                if item is not None
                else None
            )
            if row is None:
                continue
            touches.append(
                LevelTouch(
                    supplier_id,
                    sku,
                    seen_at,
                    row.quantity,
                    row.observed_at,
                    row.unreported_from,
                    row.incoming,
                )
            )
        return touches

    def changed_levels(self) -> list[LevelRow]:
        """The level rows of the changed stock items that differ from when they were loaded."""
        rows: list[LevelRow] = []
        for aggregate in self.changed():
            if isinstance(aggregate, StockItem):
                loaded = self._levels_loaded.get(aggregate.id, ())
                state = aggregate.level_state()
                if state == loaded:  # most commands (orders, holds) change no level
                    continue
                rows.extend(LevelRow.of(aggregate.sku, s) for s in state if s not in loaded)
        return sorted(rows, key=lambda r: (r.supplier_id, r.sku))

    def loaded_ids(self) -> list[UUID]:
        """The existing aggregates this unit of work read."""
        return [i for i, a in self._aggregates.items() if a is not None]

    def begin(self) -> None:
        """Starts watching for changes, ahead of one command."""
        self._marks = {}
        self._touch_count_at_begin = self._touch_count

    def read_since_begin(self) -> set[UUID]:
        """The aggregates the command since `begin` read or added."""
        return set(self._marks)

    def changed_ids_since_begin(self) -> set[UUID]:
        """The aggregates the command since `begin` gave new events."""
        changed = set()
        for aggregate_id, mark in self._marks.items():
            aggregate = self._aggregates.get(aggregate_id)
            if aggregate is not None and len(aggregate.pending_events) != mark:
                changed.add(aggregate_id)
        return changed

    def added_since_begin(self) -> list[object]:
        """The events the command since `begin` gave its aggregates."""
        added: list[object] = []
        for aggregate_id, mark in self._marks.items():
            aggregate = self._aggregates.get(aggregate_id)
            if aggregate is not None:
                added += aggregate.pending_events[mark:]
        return added

    def changed_since_begin(self) -> bool:
        """Whether the command since `begin` changed an aggregate or noted a report."""
        return self._touch_count != self._touch_count_at_begin or bool(
            self.changed_ids_since_begin()
        )

    def loaded(self) -> list[LedgerAggregate]:
        """Every aggregate the unit holds, read or added."""
        return [a for a in self._aggregates.values() if a is not None]

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
