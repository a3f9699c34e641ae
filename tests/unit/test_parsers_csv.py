"""The CSV feed parser, on fixture files of several dialects and on broken ones."""

from __future__ import annotations

import gc
import io
import json
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from connectors.parsers import FeedError, Parsed, Record, RecordError, parse, source_from_chunks

FEEDS = Path(__file__).resolve().parents[1] / "fixtures" / "feeds"


def read(name: str, **options: Any) -> list[Parsed]:
    with (FEEDS / name).open("rb") as source:
        return list(parse("csv", source, options))


def read_bytes(data: bytes, **options: Any) -> list[Parsed]:
    return list(parse("csv", io.BytesIO(data), options))


def records(parsed: list[Parsed]) -> list[Record]:
    assert all(isinstance(item, Record) for item in parsed), parsed
    return [item for item in parsed if isinstance(item, Record)]


def test_a_semicolon_feed_with_a_bom_and_crlf_lines_reads_every_row() -> None:
    parsed = records(
        read("csv-semicolon-bom-crlf.csv", thousands_separator=".", decimal_separator=",")
    )

    assert [(r.position, r.supplier_sku, r.upc, r.quantity, r.unit) for r in parsed] == [
        (1, "A-1", "4006381333931", 1200, "EA"),
        (2, "B;2", None, 12, "CS"),
        (3, "C-3", None, 7, None),
    ]
    assert parsed[0].observed_at == datetime(2026, 1, 15, 8, 0)
    assert parsed[1].observed_at == datetime(2026, 1, 15, 8, 5, tzinfo=timezone(timedelta(hours=1)))
    assert parsed[2].observed_at is None
    assert parsed[0].raw == {
        "Item No": "A-1",
        "EAN": "4006381333931",
        "Qty": "1.200",
        "UOM": "EA",
        "Updated At": "2026-01-15T08:00:00",
    }


def test_an_excel_sep_line_names_the_delimiter_and_is_not_the_header() -> None:
    data = b"\xef\xbb\xbfsep=;\r\nsku;qty;note\r\nA-1;5;a, b\r\nB-2;7;c\r\n"
    parsed = records(read_bytes(data))
    assert [(r.position, r.supplier_sku, r.quantity) for r in parsed] == [
        (1, "A-1", 5),
        (2, "B-2", 7),
    ]
    # A header with as many commas as pipes sniffs as commas; the line says otherwise.
    piped = b"sku|qty|remarks, if any, here\nA|3|x\n"
    with pytest.raises(FeedError, match="missing_column"):
        read_bytes(piped)
    assert records(read_bytes(b"sep=|\n" + piped))[0].quantity == 3


def test_tab_separated_quoted_fields_keep_their_newlines_tabs_and_quotes() -> None:
    parsed = records(read("csv-tab-quoted-newlines.tsv"))

    assert [(r.supplier_sku, r.quantity, r.unit) for r in parsed] == [
        ("T-1", 5, "EA"),
        ("T-2", 0, "PK"),
    ]
    assert parsed[0].raw["description"] == 'Blue widget,\nwith a "tab":\t!'


@pytest.mark.parametrize("header", ["Part No,QOH", "Article,Available Qty"])
def test_common_distribution_headers_are_read_without_columns(header: str) -> None:
    # Missing `quantity` column, both, until a supplier integrator's walkthrough.
    [record] = records(read_bytes(f"{header}\nP-7,12\n".encode()))

    assert (record.supplier_sku, record.quantity) == ("P-7", 12)


def test_the_columns_option_maps_a_supplier_s_own_headers() -> None:
    parsed = records(
        read(
            "csv-custom-headers.csv",
            columns={
                "supplier_sku": "Artikelnummer",
                "quantity": ["Bestand", "Menge"],
                "unit": "ME",
                "observed_at": "Zeitstempel",
            },
            timestamp_format="%d.%m.%Y %H:%M",
        )
    )

    assert [(r.supplier_sku, r.quantity, r.unit, r.observed_at) for r in parsed] == [
        ("K-100", 250, "ST", datetime(2026, 1, 15, 14, 30)),
        ("K-200", 1000, "ST", datetime(2026, 1, 15, 14, 31)),
    ]


def test_bad_rows_are_record_errors_while_good_rows_still_come_through() -> None:
    parsed = read("csv-bad-quantities.csv")

    good = [(p.position, p.supplier_sku, p.quantity) for p in parsed if isinstance(p, Record)]
    bad = [(p.position, p.reason) for p in parsed if isinstance(p, RecordError)]
    assert good == [(1, "G-1", 10), (6, "G-2", 42), (7, "G-3", 12), (10, "G-4", -2)]
    assert bad == [
        (2, "invalid_quantity: '12.5'"),
        (3, "missing_quantity"),
        (4, "invalid_quantity: 'abc'"),
        (5, "invalid_quantity: '1,200'"),
        (8, "wrong_field_count: expected 3, got 4"),
        (9, "missing_identifier"),
    ]
    assert parsed[7].raw == {"sku": "B-5", "qty": "3", "unit": "EA", "_extra": ["extra"]}
    assert json.loads(json.dumps([p.raw for p in parsed]))[0] == {
        "sku": "G-1",
        "qty": "10",
        "unit": "EA",
    }


@pytest.mark.parametrize(
    ("written", "options", "expected"),
    [
        ("12", {}, 12),
        ("  12  ", {}, 12),
        ("12.0", {}, 12),
        ("+3", {}, 3),
        ("1,200", {"thousands_separator": ","}, 1200),
        ("1 234 567", {"thousands_separator": " "}, 1234567),
        ("1200", {"thousands_separator": ","}, 1200),
        ("1.200,00", {"thousands_separator": ".", "decimal_separator": ","}, 1200),
    ],
)
def test_quantities_are_read_as_whole_numbers(
    written: str, options: dict[str, str], expected: int
) -> None:
    [record] = records(read_bytes(f'sku;qty\nA;"{written}"\n'.encode(), **options))

    assert record.quantity == expected


@pytest.mark.parametrize(
    ("written", "options"),
    [
        ("12.5", {}),
        ("1,200", {}),
        ("12,00", {"thousands_separator": ","}),
        ("1e3", {}),
        ("twelve", {}),
        ("12.0", {"decimal_separator": ","}),
        ("٣", {}),  # digits of other scripts: an integrator's walkthrough found "٣" read as 3
        ("\uff11\uff12", {}),  # fullwidth 12
        ("1,٢00", {"thousands_separator": ","}),
    ],
)
def test_quantities_that_are_not_whole_numbers_are_named_in_the_reason(
    written: str, options: dict[str, str]
) -> None:
    [error] = read_bytes(f'sku;qty\nA;"{written}"\n'.encode(), **options)

    assert error == RecordError(1, f"invalid_quantity: {written!r}", {"sku": "A", "qty": written})


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_each_common_delimiter_is_sniffed_from_the_header(delimiter: str) -> None:
    data = delimiter.join(["SKU", "Description", "On Hand"]) + "\n"
    data += delimiter.join(["A-1", '"one, two; three | four\tfive"', "3"]) + "\n"

    [record] = records(read_bytes(data.encode()))

    assert (record.supplier_sku, record.quantity) == ("A-1", 3)
    assert record.raw["Description"] == "one, two; three | four\tfive"


def test_a_given_delimiter_wins_over_sniffing() -> None:
    data = b"sku;qty;notes,remarks,more\nA;4;x,y,z\n"

    [record] = records(read_bytes(data, delimiter=";"))

    assert (record.supplier_sku, record.quantity) == ("A", 4)
    with pytest.raises(FeedError, match="missing_column"):
        read_bytes(data)


def test_a_feed_without_a_quantity_column_is_rejected_whole() -> None:
    with pytest.raises(FeedError) as raised:
        read("csv-missing-quantity-column.csv")

    assert raised.value.reason == (
        "missing_column: no quantity column in ['sku', 'description', 'price']"
    )


def test_a_feed_without_a_sku_or_upc_column_is_rejected_whole() -> None:
    with pytest.raises(FeedError, match=r"^missing_column: no supplier_sku or upc column"):
        read("csv-missing-identifier-column.csv")


def test_a_upc_column_alone_identifies_the_records() -> None:
    [record] = records(read_bytes(b"GTIN,Available\n00012345678905,9\n"))

    assert (record.supplier_sku, record.upc, record.quantity) == (None, "00012345678905", 9)


def test_an_empty_feed_is_rejected_whole() -> None:
    with pytest.raises(FeedError, match=r"^missing_header"):
        read_bytes(b"\r\n\r\n")


def test_a_header_only_feed_has_no_records() -> None:
    assert read_bytes(b"sku,qty\r\n") == []


def test_an_unclosed_quote_rejects_the_feed() -> None:
    with pytest.raises(FeedError, match=r"^malformed_csv"):
        read_bytes(b'sku,qty\nA,1\n"B,2\n')


def test_bytes_outside_the_encoding_reject_the_feed_unless_the_encoding_is_given() -> None:
    data = "sku,name,qty\nA,Mütze,1\n".encode("latin-1")

    with pytest.raises(FeedError, match=r"^bad_encoding"):
        read_bytes(data)
    [record] = records(read_bytes(data, encoding="latin-1"))
    assert record.raw["name"] == "Mütze"


def test_an_unreadable_timestamp_is_a_record_error_and_a_utc_one_stays_aware() -> None:
    data = b"sku,qty,as_of\nA,1,yesterday\nB,2,2026-01-15T14:30:00Z\nC,3,2026-01-15t14:30:00z\n"
    parsed = read_bytes(data)

    assert isinstance(parsed[0], RecordError)
    assert parsed[0].reason == "invalid_observed_at: 'yesterday'"
    assert isinstance(parsed[1], Record)
    assert parsed[1].observed_at == datetime(2026, 1, 15, 14, 30, tzinfo=UTC)
    assert isinstance(parsed[2], Record)  # RFC 3339's small letters
    assert parsed[2].observed_at == parsed[1].observed_at


@pytest.mark.parametrize(
    "options",
    [
        {"delimiter": ";;"},
        {"encoding": "no-such-codec"},
        {"columns": {"sku": "Artikel"}},
        {"columns": {"quantity": 3}},
        {"thousands_separator": ".", "decimal_separator": "."},
    ],
)
def test_bad_options_are_refused_before_anything_is_read(options: dict[str, Any]) -> None:
    source = io.BytesIO(b"sku,qty\nA,1\n")

    with pytest.raises(ValueError, match=r"^bad_option"):
        parse("csv", source, options)
    assert source.tell() == 0


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        parse("yaml", io.BytesIO(b""))  # type: ignore[arg-type]


def test_the_source_stays_open_after_parsing() -> None:
    source = io.BytesIO(b"sku,qty\nA,1\n")

    assert len(list(parse("csv", source))) == 1
    assert not source.closed


ROWS = 200_000


def generated_rows() -> Iterator[bytes]:
    yield b"sku;qty;unit\r\n"
    for start in range(0, ROWS, 1000):
        yield "".join(f"SKU-{n};{n % 500};EA\r\n" for n in range(start, start + 1000)).encode()


def test_a_large_feed_is_parsed_while_it_is_still_being_read() -> None:
    source = source_from_chunks(generated_rows())
    read_at: dict[int, int] = {}
    count = 0

    for count, item in enumerate(parse("csv", source), start=1):
        assert isinstance(item, Record)
        assert item.position == count
        if count == 1:
            first = weakref.ref(item)
        if count in (1, ROWS // 2):
            read_at[count] = source.tell()
    del item
    gc.collect()

    total = source.tell()
    assert count == ROWS
    assert read_at[1] < total / 20
    assert read_at[ROWS // 2] < total * 0.6
    assert first() is None, "the parser keeps the records it yielded"


def test_a_quantity_of_thousands_of_digits_is_refused_alone() -> None:
    """Found by a security review: 5,000 nines raised Python's conversion limit, and the
    whole delivery failed (retried eight times) instead of that record alone."""
    huge = "9" * 5000
    parsed = read_bytes(f"sku,qty\nA1,5\nA2,{huge}\nA3,{'1' * 19}\nA4,7\n".encode())
    assert [(p.position, getattr(p, "quantity", None)) for p in parsed] == [
        (1, 5),
        (2, None),
        (3, None),
        (4, 7),
    ]
    assert isinstance(parsed[1], RecordError)
    assert parsed[1].reason == "quantity_out_of_range"
    assert isinstance(parsed[2], RecordError)
    assert parsed[2].reason == "quantity_out_of_range"  # past a 64-bit level


def test_a_round_thousand_written_the_european_way_is_not_read_as_one() -> None:
    """Found by a supplier integrator's walkthrough: with no options, "1.000" read as 1
    (while "1.500" was refused): a European feed lost a factor of a thousand on round
    thousands, and nothing said so. Named separators decide it."""
    body = b"sku;qty\nG1;1.000\nG2;12.0\nG3;1500.000\n"
    unsaid = read_bytes(body)
    assert isinstance(unsaid[0], RecordError)
    assert unsaid[0].reason.startswith("ambiguous_quantity: ")
    assert [getattr(p, "quantity", None) for p in unsaid[1:]] == [12, 1500]
    european = records(
        read_bytes(b"sku;qty\nG1;1.000\nG2;12,0\n", thousands_separator=".", decimal_separator=",")
    )
    assert [r.quantity for r in european] == [1000, 12]
    decimal = records(read_bytes(body, decimal_separator="."))
    assert [r.quantity for r in decimal] == [1, 12, 1500]


@pytest.mark.parametrize(
    "header", ["supplier_sku,supplier_sku,quantity", "sku,quantity,Quantity,unit"]
)
def test_a_column_we_read_named_twice_rejects_the_file(header: str) -> None:
    """Found by a fuzzing walkthrough: the first was read, the other's values dropped
    with no word (a case count in the second quantity column, its unit lost)."""
    body = f"{header}\nA1,B2,5,CS\n".encode()

    with pytest.raises(FeedError, match=r"^duplicate_column: "):
        list(parse("csv", io.BytesIO(body)))


@pytest.mark.parametrize(
    ("format", "data"),
    [
        ("csv", b"Sku;Qty;UoM\r\nC2;2;CS\r\n"),
        ("json", b'[{"Sku": "C2", "Qty": 2, "UoM": "CS"}]'),
        ("xml", b"<Items><Item><Sku>C2</Sku><Qty>2</Qty><UoM>CS</UoM></Item></Items>"),
        ("xml", b'<Items><Item><Sku>C2</Sku><Qty UoM="CS">2</Qty></Item></Items>'),
    ],
)
def test_a_unit_named_in_mixed_case_is_read_in_every_format(format: str, data: bytes) -> None:
    """`UoM` split at its case read `uo_m`, which is no name of the unit: its cases were
    read as pieces, and their quantities went past the supplier's ceiling (a walkthrough)."""
    parsed = list(parse(format, io.BytesIO(data), {}))
    assert [(r.supplier_sku, r.quantity, r.unit) for r in records(parsed)] == [("C2", 2, "CS")]


def test_a_column_the_options_name_must_be_in_the_header() -> None:
    """A supplier that renamed its `Einheit` and `Stand` columns had its cases read as
    pieces and its times as the time of receipt, unsaid (a walkthrough)."""
    data = b"sku,qty,unit,timestamp\nM1,3,CS,2026-12-07T20:00Z\n"
    with pytest.raises(FeedError, match=r"missing_column: .*unit \('Einheit'\); observed_at"):
        read_bytes(data, columns={"unit": "Einheit", "observed_at": "Stand"})
    with pytest.raises(FeedError, match=r"missing_column: .*unit \('Einheit' or 'Unit'\)"):
        read_bytes(data.replace(b"unit", b"UoM"), columns={"unit": ["Einheit", "Unit"]})
    # Any one of a list of names will do.
    parsed = records(read_bytes(data, columns={"unit": ["Einheit", "Unit"]}))
    assert [(r.supplier_sku, r.quantity, r.unit) for r in parsed] == [("M1", 3, "CS")]
    # Not an identifier where the other is found, nor the incoming stock, which a file
    # may leave out (a review).
    optional = {"upc": "EAN", "incoming_quantity": "On Order", "expected_on": "ETA"}
    parsed = records(read_bytes(data, columns=optional))
    assert [(r.supplier_sku, r.quantity, r.incoming) for r in parsed] == [("M1", 3, None)]


def test_a_thousands_separator_of_a_point_alone_says_to_set_the_decimal_one() -> None:
    """It said it "equals decimal_separator", which the supplier never set (a walkthrough)."""
    with pytest.raises(ValueError, match=r"\('\.' unless set\): set decimal_separator too"):
        read_bytes(b"sku;qty\nG1;1.000\n", thousands_separator=".")
    with pytest.raises(ValueError, match=r"equals decimal_separator: set decimal_separator"):
        read_bytes(b"sku;qty\nG1;1,000\n", thousands_separator=",", decimal_separator=",")


@pytest.mark.parametrize("encoding", ["rot13", "hex", "base64", "no-such-codec"])
def test_an_encoding_that_reads_no_text_is_refused_as_an_option(encoding: str) -> None:
    """`rot13`, `hex` and `base64` were saved, and every delivery then failed (a fuzzing
    walkthrough)."""
    for format in ("csv", "edi846"):
        with pytest.raises(ValueError, match=r"bad_option: .* is no text encoding"):
            list(parse(format, io.BytesIO(b"sku,qty\nA,1\n"), {"encoding": encoding}))


@pytest.mark.parametrize("format", ["csv", "edi846"])
def test_a_file_its_encoding_cannot_read_is_rejected_saying_so(format: str) -> None:
    """UTF-16 without its byte order mark failed deliveries with a UnicodeError, eight times
    over, where bytes not in the encoding are rejected as `bad_encoding`."""
    with pytest.raises(FeedError, match=r"^bad_encoding: not utf-16"):
        list(
            parse(format, io.BytesIO("sku,qty\nA,1\n".encode("utf-16-le")), {"encoding": "utf-16"})
        )


@pytest.mark.parametrize("encoding", ["shift_jis", "utf-32", "euc-jp"])
def test_an_xml_declaration_of_an_encoding_expat_cannot_read_is_malformed(encoding: str) -> None:
    """`multi-byte encodings are not supported` failed the delivery eight times over."""
    data = f'<?xml version="1.0" encoding="{encoding}"?><items><item><sku>A</sku></item></items>'
    with pytest.raises(FeedError, match=r"^malformed_xml: "):
        list(parse("xml", io.BytesIO(data.encode(encoding)), {}))
