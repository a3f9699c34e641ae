"""Acknowledgements of conflicts: an operator saying "seen" is itself part of the history."""

from __future__ import annotations

from datetime import datetime
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import AggregateCreated

from ledger.base import Cause, LedgerAggregate


def conflict_id(kind: str, originator_id: UUID, originator_version: int) -> UUID:
    """A conflict's id, from the event that caused it: the same on every rebuild."""
    return uuid5(NAMESPACE_URL, f"/conflict/{kind}/{originator_id}/{originator_version}")


class ConflictAcknowledgement(LedgerAggregate):
    TOPIC = "stockledger:ConflictAcknowledgement"

    class Acknowledged(LedgerAggregate.Event, AggregateCreated):
        TOPIC = "stockledger:ConflictAcknowledgement.Acknowledged"
        note: str | None

    def __init__(self, note: str | None) -> None:
        self.note = note

    @classmethod
    def acknowledge(
        cls, conflict: UUID, note: str | None, at: datetime, cause: Cause
    ) -> ConflictAcknowledgement:
        return cls._create(
            cls.Acknowledged, id=conflict, note=note, timestamp=at, **cause.as_kwargs()
        )
