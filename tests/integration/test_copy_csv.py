"""CSV deliveries loaded by COPY give exactly what reading them in Python gives.

Each body is ingested three times, for three suppliers with the same mappings and terms:
from a seekable file (COPY where it can), the same split into shares read on several
connections at once (as a large delivery is), and from a stream that cannot seek (always
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
from connectors.ingest import Ingestor, content_hash
from connectors.outcome import FeedRejected, IngestResult
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
    ledger: Runtime, body: bytes, terms: dict[str, Any] = TERMS, *, before: bytes = b""
) -> tuple[IngestResult, IngestResult, IngestResult]:
    """Ingests body for a fresh trio of suppliers: by COPY where possible, whole and in
    shares, and in Python; returns the three results. `before`: a delivery each supplier
    had before."""
    pair = f"{content_hash(body)[:10]}-{datetime.now(UTC).timestamp()}"
    # However small the delivery, in as many shares as it has lines for, up to three.
    in_shares = Ingestor(
        ledger.writer, ledger.store, ledger.views, read_connections=3, split_from_bytes=0
    )
    results = []
    for name, source, ingestor in (
        ("copy", io.BytesIO(body), ledger.ingestor),
        ("shares", io.BytesIO(body), in_shares),
        ("python", source_from_chunks([body[i : i + 7] for i in range(0, len(body), 7)]), None),
    ):
        supplier = f"{name}-{pair}"
        setup_supplier(ledger, supplier, SKUS, **terms)
        if before:
            ledger.ingestor.ingest(
                supplier,
                "before",
                io.BytesIO(before),
                "csv",
                source="test",
                received_at=RECEIVED,
                actor="test",
            )
        results.append(
            (ingestor or ledger.ingestor).ingest(
                supplier,
                f"d-{pair}",
                source,
                "csv",
                source="test",
                received_at=RECEIVED,
                actor="test",
            )
        )
    by_copy, by_shares, in_python = results
    assert in_python.read_by == "python"
    # Every delivery here has lines enough for two shares at least.
    assert (by_copy.shares, by_shares.shares > 1) == (1, by_shares.read_by == "copy")
    assert summary(by_copy) == summary(by_shares) == summary(in_python)
    assert (
        levels(ledger, f"copy-{pair}")
        == levels(ledger, f"shares-{pair}")
        == levels(ledger, f"python-{pair}")
    )
    return by_copy, by_shares, in_python


def summary(result: IngestResult) -> dict[str, Any]:
    return {
        "rows": result.rows,
        "applied": result.applied,
        "unchanged": result.unchanged,
        "late": result.late,
        "rejections": sorted(
            (r.as_dict() for r in result.rejections), key=lambda r: (r["index"], r["reason"])
        ),
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
    by_copy, by_shares, _ = both_ways(ledger, body)
    assert by_copy.read_by == by_shares.read_by == "copy"
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
    by_copy, by_shares, _ = both_ways(ledger, body, ceiling)
    assert by_copy.read_by == by_shares.read_by == "copy"
    assert {r.index: r.reason for r in by_copy.rejections} == {
        2: "quantity_out_of_range",
        4: "quantity_out_of_range",
    }
    assert by_copy.applied == 2


@pytest.mark.parametrize(
    ("name", "body", "read_by", "in_shares"),
    [
        (
            "byte-order mark, semicolons, LF",
            "\ufeffSKU;Qty;Unit\nS1;5;EA\nS2;6;CS\n",
            "copy",
            "copy",
        ),
        ("blank lines before the header", "\n \nsku,qty\nS1,5\nS2,6", "copy", "copy"),
        ("no newline at the end", "sku,qty\nS1,5\nS2,6", "copy", "copy"),
        ("a quoted field", 'sku,qty\n"S1",5\nS2,6\n', "python", "python"),
        ("a quoted field, last", 'sku,qty\nS1,5\nS2,6\nS3,"7"\n', "python", "python"),
        ("a blank row inside", "sku,qty\nS1,5\n\nS2,6\n", "python", "python"),
        ("a row of empty fields", "sku,qty\nS1,5\n,\nS2,6\n", "python", "python"),
        ("a short row", "sku,qty,unit\nS1,5,EA\nS2,6\n", "python", "python"),
        ("a long row", "sku,qty\nS1,5\nS2,6,EA\n", "python", "python"),
        ("a backslash-dot line", "sku,qty\nS1,5\n\\.\nS2,6\n", "python", "python"),
        ("tab delimited, CRLF", "sku\tqty\r\nS1\t5\r\nS2\t6\r\n", "copy", "copy"),
        # COPY refuses line ends that change within what it reads; each share has one kind.
        ("mixed line ends", "sku,qty\r\nS1,5\nS2,6\r\n", "python", "copy"),
        # Quantities int() reads that SQL leaves to Python: the rows come back to it.
        (
            "a sign, underscores, Arabic-Indic digits",
            "sku,qty\nS1,+5\nS2,1_2\nS3,\u0663\n",
            "copy",
            "copy",
        ),
        ("nineteen digits, zeros first", "sku,qty\nS1,0000000000000000007\nS2,6\n", "copy", "copy"),
    ],
)
def test_a_delivery_copy_cannot_vouch_for_is_read_in_python_with_the_same_outcome(
    ledger: Runtime, name: str, body: str, read_by: str, in_shares: str
) -> None:
    by_copy, by_shares, _ = both_ways(ledger, body.encode())
    assert (by_copy.read_by, by_shares.read_by) == (read_by, in_shares), name
    assert by_copy.rows >= 2


def test_records_of_one_sku_in_different_shares_reach_the_ledger_together(
    ledger: Runtime,
) -> None:
    """A SKU reported again in another share is not judged by that share alone: its
    records go to the ledger together, as from a delivery read whole (here they disagree
    at the same time, so both are refused, and the level on record stays)."""
    before = f"sku,qty,observed_at\nS1,5,{NAIVE}\nS2,6,{NAIVE}\nS3,7,{NAIVE}\n".encode()
    body = (
        f"sku,qty,observed_at\nS1,5,{AWARE}\nS2,6,{AWARE}\nS3,7,{AWARE}\nS4,8,{AWARE}\n"
        f"S2,6,{AWARE}\nS1,9,{AWARE}\n"  # S2 agrees with itself, S1 does not
    ).encode()
    by_copy, by_shares, _ = both_ways(ledger, body, before=before)
    assert (by_copy.read_by, by_shares.read_by, by_shares.shares) == ("copy", "copy", 3)
    assert {r.index: r.reason for r in by_shares.rejections} == {
        1: "conflicting_duplicate",
        6: "conflicting_duplicate",
    }
    # Their letters keep what the supplier wrote, found in the share that staged each.
    assert [
        (r.record["fields"]["supplier_sku"], r.record["fields"]["quantity"])
        for r in by_shares.rejections
        if r.record is not None
    ] == [("S1", 5), ("S1", 9)]
    assert (by_shares.applied, by_shares.unchanged) == (1, 3)


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
    by_copy, by_shares, _ = both_ways(ledger, ("\n".join(lines) + "\n").encode())
    assert by_copy.read_by == by_shares.read_by == "copy"
    assert by_shares.shares == 3
    assert by_copy.rows == 30_000
