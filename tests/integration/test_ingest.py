"""Feeds through the normalisation pipeline, against a real PostgreSQL."""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from api.runtime import Runtime, open_runtime
from connectors import comparison, deadletters, inbox
from connectors import ingest as ingest_module
from connectors import outcome as outcome_module
from connectors import parts as parts_module
from connectors.deadletters import dismiss, listing, retry
from connectors.ingest import Ingestor, content_hash
from connectors.outcome import FeedRejected, describe_phases
from connectors.worker import InboxWorker
from ledger.commands import PutMappings, PutSupplier
from ledger.mapping import MappingSpec
from ledger.stock import StockItem
from ledger.supplier import SupplierTerms
from tests.integration.ledger_setup import CAUSE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "feeds"


def setup_supplier(
    runtime: Runtime, supplier: str, skus: dict[str, str], units: int = 1, **terms: object
) -> None:
    at = datetime.now(UTC)
    runtime.writer.execute(
        PutSupplier(
            at=at,
            cause=CAUSE,
            supplier_id=supplier,
            terms=SupplierTerms(supplier, **terms),  # type: ignore[arg-type]
        )
    )
    specs = [MappingSpec(s_sku, sku, units, upc=None) for s_sku, sku in skus.items()]
    runtime.writer.execute(PutMappings(at=at, cause=CAUSE, supplier_id=supplier, mappings=specs))


def csv_body(rows: dict[str, int], at: datetime, extra: str = "", unit: str | None = None) -> bytes:
    if unit is not None:
        lines = ["sku,quantity,unit,observed_at"]
        lines += [f"{sku},{quantity},{unit},{at.isoformat()}" for sku, quantity in rows.items()]
    else:
        lines = ["sku,quantity,observed_at"]
        lines += [f"{sku},{quantity},{at.isoformat()}" for sku, quantity in rows.items()]
    return ("\n".join(lines) + "\n" + extra).encode()


def ingest(runtime: Runtime, supplier: str, body: bytes, fmt: str = "csv", **kwargs: object):  # type: ignore[no-untyped-def]
    ingestor = kwargs.pop("ingestor", None) or runtime.ingestor
    return ingestor.ingest(  # type: ignore[union-attr]
        supplier,
        f"d-{content_hash(body)[:12]}",
        io.BytesIO(body),
        fmt,
        source="test",
        received_at=datetime.now(UTC),
        actor="test",
        **kwargs,
    )


def stock_events(runtime: Runtime) -> int:
    with psycopg.connect(runtime.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM inventoryledger_events WHERE topic LIKE 'stockledger:StockItem.%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def on_hand(runtime: Runtime, sku: str) -> int:
    item = runtime.app.repository.get(StockItem.id_for(sku))
    return sum(position.quantity for position in item.positions.values())


def test_only_real_changes_become_events_and_the_same_report_again_changes_nothing(
    ledger: Runtime,
) -> None:
    skus = {f"S-{n}": f"SKU-{n}" for n in range(20)}
    setup_supplier(ledger, "acme", skus)
    at = datetime.now(UTC) - timedelta(minutes=1)
    first = ingest(ledger, "acme", csv_body(dict.fromkeys(skus, 10), at))
    events = stock_events(ledger)

    again = ingest(ledger, "acme", csv_body(dict.fromkeys(skus, 10), at + timedelta(seconds=5)))
    changed = dict.fromkeys(skus, 10) | {"S-3": 4, "S-7": 0}
    third = ingest(ledger, "acme", csv_body(changed, at + timedelta(seconds=9)))

    assert (first.rows, first.applied, first.unchanged) == (20, 20, 0)
    assert (again.applied, again.unchanged, again.rejected) == (0, 20, 0)
    assert (third.applied, third.unchanged) == (2, 18)
    assert stock_events(ledger) == events + 2
    assert (on_hand(ledger, "SKU-3"), on_hand(ledger, "SKU-7"), on_hand(ledger, "SKU-1")) == (
        4,
        0,
        10,
    )


def test_a_bad_record_is_refused_with_its_reason_while_the_rest_applies(ledger: Runtime) -> None:
    setup_supplier(ledger, "acme", {"A": "SKU-A", "B": "SKU-B", "C": "SKU-C"})
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    body = (
        "sku,quantity,unit,observed_at\n"
        f"A,5,EA,{at}\n"
        f"B,-3,EA,{at}\n"
        f"C,lots,EA,{at}\n"
        f"GHOST,2,EA,{at}\n"
        f"C,7,BARREL,{at}\n"
        f"C,6,EA,{(datetime.now(UTC) + timedelta(days=2)).isoformat()}\n"
    ).encode()

    result = ingest(ledger, "acme", body)

    reasons = {r.index: r.reason.split(":")[0] for r in result.rejections}
    assert reasons == {
        2: "negative_quantity",
        3: "invalid_quantity",
        4: "unmapped_supplier_sku",
        5: "unknown_unit",
        6: "observed_at_in_future",
    }
    assert (result.rows, result.applied) == (6, 1)
    assert on_hand(ledger, "SKU-A") == 5


def test_records_resolve_by_supplier_sku_else_by_upc_and_duplicates_are_decided_per_sku(
    ledger: Runtime,
) -> None:
    at = datetime.now(UTC) - timedelta(minutes=5)
    ledger.writer.execute(
        PutSupplier(at=at, cause=CAUSE, supplier_id="upcs", terms=SupplierTerms("upcs"))
    )
    specs = [
        MappingSpec("A", "SKU-UA", 1, upc="0001"),
        MappingSpec("B", "SKU-UB", 6, upc="0002"),  # a pack of 6: by UPC too
        MappingSpec("C1", "SKU-UC", 1, upc="0003"),  # one UPC, two mappings: the first
        MappingSpec("C2", "SKU-UX", 1, upc="0003"),  # supplier SKU in order wins
        MappingSpec("D", "SKU-UD", 1, upc=None),
        MappingSpec("E", "SKU-UE", 1, upc=None),
    ]
    ledger.writer.execute(PutMappings(at=at, cause=CAUSE, supplier_id="upcs", mappings=specs))
    t0, t1 = at.isoformat(), (at + timedelta(seconds=30)).isoformat()
    body = (
        "sku,upc,quantity,observed_at\n"
        f"A,,5,{t0}\n"  # 1: by supplier SKU
        f",0002,2,{t0}\n"  # 2: by UPC, in packs: 12
        f",0003,7,{t0}\n"  # 3: by UPC, the first mapping's SKU
        f"NOPE,0001,9,{t0}\n"  # 4: a supplier SKU that is not mapped is not looked up by UPC
        f",9999,1,{t0}\n"  # 5: an unknown UPC
        f"D,,3,{t0}\n"  # 6: D twice at one time, disagreeing: both refused
        f"D,,4,{t0}\n"  # 7
        f"E,,8,{t0}\n"  # 8: E twice at two times: the newer applies, the older is late
        f"E,,1,{t1}\n"  # 9
    ).encode()

    result = ingest(ledger, "upcs", body)

    reasons = {r.index: r.reason for r in result.rejections}
    assert reasons == {
        4: "unmapped_supplier_sku",
        5: "unmapped_upc",
        6: "conflicting_duplicate",
        7: "conflicting_duplicate",
    }
    assert (result.rows, result.applied, result.late) == (9, 4, 1)
    levels = {sku: on_hand(ledger, sku) for sku in ("SKU-UA", "SKU-UB", "SKU-UC", "SKU-UE")}
    assert levels == {"SKU-UA": 5, "SKU-UB": 12, "SKU-UC": 7, "SKU-UE": 1}
    assert ledger.app.repository.get(StockItem.id_for("SKU-UX")).positions == {}


def test_a_supplier_configured_so_is_matched_by_upc_where_its_supplier_sku_is_not_mapped(
    ledger: Runtime,
) -> None:
    at = datetime.now(UTC) - timedelta(minutes=5)
    terms = SupplierTerms("fallback", connector={"upc_fallback": True})
    ledger.writer.execute(PutSupplier(at=at, cause=CAUSE, supplier_id="upcfb", terms=terms))
    specs = [
        MappingSpec("A", "SKU-FA", 1, upc="0001"),
        MappingSpec("B", "SKU-FB", 6, upc="0002"),
        MappingSpec("C", "SKU-FC", 1, upc="0003"),
    ]
    ledger.writer.execute(PutMappings(at=at, cause=CAUSE, supplier_id="upcfb", mappings=specs))
    t0 = at.isoformat()
    body = (
        "sku,upc,quantity,observed_at\n"
        f"RENAMED-A,0001,9,{t0}\n"  # 1: not mapped by supplier SKU: by UPC
        f"RENAMED-B,0002,2,{t0}\n"  # 2: by UPC, in the mapping's packs: 12
        f"C,0002,3,{t0}\n"  # 3: mapped by supplier SKU: that wins over the UPC
        f"UNKNOWN,7777,1,{t0}\n"  # 4: neither
    ).encode()

    result = ingest(ledger, "upcfb", body)

    assert sorted((r.index, r.reason) for r in result.rejections) == [(4, "unmapped_supplier_sku")]
    levels = {sku: on_hand(ledger, sku) for sku in ("SKU-FA", "SKU-FB", "SKU-FC")}
    assert levels == {"SKU-FA": 9, "SKU-FB": 12, "SKU-FC": 3}


def test_cases_are_counted_in_pieces_and_naive_times_are_in_the_suppliers_zone(
    ledger: Runtime,
) -> None:
    setup_supplier(
        ledger,
        "berlin",
        {"BOX": "SKU-BOX", "ONE": "SKU-ONE"},
        units=12,
        timezone="Europe/Berlin",
    )
    ledger.writer.execute(
        PutSupplier(
            at=datetime.now(UTC),
            cause=CAUSE,
            supplier_id="berlin",
            terms=SupplierTerms("berlin", timezone="Europe/Berlin", connector={"units": {"PK": 6}}),
        )
    )
    body = (
        b"sku,quantity,unit,observed_at\nBOX,3,,2026-01-10T09:00:00\nONE,2,PK,2026-01-10T09:00:00\n"
    )
    ingest(ledger, "berlin", body)
    box = ledger.app.repository.get(StockItem.id_for("SKU-BOX")).positions["berlin"]
    one = ledger.app.repository.get(StockItem.id_for("SKU-ONE")).positions["berlin"]
    assert box.quantity == 36  # three cases of twelve, by the mapping
    assert one.quantity == 12  # two packs of six, by the supplier's unit table
    assert box.observed_at == datetime(2026, 1, 10, 8, 0, tzinfo=UTC)


def test_a_structurally_broken_file_changes_nothing_and_says_why(ledger: Runtime) -> None:
    setup_supplier(ledger, "edi", {"ABC-123": "SKU-ABC", "XYZ-9": "SKU-XYZ"})
    position = ledger.app.recorder.max_notification_id()
    broken = (FIXTURES / "846-se-count-wrong.edi").read_bytes()
    with pytest.raises(FeedRejected, match="SE01"):
        ingest(ledger, "edi", broken, "edi846")
    assert ledger.app.recorder.max_notification_id() == position

    good = ingest(ledger, "edi", (FIXTURES / "846-two-items.edi").read_bytes(), "edi846")
    assert (good.applied, on_hand(ledger, "SKU-ABC"), on_hand(ledger, "SKU-XYZ")) == (2, 120, 0)


def test_a_late_report_in_a_file_is_recorded_as_ignored_not_applied(ledger: Runtime) -> None:
    setup_supplier(ledger, "acme", {"A": "SKU-LATE"})
    now = datetime.now(UTC) - timedelta(minutes=1)
    ingest(ledger, "acme", csv_body({"A": 9}, now))
    late = ingest(ledger, "acme", csv_body({"A": 9}, now - timedelta(hours=1)))
    assert (late.late, late.applied) == (1, 0)
    assert on_hand(ledger, "SKU-LATE") == 9


def test_a_large_delivery_is_applied_in_batches_that_add_up(ledger: Runtime) -> None:
    skus = {f"S-{n}": f"SKU-{n}" for n in range(25)}
    setup_supplier(ledger, "acme", skus)
    small = Ingestor(ledger.writer, ledger.store, ledger.views, batch_size=7)
    result = ingest(
        ledger, "acme", csv_body(dict.fromkeys(skus, 3), datetime.now(UTC)), ingestor=small
    )
    with psycopg.connect(ledger.database_url) as conn:
        parts = conn.execute(
            "SELECT count(*) FROM inventoryledger_events WHERE topic = %s",
            ("stockledger:FeedDelivery.Recorded",),
        ).fetchone()
    assert (result.rows, result.applied) == (25, 25)
    assert parts == (4,)


def test_each_part_of_a_delivery_is_stamped_when_it_is_made(ledger: Runtime) -> None:
    """A delivery applies for seconds: its parts carry the time each was made, not the
    time it began, so the orders decided meanwhile do not seem to come after them (an
    audit reads a SKU at a time by its events' times). Here a clock a second on at each
    reading: the four parts' events are a second or more apart, in order."""
    skus = {f"S-{n}": f"SKU-TM-{n}" for n in range(25)}
    setup_supplier(ledger, "acme", skus)
    start = datetime.now(UTC)
    ticks = iter(range(1000))
    small = Ingestor(
        ledger.writer,
        ledger.store,
        ledger.views,
        batch_size=7,
        clock=lambda: start + timedelta(seconds=next(ticks)),
    )
    ingest(ledger, "acme", csv_body(dict.fromkeys(skus, 3), start), ingestor=small)
    times = sorted(
        {ledger.app.repository.get(StockItem.id_for(sku)).modified_on for sku in skus.values()}
    )
    assert len(times) == 4  # one a part
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= timedelta(seconds=1)


def test_a_delivery_s_changes_are_read_as_its_parts_are_sent_not_all_at_once(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery's changes are read from PostgreSQL a page at a time, a little ahead of
    the parts sent: when the first part of 5 goes to the ledger, far fewer than the 60
    changes have been read; yet every one is applied, in parts that add up."""
    skus = {f"S-{n:02}": f"SKU-ST-{n:02}" for n in range(60)}
    setup_supplier(ledger, "acme", skus)
    monkeypatch.setattr(ingest_module, "CHANGES_PAGE", 4)
    read: list[int] = []
    read_from = ingest_module._Changes._read

    def counted(self: Any, side: Any) -> Iterator[Any]:
        for row in read_from(self, side):
            read.append(row["position"])
            yield row

    monkeypatch.setattr(ingest_module._Changes, "_read", counted)
    small = Ingestor(ledger.writer, ledger.store, ledger.views, batch_size=5)
    read_when_sent: list[int] = []
    make_part = small.parts._command

    def making(*args: Any, **kwargs: Any) -> Any:
        read_when_sent.append(len(read))
        return make_part(*args, **kwargs)

    monkeypatch.setattr(small.parts, "_command", making)

    result = ingest(
        ledger, "acme", csv_body(dict.fromkeys(skus, 3), datetime.now(UTC)), ingestor=small
    )

    assert (result.rows, result.applied, len(read_when_sent)) == (60, 60, 12)
    # Pages ahead: two parts' worth (10) in 4s, plus the page in hand and the part taken.
    assert read_when_sent[0] <= 5 + 4 * (2 * 5 // 4 + 2) + 4 < 60
    assert sorted(read) == list(range(1, 61))
    assert all(on_hand(ledger, sku) == 3 for sku in skus.values())


def test_while_the_writer_applies_a_part_the_next_is_read_ahead_of_it(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery of 300 changes in parts of 100: while the writer applies a part, the
    sender makes the next and reads its stock items (connectors.parts), so the writer
    itself loads only the first part's. The SKUs are made by another runtime, so that this
    writer keeps no copy of them."""
    skus = {f"S-{n:03}": f"SKU-RA-{n:03}" for n in range(300)}
    other = open_runtime(ledger.settings, sweep=False, connect=False, project=False)
    try:
        setup_supplier(other, "acme", skus)
    finally:
        other.close()
    items = {StockItem.id_for(sku): sku for sku in skus.values()}
    loaded: dict[str, set[str]] = {}
    get_many = ledger.app.get_many

    def counted(aggregate_ids: Any, known: Any = None) -> Any:
        wanted = list(aggregate_ids)
        by = "writer" if threading.current_thread().name == "ledger-writer" else "sender"
        loaded.setdefault(by, set()).update(items[i] for i in wanted if i in items)
        return get_many(wanted, known)

    monkeypatch.setattr(ledger.app, "get_many", counted)
    small = Ingestor(ledger.writer, ledger.store, ledger.views, batch_size=100)

    result = ingest(
        ledger, "acme", csv_body(dict.fromkeys(skus, 3), datetime.now(UTC)), ingestor=small
    )

    assert (result.rows, result.applied) == (300, 300)
    in_order = sorted(skus.values())
    assert loaded["writer"] == set(in_order[:100]), "the first part: nothing before it"
    assert loaded["sender"] == set(in_order[100:])
    assert all(on_hand(ledger, sku) == 3 for sku in skus.values())


@pytest.mark.timeout(30)  # a reader left running would hang the delivery for good
@pytest.mark.alone
def test_a_delivery_whose_part_fails_stops_reading_its_changes_and_says_so(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger refusing a part (here, made to fail) ends the delivery with that error,
    at once: the reading of its changes stops, and nothing is left waiting."""
    skus = {f"S-{n:02}": f"SKU-FL-{n:02}" for n in range(40)}
    setup_supplier(ledger, "acme", skus)
    monkeypatch.setattr(ingest_module, "CHANGES_PAGE", 4)
    small = Ingestor(ledger.writer, ledger.store, ledger.views, batch_size=5)
    submit = ledger.writer.submit
    sent: list[int] = []

    def failing_second(command: Any) -> Future[Any]:
        sent.append(1)
        if len(sent) == 2:
            refused: Future[Any] = Future()
            refused.set_exception(RuntimeError("the ledger is down"))
            return refused
        return submit(command)

    monkeypatch.setattr(ledger.writer, "submit", failing_second)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="the ledger is down"):
        ingest(ledger, "acme", csv_body(dict.fromkeys(skus, 3), datetime.now(UTC)), ingestor=small)

    assert time.monotonic() - began < 10
    assert len(sent) == 2
    assert [on_hand(ledger, sku) for sku in list(skus.values())[:5]] == [3] * 5
    assert on_hand(ledger, "SKU-FL-39") == 0


@pytest.mark.timeout(30)
def test_a_part_that_cannot_be_made_ends_the_delivery_once_the_part_applying_is_applied(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second part is made while the writer applies the first: when making it fails,
    the delivery ends with that error only after the first part's outcome is in, so no
    part is left applying behind a delivery that has stopped."""
    skus = {f"S-{n:02}": f"SKU-MK-{n:02}" for n in range(40)}
    setup_supplier(ledger, "acme", skus)
    small = Ingestor(ledger.writer, ledger.store, ledger.views, batch_size=5)
    make_part = small.parts._command
    made: list[int] = []

    def failing_second(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        if len(made) == 2:
            raise RuntimeError("no second part")
        return make_part(*args, **kwargs)

    monkeypatch.setattr(small.parts, "_command", failing_second)
    with pytest.raises(RuntimeError, match="no second part"):
        ingest(ledger, "acme", csv_body(dict.fromkeys(skus, 3), datetime.now(UTC)), ingestor=small)

    assert [on_hand(ledger, sku) for sku in list(skus.values())[:5]] == [3] * 5
    assert on_hand(ledger, "SKU-MK-05") == 0
    assert ledger.writer._jobs.empty()


def test_a_read_ahead_that_fails_leaves_the_writer_to_load_the_part(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a part ahead only saves the writer time: when it fails, the part goes
    without it, and the writer loads what it needs itself."""
    skus = {f"S-{n:03}": f"SKU-RF-{n:03}" for n in range(250)}
    setup_supplier(ledger, "acme", skus)

    tried: list[int] = []

    def failing(*args: Any) -> Any:
        tried.append(1)
        raise psycopg.OperationalError("the connection went away")

    monkeypatch.setattr(parts_module, "read_ahead", failing)
    small = Ingestor(ledger.writer, ledger.store, ledger.views, batch_size=100)

    result = ingest(
        ledger, "acme", csv_body(dict.fromkeys(skus, 6), datetime.now(UTC)), ingestor=small
    )

    assert (result.rows, result.applied) == (250, 250)
    # Parts of 100, 100 and 50: only the second is both made while another applies and
    # bulk (the third, of 50, is decided with the commands queued beside it).
    assert len(tried) == 1, "the second part was read ahead, and failed"
    assert all(on_hand(ledger, sku) == 6 for sku in skus.values())


def parts_recorded(ledger: Runtime) -> int:
    with psycopg.connect(ledger.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM inventoryledger_events WHERE topic = %s",
            ("stockledger:FeedDelivery.Recorded",),
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    ("contended", "parts"),
    [
        # Others waited on the writer after every part, and every part overran its
        # nanosecond: after the first (4) and the one made while it was applied (4),
        # each of the fewest allowed (2).
        (True, 2 + 16),
        # No one else wanted the writer: each part twice the one made before it, from
        # the one made while the first was applied (4, 4, 8, 16, 8), however long it took.
        (False, 5),
    ],
)
def test_a_delivery_sizes_each_part_by_how_long_it_held_the_writer_from_others(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch, contended: bool, parts: int
) -> None:
    monkeypatch.setattr(parts_module, "FIRST_PART", 4)
    monkeypatch.setattr(parts_module, "MIN_PART", 2)
    skus = {f"S-{n:02d}": f"SKU-PT-{n:02d}" for n in range(40)}
    setup_supplier(ledger, "acme", skus)
    writer = ledger.writer
    if contended:
        submit = writer.submit

        def submit_while_another_command_is_decided(command: Any) -> Future[Any]:
            applied: Future[Any] = Future()

            def decided(part: Future[Any]) -> None:
                writer.commands += 1  # as if a reservation had been decided meanwhile
                failed = part.exception()
                if failed is not None:  # passed on, so that the delivery fails, not hangs
                    applied.set_exception(failed)
                else:
                    applied.set_result(part.result())

            submit(command).add_done_callback(decided)
            return applied

        monkeypatch.setattr(writer, "submit", submit_while_another_command_is_decided)
    timed = Ingestor(writer, ledger.store, ledger.views, batch_size=100, part_seconds=1e-9)
    before = parts_recorded(ledger)

    result = ingest(
        ledger, "acme", csv_body(dict.fromkeys(skus, 4), datetime.now(UTC)), ingestor=timed
    )

    assert (result.rows, result.applied) == (40, 40)
    assert parts_recorded(ledger) - before == parts
    assert all(on_hand(ledger, sku) == 4 for sku in skus.values())


def test_the_next_part_fits_the_time_allowed_within_its_bounds(ledger: Runtime) -> None:
    timed = Ingestor(ledger.writer, ledger.store, ledger.views, batch_size=5000, part_seconds=0.25)
    assert timed.parts.next_size(1000, 0.5, True) == 500, "took twice the time: half as many"
    assert timed.parts.next_size(1000, 0.05, True) == 2000, "far quicker: at most twice as many"
    assert timed.parts.next_size(4000, 0.1, True) == 5000, "never beyond the batch size"
    assert timed.parts.next_size(1000, 60.0, True) == parts_module.MIN_PART, "never below the least"
    assert timed.parts.next_size(1000, 60.0, False) == 2000, "no one waiting: twice as many"
    fixed = Ingestor(ledger.writer, ledger.store, ledger.views, batch_size=5000)
    assert fixed.parts.next_size(1000, 60.0, True) == 5000, "without a time, every part is a batch"


def test_a_delivery_noted_in_several_chunks_while_its_changes_apply_adds_up(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeats are noted a chunk at a time (chunks taken in SKU order), while the writer
    applies the changes in parts: every repeat is noted, every change applied, the
    duplicate and the unmapped record refused, and the counts add up to the rows."""
    monkeypatch.setattr(comparison, "TOUCH_CHUNK", 4)
    skus = {f"S-{n:02d}": f"SKU-CH-{n:02d}" for n in range(30)}
    setup_supplier(ledger, "acme", skus)
    first = datetime.now(UTC) - timedelta(minutes=10)
    ingest(ledger, "acme", csv_body(dict.fromkeys(skus, 5), first))
    changed = {s_sku for n, s_sku in enumerate(skus) if n % 4 == 0}
    second = first + timedelta(minutes=5)
    rows = {s_sku: 6 if s_sku in changed else 5 for s_sku in skus}
    duplicate = f"S-01,7,{second.isoformat()}\nUNMAPPED,3,{second.isoformat()}\n"
    small = Ingestor(ledger.writer, ledger.store, ledger.views, batch_size=3)

    result = ingest(ledger, "acme", csv_body(rows, second, duplicate), ingestor=small)

    assert (result.rows, result.applied, result.rejected) == (32, len(changed), 3)
    assert result.unchanged == 30 - len(changed) - 1
    with psycopg.connect(ledger.database_url) as conn:
        levels = {
            sku: (quantity, seen)
            for sku, quantity, seen in conn.execute(
                "SELECT sku, quantity, greatest(seen_at, observed_at)"
                " FROM inventoryledger_levels WHERE supplier_id = 'acme'"
            )
        }
    for s_sku, sku in skus.items():
        # S-01's two records disagree: neither is taken, its level stays as it was.
        expected = (5, first) if s_sku == "S-01" else (rows[s_sku], second)
        assert levels[sku] == expected, sku
        assert on_hand(ledger, sku) == expected[0]


def map_in_units(runtime: Runtime, supplier: str, *specs: MappingSpec, **connector: Any) -> None:
    """A supplier whose unit table says a case ("CS") holds 12 (unless `connector` says
    otherwise), with these mappings."""
    at = datetime.now(UTC)
    terms = SupplierTerms(supplier, connector={"units": {"CS": 12}, **connector})
    runtime.writer.execute(PutSupplier(at=at, cause=CAUSE, supplier_id=supplier, terms=terms))
    runtime.writer.execute(
        PutMappings(at=at, cause=CAUSE, supplier_id=supplier, mappings=list(specs))
    )


@pytest.mark.parametrize(
    ("sku", "reported_before"),
    [("SKU-REPACK", True), ("SKU-REPACKED", True), ("SKU-REPACK", False)],
    ids=["same SKU", "moved to another SKU too", "never reported before"],
)
def test_a_record_naming_no_unit_made_before_its_mapping_s_factor_changed_is_refused(
    ledger: Runtime, sku: str, reported_before: bool
) -> None:
    """A fuzzer: 9 pieces reported before the mapping changed to cases of 12, delivered
    after the change, counted 108, read in the new factor as a correction. Refused now,
    wherever the mapping leads (by the factor's change, not the level's reports); the
    next report, in cases, applies."""
    start = datetime.now(UTC) - timedelta(minutes=10)
    setup_supplier(ledger, "repack", {"R-1": "SKU-REPACK", "R-2": "SKU-REPACK-2"})
    if reported_before:
        ingest(ledger, "repack", csv_body({"R-1": 100, "R-2": 5}, start))
    changed_at = datetime.now(UTC)
    repacked = [MappingSpec("R-1", sku, 12)]  # the supplier now counts cases of 12
    ledger.writer.execute(
        PutMappings(at=changed_at, cause=CAUSE, supplier_id="repack", mappings=repacked)
    )
    stood = on_hand(ledger, sku)

    made_before = start + timedelta(minutes=5)
    delayed = ingest(ledger, "repack", csv_body({"R-1": 9, "R-2": 6}, made_before))
    after_delayed = on_hand(ledger, sku)
    following = ingest(ledger, "repack", csv_body({"R-1": 9}, changed_at + timedelta(seconds=1)))

    assert [(r.index, r.reason) for r in delayed.rejections] == [(1, "made_before_units_changed")]
    assert delayed.applied == 1  # the other supplier SKU's record
    assert after_delayed == stood
    assert following.applied == 1
    assert on_hand(ledger, sku) == 108


def test_a_record_in_the_mapping_s_own_unit_made_before_its_factor_changed_is_refused(
    ledger: Runtime,
) -> None:
    """A review: a case of 12 became one of 24; 9 cases reported before the change and
    delivered after it counted 216 instead of 108."""
    start = datetime.now(UTC) - timedelta(minutes=10)
    map_in_units(ledger, "cases24", MappingSpec("C-1", "SKU-CASE", 12, unit="CA"))
    ingest(ledger, "cases24", csv_body({"C-1": 9}, start, unit="CA"))
    changed_at = datetime.now(UTC)
    bigger = [MappingSpec("C-1", "SKU-CASE", 24, unit="CA")]
    ledger.writer.execute(
        PutMappings(at=changed_at, cause=CAUSE, supplier_id="cases24", mappings=bigger)
    )

    made_before = start + timedelta(minutes=5)
    delayed = ingest(ledger, "cases24", csv_body({"C-1": 8}, made_before, unit="CA"))
    following = ingest(ledger, "cases24", csv_body({"C-1": 8}, changed_at, unit="CA"))

    assert [(r.index, r.reason) for r in delayed.rejections] == [(1, "made_before_units_changed")]
    assert following.applied == 1
    assert on_hand(ledger, "SKU-CASE") == 192


def test_a_mapping_s_own_unit_counts_its_factor_before_the_supplier_s_unit_table(
    ledger: Runtime,
) -> None:
    map_in_units(
        ledger,
        "cases",
        MappingSpec("BIG", "SKU-BIG", 24, unit="CS"),  # this item's case holds 24
        MappingSpec("SMALL", "SKU-SMALL", 1),
        MappingSpec("BOXED", "SKU-BOXED", 10, unit="BX"),  # a unit the table does not know
        MappingSpec("ODD", "SKU-ODD", 5),
    )
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    body = (
        "sku,quantity,unit,observed_at\n"
        f"BIG,2, cs ,{at}\n"
        f"SMALL,2,CS,{at}\n"
        f"BOXED,3,bx,{at}\n"
        f"ODD,1,BX,{at}\n"
        f"GONE,1,BX,{at}\n"
    ).encode()

    result = ingest(ledger, "cases", body)

    assert result.read_by == "copy"
    assert sorted((r.index, r.reason) for r in result.rejections) == [
        (4, "unknown_unit: 'BX'"),  # not ODD's unit, nor the supplier's
        (5, "unmapped_supplier_sku"),  # unmapped first, whatever its unit
    ]
    levels = {sku: on_hand(ledger, sku) for sku in ("SKU-BIG", "SKU-SMALL", "SKU-BOXED")}
    assert levels == {"SKU-BIG": 48, "SKU-SMALL": 24, "SKU-BOXED": 30}
    assert ledger.app.repository.get(StockItem.id_for("SKU-ODD")).positions == {}
    [odd] = [r for r in result.rejections if r.index == 4]
    assert (odd.record["fields"]["unit"], odd.record["fields"]["quantity"]) == ("BX", 1)


def test_a_record_read_in_python_and_its_incoming_stock_count_the_mapping_s_own_unit(
    ledger: Runtime,
) -> None:
    map_in_units(
        ledger,
        "edicases",
        MappingSpec("ABC-123", "SKU-CA24", 24, unit="CS"),
        MappingSpec("XYZ-9", "SKU-CA12", 1),
    )
    body = (
        edi_with("SCH*2*CS***018*20260215~SCH*30*EA***018*20260301~")
        .replace(b"QTY*33*120*EA~", b"QTY*33*5*CS~")
        .replace(b"QTY*33*0*EA~", b"QTY*33*2*CS~")
    )

    result = ingest(ledger, "edicases", body, "edi846")

    assert (result.applied, list(result.rejections)) == (2, [])
    position = ledger.app.repository.get(StockItem.id_for("SKU-CA24")).positions["edicases"]
    assert position.quantity == 120  # five of this item's cases of 24
    assert position.incoming == (("2026-02-15", 48), ("2026-03-01", 30))
    assert on_hand(ledger, "SKU-CA12") == 24  # two of the table's cases of 12


def test_incoming_stock_in_a_unit_its_mapping_does_not_count_refuses_the_record(
    ledger: Runtime,
) -> None:
    map_in_units(
        ledger,
        "edibx",
        MappingSpec("ABC-123", "SKU-BX1", 10, unit="BX"),
        MappingSpec("XYZ-9", "SKU-BX2", 1),
    )
    body = edi_with("SCH*2*BX***018*20260215~SCH*1*PALLET***018*20260301~")

    result = ingest(ledger, "edibx", body, "edi846")

    assert sorted((r.index, r.reason) for r in result.rejections) == [(1, "unknown_unit: 'PALLET'")]
    assert ledger.app.repository.get(StockItem.id_for("SKU-BX1")).positions == {}
    assert ledger.app.repository.get(StockItem.id_for("SKU-BX2")).positions["edibx"].quantity == 0


def test_a_letter_retried_and_refused_again_keeps_its_new_reason(ledger: Runtime) -> None:
    map_in_units(ledger, "reasons")  # nothing mapped yet
    body = b"sku,quantity,unit,observed_at\nTRAY,3,TR,2026-01-10T09:00:00Z\n"
    enqueue(ledger, "reasons", "trays", body)
    assert InboxWorker(ledger.ingestor, ledger.store).work_once()
    [letter] = listing(ledger.store, supplier_id="reasons")
    assert listing(ledger.store, supplier_id="reasons", ids_only=True) == [{"id": letter["id"]}]
    ledger.writer.execute(
        PutMappings(
            at=datetime.now(UTC),
            cause=CAUSE,
            supplier_id="reasons",
            mappings=[MappingSpec("TRAY", "SKU-RTRAY", 1)],
        )
    )

    outcome = retry(ledger.store, ledger.ingestor, [letter["id"]], "operator")

    [again] = listing(ledger.store, supplier_id="reasons")
    assert letter["reason"] == "unmapped_supplier_sku"
    assert outcome.still_refused == {letter["id"]: "unknown_unit: 'TR'"}
    assert (again["id"], again["reason"], again["attempts"]) == (
        letter["id"],
        "unknown_unit: 'TR'",
        1,
    )


def test_the_ceiling_is_in_base_units_by_the_unit_the_mapping_says(ledger: Runtime) -> None:
    map_in_units(
        ledger,
        "ceil",
        MappingSpec("BIG", "SKU-CEIL-BIG", 200, unit="cs"),
        MappingSpec("SMALL", "SKU-CEIL-SMALL", 2, unit="CS"),
        MappingSpec("PLAIN", "SKU-CEIL-PLAIN", 50),
        MappingSpec("TABLE", "SKU-CEIL-TABLE", 1),
        units={"CS": 100},
        max_quantity=1000,
    )
    at = datetime.now(UTC)
    seen = (at - timedelta(minutes=1)).isoformat()
    body = (
        "sku,quantity,unit,observed_at\n"
        f"BIG,8,CS,{seen}\n"  # 1,600 pieces (800 by the table)
        f"SMALL,20,CS,{seen}\n"  # 40 pieces (2,000 by the table)
        f"PLAIN,30,,{seen}\n"  # 1,500 pieces
        f"TABLE,11,CS,{seen}\n"  # 1,100 pieces
        f"TABLE,1001,EA,{seen}\n"  # over in any unit
    ).encode()

    result = ingest(ledger, "ceil", body)

    assert result.read_by == "copy"
    assert sorted((r.index, r.reason) for r in result.rejections) == [
        (1, "quantity_out_of_range"),
        (3, "quantity_out_of_range"),
        (4, "quantity_out_of_range"),
        (5, "quantity_out_of_range"),
    ]
    assert on_hand(ledger, "SKU-CEIL-SMALL") == 40

    # A ceiling set very high: what a unit holds times the quantity is past any integer
    # PostgreSQL keeps, and the record is refused alone.
    huge = {"units": {"PALLET": 10**6}, "max_quantity": 10**15}
    ledger.writer.execute(
        PutSupplier(
            at=at, cause=CAUSE, supplier_id="ceil", terms=SupplierTerms("ceil", connector=huge)
        )
    )
    body = f"sku,quantity,unit,observed_at\nTABLE,{10**14},PALLET,{seen}\nSMALL,3,,{seen}\n"
    again = ingest(ledger, "ceil", body.encode())
    assert sorted((r.index, r.reason) for r in again.rejections) == [(1, "quantity_out_of_range")]
    assert on_hand(ledger, "SKU-CEIL-SMALL") == 6
    [big] = [r for r in result.rejections if r.index == 1]
    assert (big.record["fields"]["quantity"], big.record["fields"]["unit"]) == (8, "CS")


def test_incoming_stock_over_the_ceiling_in_the_mapping_s_unit_refuses_its_record(
    ledger: Runtime,
) -> None:
    map_in_units(
        ledger,
        "schceil",
        MappingSpec("ABC-123", "SKU-SCHCEIL", 200, unit="CS"),
        MappingSpec("XYZ-9", "SKU-SCHCEIL2", 1),
        units={"CS": 2},
        max_quantity=1000,
    )

    result = ingest(ledger, "schceil", edi_with("SCH*8*CS***018*20260215~"), "edi846")

    assert sorted((r.index, r.reason) for r in result.rejections) == [(1, "quantity_out_of_range")]
    assert result.applied == 1


def test_an_sch_line_whose_unit_holds_a_nul_character_refuses_its_record_alone(
    ledger: Runtime,
) -> None:
    setup_supplier(ledger, "schnul", {"ABC-123": "SKU-SCHNUL", "XYZ-9": "SKU-SCHNUL2"})
    body = edi_with("SCH*2*C\x00S***018*20260215~")

    result = ingest(ledger, "schnul", body, "edi846")

    assert sorted((r.index, r.reason) for r in result.rejections) == [(1, "nul_character")]
    assert result.applied == 1
    assert ledger.app.repository.get(StockItem.id_for("SKU-SCHNUL")).positions == {}


def test_a_record_in_an_unknown_unit_applies_once_its_mapping_names_the_unit(
    ledger: Runtime,
) -> None:
    map_in_units(ledger, "later", MappingSpec("TRAY", "SKU-TRAY", 1))
    body = b"sku,quantity,unit,observed_at\nTRAY,3,TR,2026-01-10T09:00:00Z\n"
    enqueue(ledger, "later", "trays", body)
    assert InboxWorker(ledger.ingestor, ledger.store).work_once()
    [letter] = listing(ledger.store, supplier_id="later")
    assert letter["reason"] == "unknown_unit: 'TR'"

    ledger.writer.execute(
        PutMappings(
            at=datetime.now(UTC),
            cause=CAUSE,
            supplier_id="later",
            mappings=[MappingSpec("TRAY", "SKU-TRAY", 8, unit="TR")],
        )
    )
    outcome = retry(ledger.store, ledger.ingestor, [letter["id"]], "operator")

    assert outcome.resolved == [letter["id"]]
    assert on_hand(ledger, "SKU-TRAY") == 24  # three trays of eight


def test_an_unmapped_record_waits_in_the_dead_letters_until_its_mapping_is_added(
    ledger: Runtime,
) -> None:
    setup_supplier(ledger, "acme", {"KNOWN": "SKU-K"})
    body = csv_body({"KNOWN": 1, "NEW-ONE": 8}, datetime.now(UTC) - timedelta(minutes=1))
    enqueue(ledger, "acme", "first", body)
    assert InboxWorker(ledger.ingestor, ledger.store).work_once()
    [letter] = listing(ledger.store, supplier_id="acme")
    assert (letter["reason"], letter["record"]["supplier_sku"]) == (
        "unmapped_supplier_sku",
        "NEW-ONE",
    )

    ledger.writer.execute(
        PutMappings(
            at=datetime.now(UTC),
            cause=CAUSE,
            supplier_id="acme",
            mappings=[MappingSpec("NEW-ONE", "SKU-NEW")],
        )
    )
    outcome = retry(ledger.store, ledger.ingestor, [letter["id"]], "operator")

    assert outcome.resolved == [letter["id"]]
    assert listing(ledger.store, supplier_id="acme") == []
    assert on_hand(ledger, "SKU-NEW") == 8


def test_a_delivery_nobody_mapped_leaves_every_record_as_a_letter_in_file_order(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its refusals pass through a spool (here large enough to go to a file), not a list."""
    monkeypatch.setattr(outcome_module, "SPOOL_BYTES", 4096)
    setup_supplier(ledger, "unmapped", {"KNOWN": "SKU-KNOWN"})
    rows = {f"NEW-{n:04}": n for n in range(2500)} | {"KNOWN": 3}
    body = csv_body(rows, datetime.now(UTC) - timedelta(minutes=1))
    enqueue(ledger, "unmapped", "catalogue", body)

    assert InboxWorker(ledger.ingestor, ledger.store).work_once()

    letters = listing(ledger.store, supplier_id="unmapped", limit=5000)
    assert [letter["position"] for letter in letters] == list(range(1, 2501))  # by id
    assert all(
        letter["record"]["supplier_sku"] == f"NEW-{letter['position'] - 1:04}"
        and letter["raw"] == letter["record"]
        and letter["reason"] == "unmapped_supplier_sku"
        for letter in letters
    )
    assert on_hand(ledger, "SKU-KNOWN") == 3
    with ledger.store.connection() as conn:
        [status] = inbox.delivery_status(conn, "catalogue", "unmapped")
    assert (status["status"], status["outcome"]["rejected"]) == ("applied", 2500)


def test_records_the_ledger_refused_keep_what_was_written_and_the_true_one_applies_alone(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two records of a SKU at one time that disagree are both refused by the ledger: the
    delivery does not say which is true. Their letters keep what the supplier wrote. One
    retried alone is tried with the other again, and they disagree again; once the
    operator dismisses the false one, the true one applies, and no later retry, a bulk
    one included, brings the false one back."""
    monkeypatch.setattr(ingest_module, "AS_WRITTEN_PAGE", 1)  # looked up a page each
    setup_supplier(ledger, "acme", {"TWICE": "SKU-TW", "ONCE": "SKU-ON"}, units=12)
    at = datetime.now(UTC) - timedelta(minutes=1)
    rows = (("TWICE", 2), ("ONCE", 1), ("TWICE", 3))
    lines = [f"{sku},{quantity},{at.isoformat()}" for sku, quantity in rows]
    body = ("sku,quantity,observed_at\n" + "\n".join(lines) + "\n").encode()
    enqueue(ledger, "acme", "twice", body)
    assert InboxWorker(ledger.ingestor, ledger.store).work_once()
    letters = listing(ledger.store, supplier_id="acme")
    written = {
        "supplier_sku": "TWICE",
        "upc": None,
        "unit": None,
        "observed_at": at.isoformat(),
        "incoming": None,
    }
    assert [(letter["reason"], letter["record"], letter["raw"]["sku"]) for letter in letters] == [
        ("conflicting_duplicate", {**written, "quantity": quantity}, "SKU-TW")
        for quantity in (2, 3)
    ]
    assert on_hand(ledger, "SKU-ON") == 12
    false, true = (letter["id"] for letter in letters)

    alone = retry(ledger.store, ledger.ingestor, [true], "operator")
    assert alone.still_refused == {false: "conflicting_duplicate", true: "conflicting_duplicate"}
    assert on_hand(ledger, "SKU-TW") == 0

    assert dismiss(ledger.store, [false]).dismissed == [false]
    assert dismiss(ledger.store, [false]).dismissed == []  # it is no longer open
    chosen = retry(ledger.store, ledger.ingestor, [true], "operator")

    assert (chosen.resolved, chosen.still_refused) == ([true], {})
    assert on_hand(ledger, "SKU-TW") == 36
    assert listing(ledger.store, supplier_id="acme") == []
    [dismissed] = listing(ledger.store, supplier_id="acme", status="dismissed")
    assert dismissed["id"] == false
    again = retry(ledger.store, ledger.ingestor, [false, true], "operator")
    assert (again.resolved, again.still_refused) == ([], {})
    assert on_hand(ledger, "SKU-TW") == 36


def test_records_that_disagree_retried_together_disagree_again_and_stay_open(
    ledger: Runtime,
) -> None:
    setup_supplier(ledger, "acme", {"TWICE": "SKU-TT"})
    at = datetime.now(UTC) - timedelta(minutes=1)
    body = f"sku,quantity,observed_at\nTWICE,2,{at.isoformat()}\nTWICE,3,{at.isoformat()}\n"
    enqueue(ledger, "acme", "twice-again", body.encode())
    assert InboxWorker(ledger.ingestor, ledger.store).work_once()
    ids = [letter["id"] for letter in listing(ledger.store, supplier_id="acme")]

    outcome = retry(ledger.store, ledger.ingestor, ids, "operator")

    assert outcome.still_refused == dict.fromkeys(ids, "conflicting_duplicate")
    assert [letter["id"] for letter in listing(ledger.store, supplier_id="acme")] == ids
    assert on_hand(ledger, "SKU-TT") == 0


def test_a_disagreeing_letter_is_retried_with_those_of_its_own_sku_only(
    ledger: Runtime,
) -> None:
    """A whole file stamped with one time, two SKUs each reported twice, disagreeing:
    retrying one letter tried every such letter of the delivery again (a walkthrough)."""
    setup_supplier(ledger, "acme", {"ONE": "SKU-D1", "TWO": "SKU-D2"})
    at = datetime.now(UTC) - timedelta(minutes=1)
    rows = (("ONE", 2), ("TWO", 5), ("ONE", 3), ("TWO", 6))
    lines = [f"{sku},{quantity},{at.isoformat()}" for sku, quantity in rows]
    body = ("sku,quantity,observed_at\n" + "\n".join(lines) + "\n").encode()
    enqueue(ledger, "acme", "two-skus-twice", body)
    assert InboxWorker(ledger.ingestor, ledger.store).work_once()
    letters = listing(ledger.store, supplier_id="acme")
    of = {
        sku: [letter["id"] for letter in letters if letter["raw"]["sku"] == sku]
        for sku in ("SKU-D1", "SKU-D2")
    }

    outcome = retry(ledger.store, ledger.ingestor, of["SKU-D1"][:1], "operator")

    assert outcome.still_refused == dict.fromkeys(of["SKU-D1"], "conflicting_duplicate")
    attempts = {
        letter["id"]: letter["attempts"] for letter in listing(ledger.store, supplier_id="acme")
    }
    assert attempts == {**dict.fromkeys(of["SKU-D1"], 1), **dict.fromkeys(of["SKU-D2"], 0)}


def unmapped_letters(ledger: Runtime, supplier: str, rows: dict[str, int]) -> list[int]:
    """Letters of a delivery of these rows, none of them mapped; then mapped (to SKU-<row>)."""
    setup_supplier(ledger, supplier, {})
    body = csv_body(rows, datetime.now(UTC) - timedelta(minutes=1))
    enqueue(ledger, supplier, f"unmapped-{supplier}", body)
    assert InboxWorker(ledger.ingestor, ledger.store).work_once()
    specs = [MappingSpec(s_sku, f"SKU-{s_sku}", 1, upc=None) for s_sku in rows]
    ledger.writer.execute(
        PutMappings(at=datetime.now(UTC), cause=CAUSE, supplier_id=supplier, mappings=specs)
    )
    return [letter["id"] for letter in listing(ledger.store, supplier_id=supplier)]


def test_two_retries_at_once_claim_each_letter_once(ledger: Runtime) -> None:
    """Two retries in two processes, each on a connection of its own (in one process they
    take turns): each letter is applied by one of them."""
    ids = unmapped_letters(ledger, "acme", {f"TWO-{n}": n + 1 for n in range(40)})
    ready = threading.Barrier(2)
    outcomes: list[deadletters.RetryOutcome] = []

    def one_retry() -> None:
        with ledger.store.transaction() as claim:
            ready.wait()
            outcome, failure = deadletters._retry(claim, ledger.ingestor, ids, "operator")
        assert failure is None
        outcomes.append(outcome)

    threads = [threading.Thread(target=one_retry) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    [first, second] = [set(outcome.resolved) for outcome in outcomes]
    assert first.isdisjoint(second)
    assert first | second == set(ids)
    assert sum(o.applied for o in outcomes) == 40
    attempts = [letter["attempts"] for letter in listing(ledger.store, status="resolved")]
    assert attempts == [1] * 40


def test_a_disagreeing_letter_whose_partner_another_retry_holds_is_left_to_it(
    ledger: Runtime,
) -> None:
    """A review: two retries at once, each holding one of a pair that disagrees, each
    applied its own alone, and the tie made an arbitrary one the level."""
    setup_supplier(ledger, "acme", {"PAIR": "SKU-PAIR"})
    at = datetime.now(UTC) - timedelta(minutes=1)
    body = f"sku,quantity,observed_at\nPAIR,2,{at.isoformat()}\nPAIR,3,{at.isoformat()}\n"
    enqueue(ledger, "acme", "pair", body.encode())
    assert InboxWorker(ledger.ingestor, ledger.store).work_once()
    held, mine = (letter["id"] for letter in listing(ledger.store, supplier_id="acme"))
    with psycopg.connect(ledger.database_url) as other:
        other.execute("SELECT id FROM connector_dead_letters WHERE id = %s FOR UPDATE", (held,))
        ledger.writer.execute(
            PutMappings(
                at=datetime.now(UTC),
                cause=CAUSE,
                supplier_id="acme",
                mappings=[MappingSpec("PAIR", "SKU-PAIR", 1, upc=None)],
            )
        )
        outcome = retry(ledger.store, ledger.ingestor, [mine], "operator")

    assert (outcome.resolved, outcome.still_refused, outcome.being_retried) == ([], {}, [mine])
    assert on_hand(ledger, "SKU-PAIR") == 0
    left = listing(ledger.store, supplier_id="acme")
    assert [(letter["id"], letter["attempts"]) for letter in left] == [(held, 0), (mine, 0)]


@pytest.mark.alone
def test_a_retry_waits_a_while_for_another_in_its_process_then_gives_up(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a retry waited for another without end, holding its request's thread."""
    ids = unmapped_letters(ledger, "acme", {"WAIT-1": 1})
    monkeypatch.setattr(deadletters, "RETRY_WAIT_SECONDS", 0.2)
    with deadletters._retrying:
        began = time.monotonic()
        with pytest.raises(deadletters.RetryBusy):
            retry(ledger.store, ledger.ingestor, ids, "operator")
        waited = time.monotonic() - began

    assert waited < 2
    assert [letter["id"] for letter in listing(ledger.store, supplier_id="acme")] == ids
    assert retry(ledger.store, ledger.ingestor, ids, "operator").resolved == ids


def test_a_retry_that_fails_for_one_supplier_keeps_what_it_applied_for_the_others(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: the letters of every supplier a bulk retry applied before one failed stayed
    open (one transaction marked them all), though the ledger had applied them."""
    first = unmapped_letters(ledger, "acme", {"OK-1": 4})
    second = unmapped_letters(ledger, "globex", {"BAD-1": 5})
    applied = ledger.ingestor.retry

    def failing(supplier_id: str, records: Any, actor: str) -> Any:
        if supplier_id == "globex":
            raise RuntimeError("the database went away")
        return applied(supplier_id, records, actor)

    monkeypatch.setattr(ledger.ingestor, "retry", failing)
    with pytest.raises(RuntimeError, match="went away"):
        retry(ledger.store, ledger.ingestor, [*first, *second], "operator")

    assert [letter["id"] for letter in listing(ledger.store, status="resolved")] == first
    assert [letter["id"] for letter in listing(ledger.store, supplier_id="globex")] == second
    assert on_hand(ledger, "SKU-OK-1") == 4


def test_letters_that_came_to_disagree_on_a_retry_are_retried_with_their_own_sku_only(
    ledger: Runtime,
) -> None:
    """A walkthrough: letters of a catalogue sent before its mappings, two supplier SKUs
    then mapped onto each SKU, disagreed on the bulk retry; their letters named no SKU
    (refused first as unmapped), so a retry of one took along every such letter of the
    delivery."""
    rows = {"Q-0": 1, "Q-1": 2, "Q-2": 3, "Q-3": 4}
    setup_supplier(ledger, "acme", {})
    enqueue(ledger, "acme", "catalogue", csv_body(rows, datetime.now(UTC) - timedelta(minutes=1)))
    assert InboxWorker(ledger.ingestor, ledger.store).work_once()
    onto = {"Q-0": "SKU-K0", "Q-1": "SKU-K0", "Q-2": "SKU-K1", "Q-3": "SKU-K1"}
    specs = [MappingSpec(s_sku, sku, 1, upc=None) for s_sku, sku in onto.items()]
    ledger.writer.execute(
        PutMappings(at=datetime.now(UTC), cause=CAUSE, supplier_id="acme", mappings=specs)
    )
    ids = {letter["record"]["supplier_sku"]: letter["id"] for letter in listing(ledger.store)}
    bulk = retry(ledger.store, ledger.ingestor, list(ids.values()), "operator")
    assert bulk.still_refused == dict.fromkeys(ids.values(), "conflicting_duplicate")

    one = retry(ledger.store, ledger.ingestor, [ids["Q-0"]], "operator")

    assert one.still_refused == dict.fromkeys([ids["Q-0"], ids["Q-1"]], "conflicting_duplicate")
    letters = {letter["id"]: letter for letter in listing(ledger.store)}
    assert {s: letters[i]["attempts"] for s, i in ids.items()} == {
        "Q-0": 2,
        "Q-1": 2,
        "Q-2": 1,
        "Q-3": 1,
    }
    assert {s: letters[i]["raw"]["sku"] for s, i in ids.items()} == onto


def test_a_record_with_a_nul_character_is_refused_alone_and_kept_as_a_dead_letter(
    ledger: Runtime,
) -> None:
    """PostgreSQL refuses a NUL in text: a record holding one failed the whole delivery
    (COPY refused the file, and the rows read in Python failed to stage; the delivery was
    tried again and again). It is refused alone now, and kept readable."""
    setup_supplier(ledger, "acme", {"A": "SKU-NUL-A"})
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    body = (
        f"sku,quantity,unit,observed_at\nA,5,EA,{at}\nB\x00B,3,EA,{at}\nA2,6,E\x00A,{at}\n"
    ).encode()
    enqueue(ledger, "acme", "with-nul", body)

    assert InboxWorker(ledger.ingestor, ledger.store).work_once()

    letters = {letter["position"]: letter for letter in listing(ledger.store, supplier_id="acme")}
    assert {p: letter["reason"] for p, letter in letters.items()} == {
        2: "nul_character",
        3: "nul_character",
    }
    assert letters[2]["raw"]["sku"] == "B\ufffdB"
    assert letters[3]["record"]["unit"] == "E\ufffdA"
    assert on_hand(ledger, "SKU-NUL-A") == 5
    with ledger.store.connection() as conn:
        [status] = inbox.delivery_status(conn, "with-nul", "acme")
    assert status["status"] == "applied"


def test_a_letter_whose_raw_record_has_a_nul_in_a_column_name_is_kept_readable(
    ledger: Runtime,
) -> None:
    setup_supplier(ledger, "acme", {"A": "SKU-NULKEY-A"})
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    body = f"sku,quantity,observed_at,no\x00te\nA,5,{at},x\nA2,-1,{at},y\n".encode()
    enqueue(ledger, "acme", "nul-key", body)

    assert InboxWorker(ledger.ingestor, ledger.store).work_once()

    [letter] = listing(ledger.store, supplier_id="acme")
    assert (letter["position"], letter["reason"]) == (2, "negative_quantity")
    assert letter["raw"]["no\ufffdte"] == "y"
    assert on_hand(ledger, "SKU-NULKEY-A") == 5
    with ledger.store.connection() as conn:
        [status] = inbox.delivery_status(conn, "nul-key", "acme")
    assert status["status"] == "applied"


def enqueue(runtime: Runtime, supplier: str, delivery_id: str, body: bytes) -> inbox.Received:
    with runtime.store.connection() as conn:
        return inbox.enqueue(
            conn,
            supplier_id=supplier,
            delivery_id=delivery_id,
            source="test",
            format="csv",
            content_hash=content_hash(body),
            body=body,
        )


def test_the_inbox_keeps_a_delivery_once_and_refuses_other_content_under_its_id(
    ledger: Runtime,
) -> None:
    setup_supplier(ledger, "acme", {"A": "SKU-INBOX"})
    body = csv_body({"A": 3}, datetime.now(UTC) - timedelta(minutes=1))
    first = enqueue(ledger, "acme", "batch-17", body)
    again = enqueue(ledger, "acme", "batch-17", body)
    other = enqueue(ledger, "acme", "batch-17", body + b"A,4,\n")
    worker = InboxWorker(ledger.ingestor, ledger.store)
    assert worker.work_once()
    assert not worker.work_once()

    assert (first.duplicate, again.duplicate, again.clash, other.clash) == (
        False,
        True,
        False,
        True,
    )
    with ledger.store.connection() as conn:
        [status] = inbox.delivery_status(conn, "batch-17")
    assert status["status"] == "applied"
    assert status["outcome"]["applied"] == 1


def test_a_delivery_applied_again_after_a_crash_changes_nothing_and_fails_nothing(
    ledger: Runtime,
) -> None:
    setup_supplier(ledger, "acme", {"A": "SKU-AGAIN"})
    body = csv_body({"A": 4, "NOT-MAPPED": 1}, datetime.now(UTC) - timedelta(minutes=1))
    first = ledger.ingestor.ingest(
        "acme",
        "same-delivery",
        io.BytesIO(body),
        "csv",
        source="test",
        received_at=datetime.now(UTC),
        actor="test",
    )
    events = stock_events(ledger)
    again = ledger.ingestor.ingest(
        "acme",
        "same-delivery",
        io.BytesIO(body),
        "csv",
        source="test",
        received_at=datetime.now(UTC),
        actor="test",
    )
    assert (first.applied, first.rejected) == (1, 1)
    assert (again.applied, again.unchanged, again.rejected) == (0, 1, 1)
    assert stock_events(ledger) == events


def test_a_delivery_is_compared_with_the_levels_on_record_in_the_memory_given_to_it(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RESOLVE sorts and hashes the whole delivery: it runs with `work_mem_mb` and without
    JIT compilation (also where the database's own setting leaves it on, as this
    connection's does), and the connection goes back to the pool with its own settings."""
    setup_supplier(ledger, "acme", {"A": "SKU-WM-A", "B": "SKU-WM-B"})
    seen: list[str] = []
    connection = ledger.store.connection

    class Watched:
        """The pooled connection, reporting work_mem and jit as RESOLVE starts."""

        def __init__(self, conn: Any) -> None:
            self.conn = conn
            self.resolved = False

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            if query is comparison.RESOLVE:
                self.resolved = True
                seen.append(self.conn.execute("SHOW work_mem").fetchone()["work_mem"])
                seen.append(self.conn.execute("SHOW jit").fetchone()["jit"])
            return self.conn.execute(query, *args, **kwargs)

    @contextmanager
    def watched() -> Iterator[Any]:
        with connection() as conn:
            conn.execute("SET jit = on")  # as where migrating could not turn it off
            proxy = Watched(conn)
            yield proxy
            if proxy.resolved:  # the delivery's connection, as it returns to the pool
                seen.append(conn.execute("SHOW work_mem").fetchone()["work_mem"])
                seen.append(conn.execute("SHOW jit").fetchone()["jit"])
            conn.execute("RESET jit")

    monkeypatch.setattr(ledger.store, "connection", watched)
    roomy = Ingestor(ledger.writer, ledger.store, ledger.views, work_mem_mb=96)

    result = ingest(ledger, "acme", csv_body({"A": 3, "B": 4}, datetime.now(UTC)), ingestor=roomy)

    assert result.applied == 2
    with psycopg.connect(ledger.database_url) as conn:
        default = conn.execute("SHOW work_mem").fetchone()
    assert seen == ["96MB", "off", default[0] if default else None, "on"]


@pytest.mark.alone
def test_a_delivery_says_which_phase_its_time_went_to(
    ledger: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger is made to take 0.3 s over the changes: that time shows under "apply",
    not under reading or comparing; the notes, beside it, are timed on their own."""
    setup_supplier(ledger, "acme", {"A": "SKU-T-A", "B": "SKU-T-B"})
    at = datetime.now(UTC) - timedelta(minutes=1)
    ingest(ledger, "acme", csv_body({"A": 3, "B": 4}, at))
    submit = ledger.writer.submit

    def slow(command: Any) -> Any:
        time.sleep(0.3)
        return submit(command)

    monkeypatch.setattr(ledger.writer, "submit", slow)
    started = time.perf_counter()
    # A changes, B repeats: one change for the ledger, one repeat to note.
    result = ingest(ledger, "acme", csv_body({"A": 5, "B": 4}, at + timedelta(seconds=5)))
    took = time.perf_counter() - started

    assert (result.applied, result.unchanged) == (1, 1)
    seconds = result.as_dict()["seconds"]
    assert set(seconds) == {"read", "compare", "apply", "notes"}
    assert seconds["apply"] >= 0.3
    assert seconds["read"] < 0.3
    assert seconds["compare"] < 0.3
    assert seconds["read"] + seconds["compare"] + seconds["apply"] <= took
    assert describe_phases(result.seconds).startswith("read ")


def edi_with(schedules: str, time: str = "1430") -> bytes:
    """The two-item fixture with other SCH lines for ABC-123 (SE01 counted again), sent at
    `time` on its day."""
    fixture = (FIXTURES / "846-two-items.edi").read_text()
    lines = fixture.replace("SCH*500*EA***018*20260201~", schedules)
    segments = lines.split("ST*846*0001~")[1].split("SE*12*0001~")[0].count("~") + 2
    lines = lines.replace("SE*12*0001~", f"SE*{segments}*0001~")
    return lines.replace("*20260115*1430~", f"*20260115*{time}~").encode()


def kept_incoming(runtime: Runtime, supplier: str, sku: str) -> Any:
    with psycopg.connect(runtime.database_url) as conn:
        [row] = conn.execute(
            "SELECT incoming FROM inventoryledger_levels WHERE supplier_id = %s AND sku = %s",
            (supplier, sku),
        ).fetchall()
    return row[0]


def test_sch_lines_are_kept_as_incoming_stock_in_base_units_and_only_news_is_applied(
    ledger: Runtime,
) -> None:
    setup_supplier(
        ledger, "sch", {"ABC-123": "SKU-SCH", "XYZ-9": "SKU-NOSCH"}, connector={"units": {"CS": 12}}
    )
    two = "SCH*500*EA***018*20260201~SCH*2*CS***018*20260215~"
    first = ingest(ledger, "sch", edi_with(two), "edi846")
    events = stock_events(ledger)
    again = ingest(ledger, "sch", edi_with(two, time="1500"), "edi846")  # later, the same
    events_again = stock_events(ledger)
    moved = ingest(ledger, "sch", edi_with("SCH*2*CS***018*20260215~", time="1530"), "edi846")
    position = ledger.app.repository.get(StockItem.id_for("SKU-SCH")).positions["sch"]
    cleared = ingest(ledger, "sch", edi_with("", time="1600"), "edi846")
    after = ledger.app.repository.get(StockItem.id_for("SKU-SCH")).positions["sch"]

    assert (first.applied, again.unchanged, again.applied) == (2, 2, 0)
    assert events_again == events  # the repeat left no event
    assert kept_incoming(ledger, "sch", "SKU-NOSCH") is None
    assert (moved.applied, moved.unchanged) == (1, 1)  # only the schedule changed
    assert position.incoming == (("2026-02-15", 24),)
    assert position.quantity == 120
    assert (cleared.applied, after.incoming) == (1, ())
    assert kept_incoming(ledger, "sch", "SKU-SCH") is None


def test_incoming_stock_in_a_unit_nobody_knows_refuses_the_record_alone(ledger: Runtime) -> None:
    setup_supplier(ledger, "schu", {"ABC-123": "SKU-SCHU", "XYZ-9": "SKU-SCHU2"})
    result = ingest(ledger, "schu", edi_with("SCH*2*PALLET***018*20260215~"), "edi846")

    assert (result.applied, [r.reason for r in result.rejections]) == (
        1,
        ["unknown_unit: 'PALLET'"],
    )
    assert ledger.app.repository.get(StockItem.id_for("SKU-SCHU")).positions == {}


def test_a_report_older_than_the_supplier_s_max_age_is_refused_alone(ledger: Runtime) -> None:
    setup_supplier(
        ledger,
        "aged",
        {"OLD": "SKU-AGED-1", "NEW": "SKU-AGED-2"},
        connector={"max_age_seconds": 3600},
    )
    now = datetime.now(UTC)
    body = (
        "sku,quantity,observed_at\n"
        f"OLD,5,{(now - timedelta(hours=2)).isoformat()}\n"
        f"NEW,6,{(now - timedelta(minutes=59)).isoformat()}\n"
    ).encode()

    result = ingest(ledger, "aged", body)

    assert sorted((r.index, r.reason) for r in result.rejections) == [(1, "too_old")]
    assert result.applied == 1
    assert on_hand(ledger, "SKU-AGED-2") == 6
    assert ledger.app.repository.get(StockItem.id_for("SKU-AGED-1")).positions == {}


def test_a_csv_report_says_nothing_of_incoming_stock_and_leaves_the_schedule(
    ledger: Runtime,
) -> None:
    setup_supplier(ledger, "mixed", {"ABC-123": "SKU-MIX", "XYZ-9": "SKU-MIX2"})
    ingest(ledger, "mixed", edi_with("SCH*500*EA***018*20260201~"), "edi846")
    later = datetime(2026, 1, 15, 16, 0, tzinfo=UTC)
    same = ingest(ledger, "mixed", csv_body({"ABC-123": 120}, later))
    moved = ingest(ledger, "mixed", csv_body({"ABC-123": 90}, later + timedelta(hours=1)))
    position = ledger.app.repository.get(StockItem.id_for("SKU-MIX")).positions["mixed"]

    assert (same.unchanged, same.applied) == (1, 0)  # the schedule is not news either way
    assert moved.applied == 1
    assert (position.quantity, position.incoming) == (90, (("2026-02-01", 500),))
    assert kept_incoming(ledger, "mixed", "SKU-MIX") == [["2026-02-01", 500]]


def test_a_csv_with_incoming_columns_keeps_what_each_row_expects_in_base_units(
    ledger: Runtime,
) -> None:
    skus = {"A": "SKU-ONA", "B": "SKU-ONB", "C": "SKU-ONC"}
    columns = {"incoming_quantity": "on_order", "expected_on": "eta"}
    connector = {"units": {"CS": 12}, "options": {"columns": columns}}
    setup_supplier(ledger, "onorder", skus, connector=connector)
    at = datetime(2026, 1, 15, 14, 30, tzinfo=UTC)

    def body(rows: list[str], moment: datetime) -> bytes:
        lines = ["sku,quantity,unit,on_order,eta,observed_at"]
        lines += [f"{row},{moment.isoformat()}" for row in rows]
        return ("\n".join(lines) + "\n").encode()

    first = ingest(ledger, "onorder", body(["A,10,CS,3,2027-01-10", "B,5,EA,,", "C,5,EA,0,"], at))
    position = ledger.app.repository.get(StockItem.id_for("SKU-ONA")).positions["onorder"]

    assert first.read_by == "copy"
    assert (first.applied, first.rejected) == (3, 0)
    assert (position.quantity, position.incoming) == (120, (("2027-01-10", 36),))
    assert kept_incoming(ledger, "onorder", "SKU-ONA") == [["2027-01-10", 36]]
    assert kept_incoming(ledger, "onorder", "SKU-ONB") is None
    assert kept_incoming(ledger, "onorder", "SKU-ONC") is None

    later = at + timedelta(hours=1)
    silent = ingest(ledger, "onorder", body(["A,10,CS,,"], later))
    cleared = ingest(ledger, "onorder", body(["A,10,CS,0,"], later + timedelta(hours=1)))
    bad = ingest(ledger, "onorder", body(["A,10,CS,2,someday"], later + timedelta(hours=2)))
    position = ledger.app.repository.get(StockItem.id_for("SKU-ONA")).positions["onorder"]

    assert (silent.unchanged, silent.applied) == (1, 0)  # blank says nothing: it stands
    assert cleared.applied == 1
    assert (position.quantity, position.incoming) == (120, ())
    assert kept_incoming(ledger, "onorder", "SKU-ONA") is None
    assert [r.reason for r in bad.rejections] == ["invalid_expected_on: 'someday'"]


def test_an_xml_incoming_quantity_in_cases_counts_the_cases_in_base_units(ledger: Runtime) -> None:
    """A supplier integrator's walkthrough: `<Inbound><Qty uom="CS">1</Qty>` showed one
    piece incoming, where a case is 12."""
    fields = {"incoming_quantity": "Inbound/Qty", "expected_on": "Inbound/@eta"}
    connector = {"units": {"CS": 12}, "options": {"fields": fields}}
    setup_supplier(ledger, "xmlcases", {"X-1": "SKU-XC1"}, connector=connector)
    at = datetime.now(UTC) - timedelta(minutes=1)
    body = (
        f'<Items><Item sku="X-1" observed_at="{at.isoformat()}"><Qty>4</Qty>'
        '<Inbound eta="2027-01-10"><Qty uom="CS">2</Qty></Inbound></Item></Items>'
    ).encode()

    outcome = ingest(ledger, "xmlcases", body, "xml")

    position = ledger.app.repository.get(StockItem.id_for("SKU-XC1")).positions["xmlcases"]
    assert (outcome.applied, outcome.rejected) == (1, 0)
    assert (position.quantity, position.incoming) == (4, (("2027-01-10", 24),))


def test_an_applied_delivery_s_body_is_let_go_after_the_days_kept_the_others_keep_theirs(
    ledger: Runtime,
) -> None:
    for name in ("old-applied", "new-applied", "old-failed"):
        enqueue(ledger, "keep", name, f"sku,quantity\n{name},1\n".encode())
    with ledger.store.connection() as conn:
        conn.execute(
            "UPDATE connector_inbox SET status = CASE delivery_id WHEN 'old-failed'"
            " THEN 'failed' ELSE 'applied' END, finished_at = now() - CASE delivery_id"
            " WHEN 'new-applied' THEN interval '1 day' ELSE interval '8 days' END"
            " WHERE supplier_id = 'keep'"
        )
        forgot = inbox.forget_bodies(conn, older_than_days=7)
        again = inbox.forget_bodies(conn, older_than_days=7)
        kept = {
            row["delivery_id"]: row["body"] is not None
            for row in conn.execute(
                "SELECT delivery_id, body FROM connector_inbox WHERE supplier_id = 'keep'"
            )
        }
        [status] = inbox.delivery_status(conn, "old-applied", "keep")

    assert (forgot, again) == (1, 0)
    assert kept == {"old-applied": False, "new-applied": True, "old-failed": True}
    assert status["status"] == "applied"  # its record stays; only the body goes


@pytest.mark.parametrize("quoted", [False, True], ids=["by-copy", "in-python"])
def test_a_quantity_past_any_integer_postgresql_keeps_refuses_its_record_alone(
    ledger: Runtime, quoted: bool
) -> None:
    # A ceiling past what PostgreSQL keeps, as settings saved before it was bounded.
    map_in_units(
        ledger,
        "vast",
        MappingSpec("V-1", "SKU-VAST-1", 1),
        MappingSpec("V-2", "SKU-VAST-2", 1),
        max_quantity=10**26,
    )
    seen = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    vast = f'"{10**22}"' if quoted else str(10**22)
    body = f"supplier_sku,quantity,observed_at\nV-1,{vast},{seen}\nV-2,5,{seen}\n".encode()

    result = ingest(ledger, "vast", body)

    assert result.read_by == ("python" if quoted else "copy")
    assert [(r.index, r.reason) for r in result.rejections] == [(1, "quantity_out_of_range")]
    assert result.applied == 1
    assert on_hand(ledger, "SKU-VAST-2") == 5


def test_a_unit_holding_more_than_a_delivery_can_stage_refuses_its_records_alone(
    ledger: Runtime,
) -> None:
    # As settings saved before units were bounded could hold.
    map_in_units(
        ledger,
        "pallets",
        MappingSpec("P-1", "SKU-PAL-1", 1),
        MappingSpec("P-2", "SKU-PAL-2", 1),
        units={"PAL": 10**20},
    )
    seen = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    body = f"supplier_sku,quantity,unit,observed_at\nP-1,2,PAL,{seen}\nP-2,5,,{seen}\n".encode()

    result = ingest(ledger, "pallets", body)

    assert [(r.index, r.reason) for r in result.rejections] == [(1, "unknown_unit: 'PAL'")]
    assert on_hand(ledger, "SKU-PAL-2") == 5


def test_a_json_quantity_past_64_bits_refuses_its_record_not_the_file(ledger: Runtime) -> None:
    map_in_units(
        ledger, "vastjson", MappingSpec("J-1", "SKU-VJ-1", 1), MappingSpec("J-2", "SKU-VJ-2", 1)
    )
    seen = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    body = (
        f'[{{"supplier_sku": "J-1", "quantity": {10**22}, "observed_at": "{seen}"}},'
        f' {{"supplier_sku": "J-2", "quantity": 5, "observed_at": "{seen}"}}]'
    ).encode()

    result = ingest(ledger, "vastjson", body, "json")

    assert [(r.index, r.reason) for r in result.rejections] == [(1, "quantity_out_of_range")]
    assert on_hand(ledger, "SKU-VJ-2") == 5
