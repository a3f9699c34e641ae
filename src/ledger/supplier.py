"""Suppliers: who holds stock for us, and on what terms their reports count."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import AggregateCreated

from ledger.base import Cause, LedgerAggregate


@dataclass(frozen=True)
class SupplierTerms:
    """A supplier's configuration as the allocation and availability rules need it."""

    name: str
    priority: int = 100
    lead_time_days: int = 0
    moq: int | None = None
    buffer: int = 0
    stale_after_seconds: int | None = None
    exclude_after_seconds: int | None = None
    reports_net_of_our_orders: bool = False
    timezone: str = "UTC"
    connector: dict[str, Any] = field(default_factory=dict)

    @property
    def stale_after(self) -> timedelta | None:
        if self.stale_after_seconds is None:
            return None
        return timedelta(seconds=self.stale_after_seconds)

    @property
    def exclude_after(self) -> timedelta | None:
        if self.exclude_after_seconds is None:
            return None
        return timedelta(seconds=self.exclude_after_seconds)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SupplierTerms:
        return cls(**data)


class Supplier(LedgerAggregate):
    """A supplier and the history of its terms."""

    TOPIC = "stockledger:Supplier"
    # When the supplier last came to report net of our orders (`TermsChanged`); None
    # where it always has, or never has (a snapshot taken before it was kept: the same).
    net_since: datetime | None = None

    class Registered(LedgerAggregate.Event, AggregateCreated):
        TOPIC = "stockledger:Supplier.Registered"
        supplier_id: str
        terms: dict[str, Any]

    class TermsChanged(LedgerAggregate.Event):
        TOPIC = "stockledger:Supplier.TermsChanged"
        changes: dict[str, Any]

        def apply(self, supplier: Supplier) -> None:
            supplier.terms = replace(supplier.terms, **self.changes)
            if "reports_net_of_our_orders" in self.changes:
                now_net = supplier.terms.reports_net_of_our_orders
                supplier.net_since = self.timestamp if now_net else None

    class WentStale(LedgerAggregate.Event):
        """No report newer than `last_report_at` arrived within the supplier's stale_after."""

        TOPIC = "stockledger:Supplier.WentStale"
        last_report_at: datetime

        def apply(self, supplier: Supplier) -> None:
            supplier.stale_since = self.last_report_at

    class ReportsResumed(LedgerAggregate.Event):
        TOPIC = "stockledger:Supplier.ReportsResumed"
        last_report_at: datetime

        def apply(self, supplier: Supplier) -> None:
            supplier.stale_since = None

    def __init__(self, supplier_id: str, terms: dict[str, Any]) -> None:
        self.supplier_id = supplier_id
        self.terms = SupplierTerms.from_dict(terms)
        self.stale_since: datetime | None = None

    @staticmethod
    @functools.lru_cache(maxsize=200_000)
    def id_for(supplier_id: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/supplier/{supplier_id}")

    @classmethod
    def register(
        cls, supplier_id: str, terms: SupplierTerms, at: datetime, cause: Cause
    ) -> Supplier:
        return cls._create(
            cls.Registered,
            id=cls.id_for(supplier_id),
            supplier_id=supplier_id,
            terms=terms.as_dict(),
            timestamp=at,
            **cause.as_kwargs(),
        )

    def note_last_report(self, last_report_at: datetime, at: datetime, cause: Cause) -> bool:
        """Records that the supplier went stale, or came back; False when nothing changed."""
        limit = self.terms.stale_after
        stale = limit is not None and at - last_report_at > limit
        if stale and self.stale_since is None:
            event: type[LedgerAggregate.Event] = self.WentStale
        elif not stale and self.stale_since is not None:
            event = self.ReportsResumed
        else:
            return False
        self.trigger_event(event, last_report_at=last_report_at, timestamp=at, **cause.as_kwargs())
        return True

    def change_terms(self, terms: SupplierTerms, at: datetime, cause: Cause) -> bool:
        """Records the terms that differ from the current ones; False when nothing changed."""
        current, wanted = self.terms.as_dict(), terms.as_dict()
        changes = {name: value for name, value in wanted.items() if current[name] != value}
        if not changes:
            return False
        self.trigger_event(self.TermsChanged, changes=changes, timestamp=at, **cause.as_kwargs())
        return True
