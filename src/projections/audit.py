"""Audit reads, straight from the event store: history, point-in-time state, the global log."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from ledger.application import InventoryLedger
from ledger.base import LedgerSnapshot
from ledger.errors import NotYetRecorded, UnknownSku
from ledger.stock import StockItem, StockLevels
from ledger.supplier import Supplier, SupplierTerms
from projections.store import Connection, ViewStore


@dataclass(frozen=True)
class AuditEvent:
    """One event as an auditor reads it: where it sits in the log, who, why, and what."""

    position: int
    originator_id: UUID
    version: int
    type: str
    time: datetime
    actor: str
    reason: str
    correlation_id: str
    payload: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "originator_id": str(self.originator_id),
            "version": self.version,
            "type": self.type,
            "time": self.time.isoformat(),
            "actor": self.actor,
            "reason": self.reason,
            "correlation_id": self.correlation_id,
            "payload": self.payload,
        }


@dataclass(frozen=True)
class PointInTime:
    """A SKU as it stood once: after the last event at or before the moment asked for."""

    sku: str
    at: datetime
    version: int
    position: int
    item: StockItem
    levels: StockLevels
    # Each supplier's terms as they stood then (None: the supplier did not exist yet).
    terms: dict[str, SupplierTerms | None] = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# A time asked for may run ahead of this host's clock by this much (another host's).
FUTURE_SLACK = timedelta(seconds=1)

SELECT_EVENTS = (
    "SELECT notification_id, originator_id, originator_version, topic, state"
    " FROM inventoryledger_events"
)

_ENVELOPE = {
    "originator_id",
    "originator_version",
    "timestamp",
    "originator_topic",
    "actor",
    "reason",
    "correlation_id",
}


class Audit:
    def __init__(self, store: ViewStore, app: InventoryLedger) -> None:
        self.store = store
        self.app = app

    def _event(self, row: dict[str, Any]) -> AuditEvent:
        event = self.app.mapper.to_domain_event(
            StoredEvent(
                originator_id=row["originator_id"],
                originator_version=row["originator_version"],
                topic=row["topic"],
                state=bytes(row["state"]),
            )
        )
        state = vars(event)
        return AuditEvent(
            position=row["notification_id"],
            originator_id=row["originator_id"],
            version=row["originator_version"],
            type=row["topic"],
            time=state["timestamp"],
            actor=state["actor"],
            reason=state["reason"],
            correlation_id=state["correlation_id"],
            payload={k: _jsonable(v) for k, v in state.items() if k not in _ENVELOPE},
        )

    def history(self, sku: str, after_version: int = 0, limit: int = 100) -> list[AuditEvent]:
        """Every event of the SKU in order, a page at a time."""
        with self.store.connection() as conn:
            rows = conn.execute(
                SELECT_EVENTS + " WHERE originator_id = %s AND originator_version > %s"
                " ORDER BY originator_version LIMIT %s",
                (StockItem.id_for(sku), after_version, limit),
            ).fetchall()
            # Unknown whatever the cursor: a misspelt SKU paged from a version answered
            # as a history read to its end (an auditor's walkthrough).
            if not rows and not _exists(conn, StockItem.id_for(sku)):
                raise UnknownSku(f"unknown SKU {sku!r}", skus=[sku])
        return [self._event(row) for row in rows]

    def reservation_history(
        self, reservation_id: UUID, after_version: int = 0, limit: int = 100
    ) -> list[AuditEvent]:
        """Every event of the reservation in order, a page at a time: what an OMS did to
        it and why (a cancel's or a release's reason is only in the reservation's events;
        an auditor had to page the whole log for it: a walkthrough)."""
        with self.store.connection() as conn:
            rows = conn.execute(
                SELECT_EVENTS + " WHERE originator_id = %s AND originator_version > %s"
                " ORDER BY originator_version LIMIT %s",
                (reservation_id, after_version, limit),
            ).fetchall()
        return [self._event(row) for row in rows]

    def events(
        self, after: int = 0, limit: int | None = None, page: int = 1000
    ) -> Iterator[AuditEvent]:
        """The global log from a position, in order, streamed a page at a time."""
        left = limit
        while left is None or left > 0:
            size = page if left is None else min(page, left)
            with self.store.connection() as conn:
                rows = conn.execute(
                    SELECT_EVENTS + " WHERE notification_id > %s ORDER BY notification_id LIMIT %s",
                    (after, size),
                ).fetchall()
            for row in rows:
                yield self._event(row)
            if len(rows) < size:
                return
            after = rows[-1]["notification_id"]
            if left is not None:
                left -= len(rows)

    def last_position(self) -> int:
        with self.store.connection() as conn:
            row = conn.execute(
                "SELECT max(notification_id) AS last FROM inventoryledger_events"
            ).fetchone()
        return int(row["last"] or 0) if row else 0

    def stock_at(
        self, sku: str, *, at: datetime | None = None, position: int | None = None
    ) -> PointInTime:
        """The SKU after the last event at or before `at` (or log `position`), with its numbers.

        The version is found by bisection over the stream and loaded from the nearest
        snapshot, so a long stream costs a handful of small reads.
        """
        if (at is None) == (position is None):
            raise ValueError("give exactly one of at and position")
        if position is not None:
            last = self.last_position()
            if position > last:
                raise NotYetRecorded(
                    f"the log ends at position {last}", position=position, log_position=last
                )
        elif at is not None and at > datetime.now(UTC) + FUTURE_SLACK:
            raise NotYetRecorded("that time has not come yet", at=at.isoformat())
        item_id = StockItem.id_for(sku)
        if position is not None:
            at = self._time_of_position(position)
        assert at is not None
        moment = at
        version, last_position = self._last_version(
            item_id,
            (lambda row: row["notification_id"] <= position)
            if position is not None
            else (lambda row: self._event_time(row) <= moment),
        )
        if version == 0:
            raise UnknownSku(f"SKU {sku!r} did not exist then", skus=[sku])
        item: StockItem = self.app.repository.get(item_id, version=version)
        if position is not None:
            # The event at the position may be another stream's, stamped earlier than
            # this one's last (a command's time is when its request came, and streams
            # are written in the order decided): the SKU is read as of the later.
            at = max(at, item.modified_on)
        terms = {s: self._terms_at(s, at, position) for s in item.supplier_ids}
        return PointInTime(
            sku=sku,
            at=at,
            version=version,
            position=last_position,
            item=item,
            levels=item.levels(at, {s: t for s, t in terms.items() if t is not None}),
            terms=terms,
        )

    def _terms_at(
        self, supplier_id: str, at: datetime, position: int | None
    ) -> SupplierTerms | None:
        supplier_id_uuid = Supplier.id_for(supplier_id)
        version, _ = self._last_version(
            supplier_id_uuid,
            (lambda row: row["notification_id"] <= position)
            if position is not None
            else (lambda row: self._event_time(row) <= at),
        )
        if version == 0:
            return None
        supplier: Supplier = self.app.repository.get(supplier_id_uuid, version=version)
        return supplier.terms

    def _event_time(self, row: dict[str, Any]) -> datetime:
        return self._event(row).time

    def _time_of_position(self, position: int) -> datetime:
        with self.store.connection() as conn:
            row = conn.execute(
                SELECT_EVENTS + " WHERE notification_id <= %s"
                " ORDER BY notification_id DESC LIMIT 1",
                (position,),
            ).fetchone()
        if row is None:
            raise UnknownSku(f"the log has no event at or before position {position}")
        return self._event_time(row)

    def _last_version(
        self, originator_id: UUID, before: Callable[[dict[str, Any]], bool]
    ) -> tuple[int, int]:
        """The last version of a stream whose event satisfies `before` (a monotone test)."""
        with self.store.connection() as conn:

            def row_at(version: int) -> dict[str, Any]:
                found = conn.execute(
                    SELECT_EVENTS + " WHERE originator_id = %s AND originator_version = %s",
                    (originator_id, version),
                ).fetchone()
                assert found is not None
                return found

            top = conn.execute(
                "SELECT max(originator_version) AS top FROM inventoryledger_events"
                " WHERE originator_id = %s",
                (originator_id,),
            ).fetchone()
            low, high = 0, int(top["top"] or 0) if top else 0
            best_position = 0
            while low < high:
                middle = (low + high + 1) // 2
                row = row_at(middle)
                if before(row):
                    low, best_position = middle, row["notification_id"]
                else:
                    high = middle - 1
            if low and not best_position:
                best_position = row_at(low)["notification_id"]
            return low, best_position


@dataclass(frozen=True)
class SnapshotDiffers:
    """A snapshot that is not the state its stream's events give at its version."""

    name: str  # the SKU, for a StockItem's; else the stream's id
    version: int
    fields: list[str]  # the state's attributes that differ


@dataclass(frozen=True)
class SnapshotCheck:
    streams: int
    snapshots: int
    differing: list[SnapshotDiffers]
    missing: list[str]  # SKUs asked for that have no events


# Events read a page at a time: a stream may be long (a flash sale's SKU).
REPLAY_PAGE = 1_000


def check_snapshots(app: InventoryLedger, store: ViewStore, skus: list[str]) -> SnapshotCheck:
    """Replays every stream that has snapshots (or those of `skus`) from its first event,
    with none, and compares each snapshot with the state its events give at its version.

    Loads, and the audit's reads of the past, start from the latest snapshot: one changed
    in place by a role that can turn off the table's trigger (see `api.database`) is read
    as the stream's state, so an auditor checks them against the events they stand for.
    One pass over each stream, whatever its snapshots; a stream that cannot be read
    (an event or a snapshot that does not decode, a version missing) is reported as
    differing, and the others are still checked."""
    streams: dict[UUID, str | None]
    if skus:
        streams = {StockItem.id_for(sku): sku for sku in skus}
    else:
        with store.connection() as conn:
            rows = conn.execute(
                "SELECT DISTINCT originator_id FROM inventoryledger_snapshots ORDER BY 1"
            ).fetchall()
        streams = {row["originator_id"]: None for row in rows}
    checked = 0
    differing: list[SnapshotDiffers] = []
    missing: list[str] = []
    for stream, sku in streams.items():
        name = sku or str(stream)
        version = 0
        try:
            assert app.snapshots is not None  # the ledger takes them (`snapshotting_intervals`)
            snapshots: deque[Any] = deque(app.snapshots.get(stream))
            aggregate: Any = None
            for event in _replayed(app, stream):
                aggregate = event.mutate(aggregate)
                version = aggregate.version
                name = sku or getattr(aggregate, "sku", None) or str(stream)
                while snapshots and snapshots[0].originator_version <= version:
                    snapshot = snapshots.popleft()
                    checked += 1
                    fields = _differing(snapshot, aggregate)
                    if fields:
                        differing.append(SnapshotDiffers(name, snapshot.originator_version, fields))
                if not snapshots:
                    break
            if aggregate is None and sku is not None:
                missing.append(sku)
            for snapshot in snapshots:  # past the stream's last event: it stands for none
                checked += 1
                differing.append(SnapshotDiffers(name, snapshot.originator_version, ["version"]))
        except Exception as error:  # reported, and the other streams still checked
            problem = f"unreadable after version {version} ({type(error).__name__}: {error})"
            differing.append(SnapshotDiffers(name, version, [problem]))
    return SnapshotCheck(len(streams), checked, differing, missing)


def _replayed(app: InventoryLedger, stream: UUID) -> Iterator[Any]:
    """A stream's events in order, a page at a time."""
    after = 0
    while True:
        page: list[Any] = list(app.events.get(stream, gt=after, limit=REPLAY_PAGE))
        yield from page
        if len(page) < REPLAY_PAGE:
            return
        after = page[-1].originator_version


def _differing(snapshot: Any, aggregate: Any) -> list[str]:
    """The attributes in which a snapshot is not the state its stream's events give at its
    version (["version"] for one at a version the events skip)."""
    if snapshot.originator_version != aggregate.version:
        return ["version"]
    kept = LedgerSnapshot.state_of(snapshot.mutate(None))
    replayed = LedgerSnapshot.state_of(aggregate)
    return sorted(k for k in {*kept, *replayed} if kept.get(k) != replayed.get(k))


def _exists(conn: Connection, stream: UUID) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM inventoryledger_events WHERE originator_id = %s LIMIT 1", (stream,)
        ).fetchone()
        is not None
    )
