"""Which holds expire when, followed from the event log, for the expiry sweeper."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from ledger.application import InventoryLedger
from ledger.reservation import Reservation

_PLACED = Reservation.Placed.TOPIC
_SETTLED = (
    Reservation.Confirmed.TOPIC,
    Reservation.Released.TOPIC,
    Reservation.Expired.TOPIC,
)


class OpenHolds:
    """Reservations still on hold, with their expiry, kept current by reading new events."""

    def __init__(self, app: InventoryLedger, page_size: int = 1000) -> None:
        self.app = app
        self.page_size = page_size
        self.position = 0
        self._expiry: dict[UUID, datetime] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def catch_up(self) -> None:
        topics = [_PLACED, *_SETTLED]
        while True:
            page = self.app.recorder.select_notifications(
                start=self.position + 1, limit=self.page_size, topics=topics
            )
            for notification in page:
                event = self.app.mapper.to_domain_event(notification)
                if isinstance(event, Reservation.Placed):
                    self._expiry[event.originator_id] = event.expires_at
                else:
                    self._expiry.pop(event.originator_id, None)
            if page:
                self.position = page[-1].id
            if len(page) < self.page_size:
                return

    def due(self, at: datetime) -> list[UUID]:
        """Holds whose time has come, soonest first."""
        due = [(expires, rid) for rid, expires in self._expiry.items() if expires <= at]
        return [rid for _, rid in sorted(due)]

    def forget(self, reservation_ids: list[UUID]) -> None:
        for reservation_id in reservation_ids:
            self._expiry.pop(reservation_id, None)
