"""The data version: what this code writes that older code cannot read, as a number.

`ledger migrate` records it (api.database); code older than the data refuses to start
on it, and a process already running when newer code migrated the database stops what
would write or follow the log on its behalf (`newer_data_version`): its projection
runners (which read only the event kinds they know, and would have passed over the new
ones, their views wrong for good), its sweeper, and its readiness.
"""

from __future__ import annotations

from typing import Any

import psycopg

# What this code writes that older code cannot read, as a number: raised whenever code
# writes something new of that kind (an event type, a table older code would misread).
# 1: `StockItem.HoldsExpired` events. Code from before this guard reads none of it and
# does not look: rolled back to it, a database fails on each SKU such an event names.
# 2: `StockItem.Observed` version 3, `HoldConfirmed`, `CommitmentReleased`, `Shipped` and
# `Reservation.Confirmed` version 2 (open orders against net suppliers counted), and the
# stock view at schema version 5, upgraded in place: code of version 1 fails on those
# events, and would find the view built by newer code and stand by, its stock frozen.
# 3: `StockItem.SupplierSkuRemapped` events (a remap off a SKU, in its history), which
# code of version 2 cannot read (it fails on every SKU whose history holds one), and the
# mappings view at schema version 3 (`units_since`), upgraded in place.
# 4: the reservations view at schema version 2 (indexed by client), upgraded in place:
# code of version 3 would find it built by newer code and stand by, its reservations
# frozen.
# 5: `Reservation.Extended` and `StockItem.HoldExtended` events (a hold kept longer), which
# code of version 4 cannot read.
# 6: `Reservation.LinesCancelled` events (units of some lines cancelled), and reservation
# states (snapshots, the reservations view) whose lines keep `cancelled`: code of version 5
# cannot read either.
DATA_VERSION = 6


class NewerData(RuntimeError):
    """Newer code migrated the database while this process ran: it must not go on."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"the database holds data of version {version}, newer than this code's"
            f" {DATA_VERSION}: stop this process and run the newer version"
        )
        self.version = version


def newer_data_version(conn: psycopg.Connection[Any]) -> int | None:
    """The database's data version where newer code recorded one above this code's (one
    query, once the table is known to be there: a projection runner asks at every page)."""
    database = (conn.info.host, conn.info.port, conn.info.dbname)
    if database not in _tables_seen:
        found = conn.execute("SELECT to_regclass('ledger_data_version') IS NOT NULL").fetchone()
        if found is None or not _first(found):
            return None
        _tables_seen.add(database)
    row = conn.execute("SELECT max(version) FROM ledger_data_version").fetchone()
    version = None if row is None else _first(row)
    return version if version is not None and version > DATA_VERSION else None


# The databases in which the table was found (it is never dropped).
_tables_seen: set[tuple[str, int, str]] = set()


def _first(row: Any) -> Any:
    """A row's first column, whatever the connection's row factory."""
    return next(iter(row.values())) if isinstance(row, dict) else row[0]
