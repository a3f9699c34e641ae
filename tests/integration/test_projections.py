"""Projections against a real PostgreSQL: exact rebuilds, crashes, one owner, the past."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import psutil
import psycopg
import pytest
from psycopg import sql

from api.database import NotMigrated, check_migrated, migrate
from api.runtime import Runtime, open_runtime
from api.settings import Settings
from ledger.base import Cause
from ledger.commands import AcknowledgeConflict, Confirm, PutMappings, PutSku, PutSupplier
from ledger.mapping import MappingSpec
from ledger.stock import StockItem
from ledger.supplier import Supplier, SupplierTerms
from projections import base
from projections.base import Notified, ProjectionFailed
from projections.conflicts import ConflictsProjection
from projections.data_version import DATA_VERSION, NewerData
from projections.leases import LeaseSession
from projections.mappings import MappingsProjection
from projections.queries import BY_STATUS, PositionNotReached, reservations_query
from projections.registry import all_projections
from projections.reservations import ReservationsProjection
from projections.runner import (
    LostOwnership,
    ProjectionRunner,
    RebuildRunning,
    catch_up,
    rebuild,
)
from projections.status import projection_status
from projections.stock import StockProjection
from projections.store import (
    create_generation,
    generation,
    generations,
    live,
    live_generation,
    record_failure,
    schema_name,
    switch_live,
)
from tests.conftest import make_settings, random_sku
from tests.integration.ledger_setup import reserve, stock_sku
from tests.integration.workload import CAUSE, mixed_workload, report

TABLES = ["availability", "levels", "holds", "suppliers", "reservations", "mappings", "conflicts"]


@pytest.fixture
def quiet(settings: Settings) -> Iterator[Runtime]:
    """The ledger with no projection running: the tests drive them."""
    opened = open_runtime(settings, sweep=False, project=False)
    try:
        yield opened
    finally:
        opened.close()


def caught_up(runtime: Runtime) -> int:
    head = runtime.app.recorder.max_notification_id() or 0
    for name in ("stock", "reservations", "mappings", "conflicts"):
        runtime.views.wait_for(name, head, timeout=30)
    return head


def view_rows(runtime: Runtime, tables: list[str] = TABLES) -> dict[str, list[Any]]:
    """Every row of the public views, without the time each was written, in a stable order."""
    rows = {}
    with runtime.store.connection() as conn:
        for table in tables:
            found = conn.execute(
                sql.SQL("SELECT * FROM {}").format(sql.Identifier(f"view_{table}"))
            ).fetchall()
            cleaned = [{k: v for k, v in row.items() if k != "updated_at"} for row in found]
            rows[table] = sorted(cleaned, key=repr)
    return rows


def as_older(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """View rows as a generation built by older code has them once upgraded in place: each
    level's last report read as net of our orders (as events stored before read, Observed
    version 2). The tests' own events say otherwise, so a rebuild writes what they say."""
    return {
        table: [({**row, "reported_net": True} if "reported_net" in row else row) for row in found]
        for table, found in rows.items()
    }


def but_how_reported(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """View rows without `reported_net` (see `as_older`)."""
    return {
        table: [{k: v for k, v in row.items() if k != "reported_net"} for row in found]
        for table, found in rows.items()
    }


def backlog(runtime: Runtime, skus: int, reports: int) -> None:
    """Many events quickly: real aggregates, saved in large batches."""
    at = datetime.now(UTC)
    terms = SupplierTerms("North")
    runtime.writer.execute(PutSupplier(at=at, cause=CAUSE, supplier_id="north", terms=terms))
    items = [StockItem.register(random_sku("BULK"), at, CAUSE) for _ in range(skus)]
    for step in range(reports):
        for number, item in enumerate(items):
            moment = at + timedelta(seconds=step)
            item.observe("north", (number + step) % 50, moment, terms, moment, CAUSE)
    for start in range(0, skus, 200):
        runtime.app.save(*items[start : start + 200])


def test_rebuilding_every_projection_from_zero_reproduces_the_live_tables(
    runtime: Runtime,
) -> None:
    mixed_workload(runtime.writer)
    caught_up(runtime)
    before = view_rows(runtime)
    assert all(before[table] for table in TABLES), {t: len(r) for t, r in before.items()}
    assert {row["kind"] for row in before["conflicts"]} == {
        "oversell_exposure",
        "anomalous_jump",
        "late_report",
        "supplier_stale",
        "unmapped_sku",
    }

    for projection in all_projections(runtime.app):
        rebuilt = rebuild(projection, runtime.app, runtime.store, runtime.leases)
        assert rebuilt.generation == 2
    assert view_rows(runtime) == before


def test_a_rebuild_in_several_processes_reproduces_the_live_tables(runtime: Runtime) -> None:
    mixed_workload(runtime.writer)
    caught_up(runtime)
    before = view_rows(runtime)
    applied: dict[str, int] = {}
    for projection in all_projections(runtime.app):
        counted = 0

        def progress(_position: int, count: int) -> None:
            nonlocal counted
            counted += count

        # Three shares of uneven size, pages of a few events: every seam is crossed.
        rebuilt = rebuild(
            projection,
            runtime.app,
            runtime.store,
            runtime.leases,
            page_size=7,
            processes=3,
            progress=progress,
        )
        assert rebuilt.generation == 2
        applied[projection.name] = counted
    assert view_rows(runtime) == before
    with psycopg.connect(runtime.database_url) as conn:
        stock_events = conn.execute(
            "SELECT count(*) FROM inventoryledger_events WHERE topic = ANY(%s)",
            (StockProjection(runtime.app).topics,),
        ).fetchone()
    assert stock_events is not None
    assert applied["stock"] == stock_events[0]  # every event once, whichever process


class FailsInAnotherProcess(StockProjection):
    """Fails on its first event, but only in a process a rebuild started."""

    def handle(self, notified: Notified) -> None:
        if multiprocessing.parent_process() is not None:
            raise RuntimeError("boom in a share")
        super().handle(notified)


def test_a_share_that_fails_fails_the_rebuild_and_leaves_the_live_generation(
    quiet: Runtime,
) -> None:
    mixed_workload(quiet.writer, skus=6)
    projection = FailsInAnotherProcess(quiet.app)
    rebuild(projection, quiet.app, quiet.store, quiet.leases)
    with quiet.store.connection() as conn:
        live_before = live_generation(conn, "stock")
    with pytest.raises(ProjectionFailed, match="boom in a share") as failed:
        rebuild(projection, quiet.app, quiet.store, quiet.leases, processes=2)
    assert failed.value.position > 0  # the event is named across the process boundary
    with quiet.store.connection() as conn:
        assert live_generation(conn, "stock") == live_before
        assert live_before is not None
        assert generation(conn, "stock", live_before + 1) is None  # dropped, not left half-built


def test_a_blue_green_rebuild_keeps_serving_and_follows_new_events(runtime: Runtime) -> None:
    mixed_workload(runtime.writer, skus=4)
    caught_up(runtime)
    writer_done = threading.Event()

    def keep_writing() -> None:
        sku = random_sku("LIVE")
        runtime.writer.execute(PutSku(at=datetime.now(UTC), cause=CAUSE, sku=sku, safety_stock=0))
        for quantity in range(30):
            report(runtime.writer, "south", {sku: quantity}, datetime.now(UTC))
        writer_done.set()

    thread = threading.Thread(target=keep_writing)
    thread.start()
    rebuild(StockProjection(runtime.app), runtime.app, runtime.store, runtime.leases)
    thread.join()
    assert writer_done.is_set()
    caught_up(runtime)
    with runtime.store.connection() as conn:
        assert live_generation(conn, "stock") == 2
        assert generation(conn, "stock", 1) is None  # the old generation is dropped
    live = view_rows(runtime, ["availability", "levels", "holds", "suppliers"])
    rebuild(StockProjection(runtime.app), runtime.app, runtime.store, runtime.leases)
    assert view_rows(runtime, ["availability", "levels", "holds", "suppliers"]) == live


class Faulty(StockProjection):
    fail_at: int | None = None

    def handle(self, notified: Notified) -> None:
        if notified.position == self.fail_at:
            raise RuntimeError("boom")
        super().handle(notified)


def test_a_failing_event_stops_the_projection_naming_it_and_it_resumes_after_the_fix(
    quiet: Runtime,
) -> None:
    mixed_workload(quiet.writer, skus=4)
    head = quiet.app.recorder.max_notification_id() or 0
    faulty = Faulty(quiet.app)
    # An event of the stock view's, half way along the log.
    read = quiet.app.recorder.select_notifications(start=1, limit=head, topics=faulty.topics)
    faulty.fail_at = read[len(read) // 2].id
    runner = ProjectionRunner(
        faulty,
        quiet.app,
        quiet.store,
        LeaseSession(quiet.database_url),
        page_size=7,
        poll_seconds=0.2,
    ).start()
    try:
        deadline = time.monotonic() + 20
        while runner.health.state != "failed":
            assert time.monotonic() < deadline, runner.health
            time.sleep(0.02)
        with quiet.store.connection() as conn:
            stuck = generation(conn, "stock", 1)
        assert stuck is not None
        assert stuck.position < faulty.fail_at
        assert stuck.failed_position == faulty.fail_at
        assert "boom" in (stuck.last_error or "")
        assert runner.health.failed_position == faulty.fail_at

        faulty.fail_at = None  # the fix; the supervisor retries on its own
        quiet.views.wait_for("stock", head, timeout=30)
    finally:
        runner.stop()
    assert runner.health.restarts >= 1
    live = view_rows(quiet, ["availability", "levels", "holds", "suppliers"])
    rebuild(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    assert view_rows(quiet, ["availability", "levels", "holds", "suppliers"]) == live


def test_a_projection_worker_killed_mid_catch_up_resumes_without_loss_or_repetition(
    quiet: Runtime, database_url: str
) -> None:
    backlog(quiet, skus=1200, reports=12)
    head = quiet.app.recorder.max_notification_id() or 0
    worker = subprocess.Popen(
        [sys.executable, "-m", "api", "projections", "run"],
        env={
            **os.environ,
            "LEDGER_DATABASE_URL": database_url,
            "LEDGER_API_KEYS": "",
            "LEDGER_PROJECTION_PAGE_SIZE": "100",
            "LEDGER_LOG_LEVEL": "WARNING",
        },
    )
    try:
        deadline = time.monotonic() + 60
        while quiet.views.position("stock") < head // 4:
            assert time.monotonic() < deadline
            assert worker.poll() is None
            time.sleep(0.01)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        worker.kill()
    stopped_at = quiet.views.position("stock")
    assert 0 < stopped_at < head, "the worker must die part-way through"

    runner = ProjectionRunner(
        StockProjection(quiet.app),
        quiet.app,
        quiet.store,
        LeaseSession(quiet.database_url),
        poll_seconds=0.1,
    ).start()
    try:
        quiet.views.wait_for("stock", head, timeout=60)
    finally:
        runner.stop()
    resumed = view_rows(quiet, ["availability", "levels"])
    rebuild(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    assert view_rows(quiet, ["availability", "levels"]) == resumed


def test_two_runners_for_one_projection_never_both_apply(quiet: Runtime) -> None:
    backlog(quiet, skus=300, reports=5)
    sessions = [LeaseSession(quiet.database_url), LeaseSession(quiet.database_url)]
    runners = [
        ProjectionRunner(
            StockProjection(quiet.app),
            quiet.app,
            quiet.store,
            session,
            page_size=50,
            poll_seconds=0.05,
        ).start()
        for session in sessions
    ]
    states: list[tuple[str, str]] = []
    try:
        head = quiet.app.recorder.max_notification_id() or 0
        deadline = time.monotonic() + 30
        while quiet.views.position("stock") < head:
            states.append((runners[0].health.state, runners[1].health.state))
            assert time.monotonic() < deadline
            time.sleep(0.005)
        running = [r for r in runners if r.health.state == "running"]
        assert len(running) == 1
        assert ("running", "running") not in states

        running[0].stop()  # the holder dies; the standby takes over
        sessions[runners.index(running[0])].close()
        backlog(quiet, skus=50, reports=2)
        head = quiet.app.recorder.max_notification_id() or 0
        quiet.views.wait_for("stock", head, timeout=30)
    finally:
        for runner in runners:
            runner.stop()
    live = view_rows(quiet, ["availability", "levels"])
    rebuild(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    assert view_rows(quiet, ["availability", "levels"]) == live


def test_a_runner_that_takes_its_lease_back_forgets_what_it_kept(quiet: Runtime) -> None:
    """A runner keeps states and child rows between pages; when its lease passes to
    another runner and comes back, the other may have moved them on."""
    sku = random_sku("HANDOVER")
    stock_sku(quiet.writer, sku, 100)
    for ttl in (600, 610, 620):
        quiet.writer.execute(reserve([(sku, 1)], ttl=ttl))
    sessions = [LeaseSession(quiet.database_url), LeaseSession(quiet.database_url)]
    first, second = (
        ProjectionRunner(StockProjection(quiet.app), quiet.app, quiet.store, s, page_size=50)
        for s in sessions
    )
    try:
        assert first.step() > 0  # it keeps the SKU's state and hold rows
        sessions[0].close()  # its session ends: the lease is free
        assert second.step() == 0
        quiet.writer.execute(reserve([(sku, 2)], ttl=630))
        assert second.step() > 0
        sessions[1].close()
        quiet.writer.execute(reserve([(sku, 3)], ttl=640))
        assert first.step() > 0  # with its lease back, on the rows as they are now
        assert first.health.state == "running"
    finally:
        for session in sessions:
            session.close()
    live = view_rows(quiet, ["availability", "levels", "holds"])
    assert quiet.views.availability([sku], datetime.now(UTC))[sku].held == 8
    rebuild(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    assert view_rows(quiet, ["availability", "levels", "holds"]) == live


def test_a_stale_runner_cannot_write_over_a_newer_position(quiet: Runtime) -> None:
    backlog(quiet, skus=20, reports=3)
    projection = StockProjection(quiet.app)
    with quiet.store.connection() as conn:
        stale = generation(conn, "stock", 1)
    assert stale is not None
    assert stale.position == 0
    catch_up(projection, quiet.app, quiet.store, stale, page_size=100)
    before = view_rows(quiet, ["availability"])
    backlog(quiet, skus=5, reports=1)

    # Two guards, either of which refuses: a stream's versions must follow on from the
    # row's, and a generation's position must still be where the runner last saw it.
    with pytest.raises((LostOwnership, ProjectionFailed)):
        catch_up(projection, quiet.app, quiet.store, stale, page_size=100)
    assert view_rows(quiet, ["availability"]) == before


def test_the_state_of_a_sku_at_a_moment_matches_a_hand_computed_history(quiet: Runtime) -> None:
    writer = quiet.writer
    sku = random_sku("PAST")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    cause = Cause("auditor-test", "test", "t")
    terms = SupplierTerms("Acme")
    writer.execute(PutSupplier(at=start, cause=cause, supplier_id="acme", terms=terms))
    writer.execute(PutSku(at=start, cause=cause, sku=sku, safety_stock=1))
    t0 = start + timedelta(seconds=10)
    report(writer, "acme", {sku: 10}, t0)
    placed = writer.execute(reserve([(sku, 3)], ttl=3600, at=t0 + timedelta(seconds=1.2)))
    report(writer, "acme", {sku: 8}, t0 + timedelta(seconds=1.7))  # the same second
    writer.execute(
        Confirm(
            at=t0 + timedelta(seconds=3), cause=cause, reservation_id=placed.value.reservation.id
        )
    )
    report(writer, "acme", {sku: 5}, t0 + timedelta(seconds=5))

    def numbers(**when: Any) -> tuple[int, int, int, int]:
        moment = quiet.audit.stock_at(sku, **when).levels
        return moment.on_hand, moment.held, moment.committed, moment.available

    # (on hand, held, committed, available); sellable is on hand minus safety stock 1
    assert numbers(at=t0 - timedelta(seconds=1)) == (0, 0, 0, 0)
    assert numbers(at=t0 + timedelta(seconds=0.5)) == (10, 0, 0, 9)
    assert numbers(at=t0 + timedelta(seconds=1.5)) == (10, 3, 0, 6)  # between two events
    assert numbers(at=t0 + timedelta(seconds=1.7)) == (8, 3, 0, 4)  # of one second
    assert numbers(at=t0 + timedelta(seconds=4)) == (8, 0, 3, 4)
    assert numbers(at=t0 + timedelta(seconds=6)) == (5, 0, 3, 1)
    assert numbers(position=placed.position) == (10, 3, 0, 6)
    with pytest.raises(Exception, match="did not exist"):
        quiet.audit.stock_at(sku, at=start - timedelta(days=1))


def test_a_reservation_is_in_the_availability_view_once_it_reaches_the_write_position(
    runtime: Runtime,
) -> None:
    sku = random_sku("RYW")
    at = datetime.now(UTC)
    runtime.writer.execute(
        PutSupplier(at=at, cause=CAUSE, supplier_id="acme", terms=SupplierTerms("Acme"))
    )
    runtime.writer.execute(PutSku(at=at, cause=CAUSE, sku=sku, safety_stock=0))
    report(runtime.writer, "acme", {sku: 9}, at)
    placed = runtime.writer.execute(reserve([(sku, 4)]))
    assert placed.position is not None
    reached = runtime.views.wait_for("stock", placed.position, timeout=10)
    assert reached >= placed.position
    assert runtime.views.availability([sku], datetime.now(UTC))[sku].held == 4


class Forgetful(StockProjection):
    max_cached_states = 5


def test_a_rebuild_spanning_many_pages_forgets_states_only_once_written(quiet: Runtime) -> None:
    backlog(quiet, skus=40, reports=6)
    projection = Forgetful(quiet.app)
    with quiet.store.connection() as conn:
        current = generation(conn, "stock", 1)
    assert current is not None
    # Many small pages in one transaction: states pile up unwritten past the limit.
    catch_up(
        projection, quiet.app, quiet.store, current, page_size=7, events_per_transaction=10_000
    )
    forgetful = view_rows(quiet, ["availability", "levels"])
    rebuild(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    assert view_rows(quiet, ["availability", "levels"]) == forgetful


class FewRowsKept(StockProjection):
    max_written_rows = 21


def test_a_runner_forgets_the_child_rows_it_kept_beyond_its_bound(quiet: Runtime) -> None:
    """A runner keeps the child rows it wrote, to write only what changed; beyond
    `max_written_rows` it forgets them (and the states), and writes the rows whole."""
    sku = random_sku("BUCKETS")
    stock_sku(quiet.writer, sku, 100)
    for ttl in range(600, 800, 10):  # twenty hold buckets
        quiet.writer.execute(reserve([(sku, 1)], ttl=ttl))
    projection = FewRowsKept(quiet.app)

    def catch_up_with(ttl: int) -> None:
        if ttl:
            quiet.writer.execute(reserve([(sku, 2)], ttl=ttl))
        with quiet.store.connection() as conn:
            current = generation(conn, "stock", 1)
        assert current is not None
        catch_up(projection, quiet.app, quiet.store, current, page_size=1000)

    catch_up_with(0)
    assert projection._written_rows == 21  # the supplier's level and twenty holds: kept
    catch_up_with(900)
    assert (projection._written, projection._written_rows) == ({}, 0)  # one more: forgotten
    catch_up_with(1000)  # its rows, not known, are written whole

    assert quiet.views.availability([sku], datetime.now(UTC))[sku].held == 24
    live = view_rows(quiet, ["availability", "levels", "holds"])
    rebuild(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    assert view_rows(quiet, ["availability", "levels", "holds"]) == live


@pytest.mark.parametrize("count", [3, base.UPSERT_IN_BULK_FROM + 50])
def test_a_page_upserts_its_rows_alike_one_by_one_or_in_bulk(database_url: str, count: int) -> None:
    """A few rows go one INSERT each, many through a temporary table; either way every row
    ends as given, new or known, and the same table written twice in one transaction
    takes each write once."""
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE SCHEMA upserts")
        conn.execute("CREATE TABLE upserts.t (id uuid PRIMARY KEY, version int, sku text)")
        known = [uuid.uuid4() for _ in range(count)]
        conn.execute(
            "INSERT INTO upserts.t SELECT id, 0, 'old' FROM unnest(%s::uuid[]) AS id", (known,)
        )
        with conn.transaction(), conn.cursor() as cursor:
            for version in (1, 2):
                rows = [{"id": i, "version": version, "sku": f"v{version}"} for i in known]
                new = uuid.uuid4()
                base._upsert(cursor, "upserts", "t", [*rows, {"id": new, "version": 9, "sku": "n"}])
        found = dict(conn.execute("SELECT id, (version, sku)::text FROM upserts.t").fetchall())
    assert len(found) == count + 2
    assert all(found[i] == "(2,v2)" for i in known)
    assert sorted(v for i, v in found.items() if i not in known) == ["(9,n)", "(9,n)"]


def test_a_page_writes_only_the_child_rows_that_changed(runtime: Runtime) -> None:
    """A flash-sale SKU has a hold row for every second of expiry: a new hold writes its
    own row, and the SKU's other rows stay where they are."""
    sku = random_sku("BUSY")
    stock_sku(runtime.writer, sku, 100)
    for ttl in range(600, 800, 10):
        placed = runtime.writer.execute(reserve([(sku, 1)], ttl=ttl))
    before = hold_addresses(runtime, sku, placed.position)
    placed = runtime.writer.execute(reserve([(sku, 2)], ttl=900))
    after = hold_addresses(runtime, sku, placed.position)

    assert len(before) == 20
    assert len(after) == 21
    assert {expires: after[expires] for expires in before} == before
    assert runtime.views.availability([sku], datetime.now(UTC))[sku].held == 22


def hold_addresses(runtime: Runtime, sku: str, position: int | None) -> dict[int, str]:
    """Where each hold row of the SKU lies (its ctid), once the stock view reached
    `position`: a row deleted and written again, or updated, moves."""
    assert position is not None
    runtime.views.wait_for("stock", position, timeout=10)
    with runtime.store.connection() as conn:
        number = live_generation(conn, "stock")
        assert number is not None
        current = generation(conn, "stock", number)
        assert current is not None
        rows = conn.execute(
            sql.SQL("SELECT expires_s, ctid::text AS address FROM {} WHERE sku = %s").format(
                sql.Identifier(current.schema, "holds")
            ),
            (sku,),
        ).fetchall()
    return {row["expires_s"]: row["address"] for row in rows}


def test_child_rows_are_diffed_by_key_or_replaced_whole_when_not_known() -> None:
    def holds(**quantities: int) -> dict[tuple[Any, ...], dict[str, Any]]:
        rows = [{"sku": "A", "expires_s": int(e[1:]), "quantity": q} for e, q in quantities.items()]
        return {("A", row["expires_s"]): row for row in rows}

    writes = base._ChildWrites()
    writes.add("A", holds(e1=1, e2=2, e3=3), holds(e2=2, e3=5, e4=4), new=False)
    assert writes.removed == list(holds(e1=1).values())
    assert writes.upserted == list(holds(e3=5, e4=4).values())
    assert (writes.replaced, writes.fresh) == ([], [])

    writes = base._ChildWrites()
    writes.add("B", None, holds(e1=1), new=False)  # loaded from its row: not known
    writes.add("C", None, holds(e2=2), new=True)  # no row yet: nothing to replace
    assert writes.replaced == ["B"]
    assert writes.fresh == list(holds(e1=1, e2=2).values())
    assert (writes.removed, writes.upserted) == ([], [])


def test_a_live_catch_up_ends_with_its_last_short_page_not_another_read(quiet: Runtime) -> None:
    """Events written while a page is applied wake the runner; a live catch-up need not
    read the log again to find them, and every page it reads is applied."""
    mixed_workload(quiet.writer, skus=4)
    head = quiet.app.recorder.max_notification_id() or 0
    projection = StockProjection(quiet.app)
    total = count_events(quiet, projection.topics)
    page_size = next(size for size in range(5, total) if total % size)  # the last page is short
    with quiet.store.connection() as conn:
        current = generation(conn, "stock", 1)
    assert current is not None
    transactions = 0
    transaction = quiet.store.transaction

    def counted() -> Any:
        nonlocal transactions
        transactions += 1
        return transaction()

    quiet.store.transaction = counted  # type: ignore[method-assign]
    applied = catch_up(projection, quiet.app, quiet.store, current, page_size=page_size)
    pages = transactions

    with quiet.store.connection() as conn:
        reached = generation(conn, "stock", 1)
    assert reached is not None
    assert reached.position == head
    assert applied == total
    # Every full page is followed by another read; the short last one ends it.
    assert pages == total // page_size + 1
    assert catch_up(projection, quiet.app, quiet.store, reached, page_size=page_size) == 0


def count_events(runtime: Runtime, topics: list[str]) -> int:
    with runtime.store.connection() as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM inventoryledger_events WHERE topic = ANY(%s)", (topics,)
        ).fetchone()
    assert row is not None
    return int(row["n"])


def test_the_runners_gather_writes_as_long_as_the_settings_say(database_url: str) -> None:
    """A view that trails a busy log by less (or that costs less CPU) is a setting away."""
    settings = make_settings(
        database_url, projection_settle_seconds=0.005, projection_busy_settle_seconds=0.3
    )
    runtime = open_runtime(settings, sweep=False, connect=False)
    try:
        assert runtime.runners
        assert {r.settle(busy=False) for r in runtime.runners} == {0.005}
        assert {r.settle(busy=True) for r in runtime.runners} == {0.3}
    finally:
        runtime.close()


def built_before_incoming_stock(runtime: Runtime, version: int = 2) -> int:
    """Makes the live stock generation what code of an earlier schema version left:
    levels without `reported_net` (before 5), `net_committed` (before 4) and `incoming`
    (before 3), availability
    without its position index (before 2), and the public views over them. Returns its
    number."""
    with runtime.store.connection() as conn:
        number = live_generation(conn, "stock")
        assert number is not None
        schema = sql.Identifier(schema_name("stock", number))
        conn.execute("DROP VIEW view_levels")
        conn.execute(sql.SQL("ALTER TABLE {}.levels DROP COLUMN reported_net").format(schema))
        if version < 4:
            conn.execute(sql.SQL("ALTER TABLE {}.levels DROP COLUMN net_committed").format(schema))
        if version < 3:
            conn.execute(sql.SQL("ALTER TABLE {}.levels DROP COLUMN incoming").format(schema))
        if version < 2:
            conn.execute(sql.SQL("DROP INDEX {}.availability_position_idx").format(schema))
        conn.execute(
            "UPDATE ledger_projection_generations SET schema_version = %s"
            " WHERE name = 'stock' AND generation = %s",
            (version, number),
        )
        switch_live(conn, "stock", number, StockProjection.tables)
    return number


def position_indexed(runtime: Runtime, number: int) -> bool:
    with runtime.store.connection() as conn:
        row = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL AS found",
            (f"{schema_name('stock', number)}.availability_position_idx",),
        ).fetchone()
    return bool(row and row["found"])


def level_columns(runtime: Runtime) -> set[str]:
    with runtime.store.connection() as conn:
        described = conn.execute("SELECT * FROM view_levels LIMIT 0").description
    assert described is not None
    return {column.name for column in described}


def expect_incoming(runtime: Runtime, sku: str) -> None:
    """A report that says the supplier expects stock."""
    report(runtime.writer, "north", {sku: 7}, datetime.now(UTC), incoming=(("2027-01-10", 40),))


def stock_runner(runtime: Runtime, projection: StockProjection | None = None) -> ProjectionRunner:
    return ProjectionRunner(
        projection or StockProjection(runtime.app),
        runtime.app,
        runtime.store,
        runtime.leases,
        page_size=500,
    )


STOCK_TABLES = StockProjection.tables


def test_a_runner_that_finds_newer_data_stops_and_lets_its_lease_go(quiet: Runtime) -> None:
    """A runner asks for the data version in the transaction of each page it writes, and
    where it would stand by holding its lease (a view that newer code upgraded in place):
    a review found it held the lease for good there, never reaching a page."""
    runner = stock_runner(quiet)
    runner.step()  # holds the lease
    lease = f"projection:stock:{runner.health.generation}"
    with psycopg.connect(quiet.database_url, autocommit=True) as conn:
        [(kept,)] = conn.execute("SELECT version FROM ledger_data_version").fetchall()
        conn.execute("UPDATE ledger_data_version SET version = %s", (DATA_VERSION + 1,))
    try:
        stock_sku(quiet.writer, f"NEWER-{uuid.uuid4().hex[:6]}", 3)  # a page to write
        with pytest.raises(NewerData):
            runner.step()
        with psycopg.connect(quiet.database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE ledger_projection_generations SET schema_version = schema_version + 1"
                " WHERE name = 'stock' AND generation = %s",
                (runner.health.generation,),
            )
        with pytest.raises(NewerData):
            runner.step()  # standing by, the lease held: not for good
        runner.start()
        deadline = time.monotonic() + 10
        while runner.health.state != "newer_data":
            assert time.monotonic() < deadline, runner.health
            time.sleep(0.05)
        held_after = quiet.leases.holds(lease, runner)
    finally:
        runner.stop()
        with psycopg.connect(quiet.database_url, autocommit=True) as conn:
            conn.execute("UPDATE ledger_data_version SET version = %s", (kept,))
            conn.execute(
                "UPDATE ledger_projection_generations SET schema_version = %s"
                " WHERE name = 'stock' AND generation = %s",
                (StockProjection.schema_version, runner.health.generation),
            )

    assert kept == DATA_VERSION
    assert not held_after
    assert "newer than this code's" in (runner.health.error or "")


def test_unmapped_sku_repeats_read_the_same_after_a_reset_as_in_a_rebuild(
    quiet: Runtime,
) -> None:
    """A review: with "the newest open conflict takes repeats", acknowledging the newest
    left an older open one, which a runner reset (a failed page, a handover) read back
    from the rows and a runner that went on did not: live and rebuilt views differed."""
    supplier = f"um-{uuid.uuid4().hex[:6]}"
    at = datetime.now(UTC)
    quiet.writer.execute(
        PutSupplier(at=at, cause=CAUSE, supplier_id=supplier, terms=SupplierTerms(supplier))
    )
    runner = ProjectionRunner(
        ConflictsProjection(quiet.app), quiet.app, quiet.store, quiet.leases, page_size=500
    )

    def unmapped(*names: str, seconds: int) -> None:
        moment = at + timedelta(seconds=seconds)
        report(quiet.writer, supplier, dict.fromkeys(names, 1), moment, by_supplier_sku="y")

    unmapped("X", seconds=1)
    unmapped("X", "Y", seconds=2)
    runner.step()
    with quiet.store.connection() as conn:
        [newest] = conn.execute(
            "SELECT conflict_id FROM view_conflicts WHERE supplier_id = %s"
            " ORDER BY position DESC LIMIT 1",
            (supplier,),
        ).fetchall()
    quiet.writer.execute(AcknowledgeConflict(at=at, cause=CAUSE, conflict_id=newest["conflict_id"]))
    runner.step()
    runner.projection.reset()  # as after a failed page or a handover
    unmapped("X", seconds=3)
    runner.step()
    live = view_rows(quiet, ["conflicts"])

    rebuild(ConflictsProjection(quiet.app), quiet.app, quiet.store, quiet.leases, page_size=2)
    ours = [row for row in live["conflicts"] if row["supplier_id"] == supplier]
    assert [row["kind"] for row in ours] == ["unmapped_sku"] * 3  # X again raised a third
    assert view_rows(quiet, ["conflicts"]) == live


def test_migrating_upgrades_a_stock_view_built_before_incoming_stock_in_place(
    quiet: Runtime, settings: Settings
) -> None:
    backlog(quiet, skus=30, reports=1)  # reported a moment before `expect_incoming`
    runner = stock_runner(quiet)
    assert runner.step() > 0
    before = view_rows(quiet, STOCK_TABLES)
    number = built_before_incoming_stock(quiet)
    assert "incoming" not in level_columns(quiet)
    position = quiet.views.position("stock")

    migrate(settings, quiet.database_url)

    with quiet.store.connection() as conn:
        assert live_generation(conn, "stock") == number  # not rebuilt
        upgraded = generation(conn, "stock", number)
    assert upgraded is not None
    assert (upgraded.schema_version, upgraded.position) == (5, position)
    assert {"incoming", "net_committed", "reported_net"} <= level_columns(quiet)
    assert view_rows(quiet, STOCK_TABLES) == as_older(before)  # every level expecting none

    # The same generation follows on, incoming stock and all, and holds what a rebuild
    # from the log writes.
    sku = before["levels"][0]["sku"]
    expect_incoming(quiet, sku)
    assert runner.step() > 0
    assert quiet.views.availability([sku], datetime.now(UTC))[sku].suppliers[0].incoming == (
        ("2027-01-10", 40),
    )
    upgraded_rows = view_rows(quiet, STOCK_TABLES)
    rebuild(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    assert but_how_reported(view_rows(quiet, STOCK_TABLES)) == but_how_reported(upgraded_rows)


def test_migrating_upgrades_a_mappings_view_built_before_mappings_named_units_in_place(
    quiet: Runtime, settings: Settings
) -> None:
    at = datetime.now(UTC)
    quiet.writer.execute(
        PutSupplier(at=at, cause=CAUSE, supplier_id="units", terms=SupplierTerms("units"))
    )
    cases = [MappingSpec("A", random_sku("MA"), 6), MappingSpec("B", random_sku("MB"))]
    quiet.writer.execute(PutMappings(at=at, cause=CAUSE, supplier_id="units", mappings=cases))
    runner = ProjectionRunner(
        MappingsProjection(quiet.app), quiet.app, quiet.store, quiet.leases, page_size=500
    )
    assert runner.step() > 0
    before = view_rows(quiet, MappingsProjection.tables)
    with quiet.store.connection() as conn:  # as schema version 1 left it
        number = live_generation(conn, "mappings")
        assert number is not None
        schema = sql.Identifier(schema_name("mappings", number))
        conn.execute("DROP VIEW view_mappings")
        conn.execute(sql.SQL("ALTER TABLE {}.mappings DROP COLUMN unit").format(schema))
        conn.execute(
            "UPDATE ledger_projection_generations SET schema_version = 1"
            " WHERE name = 'mappings' AND generation = %s",
            (number,),
        )
        switch_live(conn, "mappings", number, MappingsProjection.tables)

    migrate(settings, quiet.database_url)

    with quiet.store.connection() as conn:
        assert live_generation(conn, "mappings") == number  # not rebuilt
        upgraded = generation(conn, "mappings", number)
    assert upgraded is not None
    assert upgraded.schema_version == MappingsProjection.schema_version
    assert view_rows(quiet, MappingsProjection.tables) == before  # every unit null
    assert {row["unit"] for row in before["mappings"]} == {None}

    # The same generation follows on, and holds what a rebuild from the log writes.
    in_cases = [MappingSpec("A", cases[0].sku, 24, unit="CS")]
    quiet.writer.execute(
        PutMappings(at=datetime.now(UTC), cause=CAUSE, supplier_id="units", mappings=in_cases)
    )
    assert runner.step() > 0
    upgraded_rows = view_rows(quiet, MappingsProjection.tables)
    assert sorted(
        (row["supplier_sku"], row["units_per_supplier_unit"], row["unit"])
        for row in upgraded_rows["mappings"]
    ) == [("A", 24, "CS"), ("B", 1, None)]
    rebuild(MappingsProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    assert view_rows(quiet, MappingsProjection.tables) == upgraded_rows


def reservations_of_two_clients(runtime: Runtime, busy: int, few: int) -> ProjectionRunner:
    """`busy` reservations of the OMS client "busy" and `few` of "few", on one SKU, and the
    reservations view's runner, caught up."""
    sku = random_sku("CLIENTS")
    stock_sku(runtime.writer, sku, busy + few)
    placed = [runtime.writer.submit(reserve([(sku, 1)], client="busy")) for _ in range(busy)]
    placed += [runtime.writer.submit(reserve([(sku, 1)], client="few")) for _ in range(few)]
    assert all(future.result(timeout=60).position for future in placed)
    runner = ProjectionRunner(
        ReservationsProjection(runtime.app), runtime.app, runtime.store, runtime.leases, 500
    )
    assert runner.step() == busy + few
    return runner


def client_listing_plan(runtime: Runtime, status: str | None) -> str:
    """How PostgreSQL reads an OMS client's page of its reservations, by id."""
    params = {"after": None, "status": status, "at": datetime.now(UTC), "limit": 100}
    params["client"] = "few"
    query = sql.SQL("EXPLAIN ") + reservations_query(BY_STATUS, params)
    with runtime.store.connection() as conn:
        conn.execute("ANALYZE view_reservations")
        return "\n".join(row["QUERY PLAN"] for row in conn.execute(query, params))


def client_index(runtime: Runtime, generation_number: int) -> list[str]:
    """The reservations view's index by client in a generation, as PostgreSQL defines it."""
    with runtime.store.connection() as conn:
        rows = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s"
            " AND indexname = 'reservations_client_id_idx'",
            (schema_name("reservations", generation_number),),
        )
        return [row["indexdef"] for row in rows]


def test_an_oms_client_s_listing_reads_its_own_reservations_by_index(quiet: Runtime) -> None:
    """A walkthrough: an OMS key's listing read every client's reservations in id order and
    left out the others', so a client with few among many paged slowly."""
    reservation_runner = reservations_of_two_clients(quiet, busy=400, few=3)
    assert reservation_runner.step() == 0
    for status in (None, "held", "confirmed"):
        plan = client_listing_plan(quiet, status)
        assert "reservations_client_id_idx" in plan, plan
    assert [
        r.client
        for r in quiet.views.reservations_by_status(
            None, datetime.now(UTC), None, 100, client="few"
        )
    ] == ["few"] * 3


def test_migrating_upgrades_a_reservations_view_built_before_the_client_index_in_place(
    quiet: Runtime, settings: Settings
) -> None:
    reservations_of_two_clients(quiet, busy=20, few=2)
    before = view_rows(quiet, ReservationsProjection.tables)
    with quiet.store.connection() as conn:  # as schema version 1 left it
        number = live_generation(conn, "reservations")
        assert number is not None
        schema = sql.Identifier(schema_name("reservations", number))
        conn.execute(sql.SQL("DROP INDEX {}.reservations_client_id_idx").format(schema))
        conn.execute(
            "UPDATE ledger_projection_generations SET schema_version = 1"
            " WHERE name = 'reservations' AND generation = %s",
            (number,),
        )
    assert not client_index(quiet, number)

    migrate(settings, quiet.database_url)

    with quiet.store.connection() as conn:
        assert live_generation(conn, "reservations") == number  # not rebuilt
        upgraded = generation(conn, "reservations", number)
    assert upgraded is not None
    assert upgraded.schema_version == ReservationsProjection.schema_version == 2
    assert view_rows(quiet, ReservationsProjection.tables) == before
    schema_text = schema_name("reservations", number)
    assert client_index(quiet, number) == [
        f"CREATE INDEX reservations_client_id_idx ON {schema_text}.reservations"
        " USING btree (client, id)"
    ]


def test_a_runner_upgrades_a_generation_in_place_where_it_can_and_rebuilds_where_not(
    quiet: Runtime,
) -> None:
    backlog(quiet, skus=10, reports=1)
    runner = stock_runner(quiet)
    assert runner.step() > 0
    number = built_before_incoming_stock(quiet)

    assert runner.step() == 0  # upgraded, nothing applied
    with quiet.store.connection() as conn:
        assert live_generation(conn, "stock") == number
        assert generation(conn, "stock", number).schema_version == 5  # type: ignore[union-attr]
    sku = view_rows(quiet, ["levels"])["levels"][0]["sku"]
    expect_incoming(quiet, sku)
    assert runner.step() > 0
    assert quiet.views.availability([sku], datetime.now(UTC))[sku].suppliers[0].incoming

    class Reshaped(StockProjection):
        schema_version = 6  # with no in-place upgrade to it

    live = view_rows(quiet, STOCK_TABLES)
    quiet.leases.release(f"projection:stock:{number}", runner)  # as when it stops
    assert stock_runner(quiet, Reshaped(quiet.app)).step() == 0
    with quiet.store.connection() as conn:
        assert live_generation(conn, "stock") == number + 1  # rebuilt, blue/green
        assert generation(conn, "stock", number + 1).schema_version == 6  # type: ignore[union-attr]
    assert but_how_reported(view_rows(quiet, STOCK_TABLES)) == but_how_reported(live)


def test_an_upgrade_path_needs_every_version_on_the_way() -> None:
    class Grown(StockProjection):
        schema_version = 7
        upgrades: ClassVar[dict[int, list[str]]] = {6: ["A"], 7: ["B", "C"]}

    assert Grown.upgrade_path(Grown, 5) == ["A", "B", "C"]  # type: ignore[arg-type]
    assert Grown.upgrade_path(Grown, 6) == ["B", "C"]  # type: ignore[arg-type]
    assert Grown.upgrade_path(Grown, 7) == []  # type: ignore[arg-type]
    assert Grown.upgrade_path(Grown, 4) is None  # type: ignore[arg-type]
    assert Grown.upgrade_path(Grown, 8) is None  # type: ignore[arg-type]


def test_a_process_told_not_to_migrate_refuses_a_view_that_waits_for_its_upgrade(
    quiet: Runtime, settings: Settings
) -> None:
    projections = all_projections(quiet.app)
    check_migrated(quiet.database_url, projections)  # migrated: nothing to say
    built_before_incoming_stock(quiet)

    with pytest.raises(NotMigrated, match="stock view's upgrade to schema version 5"):
        check_migrated(quiet.database_url, projections)
    with pytest.raises(NotMigrated, match="ledger migrate"):
        open_runtime(settings, migrate_first=False, sweep=False)

    class Reshaped(StockProjection):
        schema_version = 6  # rebuilt by its runner while the live generation serves

    migrate(settings, quiet.database_url)
    check_migrated(quiet.database_url, [Reshaped(quiet.app), *projections[1:]])


def test_a_generation_of_the_first_schema_is_brought_up_in_place_too(
    quiet: Runtime, settings: Settings
) -> None:
    backlog(quiet, skus=10, reports=1)
    assert stock_runner(quiet).step() > 0
    before = view_rows(quiet, STOCK_TABLES)
    number = built_before_incoming_stock(quiet, version=1)
    assert not position_indexed(quiet, number)

    migrate(settings, quiet.database_url)

    with quiet.store.connection() as conn:
        assert live_generation(conn, "stock") == number
        assert generation(conn, "stock", number).schema_version == 5  # type: ignore[union-attr]
    assert position_indexed(quiet, number)
    assert view_rows(quiet, STOCK_TABLES) == as_older(before)


def test_a_runner_leaves_a_generation_built_by_newer_code_alone(quiet: Runtime) -> None:
    backlog(quiet, skus=5, reports=1)
    runner = stock_runner(quiet)
    assert runner.step() > 0
    with quiet.store.connection() as conn:
        number = live_generation(conn, "stock")
        conn.execute(
            "UPDATE ledger_projection_generations SET schema_version = 9"
            " WHERE name = 'stock' AND generation = %s",
            (number,),
        )
    backlog(quiet, skus=2, reports=1)

    assert runner.step() == 0
    assert runner.health.state == "standby"
    with quiet.store.connection() as conn:
        assert live_generation(conn, "stock") == number  # not rebuilt to an older shape
        assert generation(conn, "stock", number).schema_version == 9  # type: ignore[union-attr]


def test_conflicts_raised_after_a_restart_are_named_from_the_names_written_before(
    settings: Settings,
) -> None:
    """A conflict names its SKU and its supplier by their streams' first events, which a
    process that started since has not seen: it reads those names back."""
    sku = random_sku("NAMED")
    first = open_runtime(settings, sweep=False)
    try:
        stock_sku(first.writer, sku, 10, stale_after_seconds=60)
        first.writer.execute(reserve([(sku, 8)]))
        caught_up(first)
    finally:
        first.close()

    second = open_runtime(settings, sweep=False)
    try:
        at = datetime.now(UTC)
        report(second.writer, "acme", {sku: 2}, at)  # below the 8 promised
        supplier = second.app.repository.get(Supplier.id_for("acme"))
        assert supplier.note_last_report(at - timedelta(hours=1), at, CAUSE)
        second.app.save(supplier)
        caught_up(second)
        conflicts = view_rows(second, ["conflicts"])["conflicts"]
    finally:
        second.close()

    named = {(row["kind"], row["sku"], row["supplier_id"]) for row in conflicts}
    assert ("oversell_exposure", sku, "acme") in named
    assert ("supplier_stale", None, "acme") in named


class HangsInAShare(StockProjection):
    """Hangs on its first event in a process a rebuild started: a rebuild mid-shares."""

    def handle(self, notified: Notified) -> None:
        if multiprocessing.parent_process() is not None:
            time.sleep(3600)
        super().handle(notified)


def rebuild_hanging_in_a_share(database_url: str) -> None:
    """A rebuild in two processes whose other share hangs (run in a process of its own)."""
    runtime = open_runtime(make_settings(database_url), sweep=False, project=False, connect=False)
    rebuild(HangsInAShare(runtime.app), runtime.app, runtime.store, runtime.leases, processes=2)


def hanging_in_a_share(
    database_url: str, run: str
) -> tuple[subprocess.Popen[bytes], psutil.Process, list[psutil.Process]]:
    """`run` (a function of this module, given the database URL) in a process of its own,
    once its rebuild's share process has started and hangs; with the processes under it."""
    started = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; from tests.integration.test_projections import {run}; {run}(sys.argv[1])",
            database_url,
        ],
        cwd=Path(__file__).resolve().parents[2],
    )
    parent = psutil.Process(started.pid)
    deadline = time.monotonic() + 60
    while not any("spawn_main" in " ".join(c.cmdline()) for c in parent.children()):
        assert started.poll() is None, "the rebuild ended"
        assert time.monotonic() < deadline, "no share process started"
        time.sleep(0.1)
    time.sleep(1)  # the share's process has its event, and hangs
    return started, parent, parent.children(recursive=True)


def rebuild_hanging_in_a_share_stopped_by_sigterm(database_url: str) -> None:
    """As `ledger projections rebuild` takes SIGTERM (as Ctrl-C), in a process of its own."""
    from api.cli import _interrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        rebuild_hanging_in_a_share(database_url)
    except KeyboardInterrupt:
        sys.exit(130)


def test_a_rebuild_in_several_processes_stopped_by_sigterm_ends_its_shares_and_drops_its_generation(
    quiet: Runtime,
) -> None:
    """A review: SIGTERM reached the rebuild's own process only, which then waited for its
    shares under way to apply all they had, each in one transaction, past an orchestrator's
    grace period and its SIGKILL, leaving the generation behind."""
    mixed_workload(quiet.writer, skus=6)
    with quiet.store.connection() as conn:
        live_before = live_generation(conn, "stock")
    stopped, parent, children = hanging_in_a_share(
        quiet.database_url, "rebuild_hanging_in_a_share_stopped_by_sigterm"
    )

    stopped.send_signal(signal.SIGTERM)
    try:
        code = stopped.wait(20)
    finally:
        _gone, alive = psutil.wait_procs(children, timeout=5)
        for process in [*alive, *([parent] if stopped.poll() is None else [])]:
            process.kill()

    assert code == 130
    assert not alive
    with quiet.store.connection() as conn:
        assert [g.generation for g in generations(conn, "stock")] == [live_before]


def stock_generation_status(runtime: Runtime, number: int) -> Any:
    [found] = [
        status
        for status in projection_status(runtime.store, runtime.app)
        if (status.name, status.generation) == ("stock", number)
    ]
    assert not found.live
    return found


def test_a_rebuild_stopped_drops_its_unfinished_generation_and_leaves_the_live_one(
    quiet: Runtime,
) -> None:
    """An operator walkthrough: a rebuild stopped (SIGTERM, or Ctrl-C) left its half-built
    generation, which `projections status` showed as building until the next rebuild."""
    mixed_workload(quiet.writer, skus=6)
    with quiet.store.connection() as conn:
        live_before = live_generation(conn, "stock")
    calls = []

    def stopped_at_its_first_page(position: int, _applied: int) -> None:
        calls.append(position)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rebuild(
            StockProjection(quiet.app),
            quiet.app,
            quiet.store,
            quiet.leases,
            progress=stopped_at_its_first_page,
        )

    assert calls
    with quiet.store.connection() as conn:
        assert live_generation(conn, "stock") == live_before
        assert [g.generation for g in generations(conn, "stock")] == [live_before]


def test_a_killed_rebuild_leaves_no_process_behind_and_the_next_drops_its_generation(
    quiet: Runtime,
) -> None:
    """Found by an operator's walkthrough: a rebuild killed (`kill -9`) mid-shares left its
    share's process waiting for good, and its half-built generation for every later
    rebuild to step over (`projections status` showed it building ever after)."""
    mixed_workload(quiet.writer, skus=6)
    with quiet.store.connection() as conn:
        live_before = live_generation(conn, "stock")
    assert live_before is not None
    killed, _parent, children = hanging_in_a_share(quiet.database_url, "rebuild_hanging_in_a_share")
    deadline = time.monotonic() + 60
    with quiet.store.connection() as conn:
        half_built = generation(conn, "stock", live_before + 1)
    assert half_built is not None
    assert stock_generation_status(quiet, half_built.generation).building

    killed.kill()
    killed.wait(10)

    _gone, alive = psutil.wait_procs(children, timeout=10)
    left_behind = [" ".join(p.cmdline()) for p in alive]
    for process in alive:  # never left to wait for good, whatever the assertion says
        process.kill()
    assert not left_behind
    # The server lets go of a killed client's locks once it sees its session end.
    probe, holder = LeaseSession(quiet.database_url), object()
    try:
        while not probe.hold(f"projection:stock:{half_built.generation}", holder):
            assert time.monotonic() < deadline + 10, "the killed rebuild's lease is kept"
            time.sleep(0.1)
        probe.release(f"projection:stock:{half_built.generation}", holder)
    finally:
        probe.close()
    # Nobody builds it now: not shown as building (it was, for good: an operator walkthrough).
    assert not stock_generation_status(quiet, half_built.generation).building
    rebuilt = rebuild(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    with quiet.store.connection() as conn:
        left = generations(conn, "stock")
        assert live_generation(conn, "stock") == rebuilt.generation
    # Only the new live one is left (the half-built one's number is free again: it never
    # went live, so no reader knew it), caught up with the log.
    assert [g.generation for g in left] == [rebuilt.generation]
    assert rebuilt.updated_at > half_built.updated_at
    assert rebuilt.position == quiet.app.recorder.max_notification_id()


def test_a_rebuild_is_refused_while_another_process_rebuilds_the_projection(
    quiet: Runtime,
) -> None:
    """Found by an operator's walkthrough: two rebuilds at once both ran, and the later to
    switch dropped the generation the other had just made live."""
    mixed_workload(quiet.writer, skus=3)
    other, rebuilding = LeaseSession(quiet.database_url), object()  # another process's
    try:
        assert other.hold("projection-rebuild:stock", rebuilding)
        with quiet.store.connection() as conn:
            live_before = live_generation(conn, "stock")
        with pytest.raises(RebuildRunning, match="a rebuild of stock is already running"):
            rebuild(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
        with quiet.store.connection() as conn:
            assert live_generation(conn, "stock") == live_before
            assert generation(conn, "stock", (live_before or 0) + 1) is None  # none started
        # Another projection's rebuild goes on meanwhile.
        rebuild(MappingsProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    finally:
        # Let go at once: a closed session's locks go only once its server process ends.
        other.release("projection-rebuild:stock", rebuilding)
        other.close()
    rebuilt = rebuild(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases)
    assert rebuilt.generation == (live_before or 0) + 1


def test_a_read_at_a_position_is_never_answered_from_a_view_switched_to_a_filling_one(
    quiet: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an operator's walkthrough: during an in-place rebuild, a read asking for
    the position of its own reservation got 404 for its SKU. It had waited for the view,
    the view then switched to the new generation, still empty, and it read that."""
    sku = random_sku("SW")
    stock_sku(quiet.writer, sku, 5)
    ProjectionRunner(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases).step()
    placed = quiet.writer.execute(reserve([(sku, 2)]))
    assert placed.position is not None
    waited = quiet.views.wait_for
    waits: list[int | None] = []

    def switching(projection: str, wanted: int | None, timeout: float) -> int:
        waits.append(wanted)
        if len(waits) > 1:
            return waited(projection, wanted, timeout)
        # The old generation reached it, and the view switches right after: in place.
        projection_ = StockProjection(quiet.app)
        with quiet.store.connection() as conn:
            filling = create_generation(
                conn, "stock", projection_.schema_version, projection_.ddl()
            )
            switch_live(conn, "stock", filling.generation, projection_.tables)
        return wanted or 0

    monkeypatch.setattr(quiet.views, "wait_for", switching)

    with pytest.raises(PositionNotReached):
        quiet.views.availability_after([sku], datetime.now(UTC), placed.position, timeout=0.5)
    assert len(waits) == 2  # it waited again, for the view it reads


def test_a_runner_taking_its_view_drops_the_generations_nobody_builds_or_follows(
    quiet: Runtime,
) -> None:
    """Found by an upgrade walkthrough: the generations an older version's runner left
    half built (rolled back onto newer data) showed as building under every later one."""
    mixed_workload(quiet.writer, skus=3)
    projection = StockProjection(quiet.app)
    with quiet.store.connection() as conn:
        live_number = live_generation(conn, "stock")
        left = create_generation(conn, "stock", projection.schema_version, projection.ddl())
        built = create_generation(conn, "stock", projection.schema_version, projection.ddl())
    building, holder = LeaseSession(quiet.database_url), object()  # a rebuild at work
    try:
        assert building.hold(f"projection:stock:{built.generation}", holder)

        ProjectionRunner(projection, quiet.app, quiet.store, quiet.leases).step()

        with quiet.store.connection() as conn:
            kept = [g.generation for g in generations(conn, "stock")]
        assert kept == [live_number, built.generation]
        assert left.generation not in kept
    finally:
        building.release(f"projection:stock:{built.generation}", holder)
        building.close()


def test_status_shows_a_failure_only_until_the_generation_passes_its_position(
    quiet: Runtime,
) -> None:
    """Found by an upgrade walkthrough: a failure recorded by one runner (an older version
    rolled back onto the database) was shown at lag 0, after another applied the event."""
    mixed_workload(quiet.writer, skus=3)
    ProjectionRunner(StockProjection(quiet.app), quiet.app, quiet.store, quiet.leases).step()
    with quiet.store.connection() as conn:
        current = live(conn, "stock")
        assert current is not None
        record_failure(conn, "stock", current.generation, current.position + 1, "ahead")
    failing = [s for s in projection_status(quiet.store, quiet.app) if s.name == "stock"]
    with quiet.store.connection() as conn:
        record_failure(conn, "stock", current.generation, current.position, "passed")
    passed = [s for s in projection_status(quiet.store, quiet.app) if s.name == "stock"]

    assert [(s.error, s.failed_position) for s in failing] == [("ahead", current.position + 1)]
    assert [(s.error, s.failed_position) for s in passed] == [(None, None)]
