"""The supplier simulator's catalogue, feed writers, file drops and webhook signatures."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest

from connectors.parsers import FORMATS, Format, Record, parse
from connectors.simulator import (
    CASE_SIZE,
    Catalogue,
    Item,
    Separators,
    drop,
    send_webhook,
    webhook_body,
    write,
    write_csv,
    write_edi846,
)
from connectors.simulator.__main__ import main as simulator_command

T0 = datetime(2026, 1, 15, 14, 30, 5, tzinfo=UTC)


def catalogue(size: int = 200, seed: int = 7) -> Catalogue:
    return Catalogue(size, seed=seed, observed_at=T0)


def read_back(fmt: Format, data: bytes) -> list[Record]:
    parsed = list(parse(fmt, io.BytesIO(data)))
    assert all(isinstance(record, Record) for record in parsed), parsed[:3]
    return [record for record in parsed if isinstance(record, Record)]


def written(fmt: Format, items: Iterable[Item]) -> bytes:
    target = io.BytesIO()
    write(fmt, items, target)
    return target.getvalue()


def written_edi(items: Iterable[Item], **options: Any) -> bytes:
    target = io.BytesIO()
    write_edi846(items, target, **options)
    return target.getvalue()


def as_read(item: Item, fmt: Format) -> tuple[Any, ...]:
    """What a parser should read for the item: EDI times are naive UTC."""
    observed_at = item.observed_at.replace(tzinfo=None) if fmt == "edi846" else item.observed_at
    return (item.supplier_sku, item.upc, item.quantity, item.unit, observed_at)


def as_record(record: Record) -> tuple[Any, ...]:
    return (record.supplier_sku, record.upc, record.quantity, record.unit, record.observed_at)


def independent_check_digit(data: str) -> int:
    odd = sum(int(d) for d in data[0::2])  # 1st, 3rd, … digit of an 11-digit UPC-A
    even = sum(int(d) for d in data[1::2])
    return (10 - (3 * odd + even) % 10) % 10


def snapshot(c: Catalogue) -> list[Item]:
    return list(c)


# The catalogue


def test_the_same_seed_and_times_give_the_same_snapshots() -> None:
    first, second = catalogue(seed=3), catalogue(seed=3)
    assert snapshot(first) == snapshot(second)
    for step in range(1, 4):
        first.advance(0.2, T0 + timedelta(minutes=step))
        second.advance(0.2, T0 + timedelta(minutes=step))
    assert snapshot(first) == snapshot(second)
    assert snapshot(first) != snapshot(catalogue(seed=4))


def test_items_are_numbered_skus_with_valid_upcs() -> None:
    c = Catalogue(1_000_010, seed=5, observed_at=T0)
    edges = [*c.items(0, 3), *c.items(998, 1003), *c.items(999_998, 1_000_003), c[1_000_009]]
    assert edges[0].supplier_sku == "SIM-000001"
    assert c[122].supplier_sku == "SIM-000123"
    assert edges[-1].supplier_sku == "SIM-1000010"
    for item in edges:
        assert len(item.upc) == 12
        assert item.upc.isdigit()
        assert int(item.upc[-1]) == independent_check_digit(item.upc[:-1]), item
    assert len({item.upc for item in edges}) == len(edges)


def test_most_items_are_counted_in_eaches_and_some_in_cases_of_twelve() -> None:
    items = snapshot(catalogue(size=5000))
    cases = [item for item in items if item.unit == "CS"]
    assert {item.unit for item in items} == {"EA", "CS"}
    assert 0.05 < len(cases) / len(items) < 0.15
    assert {item.units_per_supplier_unit for item in cases} == {CASE_SIZE} == {12}
    assert {item.units_per_supplier_unit for item in items if item.unit == "EA"} == {1}


def test_advance_changes_exactly_the_asked_fraction_of_quantities() -> None:
    c = catalogue(size=10_000)
    before = snapshot(c)
    changed = c.advance(0.05, T0 + timedelta(minutes=1))
    after = snapshot(c)
    pairs = zip(before, after, strict=True)
    differing = [new for old, new in pairs if old.quantity != new.quantity]
    assert len(differing) == 500
    assert changed == differing
    assert [(i.supplier_sku, i.upc, i.unit) for i in after] == [
        (i.supplier_sku, i.upc, i.unit) for i in before
    ]


def test_every_item_of_a_snapshot_is_observed_at_the_time_it_advanced_to() -> None:
    c = catalogue()
    later = datetime(2026, 1, 15, 16, 0, 0, 123456, tzinfo=UTC)
    c.advance(0.1, later)
    assert c.version == 1
    assert {item.observed_at for item in c} == {later.replace(microsecond=0)}
    with pytest.raises(ValueError, match="after"):
        c.advance(0.1, later - timedelta(hours=1))
    with pytest.raises(ValueError, match="time zone"):
        c.advance(0.1, datetime(2027, 1, 1))


def test_advance_without_a_time_moves_observed_at_forward_to_now() -> None:
    c = Catalogue(10, observed_at=datetime.now(UTC) + timedelta(hours=1))
    before = c.observed_at
    c.advance(0.5)
    assert c.observed_at > before


def test_a_random_walk_never_takes_a_quantity_below_zero() -> None:
    c = catalogue(size=50)
    lowest = []
    for step in range(1, 300):
        c.advance(1.0, T0 + timedelta(seconds=step))
        lowest.append(min(item.quantity for item in c))
    assert min(lowest) == 0


@pytest.mark.alone
def test_a_million_items_are_made_and_written_as_csv_in_seconds() -> None:
    started = time.perf_counter()
    c = Catalogue(1_000_000, seed=1, observed_at=T0)
    sink = _CountingSink()
    write_csv(c, sink)
    elapsed = time.perf_counter() - started
    assert sink.lines == 1_000_001
    assert elapsed < 15, f"{elapsed:.1f} s"


def test_writing_a_feed_streams_instead_of_holding_it_in_memory() -> None:
    c = catalogue(size=100_000)
    sink = _CountingSink()
    tracemalloc.start()
    try:
        write_csv(c, sink)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The rows alone, held as items, would take some 20 MB; a snapshot's quantities, 0.8 MB.
    assert sink.size > 5_000_000
    assert peak < 2_000_000, f"peak {peak} bytes"


# Writers, read back by the ledger's parsers


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_back_exactly_the_catalogue(fmt: Format) -> None:
    c = catalogue(size=500)
    items = snapshot(c)
    assert any(item.unit == "CS" for item in items)
    records = read_back(fmt, written(fmt, items))
    assert [as_record(r) for r in records] == [as_read(item, fmt) for item in items]


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_feed_reads_back_as_no_records(fmt: Format) -> None:
    assert read_back(fmt, written(fmt, [])) == []


@pytest.mark.parametrize("fmt", ["csv", "json", "xml"])
def test_values_that_need_quoting_or_escaping_survive_the_round_trip(fmt: Format) -> None:
    odd = Item('A,B "C" <&> ü', "4006381333931", 3, "EA", T0)
    [record] = read_back(fmt, written(fmt, [odd]))
    assert as_record(record) == as_read(odd, fmt)


def test_edi_sch_lines_read_back_as_the_incoming_shipments() -> None:
    items = [item for item in catalogue(size=2000) if item.incoming][:5]
    assert items
    records = read_back("edi846", written_edi(items, schedules=True))
    assert [r.incoming for r in records] == [item.incoming for item in items]
    assert read_back("edi846", written_edi(items))[0].incoming == ()


def test_an_edi_interchange_has_a_fixed_isa_and_counts_that_add_up() -> None:
    text = written_edi(snapshot(catalogue(size=7)), set_size=3, control_number=42).decode()
    isa = text.split("\n")[0]
    assert len(isa) == 106
    assert (isa[3], isa[103], isa[104], isa[105]) == ("*", "*", ">", "~")
    segments = [line.rstrip("~").split("*") for line in text.splitlines()]
    tags = [segment[0] for segment in segments]
    assert tags.count("ST") == 3
    assert tags.count("LIN") == 7
    assert segments[-2] == ["GE", "3", "42"]
    assert segments[-1] == ["IEA", "1", "000000042"]
    first_set = segments[2 : tags.index("SE") + 1]
    assert first_set[-1] == ["SE", str(len(first_set)), "0001"]
    assert first_set[1][0] == "BIA"
    assert first_set[-2] == ["CTT", "3"]
    assert first_set[2][:3] == ["LIN", "1", "SK"]
    assert first_set[3][:2] == ["QTY", "33"]


def test_an_edi_interchange_with_other_separators_and_several_moments_reads_back() -> None:
    first = catalogue(size=4)
    earlier = snapshot(first)
    first.advance(0.5, T0 + timedelta(hours=1))
    items = earlier + snapshot(first)
    data = written_edi(items, separators=Separators("|", "^", "\n"), set_size=1000)
    assert data.decode().count("ST|846|") == 2
    records = read_back("edi846", data)
    assert [as_record(r) for r in records] == [as_read(item, "edi846") for item in items]


def test_the_edi_writer_refuses_a_value_holding_a_separator() -> None:
    with pytest.raises(ValueError, match="separators"):
        written_edi([Item("BAD*SKU", "4006381333931", 1, "EA", T0)], schedules=False)


# File drops


def test_a_drop_appears_whole_under_its_name_and_leaves_nothing_else(tmp_path: Path) -> None:
    items = snapshot(catalogue())
    path = drop(tmp_path, "xml", items, name="today.xml")
    assert path == tmp_path / "today.xml"
    assert list(tmp_path.iterdir()) == [path]
    with path.open("rb") as source:
        assert len(list(parse("xml", source))) == len(items)
    default = drop(tmp_path, "edi846", items)
    assert default.suffix == ".edi"
    assert default.name.startswith("stock-")


def test_a_watcher_never_sees_part_of_a_dropped_file(tmp_path: Path) -> None:
    seen: dict[str, set[int]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for path in tmp_path.glob("*.csv"):
                seen.setdefault(path.name, set()).add(path.stat().st_size)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        path = drop(tmp_path, "csv", catalogue(size=100_000), name="big.csv")
    finally:
        done.set()
        watcher.join()
    assert seen.get("big.csv", {path.stat().st_size}) == {path.stat().st_size}


def test_a_drop_that_fails_while_writing_leaves_no_file(tmp_path: Path) -> None:
    def broken() -> Iterator[Item]:
        yield from catalogue().items(0, 10)
        raise RuntimeError("the generator broke")

    with pytest.raises(RuntimeError):
        drop(tmp_path, "json", broken(), name="broken.json")
    assert list(tmp_path.iterdir()) == []


def test_a_drop_name_cannot_leave_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        drop(tmp_path, "csv", [], name="../elsewhere.csv")


def test_the_command_line_drops_a_feed_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--items", "3", "drop", str(tmp_path), "--format", "json", "--name", "n.json"]
    assert simulator_command(arguments) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "n.json")
    records = read_back("json", (tmp_path / "n.json").read_bytes())
    assert [r.supplier_sku for r in records] == ["SIM-000001", "SIM-000002", "SIM-000003"]
    with pytest.raises(SystemExit) as help_asked:
        simulator_command(["--help"])
    assert help_asked.value.code == 0
    capsys.readouterr()
    # A folder that is not there is a usage error, not a traceback.
    with pytest.raises(SystemExit) as nowhere:
        simulator_command(["drop", str(tmp_path / "nope")])
    assert nowhere.value.code == 2
    assert "nope: no such folder" in capsys.readouterr().err


# Webhooks


def test_a_webhook_is_signed_over_the_timestamp_and_the_raw_body() -> None:
    received: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(202, json={"delivery_id": "d-1"})

    body = webhook_body(catalogue().items(0, 3), "d-1")
    url = "http://ledger.test/v1/suppliers/acme/webhook"
    with httpx.Client(transport=httpx.MockTransport(receiver)) as client:
        response = send_webhook(url, "acme", "s3cret", body, "d-1", 1_768_487_405, client)
    assert response.status_code == 202
    [request] = received
    assert str(request.url) == url
    assert request.content == body
    expected = hmac.new(b"s3cret", b"1768487405." + body, hashlib.sha256).hexdigest()
    assert request.headers["X-Ledger-Signature"] == f"sha256={expected}"
    assert request.headers["X-Ledger-Timestamp"] == "1768487405"
    assert request.headers["X-Ledger-Delivery"] == "d-1"
    assert request.headers["Content-Type"] == "application/json"


def test_a_webhook_without_a_timestamp_is_signed_now() -> None:
    stamps: list[int] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        stamps.append(int(request.headers["X-Ledger-Timestamp"]))
        return httpx.Response(202)

    with httpx.Client(transport=httpx.MockTransport(receiver)) as client:
        send_webhook("http://ledger.test/hook", "acme", b"k", b"{}", "d-2", client=client)
    assert abs(stamps[0] - time.time()) < 5


def test_the_webhook_body_lists_each_item_as_an_observation() -> None:
    items = list(catalogue().items(0, 2))
    body = json.loads(webhook_body(items, "d-3"))
    assert body == {
        "delivery_id": "d-3",
        "observations": [
            {
                "supplier_sku": item.supplier_sku,
                "quantity": item.quantity,
                "unit": item.unit,
                "observed_at": "2026-01-15T14:30:05+00:00",
            }
            for item in items
        ],
    }


class _CountingSink(io.BufferedIOBase, BinaryIO):  # type: ignore[misc]
    """A write-only binary file that keeps only its size and its number of lines."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self.lines = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.size += len(data)
        self.lines += bytes(data).count(b"\n")
        return len(data)
