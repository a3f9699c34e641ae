"""A process running when newer code migrates its database stops following the log."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg

from projections.data_version import DATA_VERSION
from tests.conftest import fresh_database, start_server, stop_server
from tests.e2e.test_reservation_lifecycle import new_supplier, ok, reserve, stocked_sku


def test_a_process_that_finds_newer_data_stops_its_runners_and_is_not_ready(
    postgres_server_url: str, tmp_path: Path
) -> None:
    """An upgrade walkthrough: an old process left running beside the new one read only
    the kinds of events it knew, so its projection runners passed over the new ones and
    their views stayed wrong until rebuilt; its sweeper failed every second and recorded
    no expiry; and it stayed ready. Now its runners stop without writing a page past the
    newer data, its sweeper stops, and it says it is not ready."""
    with fresh_database(postgres_server_url) as database_url:
        server = start_server(database_url, tmp_path, workers=1)
        try:
            with server.client("test-admin") as admin, server.client("test-oms") as oms:
                sku = stocked_sku(admin, {new_supplier(admin): 10})
                ok(reserve(oms, (sku, 1)), 201)
                ready_before = admin.get("/readyz")
                with psycopg.connect(database_url, autocommit=True) as conn:
                    conn.execute("UPDATE ledger_data_version SET version = %s", (DATA_VERSION + 1,))
                after = ok(reserve(oms, (sku, 2)), 201)  # written: the writer goes on
                deadline = time.monotonic() + 20
                while server.log().count("projection.newer_data") < 4:  # every view's runner
                    assert time.monotonic() < deadline, server.log()[-3000:]
                    time.sleep(0.2)
                ready_after = admin.get("/readyz")
                with psycopg.connect(database_url) as conn:
                    written = conn.execute(
                        "SELECT max(notification_id) FROM inventoryledger_events"
                    ).fetchone()
                    views = conn.execute(
                        "SELECT name, max(position) FROM ledger_projection_generations"
                        " GROUP BY name ORDER BY name"
                    ).fetchall()
        finally:
            stop_server(server)

    assert ready_before.status_code == 200
    assert ready_before.json()["checks"]["newer_data"] is None
    assert after["status"] == "held"
    assert written is not None
    # No view went past what was written before the newer data: the last order is in none.
    assert all(view_position < written[0] for _, view_position in views), (views, written)
    assert ready_after.status_code == 503
    assert ready_after.json()["checks"]["newer_data"] == DATA_VERSION + 1
    assert "sweeper.newer_data" in server.log()
