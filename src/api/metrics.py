"""Prometheus metrics at `GET /metrics`: what the writers did, and how the views and feeds stand.

Two kinds of figures:

- The writer's (commands by kind and outcome, batch sizes and times, conflicts): counted
  in each API process as it works. `ledger serve` runs its workers in prometheus-client's
  multiprocess mode (`prepare_directory`), each writing its counts to a file of its own in
  one directory, so that a scrape answered by any worker sums them all.
- The rest (the log's head, each projection's position and lag, feed health per supplier,
  open dead letters, deliveries waiting): read from PostgreSQL when scraped, so every
  process answers the same and a process started later loses nothing.

prometheus-client picks its mode when it is first imported, from the environment: this
module imports it only inside its functions, after `ledger serve` has set the directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from api.recorder import connection_lost
from api.sweeper import LEASE as SWEEPER_LEASE
from projections.leases import ROLES, running
from projections.status import projection_status
from projections.stockcache import LOOKUP_RESULTS

if TYPE_CHECKING:
    from api.runtime import Runtime

log = structlog.get_logger(__name__)

DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
KEPT_TRY_OUTCOMES = ("saved", "not_as_kept", "nothing_to_save", "collided")
# Commands in one batch; the writer caps a batch at 500.
BATCH_COMMANDS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
BATCH_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@contextmanager
def prepare_directory() -> Iterator[Path]:
    """The directory the workers of one `ledger serve` count in, for as long as it runs.

    The operator's (PROMETHEUS_MULTIPROC_DIR), emptied first as prometheus-client asks
    (counts left from an earlier run would be added to this one's); else one of its own,
    removed afterwards."""
    given = os.environ.get(DIRECTORY)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="ledger-metrics-"))
    os.environ[DIRECTORY] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(DIRECTORY, None)
        shutil.rmtree(path, ignore_errors=True)


class Metrics:
    """The writer's counts in this process (see `LedgerWriter.metrics`)."""

    def __init__(self) -> None:
        import prometheus_client as prom

        # A registry of its own: a test process opens many runtimes, each with its metrics.
        self.registry = prom.CollectorRegistry()
        self.commands = prom.Counter(
            "ledger_commands",
            "Commands the ledger's writers answered, by command and outcome"
            " (ok, the refusal's code, cancelled, error)",
            ["command", "outcome"],
            registry=self.registry,
        )
        self.batch_commands = prom.Histogram(
            "ledger_writer_batch_commands",
            "Commands per writer batch (one save each)",
            buckets=BATCH_COMMANDS,
            registry=self.registry,
        )
        self.batch_seconds = prom.Histogram(
            "ledger_writer_batch_seconds",
            "Seconds from a batch gathered to its commands answered",
            buckets=BATCH_SECONDS,
            registry=self.registry,
        )
        self.conflicts = prom.Counter(
            "ledger_writer_conflicts",
            "Saves that collided with another process's on a stream and were decided again",
            registry=self.registry,
        )
        self.read_copy = prom.Counter(
            "ledger_read_copy_lookups",
            "Availability reads looked up in this server's in-process copy of the stock view,"
            " by result: hit, or sent to the view (absent, behind, stale)",
            ["result"],
            registry=self.registry,
        )
        for result in LOOKUP_RESULTS:  # each series there from the start, at 0
            self.read_copy.labels(result)
        self.exclusive_saves = prom.Counter(
            "ledger_writer_exclusive_saves",
            "Batches saved holding the event table's lock after colliding again and again",
            registry=self.registry,
        )
        self.kept_tries = prom.Counter(
            "ledger_writer_kept_tries",
            "Batches decided on what the writer kept, without asking the store, by outcome:"
            " saved, or decided again (not_as_kept, nothing_to_save, collided)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in KEPT_TRY_OUTCOMES:
            self.kept_tries.labels(outcome)

    def read_copy_lookups(self, counts: dict[str, int]) -> None:
        """Lookups of the in-process copy since the last call (`StockCache.report`)."""
        for result, count in counts.items():
            self.read_copy.labels(result).inc(count)

    # WriterMetrics -------------------------------------------------------------------

    def batch(self, outcomes: Counter[tuple[str, str]], seconds: float) -> None:
        for (command, outcome), count in outcomes.items():
            self.commands.labels(command, outcome).inc(count)
        self.batch_commands.observe(sum(outcomes.values()))
        self.batch_seconds.observe(seconds)

    def conflict(self) -> None:
        self.conflicts.inc()

    def exclusive(self) -> None:
        self.exclusive_saves.inc()

    def kept_try(self, outcome: str) -> None:
        self.kept_tries.labels(outcome).inc()


# How long a scrape waits for a connection to read the views and feeds before it says the
# database is down (`ledger_database_up` 0): well within Prometheus's 10 s timeout.
SCRAPE_DATABASE_SECONDS = 2.0


def exposition(runtime: Runtime) -> tuple[bytes, str]:
    """The text a scrape gets, and its content type: the writers' counts (every worker's
    under `ledger serve`, else this process's, if it counts) and the stored figures."""
    from prometheus_client import CollectorRegistry, exposition, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    # What generate_latest writes: the text format 0.0.4 (CONTENT_TYPE_LATEST names 1.0.0
    # from prometheus-client 0.22 on, where this constant came in).
    content_type = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

    text = b""
    if os.environ.get(DIRECTORY):
        counted = CollectorRegistry()
        MultiProcessCollector(counted)  # type: ignore[no-untyped-call]
        text = generate_latest(counted)
    elif runtime.metrics is not None:
        text = generate_latest(runtime.metrics.registry)
    stored = CollectorRegistry()
    stored.register(StoredFigures(runtime))
    return text + generate_latest(stored), content_type


def serve_worker_metrics(runtime: Runtime, host: str, port: int) -> Callable[[], None]:
    """Serves, on host:port in a thread of its own, what a scrape of `ledger serve` gets:
    this process's writer counts (where it counts) and the stored figures. For the worker
    commands, which have no HTTP of their own: `connectors run` applied deliveries that no
    scrape counted. Returns what stops it."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)  # nothing read until scraped
    if runtime.metrics is not None:
        registry.register(_Collected(runtime.metrics.registry))
    registry.register(StoredFigures(runtime))
    server, thread = start_http_server(port, host, registry=registry)
    log.info("metrics.serving", host=host, port=port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


class _Collected:
    """Another registry's metrics, as one collector (a registry takes collectors only)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        return iter(self.registry.collect())


class StoredFigures:
    """A collector reading, when scraped, what PostgreSQL holds about views and feeds."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily(
            "ledger_database_up", "Whether the figures below could be read from PostgreSQL"
        )
        try:
            self._reachable()
            families = list(self._read(GaugeMetricFamily, CounterMetricFamily))
        except Exception as error:  # a scrape says the database is down, it does not fail
            log.warning("metrics.unreadable", error=str(error))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _reachable(self) -> None:
        """Fails within twice `SCRAPE_DATABASE_SECONDS` where the database cannot be reached: the
        reads below go through the event store too, which tries a read ten times, so a
        scrape took 22 s with the database down, past Prometheus's 10 s timeout, and
        `ledger_database_up` never said 0 (an operator's walkthrough)."""
        runtime = self.runtime
        try:
            with runtime.store.connection(timeout=SCRAPE_DATABASE_SECONDS) as conn:
                conn.execute("SELECT 1")
        except Exception as error:
            # A connection the database ended (a restart): renewed, and tried once more. A
            # wait for one is a busy pool, which renewing every connection would add to.
            if not connection_lost(error):
                raise
            runtime.renew_connections()
            with runtime.store.connection(timeout=SCRAPE_DATABASE_SECONDS) as conn:
                conn.execute("SELECT 1")

    def _read(self, gauge: Any, counter: Any) -> Iterator[Any]:
        from connectors import health

        runtime = self.runtime
        head = gauge("ledger_log_position", "Position of the newest event in the log")
        head.add_metric([], runtime.app.recorder.max_notification_id() or 0)
        yield head

        views = ["projection"]
        position = gauge(
            "ledger_projection_position",
            "Position up to which each live view applied the log",
            labels=views,
        )
        lag = gauge(
            "ledger_projection_lag_events", "Events each live view has yet to apply", labels=views
        )
        age = gauge(
            "ledger_projection_lag_seconds",
            "How long the oldest event a live view has yet to apply has waited",
            labels=views,
        )
        failing = gauge(
            "ledger_projection_failing",
            "1 while a live view is stopped by an event it failed on",
            labels=views,
        )
        for view in projection_status(runtime.store, runtime.app):
            if view.live:
                position.add_metric([view.name], view.position)
                lag.add_metric([view.name], view.lag_events)
                age.add_metric([view.name], view.lag_seconds)
                failing.add_metric([view.name], 1 if view.error else 0)
        yield from (position, lag, age, failing)

        with runtime.store.connection() as conn:
            feeds = health.report(conn)
            letters = conn.execute(
                "SELECT supplier_id, count(*) AS open FROM connector_dead_letters"
                " WHERE status = 'open' GROUP BY supplier_id ORDER BY supplier_id"
            ).fetchall()
            waiting = conn.execute(
                "SELECT status, count(*) AS deliveries FROM connector_inbox"
                " WHERE status IN ('queued', 'processing', 'failed') GROUP BY status"
            ).fetchall()
            aged = conn.execute(
                "SELECT age(datfrozenxid) AS xid_age FROM pg_database"
                " WHERE datname = current_database()"
            ).fetchone()
            processes = running(conn, (SWEEPER_LEASE,))
        xid_age = int(aged["xid_age"]) if aged else 0
        yield from _feed_families(feeds, gauge, counter)
        open_letters = gauge(
            "ledger_dead_letters_open",
            "Refused records waiting to be fixed and retried",
            labels=["supplier"],
        )
        for row in letters:
            open_letters.add_metric([row["supplier_id"]], row["open"])
        yield open_letters
        inbox = gauge(
            "ledger_feed_inbox_deliveries",
            "Deliveries in the inbox not yet done, or failed for good (to be queued again),"
            " by status",
            labels=["status"],
        )
        counts = Counter({row["status"]: row["deliveries"] for row in waiting})
        for state in ("queued", "processing", "failed"):
            inbox.add_metric([state], counts[state])
        yield inbox
        age = gauge(
            "ledger_database_xid_age",
            "Transactions since the database's oldest unfrozen one (PostgreSQL's autovacuum"
            " must keep it far below 2 billion)",
        )
        age.add_metric([], xid_age)
        yield age
        parts = gauge(
            "ledger_processes",
            "Processes running each part of the ledger, by the sessions they hold in"
            " PostgreSQL: api, projections and connectors (each such process says so),"
            " sweeper (the one holding its lease; with none, expiries and stale suppliers go"
            " unrecorded)",
            labels=["part"],
        )
        for part in (*ROLES, "sweeper"):
            parts.add_metric([part], processes.get(part, 0))
        yield parts


def _feed_families(feeds: list[dict[str, Any]], gauge: Any, counter: Any) -> Iterator[Any]:
    """Feed health per supplier (as `GET /v1/feeds/health` shows it)."""
    by = {"labels": ["supplier"]}
    deliveries = counter("ledger_feed_deliveries", "Deliveries applied from each supplier", **by)
    failures = counter(
        "ledger_feed_failures", "Fetches and deliveries from each supplier that failed", **by
    )
    in_a_row = gauge(
        "ledger_feed_consecutive_failures", "Failures since each supplier's last success", **by
    )
    breaker = gauge(
        "ledger_feed_breaker_open", "1 while a supplier's circuit breaker is not closed", **by
    )
    success = gauge(
        "ledger_feed_last_success_timestamp_seconds", "When a delivery last applied", **by
    )
    error = gauge("ledger_feed_last_error_timestamp_seconds", "When a feed last failed", **by)
    lag = gauge(
        "ledger_feed_lag_seconds",
        "From observed to applied, for each supplier's last delivery that said when",
        **by,
    )
    rows = gauge("ledger_feed_last_delivery_rows", "Records in each supplier's last delivery", **by)
    rejected = gauge(
        "ledger_feed_last_delivery_rejected",
        "Records refused in each supplier's last delivery",
        **by,
    )
    late = gauge(
        "ledger_feed_last_delivery_late",
        "Reports in each supplier's last delivery older than the levels on record",
        **by,
    )
    for feed in feeds:
        supplier = [feed["supplier_id"]]
        deliveries.add_metric(supplier, feed["deliveries"])
        failures.add_metric(supplier, feed["failures"])
        in_a_row.add_metric(supplier, feed["consecutive_failures"])
        breaker.add_metric(supplier, 0 if feed["breaker"] == "closed" else 1)
        for family, at in ((success, feed["last_success_at"]), (error, feed["last_error_at"])):
            if at is not None:
                family.add_metric(supplier, at.timestamp())
        for family, value in (
            (lag, feed["last_lag_seconds"]),
            (rows, feed["last_rows"]),
            (rejected, feed["last_rejected"]),
            (late, feed["last_late"]),
        ):
            if value is not None:
                family.add_metric(supplier, value)
    yield from (deliveries, failures, in_a_row, breaker, success, error, lag, rows, rejected, late)
