"""Projections: rebuilding the availability view from a large log, and point-in-time reads.

One run on a fresh database:

1. builds a log of BENCH_EVENTS events (default 1,000,000) with the ledger's own command
   handlers and aggregates, run in memory and saved in large batches straight through
   `InventoryLedger.save` (a few thousand events per save), so every stored event is a real
   ledger event with its pinned topic, and snapshots are taken as the service takes them;
2. rebuilds the stock projection (the availability view) from position zero, blue/green,
   beside a baseline in the same run that only reads and decodes the same notifications
   in pages of the same size;
3. times the other projections' rebuilds;
4. asks `Audit.stock_at` for the hot SKU (a tenth of the log: 100,000 events by default)
   at several positions and times, beside replaying the stream without snapshots.

The figures are reported, not asserted. Targets from the issue: a rebuild at 50,000
events/s or more on a 2-core machine; point-in-time within 50 ms on a 100k-event SKU.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Repository
from eventsourcing.persistence import StoredEvent

from api.logs import configure_logging
from api.runtime import Runtime, open_runtime, rebuild_processes
from api.settings import Settings
from bench.harness import fresh_database
from ledger.application import InventoryLedger
from ledger.base import Cause, LedgerAggregate
from ledger.commands import (
    Command,
    Confirm,
    ExpireHolds,
    Fulfil,
    Observation,
    PutMappings,
    PutSupplier,
    Release,
    ReportStock,
    Reserve,
    Return,
)
from ledger.errors import InsufficientStock
from ledger.handlers import handler_for
from ledger.mapping import MappingSpec
from ledger.reservation import Reservation, ReservationStatus
from ledger.stock import StockItem
from ledger.supplier import SupplierTerms
from ledger.uow import UnitOfWork
from projections.base import Projection
from projections.registry import all_projections
from projections.runner import rebuild
from projections.stock import StockProjection

# What `ledger projections rebuild` uses: max(LEDGER_PROJECTION_PAGE_SIZE, 10000).
PAGE_SIZE = 10_000
# Events per save while building the log: thousands of aggregates' changes in one transaction.
BUILD_BATCH_EVENTS = 5000
REBUILD_TARGET_PER_SECOND = 50_000
POINT_IN_TIME_TARGET_MS = 50.0

SUPPLIERS: dict[str, tuple[SupplierTerms, int]] = {
    # supplier id -> (terms, base units per supplier unit)
    "north": (
        SupplierTerms(
            name="North Wholesale",
            priority=1,
            lead_time_days=1,
            buffer=2,
            stale_after_seconds=12 * 3600,
            exclude_after_seconds=7 * 24 * 3600,
        ),
        1,
    ),
    "south": (
        SupplierTerms(
            name="South Distribution",
            priority=2,
            lead_time_days=3,
            stale_after_seconds=12 * 3600,
            exclude_after_seconds=7 * 24 * 3600,
            reports_net_of_our_orders=True,
        ),
        1,
    ),
    "east": (
        SupplierTerms(
            name="East Imports",
            priority=3,
            lead_time_days=7,
            buffer=12,
            stale_after_seconds=24 * 3600,
            exclude_after_seconds=7 * 24 * 3600,
        ),
        12,
    ),
}
HOT_SKU = "SKU-HOT"
HOT_STOCK = 5_000_000  # base units per supplier: the flash sale never runs dry

# The simulated clock moves this much per command: a 1M-event log spans about 18 hours.
TICK = timedelta(milliseconds=250)
HOLD_FOR = timedelta(seconds=30)  # a hold is confirmed or released after this
COMMIT_FOR = timedelta(minutes=2)  # a commitment is fulfilled or released after this
TTL_SECONDS = 900
DELIVERY_ROWS = 500
DELIVERY_CHANCE = 0.01  # per cold step: about a third of the cold events are reports
HOT_REPORT_CHANCE = 0.04


@dataclass(frozen=True)
class Plan:
    """How big a log to build: ~10,000 SKUs (fewer for a small log), a tenth of it hot."""

    events: int
    skus: int
    hot_events: int

    @classmethod
    def sized(cls, events: int) -> Plan:
        return cls(
            events=events, skus=max(100, min(10_000, events // 100)), hot_events=events // 10
        )


DEFAULT_EVENTS = 1_000_000


def events_setting() -> int:
    """BENCH_EVENTS: the size of the log to build; smaller for a quick run."""
    return int(os.environ.get("BENCH_EVENTS", str(DEFAULT_EVENTS)))


# Building the log ----------------------------------------------------------------------------


@dataclass
class Open:
    """A reservation waiting for its next step, and when it is due."""

    reservation_id: UUID
    due: datetime


@dataclass
class Lane:
    """The OMS traffic of one part of the catalogue: holds and commitments in flight."""

    held: deque[Open] = field(default_factory=deque)
    committed: deque[Open] = field(default_factory=deque)


class LogBuilder:
    """Runs ledger commands against aggregates kept in memory; saves them in large batches.

    The handlers are the service's own, so the events, their order and their payloads are
    what the writer would produce; only the saves are coalesced (thousands of events per
    `InventoryLedger.save`, instead of one command per save). `save` is given the
    aggregates, so the application takes StockItem snapshots every 100 versions exactly as
    it does behind the writer.
    """

    def __init__(self, runtime: Runtime, plan: Plan, seed: int = 20240611) -> None:
        self.app = runtime.app
        self.plan = plan
        self.rng = random.Random(seed)
        self.memory: dict[UUID, LedgerAggregate] = {}
        self.pending: dict[UUID, LedgerAggregate] = {}
        self.counted: dict[UUID, int] = {}
        self.unsaved = 0
        self.saved = 0
        self.saves = 0
        self.commands = 0
        self.refused = 0
        self.clock = (datetime.now(UTC) - timedelta(days=3)).replace(microsecond=0)
        self.hot_id = StockItem.id_for(HOT_SKU)
        self.cold_skus = [f"SKU-{index:05d}" for index in range(plan.skus)]
        self.hot = Lane()
        self.cold = Lane()
        self.expiring: deque[Open] = deque()
        self.fulfilled: deque[UUID] = deque(maxlen=1000)
        self.deliveries = 0
        self.orders = 0

    # Plumbing ---------------------------------------------------------------------------

    @property
    def events(self) -> int:
        return self.saved + self.unsaved

    def _load(self, aggregate_id: UUID) -> LedgerAggregate:
        try:
            return self.memory[aggregate_id]
        except KeyError:
            raise AggregateNotFoundError(aggregate_id) from None

    def execute(self, command: Command) -> Any:
        self.commands += 1
        unit = UnitOfWork(self._load)
        try:
            value = handler_for(command)(unit, command)
        except InsufficientStock:
            self.refused += 1  # a 409 for the OMS: decided before anything changed
            return None
        for aggregate in unit.changed():
            self.memory[aggregate.id] = aggregate
            self.pending[aggregate.id] = aggregate
            count = len(aggregate.pending_events)
            self.unsaved += count - self.counted.get(aggregate.id, 0)
            self.counted[aggregate.id] = count
        if self.unsaved >= BUILD_BATCH_EVENTS:
            self.flush()
        return value

    def flush(self) -> None:
        if not self.pending:
            return
        self.app.save(*self.pending.values())
        for aggregate in self.pending.values():
            if isinstance(aggregate, Reservation) and aggregate.status in (
                ReservationStatus.FULFILLED,
                ReservationStatus.RELEASED,
                ReservationStatus.EXPIRED,
            ):
                self.memory.pop(aggregate.id, None)  # one-off: keep memory flat
        self.saved += self.unsaved
        self.saves += 1
        self.unsaved = 0
        self.pending.clear()
        self.counted.clear()

    def tick(self) -> datetime:
        self.clock += TICK
        return self.clock

    # The catalogue ----------------------------------------------------------------------

    def setup(self) -> None:
        at = self.clock
        admin = Cause("bench-admin", "admin.setup", "bench-setup")
        for supplier_id, (terms, _) in SUPPLIERS.items():
            self.execute(PutSupplier(at=at, cause=admin, supplier_id=supplier_id, terms=terms))
        skus = [HOT_SKU, *self.cold_skus]
        for supplier_id, (_, units) in SUPPLIERS.items():
            for start in range(0, len(skus), 1000):
                specs = [
                    MappingSpec(
                        supplier_sku=self._supplier_sku(supplier_id, sku),
                        sku=sku,
                        units_per_supplier_unit=units,
                        upc=None,
                    )
                    for sku in skus[start : start + 1000]
                ]
                self.execute(
                    PutMappings(
                        at=self.tick(), cause=admin, supplier_id=supplier_id, mappings=specs
                    )
                )
        for supplier_id, (_, units) in SUPPLIERS.items():
            for start in range(0, len(skus), 1000):
                rows = [
                    (sku, HOT_STOCK if sku == HOT_SKU else self.rng.randint(300, 3000))
                    for sku in skus[start : start + 1000]
                ]
                self._report(supplier_id, units, rows)

    @staticmethod
    def _supplier_sku(supplier_id: str, sku: str) -> str:
        return f"{supplier_id[:1].upper()}-{sku}"

    def _report(self, supplier_id: str, units: int, rows: list[tuple[str, int]]) -> None:
        at = self.tick()
        self.deliveries += 1
        delivery = f"{supplier_id}-{self.deliveries:07d}"
        observed_at = at - timedelta(seconds=self.rng.randint(1, 60))
        self.execute(
            ReportStock(
                at=at,
                cause=Cause(f"connector:{supplier_id}", "feed.report", delivery),
                supplier_id=supplier_id,
                delivery_id=delivery,
                content_hash=uuid4().hex,
                source="bench",
                rows=len(rows),
                observations=[
                    Observation(
                        index=index,
                        supplier_sku=self._supplier_sku(supplier_id, sku),
                        quantity=quantity // units,
                        observed_at=observed_at,
                    )
                    for index, (sku, quantity) in enumerate(rows)
                ],
            )
        )

    # The traffic ------------------------------------------------------------------------

    def run(self, progress: Callable[[int], None] | None = None) -> None:
        """Runs commands until the log holds the planned number of events."""
        self.setup()
        hot_share = self.plan.hot_events / self.plan.events
        next_sweep = self.clock + timedelta(minutes=1)
        next_report = self.plan.events // 10
        hot = self.memory[self.hot_id]
        while self.events < self.plan.events or hot.version < self.plan.hot_events:
            if self.clock >= next_sweep:
                self._sweep()
                next_sweep = self.clock + timedelta(minutes=1)
            # The hot SKU keeps pace with the log, so its events are spread all along it.
            behind = hot.version < self.plan.hot_events and (
                hot.version < hot_share * self.events or self.events >= self.plan.events
            )
            self._step(self.hot if behind else self.cold, hot=behind)
            if progress is not None and self.events >= next_report:
                progress(self.events)
                next_report += self.plan.events // 10
        self.flush()

    def _step(self, lane: Lane, hot: bool) -> None:
        now = self.tick()
        if lane.held and lane.held[0].due <= now:
            self._after_hold(lane, lane.held.popleft())
        elif lane.committed and lane.committed[0].due <= now:
            self._after_commitment(lane.committed.popleft())
        elif hot and self.rng.random() < HOT_REPORT_CHANCE:
            supplier_id = self.rng.choice(list(SUPPLIERS))
            units = SUPPLIERS[supplier_id][1]
            self._report(supplier_id, units, [(HOT_SKU, HOT_STOCK + self.rng.randint(-5000, 5000))])
        elif not hot and self.rng.random() < DELIVERY_CHANCE:
            supplier_id = self.rng.choice(list(SUPPLIERS))
            units = SUPPLIERS[supplier_id][1]
            skus = {self._popular_sku() for _ in range(DELIVERY_ROWS)}
            self._report(supplier_id, units, [(s, self.rng.randint(300, 3000)) for s in skus])
        elif not hot and self.fulfilled and self.rng.random() < 0.01:
            self._return(self.fulfilled.popleft())
        else:
            self._reserve(lane, hot)

    def _popular_sku(self) -> str:
        """A cold SKU, the popular ones far more often (a long tail)."""
        return self.cold_skus[int(len(self.cold_skus) * self.rng.random() ** 2)]

    def _oms(self, reason: str) -> Cause:
        return Cause("oms", reason, f"req-{self.commands:08d}")

    def _reserve(self, lane: Lane, hot: bool) -> None:
        self.orders += 1
        if hot:
            lines = [(HOT_SKU, self.rng.randint(1, 3))]
            if self.rng.random() < 0.1:
                lines.append((self._popular_sku(), 1))
        else:
            lines = [
                (self._popular_sku(), self.rng.randint(1, 3)) for _ in range(self.rng.randint(1, 3))
            ]
        key = f"order-{self.orders:08d}"
        reserved = self.execute(
            Reserve(
                at=self.clock,
                cause=self._oms("oms.reserve"),
                client="oms",
                idempotency_key=key,
                order_id=key,
                lines=lines,
                ttl_seconds=TTL_SECONDS,
                default_ttl_seconds=TTL_SECONDS,
            )
        )
        if reserved is not None:
            lane.held.append(Open(reserved.reservation.id, self.clock + HOLD_FOR))

    def _after_hold(self, lane: Lane, held: Open) -> None:
        roll = self.rng.random()
        if roll < 0.80:
            self.execute(
                Confirm(
                    at=self.clock,
                    cause=self._oms("oms.confirm"),
                    reservation_id=held.reservation_id,
                )
            )
            lane.committed.append(Open(held.reservation_id, self.clock + COMMIT_FOR))
        elif roll < 0.94:
            self.execute(
                Release(
                    at=self.clock,
                    cause=self._oms("oms.release"),
                    reservation_id=held.reservation_id,
                    note="basket abandoned",
                )
            )
        else:
            reservation = self.memory[held.reservation_id]
            assert isinstance(reservation, Reservation)
            self.expiring.append(Open(held.reservation_id, reservation.expires_at))

    def _after_commitment(self, committed: Open) -> None:
        reservation = self.memory[committed.reservation_id]
        assert isinstance(reservation, Reservation)
        if self.rng.random() < 0.93:
            lines: list[tuple[str, int, str | None]] = [
                (sku, line.quantity, None) for sku, line in reservation.lines.items()
            ]
            self.execute(
                Fulfil(
                    at=self.clock,
                    cause=self._oms("oms.fulfil"),
                    reservation_id=reservation.id,
                    lines=lines,
                    request_key=f"ship-{reservation.id}",
                )
            )
            self.fulfilled.append(reservation.id)
        else:
            self.execute(
                Release(
                    at=self.clock,
                    cause=self._oms("oms.release"),
                    reservation_id=reservation.id,
                    note="order cancelled",
                )
            )

    def _return(self, reservation_id: UUID) -> None:
        reservation = self.memory.get(reservation_id)
        if reservation is None:
            reservation = self.app.repository.get(reservation_id)
            self.memory[reservation_id] = reservation
        assert isinstance(reservation, Reservation)
        sku = next(iter(reservation.lines))
        self.execute(
            Return(
                at=self.clock,
                cause=self._oms("oms.return"),
                reservation_id=reservation_id,
                lines=[(sku, 1, None)],
                restock=True,
                request_key=f"return-{reservation_id}",
            )
        )

    def _sweep(self) -> None:
        """What the expiry sweeper does: record `Expired` for holds past their time."""
        due = []
        while self.expiring and self.expiring[0].due <= self.clock:
            due.append(self.expiring.popleft().reservation_id)
        if due:
            self.execute(
                ExpireHolds(
                    at=self.clock,
                    cause=Cause("sweeper", "hold.expired", f"sweep-{self.commands:08d}"),
                    reservation_ids=due,
                )
            )


# Measuring -----------------------------------------------------------------------------------


def read_and_decode(runtime: Runtime, topics: list[str], page_size: int) -> dict[str, Any]:
    """The baseline: read the notifications a projection reads, in pages, and decode each."""
    app = runtime.app
    bound = app.recorder.max_notification_id() or 0
    position = events = pages = 0
    started = time.perf_counter()
    while position < bound:
        notifications = app.recorder.select_notifications(
            start=position + 1, limit=page_size, stop=bound, topics=topics
        )
        for notification in notifications:
            app.mapper.to_domain_event(notification)
        events += len(notifications)
        pages += 1
        position = notifications[-1].id if len(notifications) == page_size else bound
    seconds = time.perf_counter() - started
    return {
        "events": events,
        "pages": pages,
        "seconds": seconds,
        "events_per_second": events / seconds if seconds else 0.0,
    }


def timed_rebuild(runtime: Runtime, projection: Projection, page_size: int) -> dict[str, Any]:
    """`rebuild` from position zero, blue/green, as `ledger projections rebuild` runs it
    (a state view in one process per core)."""
    applied = pages = 0

    def progress(_position: int, count: int) -> None:
        nonlocal applied, pages
        applied += count
        pages += 1

    started = time.perf_counter()
    built = rebuild(
        projection,
        runtime.app,
        runtime.store,
        runtime.leases,
        page_size=page_size,
        progress=progress,
        processes=rebuild_processes(runtime.settings),
    )
    seconds = time.perf_counter() - started
    return {
        "generation": built.generation,
        "position": built.position,
        "events": applied,
        "pages": pages,
        "seconds": seconds,
        "events_per_second": applied / seconds if seconds else 0.0,
    }


# The headline rebuild and its baseline are measured this many times, alternately, and
# each reported by its median run: on a noisy machine one run can be a third off.
HEADLINE_ROUNDS = 3


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ranked = sorted(runs, key=lambda run: run["events_per_second"])
    rates = [round(run["events_per_second"]) for run in runs]
    return {**ranked[len(ranked) // 2], "runs_events_per_second": rates}


def _runs(measured: dict[str, Any]) -> str:
    rates = measured["runs_events_per_second"]
    return f"; median of {', '.join(f'{rate:,}' for rate in rates)}" if len(rates) > 1 else ""


def rebuild_row(
    runtime: Runtime, projection: Projection, page_size: int, log: dict[str, Any]
) -> dict[str, Any]:
    headline = isinstance(projection, StockProjection)
    baselines, rebuilds = [], []
    for _ in range(HEADLINE_ROUNDS if headline else 1):
        baselines.append(read_and_decode(runtime, projection.topics, page_size))
        rebuilds.append(timed_rebuild(runtime, projection, page_size))
    baseline, ledger = _median_run(baselines), _median_run(rebuilds)
    label = "stock (availability view)" if headline else projection.name
    row: dict[str, Any] = {
        "workload": (
            f"rebuild {label} from position 0, {log['events']:,}-event log, pages of {page_size}"
        ),
        "kind": "rebuild",
        "projection": projection.name,
        "page_size": page_size,
        "log_events": log["events"],
        "ledger": ledger,
        "baseline": baseline,
        "ratio": ledger["events_per_second"] / baseline["events_per_second"],
    }
    if headline:
        row["target_events_per_second"] = REBUILD_TARGET_PER_SECOND
        row["log"] = log
        row["check"] = _check_stock_view(runtime)
    return row


def _check_stock_view(runtime: Runtime) -> dict[str, Any]:
    """The rebuilt view agrees with the event store on the hot SKU, and has every SKU."""
    hot_id = StockItem.id_for(HOT_SKU)
    with runtime.store.connection() as conn:
        count = conn.execute("SELECT count(*) AS n FROM view_availability").fetchone()
        row = conn.execute(
            "SELECT version, on_hand FROM view_availability WHERE id = %s", (hot_id,)
        ).fetchone()
    item: StockItem = runtime.app.repository.get(hot_id)
    on_hand = sum(position.quantity for position in item.positions.values())
    assert count is not None
    assert row is not None
    return {
        "skus_in_view": count["n"],
        "hot_version_in_view": row["version"],
        "hot_version_in_store": item.version,
        "hot_on_hand_matches": row["on_hand"] == on_hand,
    }


@dataclass(frozen=True)
class HotEvent:
    version: int
    position: int
    timestamp: datetime


def _hot_events(runtime: Runtime, versions: list[int]) -> list[HotEvent]:
    app = runtime.app
    hot_id = StockItem.id_for(HOT_SKU)
    with runtime.store.connection() as conn:
        rows = conn.execute(
            "SELECT notification_id, originator_version, topic, state"
            " FROM inventoryledger_events"
            " WHERE originator_id = %s AND originator_version = ANY(%s)"
            " ORDER BY originator_version",
            (hot_id, versions),
        ).fetchall()
    found = []
    for row in rows:
        event: Any = app.mapper.to_domain_event(
            StoredEvent(
                originator_id=hot_id,
                originator_version=row["originator_version"],
                topic=row["topic"],
                state=bytes(row["state"]),
            )
        )
        found.append(HotEvent(row["originator_version"], row["notification_id"], event.timestamp))
    return found


def _millis(calls: list[Callable[[], Any]]) -> list[float]:
    timings = []
    for call in calls:
        started = time.perf_counter()
        call()
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def _summary(timings: list[float]) -> dict[str, Any]:
    return {
        "calls": len(timings),
        "median_ms": statistics.median(timings),
        "max_ms": max(timings),
        "all_ms": [round(t, 2) for t in timings],
    }


def _versions(stream: int, interval: int = 100) -> list[int]:
    """Versions of the hot stream to ask for: ten spread at random, and two that sit just
    before a snapshot (the most events to replay on top of one)."""
    rng = random.Random(11)
    chosen = set(rng.sample(range(1, stream + 1), min(10, stream)))
    for fraction in (0.33, 0.97):
        worst = int(stream * fraction) // interval * interval - 1
        if worst > 0:
            chosen.add(worst)
    return sorted(chosen)


def point_in_time_row(runtime: Runtime) -> dict[str, Any]:
    """`Audit.stock_at` on the hot SKU, by position and by time, beside a replay without
    snapshots of the same versions."""
    app, audit = runtime.app, runtime.audit
    hot_id = StockItem.id_for(HOT_SKU)
    with runtime.store.connection() as conn:
        top = conn.execute(
            "SELECT max(originator_version) AS v FROM inventoryledger_events"
            " WHERE originator_id = %s",
            (hot_id,),
        ).fetchone()
        assert top is not None
        stream = int(top["v"])
        taken = {
            row["originator_version"]
            for row in conn.execute(
                "SELECT originator_version FROM inventoryledger_snapshots WHERE originator_id = %s",
                (hot_id,),
            ).fetchall()
        }
    # The batch saves hand `InventoryLedger.save` the aggregates, so the application takes
    # the hot SKU's snapshots itself at every `snapshotting_intervals` version, as it does
    # behind the writer. Should a save ever stop doing so, the missing ones are taken here
    # at the versions the service would have taken them, and the row says how many.
    interval = InventoryLedger.snapshotting_intervals[StockItem]
    missing = sorted(set(range(interval, stream + 1, interval)) - taken)
    for version in missing:
        app.take_snapshot(hot_id, version=version)
    snapshots = {
        "count": len(taken) + len(missing),
        "taken_by_save": len(taken),
        "topped_up": len(missing),
        "interval": interval,
        "last_version": max(taken | set(missing), default=None),
    }
    points = _hot_events(runtime, _versions(stream))

    wrong: list[str] = []

    def by_position(point: HotEvent) -> Callable[[], Any]:
        def call() -> None:
            found = audit.stock_at(HOT_SKU, position=point.position)
            if found.version != point.version:
                wrong.append(f"position {point.position}: v{found.version} != v{point.version}")

        return call

    def by_time(point: HotEvent) -> Callable[[], Any]:
        def call() -> None:
            found = audit.stock_at(HOT_SKU, at=point.timestamp)
            if found.version != point.version:
                wrong.append(f"at {point.timestamp}: v{found.version} != v{point.version}")

        return call

    by_position(points[len(points) // 2])()  # warm-up: connections, prepared statements
    positions = _millis([by_position(p) for p in points])
    times = _millis([by_time(p) for p in points])

    # Baseline: the same historical versions replayed from the first event, no snapshots.
    no_snapshots: Repository[UUID] = Repository(event_store=app.events)

    def replay(point: HotEvent) -> Callable[[], Any]:
        return lambda: no_snapshots.get(hot_id, version=point.version)

    replays = _millis([replay(points[len(points) // 2]), replay(points[-1])])
    ledger: dict[str, Any] = {
        "by_position": _summary(positions),
        "by_time": _summary(times),
        "target_ms": POINT_IN_TIME_TARGET_MS,
        "versions": [p.version for p in points],
        "wrong_answers": wrong,
    }
    slowest = max(ledger["by_position"]["max_ms"], ledger["by_time"]["max_ms"])
    return {
        "workload": f"point-in-time Audit.stock_at, hot SKU with {stream:,} events",
        "kind": "point_in_time",
        "hot_stream_events": stream,
        "snapshots": snapshots,
        "ledger": ledger,
        "baseline": {"what": "repository.get(version) without snapshots", **_summary(replays)},
        # Time taken relative to the baseline's: below 1 is faster.
        "ratio": slowest / statistics.median(replays),
    }


# The run -------------------------------------------------------------------------------------


@contextmanager
def _ledger(server_url: str) -> Iterator[Runtime]:
    with fresh_database(server_url) as database_url:
        settings = Settings(database_url=database_url, log_level="WARNING")
        configure_logging(settings)
        runtime = open_runtime(settings, sweep=False, project=False)
        try:
            yield runtime
        finally:
            runtime.close()


def build_log(runtime: Runtime, plan: Plan) -> dict[str, Any]:
    builder = LogBuilder(runtime, plan)
    started = time.perf_counter()

    def progress(events: int) -> None:
        elapsed = time.perf_counter() - started
        print(f"  built {events:,} events in {elapsed:.0f} s", file=sys.stderr, flush=True)

    builder.run(progress)
    seconds = time.perf_counter() - started
    with runtime.store.connection() as conn:
        # What autovacuum, or the scheduled vacuuming a production log needs, would have
        # done by now: without statistics the planner reads each page of notifications
        # with a bitmap scan of the whole rest of the log and a sort (~0.3 s a page at the
        # start of a 1M-event log), and the first reader after a bulk load also pays for
        # setting hint bits. Both would distort the rebuild and its baseline alike.
        vacuum_started = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) inventoryledger_events")
        conn.execute("VACUUM (ANALYZE) inventoryledger_snapshots")
        # And what the server would have written out by itself a little later: without
        # this the checkpoint of the build's writes lands in the middle of the measuring.
        conn.execute("CHECKPOINT")
        vacuum_seconds = time.perf_counter() - vacuum_started
        mix = conn.execute(
            "SELECT topic, count(*) AS n FROM inventoryledger_events GROUP BY topic ORDER BY n DESC"
        ).fetchall()
    return {
        "events": builder.saved,
        "saves": builder.saves,
        "vacuum_analyze_seconds": vacuum_seconds,
        "commands": builder.commands,
        "refused_reservations": builder.refused,
        "skus": plan.skus + 1,
        "suppliers": len(SUPPLIERS),
        "build_seconds": seconds,
        "topics": {row["topic"]: row["n"] for row in mix},
    }


def run(
    server_url: str, events: int | None = None, page_size: int = PAGE_SIZE
) -> list[dict[str, Any]]:
    plan = Plan.sized(events or events_setting())
    rows = []
    with _ledger(server_url) as runtime:
        print(f"building a log of {plan.events:,} events...", file=sys.stderr, flush=True)
        log = build_log(runtime, plan)
        print(
            f"built {log['events']:,} events in {log['build_seconds']:.0f} s"
            f" ({log['saves']} saves; not a measured figure)",
            file=sys.stderr,
            flush=True,
        )
        for projection in all_projections(runtime.app):
            rows.append(rebuild_row(runtime, projection, page_size, log))
            print(describe(rows[-1]), file=sys.stderr, flush=True)
        rows.append(point_in_time_row(runtime))
        print(describe(rows[-1]), file=sys.stderr, flush=True)
    return rows


def describe(row: dict[str, Any]) -> str:
    ledger, baseline = row["ledger"], row["baseline"]
    if row["kind"] == "rebuild":
        target = row.get("target_events_per_second")
        return (
            f"| {row['workload']} | {ledger['events_per_second']:,.0f} events/s "
            f"({ledger['events']:,} applied of {row['log_events']:,} in the log, "
            f"{ledger['seconds']:.1f} s"
            + (f"; target ≥ {target:,}" if target else "")
            + _runs(ledger)
            + f") | read+decode the same notifications: {baseline['events_per_second']:,.0f}"
            f" events/s ({baseline['seconds']:.1f} s{_runs(baseline)}) | {row['ratio']:.2f}x |"
        )
    pos, at = ledger["by_position"], ledger["by_time"]
    return (
        f"| {row['workload']} | by position: median {pos['median_ms']:.1f} ms, max "
        f"{pos['max_ms']:.1f} ms; by time: median {at['median_ms']:.1f} ms, max "
        f"{at['max_ms']:.1f} ms (target ≤ {ledger['target_ms']:.0f} ms; "
        f"{row['snapshots']['count']} snapshots) | replay without snapshots: median "
        f"{baseline['median_ms']:.0f} ms | {row['ratio']:.3f}x the time |"
    )


def footnote(row: dict[str, Any]) -> str:
    """What stands behind a row: how the log was made, and the checks on the answers."""
    if row["kind"] == "point_in_time":
        wrong = row["ledger"]["wrong_answers"]
        return (
            f"point-in-time: versions {row['ledger']['versions']} of {row['hot_stream_events']:,};"
            f" {row['snapshots']['count']} snapshots every {row['snapshots']['interval']} versions"
            f" ({row['snapshots']['taken_by_save']} taken by the saves, topped up"
            f" {row['snapshots']['topped_up']}; last at v{row['snapshots']['last_version']});"
            f" wrong answers: {wrong or 'none'}"
        )
    if "log" not in row:
        return f"{row['projection']}: {row['ledger']['pages']} pages"
    log = row["log"]
    mix = ", ".join(
        f"{topic.removeprefix('stockledger:')} {count:,}" for topic, count in log["topics"].items()
    )
    return (
        f"log: {log['events']:,} events, {log['skus']:,} SKUs, {log['suppliers']} suppliers, built"
        f" in {log['build_seconds']:.0f} s by {log['commands']:,} commands in {log['saves']:,}"
        f" saves, then VACUUM (ANALYZE) in {log['vacuum_analyze_seconds']:.0f} s (not measured"
        f" figures); mix: {mix}; view check: {row['check']}"
    )
