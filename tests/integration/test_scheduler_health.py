"""Feed health as the scheduler writes it: Retry-After deferrals, the breaker's probe, the
end of a run of failures, and files that cannot be moved aside."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from api.runtime import Runtime
from connectors import health, inbox
from connectors.scheduler import Schedule, Scheduler
from connectors.simulator import Catalogue, FtpSupplier, RestSupplier, drop
from connectors.simulator.ftp import READ_ONLY
from connectors.transports import Fetched
from ledger.commands import PutSupplier
from ledger.supplier import SupplierTerms
from tests.integration.test_scheduler import count_reads, scheduler_for, supplier_fed_by
from tests.integration.workload import CAUSE


def shown(runtime: Runtime, supplier: str) -> dict[str, Any]:
    with runtime.store.connection() as conn:
        [row] = health.report(conn, supplier)
    return dict(row)


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [
        record.msg
        for record in caplog.records
        if isinstance(record.msg, dict) and record.msg.get("event") == event
    ]


def polled(rest: RestSupplier, **options: Any) -> dict[str, Any]:
    return {"url": f"{rest.base_url}/inventory", "pagination": "page", **options}


def test_a_day_long_retry_after_puts_the_next_fetch_off_an_hour_at_most_and_says_so(
    ledger: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    catalogue = Catalogue(3, seed=31, observed_at=datetime.now(UTC) - timedelta(minutes=1))
    with RestSupplier(catalogue, pagination="page") as rest:
        supplier_fed_by(
            ledger,
            "throttled-long",
            catalogue,
            poll=polled(rest),
            schedule={"interval_seconds": 30, "jitter": 0.1},
        )
        now = [1000.0]
        scheduler = Scheduler(ledger.store, ledger.leases, clock=lambda: now[0])
        rest.faults.throttle_next(1, retry_after=86400)
        with caplog.at_level(logging.WARNING, logger="connectors.scheduler"):
            assert scheduler.tick() == 0
        told_at = datetime.now(UTC)
        due = scheduler.schedules["throttled-long"].due
        throttled = shown(ledger, "throttled-long")
        now[0] = 1000.0 + 3600
        assert scheduler.tick() == 1  # an hour on, not a day

    assert due == 1000.0 + 3600
    said = re.fullmatch(
        r"http_429: Retry-After 86400 s, next fetch at (\S+) \(capped at 3600 s\)",
        throttled["last_error"],
    )
    assert said is not None, throttled["last_error"]
    next_fetch = datetime.strptime(said[1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((next_fetch - told_at).total_seconds() - 3600) < 60
    [failed] = logged(caplog, "connector.fetch_failed")
    assert (failed["retry_after"], failed["next_fetch_in_seconds"]) == (86400, 3600)


def probing(runtime: Runtime, schedule: Schedule) -> list[str]:
    """The breaker states feed health shows as each fetch of `schedule` starts."""
    seen: list[str] = []
    fetch = schedule.transport.fetch

    def noting() -> Iterator[Fetched]:
        seen.append(shown(runtime, schedule.supplier_id)["breaker"])
        yield from fetch()

    schedule.transport.fetch = noting  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize(("probe_succeeds", "after"), [(True, "closed"), (False, "open")])
def test_feed_health_shows_the_breaker_half_open_while_its_probe_runs(
    ledger: Runtime, probe_succeeds: bool, after: str
) -> None:
    catalogue = Catalogue(3, seed=32)
    with RestSupplier(catalogue, pagination="page") as rest:
        supplier_fed_by(
            ledger,
            "probed",
            catalogue,
            poll=polled(rest, max_attempts=1),
            breaker={"failures_to_open": 1, "cooldown_seconds": 60},
        )
        scheduler, _ = scheduler_for(ledger)
        scheduler.refresh()
        schedule = scheduler.schedules["probed"]
        clock = [0.0]
        schedule.breaker.clock = lambda: clock[0]
        rest.faults.fail_next(1 if probe_succeeds else 2, status=503)
        assert scheduler.run(schedule) == 0
        opened = shown(ledger, "probed")["breaker"]
        seen = probing(ledger, schedule)
        clock[0] = 61.0  # the cooldown has passed: the next fetch is the probe
        scheduler.run(schedule)

    assert opened == "open"
    assert seen == ["half_open"]
    assert shown(ledger, "probed")["breaker"] == after


def test_a_good_fetch_after_rejected_deliveries_ends_their_run_of_failures(
    ledger: Runtime, tmp_path: Path
) -> None:
    """A drop-folder supplier whose file was rejected whole, then whose folder is empty
    fetch after fetch: the feed is reached again, so its failures in a row end, while its
    last error still says what was rejected."""
    catalogue = Catalogue(2, seed=33)
    supplier_fed_by(
        ledger,
        "rejected",
        catalogue,
        folder={"path": str(tmp_path), "format": "csv", "settle_seconds": 0},
    )
    scheduler, worker = scheduler_for(ledger)
    (tmp_path / "broken.csv").write_bytes(b"not,a,feed\n1,2,3\n")
    assert scheduler.tick() == 1
    assert worker.work_once()
    rejected = shown(ledger, "rejected")

    for _ in range(2):
        scheduler.schedules["rejected"].due = 0
        assert scheduler.tick() == 0  # the folder is empty now
    reached = shown(ledger, "rejected")

    assert rejected["consecutive_failures"] == 1
    assert rejected["last_error"].startswith("missing_column")
    assert reached["consecutive_failures"] == 0
    assert (reached["last_error"], reached["failures"]) == (rejected["last_error"], 1)


def test_a_good_fetch_by_a_new_scheduler_ends_the_failures_the_one_before_counted(
    ledger: Runtime,
) -> None:
    """A restart or a handover: the scheduler that now holds the supplier never saw the
    failed fetches, and still ends their run when it reaches the supplier."""
    catalogue = Catalogue(2, seed=34)
    with RestSupplier(catalogue, pagination="page") as rest:
        supplier_fed_by(ledger, "handed-over", catalogue, poll=polled(rest, max_attempts=1))
        before, _ = scheduler_for(ledger)
        before.refresh()
        rest.faults.fail_next(2, status=503)
        for _ in range(2):
            assert before.run(before.schedules["handed-over"]) == 0
        failing = shown(ledger, "handed-over")
        after, _ = scheduler_for(ledger)
        after.refresh()
        assert after.run(after.schedules["handed-over"]) == 1

    assert failing["consecutive_failures"] == 2
    assert shown(ledger, "handed-over")["consecutive_failures"] == 0


def test_a_read_only_ftp_account_is_told_once_and_shown_without_failing_the_supplier(
    ledger: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    """Its files are taken once each, but never moved aside: said once in the log and in
    feed health's last error, not at every fetch, and not counted as failures."""
    monkeypatch.setenv("READ_ONLY_FTP_PASSWORD", "feed-pw")
    catalogue = Catalogue(3, seed=35, observed_at=datetime.now(UTC) - timedelta(minutes=1))
    served = tmp_path / "served"
    served.mkdir()
    with FtpSupplier(served, username="feed", password="feed-pw", permissions=READ_ONLY) as ftp:
        supplier_fed_by(
            ledger,
            "read-only",
            catalogue,
            ftp={
                "host": ftp.host,
                "port": ftp.port,
                "username": "feed",
                "password_ref": "env:READ_ONLY_FTP_PASSWORD",
                "format": "csv",
                "settle_seconds": 0,
                "max_attempts": 1,
            },
        )
        drop(served, "csv", catalogue.items(), name="stock.csv")
        scheduler, worker = scheduler_for(ledger)
        read = count_reads(scheduler)
        with caplog.at_level(logging.INFO):
            assert scheduler.tick() == 1
            for _ in range(4):
                scheduler.schedules["read-only"].due = 0
                assert scheduler.tick() == 0
        assert worker.work_once()

    told = logged(caplog, "connector.mark_done_failed") + logged(
        caplog, "transport.still_not_put_aside"
    )
    assert [entry["name"] for entry in told] == ["stock.csv"]
    assert read == ["stock.csv"]
    assert (served / "stock.csv").exists()
    now = shown(ledger, "read-only")
    assert now["last_error"].startswith("not_put_aside: ftp_refused")
    assert (now["consecutive_failures"], now["failures"], now["breaker"]) == (0, 0, "closed")
    assert now["deliveries"] == 1


def test_rows_per_delivery_after_an_upgrade_counts_only_the_deliveries_whose_rows_it_has(
    ledger: Runtime,
) -> None:
    """Found by an upgrade walkthrough: a database from before rows were counted kept every
    earlier delivery in the average's divisor and none of their rows (0.0 a delivery)."""
    with ledger.store.connection() as conn:
        # As a database from before: the rows column came later, so it counted none of
        # the earlier deliveries' rows.
        conn.execute("ALTER TABLE connector_health DROP COLUMN rows_deliveries CASCADE")
        conn.execute(
            "INSERT INTO connector_health (supplier_id, deliveries, rows) VALUES ('old', 5, 8)"
        )
        inbox.create_tables(conn)  # the upgrade
        before = conn.execute(
            "SELECT deliveries, rows_per_delivery FROM view_feed_health WHERE supplier_id = 'old'"
        ).fetchone()
        health.succeeded(conn, "old", "d-6", 12, 12, 0, None)
        health.succeeded(conn, "old", "d-7", 20, 2, 0, None)
        health.succeeded(conn, "new", "d-1", 3, 3, 0, None)
        [old, new] = conn.execute(
            "SELECT supplier_id, deliveries, rows_per_delivery FROM view_feed_health"
            " WHERE supplier_id IN ('old', 'new') ORDER BY supplier_id DESC"
        ).fetchall()
    assert (before["deliveries"], before["rows_per_delivery"]) == (5, None)  # not yet known
    assert (old["deliveries"], old["rows_per_delivery"]) == (7, 16.0)
    assert (new["deliveries"], new["rows_per_delivery"]) == (1, 3.0)


def put_off_by(runtime: Runtime, supplier: str, catalogue: Catalogue, **connector: Any) -> None:
    """New connector settings, the stock view caught up with them (a scheduler reads them
    there)."""
    terms = SupplierTerms(supplier, connector={"units": {"CS": 12}, **connector})
    outcome = runtime.writer.execute(
        PutSupplier(at=datetime.now(UTC), cause=CAUSE, supplier_id=supplier, terms=terms)
    )
    assert outcome.position is not None
    runtime.views.wait_for("stock", outcome.position, timeout=10)


def test_a_retry_after_holds_on_across_new_settings_and_a_handover(ledger: Runtime) -> None:
    """A supplier integrator's walkthrough: a schedule made anew (an interval changed, or
    another process taking the supplier over) fetched a supplier that had asked for 200 s
    within 28 s, and within 3."""
    catalogue = Catalogue(3, seed=35)
    with RestSupplier(catalogue, pagination="page") as rest:
        poll = polled(rest, max_retry_after_seconds=0)  # none waited within a fetch
        supplier_fed_by(ledger, "asked", catalogue, poll=poll, schedule={"interval_seconds": 1})
        first = Scheduler(ledger.store, ledger.leases)
        rest.faults.throttle_next(1, retry_after=4)
        assert first.tick() == 0
        asked = len(rest.requests)
        put_off_by(ledger, "asked", catalogue, poll=poll, schedule={"interval_seconds": 2})
        first.refresh()
        assert first.schedules["asked"].due == 0  # made anew
        assert first.tick() == 0  # new settings: still put off
        first.stop()  # a handover
        second = Scheduler(ledger.store, ledger.leases)
        assert second.tick() == 0
        waited = len(rest.requests)
        due_in = second.schedules["asked"].due - second.clock()
        time.sleep(due_in + 0.1)
        assert second.tick() == 1  # the Retry-After is over
        second.stop()

    assert asked == waited == 1
    assert 2 < due_in <= 4
    assert shown(ledger, "asked")["consecutive_failures"] == 0


def test_an_open_breaker_stays_open_across_a_handover_but_not_new_fetch_settings(
    ledger: Runtime,
) -> None:
    """A supplier integrator's walkthrough: a schedule made anew came with a closed
    breaker, and a supplier still failing was asked again at once. A change of how it is
    fetched (its URL) is a new start: the breaker is closed, and it is fetched."""
    catalogue = Catalogue(3, seed=36)
    with RestSupplier(catalogue, pagination="page") as rest:
        breaker = {"failures_to_open": 1, "cooldown_seconds": 300}
        schedule = {"interval_seconds": 0.5}
        poll = polled(rest, max_attempts=1)
        supplier_fed_by(ledger, "broken", catalogue, poll=poll, breaker=breaker, schedule=schedule)
        first = Scheduler(ledger.store, ledger.leases)
        rest.faults.fail_next(1, status=503)
        assert first.tick() == 0
        opened = shown(ledger, "broken")["breaker"]
        first.stop()
        time.sleep(0.6)  # its next fetch is due
        second = Scheduler(ledger.store, ledger.leases)
        assert second.tick() == 0
        asked = len(rest.requests)
        still = shown(ledger, "broken")["breaker"]
        mended = {**poll, "url": f"{rest.base_url}/inventory?mended=1"}
        put_off_by(ledger, "broken", catalogue, poll=mended, breaker=breaker, schedule=schedule)
        second.refresh()
        assert second.tick() == 1
        second.stop()

    assert (opened, still) == ("open", "open")
    assert asked == 1  # the failed fetch's only
    assert shown(ledger, "broken")["breaker"] == "closed"


def test_only_a_wait_asked_for_holds_on_and_new_fetch_settings_clear_what_was_kept(
    ledger: Runtime,
) -> None:
    """A fetch that failed without asking for a wait (a 503) puts the next off by the
    interval only: new settings with a shorter one fetch at once (a review: an hour's
    interval held a mended supplier off for an hour). And what another setting of the
    fetch kept (an open breaker) does not come back when the settings go back to it."""
    catalogue = Catalogue(3, seed=37)
    with RestSupplier(catalogue, pagination="page") as rest:
        poll = polled(rest, max_attempts=1)
        other = {**poll, "url": f"{rest.base_url}/inventory?other=1"}
        breaker = {"failures_to_open": 1, "cooldown_seconds": 300}
        hourly, often = {"interval_seconds": 3600}, {"interval_seconds": 1}
        supplier_fed_by(ledger, "mended", catalogue, poll=poll, breaker=breaker, schedule=hourly)
        first = Scheduler(ledger.store, ledger.leases)
        rest.faults.fail_next(1, status=503)
        assert first.tick() == 0  # failed: its breaker opens
        put_off_by(ledger, "mended", catalogue, poll=other, breaker=breaker, schedule=hourly)
        first.refresh()
        assert first.tick() == 1  # other fetch settings: afresh, and fetched
        put_off_by(ledger, "mended", catalogue, poll=poll, breaker=breaker, schedule=often)
        first.refresh()
        assert first.tick() == 1  # back to the first settings: nothing of before comes back
        first.stop()
        rest.faults.fail_next(1, status=503)
        second = Scheduler(ledger.store, ledger.leases)
        put_off_by(ledger, "mended", catalogue, poll=poll, schedule=hourly)
        second.refresh()
        assert second.tick() == 0  # failed, no wait asked for; the breaker not open
        put_off_by(ledger, "mended", catalogue, poll=poll, schedule=often)
        second.refresh()
        asked = len(rest.requests)
        second.tick()
        second.stop()

    assert len(rest.requests) > asked  # fetched: the new interval, not the hour
