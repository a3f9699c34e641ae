"""Recording a delivery's dead letters on a database that already holds others'."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg import sql

from api.runtime import Runtime
from connectors.deadletters import (
    LETTERS_OF_SUPPLIER,
    SUPERSEDE,
    SUPERSEDED_ON_ARRIVAL,
    Dismissal,
    dismiss,
    record_dead_letters,
)
from connectors.outcome import Rejections
from ledger.delivery import Rejection

OTHERS = 30_000
NEW = 10_000


@pytest.mark.alone
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


def test_superseding_reads_the_supplier_s_open_letters_not_the_whole_table(
    ledger: Runtime,
) -> None:
    """A review: with nested loops off, the rows to close were found by a hash join over the
    whole table (every supplier's letters, resolved and dismissed ones too, kept for good),
    at each delivery that closed a letter."""
    with ledger.store.connection() as conn:
        conn.execute(
            "INSERT INTO connector_dead_letters"
            " (supplier_id, delivery_id, position, reason, record, raw, status)"
            " SELECT 'fresh', 'old-' || (g / 1000), g, 'unmapped_supplier_sku',"
            "  jsonb_build_object('supplier_sku', 'H' || g, 'observed_at',"
            "   '2026-12-07T07:00:00+00:00', 'quantity', 1), '{}'::jsonb, 'resolved'"
            " FROM generate_series(1, %s) g",
            (OTHERS,),
        )
        conn.execute("ANALYZE connector_dead_letters")
        plans = []
        with conn.transaction():
            conn.execute("SET LOCAL enable_nestloop = off")
            for statement in (SUPERSEDE, SUPERSEDED_ON_ARRIVAL):
                rows = conn.execute(
                    sql.SQL("EXPLAIN ") + statement, {"supplier": "fresh", "delivery": "f-2"}
                ).fetchall()
                plans.append("\n".join(row["QUERY PLAN"] for row in rows))

    for plan in plans:
        assert "Seq Scan on connector_dead_letters l" not in plan, plan


def test_a_dismissal_waits_for_the_supplier_s_delivery_recording_its_letters(
    ledger: Runtime,
) -> None:
    """A review: a delivery recording letters could close a letter by one being dismissed
    at that moment, unseen by the dismissal's reopening, and leave it closed by a dismissed
    letter for good. The two take turns by supplier."""
    with ledger.store.connection() as conn:
        [row] = conn.execute(
            "INSERT INTO connector_dead_letters"
            " (supplier_id, delivery_id, position, reason, record, raw)"
            " VALUES ('turns', 't-1', 1, 'unmapped_supplier_sku', '{}', '{}') RETURNING id"
        ).fetchall()
    done: list[Dismissal] = []
    with psycopg.connect(ledger.database_url) as recording, recording.transaction():
        recording.execute(LETTERS_OF_SUPPLIER, ("turns",))  # as record_dead_letters does
        dismissing = threading.Thread(
            target=lambda: done.append(dismiss(ledger.store, [row["id"]]))
        )
        dismissing.start()
        time.sleep(0.5)
        waited = dismissing.is_alive()
    dismissing.join(10)

    assert waited
    assert [d.dismissed for d in done] == [[row["id"]]]
