"""Feed health per supplier: last success and error, failures in a row, breaker, lag, size."""

from __future__ import annotations

from typing import Any

from projections.store import Connection


def succeeded(
    conn: Connection,
    supplier_id: str,
    delivery_id: str,
    rows: int,
    applied: int,
    rejected: int,
    lag_seconds: float | None,
    late: int = 0,
) -> None:
    """Records a delivery applied: `late` counts its reports older than the levels on
    record, which change nothing (a supplier whose clock went back, or whose naive times
    are read in the wrong zone, showed only as lag: a supplier integrator's walkthrough)."""
    conn.execute(
        "INSERT INTO connector_health (supplier_id, last_success_at, consecutive_failures,"
        " last_delivery_id, last_rows, last_applied, last_rejected, last_lag_seconds,"
        " deliveries, rows, rows_deliveries, last_late, updated_at)"
        " VALUES (%s, now(), 0, %s, %s, %s, %s, %s, 1, %s, 1, %s, now())"
        " ON CONFLICT (supplier_id) DO UPDATE SET last_success_at = now(),"
        " consecutive_failures = 0, last_delivery_id = excluded.last_delivery_id,"
        " last_rows = excluded.last_rows, last_applied = excluded.last_applied,"
        " last_rejected = excluded.last_rejected, last_late = excluded.last_late,"
        " last_lag_seconds = coalesce(excluded.last_lag_seconds,"
        "   connector_health.last_lag_seconds),"
        " deliveries = connector_health.deliveries + 1,"
        " rows = connector_health.rows + excluded.rows,"
        " rows_deliveries = connector_health.rows_deliveries + 1, updated_at = now()",
        (supplier_id, delivery_id, rows, applied, rejected, lag_seconds, rows, late),
    )


def reached(conn: Connection, supplier_id: str) -> None:
    """Records a fetch that reached the supplier, news or none (a 304, an empty folder):
    a run of failures before it ends, whether fetches failed or deliveries were rejected
    or failed, and whichever process counted them. What it fetched, if anything, counts
    as a success or failure of its own once applied."""
    # Every good fetch asks, not only one after a failed fetch this process saw: the
    # worker counts a rejected delivery, and a restart forgets what this process saw.
    conn.execute(
        "UPDATE connector_health SET consecutive_failures = 0, updated_at = now()"
        " WHERE supplier_id = %s AND consecutive_failures > 0",
        (supplier_id,),
    )


def noted(conn: Connection, supplier_id: str, problem: str) -> None:
    """Shows a problem as the last error without counting it as a failure: one the
    connector works around (a file it took but could not move aside), which an operator
    must still fix."""
    conn.execute(
        "INSERT INTO connector_health (supplier_id, last_error_at, last_error, updated_at)"
        " VALUES (%s, now(), %s, now())"
        " ON CONFLICT (supplier_id) DO UPDATE SET last_error_at = now(),"
        " last_error = excluded.last_error, updated_at = now()",
        (supplier_id, problem[:2000]),
    )


def failed(conn: Connection, supplier_id: str, error: str) -> int:
    """Records a failure; returns how many in a row."""
    row = conn.execute(
        "INSERT INTO connector_health (supplier_id, last_error_at, last_error,"
        " consecutive_failures, failures, updated_at) VALUES (%s, now(), %s, 1, 1, now())"
        " ON CONFLICT (supplier_id) DO UPDATE SET last_error_at = now(),"
        " last_error = excluded.last_error,"
        " consecutive_failures = connector_health.consecutive_failures + 1,"
        " failures = connector_health.failures + 1, updated_at = now()"
        " RETURNING consecutive_failures",
        (supplier_id, error[:2000]),
    ).fetchone()
    return int(row["consecutive_failures"]) if row else 1


def set_breaker(conn: Connection, supplier_id: str, state: str) -> None:
    conn.execute(
        "INSERT INTO connector_health (supplier_id, breaker, updated_at) VALUES (%s, %s, now())"
        " ON CONFLICT (supplier_id) DO UPDATE SET breaker = excluded.breaker, updated_at = now()",
        (supplier_id, state),
    )


def not_fetched(conn: Connection, supplier_id: str, _problem: str = "") -> None:
    """A supplier no longer fetched (its connector removed, or left with no transport that
    fetches) shows its breaker closed: it stayed `open` for good, as no probe runs to
    close it, and its alert kept firing (a supplier integrator's walkthrough)."""
    conn.execute(
        "UPDATE connector_health SET breaker = 'closed', updated_at = now()"
        " WHERE supplier_id = %s AND breaker <> 'closed'",
        (supplier_id,),
    )


def report(conn: Connection, supplier_id: str | None = None) -> list[dict[str, Any]]:
    """Feed health per supplier, as the view `view_feed_health` holds it, with its open
    dead letters (`open_dead_letters`: a supplier whose every record is refused looked
    healthy here, its deliveries succeeding: an operator walkthrough)."""
    return conn.execute(
        "SELECT h.supplier_id, last_success_at, last_error_at, last_error,"
        " consecutive_failures, breaker, last_delivery_id, last_rows, last_applied,"
        " last_rejected, last_lag_seconds, last_late, deliveries, failures, rows_per_delivery,"
        " updated_at,"
        " (SELECT count(*) FROM connector_dead_letters d"
        "  WHERE d.supplier_id = h.supplier_id AND d.status = 'open') AS open_dead_letters"
        " FROM view_feed_health h"
        " WHERE %s::text IS NULL OR h.supplier_id = %s ORDER BY h.supplier_id",
        (supplier_id, supplier_id),
    ).fetchall()
