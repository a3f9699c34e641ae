"""What /metrics is made of: a writer's counts by command and outcome, the stored figures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict

import projections.leases
from api.metrics import exposition
from api.runtime import Runtime, open_runtime
from api.settings import Settings
from api.sweeper import LEASE as SWEEPER_LEASE
from ledger.errors import InsufficientStock, UnknownSku
from projections.leases import LeaseSession, running
from tests.conftest import random_sku
from tests.integration.ledger_setup import reserve, stock_sku

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(runtime: Runtime) -> Samples:
    text, content_type = exposition(runtime)
    assert content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def command(name: str, outcome: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("ledger_commands_total", (("command", name), ("outcome", outcome)))


@pytest.fixture
def observed(settings: Settings) -> Iterator[Runtime]:
    """The ledger as an API process opens it: its writer counts for /metrics."""
    opened = open_runtime(settings, sweep=False, observe=True)
    try:
        yield opened
    finally:
        opened.close()


def test_each_command_is_counted_by_its_outcome_and_the_views_by_their_lag(
    observed: Runtime,
) -> None:
    sku = random_sku()
    stock_sku(observed.writer, sku, 2)  # a supplier, a SKU, a report: three commands
    observed.writer.execute(reserve([(sku, 2)]))
    with pytest.raises(InsufficientStock):
        observed.writer.execute(reserve([(sku, 1)]))
    with pytest.raises(UnknownSku):
        observed.writer.execute(reserve([(random_sku("NONE"), 1)]))
    head = observed.app.recorder.max_notification_id()
    observed.views.wait_for("stock", head or 0, timeout=20)

    found = samples(observed)

    assert found[command("PutSupplier", "ok")] == 1
    assert found[command("PutSku", "ok")] == 1
    assert found[command("ReportStock", "ok")] == 1
    assert found[command("Reserve", "ok")] == 1
    assert found[command("Reserve", "insufficient_stock")] == 1
    assert found[command("Reserve", "unknown_sku")] == 1
    assert found[("ledger_writer_batch_commands_count", ())] == 6
    assert found[("ledger_writer_batch_commands_sum", ())] == 6
    assert found[("ledger_writer_batch_seconds_count", ())] == 6
    assert found[("ledger_writer_conflicts_total", ())] == 0
    assert found[("ledger_database_up", ())] == 1
    assert found[("ledger_log_position", ())] == head
    stock = (("projection", "stock"),)
    assert found[("ledger_projection_position", stock)] == head
    assert found[("ledger_projection_lag_events", stock)] == 0
    assert found[("ledger_projection_failing", stock)] == 0
    assert found[("ledger_feed_inbox_deliveries", (("status", "queued"),))] == 0
    assert found[("ledger_feed_inbox_deliveries", (("status", "failed"),))] == 0
    assert 0 < found[("ledger_database_xid_age", ())] < 2_000_000_000


def test_a_scrape_while_the_views_cannot_be_read_says_so_and_keeps_the_counts(
    observed: Runtime,
) -> None:
    sku = random_sku()
    stock_sku(observed.writer, sku, 1)
    observed.store.close()  # the views' connections gone, as when PostgreSQL is

    found = samples(observed)

    assert found[("ledger_database_up", ())] == 0
    assert found[command("ReportStock", "ok")] == 1
    assert not any(name.startswith("ledger_projection_") for name, _ in found)


def test_a_scrape_while_the_database_refuses_connections_says_so_within_seconds(
    observed: Runtime, postgres_server_url: str
) -> None:
    """The reads went through the event store, which tries ten times: a scrape took 22 s
    with the database down, past Prometheus's 10 s timeout, so `ledger_database_up` never
    said 0 (an operator's walkthrough)."""
    stock_sku(observed.writer, random_sku(), 1)
    name = conninfo_to_dict(observed.database_url)["dbname"]
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            started = time.monotonic()
            found = samples(observed)
            took = time.monotonic() - started
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    assert found[("ledger_database_up", ())] == 0
    assert found[command("ReportStock", "ok")] == 1
    assert took < 5, took


def test_a_scrape_that_finds_every_connection_busy_renews_none(observed: Runtime) -> None:
    """A wait for a connection is a busy database, not a lost one: the scrape says the
    database is down and leaves the connections in use alone, as a request's 503 and the
    readiness probe do (it renewed both pools, every connection, at most once a second)."""
    stock_sku(observed.writer, random_sku(), 1)
    with ExitStack() as held:
        busy = [
            held.enter_context(observed.store.connection())
            for _ in range(observed.store.pool.max_size)
        ]
        before = {conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"] for conn in busy}

        found = samples(observed)

    assert found[("ledger_database_up", ())] == 0
    after = set()
    with ExitStack() as held:
        for _ in range(observed.store.pool.max_size):
            conn = held.enter_context(observed.store.connection())
            after.add(conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"])
    assert after == before
    assert samples(observed)[("ledger_database_up", ())] == 1


def test_the_read_copy_s_lookups_are_counted_by_result(settings: Settings) -> None:
    """An API process's copy of the stock view reports its lookups to /metrics."""
    # Never stale here, however long a refresh takes on a loaded machine: this counts.
    # Refreshed by its thread once, at the start, then only by the test: a refresh of its
    # own between the SKU's two changes reaching the view would take the SKU (new to the
    # copy), then drop it as it changed again unread (as designed), and the lookup below
    # would go to the view (seen once in CI on 2026-12-05).
    lagging = settings.model_copy(
        update={"read_cache_max_lag_seconds": 60.0, "read_cache_refresh_seconds": 3600.0}
    )
    opened = open_runtime(lagging, sweep=False, observe=True, read_cache=True)
    try:
        cache = opened.views.cache
        assert cache is not None
        assert opened.metrics is not None
        assert cache.report == opened.metrics.read_copy_lookups
        deadline = time.monotonic() + 10
        while cache.generation is None:  # its thread's first refresh
            assert time.monotonic() < deadline, "the copy never refreshed"
            time.sleep(0.01)
        sku = random_sku()
        stock_sku(opened.writer, sku, 2)
        head = opened.app.recorder.max_notification_id() or 0
        opened.views.wait_for("stock", head, timeout=20)
        cache.refresh()
        assert cache.lookup([sku], None) is not None
        assert cache.lookup([random_sku("NONE")], None) is None
        cache.report_lookups()
        found = samples(opened)
        assert found[("ledger_read_copy_lookups_total", (("result", "hit"),))] == 1
        assert found[("ledger_read_copy_lookups_total", (("result", "absent"),))] == 1
        assert found[("ledger_read_copy_lookups_total", (("result", "stale"),))] == 0
    finally:
        opened.close()


@pytest.mark.usefixtures("quiet_lasts")
def test_batches_decided_on_what_the_writer_kept_are_counted_by_outcome(
    observed: Runtime,
) -> None:
    sku = random_sku()
    stock_sku(observed.writer, sku, 2)
    observed.writer.execute(reserve([(sku, 1)]))
    observed.writer.execute(reserve([(sku, 1)]))  # decided on what it kept, and saved
    with pytest.raises(InsufficientStock):
        observed.writer.execute(reserve([(sku, 1)]))  # refused there: decided again

    found = samples(observed)

    def tries(outcome: str) -> float:
        return found[("ledger_writer_kept_tries_total", (("outcome", outcome),))]

    assert tries("saved") >= 1
    assert tries("nothing_to_save") == 1
    assert tries("not_as_kept") == 0
    assert tries("collided") == 0
    assert found[command("Reserve", "insufficient_stock")] == 1


def processes(runtime: Runtime) -> dict[str, float]:
    return {
        dict(labels)["part"]: value
        for (name, labels), value in samples(runtime).items()
        if name == "ledger_processes"
    }


def settle(runtime: Runtime, wanted: dict[str, float], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while (found := processes(runtime)) != wanted:
        assert time.monotonic() < deadline, found
        time.sleep(0.1)


def test_the_processes_running_each_part_are_counted_and_a_dead_one_drops_out(
    settings: Settings, database_url: str
) -> None:
    """Found by an operator's walkthrough: a dead projections or connectors worker showed
    only as lag or waiting deliveries, and on a quiet ledger as nothing at all."""
    opened = open_runtime(settings, sweep=True, project=True, connect=True)
    try:
        settle(opened, {"api": 0, "projections": 1, "connectors": 1, "sweeper": 1})
        worker = subprocess.Popen(
            [sys.executable, "-m", "api", "projections", "run"],
            env={
                **os.environ,
                "LEDGER_DATABASE_URL": database_url,
                "LEDGER_API_KEYS": "",
                "LEDGER_LOG_LEVEL": "WARNING",
            },
        )
        try:
            settle(opened, {"api": 0, "projections": 2, "connectors": 1, "sweeper": 1}, 60)
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        finally:
            worker.kill()
        settle(opened, {"api": 0, "projections": 1, "connectors": 1, "sweeper": 1})
    finally:
        opened.close()
    with psycopg.connect(database_url) as conn:
        assert running(conn, (SWEEPER_LEASE,)) == {
            "api": 0,
            "projections": 0,
            "connectors": 0,
            "sweeper": 0,
        }


def test_a_process_says_what_it_runs_again_once_its_session_is_back(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(projections.leases, "HEARTBEAT_SECONDS", 0.2)
    session = LeaseSession(database_url)
    try:
        session.present("connectors")
        with psycopg.connect(database_url, autocommit=True) as conn:
            assert running(conn)["connectors"] == 1
            conn.execute(  # this database's only: others' sessions are not ours to end
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND pid <> pg_backend_pid() AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            deadline = time.monotonic() + 10
            seen_gone = False
            while not (seen_gone and running(conn)["connectors"] == 1):
                seen_gone = seen_gone or running(conn)["connectors"] == 0
                assert time.monotonic() < deadline
                time.sleep(0.02)
    finally:
        session.close()


PRESENT = """
import sys, time
import projections.leases as leases
leases.HEARTBEAT_SECONDS = 0.3
session = leases.LeaseSession(sys.argv[1])
session.present("connectors")
print("present", flush=True)
time.sleep(3600)
"""


def test_a_frozen_process_drops_out_of_the_count_and_comes_back_when_it_wakes(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a walkthrough: a stopped `connectors run` (SIGSTOP, as a paused VM) kept its
    session, its kernel answering keepalives, and was counted for good."""
    monkeypatch.setattr(projections.leases, "SILENT_SECONDS", 2.0)
    worker = subprocess.Popen(
        [sys.executable, "-c", PRESENT, database_url],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "present"
        with psycopg.connect(database_url, autocommit=True) as conn:

            def counted(wanted: int) -> None:
                deadline = time.monotonic() + 15
                while running(conn)["connectors"] != wanted:
                    assert time.monotonic() < deadline, wanted
                    time.sleep(0.1)

            counted(1)
            time.sleep(3)  # busy elsewhere, but beating: still counted
            counted(1)
            os.kill(worker.pid, signal.SIGSTOP)
            counted(0)
            os.kill(worker.pid, signal.SIGCONT)
            counted(1)
    finally:
        worker.kill()
        worker.wait()
