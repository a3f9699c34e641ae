"""Reservations and supplier reports through the handlers and a real writer, in memory."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic

from api.answers import reservation_fields
from api.routers.reservations import reservation_out
from ledger.application import InventoryLedger
from ledger.base import Cause, LedgerSnapshot
from ledger.commands import (
    Cancel,
    Command,
    Confirm,
    ExpireHolds,
    Extend,
    Fulfil,
    Observation,
    PutMappings,
    PutSku,
    PutSupplier,
    Release,
    ReportStock,
    Reserve,
    Return,
)
from ledger.delivery import DeliveryOutcome
from ledger.errors import (
    DeliveryConflict,
    ExceedsOpenQuantity,
    IdempotencyKeyMismatch,
    InsufficientStock,
    InvalidState,
    OpenAgainstSupplier,
    OrdersOpenOnRemap,
    ReservationNotFound,
    Shortfall,
    SupplierNotOnLine,
    UnknownSku,
)
from ledger.handlers.reservations import Reserved
from ledger.mapping import MappingSpec, SkuMapping
from ledger.queries import LedgerQueries
from ledger.reservation import Reservation, ReservationExpired, ReservationStatus
from ledger.stock import Allocation, StockItem, StockLevels
from ledger.supplier import SupplierTerms
from ledger.writer import LedgerWriter, Outcome
from projections.reservations import ReservationsProjection
from tests.conftest import random_sku

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
CAUSE = Cause(actor="test-oms", reason="test.command", correlation_id="req-1")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Ledger:
    """The ledger on the in-memory store, driven command by command through its writer."""

    def __init__(self) -> None:
        self.app = InventoryLedger(
            {"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True
        )
        self.writer = LedgerWriter(self.app)
        self.queries = LedgerQueries(self.app)
        self._keys = 0

    def run(self, command: Command) -> Outcome[Any]:
        return self.writer.apply(command)

    def events_written(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def supplier(self, supplier_id: str, **terms: Any) -> str:
        self.run(
            PutSupplier(
                at=at(0),
                cause=CAUSE,
                supplier_id=supplier_id,
                terms=SupplierTerms(name=supplier_id, **terms),
            )
        )
        return supplier_id

    def sku(self, safety_stock: int = 0) -> str:
        sku = random_sku()
        self.run(PutSku(at=at(0), cause=CAUSE, sku=sku, safety_stock=safety_stock))
        return sku

    def report(
        self,
        supplier_id: str,
        observations: list[Observation],
        when: datetime,
        delivery_id: str | None = None,
        content_hash: str | None = None,
    ) -> Outcome[DeliveryOutcome]:
        delivery_id = delivery_id or f"delivery-{self.events_written()}"
        return self.run(
            ReportStock(
                at=when,
                cause=CAUSE,
                supplier_id=supplier_id,
                delivery_id=delivery_id,
                content_hash=content_hash or f"hash-of-{delivery_id}",
                source="test-feed",
                rows=len(observations),
                observations=observations,
            )
        )

    def stock(self, supplier_id: str, levels: dict[str, int], observed_at: datetime) -> None:
        """The supplier reports these levels of our SKUs, observed and received at `observed_at`."""
        observations = [
            Observation(index=index, sku=sku, quantity=quantity, observed_at=observed_at)
            for index, (sku, quantity) in enumerate(levels.items())
        ]
        self.report(supplier_id, observations, observed_at)

    def reserve_command(
        self, lines: list[tuple[str, int]], when: datetime, key: str | None = None, ttl: int = 600
    ) -> Reserve:
        if key is None:
            self._keys += 1
            key = f"key-{self._keys}"
        return Reserve(
            at=when,
            cause=CAUSE,
            client="oms",
            idempotency_key=key,
            order_id=f"order-{key}",
            lines=lines,
            ttl_seconds=ttl,
            default_ttl_seconds=900,
        )

    def reserve(
        self, lines: list[tuple[str, int]], when: datetime, key: str | None = None, ttl: int = 600
    ) -> Reservation:
        reserved: Reserved = self.run(self.reserve_command(lines, when, key, ttl)).value
        return reserved.reservation

    def reservation(self, reservation_id: UUID) -> Reservation:
        return self.queries.reservation(reservation_id)

    def levels(self, sku: str, when: datetime) -> StockLevels:
        return self.queries.stock_levels(sku, when)

    def available(self, sku: str, when: datetime) -> int:
        return self.levels(sku, when).available


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def acme(ledger: Ledger) -> str:
    """A supplier that reports its own stock, orders included."""
    return ledger.supplier("acme", priority=1)


@pytest.fixture
def netco(ledger: Ledger) -> str:
    """A supplier whose reports already leave our open orders out."""
    return ledger.supplier("netco", priority=2, reports_net_of_our_orders=True)


def numbers(levels: StockLevels) -> tuple[int, int, int, int]:
    return levels.sellable, levels.held, levels.committed, levels.available


def confirmed(ledger: Ledger, lines: list[tuple[str, int]], when: datetime) -> Reservation:
    reservation = ledger.reserve(lines, when)
    return ledger.run(Confirm(at=when, cause=CAUSE, reservation_id=reservation.id)).value


# Reserving -------------------------------------------------------------------------


def test_a_reservation_holds_every_line_and_says_which_supplier_ships_what(
    ledger: Ledger, acme: str, netco: str
) -> None:
    shirt, socks = ledger.sku(), ledger.sku()
    ledger.stock(acme, {shirt: 3, socks: 10}, at(0))
    ledger.stock(netco, {shirt: 5}, at(0))

    reservation = ledger.reserve([(shirt, 5), (socks, 2)], at(10), ttl=60)

    assert reservation.status == ReservationStatus.HELD
    assert reservation.expires_at == at(70)
    assert reservation.lines[shirt].allocations == {"acme": 3, "netco": 2}
    assert reservation.lines[socks].allocations == {"acme": 2}
    assert numbers(ledger.levels(shirt, at(10))) == (8, 5, 0, 3)
    assert numbers(ledger.levels(socks, at(10))) == (10, 2, 0, 8)
    assert ledger.reservation(reservation.id).lines == reservation.lines


def test_one_short_line_leaves_every_sku_untouched(ledger: Ledger, acme: str) -> None:
    shirt, socks, cap = ledger.sku(), ledger.sku(), ledger.sku()
    ledger.stock(acme, {shirt: 10, socks: 2, cap: 1}, at(0))
    written = ledger.events_written()
    command = ledger.reserve_command([(shirt, 5), (socks, 3), (cap, 4)], at(10))

    with pytest.raises(InsufficientStock) as refused:
        ledger.run(command)

    assert refused.value.shortfalls == [Shortfall(socks, 3, 2), Shortfall(cap, 4, 1)]
    assert refused.value.detail["lines"] == [
        {"sku": socks, "requested": 3, "available": 2},
        {"sku": cap, "requested": 4, "available": 1},
    ]
    assert ledger.events_written() == written
    assert [ledger.available(sku, at(10)) for sku in (shirt, socks, cap)] == [10, 2, 1]
    with pytest.raises(ReservationNotFound):
        ledger.reservation(Reservation.id_for("oms", command.idempotency_key))


def test_lines_for_the_same_sku_are_summed_before_the_check(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 5}, at(0))

    with pytest.raises(InsufficientStock) as refused:
        ledger.reserve([(shirt, 3), (shirt, 3)], at(10))
    reservation = ledger.reserve([(shirt, 2), (shirt, 3)], at(10))

    assert refused.value.shortfalls == [Shortfall(shirt, 6, 5)]
    assert list(reservation.lines) == [shirt]
    assert reservation.lines[shirt].quantity == 5
    assert ledger.levels(shirt, at(10)).held == 5


def test_an_order_for_an_unknown_sku_is_refused(ledger: Ledger, acme: str) -> None:
    shirt, unknown = ledger.sku(), random_sku("NOPE")
    ledger.stock(acme, {shirt: 5}, at(0))
    written = ledger.events_written()

    with pytest.raises(UnknownSku) as refused:
        ledger.reserve([(shirt, 1), (unknown, 1)], at(10))

    assert refused.value.detail["skus"] == [unknown]
    assert ledger.events_written() == written


def test_replaying_the_same_key_and_body_returns_the_same_reservation(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 5}, at(0))
    first = ledger.reserve([(shirt, 2)], at(10), key="order-7")

    again = ledger.run(ledger.reserve_command([(shirt, 2)], at(20), key="order-7"))

    assert again.position is None
    assert again.value.replayed is True
    assert again.value.reservation.id == first.id
    assert again.value.reservation.lines == first.lines
    assert ledger.levels(shirt, at(20)).held == 2


def test_the_same_key_with_another_body_is_refused(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 5}, at(0))
    ledger.reserve([(shirt, 2)], at(10), key="order-7")
    written = ledger.events_written()

    with pytest.raises(IdempotencyKeyMismatch):
        ledger.reserve([(shirt, 3)], at(20), key="order-7")

    assert ledger.events_written() == written
    assert ledger.levels(shirt, at(20)).held == 2


# Confirming and releasing --------------------------------------------------------------


def test_confirming_turns_the_hold_into_a_commitment_and_is_idempotent(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = ledger.reserve([(shirt, 4)], at(10))

    first = ledger.run(Confirm(at=at(20), cause=CAUSE, reservation_id=reservation.id))
    second = ledger.run(Confirm(at=at(30), cause=CAUSE, reservation_id=reservation.id))

    assert first.position is not None
    assert second.position is None
    assert second.value.status == ReservationStatus.CONFIRMED
    assert second.value.confirmed_at == at(20)
    assert numbers(ledger.levels(shirt, at(30))) == (10, 0, 4, 6)
    assert numbers(ledger.levels(shirt, at(10_000))) == (10, 0, 4, 6)


def test_confirming_names_the_suppliers_that_report_net_of_our_orders(
    ledger: Ledger, acme: str, netco: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 2}, at(0))
    ledger.stock(netco, {shirt: 10}, at(0))

    reservation = confirmed(ledger, [(shirt, 5)], at(10))

    assert reservation.net_of_our_orders == ["netco"]
    levels = ledger.levels(shirt, at(10))
    assert numbers(levels) == (12 - 3, 0, 2, 12 - 5)


def test_a_hold_cannot_be_confirmed_after_it_expired(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = ledger.reserve([(shirt, 4)], at(10), ttl=60)

    with pytest.raises(ReservationExpired):
        ledger.run(Confirm(at=at(70), cause=CAUSE, reservation_id=reservation.id))

    assert ledger.reservation(reservation.id).status == ReservationStatus.HELD
    assert numbers(ledger.levels(shirt, at(70))) == (10, 0, 0, 10)


def test_releasing_a_hold_gives_its_stock_back(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = ledger.reserve([(shirt, 4)], at(10))

    released = ledger.run(Release(at=at(20), cause=CAUSE, reservation_id=reservation.id))

    assert released.value.status == ReservationStatus.RELEASED
    assert numbers(ledger.levels(shirt, at(20))) == (10, 0, 0, 10)


def test_releasing_a_confirmed_reservation_releases_its_commitment(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))

    ledger.run(Release(at=at(20), cause=CAUSE, reservation_id=reservation.id, note="cancelled"))

    assert ledger.reservation(reservation.id).status == ReservationStatus.RELEASED
    assert numbers(ledger.levels(shirt, at(20))) == (10, 0, 0, 10)


def test_releasing_twice_is_a_no_op(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = ledger.reserve([(shirt, 4)], at(10))
    ledger.run(Release(at=at(20), cause=CAUSE, reservation_id=reservation.id))
    ledger.reserve([(shirt, 3)], at(21))

    again = ledger.run(Release(at=at(30), cause=CAUSE, reservation_id=reservation.id))

    assert again.position is None
    assert again.value.status == ReservationStatus.RELEASED
    assert numbers(ledger.levels(shirt, at(30))) == (10, 3, 0, 7)


def test_a_fulfilled_reservation_cannot_be_released(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    ledger.run(
        Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=[(shirt, 4, None)])
    )

    with pytest.raises(InvalidState):
        ledger.run(Release(at=at(30), cause=CAUSE, reservation_id=reservation.id))

    assert ledger.reservation(reservation.id).status == ReservationStatus.FULFILLED


def test_releasing_a_partly_fulfilled_reservation_releases_only_what_is_still_open(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    ledger.run(
        Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=[(shirt, 1, None)])
    )

    ledger.run(Release(at=at(30), cause=CAUSE, reservation_id=reservation.id))

    assert numbers(ledger.levels(shirt, at(30))) == (9, 0, 0, 9)
    # The released units are on the line, as a cancel's are (an auditor's walkthrough).
    released = ledger.reservation(reservation.id)
    assert (released.status, released.lines[shirt].cancelled) == ("released", {"acme": 3})
    assert released.lines[shirt].open_by_supplier() == {}


def test_a_reservation_released_before_its_lines_counted_it_still_answers_what_it_let_go(
    ledger: Ledger, acme: str
) -> None:
    """Snapshots and view rows of reservations released before `Released` counted the
    units on their lines keep none there: read so, they answer them without a rebuild."""
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    ledger.run(
        Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=[(shirt, 1, None)])
    )
    ledger.run(Release(at=at(30), cause=CAUSE, reservation_id=reservation.id))
    released = ledger.reservation(reservation.id)
    as_stored_before = copy.deepcopy(released)
    as_stored_before.lines[shirt].cancelled.clear()

    assert released.cancelled_on(released.lines[shirt]) == {"acme": 3}
    assert as_stored_before.cancelled_on(as_stored_before.lines[shirt]) == {"acme": 3}
    # As the answers and the view's rows give it.
    [line] = reservation_fields(as_stored_before, at(40))["lines"]
    assert (line["cancelled"], line["allocations"][0]["cancelled"]) == (3, 3)
    assert reservation_out(as_stored_before, at(40)).lines[0].cancelled == 3
    columns = ReservationsProjection(ledger.app).columns(as_stored_before)
    assert json.loads(columns["lines"])[0]["cancelled"] == {"acme": 3}


def test_a_released_hold_counts_every_unit_it_held_cancelled(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = ledger.reserve([(shirt, 4)], at(10), ttl=60)
    cancel(ledger, reservation, at(15), [(shirt, 1, None)])

    ledger.run(Release(at=at(20), cause=CAUSE, reservation_id=reservation.id))

    assert ledger.reservation(reservation.id).lines[shirt].cancelled == {"acme": 4}
    assert numbers(ledger.levels(shirt, at(20))) == (10, 0, 0, 10)


# Fulfilling and returning ----------------------------------------------------------------


def test_a_partial_fulfilment_then_the_rest_fulfils_the_reservation(
    ledger: Ledger, acme: str
) -> None:
    shirt, socks = ledger.sku(), ledger.sku()
    ledger.stock(acme, {shirt: 10, socks: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4), (socks, 2)], at(10))

    partly = ledger.run(
        Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=[(shirt, 3, "acme")])
    ).value
    assert partly.status == ReservationStatus.PARTIALLY_FULFILLED
    assert numbers(ledger.levels(shirt, at(20))) == (7, 0, 1, 6)

    done = ledger.run(
        Fulfil(
            at=at(30),
            cause=CAUSE,
            reservation_id=reservation.id,
            lines=[(shirt, 1, None), (socks, 2, None)],
        )
    ).value
    assert done.status == ReservationStatus.FULFILLED
    assert done.lines[shirt].fulfilled == {"acme": 4}
    assert numbers(ledger.levels(shirt, at(30))) == (6, 0, 0, 6)
    assert numbers(ledger.levels(socks, at(30))) == (8, 0, 0, 8)


def test_a_held_reservation_cannot_be_fulfilled(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = ledger.reserve([(shirt, 4)], at(10))

    with pytest.raises(InvalidState):
        ledger.run(
            Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=[(shirt, 1, None)])
        )


def test_fulfilling_more_than_is_open_is_refused_and_changes_nothing(
    ledger: Ledger, acme: str
) -> None:
    shirt, socks = ledger.sku(), ledger.sku()
    ledger.stock(acme, {shirt: 10, socks: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4), (socks, 2)], at(10))
    written = ledger.events_written()

    with pytest.raises(ExceedsOpenQuantity) as refused:
        ledger.run(
            Fulfil(
                at=at(20),
                cause=CAUSE,
                reservation_id=reservation.id,
                lines=[(shirt, 2, None), (socks, 3, None)],
            )
        )

    assert refused.value.detail == {"sku": socks, "requested": 3, "remaining": 2}
    assert ledger.events_written() == written
    assert ledger.reservation(reservation.id).status == ReservationStatus.CONFIRMED
    assert numbers(ledger.levels(shirt, at(20))) == (10, 0, 4, 6)


def test_a_repeated_fulfil_request_key_changes_nothing(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    fulfil = Fulfil(
        at=at(20),
        cause=CAUSE,
        reservation_id=reservation.id,
        lines=[(shirt, 1, None)],
        request_key="ship-1",
    )
    ledger.run(fulfil)

    again = ledger.run(fulfil)

    assert again.position is None
    assert again.value.lines[shirt].fulfilled == {"acme": 1}
    assert numbers(ledger.levels(shirt, at(20))) == (9, 0, 3, 6)


def test_a_fulfil_key_used_again_with_another_request_is_refused(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))

    def fulfil(quantity: int) -> Fulfil:
        return Fulfil(
            at=at(20),
            cause=CAUSE,
            reservation_id=reservation.id,
            lines=[(shirt, quantity, None)],
            request_key="ship-1",
        )

    ledger.run(fulfil(1))
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.run(fulfil(3))
    assert ledger.queries.reservation(reservation.id).lines[shirt].fulfilled == {"acme": 1}


def test_a_key_is_not_mistaken_for_a_longer_key_it_begins(ledger: Ledger, acme: str) -> None:
    """A key is any printable text, `#` included: `ship-1` after `ship-1#box-2` is a key
    of its own, applied (it was refused as the other key's mismatch: a walkthrough)."""
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))

    def fulfil(quantity: int, key: str) -> Fulfil:
        return Fulfil(
            at=at(20),
            cause=CAUSE,
            reservation_id=reservation.id,
            lines=[(shirt, quantity, None)],
            request_key=key,
        )

    ledger.run(fulfil(1, "ship-1#box-2"))
    ledger.run(fulfil(2, "ship-1"))
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.run(fulfil(3, "ship-1"))
    assert ledger.queries.reservation(reservation.id).lines[shirt].fulfilled == {"acme": 3}


def test_a_return_and_a_fulfilment_may_share_a_key_without_one_hiding_the_other(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    ledger.run(
        Fulfil(
            at=at(20),
            cause=CAUSE,
            reservation_id=reservation.id,
            lines=[(shirt, 2, None)],
            request_key="K",
        )
    )
    returned = ledger.run(
        Return(
            at=at(30),
            cause=CAUSE,
            reservation_id=reservation.id,
            lines=[(shirt, 1, None)],
            restock=True,
            request_key="K",
        )
    )
    assert returned.position is not None
    assert returned.value.lines[shirt].returned == {"acme": 1}


@pytest.mark.parametrize(("restock", "available_after"), [(True, 8), (False, 6)])
def test_a_return_makes_units_available_again_only_when_restocked(
    ledger: Ledger, acme: str, restock: bool, available_after: int
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    ledger.run(
        Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=[(shirt, 4, None)])
    )
    assert ledger.available(shirt, at(30)) == 6

    returned = ledger.run(
        Return(
            at=at(30),
            cause=CAUSE,
            reservation_id=reservation.id,
            lines=[(shirt, 2, None)],
            restock=restock,
        )
    ).value

    assert returned.lines[shirt].returned == {"acme": 2}
    assert ledger.available(shirt, at(30)) == available_after


def test_more_units_than_were_shipped_cannot_come_back(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    ledger.run(
        Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=[(shirt, 2, None)])
    )

    with pytest.raises(ExceedsOpenQuantity):
        ledger.run(
            Return(
                at=at(30),
                cause=CAUSE,
                reservation_id=reservation.id,
                lines=[(shirt, 3, None)],
                restock=True,
            )
        )

    assert ledger.available(shirt, at(30)) == 6


# Expiry ------------------------------------------------------------------------------------


def test_a_hold_stops_counting_at_its_expiry_before_any_sweep(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    ledger.reserve([(shirt, 4)], at(10), ttl=60)

    assert ledger.available(shirt, at(69.9)) == 6
    assert ledger.available(shirt, at(70)) == 10
    assert ledger.reserve([(shirt, 10)], at(70)).lines[shirt].allocations == {"acme": 10}


def test_the_expiry_sweep_expires_only_holds_past_their_time(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    short = ledger.reserve([(shirt, 1)], at(10), ttl=60)
    long = ledger.reserve([(shirt, 1)], at(10), ttl=600)
    kept = confirmed(ledger, [(shirt, 1)], at(10))
    gone = ledger.reserve([(shirt, 1)], at(10), ttl=60)
    ledger.run(Release(at=at(20), cause=CAUSE, reservation_id=gone.id))
    ids = [short.id, long.id, kept.id, gone.id]

    swept = ledger.run(ExpireHolds(at=at(120), cause=CAUSE, reservation_ids=ids))
    again = ledger.run(ExpireHolds(at=at(130), cause=CAUSE, reservation_ids=ids))

    assert swept.value == [short.id]
    assert (again.value, again.position) == ([], None)
    statuses = [ledger.reservation(rid).status for rid in ids]
    assert statuses == ["expired", "held", "confirmed", "released"]
    assert numbers(ledger.levels(shirt, at(120))) == (10, 1, 1, 8)


# Keeping a hold longer ------------------------------------------------------------------


def extend(ledger: Ledger, reservation: Reservation, when: datetime, ttl: int) -> Outcome[Any]:
    return ledger.run(Extend(at=when, cause=CAUSE, reservation_id=reservation.id, ttl_seconds=ttl))


def test_an_extended_hold_counts_until_its_new_expiry_and_the_sweep_waits_for_it(
    ledger: Ledger, acme: str
) -> None:
    shirt, socks = ledger.sku(), ledger.sku()
    ledger.stock(acme, {shirt: 10, socks: 5}, at(0))
    reservation = ledger.reserve([(shirt, 4), (socks, 2)], at(10), ttl=60)  # until at(70)

    extended = extend(ledger, reservation, at(50), 300)  # until at(350)

    assert extended.value.expires_at == at(350)
    assert extended.position is not None
    assert ledger.reservation(reservation.id).expires_at == at(350)
    for when in (at(70), at(349.9)):
        assert numbers(ledger.levels(shirt, when)) == (10, 4, 0, 6)
        assert numbers(ledger.levels(socks, when)) == (5, 2, 0, 3)
    assert ledger.available(shirt, at(350)) == 10
    swept = ledger.run(ExpireHolds(at=at(120), cause=CAUSE, reservation_ids=[reservation.id]))
    assert swept.value == []
    # Another order cannot take the units the extended hold keeps.
    with pytest.raises(InsufficientStock):
        ledger.reserve([(shirt, 7)], at(100))
    # Confirmed later, the hold becomes a commitment as any other, moved bucket and all.
    ledger.run(Confirm(at=at(200), cause=CAUSE, reservation_id=reservation.id))
    assert numbers(ledger.levels(shirt, at(400))) == (10, 0, 4, 6)


def test_an_extension_never_shortens_a_hold_and_sent_again_changes_nothing(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = ledger.reserve([(shirt, 4)], at(10), ttl=600)  # until at(610)
    written = ledger.events_written()

    shorter = extend(ledger, reservation, at(20), 60)

    assert (shorter.value.expires_at, shorter.position) == (at(610), None)
    assert ledger.events_written() == written
    assert numbers(ledger.levels(shirt, at(609))) == (10, 4, 0, 6)


def test_an_order_sent_again_after_its_hold_was_extended_is_answered_as_first_placed(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    command = ledger.reserve_command([(shirt, 4)], at(10), key="kept", ttl=60)
    placed: Reserved = ledger.run(command).value
    extend(ledger, placed.reservation, at(20), 600)

    again: Reserved = ledger.run(replace(command, at=at(30))).value

    assert again.replayed
    assert again.reservation.expires_at == at(70)  # as the first answer said
    assert ledger.reservation(placed.reservation.id).expires_at == at(620)


def test_a_hold_that_expired_or_is_no_hold_cannot_be_extended(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    lapsed = ledger.reserve([(shirt, 1)], at(10), ttl=60)
    kept = confirmed(ledger, [(shirt, 1)], at(10))
    gone = ledger.reserve([(shirt, 1)], at(10))
    ledger.run(Release(at=at(20), cause=CAUSE, reservation_id=gone.id))
    written = ledger.events_written()

    with pytest.raises(ReservationExpired):
        extend(ledger, lapsed, at(70), 600)
    for reservation in (kept, gone):
        with pytest.raises(InvalidState):
            extend(ledger, reservation, at(30), 600)

    assert ledger.events_written() == written
    assert ledger.available(shirt, at(70)) == 9  # the commitment alone


def test_another_oms_client_cannot_extend_a_reservation(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = ledger.reserve([(shirt, 1)], at(10), ttl=60)

    with pytest.raises(ReservationNotFound):
        ledger.run(
            Extend(
                at=at(20),
                cause=CAUSE,
                reservation_id=reservation.id,
                ttl_seconds=600,
                client="other-oms",
            )
        )
    assert ledger.reservation(reservation.id).expires_at == at(70)


# Cancelling lines -------------------------------------------------------------------------


def cancel(
    ledger: Ledger,
    reservation: Reservation,
    when: datetime,
    lines: list[tuple[str, int, str | None]],
    key: str | None = None,
) -> Outcome[Any]:
    return ledger.run(
        Cancel(at=when, cause=CAUSE, reservation_id=reservation.id, lines=lines, request_key=key)
    )


def test_cancelling_part_of_a_hold_frees_those_units_and_the_rest_holds_until_it_expires(
    ledger: Ledger, acme: str
) -> None:
    shirt, socks = ledger.sku(), ledger.sku()
    ledger.stock(acme, {shirt: 10, socks: 5}, at(0))
    reservation = ledger.reserve([(shirt, 4), (socks, 2)], at(10), ttl=60)  # until at(70)

    cancelled = cancel(ledger, reservation, at(20), [(shirt, 1, None), (socks, 2, acme)])

    kept = ledger.reservation(reservation.id)
    assert kept.status == ReservationStatus.HELD
    assert (kept.lines[shirt].cancelled, kept.lines[socks].cancelled) == ({acme: 1}, {acme: 2})
    assert cancelled.position is not None
    assert numbers(ledger.levels(shirt, at(30))) == (10, 3, 0, 7)
    assert numbers(ledger.levels(socks, at(30))) == (5, 0, 0, 5)
    # The sweep expires what is left of the hold, and nothing twice.
    swept = ledger.run(ExpireHolds(at=at(70), cause=CAUSE, reservation_ids=[reservation.id]))
    assert swept.value == [reservation.id]
    assert numbers(ledger.levels(shirt, at(70))) == (10, 0, 0, 10)
    assert numbers(ledger.levels(socks, at(70))) == (5, 0, 0, 5)


def test_a_hold_cancelled_in_part_is_confirmed_extended_and_released_for_the_rest_only(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    confirmed_later = ledger.reserve([(shirt, 4)], at(10), ttl=60)
    extended_later = ledger.reserve([(shirt, 3)], at(10), ttl=60)
    cancel(ledger, confirmed_later, at(20), [(shirt, 3, None)])
    cancel(ledger, extended_later, at(20), [(shirt, 1, None)])

    ledger.run(Confirm(at=at(30), cause=CAUSE, reservation_id=confirmed_later.id))
    extend(ledger, extended_later, at(30), 300)  # until at(330)
    assert numbers(ledger.levels(shirt, at(100))) == (10, 2, 1, 7)
    ledger.run(Release(at=at(110), cause=CAUSE, reservation_id=extended_later.id))
    ledger.run(Release(at=at(110), cause=CAUSE, reservation_id=confirmed_later.id))

    assert numbers(ledger.levels(shirt, at(400))) == (10, 0, 0, 10)


def test_cancelling_what_a_commitment_has_not_shipped_closes_it_when_nothing_is_left(
    ledger: Ledger, acme: str
) -> None:
    shirt, socks = ledger.sku(), ledger.sku()
    ledger.stock(acme, {shirt: 10, socks: 5}, at(0))
    reservation = confirmed(ledger, [(shirt, 4), (socks, 2)], at(10))
    ledger.run(
        Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=[(shirt, 3, None)])
    )

    cancel(ledger, reservation, at(30), [(shirt, 1, None)])  # a short pick
    mid = ledger.reservation(reservation.id).status
    shirt_mid = numbers(ledger.levels(shirt, at(30)))
    cancel(ledger, reservation, at(40), [(socks, 2, None)])  # the customer dropped the socks
    done = ledger.reservation(reservation.id)

    assert mid == ReservationStatus.PARTIALLY_FULFILLED
    assert shirt_mid == (7, 0, 0, 7)  # 3 shipped, the fourth no longer committed
    assert numbers(ledger.levels(socks, at(40))) == (5, 0, 0, 5)
    assert (done.status, done.closed_at) == (ReservationStatus.FULFILLED, at(40))
    with pytest.raises(InvalidState):
        cancel(ledger, reservation, at(50), [(shirt, 1, None)])


def test_many_lines_of_one_sku_and_supplier_are_one_movement(ledger: Ledger, acme: str) -> None:
    """A walkthrough: a cancel of 1,000 lines of one unit wrote 1,000 movements, and its
    stock event as many allocations."""
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = ledger.reserve([(shirt, 5)], at(10), ttl=60)

    cancel(ledger, reservation, at(20), [(shirt, 1, None)] * 3)

    [*_, cancelled] = ledger.app.events.get(reservation.id)
    [*_, released] = ledger.app.events.get(StockItem.id_for(shirt))
    assert isinstance(cancelled, Reservation.LinesCancelled)
    assert cancelled.movements == [{"sku": shirt, "supplier_id": acme, "quantity": 3}]
    assert isinstance(released, StockItem.HoldReleased)
    assert released.allocations == [{"supplier_id": acme, "quantity": 3}]


def test_cancelling_every_unit_of_a_hold_releases_it(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = ledger.reserve([(shirt, 2)], at(10), ttl=60)

    cancel(ledger, reservation, at(20), [(shirt, 2, None)])

    released = ledger.reservation(reservation.id)
    assert (released.status, released.closed_at) == (ReservationStatus.RELEASED, at(20))
    assert numbers(ledger.levels(shirt, at(20))) == (10, 0, 0, 10)
    swept = ledger.run(ExpireHolds(at=at(70), cause=CAUSE, reservation_ids=[reservation.id]))
    assert swept.value == []


def test_a_cancel_sent_again_under_its_key_changes_nothing_and_a_bad_one_changes_nothing(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    lapsed = ledger.reserve([(shirt, 1)], at(10), ttl=60)
    first = cancel(ledger, reservation, at(20), [(shirt, 1, None)], key="c-1")
    written = ledger.events_written()

    again = cancel(ledger, reservation, at(25), [(shirt, 1, None)], key="c-1")
    with pytest.raises(IdempotencyKeyMismatch):
        cancel(ledger, reservation, at(25), [(shirt, 2, None)], key="c-1")
    with pytest.raises(ExceedsOpenQuantity):
        cancel(ledger, reservation, at(25), [(shirt, 4, None)])
    with pytest.raises(SupplierNotOnLine):
        cancel(ledger, reservation, at(25), [(shirt, 1, "someone-else")])
    with pytest.raises(ReservationExpired):
        cancel(ledger, lapsed, at(70), [(shirt, 1, None)])

    assert first.value.lines[shirt].cancelled == {acme: 1}
    assert again.position is None
    assert ledger.events_written() == written
    assert numbers(ledger.levels(shirt, at(30))) == (10, 1, 3, 6)  # the lapsed hold till at(70)


def test_a_net_supplier_s_cancelled_commitment_stops_counting_against_it(
    ledger: Ledger, netco: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(netco, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    before = numbers(ledger.levels(shirt, at(10)))

    cancel(ledger, reservation, at(20), [(shirt, 3, None)])

    # Its report (10) leaves our open orders out: the 4 committed were taken off it until
    # its next report; 3 of them cancelled are back.
    assert before == (6, 0, 0, 6)
    assert numbers(ledger.levels(shirt, at(20))) == (9, 0, 0, 9)


# Stock reports ------------------------------------------------------------------------------


def test_bad_records_are_refused_one_by_one_with_reasons_while_the_rest_applies(
    ledger: Ledger, acme: str
) -> None:
    shirt, socks, cap = ledger.sku(), ledger.sku(), ledger.sku()
    ledger.run(
        PutMappings(
            at=at(0),
            cause=CAUSE,
            supplier_id=acme,
            mappings=[MappingSpec("AC-SHIRT", shirt), MappingSpec("AC-SOCKS", socks)],
        )
    )
    observations = [
        Observation(index=0, supplier_sku="AC-SHIRT", quantity=7, observed_at=at(10)),
        Observation(index=1, supplier_sku="AC-UNKNOWN", quantity=3, observed_at=at(10)),
        Observation(index=2, supplier_sku="AC-SOCKS", quantity=-1, observed_at=at(10)),
        Observation(index=3, sku=cap, quantity=4, observed_at=at(3600)),
        Observation(index=4, sku=cap, quantity=5, observed_at=at(10)),
        Observation(index=5, sku=cap, quantity=6, observed_at=at(10)),
        Observation(index=6, sku=random_sku("NOPE"), quantity=1, observed_at=at(10)),
    ]

    outcome = ledger.report(acme, observations, at(20)).value

    reasons = {rejection.index: rejection.reason for rejection in outcome.rejected}
    assert reasons == {
        1: "unmapped_supplier_sku",
        2: "negative_quantity",
        3: "observed_at_in_future",
        4: "conflicting_duplicate",
        5: "conflicting_duplicate",
        6: "unknown_sku",
    }
    assert [rejection.index for rejection in outcome.rejected] == [1, 2, 3, 4, 5, 6]
    assert outcome.rejected[0].record == {
        "supplier_sku": "AC-UNKNOWN",
        "quantity": 3,
        "observed_at": at(10).isoformat(),
    }
    assert (outcome.rows, outcome.applied, outcome.unchanged, outcome.late) == (7, 1, 0, 0)
    assert ledger.levels(shirt, at(20)).on_hand == 7
    assert ledger.levels(socks, at(20)).on_hand == 0
    assert ledger.levels(cap, at(20)).on_hand == 0


def test_a_report_a_little_ahead_of_our_clock_is_accepted(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()

    outcome = ledger.report(
        acme, [Observation(index=0, sku=shirt, quantity=4, observed_at=at(299))], at(0)
    ).value

    assert (outcome.applied, outcome.rejected) == (1, [])


def test_an_older_record_for_a_sku_in_the_same_delivery_is_superseded_by_the_newest(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    observations = [
        Observation(index=0, sku=shirt, quantity=5, observed_at=at(10)),
        Observation(index=1, sku=shirt, quantity=8, observed_at=at(12)),
        Observation(index=2, sku=shirt, quantity=6, observed_at=at(11)),
    ]

    outcome = ledger.report(acme, observations, at(20)).value

    assert (outcome.applied, outcome.late, outcome.rejected) == (1, 2, [])
    assert ledger.levels(shirt, at(20)).on_hand == 8


def test_a_newer_record_for_a_sku_survives_an_older_conflicting_pair(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    observations = [
        Observation(index=0, sku=shirt, quantity=5, observed_at=at(10)),
        Observation(index=1, sku=shirt, quantity=6, observed_at=at(10)),
        Observation(index=2, sku=shirt, quantity=8, observed_at=at(12)),
    ]

    outcome = ledger.report(acme, observations, at(20)).value

    assert outcome.rejected == []
    assert (outcome.applied, outcome.late) == (1, 2)
    assert ledger.levels(shirt, at(20)).on_hand == 8


def test_an_exact_repeat_within_a_delivery_is_applied_once(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    observations = [
        Observation(index=0, sku=shirt, quantity=5, observed_at=at(10)),
        Observation(index=1, sku=shirt, quantity=5, observed_at=at(10)),
    ]

    outcome = ledger.report(acme, observations, at(20)).value

    assert (outcome.applied, outcome.unchanged, outcome.rejected) == (1, 1, [])
    assert ledger.levels(shirt, at(20)).on_hand == 5
    assert len(list(ledger.app.events.get(StockItem.id_for(shirt)))) == 2  # Registered, Observed


def test_a_conflicting_pair_is_refused_whatever_the_order_of_the_records(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    observations = [
        Observation(index=0, sku=shirt, quantity=8, observed_at=at(12)),
        Observation(index=1, sku=shirt, quantity=5, observed_at=at(12)),
        Observation(index=2, sku=shirt, quantity=6, observed_at=at(10)),
    ]

    outcome = ledger.report(acme, observations, at(20)).value

    rejected = {rejection.index: rejection.reason for rejection in outcome.rejected}
    assert rejected == {0: "conflicting_duplicate", 1: "conflicting_duplicate"}
    assert outcome.applied == 0
    assert ledger.levels(shirt, at(20)).on_hand == 0


def test_a_delivery_seen_before_with_the_same_content_changes_nothing(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    observations = [Observation(index=0, sku=shirt, quantity=5, observed_at=at(10))]
    first = ledger.report(acme, observations, at(20), delivery_id="batch-9", content_hash="h1")
    written = ledger.events_written()

    again = ledger.report(acme, observations, at(30), delivery_id="batch-9", content_hash="h1")

    assert again.position is None
    assert again.value == first.value
    assert ledger.events_written() == written


def test_a_delivery_id_reused_with_other_content_is_refused(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.report(
        acme,
        [Observation(index=0, sku=shirt, quantity=5, observed_at=at(10))],
        at(20),
        delivery_id="batch-9",
        content_hash="h1",
    )
    written = ledger.events_written()

    with pytest.raises(DeliveryConflict):
        ledger.report(
            acme,
            [Observation(index=0, sku=shirt, quantity=9, observed_at=at(25))],
            at(30),
            delivery_id="batch-9",
            content_hash="h2",
        )

    assert ledger.events_written() == written
    assert ledger.levels(shirt, at(30)).on_hand == 5


def test_a_mapping_turns_supplier_units_into_base_units(ledger: Ledger, acme: str) -> None:
    shirt = ledger.sku()
    ledger.run(
        PutMappings(
            at=at(0),
            cause=CAUSE,
            supplier_id=acme,
            mappings=[MappingSpec("AC-SHIRT-DOZEN", shirt, units_per_supplier_unit=12)],
        )
    )

    ledger.report(
        acme,
        [Observation(index=0, supplier_sku="AC-SHIRT-DOZEN", quantity=3, observed_at=at(10))],
        at(20),
    )

    assert ledger.levels(shirt, at(20)).on_hand == 36
    assert ledger.reserve([(shirt, 36)], at(20)).lines[shirt].allocations == {"acme": 36}


def remap(ledger: Ledger, supplier_id: str, when: datetime, **moves: str) -> Outcome[Any]:
    mappings = [MappingSpec(supplier_sku, sku) for supplier_sku, sku in moves.items()]
    return ledger.run(PutMappings(at=when, cause=CAUSE, supplier_id=supplier_id, mappings=mappings))


def claiming(
    supplier_id: str, when: datetime, supplier_sku: str, sku: str, still: tuple[str, str]
) -> PutMappings:
    """A PUT moving one supplier SKU to `sku`, with the API's word that another supplier
    SKU still maps to a SKU (`still`: that SKU and the supplier SKU)."""
    return PutMappings(
        at=when,
        cause=CAUSE,
        supplier_id=supplier_id,
        mappings=[MappingSpec(supplier_sku, sku)],
        kept=frozenset({still}),
    )


def reported(
    ledger: Ledger, supplier_id: str, supplier_sku: str, quantity: int, when: float
) -> DeliveryOutcome:
    """One record of the supplier's SKU, observed and received at `when` (seconds)."""
    observation = Observation(
        index=0, supplier_sku=supplier_sku, quantity=quantity, observed_at=at(when)
    )
    return ledger.report(supplier_id, [observation], at(when)).value


def mapped_to(ledger: Ledger, supplier_id: str, supplier_sku: str) -> str:
    mapping = ledger.app.repository.get(SkuMapping.id_for(supplier_id, supplier_sku))
    return str(mapping.sku)


def test_a_remap_off_a_sku_with_orders_open_against_the_supplier_is_refused_until_they_close(
    ledger: Ledger, acme: str
) -> None:
    """A review: the remap retired the level on the old SKU while its orders stayed there,
    and the supplier's next report, landing whole on the new SKU, sold their units again.
    Refused, naming what is open, until the orders are shipped and the supplier has
    reported since (or released, or their holds run out)."""
    old, new, other, elsewhere = ledger.sku(), ledger.sku(), ledger.sku(), ledger.sku()
    remap(ledger, acme, at(0), **{"AC-1": old, "AC-2": other})
    ledger.report(
        acme,
        [
            Observation(index=0, supplier_sku="AC-1", quantity=10, observed_at=at(1)),
            Observation(index=1, supplier_sku="AC-2", quantity=5, observed_at=at(1)),
        ],
        at(1),
    )
    held = ledger.reserve([(old, 4)], at(10), ttl=60)

    refusals = []
    for when in (at(20), at(30), at(40)):
        if when == at(30):
            ledger.run(Confirm(at=when, cause=CAUSE, reservation_id=held.id))
        if when == at(40):
            ledger.run(Fulfil(at=when, cause=CAUSE, reservation_id=held.id, lines=[(old, 4, None)]))
        written = ledger.events_written()
        with pytest.raises(OrdersOpenOnRemap) as refused:
            remap(ledger, acme, when, **{"AC-1": new, "AC-2": elsewhere})
        refusals.append(refused.value.blocked)
        assert ledger.events_written() == written  # neither mapping moved

    assert refusals == [
        [OpenAgainstSupplier("AC-1", old, held=4, committed=0, awaiting_report=0)],
        [OpenAgainstSupplier("AC-1", old, held=0, committed=4, awaiting_report=0)],
        [OpenAgainstSupplier("AC-1", old, held=0, committed=0, awaiting_report=4)],
    ]
    assert refused.value.detail["blocked"][0]["awaiting_report"] == 4  # as the API shows it
    assert (mapped_to(ledger, acme, "AC-1"), mapped_to(ledger, acme, "AC-2")) == (old, other)

    # The supplier reports the shipment: the remap goes, and the new SKU takes the next
    # report whole, the shipped units gone from it.
    reported(ledger, acme, "AC-1", 6, 50)
    assert remap(ledger, acme, at(60), **{"AC-1": new}).value.updated == 1
    reported(ledger, acme, "AC-1", 6, 70)
    assert (ledger.available(old, at(70)), ledger.available(new, at(70))) == (0, 6)


def test_a_remap_waits_for_a_hold_to_run_out_and_a_net_supplier_s_commitments_too(
    ledger: Ledger, acme: str, netco: str
) -> None:
    old, new, net_old, net_new = ledger.sku(), ledger.sku(), ledger.sku(), ledger.sku()
    for supplier_id, sku in ((acme, old), (netco, net_old)):
        remap(ledger, supplier_id, at(0), X=sku)
        reported(ledger, supplier_id, "X", 10, 1)
    ledger.reserve([(old, 2)], at(10), ttl=60)
    confirmed(ledger, [(net_old, 3)], at(10))

    with pytest.raises(OrdersOpenOnRemap):
        remap(ledger, acme, at(69), X=new)
    with pytest.raises(OrdersOpenOnRemap) as refused:
        remap(ledger, netco, at(200), X=net_new)

    assert remap(ledger, acme, at(70), X=new).value.updated == 1  # the hold ran out at 70
    assert refused.value.blocked == [
        # Its report made before the commitment still holds the 3 units: counted open too.
        OpenAgainstSupplier("X", net_old, held=0, committed=3, awaiting_report=3)
    ]


def test_a_sku_the_api_says_another_supplier_sku_keeps_is_kept_only_if_the_ledger_agrees(
    ledger: Ledger, acme: str
) -> None:
    """A review: two PUTs at once each found the other supplier SKU still on the old SKU
    in the mappings view, so neither retired its level: 10 units stood there with no
    mapping feeding them, beside the new SKUs' reports. The ledger checks the claim."""
    old, one, two = ledger.sku(), ledger.sku(), ledger.sku()
    remap(ledger, acme, at(0), **{"K-1": old, "K-2": old})
    ledger.stock(acme, {old: 10}, at(1))

    first = claiming(acme, at(10), "K-2", two, (old, "K-1"))  # true
    assert ledger.run(first).value.updated == 1
    kept_after_first = ledger.levels(old, at(10)).on_hand
    # As a view behind the first PUT still says.
    second = claiming(acme, at(20), "K-1", one, (old, "K-2"))
    assert ledger.run(second).value.updated == 1

    assert kept_after_first == 0  # K-1 still maps there, but the 10 may be K-2's report
    assert ledger.levels(old, at(20)).on_hand == 0


def remaps_recorded(ledger: Ledger, sku: str) -> list[tuple[str, str, str]]:
    """The remaps off `sku` its history shows: supplier SKU, where to, what the level did."""
    item_id = StockItem.id_for(sku)
    return [
        (e.supplier_sku, e.to_sku, e.level)
        for e in ledger.app.repository.event_store.get(item_id)
        if isinstance(e, StockItem.SupplierSkuRemapped)
    ]


def test_a_sku_s_history_says_where_each_supplier_sku_mapped_off_it_went(
    ledger: Ledger, acme: str
) -> None:
    """An auditor's walkthrough: the old SKU's history showed the remap's 0 and no more;
    where the stock went was only in the mappings' history. Now each move off a SKU is
    there, with what became of the supplier's level: moved with it, or retired (0 until
    the next report of it, where it went and, for another supplier SKU still there,
    where it stays). A level moved and corrected at once moves again."""
    old, one, two, three = (ledger.sku() for _ in range(4))
    remap(ledger, acme, at(0), **{"K-1": old, "K-2": old, "K-3": three})
    ledger.stock(acme, {old: 10, three: 4}, at(1))

    # K-2 still maps to the old SKU, as the API finds it: the 10 may be K-1's report.
    still = claiming(acme, at(10), "K-1", one, (old, "K-2"))
    ledger.run(still)
    remap(ledger, acme, at(20), **{"K-3": two})  # K-3's alone: it goes with it
    remap(ledger, acme, at(30), **{"K-3": one})  # and again, corrected at once

    assert remaps_recorded(ledger, old) == [("K-1", one, "retired")]
    assert remaps_recorded(ledger, three) == [("K-3", two, "moved")]
    assert remaps_recorded(ledger, two) == [("K-3", one, "moved")]
    assert [ledger.levels(sku, at(30)).on_hand for sku in (old, one, two, three)] == [0, 4, 0, 0]


@pytest.mark.parametrize("case", ["both leave in one PUT", "kept for another", "view behind"])
def test_a_level_two_supplier_skus_share_is_never_sold_on_two_skus_after_a_remap(
    ledger: Ledger, acme: str, case: str
) -> None:
    """A fuzzer: one level per SKU and supplier does not say which supplier SKU reported
    it. Moved with the first of two supplier SKUs leaving in one PUT, it stood beside the
    other's next report (52 sold of 26); kept on the old SKU for a supplier SKU that never
    reported, it was the leaving one's own report, sold again on its new SKU (28 of 14);
    moved where a view behind missed the other supplier SKU, it stood beside that one's
    next report (42 of 21)."""
    old, one, two = ledger.sku(), ledger.sku(), ledger.sku()
    remap(ledger, acme, at(0), **{"G-0": old, "G-1": old})
    reported(ledger, acme, "G-1", 26, 10)
    if case == "both leave in one PUT":
        remap(ledger, acme, at(20), **{"G-0": one, "G-1": two})
        reporter = "G-1"
    else:
        put = PutMappings(
            at=at(20),
            cause=CAUSE,
            supplier_id=acme,
            mappings=[MappingSpec("G-1", one)],
            kept=frozenset({(old, "G-0")}) if case == "kept for another" else frozenset(),
            view_complete=case != "view behind",
        )
        ledger.run(put)
        reporter = "G-1" if case == "kept for another" else "G-0"
    reported(ledger, acme, reporter, 26, 30)

    sellable = sum(ledger.available(sku, at(30)) for sku in (old, one, two))
    assert sellable == 26


def test_two_remaps_off_one_sku_at_once_conflict_there_and_the_later_is_decided_again(
    ledger: Ledger, acme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: two mapping PUTs of one supplier at once, in two processes, each moving
    one of the two supplier SKUs off a SKU, each found the other still there (in the
    view, and in the ledger's mappings as it had loaded them), so each kept the level for
    the other: 10 units stood there fed by no mapping, sold beside the supplier's next
    reports on the new SKUs. Each such move writes on the SKU it leaves, so the two
    conflict there, and the later is decided again on what the first did. Two writers on
    one store stand for the processes."""
    old, one, two = ledger.sku(), ledger.sku(), ledger.sku()
    remap(ledger, acme, at(0), **{"K-1": old, "K-2": old})
    ledger.stock(acme, {old: 10}, at(1))
    other = LedgerWriter(ledger.app)
    save = ledger.app.save

    def first_saves_first(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(ledger.app, "save", save)
        # This PUT is decided; the first one, decided on the same state, saves before it.
        first = claiming(acme, at(10), "K-1", one, (old, "K-2"))
        assert ledger.run(first).value.updated == 1
        return save(*args, **kwargs)

    monkeypatch.setattr(ledger.app, "save", first_saves_first)
    # As the API found it, before the first PUT.
    later = claiming(acme, at(10), "K-2", two, (old, "K-1"))
    assert other.apply(later).value.updated == 1
    monkeypatch.undo()

    # The first retires it as K-2 still maps there (it may be K-1's report); the later,
    # decided again, finds it the first one's 0 (each used to keep it for the other:
    # 10 fed by no mapping).
    assert [ledger.levels(sku, at(20)).on_hand for sku in (old, one, two)] == [0, 0, 0]
    assert remaps_recorded(ledger, old) == [("K-1", one, "retired"), ("K-2", two, "retired")]


@pytest.mark.parametrize("between", ["old SKU", "claimed mapping"])
def test_a_remap_that_saves_while_another_reads_its_claims_is_seen_or_collides(
    ledger: Ledger, acme: str, between: str
) -> None:
    """A review: the later PUT read K-1's mapping (still on the old SKU), then the old
    SKU, which by then held the first PUT's event: it appended after it, collided with
    nothing, and kept the level for K-1, gone since. The old SKU is read first now: a PUT
    saved before it is seen in K-1's mapping, one saved after it collides there."""
    old, one, two = ledger.sku(), ledger.sku(), ledger.sku()
    remap(ledger, acme, at(0), **{"K-1": old, "K-2": old})
    ledger.stock(acme, {old: 10}, at(1))
    other = LedgerWriter(ledger.app)
    target = StockItem.id_for(old) if between == "old SKU" else SkuMapping.id_for(acme, "K-1")
    load = other.hot.load
    saved: list[int] = []

    def first_saves_just_before(aggregate_id: UUID) -> Any:
        if aggregate_id == target and not saved:
            first = claiming(acme, at(10), "K-1", one, (old, "K-2"))
            saved.append(ledger.run(first).value.updated)
        return load(aggregate_id)

    other.hot.load = first_saves_just_before  # type: ignore[method-assign]
    later = claiming(acme, at(10), "K-2", two, (old, "K-1"))
    assert other.apply(later).value.updated == 1

    assert saved == [1]
    # The first retires it as K-2 still maps there (it may be K-1's report); the later,
    # decided again, finds it the first one's 0 (each used to keep it for the other:
    # 10 fed by no mapping).
    assert [ledger.levels(sku, at(20)).on_hand for sku in (old, one, two)] == [0, 0, 0]
    assert remaps_recorded(ledger, old) == [("K-1", one, "retired"), ("K-2", two, "retired")]


def test_a_report_naming_no_unit_made_before_its_mapping_s_factor_changed_is_refused(
    ledger: Ledger, acme: str
) -> None:
    """A fuzzer: 9 pieces reported before the mapping changed to cases of 12, delivered
    after the change, counted 108 (read in the new factor, as a correction). Refused now,
    with its reason; a report naming its unit is taken at its word, and one made after the
    change counts the new factor."""
    sku = ledger.sku()
    remap(ledger, acme, at(0), **{"P-1": sku})
    reported(ledger, acme, "P-1", 100, 10)
    ledger.run(
        PutMappings(
            at=at(60), cause=CAUSE, supplier_id=acme, mappings=[MappingSpec("P-1", sku, 12)]
        )
    )

    def delivered(quantity: int, when: float, unit: str | None = None) -> DeliveryOutcome:
        observation = Observation(
            index=0,
            supplier_sku="P-1",
            quantity=quantity,
            observed_at=at(when),
            unit=unit,
            factor=None if unit is None else 1,  # a base unit, as the feeds' reading says
        )
        return ledger.report(acme, [observation], at(70)).value

    before = delivered(9, 30)
    stood = ledger.levels(sku, at(70)).on_hand
    in_pieces = delivered(90, 40, unit="EA")
    counted_in_pieces = ledger.levels(sku, at(70)).on_hand
    after = delivered(9, 61)

    assert [(r.index, r.reason) for r in before.rejected] == [(0, "made_before_units_changed")]
    assert stood == 100
    assert (in_pieces.applied, counted_in_pieces) == (1, 90)
    assert after.applied == 1
    assert ledger.levels(sku, at(70)).on_hand == 108


def test_a_report_in_the_mapping_s_own_unit_made_before_its_factor_changed_is_refused(
    ledger: Ledger, acme: str
) -> None:
    """A review: a case of 12 became one of 24; 9 cases reported before, delivered after,
    counted 216. A unit the mapping came to name only with the change was counted by no
    factor of it before, and is taken at its word."""
    sku, other = ledger.sku(), ledger.sku()
    specs = [MappingSpec("C-1", sku, 12, unit="CA"), MappingSpec("C-2", other, 1)]
    ledger.run(PutMappings(at=at(0), cause=CAUSE, supplier_id=acme, mappings=specs))
    changed = [MappingSpec("C-1", sku, 24, unit="CA"), MappingSpec("C-2", other, 6, unit="PK")]
    ledger.run(PutMappings(at=at(60), cause=CAUSE, supplier_id=acme, mappings=changed))

    def delivered(supplier_sku: str, quantity: int, unit: str, when: float) -> DeliveryOutcome:
        observation = Observation(
            index=0, supplier_sku=supplier_sku, quantity=quantity, observed_at=at(when), unit=unit
        )
        return ledger.report(acme, [observation], at(70)).value

    before = delivered("C-1", 9, "ca", 30)
    newly_named = delivered("C-2", 2, "PK", 30)
    after = delivered("C-1", 9, "CA", 61)

    assert [(r.index, r.reason) for r in before.rejected] == [(0, "made_before_units_changed")]
    assert (newly_named.applied, ledger.levels(other, at(70)).on_hand) == (1, 12)
    assert (after.applied, ledger.levels(sku, at(70)).on_hand) == (1, 216)


def test_a_report_older_than_one_seen_before_a_remap_is_late_on_the_sku_it_moved_to(
    ledger: Ledger, acme: str
) -> None:
    """A review: a report of the supplier SKU older than one the ledger had already seen,
    delivered after the remap (a retry, a late page), landed whole on the new SKU, which
    had no report of the supplier to compare it with: 10 units sold where the supplier had
    6. A report made between the newest seen and the remap is the newest the supplier has
    said, and applies (a review of the first fix, which took a day's pull feed for late);
    so does any report of a supplier SKU never reported before the remap."""
    old, new, never_old, never_new = (ledger.sku() for _ in range(4))
    remap(ledger, acme, at(0), **{"AC-1": old, "AC-2": never_old})
    reported(ledger, acme, "AC-1", 6, 30)
    remap(ledger, acme, at(60), **{"AC-1": new, "AC-2": never_new})

    def delivered(*observations: tuple[str, int, int]) -> DeliveryOutcome:
        records = [
            Observation(index=i, supplier_sku=s, quantity=q, observed_at=at(t))
            for i, (s, q, t) in enumerate(observations)
        ]
        return ledger.report(acme, records, at(70)).value

    older = delivered(("AC-1", 10, 15))
    after_older = ledger.available(new, at(70))
    newer = delivered(("AC-1", 5, 50), ("AC-2", 4, 45))
    stale_on_old = ledger.report(
        acme, [Observation(index=0, sku=old, quantity=10, observed_at=at(50))], at(70)
    ).value

    assert (older.applied, older.late, after_older) == (0, 1, 6)  # the level moved with it
    assert (newer.applied, newer.late) == (2, 0)
    assert (stale_on_old.applied, stale_on_old.late) == (0, 1)
    assert [ledger.available(sku, at(70)) for sku in (old, new, never_old, never_new)] == [
        0,
        5,
        0,
        4,
    ]


def test_a_remap_moves_the_level_to_the_new_sku_where_it_is_the_supplier_sku_s_alone(
    ledger: Ledger,
) -> None:
    """An operator's walkthrough: the new SKU showed out of stock until the supplier's next
    report, a day for a daily file. The level moves, as of when it was reported (so it
    ages from then), with its incoming stock; not where the remap changes the units it
    counts in, nor in a swap (each SKU's level came from the other), which start from 0."""
    acme = ledger.supplier("acme", stale_after_seconds=100)
    skus = {name: ledger.sku() for name in ("old", "new", "scaled", "scaled_new", "a", "b")}
    mappings = [
        MappingSpec("M-1", skus["old"]),
        MappingSpec("M-2", skus["scaled"]),
        MappingSpec("S-A", skus["a"]),
        MappingSpec("S-B", skus["b"]),
    ]
    ledger.run(PutMappings(at=at(0), cause=CAUSE, supplier_id=acme, mappings=mappings))
    incoming = (("2024-04-01", 5),)
    ledger.report(
        acme,
        [
            Observation(
                index=0, supplier_sku="M-1", quantity=8, observed_at=at(30), incoming=incoming
            ),
            Observation(index=1, supplier_sku="M-2", quantity=3, observed_at=at(30)),
            Observation(index=2, supplier_sku="S-A", quantity=1, observed_at=at(30)),
            Observation(index=3, supplier_sku="S-B", quantity=2, observed_at=at(30)),
        ],
        at(30),
    )
    moves = [
        MappingSpec("M-1", skus["new"]),
        MappingSpec("M-2", skus["scaled_new"], units_per_supplier_unit=12),
        MappingSpec("S-A", skus["b"]),
        MappingSpec("S-B", skus["a"]),
    ]
    ledger.run(PutMappings(at=at(60), cause=CAUSE, supplier_id=acme, mappings=moves))

    moved = ledger.levels(skus["new"], at(61))
    assert (moved.available, moved.suppliers[0].observed_at, moved.stale) == (8, at(30), False)
    assert moved.suppliers[0].incoming == (("2024-04-01", 5),)
    assert ledger.levels(skus["new"], at(131)).stale  # it ages from the report, not the remap
    assert [ledger.available(skus[n], at(61)) for n in ("old", "scaled_new", "a", "b")] == [
        0,
        0,
        0,
        0,
    ]


def test_a_moved_level_moves_again_and_never_stays_or_moves_where_another_is_mapped(
    ledger: Ledger, acme: str
) -> None:
    """A review: a level moved by a remap and corrected at once (B to C) moved no further,
    every SKU at 0; and where another supplier SKU, never reported, was mapped to B, B kept
    the moved 8 for it while S-1's next report landed on C: 16 sellable for 8. Where
    another supplier SKU maps to B, the level is not S-1's alone (a fuzzer moved one
    supplier SKU's level with another): it retires and moves with none."""
    a, b, c, d = (ledger.sku() for _ in range(4))
    remap(ledger, acme, at(0), **{"S-1": a, "S-2": b})
    reported(ledger, acme, "S-1", 8, 30)
    remap(ledger, acme, at(60), **{"S-1": b})
    on_b = ledger.available(b, at(60))
    # As the API finds it: S-2 maps to B.
    kept_for_s2 = claiming(acme, at(62), "S-1", c, (b, "S-2"))
    ledger.run(kept_for_s2)
    on_c = [ledger.available(sku, at(62)) for sku in (a, b, c)]
    remap(ledger, acme, at(64), **{"S-1": d})
    reported(ledger, acme, "S-1", 8, 80)

    assert on_b == 8
    assert on_c == [0, 0, 0]
    assert [ledger.available(sku, at(80)) for sku in (a, b, c, d)] == [0, 0, 0, 8]


def test_the_first_report_after_a_remap_raises_no_jump_from_the_remap_s_zero(
    ledger: Ledger, acme: str
) -> None:
    """A review: the remap's 0 on the new SKU was taken for the level before the first
    report there, and every remap of 100 units or more raised an `anomalous_jump`."""
    old, new = ledger.sku(), ledger.sku()
    remap(ledger, acme, at(0), **{"AC-1": old})
    reported(ledger, acme, "AC-1", 500, 30)
    remap(ledger, acme, at(60), **{"AC-1": new})
    written = ledger.events_written()
    reported(ledger, acme, "AC-1", 480, 70)
    observed = [
        ledger.app.mapper.to_domain_event(n)
        for n in ledger.app.notification_log.select(written + 1, 10)
        if n.topic.endswith("StockItem.Observed")
    ]
    assert [(e.quantity, e.previous_quantity) for e in observed] == [(480, None)]


def test_a_report_decided_in_another_process_before_a_remap_is_decided_again_after_it(
    ledger: Ledger, acme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: with the supplier's level on the old SKU at 0 already, the remap wrote no
    event there, so a report another process had decided on the old mapping and saved
    just after it conflicted with nothing: 10 units on a SKU no mapping fed any more,
    beside the same 10 on the new SKU. Two writers on one store stand for the processes;
    the report comes as a feed's does, resolved to our SKU before the remap."""
    old, new = ledger.sku(), ledger.sku()
    remap(ledger, acme, at(0), **{"K-1": old})
    reported(ledger, acme, "K-1", 0, 1)
    other = LedgerWriter(ledger.app)  # the other process: a feed delivery
    save = ledger.app.save
    remapped: list[int] = []

    def remap_first(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(ledger.app, "save", save)
        # The report is decided: the admin's remap saves before it.
        remapped.append(remap(ledger, acme, at(30), **{"K-1": new}).value.updated)
        return save(*args, **kwargs)

    monkeypatch.setattr(ledger.app, "save", remap_first)
    report = ReportStock(
        at=at(30),
        cause=CAUSE,
        supplier_id=acme,
        delivery_id="d-other",
        content_hash="h",
        source="feed",
        rows=1,
        # As a feed sends it: resolved to our SKU through the mappings view, before the remap.
        observations=[Observation(index=0, sku=old, quantity=10, observed_at=at(29))],
    )
    decided = other.apply(report).value
    monkeypatch.undo()

    assert remapped == [1]
    assert (decided.applied, decided.late) == (0, 1)
    assert ledger.available(old, at(30)) == 0


def test_a_return_restocks_nothing_on_a_level_another_supplier_sku_feeds_since_a_remap(
    ledger: Ledger, acme: str
) -> None:
    """Found by a fuzzer: G-1's order on A shipped and reported, G-1 moved to D and G-2
    onto A; the return of the order's 2 units was restocked on A, now G-2's level, while
    they went back to G-1's shelf, which D counts: 6 sold on A against G-2's 4. An order
    placed after the remap restocks on A as before."""
    a, b, d = ledger.sku(), ledger.sku(), ledger.sku()
    remap(ledger, acme, at(0), **{"G-1": a, "G-2": b})

    reported(ledger, acme, "G-1", 5, 1)
    before = confirmed(ledger, [(a, 2)], at(2))
    ledger.run(Fulfil(at=at(3), cause=CAUSE, reservation_id=before.id, lines=[(a, 2, None)]))
    reported(ledger, acme, "G-1", 3, 4)
    reported(ledger, acme, "G-2", 4, 5)
    remap(ledger, acme, at(10), **{"G-1": d})
    remap(ledger, acme, at(11), **{"G-2": a})
    reported(ledger, acme, "G-2", 4, 12)
    after = confirmed(ledger, [(a, 1)], at(13))
    ledger.run(Fulfil(at=at(14), cause=CAUSE, reservation_id=after.id, lines=[(a, 1, None)]))

    ledger.run(
        Return(at=at(20), cause=CAUSE, reservation_id=before.id, lines=[(a, 2, None)], restock=True)
    )
    after_old_return = ledger.available(a, at(20))
    ledger.run(
        Return(at=at(21), cause=CAUSE, reservation_id=after.id, lines=[(a, 1, None)], restock=True)
    )

    assert after_old_return == 3  # G-2's 4, less the 1 shipped since its report
    assert ledger.available(a, at(21)) == 4  # the order placed since comes back to G-2's
    with pytest.raises(InsufficientStock):
        ledger.reserve([(a, 5)], at(22))


def test_a_mapping_s_own_unit_counts_before_the_unit_table_and_an_unknown_unit_is_refused(
    ledger: Ledger, acme: str
) -> None:
    shirt, socks, caps = ledger.sku(), ledger.sku(), ledger.sku()
    mappings = [
        MappingSpec("AC-SHIRT-CASE", shirt, units_per_supplier_unit=24, unit="CS"),
        MappingSpec("AC-SOCKS", socks, units_per_supplier_unit=2),
    ]
    ledger.run(PutMappings(at=at(0), cause=CAUSE, supplier_id=acme, mappings=mappings))

    # `factor` is what the supplier's unit table says: a case of 12, where it knows one.
    outcome = ledger.report(
        acme,
        [
            Observation(
                index=0,
                supplier_sku="AC-SHIRT-CASE",
                quantity=3,
                unit=" cs",
                factor=12,
                incoming=(("2026-02-01", 1),),
                observed_at=at(10),
            ),
            Observation(
                index=1,
                supplier_sku="AC-SOCKS",
                quantity=3,
                unit="CS",
                factor=12,
                observed_at=at(10),
            ),
            Observation(
                index=2, supplier_sku="AC-SOCKS", quantity=3, unit="BX", observed_at=at(11)
            ),
            Observation(index=3, sku=caps, quantity=3, unit="BX", observed_at=at(10)),
        ],
        at(20),
    ).value

    assert [(r.index, r.reason) for r in outcome.rejected] == [
        (2, "unknown_unit: 'BX'"),
        (3, "unknown_unit: 'BX'"),
    ]
    assert ledger.levels(shirt, at(20)).on_hand == 72  # three of this shirt's cases of 24
    assert ledger.levels(shirt, at(20)).suppliers[0].incoming == (("2026-02-01", 24),)
    assert ledger.levels(socks, at(20)).on_hand == 36  # three of the table's cases of 12
    assert ledger.levels(caps, at(20)).on_hand == 0


def test_a_mapping_s_unit_is_kept_as_units_compare_and_is_never_a_base_unit() -> None:
    assert MappingSpec("AC-1", "SKU-1", 12, unit=" ca ").unit == "CA"
    with pytest.raises(ValueError, match="base unit"):
        MappingSpec("AC-1", "SKU-1", 12, unit="each")


def test_mapping_events_and_states_stored_before_mappings_named_units_read_as_naming_none() -> None:
    app = InventoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True)
    mapping = SkuMapping.map("acme", MappingSpec("AC-1", "SKU-1", 6), at(0), CAUSE)
    assert mapping.remap(MappingSpec("AC-1", "SKU-1", 12), at(1), CAUSE)
    events = mapping.collect_events()

    def as_version_1(state: dict[str, Any], version: int = 2) -> dict[str, Any]:
        assert (state.pop("class_version"), state.pop("unit")) == (version, None)
        state.pop("units_since", None)  # a state's, since version 3
        state.pop("own_unit_since", None)
        return state

    read = []
    for event in events:
        stored = app.mapper.to_stored_event(event)
        state = as_version_1(json.loads(stored.state))
        read.append(
            app.mapper.to_domain_event(
                StoredEvent(
                    stored.originator_id,
                    stored.originator_version,
                    stored.topic,
                    json.dumps(state).encode(),
                )
            )
        )
    replayed = None
    for event in read:
        assert event.unit is None
        replayed = event.mutate(replayed)
    assert replayed is not None
    assert (replayed.units_per_supplier_unit, replayed.unit) == (12, None)
    assert replayed.factor("CS") is None
    assert replayed.factor(None) == 12
    assert (replayed.units_since, replayed.own_unit_since) == (at(1), None)  # from the events

    # The state a view keeps of it, as version 1 kept it: no change of units known.
    state = as_version_1(LedgerSnapshot.state_of(mapping), version=3)
    kept = LedgerSnapshot(
        originator_id=mapping.id,
        originator_version=mapping.version,
        timestamp=at(2),
        topic=get_topic(SkuMapping),
        state=state,
    ).mutate(None)
    assert (kept.sku, kept.units_per_supplier_unit, kept.unit) == ("SKU-1", 12, None)
    assert (kept.units_since, kept.own_unit_since) == (None, None)


def test_stock_and_reservation_events_carry_the_cause_of_their_command(
    ledger: Ledger, acme: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    cause = Cause(actor="oms-key-2", reason="oms.reserve", correlation_id="req-77")
    command = ledger.reserve_command([(shirt, 2)], at(10))
    reserved = ledger.run(replace(command, cause=cause)).value

    stock_event = list(ledger.app.events.get(StockItem.id_for(shirt)))[-1]
    [placed] = ledger.app.events.get(reserved.reservation.id)
    for event in (stock_event, placed):
        assert (event.actor, event.reason, event.correlation_id) == (
            "oms-key-2",
            "oms.reserve",
            "req-77",
        )
    assert isinstance(stock_event, StockItem.Held)
    assert Allocation.many_from(stock_event.allocations) == [Allocation("acme", 2)]


def test_a_copy_of_a_reservation_reads_the_same_and_shares_nothing_that_changes(
    ledger: Ledger, acme: str, netco: str
) -> None:
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 3}, at(0))
    ledger.stock(netco, {shirt: 5}, at(0))
    reservation = confirmed(ledger, [(shirt, 5)], at(10))
    reservation = ledger.run(
        Fulfil(
            at=at(20),
            cause=CAUSE,
            reservation_id=reservation.id,
            lines=[(shirt, 2, "acme")],
            request_key="ship-1",
        )
    ).value

    copied = copy.deepcopy(reservation)

    assert copied.pending_events == []
    state = {k: v for k, v in vars(reservation).items() if k != "_pending_events"}
    assert {k: v for k, v in vars(copied).items() if k != "_pending_events"} == state
    for name, value in vars(copied).items():
        if isinstance(value, dict | list | set):
            assert value is not vars(reservation)[name], name
    for sku, line in copied.lines.items():
        original = reservation.lines[sku]
        assert line is not original
        assert line.allocations is not original.allocations
        assert line.fulfilled is not original.fulfilled
        assert line.returned is not original.returned


@pytest.mark.parametrize("named_first", [True, False])
def test_lines_naming_a_supplier_take_from_it_before_lines_that_name_none(
    ledger: Ledger, acme: str, named_first: bool
) -> None:
    """Found by an OMS walkthrough: [4 of 2 + 2 from acme] was refused, the line naming no
    supplier having taken acme's units by priority, where the same lines in the other
    order were accepted."""
    beta = ledger.supplier("beta", priority=2)
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 2}, at(0))
    ledger.stock(beta, {shirt: 2}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    lines: list[tuple[str, int, str | None]] = [(shirt, 2, None), (shirt, 2, acme)]
    if named_first:
        lines.reverse()

    shipped = ledger.run(
        Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=lines)
    ).value

    assert shipped.status == ReservationStatus.FULFILLED
    assert shipped.lines[shirt].fulfilled == {acme: 2, beta: 2}


def test_a_return_names_the_supplier_that_shipped_the_units(ledger: Ledger, acme: str) -> None:
    """An OMS walkthrough: a return could not say which supplier's units came back, and
    the restock went to the first allocated, changing the other's level."""
    beta = ledger.supplier("beta", priority=2)
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 2}, at(0))
    ledger.stock(beta, {shirt: 2}, at(0))
    reservation = confirmed(ledger, [(shirt, 4)], at(10))
    ledger.run(
        Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=[(shirt, 4, None)])
    )

    back = ledger.run(
        Return(
            at=at(30),
            cause=CAUSE,
            reservation_id=reservation.id,
            lines=[(shirt, 1, beta), (shirt, 1, None)],
            restock=True,
            request_key="r-1",
        )
    ).value

    assert back.lines[shirt].returned == {beta: 1, acme: 1}
    with pytest.raises(SupplierNotOnLine):
        ledger.run(
            Return(
                at=at(40),
                cause=CAUSE,
                reservation_id=reservation.id,
                lines=[(shirt, 1, "someone-else")],
                restock=False,
            )
        )


def test_a_keyed_return_naming_no_supplier_is_fingerprinted_as_before_suppliers_were_named(
    ledger: Ledger, acme: str
) -> None:
    """So that one sent again across the upgrade is the same request, not a mismatch."""
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 2}, at(0))
    reservation = confirmed(ledger, [(shirt, 2)], at(10))
    ledger.run(
        Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=[(shirt, 2, None)])
    )
    ledger.run(
        Return(
            at=at(30),
            cause=CAUSE,
            reservation_id=reservation.id,
            lines=[(shirt, 1, None)],
            restock=False,
            request_key="r-1",
        )
    )

    before = [[[shirt, 1]], False]  # the request as it was fingerprinted before
    digest = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode())
    assert ledger.reservation(reservation.id).request_keys == [
        f"return:r-1#{digest.hexdigest()[:16]}"
    ]


def test_a_refused_split_shipment_or_return_says_what_the_earlier_lines_took(
    ledger: Ledger, acme: str
) -> None:
    """Found by the OMS walkthrough: lines 2 and 2 of a SKU with 3 open were refused as
    "more than the 1 the reservation has open", and a return as "more than the 1 the
    reservation has shipped" after 3 shipped: the numbers left, not what they are."""
    shirt = ledger.sku()
    ledger.stock(acme, {shirt: 10}, at(0))
    reservation = confirmed(ledger, [(shirt, 3)], at(10))

    def fulfil(*quantities: int) -> Fulfil:
        lines = [(shirt, quantity, None) for quantity in quantities]
        return Fulfil(at=at(20), cause=CAUSE, reservation_id=reservation.id, lines=lines)

    with pytest.raises(ExceedsOpenQuantity) as split:
        ledger.run(fulfil(2, 2))
    assert split.value.message == (
        f"2 of {shirt} is more than the 1 the reservation has open,"
        " after the 2 of it that this request's other lines take"
    )
    ledger.run(fulfil(3))
    returned = Return(
        at=at(30),
        cause=CAUSE,
        reservation_id=reservation.id,
        lines=[(shirt, 4, None)],
        restock=True,
    )
    with pytest.raises(ExceedsOpenQuantity) as over:
        ledger.run(returned)
    assert over.value.message == (
        f"4 of {shirt} is more than the 3 the reservation has shipped and not had back"
    )
