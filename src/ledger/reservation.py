"""Reservation: one OMS order's claim on stock, from hold to fulfilment, and its returns."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import AggregateCreated

from ledger.base import Cause, LedgerAggregate
from ledger.errors import (
    ExceedsOpenQuantity,
    IdempotencyKeyMismatch,
    InvalidState,
    SupplierNotOnLine,
)
from ledger.stock import Allocation


class ReservationStatus(StrEnum):
    HELD = "held"
    CONFIRMED = "confirmed"
    PARTIALLY_FULFILLED = "partially_fulfilled"
    FULFILLED = "fulfilled"
    RELEASED = "released"
    EXPIRED = "expired"


OPEN_COMMITMENTS = (ReservationStatus.CONFIRMED, ReservationStatus.PARTIALLY_FULFILLED)


def _a(status: str) -> str:
    """A status with its article: "a held", "an expired"."""
    return f"{'an' if status[0] in 'aeiou' else 'a'} {status}"


class ReservationExpired(InvalidState):
    code = "reservation_expired"


@dataclass(frozen=True)
class Movement:
    """Units of one SKU that moved for one supplier: shipped, cancelled, or returned."""

    sku: str
    supplier_id: str
    quantity: int

    def as_dict(self) -> dict[str, Any]:
        return {"sku": self.sku, "supplier_id": self.supplier_id, "quantity": self.quantity}


@dataclass
class Line:
    """One SKU of the order, who ships it, and how much has shipped and come back."""

    sku: str
    quantity: int
    allocations: dict[str, int]
    fulfilled: dict[str, int] = field(default_factory=dict)
    returned: dict[str, int] = field(default_factory=dict)
    # Units the OMS cancelled before they shipped (`LinesCancelled`), by supplier.
    cancelled: dict[str, int] = field(default_factory=dict)

    def open_by_supplier(self) -> dict[str, int]:
        """What is still to ship (or, for a hold, still held), by supplier."""
        left = {
            supplier: allocated - self.fulfilled.get(supplier, 0) - self.cancelled.get(supplier, 0)
            for supplier, allocated in self.allocations.items()
        }
        return {supplier: units for supplier, units in left.items() if units > 0}

    def returnable_by_supplier(self) -> dict[str, int]:
        return {
            supplier: shipped - self.returned.get(supplier, 0)
            for supplier, shipped in self.fulfilled.items()
            if shipped > self.returned.get(supplier, 0)
        }

    @property
    def fulfilled_quantity(self) -> int:
        return sum(self.fulfilled.values())

    @property
    def cancelled_quantity(self) -> int:
        return sum(self.cancelled.values())


def _take(available: dict[str, int], quantity: int, supplier_id: str | None) -> dict[str, int]:
    """Splits `quantity` over suppliers in order, or takes it all from the one named."""
    if supplier_id is not None:
        return {supplier_id: quantity} if available.get(supplier_id, 0) >= quantity else {}
    taken: dict[str, int] = {}
    remaining = quantity
    for supplier, open_quantity in available.items():
        take = min(open_quantity, remaining)
        if take:
            taken[supplier] = take
            remaining -= take
    return taken if remaining == 0 else {}


def _movements(
    lines: dict[str, Line],
    requested: Iterable[tuple[str, int, str | None]],
    budget_of: str,
) -> list[Movement]:
    budgets = {
        sku: (line.open_by_supplier() if budget_of == "open" else line.returnable_by_supplier())
        for sku, line in lines.items()
    }
    asked: dict[str, int] = defaultdict(int)  # what the request's other lines took, by SKU
    moved: dict[tuple[str, str], int] = defaultdict(int)  # in the order first moved
    # Lines that name a supplier take from it first, and the others from whatever is left:
    # taken in the request's order, a line without one took the named supplier's units by
    # priority, and the line naming it was refused where the other order was accepted (an
    # OMS walkthrough).
    for sku, quantity, supplier_id in sorted(requested, key=lambda line: line[2] is None):
        budget = budgets.get(sku)
        if supplier_id is not None and sku in lines and supplier_id not in lines[sku].allocations:
            raise SupplierNotOnLine(
                f"none of {sku} on this reservation was allocated to {supplier_id!r}",
                sku=sku,
                supplier_id=supplier_id,
                allocated_to=sorted(lines[sku].allocations),
            )
        taken = _take(budget, quantity, supplier_id) if budget is not None else {}
        if not taken:
            # What is left where the request looked: the line's, or the named supplier's.
            if budget is None:
                left, said = 0, f"{sku} is not on this reservation"
            else:
                left = sum(budget.values()) if supplier_id is None else budget.get(supplier_id, 0)
                from_whom = "" if supplier_id is None else f" from {supplier_id!r}"
                has = "has open" if budget_of == "open" else "has shipped and not had back"
                said = f"{quantity} of {sku} is more than the {left} the reservation {has}"
                said += from_whom
                if asked[sku]:
                    said += f", after the {asked[sku]} of it that this request's other lines take"
            raise ExceedsOpenQuantity(
                said,
                sku=sku,
                requested=quantity,
                remaining=left,
                **({"supplier_id": supplier_id} if supplier_id is not None else {}),
            )
        asked[sku] += quantity
        for supplier, take in taken.items():
            assert budget is not None
            budget[supplier] -= take
            moved[sku, supplier] += take
    # One movement a SKU and supplier, however many lines named them: a cancel of 1,000
    # lines of one unit wrote 1,000 movements, and its stock event as many allocations
    # (a walkthrough).
    return [Movement(sku, supplier, quantity) for (sku, supplier), quantity in moved.items()]


class Reservation(LedgerAggregate):
    """An order's claim on stock; all its lines are held or refused together."""

    TOPIC = "stockledger:Reservation"
    # Whether its stock items count the commitment as an open order of its net suppliers
    # (see `Confirmed`); a snapshot taken before it was kept says nothing: not counted.
    net_counted = False
    # The expiry it was placed with, once an extension moved it (`Extended`): an order
    # sent again under its key is answered as first placed (`as_placed`).
    placed_expires_at: datetime | None = None

    class Placed(LedgerAggregate.Event, AggregateCreated):
        TOPIC = "stockledger:Reservation.Placed"
        client: str
        idempotency_key: str
        order_id: str
        fingerprint: str
        lines: list[dict[str, Any]]
        expires_at: datetime

    class Confirmed(LedgerAggregate.Event):
        """The hold became a commitment; `net_of_our_orders` names the suppliers whose
        reports will leave this order out, so that it stops counting against them;
        `net_counted` (version 2), that its stock items count it as an open order of
        theirs (`StockItem.HoldConfirmed`'s `counted`): one stored before does not."""

        TOPIC = "stockledger:Reservation.Confirmed"
        class_version = 2
        net_of_our_orders: list[str]
        net_counted: bool

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["net_counted"] = False

        def apply(self, reservation: Reservation) -> None:
            reservation.status = ReservationStatus.CONFIRMED
            reservation.confirmed_at = self.timestamp
            reservation.net_of_our_orders = list(self.net_of_our_orders)
            reservation.net_counted = self.net_counted

    class Extended(LedgerAggregate.Event):
        """The hold runs until `expires_at`, later than before (its stock items move their
        units' holds there: `StockItem.HoldExtended`)."""

        TOPIC = "stockledger:Reservation.Extended"
        expires_at: datetime

        def apply(self, reservation: Reservation) -> None:
            if reservation.placed_expires_at is None:
                reservation.placed_expires_at = reservation.expires_at
            reservation.expires_at = self.expires_at

    class Released(LedgerAggregate.Event):
        """What had not shipped is cancelled, and counted so on its lines (`cancelled`): a
        release after a partial shipment showed its released units nowhere on the order,
        where a cancel of them did (an auditor's walkthrough)."""

        TOPIC = "stockledger:Reservation.Released"
        note: str | None

        def apply(self, reservation: Reservation) -> None:
            for line in reservation.lines.values():
                for supplier, units in line.open_by_supplier().items():
                    line.cancelled[supplier] = line.cancelled.get(supplier, 0) + units
            reservation.status = ReservationStatus.RELEASED
            reservation.closed_at = self.timestamp

    class Expired(LedgerAggregate.Event):
        TOPIC = "stockledger:Reservation.Expired"

        def apply(self, reservation: Reservation) -> None:
            reservation.status = ReservationStatus.EXPIRED
            reservation.closed_at = self.timestamp

    class Fulfilled(LedgerAggregate.Event):
        TOPIC = "stockledger:Reservation.Fulfilled"
        movements: list[dict[str, Any]]
        request_key: str | None

        def apply(self, reservation: Reservation) -> None:
            for movement in self.movements:
                line = reservation.lines[movement["sku"]]
                supplier = movement["supplier_id"]
                line.fulfilled[supplier] = line.fulfilled.get(supplier, 0) + movement["quantity"]
            done = all(not line.open_by_supplier() for line in reservation.lines.values())
            reservation.status = (
                ReservationStatus.FULFILLED if done else ReservationStatus.PARTIALLY_FULFILLED
            )
            reservation.remember(self.request_key)

    class LinesCancelled(LedgerAggregate.Event):
        """Units of some lines the order no longer wants, cancelled before they shipped
        (their stock items let the hold or the commitment go: `StockItem.HoldReleased`,
        `CommitmentReleased`). With nothing left open, the reservation is closed: released
        where nothing shipped, fulfilled where something did."""

        TOPIC = "stockledger:Reservation.LinesCancelled"
        movements: list[dict[str, Any]]
        note: str | None
        request_key: str | None

        def apply(self, reservation: Reservation) -> None:
            for movement in self.movements:
                line = reservation.lines[movement["sku"]]
                supplier = movement["supplier_id"]
                line.cancelled[supplier] = line.cancelled.get(supplier, 0) + movement["quantity"]
            if all(not line.open_by_supplier() for line in reservation.lines.values()):
                shipped = any(line.fulfilled for line in reservation.lines.values())
                reservation.status = (
                    ReservationStatus.FULFILLED if shipped else ReservationStatus.RELEASED
                )
                reservation.closed_at = self.timestamp
            reservation.remember(self.request_key)

    class Returned(LedgerAggregate.Event):
        TOPIC = "stockledger:Reservation.Returned"
        movements: list[dict[str, Any]]
        restock: bool
        request_key: str | None

        def apply(self, reservation: Reservation) -> None:
            for movement in self.movements:
                line = reservation.lines[movement["sku"]]
                supplier = movement["supplier_id"]
                line.returned[supplier] = line.returned.get(supplier, 0) + movement["quantity"]
            reservation.remember(self.request_key)

    def __init__(
        self,
        client: str,
        idempotency_key: str,
        order_id: str,
        fingerprint: str,
        lines: list[dict[str, Any]],
        expires_at: datetime,
    ) -> None:
        self.client = client
        self.idempotency_key = idempotency_key
        self.order_id = order_id
        self.fingerprint = fingerprint
        self.expires_at = expires_at
        self.lines = {
            line["sku"]: Line(
                sku=line["sku"],
                quantity=line["quantity"],
                allocations={a["supplier_id"]: a["quantity"] for a in line["allocations"]},
            )
            for line in lines
        }
        self.status = ReservationStatus.HELD
        self.confirmed_at: datetime | None = None
        self.net_of_our_orders: list[str] = []
        self.net_counted = False
        self.closed_at: datetime | None = None
        self.request_keys: list[str] = []

    @staticmethod
    def id_for(client: str, idempotency_key: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/reservation/{client}/{idempotency_key}")

    @classmethod
    def place(
        cls,
        client: str,
        idempotency_key: str,
        order_id: str,
        fingerprint: str,
        lines: list[tuple[str, int, list[Allocation]]],
        expires_at: datetime,
        at: datetime,
        cause: Cause,
    ) -> Reservation:
        return cls._create(
            cls.Placed,
            id=cls.id_for(client, idempotency_key),
            client=client,
            idempotency_key=idempotency_key,
            order_id=order_id,
            fingerprint=fingerprint,
            lines=[
                {"sku": sku, "quantity": quantity, "allocations": [a.as_dict() for a in allocs]}
                for sku, quantity, allocs in lines
            ],
            expires_at=expires_at,
            timestamp=at,
            **cause.as_kwargs(),
        )

    def remember(self, request_key: str | None) -> None:
        if request_key is not None:
            self.request_keys.append(request_key)

    def _replayed(self, operation: str, key: str | None, request: object) -> str | None:
        """The key to record for this request, or None when it was already applied.

        A key is remembered with its operation and the request it came with: the same
        key again with the same request changes nothing; with another, it is refused.
        """
        if key is None:
            return None
        fingerprint = hashlib.sha256(
            json.dumps(request, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        recorded = f"{operation}:{key}#{fingerprint}"
        for earlier in self.request_keys:
            # The fingerprint is hex, the key any printable text: the key is what comes
            # before the last `#` (`ship-1` is not `ship-1#box-2`, which it starts).
            if earlier.rpartition("#")[0] == f"{operation}:{key}":
                if earlier == recorded:
                    return ""
                raise IdempotencyKeyMismatch(
                    f"this Idempotency-Key was used for another {operation} request",
                    reservation_id=str(self.id),
                )
        return recorded

    def __deepcopy__(self, memo: dict[int, Any]) -> Reservation:
        """A copy to read on another thread, without the events not yet saved.

        Its containers are new, its values (strings, numbers, times) are shared: they
        never change in place. A new attribute that holds a container must be copied here.
        """
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        copied.__dict__["_pending_events"] = []
        copied.lines = {
            sku: replace(
                line,
                allocations=dict(line.allocations),
                fulfilled=dict(line.fulfilled),
                returned=dict(line.returned),
                cancelled=dict(line.cancelled),
            )
            for sku, line in self.lines.items()
        }
        copied.net_of_our_orders = list(self.net_of_our_orders)
        copied.request_keys = list(self.request_keys)
        memo[id(self)] = copied
        return copied

    def as_placed(self) -> Reservation:
        """A copy of the reservation as it was placed, what the order's first answer
        showed (allocations never change after; the expiry it was placed with): held,
        nothing confirmed, shipped or returned. An order sent again under its key is
        answered with it."""
        placed = object.__new__(type(self))
        placed.__dict__.update(self.__dict__)
        placed.__dict__["_pending_events"] = []
        placed.lines = {
            sku: Line(sku=line.sku, quantity=line.quantity, allocations=dict(line.allocations))
            for sku, line in self.lines.items()
        }
        placed.status = ReservationStatus.HELD
        if self.placed_expires_at is not None:
            placed.expires_at = self.placed_expires_at
        placed.confirmed_at = None
        placed.net_of_our_orders = []
        placed.net_counted = False
        placed.closed_at = None
        placed.request_keys = []
        return placed

    def status_at(self, at: datetime) -> ReservationStatus:
        """The status, counting a hold past its expiry as expired before the sweeper says so."""
        if self.status == ReservationStatus.HELD and at >= self.expires_at:
            return ReservationStatus.EXPIRED
        return self.status

    def open_by_sku(self) -> dict[str, list[Allocation]]:
        """Per SKU, by supplier, what has neither shipped nor been cancelled: a hold's units
        still held, a commitment's still to ship."""
        return {
            sku: [Allocation(supplier, quantity) for supplier, quantity in open_units.items()]
            for sku, line in self.lines.items()
            if (open_units := line.open_by_supplier())
        }

    def cancelled_on(self, line: Line) -> dict[str, int]:
        """The units cancelled on a line, by supplier: of a released reservation, all that
        did not ship. One released before its lines counted them (`Released`) kept none
        there, in its snapshots and view rows: read so, its answers show them without a
        rebuild (an upgrade review)."""
        if self.status != ReservationStatus.RELEASED:
            return line.cancelled
        return {
            supplier: allocated - line.fulfilled.get(supplier, 0)
            for supplier, allocated in line.allocations.items()
            if allocated > line.fulfilled.get(supplier, 0)
        }

    @property
    def supplier_ids(self) -> set[str]:
        return {supplier for line in self.lines.values() for supplier in line.allocations}

    def confirm(self, at: datetime, cause: Cause, net_of_our_orders: list[str]) -> bool:
        """Turns the hold into a commitment; False when it already was one."""
        status = self.status_at(at)
        if status == ReservationStatus.HELD:
            self.trigger_event(
                self.Confirmed,
                net_of_our_orders=sorted(net_of_our_orders),
                net_counted=True,
                timestamp=at,
                **cause.as_kwargs(),
            )
            return True
        if status in (*OPEN_COMMITMENTS, ReservationStatus.FULFILLED):
            return False
        if status == ReservationStatus.EXPIRED:
            raise ReservationExpired("the hold expired before it was confirmed", status=status)
        raise InvalidState(f"{_a(status)} reservation cannot be confirmed", status=status)

    def extend(self, at: datetime, cause: Cause, expires_at: datetime) -> datetime | None:
        """Holds on until `expires_at`; returns the expiry it had, None where it already
        ran as long (an extension never shortens a hold, so one sent again changes nothing)."""
        status = self.status_at(at)
        if status == ReservationStatus.EXPIRED:
            raise ReservationExpired("the hold expired before it was extended", status=status)
        if status != ReservationStatus.HELD:
            raise InvalidState(f"{_a(status)} reservation holds nothing to extend", status=status)
        if expires_at <= self.expires_at:
            return None
        was = self.expires_at
        self.trigger_event(self.Extended, expires_at=expires_at, timestamp=at, **cause.as_kwargs())
        return was

    def release(self, at: datetime, cause: Cause, note: str | None) -> ReservationStatus | None:
        """Cancels what has not shipped; returns the status released from, None if nothing was."""
        status = self.status_at(at)
        if status in (ReservationStatus.RELEASED, ReservationStatus.EXPIRED):
            return None
        if status == ReservationStatus.FULFILLED:
            raise InvalidState("a fulfilled reservation cannot be released", status=status)
        self.trigger_event(self.Released, note=note, timestamp=at, **cause.as_kwargs())
        return status

    def cancel(
        self,
        requested: list[tuple[str, int, str | None]],
        at: datetime,
        cause: Cause,
        note: str | None = None,
        request_key: str | None = None,
    ) -> tuple[ReservationStatus, list[Movement]]:
        """Cancels units of some lines before they ship (a customer dropped an item, a
        pick came up short); returns the status they were cancelled from and what was
        cancelled (nothing where `request_key` was used for this request already)."""
        status = self.status_at(at)
        recorded = self._replayed("cancel", request_key, [requested, note])
        if recorded == "":
            return status, []
        if status == ReservationStatus.EXPIRED:
            raise ReservationExpired("the hold expired before lines were cancelled", status=status)
        if status != ReservationStatus.HELD and status not in OPEN_COMMITMENTS:
            raise InvalidState(f"{_a(status)} reservation has nothing to cancel", status=status)
        movements = _movements(self.lines, requested, budget_of="open")
        self.trigger_event(
            self.LinesCancelled,
            movements=[m.as_dict() for m in movements],
            note=note,
            request_key=recorded,
            timestamp=at,
            **cause.as_kwargs(),
        )
        return status, movements

    def expire(self, at: datetime, cause: Cause) -> bool:
        expired = self.status_at(at) == ReservationStatus.EXPIRED
        if self.status == ReservationStatus.HELD and expired:
            self.trigger_event(self.Expired, timestamp=at, **cause.as_kwargs())
            return True
        return False

    def fulfil(
        self,
        requested: list[tuple[str, int, str | None]],
        at: datetime,
        cause: Cause,
        request_key: str | None = None,
    ) -> list[Movement]:
        """Records shipped quantities; a repeated `request_key` changes nothing."""
        recorded = self._replayed("fulfil", request_key, requested)
        if recorded == "":
            return []
        status = self.status_at(at)
        if status not in OPEN_COMMITMENTS:
            raise InvalidState(f"{_a(status)} reservation cannot be fulfilled", status=status)
        movements = _movements(self.lines, requested, budget_of="open")
        self.trigger_event(
            self.Fulfilled,
            movements=[m.as_dict() for m in movements],
            request_key=recorded,
            timestamp=at,
            **cause.as_kwargs(),
        )
        return movements

    def return_units(
        self,
        requested: list[tuple[str, int, str | None]],
        restock: bool,
        at: datetime,
        cause: Cause,
        request_key: str | None = None,
    ) -> list[Movement]:
        """Records units coming back from the customer, from the supplier that shipped them
        where a line names one; a repeated `request_key` changes nothing."""
        # A line naming no supplier is fingerprinted as before suppliers could be named, so
        # a keyed return sent again across the upgrade is still the same request.
        sent = [line if line[2] is not None else line[:2] for line in requested]
        recorded = self._replayed("return", request_key, [sent, restock])
        if recorded == "":
            return []
        movements = _movements(self.lines, requested, budget_of="shipped")
        self.trigger_event(
            self.Returned,
            movements=[m.as_dict() for m in movements],
            restock=restock,
            request_key=recorded,
            timestamp=at,
            **cause.as_kwargs(),
        )
        return movements
