"""Recording a delivery's dead letters on a database that already holds others'."""

from __future__ import annotations

import time

from api.runtime import Runtime
from connectors.deadletters import record_dead_letters
from connectors.outcome import Rejections
from ledger.delivery import Rejection

OTHERS = 30_000
NEW = 10_000


def test_a_new_supplier_s_many_letters_are_recorded_in_time_whatever_the_planner_knows(
    ledger: Runtime,
) -> None:
    """An operator walkthrough: the letters just written are in no statistics, and the
    planner, taking them for a row or two, compared each new letter with every open one of
    its supplier (nested loops): 10,000 letters took 22 s, 40,000 eleven minutes, every
    connector worker waiting on the supplier's letters meanwhile. About 0.1 s now."""
    with ledger.store.connection() as conn:
        conn.execute(
            "INSERT INTO connector_dead_letters"
            " (supplier_id, delivery_id, position, reason, record, raw)"
            " SELECT 'other', 'o-1', g, 'unmapped_supplier_sku',"
            "  jsonb_build_object('supplier_sku', 'O' || g, 'observed_at',"
            "   '2026-12-07T09:00:00+00:00', 'quantity', 1), '{}'::jsonb"
            " FROM generate_series(1, %s) g",
            (OTHERS,),
        )
        conn.execute("ANALYZE connector_dead_letters")
    rejections = Rejections()
    for position in range(1, NEW + 1):
        fields = {
            "supplier_sku": f"N{position}",
            "quantity": 1,
            "observed_at": "2026-12-07T08:00:00+00:00",
        }
        rejections.append(
            Rejection(position, "unmapped_supplier_sku", {"fields": fields, "raw": fields})
        )

    began = time.monotonic()
    with ledger.store.transaction() as conn:
        record_dead_letters(conn, "fresh", "f-1", rejections)
    took = time.monotonic() - began

    with ledger.store.connection() as conn:
        [row] = conn.execute(
            "SELECT count(*) AS open FROM connector_dead_letters"
            " WHERE supplier_id = 'fresh' AND status = 'open'"
        ).fetchall()
    assert row["open"] == NEW
    assert took < 5, f"{took:.1f} s for {NEW} letters"
