"""What every aggregate of the ledger shares: events that say who, why and in which request."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import AggregateEvent, BaseAggregate, Snapshot
from eventsourcing.utils import register_topic


@dataclass(frozen=True)
class Cause:
    """Who caused a change, the reason code, and the request or delivery it belongs to."""

    actor: str
    reason: str
    correlation_id: str

    def as_kwargs(self) -> dict[str, str]:
        return {"actor": self.actor, "reason": self.reason, "correlation_id": self.correlation_id}


# What a snapshot leaves out: the library restores them from the snapshot itself.
_RESTORED = ("_id", "_version", "_pending_events")


class LedgerSnapshot(Snapshot):
    """A snapshot without the bookkeeping attributes the library restores anyway."""

    TOPIC = "stockledger:Snapshot"

    @classmethod
    def take(cls, aggregate: Any) -> LedgerSnapshot:
        snapshot = super().take(aggregate)
        for name in _RESTORED:
            snapshot.state.pop(name, None)
        return snapshot

    @staticmethod
    def state_of(aggregate: Any) -> dict[str, Any]:
        """The state `take` would record, without the snapshot around it (and the clock
        read for its timestamp): the views keep each changed aggregate's state so, and
        the snapshot cost a fifth of writing it (timeit)."""
        state = dict(vars(aggregate))
        class_version = getattr(type(aggregate), "class_version", 1)
        if class_version > 1:
            state["class_version"] = class_version
        for name in _RESTORED:
            state.pop(name, None)
        return state


register_topic(LedgerSnapshot.TOPIC, LedgerSnapshot)


class LedgerAggregate(BaseAggregate[UUID]):
    """Base of the ledger's aggregates. Subclasses pin explicit, stable topics."""

    Snapshot = LedgerSnapshot

    def trigger_event(self, event_class: type[Any], **kwargs: Any) -> None:
        """As the library's, but a stream's times never go back: an event is stamped no
        earlier than the one before it. A command carries the time its request came, and
        another process may have written the stream since with a later one (an order
        decided while this one waited, or retried after a collision); a delivery's parts
        carry the time they were made. Audits read a stream's state at a time by its
        events' times, in version order."""
        timestamp = kwargs.get("timestamp")
        if timestamp is not None and timestamp < self.modified_on:
            kwargs["timestamp"] = self.modified_on
        super().trigger_event(event_class, **kwargs)

    class Event(AggregateEvent):
        actor: str
        reason: str
        correlation_id: str


def decided_at(at: datetime, *read: BaseAggregate[UUID] | None) -> datetime:
    """When a command is decided: when its request came, or, if anything it read was
    written later (by another process, say, while this one waited or after it collided),
    then. A hold that expired before an order another process granted from its units
    must not be confirmed as if the confirmation came first (that would sell its units
    twice)."""
    return max([at, *(aggregate.modified_on for aggregate in read if aggregate is not None)])
