"""What every aggregate of the ledger shares: events that say who, why and in which request."""

from __future__ import annotations

from dataclasses import dataclass
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

    class Event(AggregateEvent):
        actor: str
        reason: str
        correlation_id: str
