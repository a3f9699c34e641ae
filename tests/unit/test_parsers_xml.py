"""The XML feed parser, on fixture files with namespaces and attributes, and on hostile ones."""

from __future__ import annotations

import gc
import io
import json
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.parsers import FeedError, Parsed, Record, RecordError, parse, source_from_chunks

FEEDS = Path(__file__).resolve().parents[1] / "fixtures" / "feeds"


def read(name: str, **options: Any) -> list[Parsed]:
    with (FEEDS / name).open("rb") as source:
        return list(parse("xml", source, options))


def read_bytes(data: bytes, **options: Any) -> list[Parsed]:
    return list(parse("xml", io.BytesIO(data), options))


def summary(parsed: list[Parsed]) -> list[tuple[int, str | None, int | None, str | None]]:
    return [
        (p.position, p.supplier_sku, p.quantity, p.unit)
        if isinstance(p, Record)
        else (p.position, None, None, p.reason)
        for p in parsed
    ]


def test_records_are_matched_by_local_name_whatever_their_namespace() -> None:
    parsed = read("xml-namespaces-attributes.xml", fields={"unit": "qty/@uom"})

    assert summary(parsed) == [
        (1, "N-1", 5, "EA"),
        (2, "N-2", 12, "CS"),
        (3, None, None, "invalid_quantity: 'many'"),
    ]
    first = parsed[0]
    assert isinstance(first, Record)
    assert first.upc == "012345678905"
    assert first.observed_at == datetime(2026, 1, 15, 14, 30, tzinfo=UTC)
    assert first.raw == {
        "@sku": "N-1",
        "@upc": "012345678905",
        "qty": {"@uom": "EA", "#text": "5"},
        "updatedAt": "2026-01-15T14:30:00Z",
    }


def test_common_names_find_records_and_fields_nested_or_not() -> None:
    parsed = read("xml-default-names.xml")

    assert summary(parsed) == [
        (1, "X-1", 40, "EA"),
        (2, "X-2", 8, None),
        (3, None, None, "missing_identifier"),
    ]
    assert isinstance(parsed[0], Record)
    assert parsed[0].observed_at == datetime(2026, 1, 15, 14, 30)


def test_the_record_and_fields_options_read_a_supplier_s_own_vocabulary() -> None:
    parsed = read(
        "xml-custom-record.xml",
        record="Artikel",
        fields={"supplier_sku": "@nr", "quantity": "Bestand", "unit": "Bestand/@einheit"},
    )

    assert summary(parsed) == [(1, "K-1", 250, "ST"), (2, "K-2", 3, "KAR")]
    assert parsed[0].raw["Name"] == "Schraube ä"


def test_an_attribute_only_record_before_the_first_identified_one_is_not_lost() -> None:
    data = b'<feed><item qty="1"/><item sku="A" qty="2" unit="PK"/><item sku="B" qty="x"/></feed>'

    assert summary(read_bytes(data)) == [
        (1, None, None, "missing_identifier"),
        (2, "A", 2, "PK"),
        (3, None, None, "invalid_quantity: 'x'"),
    ]


def test_a_wrapper_named_like_a_record_is_not_taken_for_one() -> None:
    items = b"<item><sku>A</sku><qty>1</qty></item><item><sku>B</sku><qty>2</qty></item>"
    data = b"<feed><stock>" + items + b"</stock></feed>"

    assert summary(read_bytes(data)) == [(1, "A", 1, None), (2, "B", 2, None)]


def test_a_billion_laughs_file_is_refused_without_expanding_anything() -> None:
    with pytest.raises(FeedError) as raised:
        read("xml-billion-laughs.xml")

    assert raised.value.reason.startswith("forbidden_xml: entity 'lol' declared")


def test_an_external_entity_file_is_refused_without_reading_the_entity() -> None:
    with pytest.raises(FeedError) as raised:
        read("xml-external-entity.xml")

    assert raised.value.reason.startswith("forbidden_xml: entity 'secret' declared")
    assert "root:" not in raised.value.reason


def test_malformed_xml_rejects_the_feed_after_the_records_before_the_break() -> None:
    parsed: list[Parsed] = []
    with (FEEDS / "xml-malformed.xml").open("rb") as source, pytest.raises(FeedError) as raised:
        parsed.extend(parse("xml", source))

    assert summary(parsed) == [(1, "M-1", 1, None), (2, "M-2", 2, None)]
    assert raised.value.reason == "malformed_xml: mismatched tag: line 5, column 36"


def test_a_document_whose_elements_are_not_records_is_rejected() -> None:
    with pytest.raises(FeedError, match=r"^no_records"):
        read("xml-no-records.xml")
    with pytest.raises(FeedError, match=r"^no_records: no <entry> record"):
        read_bytes(b"<inventory><item><sku>A</sku><qty>1</qty></item></inventory>", record="entry")


def test_an_empty_root_is_an_empty_delivery() -> None:
    assert read_bytes(b'<?xml version="1.0"?><inventory generated="2026-01-15"/>') == []


def test_a_record_error_keeps_the_element_as_read_for_dead_letters() -> None:
    [error] = read_bytes(
        b'<items><item id="7"><sku>A</sku><qty>1.5</qty><tag>a</tag><tag>b</tag></item></items>'
    )

    assert error == RecordError(
        1,
        "invalid_quantity: '1.5'",
        {"@id": "7", "sku": "A", "qty": "1.5", "tag": ["a", "b"]},
    )
    assert json.loads(json.dumps(error.raw)) == error.raw


@pytest.mark.parametrize("options", [{"record": ""}, {"fields": {"sku": "@id"}}])
def test_bad_options_are_refused_before_anything_is_read(options: dict[str, Any]) -> None:
    source = io.BytesIO(b"<items/>")

    with pytest.raises(ValueError, match=r"^bad_option"):
        parse("xml", source, options)
    assert source.tell() == 0


def generated_document(records: int, padding: str = "") -> Iterator[bytes]:
    yield b'<?xml version="1.0"?><inv:feed xmlns:inv="urn:acme"><inv:header/>'
    for start in range(0, records, 100):
        yield "".join(
            f'<inv:item sku="SKU-{n}"><inv:qty>{n % 500}</inv:qty>{padding}</inv:item>'
            for n in range(start, start + 100)
        ).encode()
    yield b"</inv:feed>"


def test_a_large_feed_is_parsed_while_it_is_still_being_read() -> None:
    records = 50_000  # 3 MB: some 190 reads of 16 KB
    source = source_from_chunks(generated_document(records))
    read_at: dict[int, int] = {}
    count = 0

    for count, item in enumerate(parse("xml", source), start=1):
        assert isinstance(item, Record)
        assert (item.position, item.quantity) == (count, (count - 1) % 500)
        if count == 1:
            first = weakref.ref(item)
        if count in (1, records // 2):
            read_at[count] = source.tell()
    del item
    gc.collect()

    total = source.tell()
    assert count == records
    assert read_at[1] < total / 20
    assert read_at[records // 2] < total * 0.6
    assert first() is None, "the parser keeps the records it yielded"


def test_elements_already_read_are_let_go_so_memory_stays_flat() -> None:
    padding = f"<inv:description>{'x' * 400}</inv:description>"
    size = sum(len(chunk) for chunk in generated_document(10_000, padding))

    tracemalloc.start()
    try:
        count = sum(
            1 for _ in parse("xml", source_from_chunks(generated_document(10_000, padding)))
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert count == 10_000
    assert peak < size / 10, f"peak {peak} bytes for a {size}-byte document"


def test_a_record_nested_deeper_than_python_recurses_is_refused_as_a_feed_error() -> None:
    inner = b"<x>" * 5000 + b"</x>" * 5000
    body = b"<items><item><sku>A</sku><quantity>1</quantity>" + inner + b"</item></items>"
    with pytest.raises(FeedError, match="too_deeply_nested"):
        list(parse("xml", io.BytesIO(body), {}))


@pytest.mark.alone
def test_elements_nested_past_64_levels_reject_the_file_at_once() -> None:
    """Found by a security review: 200,000 nested elements (1.4 MB) held the feed worker
    for hours, each end tag checked against every open element; 20,000 took 76 s."""
    deep = b"<inventory>" + b"<a>" * 20_000 + b"</a>" * 20_000 + b"</inventory>"
    started = time.monotonic()
    with pytest.raises(FeedError, match="too_deeply_nested: more than 64 levels"):
        read_bytes(deep)
    assert time.monotonic() - started < 1.0
    nested = b"<a>" * 60 + b"</a>" * 60
    shallow = b"<inventory>" + nested + b"<item><sku>A</sku><qty>1</qty></item></inventory>"
    assert summary(read_bytes(shallow)) == [(1, "A", 1, None)]


def test_a_unit_on_the_quantity_s_own_element_is_its_unit() -> None:
    """Found by a supplier integrator's walkthrough: `<Available uom="CS">2</Available>`
    read as 2 pieces, not 2 cases (24 with a case of 12), and nothing said so."""
    feed = (
        b'<inv:Items xmlns:inv="urn:x"><inv:Item sku="X2"><inv:Stock>'
        b'<inv:Available uom="CS">2</inv:Available></inv:Stock></inv:Item>'
        b'<inv:Item sku="X3"><inv:Qty unitOfMeasure="EA">5</inv:Qty></inv:Item>'
        b'<inv:Item sku="X4" uom="PAL"><inv:Qty uom="CS">1</inv:Qty></inv:Item></inv:Items>'
    )
    parsed = read_bytes(feed, fields={"quantity": ["Stock/Available", "Qty"]})
    # The record's own unit, where it names one, wins.
    assert summary(parsed) == [(1, "X2", 2, "CS"), (2, "X3", 5, "EA"), (3, "X4", 1, "PAL")]


def test_a_field_s_element_given_twice_refuses_its_record_not_the_first_read() -> None:
    """Found by a supplier integrator's walkthrough: `<stock location="east">10</stock>
    <stock location="west">5</stock>` read as 10, the second dropped unsaid; so were a
    second quantity and a second SKU. The record is refused, as CSV refuses a column given
    twice and EDI a QTY; repeated elements that give a field no value are no matter."""
    feed = (
        b"<items>"
        b'<item><sku>X-7</sku><stock location="east">10</stock>'
        b'<stock location="west">5</stock></item>'
        b"<item><sku>X-3</sku><sku>X-4</sku><qty>1</qty></item>"
        b"<item><sku>X-5</sku><qty>2</qty><image>a</image><image>b</image></item>"
        # Repeated wrappers that hold no value where a field looks (a review: refused).
        b"<item><sku>X-6</sku><available>5</available><stock><location>W1</location></stock>"
        b"<stock><location>W2</location></stock></item>"
        b"</items>"
    )
    parsed = read_bytes(feed)

    assert summary(parsed) == [
        (1, None, None, "repeated_field: stock has 2 values; a record has one"),
        (2, None, None, "repeated_field: sku has 2 values; a record has one"),
        (3, "X-5", 2, None),
        (4, "X-6", 5, None),
    ]
    refused = parsed[0]
    assert isinstance(refused, RecordError)
    assert refused.raw["stock"] == [
        {"@location": "east", "#text": "10"},
        {"@location": "west", "#text": "5"},
    ]


def test_a_unit_on_the_incoming_quantity_s_own_element_is_its_unit() -> None:
    """Found by a supplier integrator's walkthrough: `<Inbound><Qty uom="CS">1</Qty>` read
    as one piece. A second `<Inbound>` refuses the record (one entry a record is read)."""
    feed = (
        b'<Items><Item sku="I-1"><Available>4</Available>'
        b'<Inbound eta="2026-12-25"><Qty uom="CS">1</Qty></Inbound></Item>'
        b'<Item sku="I-2"><Available>4</Available><Inbound eta="2026-12-25"><Qty>1</Qty></Inbound>'
        b'<Inbound eta="2026-12-26"><Qty>2</Qty></Inbound></Item></Items>'
    )
    parsed = read_bytes(
        feed,
        fields={
            "quantity": "Available",
            "incoming_quantity": "Inbound/Qty",
            "expected_on": "Inbound/@eta",
        },
    )

    first = parsed[0]
    assert isinstance(first, Record)
    assert [(i.quantity, str(i.expected_on), i.unit) for i in first.incoming or ()] == [
        (1, "2026-12-25", "CS")
    ]
    assert summary(parsed)[1] == (
        2,
        None,
        None,
        "repeated_field: inbound/qty has 2 values; a record has one",
    )


def test_an_encoding_python_does_not_know_is_a_malformed_file() -> None:
    """Found by a fuzzing walkthrough: it failed the delivery eight times over, then left
    it failed, where a file that cannot be read is rejected with its reason."""
    body = b'<?xml version="1.0" encoding="x-bogus"?><items><item><sku>A</sku></item></items>'

    with pytest.raises(FeedError, match=r"^malformed_xml: unknown encoding: x-bogus"):
        list(parse("xml", io.BytesIO(body)))


def test_a_record_that_holds_one_of_its_own_name_is_read_not_dropped() -> None:
    """The inner `<product>`, ending first, decided the record's name, and the outer one
    that held it, a kit with its own stock, was dropped unsaid (a fuzzing walkthrough)."""
    data = (
        b"<products><product><sku>KIT</sku><qty>3</qty>"
        b"<parts><product><sku>P1</sku></product></parts></product>"
        b"<product><sku>B</sku><qty>2</qty></product></products>"
    )
    parsed = list(parse("xml", io.BytesIO(data), {}))

    kits = [p for p in parsed if isinstance(p, Record)]
    assert [(r.supplier_sku, r.quantity) for r in kits] == [("KIT", 3), ("B", 2)]
    refused = [p for p in parsed if not isinstance(p, Record)]
    assert [r.reason for r in refused] == ["missing_quantity"]
