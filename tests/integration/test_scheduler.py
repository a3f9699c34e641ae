"""Supplier schedules end to end: fetched by a transport, stored in the inbox, applied."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from api.runtime import Runtime
from connectors import health
from connectors.scheduler import Scheduler
from connectors.simulator import Catalogue, RestSupplier, SftpSupplier, drop
from connectors.worker import InboxWorker
from ledger.commands import PutMappings, PutSupplier
from ledger.mapping import MappingSpec
from ledger.stock import StockItem
from ledger.supplier import SupplierTerms
from projections.leases import LeaseSession
from tests.integration.ledger_setup import CAUSE


def supplier_fed_by(
    runtime: Runtime, supplier: str, catalogue: Catalogue, **connector: Any
) -> None:
    at = datetime.now(UTC)
    terms = SupplierTerms(supplier, connector={"units": {"CS": 12}, **connector})
    runtime.writer.execute(PutSupplier(at=at, cause=CAUSE, supplier_id=supplier, terms=terms))
    mappings = [
        MappingSpec(item.supplier_sku, f"{supplier}-{item.supplier_sku}", 1, item.upc)
        for item in catalogue.items()
    ]
    outcome = runtime.writer.execute(
        PutMappings(at=at, cause=CAUSE, supplier_id=supplier, mappings=mappings)
    )
    assert outcome.position is not None
    for view in ("stock", "mappings"):
        runtime.views.wait_for(view, outcome.position, timeout=10)


def level(runtime: Runtime, supplier: str, supplier_sku: str) -> int:
    item = runtime.app.repository.get(StockItem.id_for(f"{supplier}-{supplier_sku}"))
    return item.positions[supplier].quantity


def scheduler_for(runtime: Runtime, **options: Any) -> tuple[Scheduler, InboxWorker]:
    worker = InboxWorker(runtime.ingestor, runtime.store)
    return Scheduler(runtime.store, runtime.leases, worker, **options), worker


@contextmanager
def throttled_and_fine(
    runtime: Runtime, seed: int, times: int, retry_after: int, **poll: Any
) -> Iterator[RestSupplier]:
    """Two polled suppliers: "throttled", whose server answers its next `times` requests
    429 with that Retry-After (the server is yielded), and "fine"."""
    slow, quick = Catalogue(3, seed=seed), Catalogue(3, seed=seed + 1)
    with (
        RestSupplier(slow, pagination="page") as throttling,
        RestSupplier(quick, pagination="page") as fine,
    ):
        throttling.faults.throttle_next(times, retry_after=retry_after)
        for name, server, catalogue in (("throttled", throttling, slow), ("fine", fine, quick)):
            supplier_fed_by(
                runtime,
                name,
                catalogue,
                poll={"url": f"{server.base_url}/inventory", "pagination": "page", **poll},
            )
        yield throttling


def test_a_dropped_file_is_picked_up_once_applied_and_moved_aside(
    ledger: Runtime, tmp_path: Path
) -> None:
    catalogue = Catalogue(5, seed=3, observed_at=datetime.now(UTC) - timedelta(minutes=1))
    supplier_fed_by(
        ledger,
        "dropper",
        catalogue,
        folder={"path": str(tmp_path), "format": "csv", "settle_seconds": 0},
    )
    dropped = drop(tmp_path, "csv", catalogue.items(), name="stock-1.csv")
    (tmp_path / ".stock-2.csv.abc.part").write_bytes(b"half a file")
    scheduler, worker = scheduler_for(ledger)

    assert scheduler.tick() == 1
    assert worker.work_once()
    assert scheduler.tick() == 0  # nothing new; the partial file is left alone

    first = next(iter(catalogue.items()))
    assert (
        level(ledger, "dropper", first.supplier_sku)
        == first.quantity * first.units_per_supplier_unit
    )
    assert not dropped.exists()
    assert (tmp_path / "processed" / "stock-1.csv").exists()
    assert (tmp_path / ".stock-2.csv.abc.part").exists()


def test_an_edi_file_is_pulled_over_sftp_and_applied(ledger: Runtime, tmp_path: Path) -> None:
    catalogue = Catalogue(4, seed=5, observed_at=datetime.now(UTC) - timedelta(minutes=1))
    os.environ["TEST_SFTP_PASSWORD"] = "sftp-secret"
    served = tmp_path / "served"
    served.mkdir()
    with SftpSupplier(served, username="feed", password="sftp-secret") as server:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(server.known_hosts)
        supplier_fed_by(
            ledger,
            "remote",
            catalogue,
            sftp={
                "host": server.host,
                "port": server.port,
                "username": "feed",
                "password_ref": "env:TEST_SFTP_PASSWORD",
                "path": "/",
                "format": "edi846",
                "known_hosts": str(known_hosts),
                "settle_seconds": 0,
            },
        )
        drop(served, "edi846", catalogue.items(), name="inventory.edi")
        scheduler, worker = scheduler_for(ledger)
        assert scheduler.tick() == 1
        assert worker.work_once()
        assert scheduler.tick() == 0

    last = list(catalogue.items())[-1]
    assert (
        level(ledger, "remote", last.supplier_sku) == last.quantity * last.units_per_supplier_unit
    )
    assert (served / "processed" / "inventory.edi").exists()


def test_a_supplier_that_answers_again_with_nothing_new_is_healthy_again(
    ledger: Runtime,
) -> None:
    catalogue = Catalogue(3, seed=9)
    with RestSupplier(catalogue, pagination="page", page_size=10) as rest:
        supplier_fed_by(
            ledger,
            "recovering",
            catalogue,
            poll={"url": f"{rest.base_url}/inventory", "pagination": "page", "max_attempts": 1},
        )
        scheduler, worker = scheduler_for(ledger)
        scheduler.refresh()
        schedule = scheduler.schedules["recovering"]
        assert scheduler.run(schedule) == 1
        assert worker.work_once()
        rest.faults.fail_next(2, status=503)
        for _ in range(2):
            assert scheduler.run(schedule) == 0
        with ledger.store.connection() as conn:
            [failing] = health.report(conn, "recovering")
        assert scheduler.run(schedule) == 0  # 304: nothing new, and the feed answers
        with ledger.store.connection() as conn:
            [healed] = health.report(conn, "recovering")

    assert [request.status for request in rest.requests][-1] == 304
    assert failing["consecutive_failures"] == 2
    assert healed["consecutive_failures"] == 0
    # The last success is still the last delivery applied: a 304 applies nothing.
    assert healed["last_success_at"] == failing["last_success_at"]
    assert healed["deliveries"] == failing["deliveries"] == 1


def test_a_failing_supplier_opens_its_breaker_and_shows_in_feed_health(ledger: Runtime) -> None:
    catalogue = Catalogue(3, seed=9)
    with RestSupplier(catalogue, pagination="page", page_size=10) as rest:
        supplier_fed_by(
            ledger,
            "flaky",
            catalogue,
            poll={
                "url": f"{rest.base_url}/inventory",
                "pagination": "page",
                "page_size": 10,
                "max_attempts": 1,
            },
            breaker={"failures_to_open": 2, "cooldown_seconds": 0.5},
        )
        scheduler, worker = scheduler_for(ledger)
        scheduler.refresh()
        schedule = scheduler.schedules["flaky"]
        rest.faults.fail_next(2, status=503)
        for _ in range(2):
            assert scheduler.run(schedule) == 0
        with ledger.store.connection() as conn:
            [failing] = health.report(conn, "flaky")
        requests_while_open = len(rest.requests)
        assert scheduler.run(schedule) == 0  # open: not even tried

        schedule.breaker.clock = lambda: float("inf")  # the cooldown has passed
        assert scheduler.run(schedule) == 1  # the probe succeeds
        assert worker.work_once()
        with ledger.store.connection() as conn:
            [healed] = health.report(conn, "flaky")

    assert (failing["breaker"], failing["consecutive_failures"]) == ("open", 2)
    assert failing["last_error"].startswith("http_503")
    assert len(rest.requests) == requests_while_open + 1
    assert (healed["breaker"], healed["consecutive_failures"]) == ("closed", 0)
    assert healed["deliveries"] == 1


def test_the_same_undated_file_again_keeps_the_stock_fresh(ledger: Runtime, tmp_path: Path) -> None:
    catalogue = Catalogue(3, seed=4)
    supplier_fed_by(
        ledger,
        "steady",
        catalogue,
        folder={"path": str(tmp_path), "format": "csv", "settle_seconds": 0},
    )
    item = next(iter(catalogue.items()))
    undated = f"supplier_sku,quantity\n{item.supplier_sku},7\n".encode()
    scheduler, worker = scheduler_for(ledger)
    (tmp_path / "daily.csv").write_bytes(undated)
    assert scheduler.tick() == 1
    assert worker.work_once()
    stock_id = StockItem.id_for(f"steady-{item.supplier_sku}")
    first = ledger.app.repository.get(stock_id).positions["steady"].observed_at

    (tmp_path / "daily.csv").write_bytes(undated)  # the next day: the very same file
    tomorrow = (tmp_path / "daily.csv").stat().st_mtime + 86_400
    os.utime(tmp_path / "daily.csv", (tomorrow, tomorrow))
    scheduler.schedules["steady"].due = 0
    assert scheduler.tick() == 1
    assert worker.work_once()
    with ledger.store.connection() as conn:
        [row] = conn.execute(
            "SELECT observed_at FROM inventoryledger_levels WHERE supplier_id = 'steady'"
            " AND sku = %s",
            (f"steady-{item.supplier_sku}",),
        ).fetchall()
    assert first is not None
    assert row["observed_at"] >= first


def count_reads(scheduler: Scheduler) -> list[str]:
    """The names of the files the schedules' folder transports read from now on."""
    scheduler.refresh()
    read: list[str] = []
    for schedule in scheduler.schedules.values():
        transport = schedule.transport
        original = transport._read  # type: ignore[attr-defined]

        def counted(name: str, original: Any = original) -> bytes | None:
            read.append(name)
            return original(name)  # type: ignore[no-any-return]

        transport._read = counted  # type: ignore[attr-defined]
    return read


def test_a_file_listed_again_before_it_was_moved_is_not_stored_again(
    ledger: Runtime, tmp_path: Path
) -> None:
    catalogue = Catalogue(3, seed=6, observed_at=datetime.now(UTC) - timedelta(minutes=1))
    feeds, blocker = tmp_path / "feeds", tmp_path / "blocker"
    feeds.mkdir()
    blocker.write_text("a file where the processed folder should be")
    supplier_fed_by(
        ledger,
        "stuck",
        catalogue,
        folder={
            "path": str(feeds),
            "format": "csv",
            "processed_path": str(blocker),
            "max_attempts": 1,
            "settle_seconds": 0,
        },
    )
    drop(feeds, "csv", catalogue.items(), name="stock.csv")
    scheduler, worker = scheduler_for(ledger)

    read = count_reads(scheduler)
    assert scheduler.tick() == 1  # stored; moving it aside fails
    assert (feeds / "stock.csv").exists()
    scheduler.schedules["stuck"].due = 0
    assert scheduler.tick() == 0  # the same file, listed again: not downloaded again
    assert read == ["stock.csv"]
    blocker.unlink()  # the processed folder can be made now
    scheduler.schedules["stuck"].due = 0
    assert scheduler.tick() == 0  # still recognised, and now moved aside
    assert worker.work_once()
    assert not worker.work_once()

    assert not (feeds / "stock.csv").exists()
    assert (blocker / "stock.csv").exists()
    with ledger.store.connection() as conn:
        stored = conn.execute(
            "SELECT delivery_id, status FROM connector_inbox WHERE supplier_id = 'stuck'"
        ).fetchall()
    assert [row["status"] for row in stored] == ["applied"]
    first = next(iter(catalogue.items()))
    assert (
        level(ledger, "stuck", first.supplier_sku) == first.quantity * first.units_per_supplier_unit
    )


def test_feed_health_is_a_view_with_rows_per_delivery(ledger: Runtime) -> None:
    with ledger.store.connection() as conn:
        health.succeeded(conn, "sized", "d-1", rows=2, applied=2, rejected=0, lag_seconds=1.5)
        health.succeeded(conn, "sized", "d-2", rows=5, applied=1, rejected=1, lag_seconds=None)
        assert health.failed(conn, "sized", "http_503: unavailable") == 1
        [viewed] = conn.execute(
            "SELECT * FROM view_feed_health WHERE supplier_id = 'sized'"
        ).fetchall()
        [reported] = health.report(conn, "sized")

    assert (viewed["deliveries"], viewed["rows_per_delivery"]) == (2, 3.5)
    assert (viewed["last_rows"], viewed["last_rejected"], viewed["last_lag_seconds"]) == (5, 1, 1.5)
    assert (viewed["consecutive_failures"], viewed["failures"]) == (1, 1)
    assert reported["rows_per_delivery"] == 3.5
    assert reported["last_error"] == "http_503: unavailable"


@pytest.mark.alone
def test_a_throttling_supplier_never_holds_up_the_others_and_stopping_cuts_its_wait(
    ledger: Runtime,
) -> None:
    """One supplier answers 429 with Retry-After: 60 (within what its retries may wait);
    another is fine. The second's feed is fetched meanwhile, and stopping the scheduler
    ends the first one's wait instead of sitting it out, without calling it a failure."""
    with throttled_and_fine(
        ledger, 11, 5, 60, max_attempts=3, max_retry_after_seconds=120
    ) as throttling:
        scheduler, _ = scheduler_for(ledger)
        scheduler.tick_seconds = 0.05
        scheduler.start()
        try:
            deadline = time.monotonic() + 10
            while (
                scheduler.schedules.get("fine") is None or not scheduler.schedules["fine"].fetched
            ):
                assert time.monotonic() < deadline, "the fine supplier waited for the other"
                time.sleep(0.05)
            waiting = [request.status for request in throttling.requests]
        finally:
            began = time.monotonic()
            scheduler.stop()
            stopped_in = time.monotonic() - began
        with ledger.store.connection() as conn:
            throttled_health = health.report(conn, "throttled")

    assert waiting == [429]  # asked once, and waiting out its minute
    assert stopped_in < 5
    assert [row["consecutive_failures"] for row in throttled_health] in ([], [0])


@pytest.mark.alone
def test_a_fetch_waiting_to_retry_gives_its_slot_to_another_supplier(ledger: Runtime) -> None:
    """With one fetch slot, a supplier sitting out a Retry-After does not hold it: the
    other supplier is fetched meanwhile, and the first one's retry, once its wait is
    over, takes a slot again and succeeds."""
    with throttled_and_fine(ledger, 21, 1, 2) as throttling:
        scheduler, _ = scheduler_for(ledger, fetch_threads=1)
        scheduler.refresh()
        scheduler.schedules["fine"].due = time.monotonic() + 0.3  # the throttled one first
        scheduler.tick(wait=False)
        deadline = time.monotonic() + 1.5
        while not throttling.requests:
            assert time.monotonic() < deadline, "the throttled supplier was not asked"
            time.sleep(0.01)
        try:
            began = time.monotonic()
            while not scheduler.schedules["fine"].fetched:
                assert time.monotonic() - began < 1.5, "the fine supplier waited for the slot"
                scheduler.tick(wait=False)
                time.sleep(0.02)
            throttled_then = [request.status for request in throttling.requests]
            deadline = time.monotonic() + 10
            while not scheduler.schedules["throttled"].fetched:
                assert time.monotonic() < deadline, "the throttled supplier's retry never ran"
                time.sleep(0.05)
        finally:
            scheduler.stop()

    assert throttled_then == [429]  # still sitting out its two seconds
    assert [request.status for request in throttling.requests][:2] == [429, 200]


def test_a_schedule_made_anew_shows_its_own_breaker_not_the_one_before(ledger: Runtime) -> None:
    """After a restart or a handover the breaker starts closed: feed health must not keep
    saying "open" for a breaker no process holds any more."""
    catalogue = Catalogue(2, seed=13)
    with RestSupplier(catalogue, pagination="page") as rest:
        supplier_fed_by(ledger, "restarted", catalogue, poll={"url": f"{rest.base_url}/inventory"})
        with ledger.store.connection() as conn:
            health.set_breaker(conn, "restarted", "open")  # as a process that died left it
        scheduler, _ = scheduler_for(ledger)
        assert scheduler.tick() == 1
        with ledger.store.connection() as conn:
            [shown] = health.report(conn, "restarted")
    assert shown["breaker"] == "closed"


def test_a_supplier_no_longer_fetched_shows_its_breaker_closed(ledger: Runtime) -> None:
    """A supplier integrator's walkthrough: a connector removed while its breaker was open
    left feed health (and its metric) saying `open` for good: no probe ran to close it."""
    catalogue = Catalogue(2, seed=17)
    with RestSupplier(catalogue, pagination="page") as rest:
        poll = {"url": f"{rest.base_url}/inventory", "max_attempts": 1}
        breaker = {"failures_to_open": 1, "cooldown_seconds": 3600}
        supplier_fed_by(ledger, "dropped", catalogue, poll=poll, breaker=breaker)
        supplier_fed_by(ledger, "kept", catalogue, poll=poll, breaker=breaker)
        scheduler, _ = scheduler_for(ledger)
        scheduler.refresh()
        rest.faults.fail_next(2, status=503)
        for supplier in ("dropped", "kept"):
            assert scheduler.run(scheduler.schedules[supplier]) == 0
        with ledger.store.connection() as conn:
            opened = {row["supplier_id"]: row["breaker"] for row in health.report(conn)}
        # Its connector removed (no transport that fetches is left).
        removed = ledger.writer.execute(
            PutSupplier(
                at=datetime.now(UTC),
                cause=CAUSE,
                supplier_id="dropped",
                terms=SupplierTerms("dropped", connector={}),
            )
        )
        assert removed.position is not None
        ledger.views.wait_for("stock", removed.position, timeout=10)
        scheduler.refresh()
        with ledger.store.connection() as conn:
            shown = {row["supplier_id"]: row["breaker"] for row in health.report(conn)}

    assert (opened["dropped"], opened["kept"]) == ("open", "open")
    assert "dropped" not in scheduler.schedules
    assert (shown["dropped"], shown["kept"]) == ("closed", "open")


def test_a_fetch_still_in_a_request_when_stopping_keeps_its_supplier_s_lease(
    ledger: Runtime,
) -> None:
    """Stopping gives fetches a while to end; one that has not (a slow server) keeps its
    supplier's lease, so no other process fetches that supplier at the same time."""
    catalogue = Catalogue(2, seed=14)
    with RestSupplier(catalogue, pagination="page") as rest:
        supplier_fed_by(ledger, "slowpoke", catalogue, poll={"url": f"{rest.base_url}/inventory"})
        rest.faults.delay_next(3.0)
        scheduler, _ = scheduler_for(ledger)
        scheduler.tick_seconds, scheduler.stop_wait_seconds = 0.05, 0.2
        scheduler.start()
        deadline = time.monotonic() + 10
        while "slowpoke" not in scheduler._running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        scheduler.stop()
        other = LeaseSession(ledger.database_url)
        try:
            taken_meanwhile = other.hold("connector:slowpoke", other)
            still_held = ledger.leases.holds("connector:slowpoke", scheduler)
        finally:
            other.close()
    assert still_held
    assert not taken_meanwhile


def test_stored_transport_settings_that_are_refused_now_stop_only_their_own_supplier(
    ledger: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Settings saved before today's checks (a timeout of "inf", on which every request
    overflowed) keep their supplier unscheduled, logged with the reason; the others fetch."""
    catalogue = Catalogue(2, seed=15, observed_at=datetime.now(UTC) - timedelta(minutes=1))
    supplier_fed_by(
        ledger,
        "stored-badly",
        catalogue,
        poll={"url": "http://127.0.0.1:9/x", "timeout_seconds": "inf"},
    )
    supplier_fed_by(
        ledger,
        "stored-well",
        catalogue,
        folder={"path": str(tmp_path), "format": "csv", "settle_seconds": 0},
    )
    drop(tmp_path, "csv", catalogue.items(), name="stock.csv")
    scheduler, _ = scheduler_for(ledger)

    with caplog.at_level(logging.ERROR, logger="connectors.scheduler"):
        assert scheduler.tick() == 1

    assert set(scheduler.schedules) == {"stored-well"}
    [refused] = [
        record.msg
        for record in caplog.records
        if isinstance(record.msg, dict) and record.msg.get("event") == "scheduler.bad_settings"
    ]
    assert refused["supplier"] == "stored-badly"
    assert "poll.timeout_seconds" in caplog.text
    # Feed health says why, once: the refresh after it finds the same reason.
    scheduler.refresh()
    with ledger.store.connection() as conn:
        [shown] = health.report(conn, "stored-badly")
    assert shown["last_error"].startswith("settings_refused: bad_option: poll.timeout_seconds")
    assert shown["consecutive_failures"] == 1
