"""JSON stock feeds: an array of record objects, read as a stream with ijson.

Options (every one optional):

- `records`: the dotted path of the array of records, e.g. "data.items"; "" is a
  top-level array. By default: a top-level array, else the first array found under keys
  made only of items, data, inventory, records, products, stock, observations (so
  `{"data": {"items": [...]}}` works, and a webhook's body uploaded as a file).
- `fields`: our field -> a dotted path inside a record, or a list of paths tried in
  order, e.g. `{"supplier_sku": "product.code", "quantity": "stock.available"}`; a
  number segment indexes a list ("codes.0.value"). Fields are supplier_sku, upc,
  quantity, unit, observed_at, incoming_quantity, expected_on (see CSV). A field given
  here uses only these paths; the others use the common names (as for CSV) and nested
  ones such as stock.available or inventory.quantity (the incoming ones only where
  named here). Keys compare loosely (case, punctuation, camelCase), and the first path
  holding a value (not null, not an object or list) wins.
- `thousands_separator`, `decimal_separator`, `timestamp_format`: for quantities and
  times written as strings, as for CSV. Numbers are taken as they are (12.0 is 12, 12.5
  is invalid); a numeric observed_at is Unix seconds (UTC).

A UTF-8 byte-order mark is skipped. `position` counts the elements of the records array.
A lone UTF-16 surrogate escape ("\\ud800" without its low half), which ijson's C parser
cannot read, reads as that surrogate in the record's text (normalisation then refuses the
record alone, or keeps it with U+FFFD in a dead letter).
A FeedError: malformed JSON (also after records already yielded), or no records array.
A RecordError: an element that is not an object, no identifier, a missing or non-whole
quantity, an unreadable observed_at.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, BinaryIO, ClassVar

import ijson  # type: ignore[import-untyped]  # ijson ships no type hints

from connectors.parsers.records import (
    MAX_QUANTITY_DIGITS,
    FeedError,
    FieldPath,
    Parsed,
    RecordError,
    Rounded,
    ValueFormat,
    field_paths,
    make_record,
    normalise_name,
)

# (`observations`: a webhook body's shape, uploaded as a file.)
DEFAULT_KEYS = ("items", "data", "inventory", "records", "products", "stock", "observations")
OPENING = frozenset({"start_map", "start_array"})
CLOSING = frozenset({"end_map", "end_array"})
CHUNK = 64 * 1024


@dataclass(frozen=True)
class JsonSettings:
    """The JSON options of one supplier, checked."""

    # The options `from_options` reads (connectors.config refuses any other).
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"records", "fields"})

    records: str | None
    paths: dict[str, tuple[FieldPath, ...]]
    value_format: ValueFormat

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> JsonSettings:
        records = options.get("records")
        if records is not None and not isinstance(records, str):
            raise ValueError("bad_option: records must be a dotted path")
        paths = {
            field: tuple(tuple(normalise_name(name) for name in path) for path in candidates)
            for field, candidates in field_paths(options, "fields", ".").items()
        }
        return cls(records, paths, ValueFormat.from_options(options))

    def is_records_array(self, prefix: str) -> bool:
        if self.records is not None:
            return prefix == self.records
        return prefix == "" or set(prefix.split(".")) <= set(DEFAULT_KEYS)


def parse_json(source: BinaryIO, options: Mapping[str, Any]) -> Iterator[Parsed]:
    """The records of a JSON feed, read as the stream arrives; options are checked at once."""
    return _parse(source, JsonSettings.from_options(options))


def _parse(source: BinaryIO, settings: JsonSettings) -> Iterator[Parsed]:
    first = source.read(CHUNK)
    chunks = itertools.chain(
        [first.removeprefix(b"\xef\xbb\xbf")], iter(lambda: source.read(CHUNK), b"")
    )
    marked = _Chunks(_bounded_digit_runs(chunks))
    try:
        # Numbers as written (an integer past 64 bits too: with `use_float` the C parser
        # refuses the whole file there, not the record); fractions as floats (below).
        events = ijson.basic_parse(marked)
        yield from _records(_prefixed(events), settings, marked)
    except ijson.JSONError as error:
        raise FeedError(f"malformed_json: {_first_line(error)}") from error
    except UnicodeDecodeError as error:  # bytes not UTF-8, such as an encoded surrogate
        raise FeedError(f"malformed_json: {_first_line(error)}") from error
    except InvalidOperation as error:
        # A number whose exponent no Decimal holds (`1E+9999999999999999999`): ijson raises
        # as it reads it, as for the 4,300 digits below, and the delivery failed eight times
        # over (a walkthrough).
        raise FeedError(
            "malformed_json: a number with an exponent of more digits than can be read"
        ) from error
    except ValueError as error:
        # An integer of more digits than Python converts: ijson's C parser raises it as
        # it hands the number on, outside any frame of ours to catch it in. Either failed
        # the delivery eight times over before leaving it failed (a fuzzing walkthrough).
        if "integer string conversion" not in str(error):
            raise
        raise FeedError(
            "malformed_json: a number of more digits than can be read (4,300)"
        ) from error


# ijson's C parser (yajl2_c, 3.6) crashes the process on an integer of 65,534 digits or
# more, before Python sees it, and on one of 4,301 or more (past Python's conversion) that
# ends the document or comes before a syntax error: one upload took down `ledger serve`,
# and again at each restart as its delivery was claimed again (a security walkthrough;
# the second, a fuzzing one). No stock feed holds so many digits in a row, in a number or
# in a string, and no number of more can be read, so the bytes are refused before the
# parser reads them.
LONGEST_DIGIT_RUN = 4_300
_DIGITS_ONLY = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_TOO_LONG_RUN = b"0" * (LONGEST_DIGIT_RUN + 1)


def _bounded_digit_runs(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks as they come, unless digits run on past LONGEST_DIGIT_RUN in a row (across
    chunks too): a FeedError there. Each chunk is looked at in C (translate, find)."""
    run = 0  # the digits ending the chunks so far
    for chunk in chunks:
        digits = chunk.translate(_DIGITS_ONLY)
        leading = len(digits) - len(digits.lstrip(b"0"))
        if leading == len(digits):
            longest = run = run + leading
        else:
            longest = LONGEST_DIGIT_RUN + 1 if _TOO_LONG_RUN in digits else run + leading
            run = len(digits) - len(digits.rstrip(b"0"))
        if longest > LONGEST_DIGIT_RUN:
            raise FeedError(
                f"malformed_json: more than {LONGEST_DIGIT_RUN:,} digits in a row (no number"
                " of more than 4,300 digits can be read)"
            )
        yield chunk


# Stock feeds are shallow; past this, a document is refused before it costs memory
# (ijson's own prefixes grow with depth for every event, quadratic in a hostile file).
MAX_DEPTH = 64


def _prefixed(events: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, str, Any]]:
    """ijson's `parse`, over `basic_parse`, with the nesting bounded."""
    path: list[str | None] = []
    for event, value in events:
        if event == "map_key":
            prefix = ".".join(str(p) for p in path[:-1])
            path[-1] = value
        elif event in ("start_map", "start_array"):
            prefix = ".".join(str(p) for p in path)
            path.append(None if event == "start_map" else "item")
            if len(path) > MAX_DEPTH:
                raise FeedError(f"too_deeply_nested: more than {MAX_DEPTH} levels")
        elif event in ("end_map", "end_array"):
            path.pop()
            prefix = ".".join(str(p) for p in path)
        else:
            prefix = ".".join(str(p) for p in path)
            if type(value) is Decimal:
                value = _number(value)
        yield prefix, event, value


def _number(value: Decimal) -> int | float | str:
    """A number written with a fraction or an exponent (ijson reads the others as ints): a
    whole one as an int (`12.0`, `1e3`), another as a float, and one no float holds as
    written (`1e400`, infinite as a float; `1e-400`, zero), which no field takes: a
    quantity so written was applied as 0, or made a letter PostgreSQL refused."""
    if value == value.to_integral_value():
        return int(value) if value.adjusted() < MAX_QUANTITY_DIGITS else str(value)
    as_float = float(value)
    if as_float and as_float.is_integer() and math.isfinite(as_float):
        # A fraction the float rounds away (`4.9999999999999999999`, applied as 5): a time
        # still, never a whole quantity (a fuzzing walkthrough; as a string, a time of
        # nanoseconds was refused: a review).
        return Rounded(str(value))
    return as_float if as_float and math.isfinite(as_float) else str(value)


# A JSON escape, as a token: a surrogate pair, a lone surrogate, any other \\u escape, or a
# character's. The longest is a pair, 12 bytes.
_ESCAPE = re.compile(
    rb"\\(?:(?P<pair>u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?P<lone>u[dD][89a-fA-F][0-9a-fA-F]{2})|u[0-9a-fA-F]{4}|[^u])"
)
_LONGEST_ESCAPE = 12
# Where a lone surrogate escape may be: its start, or the start of one cut off at the end.
_MAY_BE_LONE = re.compile(rb"\\u[dD][89a-fA-F]|\\(?:u[dD]?)?\Z")
# ijson's C parser writes a lone surrogate escape out as bytes that are not UTF-8, then
# fails decoding them, and the whole delivery with it. Each is passed to it as one of the
# last 2048 code points (private use: U+10F800 for U+D800, and so on) and read back as its
# surrogate once the record is built; a supplier's own text in those code points reads as
# surrogates too, in a delivery that has lone surrogates.
_MARKS = 0x10F800 - 0xD800
_MARKED = re.compile("[\U0010f800-\U0010ffff]")


class _Chunks:
    """The minimal file object ijson reads: bytes chunks, whatever size it asks for, each
    lone surrogate escape replaced by its mark (`marked` says whether one was)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._held = b""  # the end of the last chunk, where an escape may be cut off
        self.marked = False

    def read(self, size: int = -1) -> bytes:
        if not size:
            return b""  # ijson reads 0 bytes to tell the type
        while True:
            chunk = next(self._chunks, None)
            data, self._held = self._held + (chunk or b""), b""
            if chunk is None or _MAY_BE_LONE.search(data) is not None:
                data = self._marking(data, final=chunk is None)
            if data or chunk is None:
                return data

    def _marking(self, data: bytes, *, final: bool) -> bytes:
        """`data` with its lone surrogate escapes marked, but for an end held back where an
        escape may be cut off (`data` begins where an escape may: see `read`)."""
        limit = len(data) if final else len(data) - _LONGEST_ESCAPE
        parts: list[bytes] = []
        start = end = 0
        for escape in _ESCAPE.finditer(data):
            if escape.start() >= limit:
                break
            end = escape.end()
            lone = escape.group("lone")
            if lone is not None:
                mark = chr(int(lone[1:], 16) + _MARKS).encode()
                parts += (data[start : escape.start()], mark)
                start = end
                self.marked = True
        # Every escape that begins before `limit` is whole there, so both are between tokens.
        cut = max(limit, end, 0)
        self._held = data[cut:]
        parts.append(data[start:cut])
        return b"".join(parts)


def _records(
    events: Iterator[tuple[str, str, Any]], settings: JsonSettings, chunks: _Chunks
) -> Iterator[Parsed]:
    array: str | None = None  # the prefix of the records array, once found
    done = False  # the records array has ended; the rest is only checked to be well formed
    position = 0
    for prefix, event, value in events:
        if done:
            continue
        if array is None:
            if event == "start_array" and settings.is_records_array(prefix):
                array = prefix
            elif prefix == settings.records and event != "map_key":
                raise FeedError(f"no_records: {settings.records!r} is not an array")
        elif prefix == array and event == "end_array":
            done = True
        else:
            position += 1
            element = _element(event, value, events)
            if chunks.marked:
                element = _unmarked(element)
            yield _record(position, element, settings)
    if not done:
        if settings.records is not None:
            raise FeedError(f"no_records: no array at {settings.records!r}")
        raise FeedError(f"no_records: no array at the top level or under {'/'.join(DEFAULT_KEYS)}")


def _element(event: str, value: Any, events: Iterator[tuple[str, str, Any]]) -> Any:
    """The whole array element that starts with this event, built from the following ones."""
    if event not in OPENING:
        return value
    builder = ijson.ObjectBuilder()
    builder.event(event, value)
    depth = 1
    for _, inner, inner_value in events:
        builder.event(inner, inner_value)
        depth += (inner in OPENING) - (inner in CLOSING)
        if depth == 0:
            break
    return builder.value


def _unmarked(value: Any) -> Any:
    """`value` with the marks of lone surrogates read back as them (see `_Chunks`)."""
    if isinstance(value, str):
        if value.isascii():
            return value
        return _MARKED.sub(lambda mark: chr(ord(mark[0]) - _MARKS), value)
    if isinstance(value, dict):
        return {_unmarked(name): _unmarked(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_unmarked(item) for item in value]
    return value


def _record(position: int, element: Any, settings: JsonSettings) -> Parsed:
    if not isinstance(element, dict):
        return RecordError(position, f"not_an_object: {type(element).__name__}", {"value": element})
    keys = _LooseKeys(element)
    values = {field: keys.first(paths) for field, paths in settings.paths.items()}
    return make_record(position, values, element, settings.value_format)


class _LooseKeys:
    """One record's objects keyed by normalised names, each built once (first key wins)."""

    def __init__(self, element: dict[str, Any]) -> None:
        self._views: dict[int, dict[str, Any]] = {}
        self._top = self._view(element)

    def first(self, paths: tuple[FieldPath, ...]) -> object:
        """The first scalar, non-null value found at one of the (normalised) paths."""
        for head, *rest in paths:
            value = self._top.get(head)
            for segment in rest:
                if isinstance(value, dict):
                    value = self._view(value).get(segment)
                elif isinstance(value, list) and segment.isdigit() and int(segment) < len(value):
                    value = value[int(segment)]
                else:
                    value = None
            if value is not None and not isinstance(value, dict | list):
                return value
        return None

    def _view(self, value: dict[str, Any]) -> dict[str, Any]:
        if id(value) not in self._views:
            view: dict[str, Any] = {}
            for key, item in value.items():
                view.setdefault(normalise_name(key), item)
            self._views[id(value)] = view
        return self._views[id(value)]


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
