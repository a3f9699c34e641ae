"""CSV deliveries loaded by PostgreSQL's COPY, with Python still the judge of every value.

Reading a large CSV row by row in Python costs ~10 µs a row before anything is compared
(measured: ~10 s for 1,000,000 rows). Here PostgreSQL's own CSV reader loads the rows as
text into a temporary table, and the rows are judged without each passing through Python:

- every distinct observed_at and unit text is decided once, by the functions the
  row-by-row path uses (a feed usually stamps all its rows with one time, in a few units);
- identifiers and quantities are taken in SQL only in forms that read the same either
  way: identifiers that begin and end with a printable ASCII character (nothing to trim),
  quantities of ASCII digits;
- every other row is read in Python by the row-by-row path's own functions, so that a
  refusal has the same reason and dead letter whichever path the delivery took.

It applies only where PostgreSQL's CSV reading and Python's `csv` module cannot disagree:
UTF-8, no quote character anywhere, no `\\.` (COPY's end-of-data mark), no line as long as
the csv module's field limit, every row as wide as the header (COPY refuses others), no
row of blank fields. Otherwise it raises `NotByCopy` (or COPY fails), and the caller, which
ran it in a savepoint, reads the delivery in Python from the start: that path is the one
that reports a broken file.

A large delivery can be read in shares (see connectors.shares): each share is the header
and a run of whole lines, loaded here on a connection of its own with its rows numbered
from where its lines begin (`first_position`), as if the delivery had been read whole.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO

from psycopg import sql
from psycopg.rows import tuple_row

from connectors.normalise import FeedRules, observed_utc, unit_factor
from connectors.parsers.csv_feed import CsvSettings, _columns, _raw_keys, _sniff
from connectors.parsers.records import FeedError, Parsed, Unreadable, make_record, text
from ledger.mapping import unit_key
from projections.store import Connection

CHUNK = 1 << 20
# The longest header line looked at; a longer one is read in Python.
MAX_HEADER = 1 << 16
# Rows read back for Python's judgement per round trip.
REST_BATCH = 10_000
# Quantities SQL reads itself: what `ValueFormat.quantity` reads with int(), 1 to this
# many ASCII digits (a bigint holds them). Tested by length and `ltrim`, not a regular
# expression: 0.12 s against 0.73 s for 1,000,000 rows. Compared with the ceiling as
# written (in base units, by the unit the mapping says, once resolved: see
# connectors.comparison).
PLAIN_QUANTITY_DIGITS = 18


class NotByCopy(Exception):
    """The delivery must be read row by row in Python."""


@dataclass
class Loaded:
    """A delivery loaded by COPY: how many rows SQL staged, and the rest as Python reads
    them (in position order; each batch is read as the iteration reaches it)."""

    staged: int
    rest: Iterator[Parsed]


def copy_csv(
    conn: Connection,
    source: BinaryIO,
    settings: CsvSettings,
    rules: FeedRules,
    received_at: datetime,
    now: datetime,
    *,
    first_position: int = 1,
) -> Loaded:
    """Loads the delivery into `feed_staging` (which must exist) as far as SQL can vouch
    for its rows, numbering them from `first_position`; raises NotByCopy where it cannot
    be loaded so at all."""
    encoding = codecs.lookup(settings.encoding).name
    if encoding not in {"utf-8", "utf-8-sig"}:
        raise NotByCopy(f"encoding {settings.encoding}")
    header = _header(source, strip_bom=encoding == "utf-8-sig")
    delimiter = settings.delimiter or _sniff(header)
    fields = header.rstrip("\r\n").split(delimiter)
    fields[0] = fields[0].lstrip("\ufeff")
    try:
        columns = _columns(fields, settings.paths, settings.configured)
    except FeedError as error:
        raise NotByCopy(error.reason) from error
    names = [sql.Identifier(f"c{i}") for i in range(len(fields))]
    conn.execute(
        sql.SQL(
            "CREATE TEMPORARY TABLE feed_raw"
            " (position bigint GENERATED ALWAYS AS IDENTITY (START WITH {first}), {columns})"
        ).format(
            first=sql.Literal(first_position),
            columns=sql.SQL(", ").join(sql.SQL("{} text").format(n) for n in names),
        )
    )
    with conn.cursor() as cursor:
        with cursor.copy(
            sql.SQL("COPY feed_raw ({names}) FROM STDIN WITH (FORMAT csv, DELIMITER {d})").format(
                names=sql.SQL(", ").join(names), d=sql.Literal(delimiter)
            )
        ) as copy:
            _send(source, copy)
        copied = cursor.rowcount

    def column(field: str) -> sql.Composable:
        index = columns.get(field)
        if index is None:
            return sql.SQL("''")
        return sql.SQL("coalesce(r.{}, '')").format(names[index])

    units: list[tuple[str, str | None, str | None, int | None]] = []
    for raw in _distinct(conn, column("unit")):
        try:
            unit = text("unit", raw)
        except Unreadable:
            continue
        key = None if unit is None else unit_key(unit)
        units.append((raw, unit, key, unit_factor(unit, rules)))
    times: list[tuple[str, datetime]] = []
    for raw in _distinct(conn, column("observed_at")):
        try:
            written = settings.value_format.timestamp(raw)
        except Unreadable:
            continue
        at = observed_utc(written, rules, received_at, now)
        if not isinstance(at, str):
            times.append((raw, at))
    _keep(conn, "feed_units", "raw text PRIMARY KEY, unit text, key text, factor integer", units)
    _keep(conn, "feed_times", "raw text PRIMARY KEY, at timestamptz NOT NULL", times)
    sku, upc, quantity = column("supplier_sku"), column("upc"), column("quantity")
    # A row that says what stock the supplier expects is read in Python (the rows that
    # leave the column blank say nothing of it, and are staged with none said).
    vouched = sql.SQL(
        "coalesce({sku_ok} AND {upc_ok} AND ({sku} <> '' OR {upc} <> '')"
        " AND {incoming} = '' AND u.raw IS NOT NULL AND t.raw IS NOT NULL"
        " AND CASE WHEN {quantity} <> '' AND length({quantity}) <= {digits}"
        "  AND ltrim({quantity}, '0123456789') = ''"
        "  THEN {quantity}::bigint <= {max} ELSE false END, false)"
    ).format(
        sku=sku,
        upc=upc,
        sku_ok=_untrimmed(sku),
        upc_ok=_untrimmed(upc),
        quantity=quantity,
        incoming=column("incoming_quantity"),
        digits=sql.Literal(PLAIN_QUANTITY_DIGITS),
        max=sql.Literal(rules.max_quantity),
    )
    judged = sql.SQL(
        "FROM feed_raw r LEFT JOIN feed_units u ON u.raw = {unit}"
        " LEFT JOIN feed_times t ON t.raw = {time}"
    ).format(unit=column("unit"), time=column("observed_at"))
    staged = conn.execute(
        sql.SQL(
            "INSERT INTO feed_staging"
            " (position, supplier_sku, upc, quantity, factor, unit, unit_key, observed_at)"
            " SELECT r.position, nullif({sku}, ''), nullif({upc}, ''), {quantity}::bigint,"
            " u.factor, u.unit, u.key, t.at {judged} WHERE {vouched}"
        ).format(sku=sku, upc=upc, quantity=quantity, judged=judged, vouched=vouched)
    ).rowcount
    rest = sql.SQL(
        "SELECT r.position, {fields} {judged} WHERE NOT {vouched} ORDER BY r.position"
    ).format(
        fields=sql.SQL(", ").join(sql.SQL("coalesce(r.{}, '')").format(n) for n in names),
        judged=judged,
        vouched=vouched,
    )
    if staged == copied:
        # Every row vouched for (the usual case): no second pass over the table.
        return Loaded(staged, iter(()))
    return Loaded(staged, _rest(conn, rest, fields, columns, settings))


def _header(source: BinaryIO, *, strip_bom: bool) -> str:
    """The header line as the csv path finds it (the first that is not blank), leaving
    `source` at the first data row."""
    first = True
    while True:
        line = source.readline(MAX_HEADER)
        if first and strip_bom:
            line = line.removeprefix(codecs.BOM_UTF8)
        first = False
        if not line:
            raise NotByCopy("no header")
        if not line.endswith(b"\n"):
            raise NotByCopy("header line too long or alone")
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise NotByCopy("header not UTF-8") from error
        if "\r" in decoded.rstrip("\r\n") or '"' in decoded:
            raise NotByCopy("header quoted or with a lone carriage return")
        if decoded.strip():
            return decoded


def _send(source: BinaryIO, copy: Any) -> None:
    """Streams the rest of `source` to COPY, refusing what COPY would read otherwise
    than the csv module."""
    limit = csv.field_size_limit()
    line = 0  # bytes of the line the last chunk ended in
    previous = b""
    while chunk := source.read(CHUNK):
        if b'"' in chunk:
            raise NotByCopy("quoted fields")
        if b"\\." in chunk or (previous.endswith(b"\\") and chunk.startswith(b".")):
            raise NotByCopy("a backslash-dot")
        lines = chunk.split(b"\n")
        line += len(lines[0])
        longest = max(line, *(len(part) for part in lines[1:])) if len(lines) > 1 else line
        if longest >= limit:
            raise NotByCopy("a line beyond the csv field limit")
        if len(lines) > 1:
            line = len(lines[-1])
        copy.write(chunk)
        previous = chunk


def _untrimmed(value: sql.Composable) -> sql.Composable:
    """SQL: the identifier reads as written (empty, or nothing at either end to trim)."""
    return sql.SQL(
        "({v} = '' OR (ascii({v}) BETWEEN 33 AND 126 AND ascii(right({v}, 1)) BETWEEN 33 AND 126))"
    ).format(v=value)


def _distinct(conn: Connection, value: sql.Composable) -> list[str]:
    """The distinct texts of a column (of a constant, the constant)."""
    with conn.cursor(row_factory=tuple_row) as cursor:
        cursor.execute(sql.SQL("SELECT DISTINCT {} FROM feed_raw r").format(value))
        return [row[0] for row in cursor.fetchall()]


def _keep(conn: Connection, table: str, columns: str, rows: list[tuple[Any, ...]]) -> None:
    """A temporary table of the accepted readings of a column's distinct texts."""
    name = sql.Identifier(table)
    conn.execute(sql.SQL("CREATE TEMPORARY TABLE {} ({})").format(name, sql.SQL(columns)))
    with conn.cursor() as cursor, cursor.copy(sql.SQL("COPY {} FROM STDIN").format(name)) as copy:
        for row in rows:
            copy.write_row(row)


def _rest(
    conn: Connection,
    query: sql.Composed,
    header: list[str],
    columns: dict[str, int],
    settings: CsvSettings,
) -> Iterator[Parsed]:
    """The rows SQL did not vouch for, read as the csv path reads them."""
    keys = _raw_keys(header)
    with conn.cursor(name="feed_rest", row_factory=tuple_row) as cursor:
        cursor.execute(query)
        while batch := cursor.fetchmany(REST_BATCH):
            for position, *row in batch:
                if not any(field.strip() for field in row):
                    # The csv path skips such a row and numbers the next one in its place.
                    raise NotByCopy("a row of blank fields")
                raw: dict[str, Any] = dict(zip(keys, row, strict=True))
                values = {field: row[index] for field, index in columns.items()}
                yield make_record(position, values, raw, settings.value_format)
