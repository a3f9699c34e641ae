"""Newest wins, even when the newest report only repeated the level and left no event.

A supplier says 5 at 10:00 (recorded), 5 again at 10:10 (a repeat: no event), and its
10:05 report saying 100 arrives last. The 10:05 report is older than what the supplier
said at 10:10, so it is late: applying it would sell 95 units that are not there.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError

import connectors.ingest
from api.recorder import LevelMoved
from api.runtime import Runtime, open_runtime
from api.settings import Settings
from connectors.ingest import content_hash
from connectors.outcome import IngestResult
from ledger.commands import (
    Confirm,
    Fulfil,
    Observation,
    PutMappings,
    PutSku,
    PutSupplier,
    ReportStock,
)
from ledger.handlers.reports import read_ahead
from ledger.mapping import MappingSpec
from ledger.stock import LevelTouch, StockItem
from ledger.supplier import SupplierTerms
from projections.store import Connection
from tests.conftest import random_sku
from tests.integration.ledger_setup import CAUSE, reserve

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
EARLY, MIDDLE, LATEST = T0, T0 + timedelta(minutes=5), T0 + timedelta(minutes=10)


def catalogue(runtime: Runtime, supplier: str = "acme") -> str:
    """A SKU the supplier stocks, mapped from its own code `S-<sku>`."""
    sku = random_sku()
    at = datetime.now(UTC)
    runtime.writer.execute(
        PutSupplier(at=at, cause=CAUSE, supplier_id=supplier, terms=SupplierTerms(supplier))
    )
    runtime.writer.execute(PutSku(at=at, cause=CAUSE, sku=sku, safety_stock=0))
    runtime.writer.execute(
        PutMappings(
            at=at,
            cause=CAUSE,
            supplier_id=supplier,
            mappings=[MappingSpec(f"S-{sku}", sku, 1, upc=None)],
        )
    )
    return sku


def part(sku: str, quantity: int, observed_at: datetime) -> ReportStock:
    """A report of one SKU (as POST /v1/suppliers/{id}/stock sends it, or a delivery's part
    carries it)."""
    return ReportStock(
        at=datetime.now(UTC),
        cause=CAUSE,
        supplier_id="acme",
        delivery_id=uuid.uuid4().hex,
        content_hash=uuid.uuid4().hex,
        source="test",
        rows=1,
        observations=[Observation(index=0, sku=sku, quantity=quantity, observed_at=observed_at)],
    )


def report(runtime: Runtime, sku: str, quantity: int, observed_at: datetime) -> str:
    """One report through the writer."""
    outcome = runtime.writer.execute(part(sku, quantity, observed_at)).value
    [(kind, count)] = [
        (kind, count)
        for kind, count in (
            ("applied", outcome.applied),
            ("unchanged", outcome.unchanged),
            ("late", outcome.late),
        )
        if count
    ]
    assert count == 1
    return kind


def ingest_file(runtime: Runtime, delivery_id: str, body: bytes) -> IngestResult:
    """A CSV file from the supplier, through the normalisation pipeline."""
    return runtime.ingestor.ingest(
        "acme",
        delivery_id,
        io.BytesIO(body),
        "csv",
        source="test",
        received_at=datetime.now(UTC),
        actor="test",
    )


def deliver(runtime: Runtime, sku: str, quantity: int, observed_at: datetime) -> str:
    """One report in a CSV file, through the normalisation pipeline."""
    body = f"sku,quantity,observed_at\nS-{sku},{quantity},{observed_at.isoformat()}\n".encode()
    result = ingest_file(runtime, f"d-{content_hash(body)[:12]}", body)
    [kind] = [k for k in ("applied", "unchanged", "late") if getattr(result, k)]
    return kind


def level(runtime: Runtime, sku: str) -> tuple[int, datetime, datetime]:
    with psycopg.connect(runtime.database_url) as conn:
        row = conn.execute(
            "SELECT quantity, observed_at, seen_at FROM inventoryledger_levels"
            " WHERE supplier_id = 'acme' AND sku = %s",
            (sku,),
        ).fetchone()
    assert row is not None
    return row


def on_hand(runtime: Runtime, sku: str) -> int:
    item = runtime.app.repository.get(StockItem.id_for(sku))
    return item.positions["acme"].quantity  # type: ignore[no-any-return]


PATHS = {"writer": report, "file": deliver}


@pytest.mark.parametrize("first", PATHS)
@pytest.mark.parametrize("repeat", PATHS)
@pytest.mark.parametrize("late", PATHS)
def test_a_report_older_than_an_unrecorded_repeat_is_late(
    ledger: Runtime, first: str, repeat: str, late: str
) -> None:
    sku = catalogue(ledger)
    assert PATHS[first](ledger, sku, 5, EARLY) == "applied"
    assert PATHS[repeat](ledger, sku, 5, LATEST) == "unchanged"
    assert level(ledger, sku) == (5, EARLY, LATEST)

    assert PATHS[late](ledger, sku, 100, MIDDLE) == "late"

    assert on_hand(ledger, sku) == 5
    assert level(ledger, sku) == (5, EARLY, LATEST)
    with psycopg.connect(ledger.database_url) as conn:
        topics = [
            row[0]
            for row in conn.execute(
                "SELECT topic FROM inventoryledger_events WHERE originator_id = %s"
                " ORDER BY originator_version",
                (StockItem.id_for(sku),),
            )
        ]
    assert topics[-1] == "stockledger:StockItem.LateReportIgnored"


def test_a_report_newer_than_the_repeat_still_applies(ledger: Runtime) -> None:
    sku = catalogue(ledger)
    report(ledger, sku, 5, EARLY)
    deliver(ledger, sku, 5, MIDDLE)

    assert report(ledger, sku, 100, LATEST) == "applied"

    assert on_hand(ledger, sku) == 100
    assert level(ledger, sku) == (100, LATEST, LATEST)


def test_a_level_saved_past_a_newer_report_seen_meanwhile_is_refused_whole(
    ledger: Runtime,
) -> None:
    # Another process noted the repeat at LATEST after this one read the level.
    sku = catalogue(ledger)
    report(ledger, sku, 5, EARLY)
    item = ledger.app.repository.get(StockItem.id_for(sku))
    item.observe("acme", 100, MIDDLE, SupplierTerms("acme"), datetime.now(UTC), CAUSE)
    with psycopg.connect(ledger.database_url) as conn:
        conn.execute("UPDATE inventoryledger_levels SET seen_at = %s WHERE sku = %s", (LATEST, sku))

    with pytest.raises(LevelMoved):
        ledger.app.save(item, levels=item.level_rows())

    assert ledger.app.repository.get(StockItem.id_for(sku)).version == item.version - 1
    assert level(ledger, sku) == (5, EARLY, LATEST)


def test_a_repeat_of_a_level_that_changed_meanwhile_is_not_noted(ledger: Runtime) -> None:
    sku = catalogue(ledger)
    report(ledger, sku, 5, EARLY)
    report(ledger, sku, 7, MIDDLE)  # the level this process did not see
    touch = LevelTouch("acme", sku, LATEST, 5, EARLY, None)

    with pytest.raises(IntegrityError):
        ledger.app.recorder.touch_levels([touch])  # type: ignore[attr-defined]

    assert level(ledger, sku) == (7, MIDDLE, MIDDLE)


def test_the_writer_decides_again_when_a_newer_report_was_seen_after_it_read(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    sku = catalogue(ledger)
    report(ledger, sku, 5, EARLY)
    deliver(ledger, sku, 5, LATEST)
    recorder = ledger.app.recorder
    real = recorder.select_seen  # type: ignore[attr-defined]
    reads: list[int] = []

    def read_before_the_note(supplier_id: str, skus: list[str]) -> dict[str, datetime]:
        # The first read misses the note made at LATEST, as a read racing it would.
        reads.append(1)
        seen = real(supplier_id, skus)
        return {s: EARLY for s in seen} if len(reads) == 1 else seen

    monkeypatch.setattr(recorder, "select_seen", read_before_the_note)

    assert report(ledger, sku, 100, MIDDLE) == "late"

    assert len(reads) == 2
    assert on_hand(ledger, sku) == 5


def test_a_levels_table_made_before_reports_seen_were_kept_gains_the_columns(
    database_url: str, settings: Settings
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE inventoryledger_levels (supplier_id text NOT NULL, sku text NOT NULL,"
            " quantity bigint NOT NULL, observed_at timestamptz, unreported_from bigint,"
            " PRIMARY KEY (supplier_id, sku))"
        )
        conn.execute("INSERT INTO inventoryledger_levels VALUES ('acme', 'OLD', 3, now(), NULL)")

    runtime = open_runtime(settings, sweep=False, connect=False, project=False)
    try:
        sku = catalogue(runtime)
        report(runtime, sku, 5, EARLY)
    finally:
        runtime.close()

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT sku, quantity, seen_at, incoming FROM inventoryledger_levels"
            " ORDER BY sku = 'OLD'"
        ).fetchall()
    assert rows == [(sku, 5, EARLY, None), ("OLD", 3, None, None)]


@pytest.mark.alone
def test_a_repeat_whose_level_moves_while_the_file_path_waits_for_it_goes_to_the_ledger(
    ledger: Runtime,
) -> None:
    """The file path notes repeats in bulk, waiting for rows another transaction holds and
    checking each row again once it has it. A repeat whose level moved meanwhile (here: a
    newer report of it was seen) is not noted over it but left to the ledger, which finds
    it late; the other repeats are noted."""
    held, free = catalogue(ledger), catalogue(ledger)
    for sku in (held, free):
        assert deliver(ledger, sku, 5, EARLY) == "applied"
    body = (
        "sku,quantity,observed_at\n"
        f"S-{held},5,{MIDDLE.isoformat()}\nS-{free},5,{MIDDLE.isoformat()}\n"
    ).encode()
    with psycopg.connect(ledger.database_url) as blocker:
        blocker.execute(
            "UPDATE inventoryledger_levels SET seen_at = %s WHERE sku = %s", (LATEST, held)
        )
        result = ThreadPoolExecutor(1).submit(ingest_file, ledger, "d-held", body)
        with psycopg.connect(ledger.database_url, autocommit=True) as watcher:
            deadline = time.monotonic() + 10
            while not watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
                " AND query LIKE '%%UPDATE inventoryledger_levels%%'"
            ).fetchone():
                assert time.monotonic() < deadline, "the file path never waited for the row"
                time.sleep(0.02)
        blocker.commit()
    outcome = result.result(timeout=30)
    assert (outcome.rows, outcome.unchanged, outcome.late, outcome.applied) == (2, 1, 1, 0)
    assert level(ledger, held)[2] == LATEST
    assert level(ledger, free)[2] == MIDDLE
    assert on_hand(ledger, held) == 5


def test_a_repeat_whose_row_was_rewritten_after_resolving_is_still_noted_through_the_ledger(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notes find each row where resolving saw it. A row rewritten in between (here
    with nothing that matters changed) is elsewhere by then: the note misses it, and the
    record goes to the ledger, which notes it. Without that path the repeat would be lost
    and an older report arriving next would be taken for news."""
    moved, kept = catalogue(ledger), catalogue(ledger)
    for sku in (moved, kept):
        assert deliver(ledger, sku, 5, EARLY) == "applied"
    note_repeats = connectors.ingest.note_repeats

    def rewrite_then_note(
        conn: Connection, params: dict[str, Any], staged: int, left: list[int]
    ) -> Iterator[None]:
        with psycopg.connect(ledger.database_url) as other:
            other.execute(
                "UPDATE inventoryledger_levels SET seen_at = seen_at WHERE sku = %s", (moved,)
            )
        yield from note_repeats(conn, params, staged, left)

    monkeypatch.setattr(connectors.ingest, "note_repeats", rewrite_then_note)
    body = (
        "sku,quantity,observed_at\n"
        f"S-{moved},5,{MIDDLE.isoformat()}\nS-{kept},5,{MIDDLE.isoformat()}\n"
    ).encode()
    result = ingest_file(ledger, "d-moved", body)
    assert (result.rows, result.unchanged, result.late, result.applied) == (2, 2, 0, 0)
    for sku in (moved, kept):
        assert level(ledger, sku)[2] == MIDDLE
        assert deliver(ledger, sku, 9, EARLY + timedelta(minutes=1)) == "late"
        assert on_hand(ledger, sku) == 5


def test_the_file_path_sends_a_repeat_of_an_ageing_level_to_the_ledger(ledger: Runtime) -> None:
    """A supplier whose levels go stale after 10 minutes has an unchanged level recorded
    again once it is 5 minutes old; a younger repeat is only noted."""
    sku = catalogue(ledger)
    ledger.writer.execute(
        PutSupplier(
            at=datetime.now(UTC),
            cause=CAUSE,
            supplier_id="acme",
            terms=SupplierTerms("acme", stale_after_seconds=600),
        )
    )
    assert deliver(ledger, sku, 5, EARLY) == "applied"
    assert deliver(ledger, sku, 5, EARLY + timedelta(minutes=1)) == "unchanged"
    assert level(ledger, sku)[1] == EARLY
    assert deliver(ledger, sku, 5, MIDDLE) == "applied"
    assert level(ledger, sku)[1] == MIDDLE


def test_the_file_path_sends_a_repeat_that_retires_a_shipment_to_the_ledger(
    ledger: Runtime,
) -> None:
    """After we ship from a supplier's stock, its next report reflects the shipment: an
    unchanged number reported after it is news (recorded), one reported before is not."""
    sku = catalogue(ledger)
    reported_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    assert deliver(ledger, sku, 12, reported_at) == "applied"
    placed = ledger.writer.execute(reserve([(sku, 5)])).value.reservation
    ledger.writer.execute(Confirm(at=datetime.now(UTC), cause=CAUSE, reservation_id=placed.id))
    ledger.writer.execute(
        Fulfil(at=datetime.now(UTC), cause=CAUSE, reservation_id=placed.id, lines=[(sku, 5, None)])
    )
    assert deliver(ledger, sku, 12, reported_at + timedelta(minutes=1)) == "unchanged"
    assert deliver(ledger, sku, 12, datetime.now(UTC) + timedelta(seconds=2)) == "applied"


def test_a_part_read_ahead_before_a_newer_repeat_was_seen_is_decided_again_and_late(
    ledger: Runtime,
) -> None:
    """A part's stock items and levels are read while the writer applies the part before
    it (connectors.parts). Here the supplier's 10:10 repeat is seen after the 10:05 report's
    part was read ahead: the writer decides on what was read (the level last reported at
    10:00), the save finds the newer report seen since and fails, and the part is decided
    again on what the store holds: late, the level untouched."""
    sku = catalogue(ledger)
    assert report(ledger, sku, 5, EARLY) == "applied"
    late = part(sku, 100, MIDDLE)
    late = replace(late, ahead=read_ahead(ledger.app, late))
    assert late.ahead is not None
    assert late.ahead.seen == {("acme", sku): EARLY}
    assert report(ledger, sku, 5, LATEST) == "unchanged"
    conflicts = ledger.writer.conflicts

    outcome = ledger.writer.execute(late).value

    assert (outcome.applied, outcome.late) == (0, 1)
    assert ledger.writer.conflicts == conflicts + 1, "decided first on what was read ahead"
    assert level(ledger, sku)[:2] == (5, EARLY)
    assert on_hand(ledger, sku) == 5


def test_a_part_read_ahead_before_its_stock_item_changed_is_decided_again_on_it(
    ledger: Runtime,
) -> None:
    """The stock item read ahead for a part changes before the part is applied, written by
    another process's writer (here, another runtime on the same database, which made the
    SKU: this writer keeps no copy of it): the part's save collides on the item's version,
    and it is decided again on the item as stored."""
    other = open_runtime(ledger.settings, sweep=False, connect=False, project=False)
    try:
        sku = catalogue(other)
        assert report(other, sku, 5, EARLY) == "applied"
        newer = part(sku, 9, LATEST)
        newer = replace(newer, ahead=read_ahead(ledger.app, newer))
        assert report(other, sku, 7, MIDDLE) == "applied"
        conflicts = ledger.writer.conflicts

        outcome = ledger.writer.execute(newer).value
    finally:
        other.close()

    assert outcome.applied == 1
    assert ledger.writer.conflicts == conflicts + 1, "decided first on what was read ahead"
    assert level(ledger, sku)[:2] == (9, LATEST)
    assert on_hand(ledger, sku) == 9
    stored = ledger.app.recorder.select_events(StockItem.id_for(sku))
    events = [ledger.app.mapper.to_domain_event(e) for e in stored]
    observed = [e.quantity for e in events if isinstance(e, StockItem.Observed)]
    assert observed == [5, 7, 9], "no report lost, none applied twice"


def test_a_part_read_ahead_before_its_sku_was_registered_applies_once_it_is(
    ledger: Runtime,
) -> None:
    """A SKU registered (by another process) after its part was read ahead: the read found
    no stock item, and a stale absence is no conflict any save would catch, so what was
    not found is left for the writer to ask for; the report applies, not refused as an
    unknown SKU."""
    sku = random_sku()
    at = datetime.now(UTC)
    ledger.writer.execute(
        PutSupplier(at=at, cause=CAUSE, supplier_id="acme", terms=SupplierTerms("acme"))
    )
    first = part(sku, 4, LATEST)
    first = replace(first, ahead=read_ahead(ledger.app, first))
    assert first.ahead is not None
    assert first.ahead.aggregates == {}
    other = open_runtime(ledger.settings, sweep=False, connect=False, project=False)
    try:
        other.writer.execute(PutSku(at=at, cause=CAUSE, sku=sku, safety_stock=0))
    finally:
        other.close()

    outcome = ledger.writer.execute(first).value

    assert (outcome.applied, outcome.rejected) == (1, [])
    assert on_hand(ledger, sku) == 4
