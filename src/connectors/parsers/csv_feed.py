"""CSV stock feeds: a header row, then one record per data row.

Options (every one optional):

- `delimiter`: one character. By default it is sniffed from the header row among
  comma, semicolon, tab and pipe (the most frequent outside quotes; comma on a tie).
- `encoding`: default "utf-8-sig", i.e. UTF-8 with or without a byte-order mark.
- `columns`: our field -> the supplier's header name, or a list of names tried in order,
  e.g. `{"supplier_sku": "Artikelnummer", "quantity": ["Bestand", "Menge"]}`. Fields are
  supplier_sku, upc, quantity, unit, observed_at, incoming_quantity, expected_on (stock
  the supplier expects, in the row's unit, and when). A field given here uses only these
  names; the others use the common ones (sku, supplier_sku, item, item_no, article,
  part_number, ...; upc, ean, gtin, barcode; qty, quantity, stock, available, on_hand, ...;
  unit, uom; observed_at, timestamp, updated_at, as_of, date; the incoming ones only
  where named here). Names compare loosely:
  case, spaces and punctuation are ignored and camelCase splits (`Item No` = `itemNo`).
- `thousands_separator`: e.g. "," so that "1,200" reads 1200 (groups of three are
  checked). Default: none, so "1,200" is an invalid quantity.
- `decimal_separator`: default "."; a quantity may carry zero decimals only ("12.0").
- `timestamp_format`: a `strptime` format for observed_at; default ISO 8601, naive
  unless it carries an offset.

A row's incoming_quantity is stock the supplier expects, in the row's unit, on its
expected_on (an ISO date, or the day of a time as timestamp_format or ISO 8601 reads it)
if given: blank says nothing of it
(the schedule on record stands), 0 that none is expected.

A first line `sep=;` (as Excel writes it) names the delimiter and is not the header.

Quoted fields may hold delimiters and newlines; CRLF and LF both end a row; blank rows
are skipped. `position` counts the data rows that are not blank.

A FeedError: no header, no supplier_sku or upc column, no quantity column, a column
we read named twice, bytes that are not in the encoding, or broken quoting. A
RecordError: a row whose field count differs from the header's (trailing empty fields
aside), no identifier, a missing or non-whole quantity, an unreadable observed_at.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar

from connectors.parsers.records import (
    FeedError,
    FieldPath,
    Parsed,
    RecordError,
    ValueFormat,
    bad_encoding,
    field_paths,
    make_record,
    normalise_name,
    option_encoding,
    option_text,
    shown,
)

DELIMITERS = (",", ";", "\t", "|")
INCOMING_FIELDS = frozenset({"incoming_quantity", "expected_on"})


@dataclass(frozen=True)
class CsvSettings:
    """The CSV options of one supplier, checked."""

    # The options `from_options` reads (connectors.config refuses any other).
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"delimiter", "encoding", "columns"})

    delimiter: str | None
    encoding: str
    paths: dict[str, tuple[FieldPath, ...]]
    value_format: ValueFormat
    # Our fields whose columns the options name: each must be in the header.
    configured: frozenset[str] = frozenset()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CsvSettings:
        delimiter = option_text(options, "delimiter", None)
        if delimiter is not None and len(delimiter) != 1:
            raise ValueError("bad_option: delimiter must be one character")
        encoding = option_encoding(options, "utf-8-sig")
        return cls(
            delimiter=delimiter,
            encoding=encoding,
            paths=field_paths(options, "columns", None),
            value_format=ValueFormat.from_options(options),
            configured=frozenset(options.get("columns") or ()),
        )


def parse_csv(source: BinaryIO, options: Mapping[str, Any]) -> Iterator[Parsed]:
    """The records of a CSV feed, read as the rows arrive; options are checked at once."""
    return _parse(source, CsvSettings.from_options(options))


def _parse(source: BinaryIO, settings: CsvSettings) -> Iterator[Parsed]:
    text = io.TextIOWrapper(source, encoding=settings.encoding, newline="")
    try:
        yield from _rows(text, settings)
    except UnicodeError as error:
        raise bad_encoding(error, settings.encoding) from error
    except csv.Error as error:
        raise FeedError(f"malformed_csv: {error}") from error
    finally:
        text.detach()  # the caller owns the source: closing the wrapper would close it


def _rows(text: Iterable[str], settings: CsvSettings) -> Iterator[Parsed]:
    lines = iter(text)
    first = next((line for line in lines if line.strip()), None)
    named = _named_delimiter(first)
    if named is not None:  # Excel's "sep=;" line: the delimiter, then the header
        first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise FeedError("missing_header: the feed is empty")
    delimiter = settings.delimiter or named or _sniff(first)
    reader = csv.reader(itertools.chain([first], lines), delimiter=delimiter, strict=True)
    header = next(reader)
    header[0] = header[0].lstrip("\ufeff")
    columns = _columns(header, settings.paths, settings.configured)
    keys = _raw_keys(header)
    position = 0
    for row in reader:
        if not any(field.strip() for field in row):
            continue
        position += 1
        raw: dict[str, Any] = dict(zip(keys, row, strict=False))
        extra = row[len(keys) :]
        if extra:
            raw["_extra"] = extra
        if len(row) < len(keys) or any(field.strip() for field in extra):
            reason = f"wrong_field_count: expected {len(keys)}, got {len(row)}"
            yield RecordError(position, reason, raw)
            continue
        values = {field: row[index] for field, index in columns.items()}
        yield make_record(position, values, raw, settings.value_format)


def _named_delimiter(line: str | None) -> str | None:
    """The delimiter a first line of the form `sep=;` names (as Excel writes and reads it),
    or None for any other line."""
    if line is None:
        return None
    text = line.lstrip("\ufeff").strip("\r\n")
    if len(text) == 5 and text.lower().startswith("sep="):
        return text[4]
    return None


def _sniff(line: str) -> str:
    """The candidate delimiter seen most often outside quotes in the header line."""
    counts = dict.fromkeys(DELIMITERS, 0)
    quoted = False
    for char in line:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in counts:
            counts[char] += 1
    best = max(DELIMITERS, key=lambda delimiter: counts[delimiter])
    return best if counts[best] else ","


def _columns(
    header: list[str],
    paths: dict[str, tuple[FieldPath, ...]],
    configured: frozenset[str] = frozenset(),
) -> dict[str, int]:
    """Our field -> its column index; a FeedError when a required column is missing, or
    one the options name (a supplier that renamed its `Einheit` column had its cases read
    as pieces, and its times as the time of receipt, unsaid: a walkthrough)."""
    names = [normalise_name(name) for name in header]
    columns: dict[str, int] = {}
    for field, candidates in paths.items():
        for path in candidates:
            wanted = normalise_name("_".join(path))
            if wanted in names:
                if names.count(wanted) > 1:
                    # Which is it? The first was taken, the other's values dropped unsaid
                    # (a fuzzing walkthrough).
                    raise FeedError(
                        f"duplicate_column: {shown(header[names.index(wanted)])} names"
                        f" {names.count(wanted)} columns of {shown(header)}"
                    )
                columns[field] = names.index(wanted)
                break
    missing = [
        what
        for what, fields in (
            ("supplier_sku or upc", {"supplier_sku", "upc"}),
            ("quantity", {"quantity"}),
        )
        if not fields & columns.keys()
    ]
    if missing:
        raise FeedError(f"missing_column: no {' and no '.join(missing)} column in {shown(header)}")
    # Not the identifiers, of which one will do, nor the incoming stock, which a file may
    # leave out (as it may leave its column blank): a file without them was applied, and
    # is (a review).
    identified = bool({"supplier_sku", "upc"} & columns.keys())
    unmatched = [
        field
        for field in paths
        if field in configured
        and field not in columns
        and field not in INCOMING_FIELDS
        and not (identified and field in ("supplier_sku", "upc"))
    ]
    if unmatched:
        named = "; ".join(
            f"{field} ({' or '.join(repr('.'.join(path)) for path in paths[field])})"
            for field in unmatched
        )
        raise FeedError(
            f"missing_column: no column the options name for {named} in {shown(header)}"
        )
    return columns


def _raw_keys(header: list[str]) -> list[str]:
    """Header names made unique and non-empty, to key each row's raw dict."""
    keys: list[str] = []
    for index, name in enumerate(header, start=1):
        key = name.strip() or f"column_{index}"
        keys.append(f"{key}#{index}" if key in keys else key)
    return keys
