"""The recorder keeps current levels beside the events, and loads many streams at once."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import Notification
from eventsourcing.postgres import PostgresApplicationRecorder

from api.runtime import Runtime
from ledger.commands import Confirm, Fulfil
from ledger.stock import StockItem
from ledger.supplier import SupplierTerms
from tests.conftest import random_sku
from tests.integration.ledger_setup import CAUSE, reserve, stock_sku


def levels(runtime: Runtime, sku: str) -> list[tuple[object, ...]]:
    with psycopg.connect(runtime.database_url) as conn:
        return conn.execute(
            "SELECT supplier_id, quantity, observed_at, unreported_from"
            " FROM inventoryledger_levels WHERE sku = %s ORDER BY supplier_id",
            (sku,),
        ).fetchall()


def test_the_current_level_is_written_in_the_same_save_as_its_events(runtime: Runtime) -> None:
    sku = random_sku()
    stock_sku(runtime.writer, sku, 12)
    [(supplier, quantity, observed_at, unreported)] = levels(runtime, sku)
    item = runtime.app.repository.get(StockItem.id_for(sku))
    assert (supplier, quantity, unreported) == ("acme", 12, None)
    assert observed_at == item.positions["acme"].observed_at

    placed = runtime.writer.execute(reserve([(sku, 5)])).value.reservation
    runtime.writer.execute(Confirm(at=datetime.now(UTC), cause=CAUSE, reservation_id=placed.id))
    shipped_at = datetime.now(UTC)
    runtime.writer.execute(
        Fulfil(at=shipped_at, cause=CAUSE, reservation_id=placed.id, lines=[(sku, 5, None)])
    )
    [(_, quantity, _, unreported)] = levels(runtime, sku)
    assert quantity == 12  # what the supplier reported; the shipment awaits its next report
    assert unreported is not None
    assert unreported > shipped_at.timestamp()


def test_a_save_outside_the_writer_keeps_the_levels_too(runtime: Runtime) -> None:
    sku = random_sku()
    at = datetime.now(UTC)
    item = StockItem.register(sku, at, CAUSE)
    item.observe("north", 7, at, SupplierTerms("North"), at, CAUSE)
    runtime.app.save(item)
    assert [(row[0], row[1]) for row in levels(runtime, sku)] == [("north", 7)]


def test_many_streams_load_in_one_go_with_the_state_one_by_one_gives(runtime: Runtime) -> None:
    skus = [random_sku() for _ in range(5)]
    for sku in skus:
        stock_sku(runtime.writer, sku, 1000)
    long = skus[0]
    for _ in range(120):  # past the snapshot interval
        runtime.writer.execute(reserve([(long, 1)], ttl=60))
    ids = [StockItem.id_for(sku) for sku in skus] + [StockItem.id_for("NOT-THERE")]

    loaded = runtime.app.get_many(ids)

    assert set(loaded) == set(ids[:-1])
    for aggregate_id in ids[:-1]:
        one = runtime.app.repository.get(aggregate_id)
        assert loaded[aggregate_id].version == one.version
        assert loaded[aggregate_id].positions == one.positions
    assert loaded[ids[0]].levels(datetime.now(UTC), {}).held == 120
    assert loaded[ids[0]].levels(datetime.now(UTC) + timedelta(minutes=2), {}).held == 0


def test_a_long_stream_loads_from_its_latest_snapshot_and_only_the_events_after_it(
    runtime: Runtime,
) -> None:
    sku = random_sku()
    stock_sku(runtime.writer, sku, 1000)
    for _ in range(250):  # two snapshots on (every 100 versions)
        runtime.writer.execute(reserve([(sku, 1)], ttl=60))
    item_id = StockItem.id_for(sku)
    version = runtime.app.repository.get(item_id).version

    read = runtime.app.recorder.select_streams([item_id])
    snapshots = runtime.app.snapshots.get(item_id, desc=True, limit=1)  # type: ignore[union-attr]

    assert version > 250
    newest = next(iter(snapshots))
    assert read[0].originator_version == newest.originator_version >= 200
    assert read[0].topic.endswith(":Snapshot")  # a snapshot, not an event
    assert [e.originator_version for e in read[1:]] == list(
        range(newest.originator_version + 1, version + 1)
    )
    assert len(read) <= 100  # not the 250 and more events of the whole stream
    loaded = runtime.app.get_many([item_id])[item_id]
    assert loaded.levels(datetime.now(UTC), {}).held == 250


def test_notifications_read_in_binary_are_the_librarys_own(runtime: Runtime) -> None:
    """The recorder's faster reading gives what the library's own query gives, for every
    combination of bounds and topics a follower, a projection or an audit asks for."""
    for _ in range(3):
        stock_sku(runtime.writer, random_sku(), 5)
    recorder = runtime.app.recorder
    library = PostgresApplicationRecorder.select_notifications
    head = recorder.max_notification_id() or 0
    assert head > 6
    topics = [StockItem.Registered.TOPIC, StockItem.Observed.TOPIC]
    asks: list[dict[str, Any]] = [
        {"start": 1, "limit": 4},
        {"start": head - 5, "limit": 100},
        {"start": head - 5, "limit": 3, "inclusive_of_start": False},
        {"start": 1, "limit": 1000, "stop": head - 2},
        {"start": head - 6, "limit": 1000, "topics": topics},
        {"start": 1, "limit": 2, "stop": head, "topics": (StockItem.Observed.TOPIC,)},
        {"start": None, "limit": 5},
        {"start": head + 1, "limit": 10},
    ]
    for ask in asks:
        ours = recorder.select_notifications(**ask)
        theirs = library(recorder, **ask)
        assert ours == theirs, ask
        assert all(isinstance(n, Notification) for n in ours)
        assert all(type(n.state) is bytes for n in ours)
    observed = recorder.select_notifications(head - 6, 1000, topics=topics)
    assert observed
    assert {n.topic for n in observed} <= set(topics)


def test_migrating_turns_jit_off_for_every_session_of_the_ledgers_database(
    runtime: Runtime,
) -> None:
    with psycopg.connect(runtime.database_url) as conn:
        assert conn.execute("SHOW jit").fetchone() == ("off",)


@pytest.mark.alone
def test_a_save_under_the_table_lock_is_a_plain_save_when_the_lock_is_not_had(
    runtime: Runtime,
) -> None:
    """The writer's last resort against starvation waits for the event table's lock no
    longer than any save does; then it saves as any save does."""
    from ledger.application import InventoryLedger

    settings = runtime.settings.model_copy(update={"lock_timeout_seconds": 1})
    app = InventoryLedger(settings.event_store_env(runtime.database_url))
    sku = random_sku("LOCKED")
    try:
        with psycopg.connect(runtime.database_url) as holder:
            holder.execute("LOCK TABLE inventoryledger_events IN EXCLUSIVE MODE")
            started = time.monotonic()
            with app.recorder.exclusively() as exclusive:  # type: ignore[attr-defined]
                waited = time.monotonic() - started
                assert exclusive is None
            holder.rollback()
        with app.recorder.exclusively() as exclusive:  # type: ignore[attr-defined]
            assert exclusive is not None
            item = StockItem.register(sku, datetime.now(UTC), CAUSE)
            app.save(item, locked=exclusive)
            # Committed with the save, before the block ends: another session sees it.
            assert runtime.app.repository.get(StockItem.id_for(sku)).sku == sku
    finally:
        app.close()
    assert 1 <= waited < 3
    assert runtime.app.repository.get(StockItem.id_for(sku)).sku == sku


@pytest.mark.alone
def test_a_save_under_the_table_lock_whose_connection_is_lost_fails_at_once(
    runtime: Runtime,
) -> None:
    """The transaction holding the lock is gone with its connection: the save fails with
    the connection's error straight away (the writer answers its callers and goes on),
    instead of trying again on the same lost connection, as the recorder did until
    2026-12-06 (ten tries 0.2 s apart), and nothing of it is stored."""
    sku = random_sku("LOST")
    with runtime.app.recorder.exclusively() as exclusive:  # type: ignore[attr-defined]
        assert exclusive is not None
        with psycopg.connect(runtime.database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (exclusive.conn.info.backend_pid,))
        item = StockItem.register(sku, datetime.now(UTC), CAUSE)
        started = time.monotonic()
        try:
            runtime.app.save(item, locked=exclusive)
        except psycopg.OperationalError:
            failed = True
        else:
            failed = False
        took = time.monotonic() - started
        with contextlib.suppress(psycopg.Error):
            exclusive.conn.close()
    assert failed
    assert took < 1.0
    stored = runtime.app.recorder.select_events(StockItem.id_for(sku))
    assert list(stored) == []


def test_a_pipelined_save_larger_than_the_socket_that_waited_on_a_lock_is_sent_whole(
    runtime: Runtime,
) -> None:
    """As a save of a large delivery's part does (BEGIN, the table's lock, megabytes of
    events, in one pipeline): while the server waits for the lock it reads nothing, the
    socket fills, and psycopg stopped sending once its queue was empty, with the rest in
    libpq's buffer; both sides then waited for ever (`api.pgpipeline`). Here on a table
    of its own, 20 MB, the lock held for a second."""
    table = f"pipelined_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(runtime.database_url, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {table} (x text[])")
    done = threading.Event()

    def save() -> None:
        datastore = runtime.app.recorder.datastore  # type: ignore[attr-defined]
        with datastore.get_connection() as conn, conn.pipeline() as pipeline:
            conn.execute(b"BEGIN")
            conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE".encode())
            inserted = conn.execute(
                f"INSERT INTO {table} VALUES (%b) RETURNING 1".encode(),
                (["x" * 1000] * 20_000,),
            )
            pipeline.sync()
            assert len(inserted.fetchall()) == 1
            conn.execute(b"COMMIT")
        done.set()

    try:
        with psycopg.connect(runtime.database_url) as holder:
            holder.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
            threading.Thread(target=save, daemon=True).start()
            time.sleep(1.0)
        finished = done.wait(15)
    finally:
        with psycopg.connect(runtime.database_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE %s AND pid <> pg_backend_pid()",
                (f"%{table}%",),
            )
            admin.execute(f"DROP TABLE IF EXISTS {table}")
    assert finished
