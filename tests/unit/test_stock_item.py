"""StockItem rules as given events / when a command / then events, on the pure domain."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import pytest
from eventsourcing.persistence import StoredEvent

from ledger.application import InventoryLedger
from ledger.base import Cause
from ledger.reservation import Reservation
from ledger.stock import (
    REMAP_SOURCE,
    Allocation,
    ObservationOutcome,
    StockItem,
    StockLevels,
    second_ceil,
)
from ledger.supplier import SupplierTerms
from tests.conftest import random_sku

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
GIVEN = Cause(actor="given-history", reason="test.given", correlation_id="corr-given")
WHEN = Cause(actor="oms-key", reason="oms.test", correlation_id="req-when")


def at(seconds: float) -> datetime:
    """A moment `seconds` after the start of every scenario."""
    return T0 + timedelta(seconds=seconds)


def supplier(name: str, **terms: Any) -> SupplierTerms:
    return SupplierTerms(name=name, **terms)


def terms_of(*suppliers: SupplierTerms) -> dict[str, SupplierTerms]:
    return {terms.name: terms for terms in suppliers}


def allocations(**quantities: int) -> list[Allocation]:
    return [Allocation(supplier_id, quantity) for supplier_id, quantity in quantities.items()]


def new_item(safety_stock: int = 0) -> StockItem:
    return StockItem.register(random_sku(), at(0), GIVEN, safety_stock=safety_stock)


def observe(
    item: StockItem,
    terms: SupplierTerms,
    quantity: int,
    observed_at: datetime,
    when: datetime | None = None,
    cause: Cause = GIVEN,
) -> ObservationOutcome:
    return item.observe(
        terms.name,
        quantity,
        observed_at,
        terms,
        when or observed_at,
        cause,
        source="test-feed",
        delivery_id="delivery-1",
    )


def replayed(events: Iterable[StockItem.Event]) -> StockItem:
    """A fresh aggregate folded from events, as a repository would rebuild it."""
    aggregate: Any = None
    for event in events:
        aggregate = event.mutate(aggregate)
    assert isinstance(aggregate, StockItem)
    return aggregate


def given(item: StockItem) -> StockItem:
    """The history so far, collected and replayed into a fresh aggregate."""
    return replayed(item.collect_events())


def kinds(events: Sequence[object]) -> list[type]:
    return [type(event) for event in events]


def confirmed_commitment(
    terms: SupplierTerms, level: int, quantity: int, confirm_at: datetime
) -> StockItem:
    """The history of a SKU with `level` from one supplier and `quantity` held, then confirmed."""
    item = new_item()
    observe(item, terms, level, at(0))
    item.hold("r1", allocations(**{terms.name: quantity}), at(600), at(1), GIVEN)
    net = [terms.name] if terms.reports_net_of_our_orders else []
    item.confirm_hold("r1", allocations(**{terms.name: quantity}), at(600), net, confirm_at, GIVEN)
    return item


# Supplier reports ------------------------------------------------------------


def test_a_late_report_never_overwrites_a_newer_one() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(10))
    history_events = history.collect_events()
    item = replayed(history_events)

    outcome = observe(item, acme, 3, at(5), when=at(20), cause=WHEN)

    events = item.collect_events()
    assert outcome == ObservationOutcome.LATE
    assert kinds(events) == [StockItem.LateReportIgnored]
    late = events[0]
    assert isinstance(late, StockItem.LateReportIgnored)
    assert (late.supplier_id, late.quantity) == ("acme", 3)
    assert (late.observed_at, late.current_observed_at) == (at(5), at(10))
    assert item.levels(at(20), terms_of(acme)).on_hand == 10
    rebuilt = replayed([*history_events, *events])
    assert rebuilt.positions["acme"].quantity == 10
    assert rebuilt.positions["acme"].observed_at == at(10)


def test_a_report_older_than_a_newer_one_seen_but_not_recorded_is_late() -> None:
    # 10 at t10 was recorded; 10 again at t30 repeated it and left no event; 99 at t20
    # arrives last. It is older than what the supplier said at t30: late, not applied.
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(10))
    item = given(history)

    outcome = item.observe("acme", 99, at(20), acme, at(40), WHEN, seen_at=at(30))

    [late] = item.collect_events()
    assert outcome == ObservationOutcome.LATE
    assert isinstance(late, StockItem.LateReportIgnored)
    assert (late.observed_at, late.current_observed_at) == (at(20), at(30))
    assert item.levels(at(40), terms_of(acme)).on_hand == 10


def test_a_report_newer_than_every_one_seen_applies_whatever_was_seen() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(10))
    item = given(history)

    outcome = item.observe("acme", 99, at(31), acme, at(40), WHEN, seen_at=at(30))

    assert outcome == ObservationOutcome.APPLIED
    assert item.levels(at(40), terms_of(acme)).on_hand == 99


def test_a_newer_report_replaces_the_level_and_records_the_one_it_replaced() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(10))
    item = given(history)

    outcome = observe(item, acme, 7, at(30), cause=WHEN)

    [event] = item.collect_events()
    assert outcome == ObservationOutcome.APPLIED
    assert isinstance(event, StockItem.Observed)
    assert (event.quantity, event.previous_quantity, event.observed_at) == (7, 10, at(30))
    assert (event.source, event.delivery_id) == ("test-feed", "delivery-1")
    assert item.levels(at(30), terms_of(acme)).on_hand == 7


def test_a_first_report_from_a_supplier_has_no_previous_quantity() -> None:
    acme = supplier("acme")
    item = given(new_item())

    observe(item, acme, 4, at(1), cause=WHEN)

    [event] = item.collect_events()
    assert isinstance(event, StockItem.Observed)
    assert (event.quantity, event.previous_quantity, event.exposure) == (4, None, 0)


def test_an_identical_report_is_unchanged_and_records_nothing() -> None:
    acme = supplier("acme", stale_after_seconds=600)
    history = new_item()
    observe(history, acme, 10, at(10))
    item = given(history)

    outcome = observe(item, acme, 10, at(10), when=at(40), cause=WHEN)

    assert outcome == ObservationOutcome.UNCHANGED
    assert item.collect_events() == []


@pytest.mark.parametrize(
    ("stale_after", "exclude_after", "half_of_the_smaller"),
    [(600, 3600, 300), (None, 1000, 500), (2000, 400, 200)],
)
def test_an_unchanged_level_is_re_recorded_only_once_the_stored_one_is_half_way_to_a_limit(
    stale_after: int | None, exclude_after: int, half_of_the_smaller: int
) -> None:
    acme = supplier("acme", stale_after_seconds=stale_after, exclude_after_seconds=exclude_after)
    history = new_item()
    observe(history, acme, 10, at(0))
    item = given(history)

    too_soon = observe(item, acme, 10, at(half_of_the_smaller - 1), cause=WHEN)
    assert too_soon == ObservationOutcome.UNCHANGED
    assert item.collect_events() == []

    old_enough = observe(item, acme, 10, at(half_of_the_smaller + 1), cause=WHEN)
    [event] = item.collect_events()
    assert old_enough == ObservationOutcome.APPLIED
    assert isinstance(event, StockItem.Observed)
    assert event.observed_at == at(half_of_the_smaller + 1)
    assert item.positions["acme"].observed_at == at(half_of_the_smaller + 1)


def test_an_unchanged_level_without_staleness_limits_is_never_re_recorded() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(0))
    item = given(history)

    outcome = observe(item, acme, 10, at(30 * 24 * 3600), cause=WHEN)

    assert outcome == ObservationOutcome.UNCHANGED
    assert item.collect_events() == []


# What may be sold --------------------------------------------------------------


def test_sellable_is_fresh_supplier_levels_minus_buffers_minus_safety_stock() -> None:
    acme, bolt = supplier("acme", buffer=2), supplier("bolt", buffer=1)
    history = new_item(safety_stock=3)
    observe(history, acme, 10, at(0))
    observe(history, bolt, 5, at(0))
    item = given(history)

    levels = item.levels(at(1), terms_of(acme, bolt))

    assert levels.on_hand == 15
    assert levels.sellable == (10 - 2) + (5 - 1) - 3
    assert levels.available == 9
    assert {level.supplier_id: level.sellable for level in levels.suppliers} == {
        "acme": 8,
        "bolt": 4,
    }


def test_sellable_never_goes_below_zero() -> None:
    acme, bolt = supplier("acme", buffer=5), supplier("bolt")
    history = new_item(safety_stock=10)
    observe(history, acme, 2, at(0))
    observe(history, bolt, 4, at(0))
    item = given(history)

    levels = item.levels(at(1), terms_of(acme, bolt))

    assert [level.sellable for level in levels.suppliers] == [0, 4]
    assert (levels.sellable, levels.available) == (0, 0)
    assert levels.status(limited_at=3) == "out_of_stock"


def test_a_level_older_than_stale_after_shows_updating_but_stays_sellable() -> None:
    acme = supplier("acme", stale_after_seconds=60, exclude_after_seconds=600)
    history = new_item()
    observe(history, acme, 10, at(0))
    item = given(history)

    fresh = item.levels(at(59), terms_of(acme))
    stale = item.levels(at(61), terms_of(acme))

    assert fresh.status(limited_at=3) == "in_stock"
    assert stale.status(limited_at=3) == "updating"
    assert stale.suppliers[0].stale
    assert stale.suppliers[0].age_seconds == 61
    assert (stale.sellable, stale.available) == (10, 10)


def test_a_level_older_than_exclude_after_stops_being_sellable() -> None:
    acme = supplier("acme", stale_after_seconds=60, exclude_after_seconds=120)
    bolt = supplier("bolt")
    history = new_item()
    observe(history, acme, 10, at(0))
    observe(history, bolt, 3, at(100))
    item = given(history)

    before = item.levels(at(120), terms_of(acme, bolt))
    after = item.levels(at(121), terms_of(acme, bolt))

    assert before.sellable == 13
    assert after.sellable == 3
    assert after.on_hand == 13
    assert after.suppliers[0].excluded
    assert after.status(limited_at=0) == "updating"
    assert item.allocate(4, at(121), terms_of(acme, bolt)) == (None, 3)


# Allocation ----------------------------------------------------------------------


def test_allocation_goes_by_priority_then_lead_time_then_freshest_report() -> None:
    first = supplier("first", priority=1, lead_time_days=9)
    quick = supplier("quick", priority=2, lead_time_days=1)
    fresh = supplier("fresh", priority=2, lead_time_days=3)
    older = supplier("older", priority=2, lead_time_days=3)
    history = new_item()
    observe(history, older, 3, at(10))
    observe(history, fresh, 3, at(30))
    observe(history, quick, 3, at(0))
    observe(history, first, 3, at(0))
    item = given(history)

    allocated, available = item.allocate(11, at(40), terms_of(first, quick, fresh, older))

    assert available == 12
    assert allocated == allocations(first=3, quick=3, fresh=3, older=2)


def test_a_line_one_supplier_can_cover_is_not_split() -> None:
    acme, bolt = supplier("acme", priority=1), supplier("bolt", priority=2)
    history = new_item()
    observe(history, acme, 5, at(0))
    observe(history, bolt, 5, at(0))
    item = given(history)

    allocated, _ = item.allocate(5, at(1), terms_of(acme, bolt))

    assert allocated == allocations(acme=5)


def test_allocation_only_takes_what_a_supplier_still_has_free() -> None:
    acme = supplier("acme", priority=1, buffer=1)
    bolt = supplier("bolt", priority=2)
    history = new_item()
    observe(history, acme, 6, at(0))
    observe(history, bolt, 5, at(0))
    history.hold("r1", allocations(acme=3), at(600), at(1), GIVEN)
    item = given(history)

    allocated, available = item.allocate(4, at(2), terms_of(acme, bolt))

    assert available == 7
    assert allocated == allocations(acme=2, bolt=2)


def test_allocation_refuses_a_line_it_cannot_cover_and_says_what_is_available() -> None:
    acme, bolt = supplier("acme"), supplier("bolt")
    history = new_item(safety_stock=1)
    observe(history, acme, 3, at(0))
    observe(history, bolt, 2, at(0))
    history.hold("r1", allocations(acme=1), at(600), at(1), GIVEN)
    item = given(history)

    assert item.allocate(4, at(2), terms_of(acme, bolt)) == (None, 3)
    assert item.allocate(3, at(2), terms_of(acme, bolt))[0] is not None


# Holds and their expiry ------------------------------------------------------------


def test_a_hold_counts_until_its_expiry_and_not_after() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(0))
    item = given(history)

    item.hold("r1", allocations(acme=4), at(100), at(1), WHEN)

    [event] = item.collect_events()
    assert isinstance(event, StockItem.Held)
    assert (event.reservation_id, event.expires_at) == ("r1", at(100))
    assert event.allocations == [{"supplier_id": "acme", "quantity": 4}]
    just_before = item.levels(at(99.5), terms_of(acme))
    at_expiry = item.levels(at(100), terms_of(acme))
    assert (just_before.held, just_before.available) == (4, 6)
    assert (at_expiry.held, at_expiry.available) == (0, 10)
    assert item.allocate(10, at(100), terms_of(acme))[0] == allocations(acme=10)


def test_an_expired_hold_is_forgotten_by_the_next_event() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(0))
    history.hold("r1", allocations(acme=4), at(100), at(1), GIVEN)
    history.hold("r2", allocations(acme=2), at(500), at(1), GIVEN)
    history_events = history.collect_events()
    item = replayed(history_events)
    assert sum(item.positions["acme"].held.values()) == 6

    observe(item, acme, 9, at(101), cause=WHEN)

    events = item.collect_events()
    assert sum(item.positions["acme"].held.values()) == 2
    rebuilt = replayed([*history_events, *events])
    assert rebuilt.positions["acme"].held == item.positions["acme"].held


def test_an_event_before_the_expiry_keeps_the_hold() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(0))
    history.hold("r1", allocations(acme=4), at(100), at(1), GIVEN)
    item = given(history)

    observe(item, acme, 9, at(99), cause=WHEN)

    assert sum(item.positions["acme"].held.values()) == 4
    assert item.levels(at(99), terms_of(acme)).held == 4


def test_releasing_a_hold_frees_it_at_once_and_leaves_others_with_the_same_expiry() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(0))
    history.hold("r1", allocations(acme=4), at(100), at(1), GIVEN)
    history.hold("r2", allocations(acme=3), at(100), at(2), GIVEN)
    item = given(history)

    item.release_hold("r1", allocations(acme=4), at(100), at(3), WHEN)

    assert kinds(item.collect_events()) == [StockItem.HoldReleased]
    levels = item.levels(at(3), terms_of(acme))
    assert (levels.held, levels.available) == (3, 7)


def test_extending_a_hold_moves_its_units_to_the_new_expiry() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(0))
    history.hold("r1", allocations(acme=4), at(100), at(1), GIVEN)
    history.hold("r2", allocations(acme=3), at(100), at(2), GIVEN)
    item = given(history)

    item.extend_hold("r1", allocations(acme=4), at(100), at(400), at(3), WHEN)

    assert kinds(item.collect_events()) == [StockItem.HoldExtended]
    assert item.positions["acme"].held == {second_ceil(at(100)): 3, second_ceil(at(400)): 4}
    assert item.levels(at(99), terms_of(acme)).held == 7
    assert item.levels(at(100), terms_of(acme)).held == 4
    assert item.levels(at(400), terms_of(acme)).held == 0


def test_thousands_of_open_holds_keep_the_state_small() -> None:
    acme = supplier("acme")
    item = new_item()
    observe(item, acme, 100_000, at(0))
    for number in range(2000):
        expires_at = at(600 + number % 10)
        item.hold(f"r{number}", allocations(acme=1), expires_at, at(1), GIVEN)

    assert len(item.positions["acme"].held) == 10
    assert item.levels(at(2), terms_of(acme)).held == 2000


# Commitments ---------------------------------------------------------------------


def test_confirming_moves_a_hold_to_committed_for_a_normal_supplier() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(0))
    history.hold("r1", allocations(acme=4), at(100), at(1), GIVEN)
    item = given(history)

    item.confirm_hold("r1", allocations(acme=4), at(100), [], at(20), WHEN)

    [event] = item.collect_events()
    assert isinstance(event, StockItem.HoldConfirmed)
    assert event.net_of_our_orders == []
    levels = item.levels(at(20), terms_of(acme))
    assert (levels.held, levels.committed, levels.available) == (0, 4, 6)
    past_the_hold_expiry = item.levels(at(500), terms_of(acme))
    assert (past_the_hold_expiry.committed, past_the_hold_expiry.available) == (4, 6)


def test_releasing_a_commitment_to_a_normal_supplier_frees_it() -> None:
    acme = supplier("acme")
    item = given(confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20)))

    item.release_commitment("r1", allocations(acme=3), at(20), [], at(30), WHEN)

    assert kinds(item.collect_events()) == [StockItem.CommitmentReleased]
    levels = item.levels(at(30), terms_of(acme))
    assert (levels.committed, levels.available) == (1, 9)


def test_a_net_of_our_orders_commitment_counts_once_until_the_supplier_reports_again() -> None:
    acme = supplier("acme", reports_net_of_our_orders=True)

    item = given(confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20)))

    levels = item.levels(at(21), terms_of(acme))
    assert (levels.held, levels.committed) == (0, 0)
    assert (levels.sellable, levels.available) == (6, 6)


def test_a_net_of_our_orders_commitment_stops_counting_once_a_newer_report_arrives() -> None:
    acme = supplier("acme", reports_net_of_our_orders=True)
    item = given(confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20)))

    outcome = observe(item, acme, 6, at(30), cause=WHEN)

    assert outcome == ObservationOutcome.APPLIED
    [event] = item.collect_events()
    assert isinstance(event, StockItem.Observed)
    assert event.exposure == 0
    levels = item.levels(at(30), terms_of(acme))
    assert (levels.sellable, levels.available) == (6, 6)


def test_a_net_of_our_orders_commitment_still_counts_against_a_report_observed_before_it() -> None:
    acme = supplier("acme", reports_net_of_our_orders=True)
    item = given(confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20)))

    observe(item, acme, 10, at(15), when=at(25), cause=WHEN)

    levels = item.levels(at(25), terms_of(acme))
    assert (levels.on_hand, levels.sellable, levels.available) == (10, 6, 6)


def test_a_net_of_our_orders_commitment_still_counts_against_a_report_in_the_same_second() -> None:
    acme = supplier("acme", reports_net_of_our_orders=True)
    item = given(confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20.4)))

    observe(item, acme, 10, at(20.7), when=at(21.5), cause=WHEN)

    assert item.levels(at(21.5), terms_of(acme)).available == 6


def test_a_report_observed_at_the_very_moment_of_the_confirmation_is_not_newer_than_it() -> None:
    # DESIGN: a commitment stops counting once a report *newer* than it arrives.
    acme = supplier("acme", reports_net_of_our_orders=True)
    item = given(confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20)))

    observe(item, acme, 10, at(20), when=at(21), cause=WHEN)

    assert item.levels(at(21), terms_of(acme)).available == 6


def test_releasing_a_net_of_our_orders_commitment_before_the_next_report_gives_it_back() -> None:
    acme = supplier("acme", reports_net_of_our_orders=True)
    item = given(confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20)))

    item.release_commitment("r1", allocations(acme=4), at(20), ["acme"], at(30), WHEN)

    assert item.levels(at(30), terms_of(acme)).available == 10


def test_orders_committed_while_net_count_once_the_supplier_reports_gross() -> None:
    """Found by a merchandiser's walkthrough: switched from net to gross reporting, the
    supplier's next report held our unshipped order, and its units were sold again."""
    net = supplier("acme", reports_net_of_our_orders=True)
    gross = supplier("acme")
    item = given(confirmed_commitment(net, level=10, quantity=4, confirm_at=at(20)))
    observe(item, net, 6, at(30), cause=WHEN)  # net of our 4
    assert item.levels(at(30), terms_of(net)).committed == 0

    # Switched: until the first gross report they count twice, never too few.
    assert item.levels(at(31), terms_of(gross)).available == 2
    observe(item, gross, 10, at(40), cause=WHEN)  # our 4 not shipped yet: in its stock

    levels = item.levels(at(40), terms_of(gross))
    assert (levels.sellable, levels.committed, levels.available) == (10, 4, 6)
    assert item.allocate(7, at(41), terms_of(gross)) == (None, 6)


@pytest.mark.parametrize("closed_by", ["shipped", "released"])
def test_an_order_committed_while_net_stops_counting_once_shipped_or_released(
    closed_by: str,
) -> None:
    net = supplier("acme", reports_net_of_our_orders=True)
    gross = supplier("acme")
    item = given(confirmed_commitment(net, level=10, quantity=4, confirm_at=at(20)))
    if closed_by == "shipped":
        item.ship("r1", allocations(acme=4), ["acme"], at(30), WHEN)
    else:
        item.release_commitment("r1", allocations(acme=4), at(20), ["acme"], at(30), WHEN)
    observe(item, gross, 6, at(40), cause=WHEN)

    levels = item.levels(at(40), terms_of(gross))
    assert (levels.committed, levels.available) == (0, 6)


def test_an_order_committed_while_net_and_shipped_while_gross_leaves_the_level_until_reported() -> (
    None
):
    """Found by a review: shipped after the switch, it left `committed` but never the level,
    which the supplier's gross report had counted it in: its units were sold again."""
    net = supplier("acme", reports_net_of_our_orders=True)
    gross = supplier("acme")
    item = given(confirmed_commitment(net, level=10, quantity=4, confirm_at=at(20)))
    observe(item, net, 6, at(30), cause=WHEN)
    observe(item, gross, 10, at(40), cause=WHEN)  # switched; our 4 still in its stock

    item.ship("r1", allocations(acme=4), ["acme"], at(50), WHEN)

    shipped = item.levels(at(50), terms_of(gross))
    assert (shipped.sellable, shipped.committed, shipped.available) == (6, 0, 6)
    observe(item, gross, 6, at(60), cause=WHEN)  # its stock without them
    assert item.levels(at(60), terms_of(gross)).available == 6


def test_a_commitment_confirmed_before_they_were_counted_neither_counts_nor_uncounts() -> None:
    """Events stored before open net orders were counted (version 1, read as not counted)
    leave `net_committed` as the snapshots and views of then have it: 0."""
    net = supplier("acme", reports_net_of_our_orders=True)
    gross = supplier("acme")
    item = new_item()
    observe(item, net, 20, at(0))
    for reservation, counted in (("old", False), ("new", True)):
        item.hold(reservation, allocations(acme=4), at(600), at(1), GIVEN)
        item.trigger_event(
            StockItem.HoldConfirmed,
            reservation_id=reservation,
            expires_at=at(600),
            allocations=[{"supplier_id": "acme", "quantity": 4}],
            net_of_our_orders=["acme"],
            counted=counted,
            timestamp=at(2),
            **GIVEN.as_kwargs(),
        )
    item.release_commitment("old", allocations(acme=4), at(2), ["acme"], at(3), WHEN, counted=False)

    assert item.positions["acme"].net_committed == 4  # the new one's, not eaten by the old
    assert item.levels(at(4), terms_of(gross)).committed == 4
    state: dict[str, Any] = {}
    StockItem.HoldConfirmed.upcast_v1_v2(state)
    StockItem.CommitmentReleased.upcast_v1_v2(state)
    StockItem.Shipped.upcast_v1_v2(state)
    assert state == {"counted": False, "taken_off": []}


def test_a_confirmation_stored_before_open_net_orders_were_counted_is_read_as_not_counted() -> None:
    """The stored form, read back: a `HoldConfirmed` and a `Reservation.Confirmed` written
    as version 1 (no `counted`, no `net_counted`) count nothing when replayed."""
    app = InventoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True)
    net = supplier("acme", reports_net_of_our_orders=True)
    history = confirmed_commitment(net, level=20, quantity=4, confirm_at=at(2))
    *before, confirmed = history.collect_events()
    stored = app.mapper.to_stored_event(confirmed)
    state = json.loads(stored.state)
    assert (state.pop("class_version"), state.pop("counted")) == (2, True)
    as_v1 = StoredEvent(
        stored.originator_id, stored.originator_version, stored.topic, json.dumps(state).encode()
    )

    read = app.mapper.to_domain_event(as_v1)

    assert isinstance(read, StockItem.HoldConfirmed)
    assert read.counted is False
    assert replayed([*before, read]).positions["acme"].net_committed == 0
    assert replayed([*before, confirmed]).positions["acme"].net_committed == 4

    order = Reservation.place(
        "oms", "k", "o", "f", [("SKU-1", 4, [Allocation("acme", 4)])], at(600), at(1), GIVEN
    )
    order.confirm(at(2), GIVEN, ["acme"])
    placed, confirmed_order = order.collect_events()
    stored = app.mapper.to_stored_event(confirmed_order)
    state = json.loads(stored.state)
    assert (state.pop("class_version"), state.pop("net_counted")) == (2, True)
    as_v1 = StoredEvent(
        stored.originator_id, stored.originator_version, stored.topic, json.dumps(state).encode()
    )
    reservation = app.mapper.to_domain_event(as_v1).mutate(placed.mutate(None))
    assert reservation.net_counted is False


def test_a_return_restocks_nothing_on_a_level_a_remap_retired() -> None:
    """Found by a review: restocked after the remap, the returned units counted on the
    retired level, while the supplier's reports counted them under the SKU it moved to:
    sold twice, and (with no `exclude_after`) for good. The other supplier's units go back."""
    old, other = supplier("old"), supplier("other")
    item = new_item()
    observe(item, old, 10, at(0))
    observe(item, other, 5, at(0))
    item.observe("old", 0, at(1), old, at(1), GIVEN, source=REMAP_SOURCE, incoming=())
    item.restock("r1", allocations(old=3, other=2), at(2), WHEN)
    item.restock("r2", allocations(old=1), at(3), WHEN)
    events = item.collect_events()

    assert item.levels(at(4), terms_of(old, other)).sellable == 7
    restocks = [e for e in events if isinstance(e, StockItem.Restocked)]
    assert [(e.allocations, e.passed_over) for e in restocks] == [
        ([{"supplier_id": "other", "quantity": 2}], [{"supplier_id": "old", "quantity": 3}]),
        ([], [{"supplier_id": "old", "quantity": 1}]),  # recorded: where the units did not go
    ]


def test_a_restock_stored_before_passed_over_units_were_recorded_reads_as_passing_none() -> None:
    app = InventoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True)
    acme = supplier("acme")
    item = new_item()
    observe(item, acme, 10, at(0))
    item.restock("r1", allocations(acme=3), at(2), WHEN)
    *before, restocked = item.collect_events()
    stored = app.mapper.to_stored_event(restocked)
    state = json.loads(stored.state)
    assert (state.pop("class_version"), state.pop("passed_over")) == (2, [])
    as_v1 = StoredEvent(
        stored.originator_id, stored.originator_version, stored.topic, json.dumps(state).encode()
    )

    read = app.mapper.to_domain_event(as_v1)

    assert isinstance(read, StockItem.Restocked)
    assert read.passed_over == []
    assert replayed([*before, read]).levels(at(3), terms_of(acme)).sellable == 13


def test_orders_committed_while_net_count_while_a_gross_report_holds_them_after_a_switch_back() -> (
    None
):
    """Found by a walkthrough of the fix: switched to gross and back to net, the supplier's
    gross report still held the open order, which counted nowhere: sold twice."""
    net = supplier("acme", reports_net_of_our_orders=True)
    gross = supplier("acme")
    item = given(confirmed_commitment(net, level=100, quantity=30, confirm_at=at(20)))
    observe(item, net, 70, at(30), cause=WHEN)
    observe(item, gross, 100, at(40), cause=WHEN)

    back = item.levels(at(41), terms_of(net))  # switched back, no net report yet
    assert (back.committed, back.available) == (30, 70)
    assert item.allocate(71, at(41), terms_of(net)) == (None, 70)
    observe(item, net, 70, at(50), cause=WHEN)  # net again: leaves our 30 out
    assert item.levels(at(50), terms_of(net)).committed == 0
    assert item.levels(at(50), terms_of(net)).available == 70


def test_the_same_number_reported_after_a_switch_is_recorded() -> None:
    """Net 70 then gross 70 (stock came in): the same number, now holding our order."""
    net = supplier("acme", reports_net_of_our_orders=True)
    gross = supplier("acme")
    item = given(confirmed_commitment(net, level=100, quantity=30, confirm_at=at(20)))
    observe(item, net, 70, at(30), cause=WHEN)
    item.collect_events()

    assert observe(item, gross, 70, at(40), cause=WHEN) == ObservationOutcome.APPLIED
    assert item.levels(at(40), terms_of(gross)).available == 40


def test_a_gross_report_made_before_a_shipment_arriving_after_it_does_not_sell_it_again() -> None:
    """Found by a review: switched to gross, shipped before its first gross report, then a
    gross report made before the shipment came: the shipped units counted again."""
    net = supplier("acme", reports_net_of_our_orders=True)
    gross = supplier("acme")
    item = given(confirmed_commitment(net, level=100, quantity=30, confirm_at=at(20)))
    observe(item, net, 70, at(30), cause=WHEN)

    item.ship("r1", allocations(acme=30), ["acme"], at(50), WHEN, terms=terms_of(gross))
    assert item.levels(at(50), terms_of(gross)).available == 40  # low, never high
    observe(item, gross, 100, at(49), when=at(55), cause=WHEN)
    assert item.levels(at(55), terms_of(gross)).available == 70
    observe(item, gross, 100, at(50.2), when=at(56), cause=WHEN)  # the shipment's second
    assert item.levels(at(56), terms_of(gross)).available == 70
    observe(item, gross, 70, at(60), cause=WHEN)
    assert item.levels(at(60), terms_of(gross)).available == 70


def test_a_gross_report_made_before_a_switch_to_net_is_taken_as_gross() -> None:
    """Found by a review: processed after the switch, it was taken as net, and the open
    order it held counted nowhere."""
    net = supplier("acme", reports_net_of_our_orders=True)
    gross = supplier("acme")
    item = given(confirmed_commitment(net, level=100, quantity=30, confirm_at=at(20)))
    observe(item, net, 70, at(30), cause=WHEN)
    observe(item, gross, 100, at(40), cause=WHEN)

    item.observe("acme", 100, at(44), net, at(46), WHEN, source="feed", net_since=at(45))

    assert item.positions["acme"].reported_net is False
    assert item.allocate(71, at(46), terms_of(net)) == (None, 70)
    # Within NET_SWITCH_MARGIN of the switch a report is not yet taken as net: our 30
    # count twice (low), where a gross report taken for net would count them nowhere.
    item.observe("acme", 70, at(47), net, at(48), WHEN, source="feed", net_since=at(45))
    assert item.levels(at(48), terms_of(net)).available == 40
    item.observe("acme", 70, at(345), net, at(346), WHEN, source="feed", net_since=at(45))
    assert item.positions["acme"].reported_net is True
    assert item.levels(at(346), terms_of(net)).available == 70


def test_a_shipment_after_a_gross_spell_is_taken_off_whatever_the_last_report_said() -> None:
    """Found by a review: net, gross, net again; shipped while the last recorded report was
    net, then a gross report from the gross spell came, holding the shipped units."""
    net = supplier("acme", reports_net_of_our_orders=True)
    item = given(confirmed_commitment(net, level=100, quantity=10, confirm_at=at(3)))
    # Switched to gross at 10, back to net at 30 (net_since), the t20 report delayed.

    item.ship(
        "r1",
        allocations(acme=10),
        ["acme"],
        at(40),
        WHEN,
        terms=terms_of(net),
        net_since={"acme": at(30)},
    )
    item.observe("acme", 100, at(20), net, at(50), WHEN, source="feed", net_since=at(30))

    assert item.levels(at(50), terms_of(net)).available == 90  # the shelf: 90, all free


def test_a_release_does_not_undo_a_restock_of_the_second_a_report_retired() -> None:
    """Found by a review: a report retired the commitment's second, a restock in the same
    bucket made it anew, and the release added the commitment back on top."""
    net = supplier("acme", reports_net_of_our_orders=True)
    gross = supplier("acme")
    item = given(confirmed_commitment(net, level=100, quantity=10, confirm_at=at(5.3)))
    observe(item, gross, 100, at(6.2), cause=WHEN)  # switched; it holds our 10
    item.restock("r0", allocations(acme=2), at(6.5), WHEN)

    item.release_commitment("r1", allocations(acme=10), at(5.3), ["acme"], at(8), WHEN)

    assert item.levels(at(8), terms_of(gross)).available == 102  # 100 and the 2 back


def test_a_level_a_remap_retired_never_turns_stale() -> None:
    """Found by a merchandiser's walkthrough: the 0 left behind when a supplier's SKU was
    mapped elsewhere aged like a report, and kept the SKU `updating` for good."""
    old = supplier("old", stale_after_seconds=3, exclude_after_seconds=5)
    fresh = supplier("fresh")
    item = new_item()
    observe(item, old, 10, at(0))
    observe(item, fresh, 50, at(0))
    item.observe("old", 0, at(1), old, at(1), GIVEN, source=REMAP_SOURCE, incoming=())
    observe(item, fresh, 51, at(60))

    levels = item.levels(at(60), terms_of(old, fresh))
    assert (levels.available, levels.stale, levels.status(limited_at=0)) == (51, False, "in_stock")
    retired = next(level for level in levels.suppliers if level.supplier_id == "old")
    assert (retired.stale, retired.excluded, retired.sellable) == (False, False, 0)
    observe(item, old, 0, at(61))  # a report of 0 is a report: it ages
    assert item.levels(at(65), terms_of(old, fresh)).stale


# Shipping and returns ------------------------------------------------------------------


def test_shipping_from_a_normal_supplier_lowers_its_level_until_a_newer_report() -> None:
    acme = supplier("acme")
    item = given(confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20)))

    item.ship("r1", allocations(acme=4), [], at(30), WHEN)

    [event] = item.collect_events()
    assert isinstance(event, StockItem.Shipped)
    shipped = item.levels(at(30), terms_of(acme))
    assert (shipped.committed, shipped.on_hand, shipped.sellable, shipped.available) == (
        0,
        10,
        6,
        6,
    )
    observe(item, acme, 10, at(25), when=at(35), cause=WHEN)
    assert item.levels(at(35), terms_of(acme)).available == 6
    observe(item, acme, 9, at(40), cause=WHEN)
    assert item.levels(at(40), terms_of(acme)).available == 9


def test_a_report_observed_at_the_very_moment_of_a_shipment_does_not_retire_it() -> None:
    acme = supplier("acme")
    history = confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20))
    history.ship("r1", allocations(acme=4), [], at(30), GIVEN)
    item = given(history)

    observe(item, acme, 10, at(30), when=at(31), cause=WHEN)

    assert item.levels(at(31), terms_of(acme)).available == 6


def test_shipping_from_a_net_of_our_orders_supplier_changes_no_number() -> None:
    acme = supplier("acme", reports_net_of_our_orders=True)
    item = given(confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20)))
    before = item.levels(at(30), terms_of(acme))

    item.ship("r1", allocations(acme=4), ["acme"], at(30), WHEN, terms=terms_of(acme))

    assert kinds(item.collect_events()) == [StockItem.Shipped]
    assert item.levels(at(30), terms_of(acme)) == before


def test_a_restock_adds_the_units_back_until_a_newer_report() -> None:
    acme = supplier("acme")
    history = confirmed_commitment(acme, level=10, quantity=4, confirm_at=at(20))
    history.ship("r1", allocations(acme=4), [], at(30), GIVEN)
    item = given(history)

    item.restock("r1", allocations(acme=3), at(50), WHEN)

    assert kinds(item.collect_events()) == [StockItem.Restocked]
    assert item.levels(at(50), terms_of(acme)).available == 9
    observe(item, acme, 6, at(60), cause=WHEN)
    assert item.levels(at(60), terms_of(acme)).available == 6


# Exposure ------------------------------------------------------------------------------


def test_a_report_below_what_is_promised_is_applied_and_flags_the_exposure() -> None:
    acme = supplier("acme", buffer=1)
    history = new_item()
    observe(history, acme, 10, at(0))
    history.hold("r1", allocations(acme=5), at(600), at(1), GIVEN)
    history.hold("r2", allocations(acme=2), at(600), at(2), GIVEN)
    history.confirm_hold("r2", allocations(acme=2), at(600), [], at(3), GIVEN)
    item = given(history)

    outcome = observe(item, acme, 5, at(10), cause=WHEN)

    assert outcome == ObservationOutcome.APPLIED
    [event] = item.collect_events()
    assert isinstance(event, StockItem.Observed)
    assert event.quantity == 5
    assert event.exposure == (5 + 2) - (5 - 1)
    levels = item.levels(at(10), terms_of(acme))
    assert (levels.on_hand, levels.held, levels.committed, levels.available) == (5, 5, 2, 0)


def test_a_report_that_still_covers_every_promise_has_no_exposure() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(0))
    history.hold("r1", allocations(acme=5), at(600), at(1), GIVEN)
    item = given(history)

    observe(item, acme, 5, at(10), cause=WHEN)

    [event] = item.collect_events()
    assert isinstance(event, StockItem.Observed)
    assert event.exposure == 0


# Causes and identity ---------------------------------------------------------------------


def _every_command(item: StockItem, acme: SupplierTerms) -> None:
    observe(item, acme, 10, at(10), cause=WHEN)
    observe(item, acme, 1, at(5), when=at(11), cause=WHEN)
    item.set_safety_stock(2, at(12), WHEN)
    item.hold("r1", allocations(acme=2), at(600), at(13), WHEN)
    item.hold("r2", allocations(acme=1), at(600), at(13), WHEN)
    item.release_hold("r2", allocations(acme=1), at(600), at(14), WHEN)
    item.extend_hold("r1", allocations(acme=2), at(600), at(900), at(14), WHEN)
    item.confirm_hold("r1", allocations(acme=2), at(900), [], at(15), WHEN)
    item.ship("r1", allocations(acme=1), [], at(16), WHEN)
    item.release_commitment("r1", allocations(acme=1), at(15), [], at(17), WHEN)
    item.restock("r1", allocations(acme=1), at(18), WHEN)


def test_every_event_carries_the_actor_reason_and_correlation_id_of_its_cause() -> None:
    acme = supplier("acme")
    item = StockItem.register(random_sku(), at(0), WHEN)

    _every_command(item, acme)

    events = item.collect_events()
    assert set(kinds(events)) == {
        StockItem.Registered,
        StockItem.Observed,
        StockItem.LateReportIgnored,
        StockItem.SafetyStockSet,
        StockItem.Held,
        StockItem.HoldReleased,
        StockItem.HoldExtended,
        StockItem.HoldConfirmed,
        StockItem.Shipped,
        StockItem.CommitmentReleased,
        StockItem.Restocked,
    }
    for event in events:
        assert (event.actor, event.reason, event.correlation_id) == (
            "oms-key",
            "oms.test",
            "req-when",
        ), type(event).__name__


def test_replaying_every_kind_of_event_rebuilds_the_same_state() -> None:
    acme = supplier("acme")
    item = StockItem.register(random_sku(), at(0), WHEN)
    _every_command(item, acme)

    rebuilt = replayed(item.collect_events())

    assert rebuilt.__dict__ == item.__dict__
    assert rebuilt.levels(at(19), terms_of(acme)) == item.levels(at(19), terms_of(acme))


def test_setting_the_same_safety_stock_again_records_nothing() -> None:
    item = given(new_item(safety_stock=2))

    assert item.set_safety_stock(2, at(5), WHEN) is False
    assert item.collect_events() == []
    assert item.set_safety_stock(4, at(6), WHEN) is True
    assert kinds(item.collect_events()) == [StockItem.SafetyStockSet]


def test_a_stock_item_id_is_derived_from_its_sku() -> None:
    sku = random_sku()

    item = StockItem.register(sku, at(0), GIVEN)

    assert item.id == uuid5(NAMESPACE_URL, f"/sku/{sku}") == StockItem.id_for(sku)


def _numbers(levels: StockLevels) -> tuple[int, int, int, int]:
    return levels.sellable, levels.held, levels.committed, levels.available


def test_a_late_report_changes_no_number() -> None:
    acme = supplier("acme")
    history = new_item()
    observe(history, acme, 10, at(10))
    history.hold("r1", allocations(acme=4), at(600), at(11), GIVEN)
    item = given(history)
    before = _numbers(item.levels(at(20), terms_of(acme)))

    observe(item, acme, 0, at(9), when=at(20), cause=WHEN)

    assert _numbers(item.levels(at(20), terms_of(acme))) == before == (10, 4, 0, 6)


def test_incoming_stock_is_news_of_the_level_yet_never_on_hand_or_sellable() -> None:
    acme = supplier("acme")
    item = new_item()
    expected = (("2026-02-01", 500), (None, 24))

    def report(
        seconds: float, incoming: tuple[tuple[str | None, int], ...] | None
    ) -> ObservationOutcome:
        return item.observe("acme", 10, at(seconds), acme, at(seconds), GIVEN, incoming=incoming)

    outcomes = [
        report(1, expected),
        report(2, expected),
        report(2.5, None),
        report(3, expected[:1]),
        report(4, ()),
    ]
    history = list(item.collect_events())

    assert outcomes == [
        ObservationOutcome.APPLIED,
        ObservationOutcome.UNCHANGED,  # the same level and the same schedule
        ObservationOutcome.UNCHANGED,  # the same level, and nothing said of the schedule
        ObservationOutcome.APPLIED,  # only the schedule changed
        ObservationOutcome.APPLIED,  # none expected any more
    ]
    assert [event.incoming for event in history if isinstance(event, StockItem.Observed)] == [
        [["2026-02-01", 500], [None, 24]],
        [["2026-02-01", 500]],
        [],
    ]
    part = replayed(history[:2])  # registered, then the first report
    assert part.positions["acme"].incoming == (("2026-02-01", 500), (None, 24))
    levels = part.levels(at(2), terms_of(acme))
    assert (levels.on_hand, levels.sellable, levels.suppliers[0].incoming) == (10, 10, expected)
    assert replayed(history).positions["acme"].incoming == ()


def test_an_observed_event_stored_before_incoming_stock_was_kept_reads_as_expecting_none() -> None:
    app = InventoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True)
    item = new_item()
    observe(item, supplier("acme"), 7, at(1))
    registered, observed = item.collect_events()
    stored = app.mapper.to_stored_event(observed)
    state = json.loads(stored.state)
    assert (state.pop("class_version"), state.pop("incoming"), state.pop("net")) == (3, None, False)
    before = StoredEvent(
        stored.originator_id, stored.originator_version, stored.topic, json.dumps(state).encode()
    )  # as version 1 wrote it

    read = app.mapper.to_domain_event(before)

    assert isinstance(read, StockItem.Observed)
    assert (read.quantity, read.incoming) == (7, None)  # it said nothing of it
    assert read.net is True  # read as net: counts no open order committed while net
    assert replayed([registered, read]).positions["acme"].incoming == ()


def test_a_report_that_says_nothing_of_incoming_stock_leaves_the_schedule_standing() -> None:
    acme = supplier("acme")
    item = new_item()
    item.observe("acme", 10, at(1), acme, at(1), GIVEN, incoming=(("2026-02-01", 500),))

    moved = item.observe("acme", 8, at(2), acme, at(2), GIVEN)  # e.g. a CSV: it cannot say
    history = list(item.collect_events())

    assert moved is ObservationOutcome.APPLIED
    assert history[-1].incoming is None  # the event records that it said nothing
    kept = replayed(history).positions["acme"]
    assert (kept.quantity, kept.incoming) == (8, (("2026-02-01", 500),))


def test_eta_days_is_the_lead_time_of_the_supplier_an_order_would_go_to() -> None:
    """Found by the storefront's walkthrough: it was the shortest lead time of any
    supplier with stock (here 1 day), while orders go to the preferred one (2 days); and
    it stayed set for a SKU that safety stock had put out of stock."""
    first = supplier("first", priority=1, lead_time_days=2)
    fast = supplier("fast", priority=3, lead_time_days=1)
    item = new_item()
    observe(item, first, 20, at(1))
    observe(item, fast, 20, at(2))
    terms = terms_of(first, fast)
    levels = item.levels(at(3), terms)
    allocated, _ = item.allocate(1, at(3), terms)
    assert allocated == allocations(first=1)
    assert levels.eta_days == 2

    guarded = new_item(safety_stock=100)
    observe(guarded, first, 20, at(1))
    out = guarded.levels(at(3), terms)
    assert out.available == 0
    assert out.eta_days is None
