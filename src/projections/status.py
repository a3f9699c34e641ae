"""How far each projection has got, and how far behind the log it is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from eventsourcing.persistence import Notification

from ledger.application import InventoryLedger
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


def projection_status(store: ViewStore, app: InventoryLedger) -> list[ProjectionStatus]:
    """Every generation of every projection: position, lag in events and in seconds, error."""
    head = app.recorder.max_notification_id() or 0
    statuses = []
    with store.connection() as conn:
        for found in generations(conn):
            lag = max(0, head - found.position)
            # A failure at a position the generation has since passed is over (another
            # runner applied that event, as after a rollback and back: an upgrade
            # walkthrough saw the error shown at lag 0 until the next event).
            failing = found.failed_position is not None and found.failed_position > found.position
            statuses.append(
                ProjectionStatus(
                    name=found.name,
                    generation=found.generation,
                    live=live_generation(conn, found.name) == found.generation,
                    position=found.position,
                    lag_events=lag,
                    lag_seconds=_age_of_next(app, found.position) if lag else 0.0,
                    error=found.last_error if failing else None,
                    failed_position=found.failed_position if failing else None,
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
