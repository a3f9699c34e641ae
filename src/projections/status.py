"""How far each projection has got, and how far behind the log it is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from eventsourcing.persistence import Notification

from ledger.application import InventoryLedger
from projections.leases import generation_lease, running
from projections.store import ViewStore, generations, live_generation


@dataclass(frozen=True)
class ProjectionStatus:
    name: str
    generation: int
    live: bool
    position: int
    lag_events: int
    lag_seconds: float
    error: str | None
    failed_position: int | None
    # A generation that is not live is being built while its rebuild holds its lease;
    # one nobody holds was left by a rebuild that stopped (killed: the next rebuild, or a
    # projections worker as it starts, drops it).
    building: bool = False


def projection_status(store: ViewStore, app: InventoryLedger) -> list[ProjectionStatus]:
    """Every generation of every projection: position, lag in events and in seconds, error."""
    head = app.recorder.max_notification_id() or 0
    statuses = []
    with store.connection() as conn:
        every = generations(conn)
        held = running(conn, tuple(generation_lease(g.name, g.generation) for g in every))
        for found in every:
            lag = max(0, head - found.position)
            live = live_generation(conn, found.name) == found.generation
            # A failure at a position the generation has since passed is over (another
            # runner applied that event, as after a rollback and back: an upgrade
            # walkthrough saw the error shown at lag 0 until the next event).
            failing = found.failed_position is not None and found.failed_position > found.position
            statuses.append(
                ProjectionStatus(
                    name=found.name,
                    generation=found.generation,
                    live=live,
                    position=found.position,
                    lag_events=lag,
                    lag_seconds=_age_of_next(app, found.position) if lag else 0.0,
                    error=found.last_error if failing else None,
                    failed_position=found.failed_position if failing else None,
                    building=not live
                    and held.get(generation_lease(found.name, found.generation), 0) > 0,
                )
            )
    return statuses


def _age_of_next(app: InventoryLedger, position: int) -> float:
    """How long the oldest event the projection has not applied has been waiting."""
    page: list[Notification] = list(app.recorder.select_notifications(start=position + 1, limit=1))
    if not page:
        return 0.0
    recorded: datetime = vars(app.mapper.to_domain_event(page[0]))["timestamp"]
    return max(0.0, (datetime.now(UTC) - recorded).total_seconds())
