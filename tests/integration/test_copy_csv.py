"""CSV deliveries loaded by COPY give exactly what reading them in Python gives.

Each body is ingested twice, for two suppliers with the same mappings and terms: once
from a seekable file (COPY where it can) and once from a stream that cannot seek (always
read in Python). Counts, refusals (reason, position, dead letter) and the levels recorded
must be the same, and the test checks which way each delivery was read.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from api.runtime import Runtime, open_runtime
from api.settings import Settings
from connectors.ingest import FeedRejected, IngestResult, content_hash
from connectors.parsers import source_from_chunks
from tests.integration.test_ingest import setup_supplier

SKUS = {"S1": "C-1", "S2": "C-2", "S3": "C-3", "S4": "C-4", "Ü5": "C-5", "S 6": "C-6"}
TERMS: dict[str, Any] = {"timezone": "Europe/Berlin", "connector": {"units": {"CS": 12}}}


@pytest.fixture(scope="module")
def ledger(postgres_server_url: str) -> Iterator[Runtime]:
    from tests.conftest import fresh_database, make_settings

    with fresh_database(postgres_server_url) as url:
        settings: Settings = make_settings(url)
        runtime = open_runtime(settings, sweep=False, connect=False)
        try:
            yield runtime
        finally:
            runtime.close()


def both_ways(
    ledger: Runtime, body: bytes, terms: dict[str, Any] = TERMS
) -> tuple[IngestResult, IngestResult]:
    """Ingests body for a fresh pair of suppliers: by COPY where possible, and in Python."""
    pair = f"{content_hash(body)[:10]}-{datetime.now(UTC).timestamp()}"
    results = []
    for name, source in (
        ("copy", io.BytesIO(body)),
        ("python", source_from_chunks([body[i : i + 7] for i in range(0, len(body), 7)])),
    ):
        supplier = f"{name}-{pair}"
        setup_supplier(ledger, supplier, SKUS, **terms)
        results.append(
            ledger.ingestor.ingest(
                supplier,
                f"d-{pair}",
                source,
                "csv",
                source="test",
                received_at=RECEIVED,
                actor="test",
            )
        )
    by_copy, in_python = results
    assert in_python.read_by == "python"
    assert summary(by_copy) == summary(in_python)
    assert levels(ledger, f"copy-{pair}") == levels(ledger, f"python-{pair}")
    return by_copy, in_python


def summary(result: IngestResult) -> dict[str, Any]:
    return {
        "rows": result.rows,
        "applied": result.applied,
        "unchanged": result.unchanged,
        "late": result.late,
        "rejections": [r.as_dict() for r in result.rejections],
    }


def levels(ledger: Runtime, supplier: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(ledger.database_url) as conn:
        return conn.execute(
            "SELECT sku, quantity, observed_at FROM inventoryledger_levels"
            " WHERE supplier_id = %s ORDER BY sku",
            (supplier,),
        ).fetchall()


RECEIVED = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
NAIVE = (RECEIVED - timedelta(minutes=30)).replace(tzinfo=None).isoformat()
AWARE = (RECEIVED - timedelta(minutes=20)).isoformat()
FUTURE = (RECEIVED + timedelta(days=2)).isoformat()


def test_a_plain_delivery_is_loaded_by_copy_with_every_refusal_as_in_python(
    ledger: Runtime,
) -> None:
    body = (
        "sku,upc,quantity,unit,observed_at\r\n"
        f"S1,,5,EA,{AWARE}\r\n"
        f"S2,,2,CS,{NAIVE}\r\n"  # a naive time is in the supplier's zone; a case is 12
        f"S3,,7,,\r\n"  # no unit (the mapping's), no time (received)
        f"S4,,12.0,EA,{AWARE}\r\n"  # read in Python: a whole number with decimals
        f"Ü5,, 9 ,EA,{AWARE}\r\n"  # read in Python: not ASCII, spaces around the quantity
        f"S 6,,3,ea,{AWARE}\r\n"
        f"S1 ,,4,EA,{NAIVE}\r\n"  # trimmed, S1 again, older: superseded
        f"NOPE,,1,EA,{AWARE}\r\n"  # unmapped
        f"S2,,-1,EA,{AWARE}\r\n"  # negative
        f"S3,,abc,EA,{AWARE}\r\n"  # not a number
        f"S4,,1,BOX,{AWARE}\r\n"  # unknown unit
        f"S4,,1,EA,{FUTURE}\r\n"  # in the future
        f"S4,,1,EA,yesterday\r\n"  # unreadable time
        f",,1,EA,{AWARE}\r\n"  # no identifier
        f"S2,,99999999999999999999,EA,{AWARE}\r\n"  # beyond any ceiling
        f"S3,,10000000,CS,{AWARE}\r\n"  # within the ceiling in cases, beyond it in units
    ).encode()
    by_copy, _ = both_ways(ledger, body)
    assert by_copy.read_by == "copy"
    assert by_copy.rows == 16
    reasons = {r.index: r.reason.split(":")[0] for r in by_copy.rejections}
    assert reasons == {
        8: "unmapped_supplier_sku",
        9: "negative_quantity",
        10: "invalid_quantity",
        11: "unknown_unit",
        12: "observed_at_in_future",
        13: "invalid_observed_at",
        14: "missing_identifier",
        15: "quantity_out_of_range",
        16: "quantity_out_of_range",
    }
    assert by_copy.applied == 6


def test_the_quantity_ceiling_holds_to_the_unit_by_copy_as_in_python(ledger: Runtime) -> None:
    ceiling = {**TERMS, "connector": {"units": {"CS": 12}, "max_quantity": 100}}
    body = (
        b"sku,quantity,unit\n"
        b"S1,8,CS\n"  # 96 pieces
        b"S2,9,CS\n"  # 108 pieces: beyond
        b"S3,100,EA\n"  # at the ceiling
        b"S4,101,EA\n"  # beyond
    )
    by_copy, _ = both_ways(ledger, body, ceiling)
    assert by_copy.read_by == "copy"
    assert {r.index: r.reason for r in by_copy.rejections} == {
        2: "quantity_out_of_range",
        4: "quantity_out_of_range",
    }
    assert by_copy.applied == 2


@pytest.mark.parametrize(
    ("name", "body", "read_by"),
    [
        ("byte-order mark, semicolons, LF", "\ufeffSKU;Qty;Unit\nS1;5;EA\nS2;6;CS\n", "copy"),
        ("blank lines before the header", "\n \nsku,qty\nS1,5\nS2,6", "copy"),
        ("no newline at the end", "sku,qty\nS1,5\nS2,6", "copy"),
        ("a quoted field", 'sku,qty\n"S1",5\nS2,6\n', "python"),
        ("a blank row inside", "sku,qty\nS1,5\n\nS2,6\n", "python"),
        ("a row of empty fields", "sku,qty\nS1,5\n,\nS2,6\n", "python"),
        ("a short row", "sku,qty,unit\nS1,5,EA\nS2,6\n", "python"),
        ("a long row", "sku,qty\nS1,5\nS2,6,EA\n", "python"),
        ("a backslash-dot line", "sku,qty\nS1,5\n\\.\nS2,6\n", "python"),
        ("tab delimited, CRLF", "sku\tqty\r\nS1\t5\r\nS2\t6\r\n", "copy"),
        ("mixed line ends", "sku,qty\r\nS1,5\nS2,6\r\n", "python"),
        # Quantities int() reads that SQL leaves to Python: the rows come back to it.
        ("a sign, underscores, Arabic-Indic digits", "sku,qty\nS1,+5\nS2,1_2\nS3,\u0663\n", "copy"),
        ("nineteen digits, zeros first", "sku,qty\nS1,0000000000000000007\nS2,6\n", "copy"),
    ],
)
def test_a_delivery_copy_cannot_vouch_for_is_read_in_python_with_the_same_outcome(
    ledger: Runtime, name: str, body: str, read_by: str
) -> None:
    by_copy, _ = both_ways(ledger, body.encode())
    assert by_copy.read_by == read_by, name
    assert by_copy.rows >= 2


def test_a_broken_file_is_refused_whole_either_way(ledger: Runtime) -> None:
    body = b"sku,qty\nS1,5\nS2,\xff\xfe\n"
    for source in (io.BytesIO(body), source_from_chunks([body])):
        supplier = f"broken-{datetime.now(UTC).timestamp()}"
        setup_supplier(ledger, supplier, SKUS, **TERMS)
        with pytest.raises(FeedRejected, match="bad_encoding"):
            ledger.ingestor.ingest(
                supplier, "d", source, "csv", source="test", received_at=RECEIVED, actor="t"
            )
        assert levels(ledger, supplier) == []


def test_a_large_delivery_by_copy_matches_python_row_for_row(ledger: Runtime) -> None:
    lines = ["sku,upc,quantity,unit,observed_at"]
    for i in range(30_000):
        sku = list(SKUS)[i % len(SKUS)] if i % 1000 == 0 else f"X{i}"
        quantity = f" {i % 97}" if i % 2 else f"{i % 97}"  # half of them read in Python
        lines.append(f"{sku},,{quantity},{'CS' if i % 3 else 'EA'},{AWARE}")
    by_copy, _ = both_ways(ledger, ("\n".join(lines) + "\n").encode())
    assert by_copy.read_by == "copy"
    assert by_copy.rows == 30_000
