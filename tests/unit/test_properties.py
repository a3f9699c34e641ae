"""Properties that hold whatever suppliers report and whatever the OMS asks, in any order."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ledger.application import InventoryLedger
from ledger.base import Cause, LedgerAggregate
from ledger.commands import (
    Cancel,
    Command,
    Confirm,
    ExpireHolds,
    Fulfil,
    Observation,
    PutSku,
    PutSupplier,
    Release,
    ReportStock,
    Reserve,
    Return,
)
from ledger.errors import ExceedsOpenQuantity, InsufficientStock, InvalidState
from ledger.queries import LedgerQueries
from ledger.reservation import (
    OPEN_COMMITMENTS,
    Reservation,
    ReservationExpired,
    ReservationStatus,
)
from ledger.stock import StockItem, StockLevels
from ledger.supplier import SupplierTerms
from ledger.writer import LedgerWriter, Outcome

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
CAUSE = Cause(actor="property-test", reason="test.property", correlation_id="req-property")
SUPPLIER_IDS = ("s1", "s2", "s3")

# A passing run takes seconds; shrinking a failure may take Hypothesis up to five minutes,
# which must not be cut short by the suite's default timeout.
pytestmark = pytest.mark.timeout(600)
HELD, EXPIRED, RELEASED, FULFILLED = (
    ReservationStatus.HELD,
    ReservationStatus.EXPIRED,
    ReservationStatus.RELEASED,
    ReservationStatus.FULFILLED,
)


@st.composite
def supplier_terms(draw: st.DrawFn, supplier_id: str) -> SupplierTerms:
    return SupplierTerms(
        name=supplier_id,
        priority=draw(st.integers(1, 3)),
        lead_time_days=draw(st.integers(0, 5)),
        buffer=draw(st.integers(0, 3)),
        stale_after_seconds=draw(st.none() | st.integers(30, 1800)),
        exclude_after_seconds=draw(st.none() | st.integers(60, 3600)),
        reports_net_of_our_orders=draw(st.booleans()),
    )


def state(aggregate: Any) -> dict[str, Any]:
    return {name: value for name, value in vars(aggregate).items() if name != "_pending_events"}


def replayed(events: Iterable[Any]) -> Any:
    aggregate = None
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


class RecordingLedger(InventoryLedger):
    """The in-memory ledger, keeping every aggregate as the handlers left it when it was saved."""

    def __init__(self) -> None:
        super().__init__({"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True)
        self.last_saved: dict[UUID, LedgerAggregate] = {}
        self.just_saved: set[UUID] = set()

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        recordings = super().save(*objs, **kwargs)
        for obj in objs:
            if isinstance(obj, LedgerAggregate):
                self.last_saved[obj.id] = obj
                self.just_saved.add(obj.id)
        return recordings


class LedgerMachine(RuleBasedStateMachine):
    """Suppliers report and the OMS reserves, confirms, releases, fulfils and takes returns
    while the clock moves; holds expire and stock items are snapshotted along the way."""

    def __init__(self) -> None:
        super().__init__()
        self.app = RecordingLedger()
        self.writer = LedgerWriter(self.app)
        self.queries = LedgerQueries(self.app)
        self.now = T0
        self.skus: list[str] = []
        self.reservations: list[UUID] = []
        self.commands = 0

    # Helpers -------------------------------------------------------------------------

    def run(self, command: Command) -> Outcome[Any]:
        self.commands += 1
        return self.writer.apply(command)

    def refused(self, command: Command, error: type[Exception]) -> None:
        with pytest.raises(error):
            self.run(command)

    def sku(self, pick: int) -> str:
        return self.skus[pick % len(self.skus)]

    def reservation(self, pick: int, fits: Callable[[Reservation], bool]) -> Reservation:
        """A reservation the command fits when there is one (so that whole lifecycles get
        explored), else any; counting back from the newest."""
        every = [self.queries.reservation(rid) for rid in reversed(self.reservations)]
        candidates = [reservation for reservation in every if fits(reservation)] or every
        return candidates[pick % len(candidates)]

    def levels(self, sku: str) -> StockLevels:
        return self.queries.stock_levels(sku, self.now)

    # Set-up ----------------------------------------------------------------------------

    @initialize(
        terms=st.tuples(*(supplier_terms(supplier_id) for supplier_id in SUPPLIER_IDS)),
        safety_stocks=st.lists(st.integers(0, 3), min_size=2, max_size=3),
        opening_stock=st.lists(st.integers(0, 30), min_size=9, max_size=9),
    )
    def suppliers_and_skus(
        self, terms: tuple[SupplierTerms, ...], safety_stocks: list[int], opening_stock: list[int]
    ) -> None:
        for supplier in terms:
            self.run(
                PutSupplier(at=self.now, cause=CAUSE, supplier_id=supplier.name, terms=supplier)
            )
        for number, safety_stock in enumerate(safety_stocks):
            sku = f"SKU-{number}"
            self.run(PutSku(at=self.now, cause=CAUSE, sku=sku, safety_stock=safety_stock))
            self.skus.append(sku)
        for number, supplier in enumerate(terms):
            levels = opening_stock[number * 3 : number * 3 + len(self.skus)]
            self.report(supplier.name, [(pick, level, 0) for pick, level in enumerate(levels)])

    # Suppliers and the clock -------------------------------------------------------------

    @rule(
        supplier_id=st.sampled_from(SUPPLIER_IDS),
        levels=st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 30), st.integers(-60, 900)),
            min_size=1,
            max_size=3,
        ),
    )
    def a_supplier_reports(self, supplier_id: str, levels: list[tuple[int, int, int]]) -> None:
        self.report(supplier_id, levels)

    def report(self, supplier_id: str, levels: list[tuple[int, int, int]]) -> None:
        """The supplier reports (SKU pick, quantity, age in seconds) triples."""
        observations = [
            Observation(
                index=index,
                sku=self.sku(pick),
                quantity=quantity,
                observed_at=self.now - timedelta(seconds=age),
            )
            for index, (pick, quantity, age) in enumerate(levels)
        ]
        outcome = self.run(
            ReportStock(
                at=self.now,
                cause=CAUSE,
                supplier_id=supplier_id,
                delivery_id=f"delivery-{self.commands}",
                content_hash=f"hash-{self.commands}",
                source="property-feed",
                rows=len(observations),
                observations=observations,
            )
        ).value
        assert outcome.applied + outcome.unchanged + outcome.late + len(outcome.rejected) == len(
            observations
        )

    @rule(seconds=st.sampled_from([0.25, 0.5, 1, 5, 30, 60, 300, 900, 3600]) | st.integers(0, 90))
    def time_passes(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    @rule()
    def the_stock_is_snapshotted(self) -> None:
        for sku in self.skus:
            item_id = StockItem.id_for(sku)
            latest = list(self.app.snapshots.get(item_id, desc=True, limit=1))
            if (
                not latest
                or latest[0].originator_version < self.app.repository.get(item_id).version
            ):
                self.app.take_snapshot(item_id)

    # Orders --------------------------------------------------------------------------------

    @rule(
        lines=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 8)), min_size=1, max_size=3),
        ttl=st.sampled_from([1, 30, 60, 300, 900]) | st.integers(1, 120),
    )
    def the_oms_reserves(self, lines: list[tuple[int, int]], ttl: int) -> None:
        command = Reserve(
            at=self.now,
            cause=CAUSE,
            client="oms",
            idempotency_key=f"key-{self.commands}",
            order_id=f"order-{self.commands}",
            lines=[(self.sku(pick), quantity) for pick, quantity in lines],
            ttl_seconds=ttl,
            default_ttl_seconds=900,
        )
        wanted = command.summed_lines()
        before = {sku: self.levels(sku) for sku in wanted}
        short = {
            sku: (quantity, before[sku].available)
            for sku, quantity in wanted.items()
            if quantity > before[sku].available
        }
        if short:
            with pytest.raises(InsufficientStock) as refusal:
                self.run(command)
            assert {s.sku: (s.requested, s.available) for s in refusal.value.shortfalls} == short
            assert {sku: self.levels(sku) for sku in wanted} == before
            return
        reservation = self.run(command).value.reservation
        self.reservations.append(reservation.id)
        for sku, quantity in wanted.items():
            after = self.levels(sku)
            # (a) the invariant holds the moment a reservation is accepted
            assert after.held + after.committed <= after.sellable, (sku, before[sku], after)
            assert after.held == before[sku].held + quantity
            # (b) no supplier is allocated more than it could still promise
            capacity = {level.supplier_id: level.capacity for level in before[sku].suppliers}
            allocations = reservation.lines[sku].allocations
            assert sum(allocations.values()) == quantity
            for supplier_id, allocated in allocations.items():
                assert 0 < allocated <= capacity.get(supplier_id, 0), (sku, supplier_id)

    @precondition(lambda self: self.reservations)
    @rule(pick=st.integers(min_value=0))
    def the_oms_confirms(self, pick: int) -> None:
        reservation = self.reservation(pick, lambda r: r.status_at(self.now) == HELD)
        command = Confirm(at=self.now, cause=CAUSE, reservation_id=reservation.id)
        status = reservation.status_at(self.now)
        if status == EXPIRED:
            self.refused(command, ReservationExpired)
        elif status == RELEASED:
            self.refused(command, InvalidState)
        else:
            confirmed = self.run(command).value
            assert confirmed.status != HELD

    @precondition(lambda self: self.reservations)
    @rule(pick=st.integers(min_value=0))
    def the_oms_releases(self, pick: int) -> None:
        reservation = self.reservation(pick, lambda r: r.status_at(self.now) != FULFILLED)
        command = Release(at=self.now, cause=CAUSE, reservation_id=reservation.id)
        if reservation.status_at(self.now) == FULFILLED:
            self.refused(command, InvalidState)
        else:
            self.run(command)

    @precondition(lambda self: self.reservations)
    @rule(pick=st.integers(min_value=0), line=st.integers(min_value=0), quantity=st.integers(1, 6))
    def the_oms_fulfils_part(self, pick: int, line: int, quantity: int) -> None:
        reservation = self.reservation(pick, lambda r: r.status_at(self.now) in OPEN_COMMITMENTS)
        lines = list(reservation.lines.values())
        sku = lines[line % len(lines)].sku
        still_open = sum(reservation.lines[sku].open_by_supplier().values())
        command = Fulfil(
            at=self.now, cause=CAUSE, reservation_id=reservation.id, lines=[(sku, quantity, None)]
        )
        if reservation.status_at(self.now) not in OPEN_COMMITMENTS:
            self.refused(command, InvalidState)
        elif quantity > still_open:
            self.refused(command, ExceedsOpenQuantity)
        else:
            fulfilled = self.run(command).value
            assert fulfilled.lines[sku].fulfilled_quantity == (
                reservation.lines[sku].fulfilled_quantity + quantity
            )

    @precondition(lambda self: self.reservations)
    @rule(pick=st.integers(min_value=0), line=st.integers(min_value=0), quantity=st.integers(1, 6))
    def the_oms_cancels_part(self, pick: int, line: int, quantity: int) -> None:
        reservation = self.reservation(
            pick, lambda r: r.status_at(self.now) in (HELD, *OPEN_COMMITMENTS)
        )
        lines = list(reservation.lines.values())
        sku = lines[line % len(lines)].sku
        still_open = sum(reservation.lines[sku].open_by_supplier().values())
        status = reservation.status_at(self.now)
        command = Cancel(
            at=self.now, cause=CAUSE, reservation_id=reservation.id, lines=[(sku, quantity, None)]
        )
        if status == EXPIRED:
            self.refused(command, ReservationExpired)
        elif status != HELD and status not in OPEN_COMMITMENTS:
            self.refused(command, InvalidState)
        elif quantity > still_open:
            self.refused(command, ExceedsOpenQuantity)
        else:
            held_before = self.levels(sku).held
            cancelled = self.run(command).value
            assert cancelled.lines[sku].cancelled_quantity == (
                reservation.lines[sku].cancelled_quantity + quantity
            )
            if status == HELD:
                assert self.levels(sku).held == held_before - quantity

    @precondition(lambda self: self.reservations)
    @rule(
        pick=st.integers(min_value=0),
        line=st.integers(min_value=0),
        quantity=st.integers(1, 4),
        restock=st.booleans(),
    )
    def a_customer_returns(self, pick: int, line: int, quantity: int, restock: bool) -> None:
        reservation = self.reservation(
            pick, lambda r: any(each.returnable_by_supplier() for each in r.lines.values())
        )
        lines = list(reservation.lines.values())
        sku = lines[line % len(lines)].sku
        returnable = sum(reservation.lines[sku].returnable_by_supplier().values())
        command = Return(
            at=self.now,
            cause=CAUSE,
            reservation_id=reservation.id,
            lines=[(sku, quantity, None)],
            restock=restock,
        )
        if quantity > returnable:
            self.refused(command, ExceedsOpenQuantity)
        else:
            self.run(command)

    @precondition(lambda self: self.reservations)
    @rule()
    def the_sweeper_expires_holds(self) -> None:
        due = []
        for reservation_id in self.reservations:
            reservation = self.queries.reservation(reservation_id)
            if reservation.status == HELD and self.now >= reservation.expires_at:
                due.append(reservation_id)
        swept = self.run(
            ExpireHolds(at=self.now, cause=CAUSE, reservation_ids=list(self.reservations))
        ).value
        assert swept == due

    # (c) the history rebuilds what the handlers saved ------------------------------------

    @invariant()
    def replaying_the_history_rebuilds_what_was_saved(self) -> None:
        for aggregate_id in self.app.just_saved:
            live = self.app.last_saved[aggregate_id]
            assert state(replayed(self.app.events.get(aggregate_id))) == state(live)
            assert state(self.app.repository.get(aggregate_id)) == state(live)
        self.app.just_saved.clear()

    def teardown(self) -> None:
        for aggregate_id, live in self.app.last_saved.items():
            assert state(replayed(self.app.events.get(aggregate_id))) == state(live)


# 200 runs of up to 40 steps (20 s; 300 took 30 s of a suite that must stay well under 15
# minutes): each run of the suite draws new ones.
LedgerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_the_ledger_never_promises_more_than_it_may_and_its_history_replays = LedgerMachine.TestCase
