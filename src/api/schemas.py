"""Request and answer bodies of the HTTP API (never domain events)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from connectors.config import check_connector
from ledger.mapping import BASE_UNITS, unit_key

# Identifiers: printable, no control characters, bounded. Every text a client sends that
# reaches the database keeps to PRINTABLE (PostgreSQL refuses a NUL in text: without the
# check that was a 500 for the client's mistake). Nor the C1 controls (U+0080-U+009F), nor
# U+FFFD, which stands for bytes that were not UTF-8 (`/v1/skus/%FF` and `%FE` named one
# SKU, made by the first): an API fuzzing walkthrough.
NOT_PRINTABLE = r"\x00-\x1f\x7f-\x9f\ufffd"  # a character class's body, for other patterns
PRINTABLE = rf"^[^{NOT_PRINTABLE}]+$"
# A header's text: printable ASCII. HTTP carries headers as bytes read as Latin-1, so an
# id sent in UTF-8 was kept garbled (an emoji as "ð\x9f\x98\x80").
PRINTABLE_ASCII = r"^[\x20-\x7e]+$"
# Free text (a note, a reason) may run over lines, but holds no NUL.
NO_NUL = r"^[^\x00]*$"
Sku = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=PRINTABLE)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=PRINTABLE)]
# "." and ".." are path steps to a client, resolved before it sends a request
# (`/v1/suppliers/..` goes out as `/v1/`): a name that is one, between the slashes of a
# path, could be created but never reached again.
DOT_SEGMENTS = frozenset({".", ".."})
# Letters, digits, ".", "_" and "-", up to 64, but not "." or "..". Spelt out in three
# branches (starts with no dot; with one dot, then no dot; with two dots, then anything)
# since pydantic's regex engine has no look-ahead.
SUPPLIER_ID_PATTERN = (
    r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}"
    r"|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}"
    r"|\.\.[A-Za-z0-9._-]{1,62})$"
)


def addressable_sku(sku: str) -> str:
    """Refuses a SKU that `/v1/availability/{sku}` and `/v1/skus/{sku}/...` cannot reach."""
    # A "/" is routed as a separator even when sent as %2F (decoded before routing).
    if "/" in sku or sku in DOT_SEGMENTS:
        raise ValueError(
            f"{sku!r} cannot name a SKU: a SKU is one step of a URL path (/v1/skus/{{sku}}),"
            " so it holds no '/' and is not '.' or '..'"
        )
    return sku


# Names a delivery id may not take: under `/v1/feeds/` it names the feeds' health.
RESERVED_DELIVERY_IDS = frozenset({"health"})


def delivery_id_problem(delivery: str) -> str | None:
    """Why a delivery id cannot be given (its status is read at `/v1/feeds/{id}`), if so."""
    if delivery in RESERVED_DELIVERY_IDS:
        return f"{delivery!r} cannot name a delivery: choose another id"
    # Slashes are kept in its address, so a "." or ".." between them is resolved by the
    # client following it (`/v1/feeds/a/../c` is asked for as `/v1/feeds/c`). Empty steps
    # (`a//b`, `/a`, `a/`) are sent as they are, and found.
    if DOT_SEGMENTS.intersection(delivery.split("/")):
        return (
            f"{delivery!r} cannot name a delivery: clients resolve a '.' or '..' between the"
            " slashes of its address (`a/../c` is asked for as `c`): choose another id"
        )
    return None


# A SKU named where the catalogue may gain it (a mapping's `sku`, `PUT /v1/skus/{sku}`).
# Only there: a SKU an order or a report names is looked up as sent (one on record from
# before this rule still sells), and an unknown one is refused as unknown.
NewSku = Annotated[Sku, AfterValidator(addressable_sku)]
# JSON numbers only: true, 1.0 and "1" are not quantities.
Quantity = Annotated[StrictInt, Field(gt=0, le=10**9)]
# Staleness limits beyond ten years are a mistake, and would overflow time arithmetic.
Seconds = Annotated[StrictInt, Field(gt=0, le=10 * 365 * 24 * 3600)]


class Strict(BaseModel):
    """Unknown fields are refused: a typo must not pass silently."""

    model_config = ConfigDict(extra="forbid")


# Suppliers and mappings -------------------------------------------------------


# Names the zone database answers that are not a place's zone: the host's own zone (which
# moves with the machine the ledger runs on), the legacy rules file, and "-00"; and the
# copies of every zone under `posix/` (the same) and `right/` (counting leap seconds, 27
# s off the clocks suppliers keep), refused so that one zone has one name.
NOT_PLACES = frozenset({"localtime", "posixrules", "Factory"})
NOT_PLACE_PREFIXES = ("posix/", "right/")


class SupplierIn(Strict):
    # A new supplier without one is named by its id; an existing one keeps its own.
    name: Name | None = None
    # Numbers as numbers, true and false as themselves: `"priority": true` or `"1"` was
    # taken as 1 (an API fuzzing walkthrough), where an order's body refuses both.
    priority: StrictInt = Field(default=100, ge=0, le=1_000_000, description="lower wins")
    lead_time_days: StrictInt = Field(default=0, ge=0, le=3650)
    moq: StrictInt | None = Field(default=None, gt=0, le=10**9)
    buffer: StrictInt = Field(default=0, ge=0, le=10**9)
    stale_after_seconds: Seconds | None = None
    exclude_after_seconds: Seconds | None = None
    reports_net_of_our_orders: StrictBool = False
    timezone: str = "UTC"
    connector: dict[str, Any] = Field(default_factory=dict, description="connector settings")

    @field_validator("connector")
    @classmethod
    def _usable_connector(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_connector(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value in NOT_PLACES or value.startswith(NOT_PLACE_PREFIXES):
            raise ValueError(f"{value!r} names no place's time zone")
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown time zone {value!r}") from error
        return value

    @model_validator(mode="after")
    def _exclusion_after_staleness(self) -> SupplierIn:
        stale, exclude = self.stale_after_seconds, self.exclude_after_seconds
        if stale is not None and exclude is not None and exclude < stale:
            raise ValueError("exclude_after_seconds must not be shorter than stale_after_seconds")
        return self


class SupplierOut(SupplierIn):
    supplier_id: str
    # As saved: a name saved before PRINTABLE refused C1 controls and U+FFFD is shown.
    name: str

    # Shown as saved: settings saved before a check was added (a key since refused, a
    # bound since set) must not make the supplier unreadable; they are checked again
    # when saved again.
    @field_validator("connector")
    @classmethod
    def _usable_connector(cls, value: dict[str, Any]) -> dict[str, Any]:
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return value

    @model_validator(mode="after")
    def _exclusion_after_staleness(self) -> SupplierOut:
        return self


class MappingIn(Strict):
    supplier_sku: Sku
    sku: NewSku
    units_per_supplier_unit: StrictInt = Field(default=1, gt=0, le=1_000_000)
    upc: Annotated[str, StringConstraints(pattern=r"^[0-9]{8,14}$")] | None = None
    # The supplier's unit that `units_per_supplier_unit` counts for this item (say "CA",
    # where its case holds 24): kept upper case, as a report's unit is compared.
    unit: Annotated[str, StringConstraints(pattern=r"^\s*[A-Za-z0-9_.-]{1,16}\s*$")] | None = None

    @field_validator("unit")
    @classmethod
    def _not_a_base_unit(cls, unit: str | None) -> str | None:
        if unit is None:
            return None
        key = unit_key(unit)
        if key in BASE_UNITS:
            raise ValueError(f"{unit!r} is a base unit: it always counts one")
        return key


class MappingsIn(Strict):
    mappings: list[MappingIn] = Field(min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _one_per_supplier_sku(self) -> MappingsIn:
        seen: set[str] = set()
        for mapping in self.mappings:
            if mapping.supplier_sku in seen:
                raise ValueError(f"supplier_sku {mapping.supplier_sku!r} appears twice")
            seen.add(mapping.supplier_sku)
        return self


class UpsertOut(BaseModel):
    created: int
    updated: int
    unchanged: int
    position: int | None


class SkuIn(Strict):
    safety_stock: StrictInt = Field(ge=0, le=10**9)


# Stock reports ------------------------------------------------------------------


class IncomingIn(Strict):
    """Stock the supplier expects, in the record's unit, and when (if it says)."""

    quantity: StrictInt
    expected_on: date | None = None


class ObservationIn(Strict):
    """One record of a report; validated on its own so that one bad record refuses only itself.
    `incoming`: the stock the supplier expects ([]: none; absent or null: the report says
    nothing of it, and the schedule on record stands)."""

    supplier_sku: Sku | None = None
    sku: Sku | None = None
    quantity: StrictInt
    unit: (
        Annotated[str, StringConstraints(min_length=1, max_length=16, pattern=PRINTABLE)] | None
    ) = None
    observed_at: datetime
    incoming: list[IncomingIn] | None = Field(default=None, max_length=100)

    @model_validator(mode="after")
    def _one_identifier(self) -> ObservationIn:
        if (self.supplier_sku is None) == (self.sku is None):
            raise ValueError("give exactly one of supplier_sku and sku")
        return self


class StockReportIn(Strict):
    delivery_id: Name | None = None
    observations: list[dict[str, Any]] = Field(min_length=1)


class RejectedOut(BaseModel):
    index: int
    reason: str


class StockReportOut(BaseModel):
    delivery_id: str
    rows: int
    applied: int
    unchanged: int
    late: int
    rejected: list[RejectedOut]
    position: int | None


# Reservations -------------------------------------------------------------------


class LineIn(Strict):
    sku: Sku
    quantity: Quantity


class ReservationIn(Strict):
    order_id: Name
    lines: list[LineIn] = Field(min_length=1)
    ttl_seconds: StrictInt | None = Field(default=None, gt=0)


class ExtendIn(Strict):
    ttl_seconds: StrictInt = Field(gt=0)


class ConfirmIn(Strict):
    """A confirm takes no fields: it commits the whole hold. A body is read so that one
    naming fields (lines to confirm, say) is refused, not ignored (a walkthrough)."""


class ReleaseIn(Strict):
    reason: Annotated[str, StringConstraints(max_length=500, pattern=NO_NUL)] | None = None


class FulfilLineIn(Strict):
    sku: Sku
    quantity: Quantity
    supplier_id: Annotated[str, StringConstraints(pattern=SUPPLIER_ID_PATTERN)] | None = None


class FulfilIn(Strict):
    lines: list[FulfilLineIn] = Field(min_length=1, max_length=1000)


class CancelIn(Strict):
    """Units of some lines the order no longer wants, cancelled before they ship."""

    lines: list[FulfilLineIn] = Field(min_length=1, max_length=1000)
    reason: Annotated[str, StringConstraints(max_length=500, pattern=NO_NUL)] | None = None


class ReturnLineIn(Strict):
    sku: Sku
    quantity: Quantity
    # The supplier that shipped the units: else they are taken back from the line's
    # suppliers in the order they were allocated (an OMS knew, and could not say: a
    # walkthrough).
    supplier_id: Annotated[str, StringConstraints(pattern=SUPPLIER_ID_PATTERN)] | None = None


class ReturnIn(Strict):
    lines: list[ReturnLineIn] = Field(min_length=1, max_length=1000)
    # JSON true or false only: "yes", "false" and 1 are not answers (a lax bool took "no"
    # as false and "yes" as true, where a quantity of "3" is refused).
    restock: StrictBool


class AllocationOut(BaseModel):
    supplier_id: str
    quantity: int
    fulfilled: int
    returned: int
    cancelled: int


class ReservationLineOut(BaseModel):
    sku: str
    quantity: int
    fulfilled: int
    returned: int
    cancelled: int
    allocations: list[AllocationOut]


class ReservationOut(BaseModel):
    reservation_id: str
    order_id: str
    status: str
    expires_at: datetime
    created_at: datetime
    confirmed_at: datetime | None
    lines: list[ReservationLineOut]


class ReservationListOut(BaseModel):
    items: list[ReservationOut]
    position: int
    # Listed by status: the last reservation's id when the page is full, to page on with
    # `after`; null on the last page, and for an order's reservations.
    next_after: str | None = None
    # An order's reservations: true when it has more than the ORDER_LISTED listed (the
    # first made), which were cut silently (an OMS walkthrough).
    truncated: bool = False


# Availability -------------------------------------------------------------------


class IncomingOut(BaseModel):
    """Stock a supplier's last report said it expects (EDI SCH lines): never sellable."""

    quantity: int
    expected_on: date | None


class SupplierLevelOut(BaseModel):
    supplier_id: str
    quantity: int
    observed_at: datetime | None
    age_seconds: int | None
    stale: bool
    excluded: bool
    lead_time_days: int | None
    incoming: list[IncomingOut]


class AvailabilityOut(BaseModel):
    sku: str
    on_hand: int
    sellable: int
    held: int
    committed: int
    available: int
    safety_stock: int
    status: str
    eta_days: int | None
    suppliers: list[SupplierLevelOut]
    position: int


class AvailabilityBatchOut(BaseModel):
    items: list[AvailabilityOut]
    unknown: list[str]
