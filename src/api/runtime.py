"""The composition root: settings in, a running ledger out."""

from __future__ import annotations

import gc
import os
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import structlog

from api.database import check_migrated, migrate, resolve_database_url
from api.metrics import Metrics
from api.settings import MAX_REBUILD_PROCESSES, Settings
from api.sweeper import Sweeper
from api.turns import StreamTurns
from connectors.ingest import Ingestor
from connectors.scheduler import Scheduler
from connectors.worker import InboxWorker
from ledger.application import InventoryLedger
from ledger.queries import LedgerQueries
from ledger.writer import LedgerWriter
from projections.audit import Audit
from projections.conflicts import JumpThresholds
from projections.leases import LeaseSession
from projections.notifier import LogNotifier
from projections.queries import Views
from projections.registry import all_projections
from projections.runner import ProjectionRunner
from projections.stockcache import StockCache
from projections.store import ViewStore

log = structlog.get_logger(__name__)


# The pid of the `ledger serve` process whose workers this process may be one of: they
# end with it (api.app.create_app_from_env). Set by api.cli, which does not import the
# app: its own commands start in half the time without FastAPI.
SERVE_PID = "STOCKLEDGER_SERVE_PID"


# The least time between two renewals of the pools' connections (`Runtime.renew_connections`).
RENEW_EVERY_SECONDS = 1.0


@dataclass
class Runtime:
    settings: Settings
    database_url: str
    app: InventoryLedger
    writer: LedgerWriter
    queries: LedgerQueries
    store: ViewStore
    views: Views
    audit: Audit
    leases: LeaseSession
    ingestor: Ingestor
    notifier: LogNotifier | None = None
    runners: list[ProjectionRunner] = field(default_factory=list)
    sweeper: Sweeper | None = None
    inbox_worker: InboxWorker | None = None
    scheduler: Scheduler | None = None
    metrics: Metrics | None = None
    # When the pools' connections were last renewed (see `renew_connections`).
    _renewed_at: float = field(default=-RENEW_EVERY_SECONDS, repr=False)
    _renew_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def renew_connections(self) -> None:
        """Replaces the connections of the process's pools with new ones (those in use
        as they come back), at most once every `RENEW_EVERY_SECONDS`: called when a
        request or a probe found the database gone. After PostgreSQL restarted, or ended
        the ledger's sessions, each pooled connection failed one request in turn, 503
        after 503 (and `/readyz` went from ready to not for ~35 s with no traffic: an
        operator's walkthrough). Closing a connection never waits on the network, where
        testing one can (one silently dropped waits out its TCP timeout); the pools do
        not test a connection as they hand it out (`POSTGRES_PRE_PING`): a round trip a
        request."""
        with self._renew_lock:
            now = time.monotonic()
            if now - self._renewed_at < RENEW_EVERY_SECONDS:
                return
            self._renewed_at = now
        pools: list[Any] = [self.store.pool]
        datastore = getattr(self.app.recorder, "datastore", None)
        if datastore is not None:
            pools.append(datastore.pool)
        for pool in pools:
            with suppress(Exception):  # a pool closed meanwhile
                pool.drain()
        log.info("database.connections_renewed", pools=len(pools))

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.inbox_worker is not None:
            self.inbox_worker.stop()
        if self.sweeper is not None:
            self.sweeper.stop()
        for runner in self.runners:
            runner.stop()
        if self.notifier is not None:
            self.notifier.stop()
        if self.views.cache is not None:
            self.views.cache.stop()
        self.views.close()
        self.leases.close()
        self.writer.stop()
        self.store.close()
        self.app.close()


def jump_thresholds(settings: Settings) -> JumpThresholds:
    return JumpThresholds(settings.conflict_jump_absolute, settings.conflict_jump_relative)


def rebuild_processes(settings: Settings) -> int:
    """The processes a rebuild of a state view uses: the setting, or one per core, as many
    as the setting may name at most (each holds connections of its own)."""
    return settings.rebuild_processes or min(os.cpu_count() or 1, MAX_REBUILD_PROCESSES)


def start_runners(runtime: Runtime) -> None:
    """Runs every projection in this process; leases keep one live runner per projection."""
    settings = runtime.settings
    runtime.leases.present("projections")
    runtime.notifier = LogNotifier(runtime.database_url).start()
    runtime.runners = [
        ProjectionRunner(
            projection,
            runtime.app,
            runtime.store,
            runtime.leases,
            runtime.notifier,
            page_size=settings.projection_page_size,
            poll_seconds=settings.projection_poll_seconds,
            settle_seconds=settings.projection_settle_seconds,
            busy_settle_seconds=settings.projection_busy_settle_seconds,
        ).start()
        for projection in all_projections(runtime.app, jump_thresholds(settings))
    ]


def tune_collector() -> None:
    """For a process that runs on (the server, the workers, a command applying a delivery).

    What exists once started (modules, the framework, pools) lives as long as it does:
    frozen, the cyclic collector's full passes no longer walk it (they stopped every
    request and the writer for 50-100 ms). Requests and batches free what they make by
    reference counting, so young objects are collected less often too. Together these took
    the API process's CPU per reservation from ~850 to ~590 us (10,000 SKUs, one worker),
    and the collections while a 1,000,000-row delivery applied its changes from 2.3 s to
    0.4 s."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 1000)


def open_runtime(
    settings: Settings,
    *,
    migrate_first: bool = True,
    sweep: bool = True,
    project: bool | None = None,
    connect: bool | None = None,
    read_cache: bool = False,
    observe: bool = False,
) -> Runtime:
    """The ledger in this process. `observe`: its writer counts what it does for
    `GET /metrics` (an API process's)."""
    database_url = resolve_database_url(settings)
    if migrate_first:
        migrate(settings, database_url)
    app = InventoryLedger(settings.event_store_env(database_url))
    if not migrate_first:
        try:
            check_migrated(database_url, all_projections(app))
        except BaseException:
            app.close()
            raise
    store = ViewStore(database_url, timeout=settings.connect_timeout_seconds).open()
    turns = StreamTurns(database_url)
    metrics = Metrics() if observe else None
    writer = LedgerWriter(
        app,
        timeout=settings.command_timeout_seconds,
        take_turns=turns,
        keep=settings.aggregate_cache_size,
        metrics=metrics,
        linger=settings.writer_linger_seconds,
        max_batch=settings.writer_max_batch,
    ).start()
    cache = None
    if read_cache and settings.read_cache_skus:
        cache = StockCache(
            store,
            capacity=settings.read_cache_skus,
            refresh_seconds=settings.read_cache_refresh_seconds,
            max_lag_seconds=settings.read_cache_max_lag_seconds,
            follow_seconds=settings.read_cache_follow_seconds,
            report=None if metrics is None else metrics.read_copy_lookups,
        ).start()
    views = Views(store, app, cache)
    runtime = Runtime(
        settings=settings,
        database_url=database_url,
        app=app,
        writer=writer,
        queries=LedgerQueries(app),
        store=store,
        views=views,
        ingestor=Ingestor(
            writer,
            store,
            views,
            batch_size=settings.connector_batch_size,
            part_seconds=settings.connector_part_seconds,
            work_mem_mb=settings.connector_work_mem_mb,
            read_connections=settings.connector_read_connections,
        ),
        audit=Audit(store, app),
        leases=LeaseSession(database_url),
        metrics=metrics,
    )
    if settings.run_projections if project is None else project:
        start_runners(runtime)
    if sweep:
        runtime.sweeper = Sweeper(
            runtime.writer,
            runtime.views,
            database_url,
            settings.sweep_interval_seconds,
            inbox_keep_days=settings.inbox_keep_days,
        ).start()
    if settings.run_connectors if connect is None else connect:
        runtime.leases.present("connectors")
        runtime.inbox_worker = InboxWorker(runtime.ingestor, store).start()
        runtime.scheduler = Scheduler(store, runtime.leases, runtime.inbox_worker).start()
    log.info(
        "ledger.started",
        sweeper=sweep,
        projections=len(runtime.runners),
        connectors=runtime.inbox_worker is not None,
    )
    return runtime
