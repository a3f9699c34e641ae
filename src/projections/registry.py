"""The projections the service runs, and their first generation."""

from __future__ import annotations

from ledger.application import InventoryLedger
from projections.base import Projection
from projections.conflicts import ConflictsProjection, JumpThresholds
from projections.mappings import MappingsProjection
from projections.reservations import ReservationsProjection
from projections.stock import StockProjection
from projections.store import (
    Connection,
    create_control_tables,
    create_generation,
    generation,
    live_generation,
    switch_live,
)


def all_projections(app: InventoryLedger, jumps: JumpThresholds | None = None) -> list[Projection]:
    return [
        StockProjection(app),
        ReservationsProjection(app),
        MappingsProjection(app),
        ConflictsProjection(app, jumps),
    ]


def ensure_live_generations(conn: Connection, projections: list[Projection]) -> None:
    """Creates the control tables, and a first live generation for new projections; brings
    a live generation built by older code to this code's schema in place where its
    upgrades allow (one that needs a rebuild is rebuilt by its runner, blue/green).

    Callers serialise on the migration lock, so two processes never both create one.
    """
    create_control_tables(conn)
    for projection in projections:
        number = live_generation(conn, projection.name)
        if number is None:
            first = create_generation(
                conn, projection.name, projection.schema_version, projection.ddl()
            )
            switch_live(conn, projection.name, first.generation, projection.tables)
            continue
        live = generation(conn, projection.name, number)
        if live is not None and live.schema_version < projection.schema_version:
            projection.upgrade(conn, live)
