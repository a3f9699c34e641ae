"""A supplier that comes to report gross after reporting net of our orders.

Found by a merchandiser's walkthrough: its open orders, committed while it reported net
of them, counted nowhere once it reported gross, and its next report's units (which still
held them) were sold again: 20 promised against 10.
"""

from __future__ import annotations

import time

import pytest

from api.runtime import Runtime
from ledger.commands import Confirm, Fulfil
from ledger.errors import InsufficientStock
from projections.runner import rebuild
from projections.stock import StockProjection
from tests.conftest import random_sku
from tests.integration.ledger_setup import CAUSE, now, put_supplier, report, reserve, stock_sku


def test_orders_committed_while_net_count_in_the_views_once_the_supplier_reports_gross(
    ledger: Runtime,
) -> None:
    sku = random_sku()
    stock_sku(ledger.writer, sku, 10, "netco", reports_net_of_our_orders=True)
    held = ledger.writer.execute(reserve([(sku, 10)])).value.reservation
    ledger.writer.execute(Confirm(at=now(), cause=CAUSE, reservation_id=held.id))
    time.sleep(1.1)  # the reports come in later seconds than the confirmation
    report(ledger.writer, sku, 0, "netco")  # net of our 10
    put_supplier(ledger.writer, "netco")  # from now on gross
    time.sleep(1.1)
    report(ledger.writer, sku, 10, "netco")  # our 10 are not shipped yet: in its stock

    with pytest.raises(InsufficientStock):
        ledger.writer.execute(reserve([(sku, 1)]))
    head = ledger.app.recorder.max_notification_id()
    ledger.views.wait_for("stock", head, timeout=20)
    [levels] = ledger.views.availability([sku], now()).values()
    assert (levels.on_hand, levels.committed, levels.available) == (10, 10, 0)

    rebuild(StockProjection(ledger.app), ledger.app, ledger.store, ledger.leases)
    [rebuilt] = ledger.views.availability([sku], now()).values()
    assert (rebuilt.committed, rebuilt.available) == (10, 0)

    # Shipped now: out of committed, and off the level until a report newer than it (it
    # left committed only, and its 10 units were sold again; a review).
    ledger.writer.execute(
        Fulfil(at=now(), cause=CAUSE, reservation_id=held.id, lines=[(sku, 10, None)])
    )
    with pytest.raises(InsufficientStock):
        ledger.writer.execute(reserve([(sku, 1)]))
    ledger.views.wait_for("stock", ledger.app.recorder.max_notification_id(), timeout=20)
    [shipped] = ledger.views.availability([sku], now()).values()
    assert (shipped.on_hand, shipped.committed, shipped.available) == (10, 0, 0)


def test_a_supplier_switched_back_to_net_counts_its_open_orders_until_a_net_report(
    ledger: Runtime,
) -> None:
    """Found by a walkthrough and a review: switched back to net, its gross report (or a
    gross report made before the switch, processed after it) still held the open order,
    which counted nowhere."""
    sku = random_sku()
    stock_sku(ledger.writer, sku, 100, "flip", reports_net_of_our_orders=True)
    held = ledger.writer.execute(reserve([(sku, 30)])).value.reservation
    ledger.writer.execute(Confirm(at=now(), cause=CAUSE, reservation_id=held.id))
    time.sleep(1.1)
    report(ledger.writer, sku, 70, "flip")  # net of our 30
    put_supplier(ledger.writer, "flip")  # gross
    time.sleep(1.1)
    report(ledger.writer, sku, 100, "flip")  # gross: holds our 30
    made_before = now()
    time.sleep(0.1)
    put_supplier(ledger.writer, "flip", reports_net_of_our_orders=True)  # back to net
    report(ledger.writer, sku, 101, "flip", at=made_before)  # gross, arriving after the switch

    with pytest.raises(InsufficientStock):
        ledger.writer.execute(reserve([(sku, 72)]))
    ledger.views.wait_for("stock", ledger.app.recorder.max_notification_id(), timeout=20)
    [levels] = ledger.views.availability([sku], now()).values()
    assert (levels.on_hand, levels.committed, levels.available) == (101, 30, 71)

    time.sleep(1.1)
    report(ledger.writer, sku, 71, "flip")  # net, but within minutes of the switch
    ledger.views.wait_for("stock", ledger.app.recorder.max_notification_id(), timeout=20)
    [net_again] = ledger.views.availability([sku], now()).values()
    assert (net_again.committed, net_again.available) == (30, 41)  # counted twice: low
