"""A command is decided no earlier than what it read was written, and a stream's times never
go back.

A command carries the time its request came. Another process may write the stock it reads
after that time and before the command is decided (while it waited, or after it
collided): deciding it at its own time would undo, for this command, what the other
process decided later. Found by walking the service with two API processes: a
confirmation sent 2 ms before a hold expired, decided after an order another process
took 2 ms after the expiry from the same units, confirmed the hold, and the units were
sold twice.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from api.runtime import Runtime, open_runtime
from api.settings import Settings
from ledger.commands import Confirm, PutSku
from ledger.reservation import ReservationExpired
from ledger.stock import StockItem
from ledger.supplier import Supplier
from tests.conftest import random_sku
from tests.integration.ledger_setup import CAUSE, now, reserve, stock_sku

MS = timedelta(milliseconds=2)


def test_a_hold_whose_units_another_process_sold_after_it_expired_is_not_confirmed(
    settings: Settings, runtime: Runtime
) -> None:
    sku = random_sku("EXPIRED")
    stock_sku(runtime.writer, sku, 5)
    hold = runtime.writer.execute(reserve([(sku, 5)], ttl=1)).value.reservation
    other = open_runtime(settings, migrate_first=False, sweep=False, project=False, connect=False)
    try:
        # Another API process, 2 ms after the hold ran out, gives its 5 units to an order.
        later = reserve([(sku, 5)], at=hold.expires_at + MS)
        assert other.writer.execute(later).value.reservation.status == "held"
    finally:
        other.close()

    # This process decides, after that, a confirmation that came 2 ms before the expiry.
    confirm = Confirm(at=hold.expires_at - MS, cause=CAUSE, reservation_id=hold.id)
    with pytest.raises(ReservationExpired):
        runtime.writer.execute(confirm)

    item = runtime.app.repository.get(StockItem.id_for(sku))
    terms = runtime.writer.app.repository.get(Supplier.id_for("acme")).terms
    levels = item.levels(hold.expires_at + 2 * MS, {"acme": terms})
    # The later order's hold, and nothing committed: no unit sold twice.
    assert (levels.sellable, levels.held, levels.committed) == (5, 5, 0)


def test_a_confirmation_decided_before_anything_later_was_written_still_counts(
    runtime: Runtime,
) -> None:
    """The same confirmation, 2 ms before the expiry, with nobody writing the stock since:
    confirmed (a request that came in time is served in time)."""
    sku = random_sku("INTIME")
    stock_sku(runtime.writer, sku, 5)
    hold = runtime.writer.execute(reserve([(sku, 5)], ttl=1)).value.reservation
    confirm = Confirm(at=hold.expires_at - MS, cause=CAUSE, reservation_id=hold.id)
    assert runtime.writer.execute(confirm).value.status == "confirmed"


def test_a_streams_event_times_never_go_back(runtime: Runtime) -> None:
    sku = random_sku("CLOCK")
    stock_sku(runtime.writer, sku, 5)
    reported = runtime.app.repository.get(StockItem.id_for(sku)).modified_on
    # An order whose request came (by its own clock) a minute before the stock was reported.
    runtime.writer.execute(reserve([(sku, 1)], at=now() - timedelta(minutes=1)))

    events = list(runtime.app.events.get(StockItem.id_for(sku)))
    times = [event.timestamp for event in events]
    assert times == sorted(times)
    assert times[-1] >= reported


def test_a_sku_read_at_a_position_is_read_no_earlier_than_its_own_last_event(
    runtime: Runtime,
) -> None:
    sku = random_sku("AUDITED")
    stock_sku(runtime.writer, sku, 5)
    runtime.writer.execute(reserve([(sku, 1)]))
    last = runtime.app.repository.get(StockItem.id_for(sku)).modified_on
    # Then another stream's event, stamped (by its request's clock) a minute earlier.
    early = now() - timedelta(minutes=1)
    other = runtime.writer.execute(
        PutSku(at=early, cause=CAUSE, sku=random_sku("EARLY"), safety_stock=0)
    )
    assert other.position is not None

    read = runtime.audit.stock_at(sku, position=other.position)
    assert read.at >= last
    assert read.levels.held == 1
