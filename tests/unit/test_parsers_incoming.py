"""Stock a supplier expects, from CSV, JSON and XML feeds: one entry a record, from the
fields the supplier's settings name (never guessed from common names)."""

from __future__ import annotations

import io
from datetime import date
from typing import Any

from connectors.parsers import parse
from connectors.parsers.records import Incoming, Parsed, Record, RecordError

CSV_COLUMNS = {"columns": {"incoming_quantity": "on_order", "expected_on": "eta"}}


def parsed(format: str, body: str, options: dict[str, Any] | None = None) -> list[Parsed]:
    return list(parse(format, io.BytesIO(body.encode()), options or {}))  # type: ignore[arg-type]


def incoming(item: Parsed) -> tuple[Incoming, ...] | None:
    assert isinstance(item, Record), item
    return item.incoming


def test_a_csv_row_says_what_it_expects_nothing_or_that_it_expects_none() -> None:
    rows = parsed(
        "csv",
        "sku,qty,unit,on_order,eta\r\n"
        "A,5,EA,40,2027-01-10\r\n"
        "B,3,CS,,\r\n"
        "C,1,EA,0,\r\n"
        "D,1,EA,12,\r\n"
        "E,1,EA,7,2027-01-10T08:00:00+02:00\r\n",
        CSV_COLUMNS,
    )
    assert [incoming(row) for row in rows] == [
        (Incoming(40, date(2027, 1, 10)),),
        None,  # blank: the schedule on record stands
        (),  # none expected
        (Incoming(12, None),),
        (Incoming(7, date(2027, 1, 10)),),
    ]
    assert rows[1].unit == "CS"  # type: ignore[union-attr]


def test_an_unreadable_incoming_quantity_or_date_refuses_its_row_alone() -> None:
    rows = parsed(
        "csv",
        "sku,qty,incoming_quantity,expected_on\nA,5,many,2027-01-10\nB,5,4,soon\nC,5,4,2027-02-30\n"
        "D,5,4,2027-01-11\n",
        {"columns": {"incoming_quantity": "incoming_quantity", "expected_on": "expected_on"}},
    )
    assert [row.reason for row in rows[:3]] == [  # type: ignore[union-attr]
        "invalid_incoming_quantity: 'many'",
        "invalid_expected_on: 'soon'",
        "invalid_expected_on: '2027-02-30'",
    ]
    assert all(isinstance(row, RecordError) for row in rows[:3])
    assert incoming(rows[3]) == (Incoming(4, date(2027, 1, 11)),)


def test_a_supplier_names_its_own_incoming_columns() -> None:
    options = {
        "columns": {
            "supplier_sku": "Artikel",
            "quantity": "Menge",
            "incoming_quantity": "Zulauf",
            "expected_on": "Termin",
        }
    }
    rows = parsed("csv", "Artikel;Menge;Zulauf;Termin;eta\nA;5;24;2027-03-01;2027-01-01\n", options)
    assert incoming(rows[0]) == (Incoming(24, date(2027, 3, 1)),)


def test_columns_of_common_incoming_names_are_ignored_unless_named_in_the_settings() -> None:
    """A supplier's export may have long carried ETA and On Order columns in forms of its
    own: they never turn its records into refusals by themselves."""
    body = "sku,qty,on_order,eta\nA,5,N/A,05/12/2025\n"
    assert incoming(parsed("csv", body)[0]) is None
    assert parsed("csv", body)[0].quantity == 5  # type: ignore[union-attr]
    assert isinstance(parsed("csv", body, CSV_COLUMNS)[0], RecordError)


def test_an_expected_date_may_be_written_as_the_supplier_writes_its_times() -> None:
    options = {**CSV_COLUMNS, "timestamp_format": "%d/%m/%Y %H:%M"}
    rows = parsed("csv", "sku,qty,on_order,eta\nA,5,3,05/12/2026 00:00\n", options)
    assert incoming(rows[0]) == (Incoming(3, date(2026, 12, 5)),)


def test_a_json_record_says_what_it_expects_flat_or_nested() -> None:
    rows = parsed(
        "json",
        '{"items": ['
        '{"sku": "A", "qty": 5, "incoming": {"quantity": 40, "date": "2027-01-10"}},'
        '{"sku": "B", "qty": 5, "on_order": 6, "eta": "2027-01-12"},'
        '{"sku": "C", "qty": 5, "on_order": null},'
        '{"sku": "D", "qty": 5}'
        "]}",
        {
            "fields": {
                "incoming_quantity": ["incoming.quantity", "on_order"],
                "expected_on": ["incoming.date", "eta"],
            }
        },
    )
    assert [incoming(row) for row in rows] == [
        (Incoming(40, date(2027, 1, 10)),),
        (Incoming(6, date(2027, 1, 12)),),
        None,
        None,
    ]


def test_an_xml_record_says_what_it_expects() -> None:
    rows = parsed(
        "xml",
        "<inventory>"
        "<item><sku>A</sku><qty>5</qty><on_order>40</on_order><eta>2027-01-10</eta></item>"
        "<item><sku>B</sku><qty>5</qty><on_order>0</on_order></item>"
        "<item><sku>C</sku><qty>5</qty></item>"
        "</inventory>",
        {"fields": {"incoming_quantity": "on_order", "expected_on": "eta"}},
    )
    assert [incoming(row) for row in rows] == [(Incoming(40, date(2027, 1, 10)),), (), None]
