"""What the event store promises auditors and future versions: names, immutability, snapshots."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest
from eventsourcing.postgres import PostgresApplicationRecorder
from psycopg.conninfo import make_conninfo

from api.runtime import Runtime
from api.settings import Settings
from ledger.application import InventoryLedger
from ledger.commands import Confirm
from ledger.stock import StockItem
from projections import audit
from tests.conftest import make_settings, random_sku
from tests.integration.ledger_setup import CAUSE, now, reserve, stock_sku
from tests.integration.test_cli_errors import ledger_command

# Persisted names are a contract: renaming one breaks every stored event that uses it.
PINNED_TOPICS = {
    "stockledger:Supplier.Registered",
    "stockledger:Supplier.TermsChanged",
    "stockledger:Supplier.WentStale",
    "stockledger:Supplier.ReportsResumed",
    "stockledger:StockItem.Registered",
    "stockledger:StockItem.SafetyStockSet",
    "stockledger:StockItem.Observed",
    "stockledger:StockItem.LateReportIgnored",
    "stockledger:StockItem.Held",
    "stockledger:StockItem.HoldReleased",
    "stockledger:StockItem.HoldExtended",
    "stockledger:StockItem.HoldsExpired",
    "stockledger:StockItem.HoldConfirmed",
    "stockledger:StockItem.CommitmentReleased",
    "stockledger:StockItem.Shipped",
    "stockledger:StockItem.Restocked",
    "stockledger:StockItem.SupplierSkuRemapped",
    "stockledger:Reservation.Placed",
    "stockledger:Reservation.Confirmed",
    "stockledger:Reservation.Extended",
    "stockledger:Reservation.Released",
    "stockledger:Reservation.Expired",
    "stockledger:Reservation.Fulfilled",
    "stockledger:Reservation.Returned",
    "stockledger:Reservation.LinesCancelled",
    "stockledger:SkuMapping.Mapped",
    "stockledger:SkuMapping.Remapped",
    "stockledger:FeedDelivery.Recorded",
    "stockledger:ConflictAcknowledgement.Acknowledged",
}


def _event_classes() -> set[type]:
    from ledger.conflict import ConflictAcknowledgement
    from ledger.delivery import FeedDelivery
    from ledger.mapping import SkuMapping
    from ledger.reservation import Reservation
    from ledger.supplier import Supplier

    classes = set()
    aggregates = (
        Supplier,
        StockItem,
        Reservation,
        SkuMapping,
        FeedDelivery,
        ConflictAcknowledgement,
    )
    for aggregate in aggregates:
        for value in vars(aggregate).values():
            if isinstance(value, type) and hasattr(value, "TOPIC") and value.__name__ != "Event":
                classes.add(value)
    return classes


def test_every_event_class_has_a_pinned_topic() -> None:
    assert {cls.TOPIC for cls in _event_classes()} == PINNED_TOPICS


def test_the_application_and_its_tables_keep_their_names(runtime: Runtime) -> None:
    assert InventoryLedger.name == "InventoryLedger"
    with psycopg.connect(runtime.database_url) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        }
    assert {"inventoryledger_events", "inventoryledger_snapshots"} <= tables


def test_stored_events_carry_their_pinned_topic_and_their_cause(runtime: Runtime) -> None:
    sku = random_sku()
    stock_sku(runtime.writer, sku, 5)
    with psycopg.connect(runtime.database_url) as conn:
        rows = conn.execute(
            "SELECT topic, convert_from(state, 'UTF8')::jsonb FROM inventoryledger_events"
        ).fetchall()
    assert {topic for topic, _ in rows} <= PINNED_TOPICS
    for _, state in rows:
        assert (state["actor"], state["reason"], state["correlation_id"]) == (
            CAUSE.actor,
            CAUSE.reason,
            CAUSE.correlation_id,
        )


@pytest.mark.parametrize("table", ["inventoryledger_events", "inventoryledger_snapshots"])
@pytest.mark.parametrize(
    "statement",
    ["UPDATE {} SET topic = 'x'", "DELETE FROM {}", "TRUNCATE {}"],
)
def test_the_event_log_refuses_to_change_history(
    runtime: Runtime, table: str, statement: str
) -> None:
    """Snapshots too: loads and audits start from them (one changed in place was read as
    the SKU's state by the audit and the writer alike: an auditor's walkthrough)."""
    sku = random_sku()
    stock_sku(runtime.writer, sku, 5)
    runtime.app.take_snapshot(StockItem.id_for(sku))
    count = f"SELECT count(*), max(md5(state)) FROM {table}"
    with psycopg.connect(runtime.database_url, autocommit=True) as conn:
        before = conn.execute(count).fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement.format(table))
        after = conn.execute(count).fetchone()
    assert before is not None
    assert before[0] > 0
    assert before == after


def test_the_audit_finds_a_snapshot_changed_behind_the_trigger_s_back(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ledger audit snapshots` replays each stream with no snapshot and compares: one
    changed in place (by a role that can turn the trigger off) was read as the SKU's
    state by the audit and the writer alike, and nothing said so (an auditor's
    walkthrough)."""
    sku = random_sku("SNAP")
    stream = StockItem.id_for(sku)
    stock_sku(runtime.writer, sku, 5)
    runtime.app.take_snapshot(stream)
    runtime.writer.execute(reserve([(sku, 2)], ttl=60))
    runtime.app.take_snapshot(stream)
    [first, second] = [s.originator_version for s in runtime.app.snapshots.get(stream)]
    agreed = ledger_command(runtime.database_url, "audit", "snapshots", "--sku", sku)
    with psycopg.connect(runtime.database_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # the trigger off
        conn.execute(
            "UPDATE inventoryledger_snapshots SET state = convert_to(jsonb_set("
            " convert_from(state, 'UTF8')::jsonb, '{state,safety_stock}', '40')::text, 'UTF8')"
            " WHERE originator_id = %s AND originator_version = %s",
            (stream, first),
        )
    differs = ledger_command(runtime.database_url, "audit", "snapshots")
    unknown = ledger_command(runtime.database_url, "audit", "snapshots", "--sku", "NO-SUCH")
    monkeypatch.setattr(audit, "REPLAY_PAGE", 2)  # the events a page at a time
    paged = audit.check_snapshots(runtime.app, runtime.store, [sku])

    assert agreed.returncode == 0, agreed.stderr
    assert "2 snapshots of 1 streams checked: 0 differ from their events" in agreed.stdout
    assert differs.returncode == 1, differs.stderr
    assert f"error: {sku} at version {first}: its snapshot is not what its events give," in (
        differs.stderr
    )
    assert "in safety_stock" in differs.stderr
    assert f"at version {second}" not in differs.stderr
    assert "1 differ from their events" in differs.stdout
    assert unknown.returncode == 1
    assert "error: no SKU 'NO-SUCH': it has no events" in unknown.stderr
    assert (paged.snapshots, paged.missing) == (2, [])
    assert paged.differing == [audit.SnapshotDiffers(sku, first, ["safety_stock"])]


def test_a_long_stream_loads_from_its_snapshot_with_the_same_state(
    runtime: Runtime, settings: Settings
) -> None:
    sku = random_sku("LONG")
    stock_sku(runtime.writer, sku, 10_000)
    for _ in range(130):  # a hold and a confirmation each: well past the interval of 100
        outcome = runtime.writer.execute(reserve([(sku, 1)], ttl=60))
        runtime.writer.execute(
            Confirm(at=now(), cause=CAUSE, reservation_id=outcome.value.reservation.id)
        )
    live = runtime.app.repository.get(StockItem.id_for(sku))
    assert runtime.app.snapshots is not None
    snapshots = list(runtime.app.snapshots.get(StockItem.id_for(sku)))
    assert snapshots, "a stream of 260 events has a snapshot"

    fresh = InventoryLedger(settings.event_store_env(runtime.database_url))
    try:
        loaded = fresh.repository.get(StockItem.id_for(sku))
    finally:
        fresh.close()
    assert loaded.version == live.version
    assert loaded.positions == live.positions
    assert loaded.levels(now(), {}) == live.levels(now(), {})


def test_a_flash_sale_of_many_holds_keeps_the_stock_item_small(runtime: Runtime) -> None:
    sku = random_sku("FLASH")
    stock_sku(runtime.writer, sku, 100_000)
    for _ in range(300):
        runtime.writer.execute(reserve([(sku, 1)], ttl=600))
    item = runtime.app.repository.get(StockItem.id_for(sku))
    position = item.positions["acme"]
    assert position.live_held(0) == 300
    # 300 holds made within a few seconds share a few one-second expiry buckets.
    assert len(position.held) <= 10
    assert item.levels(now() + timedelta(seconds=601), {}).held == 0


def test_a_snapshot_that_cannot_be_taken_never_fails_the_commands_that_saved(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshots are taken after the events are committed: one that fails is only a
    shortcut missed, and the orders it would have followed were taken."""
    sku = random_sku("SNAP")
    stock_sku(runtime.writer, sku, 500)
    item_id = StockItem.id_for(sku)
    # every other event crosses one (the intervals are the class's: put back after)
    monkeypatch.setitem(runtime.app.snapshotting_intervals, StockItem, 2)

    tried: list[int] = []

    def broken(*_: object, **__: object) -> None:
        tried.append(1)
        raise psycopg.OperationalError("the snapshot table is out of reach")

    assert runtime.app.snapshots is not None
    monkeypatch.setattr(runtime.app.snapshots, "put", broken)
    outcomes = [runtime.writer.execute(reserve([(sku, 1)])) for _ in range(4)]

    assert tried  # snapshots were due, and each failed
    assert all(outcome.value.reservation.lines[sku].quantity == 1 for outcome in outcomes)
    assert runtime.app.repository.get(item_id).levels(now(), {}).held == 4


def test_the_event_store_s_connections_take_the_url_s_options_and_keepalives(
    database_url: str,
) -> None:
    """The library made the event store's connections from the host, port, user, password
    and database alone: a URL's `sslmode`, `application_name` and the rest held for the
    views, not for the event log; nor had they the views' keepalives, so a connection the
    network dropped without a word held a save until the kernel gave up."""
    url = make_conninfo(database_url, application_name="ledger-url-option", keepalives_idle=7)
    app = InventoryLedger(make_settings(url).event_store_env(url))
    try:
        recorder = app.recorder
        assert isinstance(recorder, PostgresApplicationRecorder)
        with recorder.datastore.get_connection() as conn:
            named = conn.execute("SHOW application_name").fetchone()
            given = conn.info.get_parameters()
    finally:
        app.close()

    assert named is not None
    assert named["application_name"] == "ledger-url-option"
    assert given["keepalives_idle"] == "7"  # the URL's own
    assert (given["keepalives"], given["tcp_user_timeout"]) == ("1", "30000")
