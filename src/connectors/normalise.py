"""From a record as a supplier wrote it to a level the ledger can compare, or a reason to refuse.

Per supplier, from its connector settings (all optional):
- `units`: supplier unit -> base units, e.g. {"CS": 12, "PK": 6}. A record in a base unit
  (EA, EACH, PC, PCS, PIECE, UNIT, UN) counts as is; a record without a unit, or in its
  mapping's own `unit`, is in the mapping's `units_per_supplier_unit` (which comes first:
  a case of this item may hold more than the table's); a record in a unit that neither
  the table nor its mapping knows is refused (`unknown_unit`) once it is resolved.
- `max_quantity`: a level above it, in base units (incoming stock too), is a broken feed,
  not stock (default 10,000,000).
- `max_age_seconds`: reports older than this are refused (default: the supplier's
  `exclude_after_seconds`, else no limit).
A naive timestamp is in the supplier's `timezone`; a record without one was observed when
the delivery was received. Reports more than five minutes in the future are refused.
Incoming stock (EDI SCH lines) is in its own unit if it names one, else in the record's;
a record in a format that cannot carry it says nothing of it (None), which leaves the
schedule on record as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from connectors.parsers import Incoming, Record
from ledger.delivery import lone_surrogate
from ledger.handlers.reports import MAX_QUANTITY
from ledger.mapping import BASE_UNITS, unit_key
from ledger.supplier import SupplierTerms

CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_MAX_QUANTITY = 10_000_000
# The most base units a supplier's unit may hold: a PostgreSQL integer (see
# connectors.comparison, STAGING).
MAX_FACTOR = 2**31 - 1


@dataclass(frozen=True)
class FeedRules:
    """How one supplier's records become levels."""

    zone: ZoneInfo
    units: dict[str, int]
    max_quantity: int
    max_age: timedelta | None
    _utc: dict[tuple[datetime, datetime | None], datetime | None] = field(
        default_factory=dict, compare=False
    )

    def in_utc(self, moment: datetime, received_at: datetime | None = None) -> datetime | None:
        """The moment in UTC (a naive one is in the supplier's zone); None if out of range.

        A naive time the zone's clocks show twice (the hour they go back) is read as the
        later of the two that is not after `received_at` (give or take CLOCK_SKEW): a
        report is sent once observed, so in that hour a live feed's times read as meant.
        Remembered per distinct moment: a feed usually stamps all its rows with one.
        """
        key = (moment, received_at)
        try:
            return self._utc[key]
        except KeyError:
            pass
        try:
            converted: datetime | None = self._converted(moment, received_at)
        except (OverflowError, ValueError):
            converted = None
        if len(self._utc) < 10_000:
            self._utc[key] = converted
        return converted

    def _converted(self, moment: datetime, received_at: datetime | None) -> datetime:
        if moment.tzinfo is not None:
            return moment.astimezone(UTC)
        first = moment.replace(tzinfo=self.zone, fold=0)
        second = moment.replace(tzinfo=self.zone, fold=1)
        earlier, later = first.astimezone(UTC), second.astimezone(UTC)
        shown_twice = earlier != later and all(
            instant.astimezone(self.zone).replace(tzinfo=None) == moment
            for instant in (earlier, later)
        )
        if shown_twice and received_at is not None and later <= received_at + CLOCK_SKEW:
            return later
        return earlier

    @classmethod
    def of(cls, terms: SupplierTerms) -> FeedRules:
        connector: dict[str, Any] = terms.connector or {}
        max_age = connector.get("max_age_seconds", terms.exclude_after_seconds)
        return cls(
            zone=ZoneInfo(terms.timezone),
            # Settings saved before they were bounded (connectors.config) may hold more than
            # the ledger takes or a delivery can stage (a factor is a PostgreSQL integer):
            # such a unit is unknown, its records refused alone, and the ceiling is the
            # ledger's own, so that no record fails the delivery it is in.
            units={
                unit_key(str(k)): int(v)
                for k, v in (connector.get("units") or {}).items()
                if 0 < int(v) <= MAX_FACTOR
            },
            max_quantity=min(
                int(connector.get("max_quantity", DEFAULT_MAX_QUANTITY)), MAX_QUANTITY
            ),
            max_age=None if max_age is None else timedelta(seconds=int(max_age)),
        )


@dataclass(frozen=True)
class Staged:
    """A record ready to be resolved to a SKU: `factor` is None when the mapping decides."""

    position: int
    supplier_sku: str | None
    upc: str | None
    quantity: int
    factor: int | None
    observed_at: datetime
    # Stock the supplier expects: [expected on (ISO date or None), quantity, the factor of
    # its own unit by the supplier's table (None: the mapping decides, or the line names
    # no unit and is in the record's), unit as written, unit as compared], in the order
    # reported; None: not said.
    incoming: list[list[Any]] | None = None


def normalise(
    record: Record, rules: FeedRules, received_at: datetime, now: datetime
) -> Staged | str:
    """The staged level, or why the record is refused."""
    written: tuple[str | None, ...] = (record.supplier_sku, record.upc, record.unit)
    written += tuple(expected.unit for expected in record.incoming or ())
    if any("\x00" in text for text in written if text):
        return "nul_character"  # PostgreSQL refuses it in text: staged, it failed the delivery
    if any(lone_surrogate(text) for text in written if text):
        return "lone_surrogate"  # UTF-8 cannot encode it: staged, it failed the delivery
    quantity = record.quantity
    if quantity is None:
        return "missing_quantity"
    if quantity < 0:
        return "negative_quantity"
    if record.supplier_sku is None and record.upc is None:
        return "missing_sku"
    factor = unit_factor(record.unit, rules)
    # Over the ceiling in any unit (a unit holds at least one base unit); in base units,
    # by the unit the mapping says, once resolved (see connectors.comparison).
    if quantity > rules.max_quantity:
        return "quantity_out_of_range"
    observed_at = observed_utc(record.observed_at, rules, received_at, now)
    if isinstance(observed_at, str):
        return observed_at
    incoming = incoming_staged(record, rules)
    if isinstance(incoming, str):
        return incoming
    return Staged(
        record.position, record.supplier_sku, record.upc, quantity, factor, observed_at, incoming
    )


def incoming_staged(record: Record, rules: FeedRules) -> list[list[Any]] | str | None:
    """The record's incoming stock as staged (None: it says nothing of it), or why the
    record is refused."""
    if record.incoming is None:
        return None
    staged: list[list[Any]] = []
    for expected in record.incoming:
        if expected.quantity < 0:
            return "negative_incoming"
        if expected.quantity > rules.max_quantity:
            return "quantity_out_of_range"
        on = None if expected.expected_on is None else expected.expected_on.isoformat()
        if expected.unit is None:  # in the record's unit, as resolved
            staged.append([on, expected.quantity, None, None, None])
        else:
            own = unit_factor(expected.unit, rules)
            staged.append([on, expected.quantity, own, expected.unit, unit_key(expected.unit)])
    return staged


def unit_factor(unit: str | None, rules: FeedRules) -> int | None:
    """Base units in one reported unit by the supplier's unit table, or 1 in a base unit;
    None where the unit is not said, or is neither (the mapping decides: its own unit, or
    `unknown_unit`)."""
    if unit is None:
        return None
    key = unit_key(unit)
    if key in rules.units:
        return rules.units[key]
    if key in BASE_UNITS:
        return 1
    return None


def observed_utc(
    observed_at: datetime | None, rules: FeedRules, received_at: datetime, now: datetime
) -> datetime | str:
    """When a record was observed, in UTC (received_at when it does not say), or why it is
    refused."""
    observed = rules.in_utc(observed_at or received_at, received_at)
    if observed is None:
        return "observed_at_out_of_range"
    if observed > now + CLOCK_SKEW:
        return "observed_at_in_future"
    if rules.max_age is not None and observed < now - rules.max_age:
        return "too_old"
    return observed


def record_fields(record: Record, received_at: datetime) -> dict[str, Any]:
    """What a dead letter keeps of a readable record, so that it can be tried again: with
    the time it was observed (or received), so a retry is not mistaken for news."""
    return {
        "supplier_sku": record.supplier_sku,
        "upc": record.upc,
        "quantity": record.quantity,
        "unit": record.unit,
        "observed_at": (record.observed_at or received_at).isoformat(),
        "incoming": None
        if record.incoming is None
        else [
            {
                "quantity": expected.quantity,
                "expected_on": expected.expected_on and expected.expected_on.isoformat(),
                "unit": expected.unit,
            }
            for expected in record.incoming
        ],
    }


def record_from_fields(position: int, fields: dict[str, Any], raw: dict[str, Any]) -> Record:
    observed = fields.get("observed_at")
    return Record(
        position=position,
        supplier_sku=fields.get("supplier_sku"),
        upc=fields.get("upc"),
        quantity=fields.get("quantity"),
        unit=fields.get("unit"),
        observed_at=None if observed is None else datetime.fromisoformat(observed),
        raw=raw,
        # Letters written before incoming stock was kept say nothing of it.
        incoming=None
        if fields.get("incoming") is None
        else tuple(
            Incoming(
                expected["quantity"],
                expected["expected_on"] and date.fromisoformat(expected["expected_on"]),
                expected.get("unit"),
            )
            for expected in fields["incoming"]
        ),
    )
