"""Feed deliveries: one supplier report (a request body, a file, a poll page) and what came of it.

The id comes from the supplier's own batch id or the content hash, so delivering the
same thing twice changes nothing. The outcome, refused records included, is saved in
the same transaction as the stock changes it caused.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import AggregateCreated

from ledger.base import Cause, LedgerAggregate

# What a refusal keeps of a refused record: containers nested deeper than this are cut
# (a client's record nested thousands deep made keeping it fail), and a NUL in text, which
# PostgreSQL refuses in text and JSON alike, becomes U+FFFD, as does a lone UTF-16
# surrogate (JSON's "\ud800" escape reads as one), which UTF-8 cannot encode: kept, it
# failed the event that carries the refusal, and the report with it.
KEPT_DEPTH = 16
CUT = "(nested too deeply)"
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNWRITABLE = re.compile("[\x00\ud800-\udfff]")


def lone_surrogate(text: str) -> bool:
    """Whether `text` holds a UTF-16 surrogate code point, which UTF-8 cannot encode."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def _writable(text: str) -> str:
    """`text` as a refusal keeps it: NUL and lone surrogates become U+FFFD."""
    if text.isascii():
        return text.replace("\x00", "\ufffd")
    return _UNWRITABLE.sub("\ufffd", text)


def kept_cheaply(value: Any) -> Any:
    """`value` as `kept` keeps it: the value itself where it is already so (a record of
    plain values, or records of them: most refusals are; 9 µs a refusal saved, a million
    refusals being 9 s), else `kept`'s copy."""
    if _plain(value, 1):
        return value
    return kept(value)


def _plain(value: Any, nested: int) -> bool:
    """Whether `value` is a dict of text without NUL or lone surrogates (keys too), whole
    numbers, booleans, None and (`nested` deep) dicts of those."""
    if type(value) is not dict:
        return False
    for name, item in value.items():
        if type(name) is not str or "\x00" in name or lone_surrogate(name):
            return False
        if item is None or type(item) in (int, bool):
            continue
        if type(item) is str:
            if "\x00" in item or lone_surrogate(item):
                return False
        elif not (nested and _plain(item, nested - 1)):
            return False
    return True


def kept(value: Any) -> Any:
    """`value` (JSON-like) as a refusal keeps it, a new copy; walked without recursion."""
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, int]] = [(value, root, 0, 0)]
    while stack:
        item, parent, key, depth = stack.pop()
        if isinstance(item, str):
            parent[key] = _writable(item)
        elif isinstance(item, dict | list | tuple) and depth >= KEPT_DEPTH:
            parent[key] = CUT
        elif isinstance(item, dict):
            copied: dict[Any, Any] = {}
            parent[key] = copied
            for name, inner in item.items():
                name = _writable(name) if isinstance(name, str) else name
                stack.append((inner, copied, name, depth + 1))
        elif isinstance(item, list | tuple):
            listed: list[Any] = [None] * len(item)
            parent[key] = listed
            stack.extend((inner, listed, i, depth + 1) for i, inner in enumerate(item))
        else:
            parent[key] = item
    return root[0]


@dataclass(frozen=True)
class Rejection:
    """A record of a delivery that was refused, and why."""

    index: int
    reason: str
    record: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeliveryOutcome:
    delivery_id: str
    rows: int
    applied: int
    unchanged: int
    late: int
    rejected: list[Rejection]

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id,
            "rows": self.rows,
            "applied": self.applied,
            "unchanged": self.unchanged,
            "late": self.late,
            "rejected": [rejection.as_dict() for rejection in self.rejected],
        }


class FeedDelivery(LedgerAggregate):
    TOPIC = "stockledger:FeedDelivery"

    class Recorded(LedgerAggregate.Event, AggregateCreated):
        TOPIC = "stockledger:FeedDelivery.Recorded"
        supplier_id: str
        delivery_id: str
        content_hash: str
        source: str
        rows: int
        applied: int
        unchanged: int
        late: int
        rejected: list[dict[str, Any]]

    def __init__(
        self,
        supplier_id: str,
        delivery_id: str,
        content_hash: str,
        source: str,
        rows: int,
        applied: int,
        unchanged: int,
        late: int,
        rejected: list[dict[str, Any]],
    ) -> None:
        self.supplier_id = supplier_id
        self.delivery_id = delivery_id
        self.content_hash = content_hash
        self.source = source
        self.outcome = DeliveryOutcome(
            delivery_id=delivery_id,
            rows=rows,
            applied=applied,
            unchanged=unchanged,
            late=late,
            rejected=[Rejection(**rejection) for rejection in rejected],
        )

    @staticmethod
    def id_for(supplier_id: str, delivery_id: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/delivery/{supplier_id}/{delivery_id}")

    @classmethod
    def record(
        cls,
        supplier_id: str,
        content_hash: str,
        source: str,
        outcome: DeliveryOutcome,
        at: datetime,
        cause: Cause,
    ) -> FeedDelivery:
        return cls._create(
            cls.Recorded,
            id=cls.id_for(supplier_id, outcome.delivery_id),
            supplier_id=supplier_id,
            delivery_id=outcome.delivery_id,
            content_hash=content_hash,
            source=source,
            rows=outcome.rows,
            applied=outcome.applied,
            unchanged=outcome.unchanged,
            late=outcome.late,
            # Each record as a refusal keeps it, whoever refused it: a feed's first refusals
            # come as they were read (see connectors.outcome), lone surrogates and all.
            rejected=[
                {"index": r.index, "reason": r.reason, "record": kept_cheaply(r.record)}
                for r in outcome.rejected
            ],
            timestamp=at,
            **cause.as_kwargs(),
        )
