"""Why the ledger refuses a command. The API maps each to a status and an error code."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class LedgerError(Exception):
    """A command the ledger refuses; nothing was changed."""

    code = "ledger_error"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NotFound(LedgerError):
    code = "not_found"


class UnknownSku(NotFound):
    code = "unknown_sku"


class UnknownSupplier(NotFound):
    code = "unknown_supplier"


class ReservationNotFound(NotFound):
    code = "reservation_not_found"


class Conflict(LedgerError):
    code = "conflict"


class IdempotencyKeyMismatch(Conflict):
    code = "idempotency_key_mismatch"


class DeliveryConflict(Conflict):
    code = "delivery_id_conflict"


class InvalidState(Conflict):
    code = "invalid_state"


class ExceedsOpenQuantity(Conflict):
    code = "exceeds_open_quantity"


class SupplierNotOnLine(LedgerError):
    """A fulfil that names a supplier the line's units were never allocated to: it can never
    ship from there (a 422, where a supplier whose units have all shipped is a 409)."""

    code = "supplier_not_on_line"


@dataclass(frozen=True)
class OpenAgainstSupplier:
    """What a remap would leave behind on a SKU: units held and committed against the
    supplier there, and units taken off its level until its next report (shipments, a net
    supplier's commitments), as a count: the stock view's `unreported` is the sum of such
    changes, negative for these."""

    supplier_sku: str
    sku: str
    held: int
    committed: int
    awaiting_report: int


class OrdersOpenOnRemap(Conflict):
    """A mapping PUT would move a supplier SKU off a SKU with orders open against the
    supplier there; nothing in the PUT was applied."""

    code = "orders_open_on_remap"

    def __init__(self, supplier_id: str, blocked: list[OpenAgainstSupplier]) -> None:
        super().__init__(
            f"supplier {supplier_id!r} has units promised on the SKUs these mappings move its"
            " SKUs away from (held, committed, or shipped and not in a report of its since):"
            " its next report would count them again under the new SKU. Remap once the"
            " orders are shipped or released and the supplier has reported since (holds run"
            " out by themselves); nothing was applied",
            blocked=[asdict(entry) for entry in blocked],
        )
        self.blocked = blocked


@dataclass(frozen=True)
class Shortfall:
    """One SKU of an order that stock cannot cover."""

    sku: str
    requested: int
    available: int


class InsufficientStock(Conflict):
    """Some lines of an order cannot be covered; no line was reserved."""

    code = "insufficient_stock"

    def __init__(self, shortfalls: list[Shortfall]) -> None:
        super().__init__(
            "not enough stock for every line of the order",
            lines=[asdict(shortfall) for shortfall in shortfalls],
        )
        self.shortfalls = shortfalls


class Unstorable(LedgerError):
    """The command holds a value the event store cannot keep (text that is not Unicode,
    say a lone surrogate): refused alone, the rest of its batch saved."""

    code = "unstorable_value"


class InvalidTerms(LedgerError):
    """Terms that break a rule across terms once merged with those kept as saved (an
    update that sets only `stale_after_seconds` past the saved `exclude_after_seconds`)."""

    code = "invalid_terms"


class NotYetRecorded(LedgerError):
    """A time or log position the ledger has not reached yet: what held there is unknown
    (an audit of a SKU then, say)."""

    code = "not_yet_recorded"


class ContentionTooHigh(LedgerError):
    """The command kept losing optimistic-concurrency races and gave up."""

    code = "contention"
