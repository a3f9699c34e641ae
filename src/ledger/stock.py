"""StockItem: one internal SKU, what each supplier last reported, and what is promised against it.

Quantities are integers in the SKU's base unit. The state stays compact whatever the
number of open orders: holds are summed per supplier in one-second expiry buckets and
commitments per supplier in a counter; the detail of each order lives in its Reservation.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal, Protocol
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import AggregateCreated

from ledger.base import Cause, LedgerAggregate
from ledger.supplier import SupplierTerms

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_SECOND = timedelta(seconds=1)

# Stock a supplier expects: (expected on, an ISO date or None, quantity in base units).
IncomingStock = tuple[tuple[str | None, int], ...]


def incoming_of(pairs: Iterable[Sequence[Any]]) -> IncomingStock:
    """Incoming stock from [expected on, quantity] pairs as JSON holds them (events,
    snapshots, rows)."""
    return tuple((on, quantity) for on, quantity in pairs)


def second_floor(moment: datetime) -> int:
    """The whole Unix second at or before `moment`."""
    return (moment - EPOCH) // ONE_SECOND


def second_ceil(moment: datetime) -> int:
    """The whole Unix second at or after `moment`."""
    whole, rest = divmod(moment - EPOCH, ONE_SECOND)
    return whole + (1 if rest else 0)


def reduction_key(moment: datetime) -> int:
    """The bucket of a reduction made at `moment`: the first whole second after it.

    Only a report observed strictly after the reduction may retire it; within one
    second the ledger cannot tell, so it keeps counting the reduction (never oversell).
    """
    return second_floor(moment) + 1


@dataclass(frozen=True)
class Allocation:
    """How much of one order line a supplier ships."""

    supplier_id: str
    quantity: int

    def as_dict(self) -> dict[str, Any]:
        return {"supplier_id": self.supplier_id, "quantity": self.quantity}

    @classmethod
    def many_from(cls, data: Iterable[Mapping[str, Any]]) -> list[Allocation]:
        return [cls(item["supplier_id"], item["quantity"]) for item in data]


def _as_dicts(allocations: Iterable[Allocation]) -> list[dict[str, Any]]:
    return [allocation.as_dict() for allocation in allocations]


@dataclass
class Position:
    """One supplier's last report for the SKU and what is promised against that supplier.

    `held` maps the Unix second a hold expires at to the quantity held; a hold stops
    counting at that second. `unreported` maps a Unix second to stock changes we know
    of (our shipments, restocks, commitments to suppliers that report net of our
    orders) that the supplier's last report does not reflect yet: a report observed at
    or after that second retires them. `incoming` is the stock the supplier's last report
    said it expects, as (expected on, as an ISO date or None when it did not say, quantity
    in base units), in the report's order: news for buyers, never sellable.

    `committed` is what is promised against a supplier that reports gross; against one
    that reports net of our orders a commitment lowers the level until a report newer
    than it (`unreported`), and is counted in `net_committed` until it is shipped or
    released: should the supplier report gross, its reports hold those orders, and they
    count as committed (see `supplier_level`). `reported_net`: whether the last report
    recorded was made net of our orders (the supplier's terms then). `remapped_at`: when a
    remap last set the level (our clock), that is when the supplier SKU feeding it may have
    changed (see `StockItem.restock`).
    """

    quantity: int = 0
    observed_at: datetime | None = None
    source: str = ""
    held: dict[int, int] = field(default_factory=dict)
    committed: int = 0
    unreported: dict[int, int] = field(default_factory=dict)
    incoming: IncomingStock = ()
    net_committed: int = 0
    reported_net: bool = True
    remapped_at: datetime | None = None

    def live_held(self, now: int) -> int:
        return sum(quantity for expires, quantity in self.held.items() if expires > now)

    def effective_level(self) -> int:
        return max(0, self.quantity + sum(self.unreported.values()))

    def forget_expired_holds(self, now: int) -> None:
        # Called for every event: most find nothing to forget, and say so in one C call.
        held = self.held
        if min(held, default=now + 1) <= now:
            for expires in [expires for expires in held if expires <= now]:
                del held[expires]

    def add_held(self, expires: int, delta: int) -> None:
        _add(self.held, expires, delta, floor=0)

    def add_unreported(self, moment: datetime, delta: int) -> None:
        # An ambiguous same-second case errs on the side of never overselling: a
        # reduction is kept until a report clearly after it, an increase is retired by a
        # report in the same second.
        key = reduction_key(moment) if delta < 0 else second_floor(moment)
        _add(self.unreported, key, delta)

    def cancel_unreported(self, key: int, delta: int) -> None:
        """Undoes part of an earlier change, if no report has retired it yet: one that did
        leaves its key free for a later change of the same second (a restock), which this
        must not undo (a review: a release then added back units a report had counted)."""
        retired = self.observed_at is not None and key <= second_floor(self.observed_at)
        if key in self.unreported and not retired:
            _add(self.unreported, key, delta)

    def retire_reported(self, observed_at: datetime) -> None:
        reported = second_floor(observed_at)
        for key in [key for key in self.unreported if key <= reported]:
            del self.unreported[key]

    def has_reported_changes(self, observed_at: datetime) -> bool:
        reported = second_floor(observed_at)
        return any(key <= reported for key in self.unreported)


def _add(buckets: dict[int, int], key: int, delta: int, floor: int | None = None) -> None:
    value = buckets.get(key, 0) + delta
    if floor is not None:
        value = max(floor, value)
    if value:
        buckets[key] = value
    else:
        buckets.pop(key, None)


# A supplier's level as a plain tuple (supplier id, quantity, observed at, unreported
# from, incoming), and a stock item's, one per supplier: see StockItem.level_state.
Level = tuple[str, int, datetime | None, int | None, IncomingStock]
LevelState = tuple[Level, ...]


def incoming_json(incoming: IncomingStock) -> str | None:
    """Incoming stock as the ledger keeps it beside the level (`inventoryledger_levels`,
    jsonb): a list of [expected on, quantity]; None when none is expected."""
    return json.dumps([list(entry) for entry in incoming]) if incoming else None


@dataclass(frozen=True)
class LevelRow:
    """A supplier's last report of a SKU; `unreported_from` is the first second a newer
    report would retire changes it does not reflect yet (None: there are none)."""

    supplier_id: str
    sku: str
    quantity: int
    observed_at: datetime | None
    unreported_from: int | None
    incoming: IncomingStock = ()

    @classmethod
    def of(cls, sku: str, level: Level) -> LevelRow:
        supplier_id, quantity, observed_at, unreported_from, incoming = level
        return cls(supplier_id, sku, quantity, observed_at, unreported_from, incoming)


@dataclass(frozen=True)
class LevelTouch:
    """A report that repeated the level on record, so it left no event: the ledger notes
    when it was seen, for as long as the level is still `quantity` observed at
    `observed_at` with unreported changes from `unreported_from` (else the report is
    decided again), so that an older report arriving later is known to be late."""

    supplier_id: str
    sku: str
    seen_at: datetime
    quantity: int
    observed_at: datetime | None
    unreported_from: int | None
    incoming: IncomingStock = ()


class ObservationOutcome(StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    LATE = "late"


@dataclass(frozen=True)
class SupplierLevel:
    """One supplier's contribution to a SKU at a moment."""

    supplier_id: str
    quantity: int
    observed_at: datetime | None
    age_seconds: int | None
    stale: bool
    excluded: bool
    sellable: int
    held: int
    committed: int
    lead_time_days: int
    incoming: IncomingStock = ()
    priority: int = 100

    @property
    def capacity(self) -> int:
        """What may still be promised against this supplier."""
        return max(0, self.sellable - self.held - self.committed)

    @property
    def preference(self) -> tuple[int, int, float, str]:
        """Allocation's order (lower first): priority, lead time, then the freshest report."""
        freshness = -self.observed_at.timestamp() if self.observed_at else 0.0
        return (self.priority, self.lead_time_days, freshness, self.supplier_id)


@dataclass(frozen=True)
class StockLevels:
    """A SKU's numbers at a moment: `available = sellable - held - committed`, never below 0."""

    sku: str
    on_hand: int
    sellable: int
    held: int
    committed: int
    available: int
    safety_stock: int
    suppliers: list[SupplierLevel]

    @property
    def stale(self) -> bool:
        return any(level.stale for level in self.suppliers)

    @property
    def eta_days(self) -> int | None:
        """The lead time of the supplier an order would be allocated to first (as
        `StockItem.allocate` prefers among those that can still take one); None when
        nothing is available (safety stock counted). It used to be the shortest lead
        time of any supplier with capacity, whichever allocation would use, and to be
        given for a SKU that safety stock had put out of stock."""
        if self.available <= 0:
            return None
        open_to_orders = [level for level in self.suppliers if level.capacity > 0]
        if not open_to_orders:
            return None
        return min(open_to_orders, key=lambda level: level.preference).lead_time_days

    def status(self, limited_at: int) -> str:
        if self.available <= 0:
            return "out_of_stock"
        if self.stale:
            return "updating"
        if self.available <= limited_at:
            return "limited"
        return "in_stock"


def _terms_for(terms: Mapping[str, SupplierTerms], supplier_id: str) -> SupplierTerms:
    return terms.get(supplier_id) or SupplierTerms(name=supplier_id)


# The source of a level a remap retired: the supplier no longer reports the SKU at all.
REMAP_SOURCE = "remap"
# A report is taken as made net of our orders only this long after the supplier came to
# report net (`Supplier.net_since`): its clock may run ahead of ours by as much as a report
# may be ahead (see ledger.handlers.reports), and a gross report taken for net leaves the
# open orders it holds counted nowhere (a review). Meanwhile they count twice: low, not high.
NET_SWITCH_MARGIN = timedelta(minutes=5)


class PositionLike(Protocol):
    """What the level rules need of a supplier position: the aggregate's, or a view row."""

    @property
    def quantity(self) -> int: ...

    @property
    def source(self) -> str: ...

    @property
    def observed_at(self) -> datetime | None: ...

    @property
    def committed(self) -> int: ...

    @property
    def net_committed(self) -> int: ...

    @property
    def reported_net(self) -> bool: ...

    @property
    def incoming(self) -> IncomingStock: ...

    def effective_level(self) -> int: ...

    def live_held(self, now: int) -> int: ...


def supplier_level(
    supplier_id: str, position: PositionLike, at: datetime, terms: SupplierTerms
) -> SupplierLevel:
    """One supplier's contribution to a SKU at `at`."""
    age = None if position.observed_at is None else at - position.observed_at
    stale = age is not None and terms.stale_after is not None and age > terms.stale_after
    excluded = age is None or (terms.exclude_after is not None and age > terms.exclude_after)
    if position.source == REMAP_SOURCE and position.effective_level() == 0:
        # Retired by a remap, not reported: it never turns stale (it kept the SKU
        # `updating` for good once the supplier's limit passed; a merchandiser's
        # walkthrough), and holds nothing to exclude (a return restocked onto it before
        # `restock` passed such levels over would: it ages, and is excluded, as before).
        stale = excluded = False
    sellable = 0 if excluded else max(0, position.effective_level() - terms.buffer)
    committed = position.committed
    if not (terms.reports_net_of_our_orders and position.reported_net):
        # Orders committed while the supplier reported net of them, and still open, count
        # as committed while it reports gross or its last report was gross: such a report
        # holds them (a merchandiser's walkthrough: switched to gross, its next report let
        # them be sold twice; a walkthrough of the fix: switched back to net, its gross
        # report still held them, counted nowhere). Between the switch and the next report
        # they may count twice, on the side of never overselling.
        committed += position.net_committed
    return SupplierLevel(
        supplier_id=supplier_id,
        quantity=position.quantity,
        observed_at=position.observed_at,
        age_seconds=None if age is None else max(0, int(age.total_seconds())),
        stale=stale or excluded,
        excluded=excluded,
        sellable=sellable,
        held=position.live_held(second_floor(at)),
        committed=committed,
        lead_time_days=terms.lead_time_days,
        priority=terms.priority,
        incoming=position.incoming,
    )


def stock_levels(
    sku: str,
    safety_stock: int,
    positions: Mapping[str, PositionLike],
    at: datetime,
    terms: Mapping[str, SupplierTerms],
) -> StockLevels:
    """A SKU's numbers at `at`: staleness, buffers, safety stock and live holds applied,
    its suppliers by id (the view's rows come in no order, an item's in the order its
    suppliers first reported: the two answers listed them differently)."""
    suppliers = [
        supplier_level(supplier_id, position, at, _terms_for(terms, supplier_id))
        for supplier_id, position in sorted(positions.items())
    ]
    sellable = max(0, sum(level.sellable for level in suppliers) - safety_stock)
    held = sum(level.held for level in suppliers)
    committed = sum(level.committed for level in suppliers)
    return StockLevels(
        sku=sku,
        on_hand=sum(position.quantity for position in positions.values()),
        sellable=sellable,
        held=held,
        committed=committed,
        available=max(0, sellable - held - committed),
        safety_stock=safety_stock,
        suppliers=suppliers,
    )


class StockItem(LedgerAggregate):
    """One internal SKU: supplier levels, promises per supplier, and the no-oversell rule."""

    TOPIC = "stockledger:StockItem"

    class Event(LedgerAggregate.Event):
        def mutate(self, aggregate: Any) -> Any:
            item = super().mutate(aggregate)
            assert item is not None
            # Holds that have run out no longer count; forgetting them keeps the state
            # small. Done on every event, so that replaying rebuilds the same state.
            now = None
            for position in item.positions.values():
                if position.held:
                    if now is None:
                        now = second_floor(self.timestamp)
                    position.forget_expired_holds(now)
            return item

    class Registered(Event, AggregateCreated):
        TOPIC = "stockledger:StockItem.Registered"
        sku: str
        safety_stock: int

    class SafetyStockSet(Event):
        TOPIC = "stockledger:StockItem.SafetyStockSet"
        safety_stock: int

        def apply(self, item: StockItem) -> None:
            item.safety_stock = self.safety_stock

    class Observed(Event):
        """A supplier reported an absolute level; `exposure` is what it left over-promised;
        `incoming`, the stock it said it expects, as [expected on (ISO date or None),
        quantity] pairs; None where the report said nothing of it (its format cannot),
        which leaves the schedule as it was (version 2; a version 1 event, stored before,
        said nothing of it)."""

        TOPIC = "stockledger:StockItem.Observed"
        class_version = 3
        supplier_id: str
        quantity: int
        observed_at: datetime
        source: str
        delivery_id: str | None
        previous_quantity: int | None
        exposure: int
        incoming: list[list[Any]] | None
        # Version 3: whether the report was made net of our orders (the supplier's terms
        # then); one stored before is taken as net, which counts none of the open orders
        # committed while net (as none were counted then).
        net: bool

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["incoming"] = None

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            state["net"] = True

        def apply(self, item: StockItem) -> None:
            position = item.position(self.supplier_id)
            position.reported_net = self.net
            position.quantity = self.quantity
            position.observed_at = self.observed_at
            position.source = self.source
            if self.source == REMAP_SOURCE:
                position.remapped_at = self.timestamp
            if self.incoming is not None:
                position.incoming = incoming_of(self.incoming)
            position.retire_reported(self.observed_at)

    class LateReportIgnored(Event):
        TOPIC = "stockledger:StockItem.LateReportIgnored"
        supplier_id: str
        quantity: int
        observed_at: datetime
        current_observed_at: datetime
        source: str
        delivery_id: str | None

    class SupplierSkuRemapped(Event):
        """A mapping moved one of the supplier's SKUs (`supplier_sku`) from this SKU to
        `to_sku`. `level` says what became of the supplier's level here: "moved" (to
        `to_sku`, with its report time) or "retired" (0 from the remap on; `to_sku` shows
        the supplier's stock from its next report); "kept" (another of its SKUs still
        mapped here), in events recorded before 2026-12-07 only. The level's own events
        precede it. Recorded on every such move, so that two mapping PUTs moving
        supplier SKUs off one SKU at once conflict here, and the later is decided again
        on what the first did (each had kept the level for the other, and it stood fed by
        nothing: a review)."""

        TOPIC = "stockledger:StockItem.SupplierSkuRemapped"
        supplier_id: str
        supplier_sku: str
        to_sku: str
        level: str

    class Held(Event):
        TOPIC = "stockledger:StockItem.Held"
        reservation_id: str
        expires_at: datetime
        allocations: list[dict[str, Any]]

        def apply(self, item: StockItem) -> None:
            expires = second_ceil(self.expires_at)
            for allocation in Allocation.many_from(self.allocations):
                item.position(allocation.supplier_id).add_held(expires, allocation.quantity)

    class HoldReleased(Event):
        TOPIC = "stockledger:StockItem.HoldReleased"
        reservation_id: str
        expires_at: datetime
        allocations: list[dict[str, Any]]

        def apply(self, item: StockItem) -> None:
            expires = second_ceil(self.expires_at)
            for allocation in Allocation.many_from(self.allocations):
                item.position(allocation.supplier_id).add_held(expires, -allocation.quantity)

    class HoldExtended(Event):
        """A hold runs on from `expires_at` until `extended_to` (`Reservation.Extended`)."""

        TOPIC = "stockledger:StockItem.HoldExtended"
        reservation_id: str
        expires_at: datetime
        extended_to: datetime
        allocations: list[dict[str, Any]]

        def apply(self, item: StockItem) -> None:
            was, now = second_ceil(self.expires_at), second_ceil(self.extended_to)
            for allocation in Allocation.many_from(self.allocations):
                position = item.position(allocation.supplier_id)
                position.add_held(was, -allocation.quantity)
                position.add_held(now, allocation.quantity)

    class HoldsExpired(Event):
        """Holds whose time ran out, as the sweeper recorded their reservations' expiry.
        They stopped counting at their expiry already (`forget_expired_holds`): this
        records it in the SKU's own history, and moves its views (a stream of
        availability shows the units free again)."""

        TOPIC = "stockledger:StockItem.HoldsExpired"
        holds: list[dict[str, Any]]  # each: reservation_id, expires_at, allocations

        def apply(self, item: StockItem) -> None:
            for hold in self.holds:
                expires = second_ceil(datetime.fromisoformat(hold["expires_at"]))
                for allocation in Allocation.many_from(hold["allocations"]):
                    item.position(allocation.supplier_id).add_held(expires, -allocation.quantity)

    class HoldConfirmed(Event):
        """`counted` (version 2): the commitment counts in its net suppliers'
        `net_committed` (see `Position`); one stored before (version 1) does not, as
        neither the snapshots nor the views of then count it."""

        TOPIC = "stockledger:StockItem.HoldConfirmed"
        class_version = 2
        reservation_id: str
        expires_at: datetime
        allocations: list[dict[str, Any]]
        net_of_our_orders: list[str]
        counted: bool

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["counted"] = False

        def apply(self, item: StockItem) -> None:
            expires = second_ceil(self.expires_at)
            for allocation in Allocation.many_from(self.allocations):
                position = item.position(allocation.supplier_id)
                position.add_held(expires, -allocation.quantity)
                if allocation.supplier_id in self.net_of_our_orders:
                    position.add_unreported(self.timestamp, -allocation.quantity)
                    if self.counted:
                        position.net_committed += allocation.quantity
                else:
                    position.committed += allocation.quantity

    class CommitmentReleased(Event):
        """`counted` (version 2): the commitment was counted in `net_committed` when
        confirmed (see `HoldConfirmed`)."""

        TOPIC = "stockledger:StockItem.CommitmentReleased"
        class_version = 2
        reservation_id: str
        confirmed_at: datetime
        allocations: list[dict[str, Any]]
        net_of_our_orders: list[str]
        counted: bool

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["counted"] = False

        def apply(self, item: StockItem) -> None:
            for allocation in Allocation.many_from(self.allocations):
                position = item.position(allocation.supplier_id)
                if allocation.supplier_id in self.net_of_our_orders:
                    position.cancel_unreported(
                        reduction_key(self.confirmed_at), allocation.quantity
                    )
                    if self.counted:
                        position.net_committed = max(
                            0, position.net_committed - allocation.quantity
                        )
                else:
                    position.committed = max(0, position.committed - allocation.quantity)

    class Shipped(Event):
        """`counted` (version 2): the order was counted in its net suppliers'
        `net_committed` when confirmed; `taken_off`, those of them whose level the
        shipment lowers until a report newer than it, as a gross supplier's (see `ship`)."""

        TOPIC = "stockledger:StockItem.Shipped"
        class_version = 2
        reservation_id: str
        allocations: list[dict[str, Any]]
        net_of_our_orders: list[str]
        counted: bool
        taken_off: list[str]

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["counted"] = False
            state["taken_off"] = []

        def apply(self, item: StockItem) -> None:
            for allocation in Allocation.many_from(self.allocations):
                position = item.position(allocation.supplier_id)
                if allocation.supplier_id in self.net_of_our_orders:
                    if self.counted:
                        position.net_committed = max(
                            0, position.net_committed - allocation.quantity
                        )
                    if allocation.supplier_id in self.taken_off:
                        position.add_unreported(self.timestamp, -allocation.quantity)
                    # Otherwise its reports already leave our open orders out.
                    continue
                position.committed = max(0, position.committed - allocation.quantity)
                position.add_unreported(self.timestamp, -allocation.quantity)

    class Restocked(Event):
        """`passed_over` (version 2): returned units not put back on a supplier's level, as a
        remap has set it since the order was placed (see `StockItem.restock`)."""

        TOPIC = "stockledger:StockItem.Restocked"
        class_version = 2
        reservation_id: str
        allocations: list[dict[str, Any]]
        passed_over: list[dict[str, Any]]

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["passed_over"] = []

        def apply(self, item: StockItem) -> None:
            for allocation in Allocation.many_from(self.allocations):
                item.position(allocation.supplier_id).add_unreported(
                    self.timestamp, allocation.quantity
                )

    def __init__(self, sku: str, safety_stock: int) -> None:
        self.sku = sku
        self.safety_stock = safety_stock
        self.positions: dict[str, Position] = {}

    @staticmethod
    @functools.lru_cache(maxsize=200_000)
    def id_for(sku: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/sku/{sku}")

    @classmethod
    def register(cls, sku: str, at: datetime, cause: Cause, safety_stock: int = 0) -> StockItem:
        return cls._create(
            cls.Registered,
            id=cls.id_for(sku),
            sku=sku,
            safety_stock=safety_stock,
            timestamp=at,
            **cause.as_kwargs(),
        )

    def position(self, supplier_id: str) -> Position:
        try:
            return self.positions[supplier_id]
        except KeyError:
            position = self.positions[supplier_id] = Position()
            return position

    @property
    def supplier_ids(self) -> list[str]:
        return list(self.positions)

    def level_rows(self) -> list[LevelRow]:
        """The current level per supplier, as the ledger keeps it beside its events."""
        return [LevelRow.of(self.sku, level) for level in self.level_state()]

    def level_state(self) -> LevelState:
        """What `level_rows` says, as plain tuples (supplier, quantity, observed at,
        unreported from, incoming): cheap to keep and compare for every stock item a batch
        loads."""
        return tuple(
            (
                supplier_id,
                position.quantity,
                position.observed_at,
                min(position.unreported) if position.unreported else None,
                position.incoming,
            )
            for supplier_id, position in self.positions.items()
        )

    # Commands ---------------------------------------------------------------

    def note_remap(
        self,
        supplier_id: str,
        supplier_sku: str,
        to_sku: str,
        level: Literal["moved", "retired"],
        at: datetime,
        cause: Cause,
    ) -> None:
        """Records that a mapping moved the supplier SKU from here (`SupplierSkuRemapped`)."""
        self.trigger_event(
            self.SupplierSkuRemapped,
            supplier_id=supplier_id,
            supplier_sku=supplier_sku,
            to_sku=to_sku,
            level=level,
            timestamp=at,
            **cause.as_kwargs(),
        )

    def set_safety_stock(self, safety_stock: int, at: datetime, cause: Cause) -> bool:
        if safety_stock == self.safety_stock:
            return False
        self.trigger_event(
            self.SafetyStockSet, safety_stock=safety_stock, timestamp=at, **cause.as_kwargs()
        )
        return True

    def observe(
        self,
        supplier_id: str,
        quantity: int,
        observed_at: datetime,
        terms: SupplierTerms,
        at: datetime,
        cause: Cause,
        source: str = "",
        delivery_id: str | None = None,
        seen_at: datetime | None = None,
        incoming: IncomingStock | None = None,
        ties_lose: bool = False,
        net_since: datetime | None = None,
        always: bool = False,
    ) -> ObservationOutcome:
        """Records an absolute supplier report; the newest `observed_at` per supplier wins.
        `net_since`: when the supplier came to report net of our orders (`Supplier`): a
        report made before is taken as gross, whenever it arrives.
        `incoming`: the stock the report says the supplier expects (empty: it expects none;
        None: the report says nothing of it, and the schedule on record stands).

        `seen_at` is the newest report of this level the ledger has seen, recorded or
        not: a report that repeated the recorded quantity changes nothing and leaves no
        event, yet a report older than it is late all the same (the ledger keeps it
        beside its events, see `LevelTouch`). `current_observed_at` on the late event
        names the newer report.

        Of two reports of one time, the one that arrives last wins, unless `ties_lose`: a
        record received before the level on record was (a dead letter tried again) is
        late against a report of the same time, or it would put back the oldest file's
        level where a supplier stamps its times to the minute (a walkthrough).

        `always`: recorded even where it changes nothing (a remap's, so that a report
        another process decided on the level before it conflicts with it when saved).
        """
        # Made net of our orders: under net terms, and after they began (a gross report
        # processed after a switch to net was taken as net: the open orders it held
        # counted nowhere; a review).
        net = terms.reports_net_of_our_orders and (
            net_since is None or observed_at >= net_since + NET_SWITCH_MARGIN
        )
        current = self.positions.get(supplier_id)
        if current is not None and current.observed_at is not None:
            newest = max(current.observed_at, seen_at or current.observed_at)
            tie_lost = (
                ties_lose
                and observed_at == newest
                and (quantity != current.quantity or incoming not in (None, current.incoming))
            )
            if observed_at < newest or tie_lost:
                self.trigger_event(
                    self.LateReportIgnored,
                    supplier_id=supplier_id,
                    quantity=quantity,
                    observed_at=observed_at,
                    current_observed_at=newest,
                    source=source,
                    delivery_id=delivery_id,
                    timestamp=at,
                    **cause.as_kwargs(),
                )
                return ObservationOutcome.LATE
            if (
                not always
                and incoming in (None, current.incoming)
                and not self._changes_anything(current, quantity, observed_at, terms, net)
            ):
                return ObservationOutcome.UNCHANGED
        self.trigger_event(
            self.Observed,
            supplier_id=supplier_id,
            quantity=quantity,
            observed_at=observed_at,
            source=source,
            delivery_id=delivery_id,
            # A remap's 0 is not a report: the first report after it has none before it
            # (from 0, every remap of 100 units or more raised an `anomalous_jump`).
            previous_quantity=(
                None if current is None or current.source == REMAP_SOURCE else current.quantity
            ),
            exposure=self._exposure_after(current, quantity, observed_at, terms, at, net),
            incoming=None if incoming is None else [list(entry) for entry in incoming],
            net=net,
            timestamp=at,
            **cause.as_kwargs(),
        )
        return ObservationOutcome.APPLIED

    @staticmethod
    def _exposure_after(
        current: Position | None,
        quantity: int,
        observed_at: datetime,
        terms: SupplierTerms,
        at: datetime,
        net: bool,
    ) -> int:
        """How far promises against the supplier would exceed what the report makes sellable."""
        if current is None:
            return 0
        reported = second_floor(observed_at)
        still_unreported = sum(v for key, v in current.unreported.items() if key > reported)
        sellable = max(0, max(0, quantity + still_unreported) - terms.buffer)
        committed = current.committed
        if not (terms.reports_net_of_our_orders and net):  # as `supplier_level` counts them
            committed += current.net_committed
        promised = current.live_held(second_floor(at)) + committed
        return max(0, promised - sellable)

    @staticmethod
    def _changes_anything(
        current: Position, quantity: int, observed_at: datetime, terms: SupplierTerms, net: bool
    ) -> bool:
        assert current.observed_at is not None
        if quantity != current.quantity or current.has_reported_changes(observed_at):
            return True
        if current.reported_net != net:
            return True  # the same number, but now with (or without) our open orders
        # An unchanged level is re-recorded only when the stored one is getting old,
        # so that a supplier repeating the same number never turns stale.
        limits = [limit for limit in (terms.stale_after, terms.exclude_after) if limit]
        return bool(limits) and observed_at - current.observed_at >= min(limits) / 2

    def hold(
        self,
        reservation_id: str,
        allocations: list[Allocation],
        expires_at: datetime,
        at: datetime,
        cause: Cause,
    ) -> None:
        """Holds stock already allocated by `allocate`, which checked the invariant."""
        self.trigger_event(
            self.Held,
            reservation_id=reservation_id,
            expires_at=expires_at,
            allocations=_as_dicts(allocations),
            timestamp=at,
            **cause.as_kwargs(),
        )

    def release_hold(
        self,
        reservation_id: str,
        allocations: list[Allocation],
        expires_at: datetime,
        at: datetime,
        cause: Cause,
    ) -> None:
        self.trigger_event(
            self.HoldReleased,
            reservation_id=reservation_id,
            expires_at=expires_at,
            allocations=_as_dicts(allocations),
            timestamp=at,
            **cause.as_kwargs(),
        )

    def extend_hold(
        self,
        reservation_id: str,
        allocations: list[Allocation],
        expires_at: datetime,
        extended_to: datetime,
        at: datetime,
        cause: Cause,
    ) -> None:
        """Moves a hold's units from its expiry to a later one (the hold was live at `at`)."""
        self.trigger_event(
            self.HoldExtended,
            reservation_id=reservation_id,
            expires_at=expires_at,
            extended_to=extended_to,
            allocations=_as_dicts(allocations),
            timestamp=at,
            **cause.as_kwargs(),
        )

    def expire_holds(
        self,
        holds: list[tuple[str, datetime, list[Allocation]]],
        at: datetime,
        cause: Cause,
    ) -> None:
        """Records that these holds (reservation id, expiry, allocations) ran out."""
        self.trigger_event(
            self.HoldsExpired,
            holds=[
                {
                    "reservation_id": reservation_id,
                    "expires_at": expires_at.isoformat(),
                    "allocations": _as_dicts(allocations),
                }
                for reservation_id, expires_at, allocations in holds
            ],
            timestamp=at,
            **cause.as_kwargs(),
        )

    def confirm_hold(
        self,
        reservation_id: str,
        allocations: list[Allocation],
        expires_at: datetime,
        net_of_our_orders: list[str],
        at: datetime,
        cause: Cause,
    ) -> None:
        self.trigger_event(
            self.HoldConfirmed,
            reservation_id=reservation_id,
            expires_at=expires_at,
            allocations=_as_dicts(allocations),
            net_of_our_orders=net_of_our_orders,
            counted=True,
            timestamp=at,
            **cause.as_kwargs(),
        )

    def release_commitment(
        self,
        reservation_id: str,
        allocations: list[Allocation],
        confirmed_at: datetime,
        net_of_our_orders: list[str],
        at: datetime,
        cause: Cause,
        *,
        counted: bool = True,
    ) -> None:
        """`counted`: the order was counted in `net_committed` when confirmed."""
        self.trigger_event(
            self.CommitmentReleased,
            reservation_id=reservation_id,
            confirmed_at=confirmed_at,
            allocations=_as_dicts(allocations),
            net_of_our_orders=net_of_our_orders,
            counted=counted,
            timestamp=at,
            **cause.as_kwargs(),
        )

    def ship(
        self,
        reservation_id: str,
        allocations: list[Allocation],
        net_of_our_orders: list[str],
        at: datetime,
        cause: Cause,
        *,
        counted: bool = True,
        terms: Mapping[str, SupplierTerms] | None = None,
        net_since: Mapping[str, datetime | None] | None = None,
    ) -> None:
        """`counted`: the order was counted in `net_committed` when confirmed (see
        `HoldConfirmed`). An order committed against a supplier that reported net of our
        orders is taken off its level, until a report newer than the shipment, unless the
        supplier reports net now (`terms`), and has since its last report (`net_since`, see
        `Supplier`), which was net: a report that may hold the order (its last, or a later
        one made before the shipment) must not count the shipped units (two reviews: a
        gross report made before the shipment, arriving after, sold them again)."""

        def net_throughout(supplier_id: str) -> bool:
            position = self.positions.get(supplier_id)
            since = (net_since or {}).get(supplier_id)
            return (
                terms is not None
                and supplier_id in terms
                and terms[supplier_id].reports_net_of_our_orders
                and (position is None or position.reported_net)
                and (
                    since is None
                    or (
                        position is not None
                        and position.observed_at is not None
                        and position.observed_at >= since + NET_SWITCH_MARGIN
                    )
                )
            )

        taken_off = [s for s in net_of_our_orders if not net_throughout(s)]
        self.trigger_event(
            self.Shipped,
            reservation_id=reservation_id,
            allocations=_as_dicts(allocations),
            net_of_our_orders=net_of_our_orders,
            counted=counted,
            taken_off=sorted(taken_off),
            timestamp=at,
            **cause.as_kwargs(),
        )

    def restock(
        self,
        reservation_id: str,
        allocations: list[Allocation],
        at: datetime,
        cause: Cause,
        placed_at: datetime | None = None,
    ) -> None:
        """Returned units go back to each supplier's level until its next report, but not to
        a level a remap set since the order was placed (`placed_at`): the units go back to
        the supplier SKU that fed the order, which a remap moved to another SKU, and its
        reports count them there. Restocked here they counted twice: on a level a remap
        retired, which no report of the supplier retires again (a review), or on a level
        another supplier SKU feeds since (a fuzzer)."""
        restocked: list[Allocation] = []
        passed_over: list[Allocation] = []
        for allocation in allocations:
            position = self.positions.get(allocation.supplier_id)
            remapped = position is not None and (
                position.source == REMAP_SOURCE
                if position.remapped_at is None or placed_at is None  # a snapshot from before
                else position.remapped_at >= placed_at
            )
            (passed_over if remapped else restocked).append(allocation)
        self.trigger_event(
            self.Restocked,
            reservation_id=reservation_id,
            allocations=_as_dicts(restocked),
            # Recorded, so that an auditor sees where the units did not go (an auditor's
            # walkthrough found them in no SKU's history).
            passed_over=_as_dicts(passed_over),
            timestamp=at,
            **cause.as_kwargs(),
        )

    # Queries ----------------------------------------------------------------

    def levels(self, at: datetime, terms: Mapping[str, SupplierTerms]) -> StockLevels:
        """The SKU's numbers at `at`: staleness, buffers, safety stock and live holds applied."""
        return stock_levels(self.sku, self.safety_stock, self.positions, at, terms)

    def allocate(
        self, quantity: int, at: datetime, terms: Mapping[str, SupplierTerms]
    ) -> tuple[list[Allocation] | None, int]:
        """Splits `quantity` across suppliers by priority, lead time, then freshest report.

        Returns the allocations, or None when the SKU cannot cover the quantity without
        breaking `held + committed <= sellable`, together with what is available.
        """
        levels = self.levels(at, terms)
        if quantity > levels.available:
            return None, levels.available

        allocations: list[Allocation] = []
        remaining = quantity
        for level in sorted(levels.suppliers, key=lambda level: level.preference):
            take = min(remaining, level.capacity)
            if take > 0:
                allocations.append(Allocation(level.supplier_id, take))
                remaining -= take
            if remaining == 0:
                break
        # The sum of capacities is never below `available`, so the whole line fits.
        assert remaining == 0, (quantity, levels)
        return allocations, levels.available
