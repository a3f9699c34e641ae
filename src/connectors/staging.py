"""Putting a delivery's records in the staging table: by COPY where it can, else in Python.

A CSV delivery (or a share of one) is loaded by PostgreSQL's COPY (see
connectors.copy_csv), the rows SQL cannot vouch for judged in Python; records read by a
parser are normalised in Python and copied in batches. Either way each refused record is
counted in the delivery's result with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, BinaryIO

from connectors.comparison import STAGING
from connectors.copy_csv import copy_csv
from connectors.normalise import FeedRules, Staged, normalise, record_fields
from connectors.outcome import FeedRejected, IngestResult
from connectors.parsers import FeedError, Record, RecordError
from connectors.parsers.csv_feed import CsvSettings
from ledger.delivery import Rejection
from ledger.mapping import unit_key
from projections.store import Connection

# Records read in Python go to the staging table this many at a time.
STAGE_BATCH = 10_000


@dataclass(frozen=True)
class Reading:
    """What reading a delivery needs besides the records."""

    rules: FeedRules
    received_at: datetime
    now: datetime
    params: dict[str, Any]
    progress: Callable[[int], None] | None


def copy_delivery(
    conn: Connection,
    body: BinaryIO,
    settings: CsvSettings,
    first_position: int,
    reading: Reading,
    result: IngestResult,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stages a CSV delivery (or a share of one) by COPY, in a savepoint, the rows
    SQL cannot vouch for read in Python; returns how many were staged. Raises
    NotByCopy, or COPY's error, where it cannot be read so (nothing is then staged)."""
    with conn.transaction():
        conn.execute(STAGING)
        loaded = copy_csv(
            conn,
            body,
            settings,
            reading.rules,
            reading.received_at,
            reading.now,
            first_position=first_position,
        )
        result.rows += loaded.staged
        if progress is not None:
            progress(result.rows)
        staged = loaded.staged + stage_records(conn, loaded.rest, reading, result, progress)
        conn.execute("DROP TABLE feed_raw, feed_units, feed_times")
    return staged


def stage_records(
    conn: Connection,
    records: Iterator[Record | RecordError],
    reading: Reading,
    result: IngestResult,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Streams records read in Python into the staging table; returns how many.
    `progress` (the delivery's, where this reads it whole) hears of every 10,000."""
    staged = 0
    rows: list[tuple[Any, ...]] = []
    try:
        for item in records:
            result.rows += 1
            if progress is not None and result.rows % 10_000 == 0:
                progress(result.rows)
            if isinstance(item, RecordError):
                result.rejections.append(
                    Rejection(item.position, item.reason, {"fields": None, "raw": item.raw})
                )
                continue
            outcome = normalise(item, reading.rules, reading.received_at, reading.now)
            if isinstance(outcome, str):
                letter = _letter(item, reading.rules, reading.received_at)
                result.rejections.append(Rejection(item.position, outcome, letter))
                continue
            rows.append(_row(outcome, item.unit))
            if len(rows) == STAGE_BATCH:
                staged += _copy_staged(conn, rows)
    except FeedError as broken:
        raise FeedRejected(broken.reason) from broken
    staged += _copy_staged(conn, rows)
    if progress is not None:
        progress(result.rows)
    return staged


def _copy_staged(conn: Connection, rows: list[tuple[Any, ...]]) -> int:
    """COPYs rows into the staging table (between the reads of a server-side cursor, which
    a COPY left open would block) and empties the list; returns how many."""
    count = len(rows)
    if rows:
        with (
            conn.cursor() as cursor,
            cursor.copy(
                "COPY feed_staging"
                " (position, supplier_sku, upc, quantity, factor, unit, unit_key, observed_at,"
                " incoming)"
                " FROM STDIN"
            ) as copy,
        ):
            for row in rows:
                copy.write_row(row)
        rows.clear()
    return count


def _row(staged: Staged, unit: str | None) -> tuple[Any, ...]:
    return (
        staged.position,
        staged.supplier_sku,
        staged.upc,
        staged.quantity,
        staged.factor,
        unit,
        None if unit is None else unit_key(unit),
        staged.observed_at,
        None if staged.incoming is None else json.dumps(staged.incoming),
    )


def _letter(record: Record, rules: FeedRules, received_at: datetime) -> dict[str, Any]:
    """A refused record's letter. A naive time is kept as the moment it was read as when
    received (in the supplier's zone then), as the letters of records refused later keep
    theirs: kept naive, a retry read it in the zone of the day of the retry, and letters
    of one record that disagree were not retried together (a walkthrough)."""
    observed = record.observed_at
    if observed is not None and observed.tzinfo is None:
        record = replace(record, observed_at=rules.in_utc(observed, received_at) or observed)
    return {"fields": record_fields(record, received_at), "raw": record.raw}
