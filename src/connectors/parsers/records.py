"""What every feed parser yields, and how values are read as suppliers write them.

Parsers report what the supplier wrote; mapping, unit conversion, time zones and
plausibility checks belong to normalisation, which runs later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property, lru_cache
from typing import Any, ClassVar

FIELDS = (
    "supplier_sku",
    "upc",
    "quantity",
    "unit",
    "observed_at",
    "incoming_quantity",
    "expected_on",
)

# Nested defaults are dotted; each format reads them its own way (CSV joins them with "_").
DEFAULT_NAMES: dict[str, tuple[str, ...]] = {
    "supplier_sku": (
        "sku",
        "supplier_sku",
        "seller_sku",
        "vendor_sku",
        "item",
        "item_no",
        "item_number",
        "item_code",
        "article",
        "article_no",
        "article_number",
        "part_number",
        "part_no",
        "product_code",
    ),
    "upc": ("upc", "ean", "gtin", "barcode"),
    "quantity": (
        "qty",
        "quantity",
        "stock",
        "available",
        "on_hand",
        "qty_available",
        "quantity_available",
        "available_quantity",
        "available_qty",
        "qty_on_hand",
        "quantity_on_hand",
        "qoh",
        "stock_level",
        "stock.available",
        "stock.quantity",
        "stock.on_hand",
        "inventory.available",
        "inventory.quantity",
        "inventory.on_hand",
    ),
    "unit": ("unit", "uom", "unit_of_measure"),
    "observed_at": ("observed_at", "timestamp", "updated_at", "as_of", "date", "last_updated"),
    # Stock the supplier expects, in the record's unit, and when (one entry a record):
    # read only where the supplier's settings name its fields. Feeds have long carried
    # columns of these common names (ETA, On Order) in forms of their own, and a record
    # whose incoming stock cannot be read is refused whole, its level with it.
    "incoming_quantity": (),
    "expected_on": (),
}

FieldPath = tuple[str, ...]


# A quantity of more digits than a 64-bit level holds is refused as it is read (out of
# range, as a shorter one past the ceiling is): Python converts at most 4,300 digits, and
# a longer one failed the whole delivery, not its record.
MAX_QUANTITY_DIGITS = 18


@dataclass(frozen=True)
class Incoming:
    """Stock a supplier expects to have (EDI SCH lines); `unit` is as written, if given."""

    quantity: int
    expected_on: date | None
    unit: str | None = None


@dataclass(frozen=True)
class Record:
    """One observation as the supplier wrote it, not yet normalised."""

    position: int
    supplier_sku: str | None
    upc: str | None
    quantity: int | None
    unit: str | None
    observed_at: datetime | None
    raw: dict[str, Any]
    # Stock the supplier expects: None where the format cannot say (all but EDI 846, whose
    # records always say, if only that none is expected).
    incoming: tuple[Incoming, ...] | None = None


@dataclass(frozen=True)
class RecordError:
    """One record that cannot be read; the rest of the delivery goes on."""

    position: int
    reason: str
    raw: dict[str, Any]


Parsed = Record | RecordError


class FeedError(Exception):
    """The delivery is structurally broken and must be rejected whole."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def bad_encoding(error: UnicodeError, encoding: str) -> FeedError:
    """A file its encoding cannot read: UnicodeDecodeError, or another of the codec's
    (UTF-16 without its BOM says nothing of its byte order: a fuzzing walkthrough failed
    deliveries with it)."""
    reason = getattr(error, "reason", None) or str(error)
    return FeedError(f"bad_encoding: not {encoding} ({reason})")


class Rounded(float):
    """A number written with a fraction that a float rounds away (`4.9999999999999999999`
    reads 5.0): a time may be read from it, never a whole quantity (it was applied as 5:
    a fuzzing walkthrough). Shown as written."""

    written: str

    def __new__(cls, written: str) -> Rounded:
        number = super().__new__(cls, written)
        number.written = written
        return number

    def __repr__(self) -> str:
        return self.written


class Unreadable(ValueError):
    """A value that cannot be read; its message is a RecordError reason."""


@lru_cache(maxsize=4096)
def normalise_name(name: str) -> str:
    """A name compared loosely: `Item No`, `itemNo`, `ITEM-NO` and `item_no` all read
    `itemno`. Only letters and digits count: `UoM` split at its case read `uo_m`, never
    `uom`, and its cases were read as pieces (a walkthrough)."""
    return re.sub(r"[^a-z0-9]+", "", name.lower())


def shown(value: object) -> str:
    """A value quoted in a reason, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def option_names(options: Mapping[str, Any], name: str, default: Sequence[str]) -> tuple[str, ...]:
    """A list-of-names option (a single name is accepted too)."""
    value = options.get(name, default)
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or not value
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise ValueError(f"bad_option: {name} must be a name or a non-empty list of names")
    return tuple(value)


def option_text(options: Mapping[str, Any], name: str, default: str | None) -> str | None:
    """A string option, or None when absent and without default."""
    value = options.get(name, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"bad_option: {name} must be a non-empty string")
    return value


def option_encoding(options: Mapping[str, Any], default: str) -> str:
    """The `encoding` option: a codec that decodes bytes to text. `rot13`, `hex` or
    `base64` were saved, and every delivery then failed (a fuzzing walkthrough)."""
    encoding = option_text(options, "encoding", default) or default
    try:
        # LookupError for a codec unknown, or not a text encoding (an empty input is not
        # looked up at all).
        b"x".decode(encoding, "replace")
    except LookupError as error:
        raise ValueError(f"bad_option: {encoding!r} is no text encoding") from error
    return encoding


def field_paths(
    options: Mapping[str, Any], key: str, separator: str | None
) -> dict[str, tuple[FieldPath, ...]]:
    """Our field -> the supplier's names for it: option `key` where given, else the defaults.

    Configured names are split into paths on `separator`; the defaults on ".".
    """
    configured = options.get(key) or {}
    if not isinstance(configured, Mapping):
        raise ValueError(f"bad_option: {key} must map our field names to the supplier's")
    unknown = sorted(set(configured) - set(FIELDS))
    if unknown:
        raise ValueError(f"bad_option: {key} has unknown fields {unknown}; known: {FIELDS}")
    paths: dict[str, tuple[FieldPath, ...]] = {}
    for field in FIELDS:
        if field in configured:
            label = f"{key}.{field}"
            names = option_names({label: configured[field]}, label, ())
            paths[field] = tuple(
                tuple(name.split(separator)) if separator else (name,) for name in names
            )
        else:
            paths[field] = tuple(tuple(name.split(".")) for name in DEFAULT_NAMES[field])
    return paths


# A moment every field of a time format shows differently (day 23 of month 11, hour 19),
# with its zone, which `%z` writes (naive, it wrote nothing, and a format that reads
# offsets was refused: a review).
_PROBE = datetime(2031, 11, 23, 19, 47, 36, tzinfo=UTC)


def _check_timestamp_format(pattern: str) -> None:
    """Raises `bad_option` for a `timestamp_format` that cannot read a time back (`%s`,
    `%Q`: every row of every delivery was then refused) or that leaves out the date (`%H:%M`
    read `12:29` as 1 January 1900, a level 127 years old that was applied as sellable):
    checked by writing a moment in it and reading it back."""
    if "%Z" in pattern:
        # strptime's %Z reads only UTC, GMT and the host's own zone names, and gives a
        # naive time, then read in the supplier's zone (a review).
        raise ValueError(
            f"bad_option: timestamp_format {pattern!r}: %Z reads only UTC and GMT, as local"
            " times; write the offset, %z"
        )
    try:
        read = datetime.strptime(_PROBE.strftime(pattern), pattern)
    except (ValueError, re.error) as error:
        # re.error: a directive given twice (`%Y-%m-%d %Y`), which strptime's pattern
        # cannot hold; it was a 500 (a supplier integrator's walkthrough).
        raise ValueError(
            f"bad_option: timestamp_format {pattern!r} cannot be read: {error}"
        ) from None
    if read.date() != _PROBE.date():
        raise ValueError(
            f"bad_option: timestamp_format {pattern!r} must name the year, month and day"
        )


@dataclass(frozen=True)
class ValueFormat:
    """How a supplier writes numbers and times: options `thousands_separator`,
    `decimal_separator` and `timestamp_format`."""

    # The options `from_options` reads (connectors.config refuses any other).
    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"thousands_separator", "decimal_separator", "timestamp_format"}
    )

    thousands_separator: str | None = None
    decimal_separator: str = "."
    timestamp_format: str | None = None
    # Whether the supplier's options say how it writes numbers at all: if not, a quantity
    # such as "1.000" may be a thousand written the European way, not one.
    separators_known: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ValueFormat:
        value_format = cls(
            thousands_separator=option_text(options, "thousands_separator", None),
            decimal_separator=option_text(options, "decimal_separator", ".") or ".",
            timestamp_format=option_text(options, "timestamp_format", None),
            separators_known=bool({"thousands_separator", "decimal_separator"} & set(options)),
        )
        if value_format.thousands_separator == value_format.decimal_separator:
            given = "" if "decimal_separator" in options else " ('.' unless set)"
            raise ValueError(
                "bad_option: thousands_separator equals decimal_separator"
                f"{given}: set decimal_separator too, e.g. ',' for 1.234,5"
            )
        if value_format.timestamp_format:
            _check_timestamp_format(value_format.timestamp_format)
        return value_format

    def quantity(self, value: object) -> int | None:
        """A whole quantity: `12`, ` 1,200 ` (with a thousands separator), `12.0`; not `12.5`."""
        if isinstance(value, str) and value.isdigit() and value.isascii():
            if len(value) > MAX_QUANTITY_DIGITS:
                raise Unreadable("quantity_out_of_range")
            return int(value)  # the common case, first
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise Unreadable(f"invalid_quantity: {shown(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if not value.is_integer() or isinstance(value, Rounded):
                raise Unreadable(f"invalid_quantity: {shown(value)}")
            return int(value)
        match = self._quantity_pattern.fullmatch(value.strip())
        if match is None:
            raise Unreadable(f"invalid_quantity: {shown(value)}")
        digits = match.group(2).replace(self.thousands_separator or "", "")
        if (
            not self.separators_known
            and len(match.group(2)) <= 3
            and value.strip()[match.end(2) :] == self.decimal_separator + "000"
        ):
            # "1.000": one, or a thousand with a thousands separator? Read as one, a
            # European feed lost a factor of a thousand on round thousands, unflagged.
            raise Unreadable(
                f"ambiguous_quantity: {shown(value)} (set the feed's thousands_separator"
                " or decimal_separator)"
            )
        if len(digits) > MAX_QUANTITY_DIGITS:
            raise Unreadable("quantity_out_of_range")
        return int(match.group(1) + digits)

    @cached_property
    def _quantity_pattern(self) -> re.Pattern[str]:
        group = re.escape(self.thousands_separator) if self.thousands_separator else None
        whole = rf"\d+|\d{{1,3}}(?:{group}\d{{3}})+" if group else r"\d+"
        # ASCII digits only: `\d` alone took "٣" (an Arabic-Indic three) for 3.
        return re.compile(rf"([+-]?)({whole})(?:{re.escape(self.decimal_separator)}0+)?", re.ASCII)

    def timestamp(self, value: object) -> datetime | None:
        """A time as written: ISO 8601 (naive or not) or `timestamp_format`; numbers are Unix."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        try:
            if isinstance(value, str):
                if self.timestamp_format:
                    return datetime.strptime(value.strip(), self.timestamp_format)
                return _iso_time(value.strip())
            if isinstance(value, int | float) and not isinstance(value, bool):
                return datetime.fromtimestamp(value, UTC)
        except (ValueError, OverflowError, OSError):
            pass
        raise Unreadable(f"invalid_observed_at: {shown(value)}")


@lru_cache(maxsize=4096)
def _iso_time(value: str) -> datetime:
    # A feed usually stamps every row with one time: parse each distinct string once.
    # RFC 3339 allows a small "z", which Python's reading does not take.
    return datetime.fromisoformat(value[:-1] + "Z" if value.endswith("z") else value)


def text(field: str, value: object) -> str | None:
    """An identifier or unit as written, trimmed; None when absent or blank."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise Unreadable(f"invalid_{field}: {shown(value)}")
    return value.strip() or None


def make_record(
    position: int, values: Mapping[str, object], raw: dict[str, Any], value_format: ValueFormat
) -> Parsed:
    """A Record from the values found for our fields, or the RecordError of the first bad one."""
    try:
        supplier_sku = text("supplier_sku", values.get("supplier_sku"))
        upc = text("upc", values.get("upc"))
        if supplier_sku is None and upc is None:
            raise Unreadable("missing_identifier")
        quantity = value_format.quantity(values.get("quantity"))
        if quantity is None:
            raise Unreadable("missing_quantity")
        unit = text("unit", values.get("unit"))
        observed_at = value_format.timestamp(values.get("observed_at"))
        incoming = _incoming(
            values.get("incoming_quantity"),
            values.get("expected_on"),
            value_format,
            text("incoming_unit", values.get("incoming_unit")),
        )
    except Unreadable as unreadable:
        return RecordError(position, str(unreadable), raw)
    return Record(position, supplier_sku, upc, quantity, unit, observed_at, raw, incoming)


def _incoming(
    quantity: object, expected_on: object, value_format: ValueFormat, unit: str | None = None
) -> tuple[Incoming, ...] | None:
    """A record's incoming stock where its format has a field for it: none said (blank or
    absent: the schedule on record stands), none expected (0), or one entry with its date,
    if given, in its own `unit` where the feed writes one on it (XML's `uom`), else in the
    record's."""
    try:
        expected = value_format.quantity(quantity)
    except Unreadable as unreadable:
        raise Unreadable(f"invalid_incoming_quantity: {shown(quantity)}") from unreadable
    if expected is None:
        return None
    if expected == 0:
        return ()
    return (Incoming(expected, _date("expected_on", expected_on, value_format), unit),)


def _date(field: str, value: object, value_format: ValueFormat) -> date | None:
    """A date as written: ISO 8601, or the day of a time as `timestamp_format` or ISO 8601
    reads it; None when absent or blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
        try:
            moment = value_format.timestamp(value)
        except Unreadable:
            moment = None
        if moment is not None:
            return moment.date()
    raise Unreadable(f"invalid_{field}: {shown(value)}")
