"""A supplier's catalogue as the simulator reports it: seeded, large, and changing on demand.

Every item of one snapshot is observed at the same moment (`Catalogue.observed_at`, UTC,
whole seconds, since EDI carries no more). The same seed, size, times and sequence of
`advance` calls always give the same snapshots.
"""

from __future__ import annotations

import random
import threading
from array import array
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import NamedTuple

from connectors.parsers import Incoming

CASE_SIZE = 12  # units in one "CS"
MAX_SIZE = 10**9  # nine digits of item number in the UPC
UPC_PREFIX = "2"  # GS1 restricted-circulation numbers: they never name a real product


class Item(NamedTuple):
    """One line of a supplier's stock report."""

    supplier_sku: str
    upc: str
    quantity: int
    unit: str
    observed_at: datetime
    incoming: tuple[Incoming, ...] = ()

    @property
    def units_per_supplier_unit(self) -> int:
        """How many base units one reported unit holds (a case holds CASE_SIZE)."""
        return CASE_SIZE if self.unit == "CS" else 1


class Page(NamedTuple):
    """A consistent slice of one catalogue version."""

    version: int
    observed_at: datetime
    total: int
    items: list[Item]


def gtin_check_digit(data: str) -> str:
    """The GS1 check digit of a UPC/EAN/GTIN without its last digit."""
    return str(-_weighted(data) % 10)


def _weighted(data: str) -> int:
    """The GS1 weighted sum: 3 for the last digit, 1 for the one before it, and so on."""
    return sum(int(digit) * (3 - 2 * (i % 2)) for i, digit in enumerate(reversed(data)))


# Weighted sums of three-digit groups, so that a million check digits cost a few lookups
# each: a group ending at an odd position from the right weighs 3-1-3, at an even one 1-3-1.
_ODD_GROUP = tuple(_weighted(f"{n:03d}") for n in range(1000))
_EVEN_GROUP = tuple(_weighted(f"{n:03d}0") for n in range(1000))


def whole_seconds_utc(moment: datetime) -> datetime:
    """An aware time in UTC without microseconds; a naive one is refused."""
    if moment.tzinfo is None:
        raise ValueError("observed_at must carry a time zone")
    return moment.astimezone(UTC).replace(microsecond=0)


class Catalogue:
    """N items of one simulated supplier; `advance` makes the next stock report.

    About `case_fraction` of the items are counted in cases ("CS" of 12), the rest in
    eaches ("EA"); about `incoming_fraction` have a shipment on the way (EDI SCH lines).
    Safe to read from several threads while one advances it.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        observed_at: datetime | None = None,
        prefix: str = "SIM",
        case_fraction: float = 0.1,
        incoming_fraction: float = 0.05,
    ) -> None:
        if not 0 <= size <= MAX_SIZE:
            raise ValueError(f"size must be between 0 and {MAX_SIZE}")
        self.size = size
        self.seed = seed
        self.prefix = prefix
        self.version = 0
        self.observed_at = whole_seconds_utc(observed_at or datetime.now(UTC))
        self.lock = threading.RLock()
        self._random = random.Random(seed)
        self._quantities = array("q", (self._random.randrange(500) for _ in range(size)))
        # One random byte per item decides its unit and whether stock is on the way.
        self._kinds = self._random.randbytes(size)
        self._case_below = round(256 * case_fraction)
        self._incoming_from = 256 - round(256 * incoming_fraction)
        self._upc_head = f"{UPC_PREFIX}{seed % 10}"

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Item]:
        return self.items()

    def __getitem__(self, index: int) -> Item:
        return self.page(index, index + 1).items[0]

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        """The items of the current version (taken at the call), streamed one by one."""
        with self.lock:
            quantities = self._quantities[start:stop]
            observed_at = self.observed_at
        return self._stream(start, quantities, observed_at)

    def page(self, start: int, stop: int) -> Page:
        """Items start..stop of the current version, with the version they belong to."""
        with self.lock:
            items = list(self._stream(start, self._quantities[start:stop], self.observed_at))
            return Page(self.version, self.observed_at, self.size, items)

    def advance(self, changed_fraction: float, at: datetime | None = None) -> list[Item]:
        """Make the next report, observed `at` (default: now); returns the changed items.

        Exactly round(changed_fraction * size) quantities move by a random step, never
        below zero; the others stay as they were.
        """
        if not 0 <= changed_fraction <= 1:
            raise ValueError("changed_fraction must be between 0 and 1")
        with self.lock:
            moment = whole_seconds_utc(at or datetime.now(UTC))
            if at is None:
                moment = max(moment, self.observed_at + timedelta(seconds=1))
            if moment <= self.observed_at:
                raise ValueError(f"at must be after {self.observed_at.isoformat()}")
            changed = sorted(
                self._random.sample(range(self.size), round(self.size * changed_fraction))
            )
            for index in changed:
                self._quantities[index] = self._step(self._quantities[index])
            self.version += 1
            self.observed_at = moment
            return [self[index] for index in changed]

    def _step(self, quantity: int) -> int:
        step = self._random.randint(1, 10 + quantity // 10)
        if self._random.random() < 0.5:
            return quantity - step if quantity >= step else (0 if quantity else step)
        return quantity + step

    def _stream(self, start: int, quantities: array[int], observed_at: datetime) -> Iterator[Item]:
        kinds, case_below, incoming_from = self._kinds, self._case_below, self._incoming_from
        head, prefix = self._upc_head, self.prefix
        head_sum, odd, even = _weighted(f"{head}000000000"), _ODD_GROUP, _EVEN_GROUP
        today = observed_at.date()
        for index, quantity in enumerate(quantities, start):
            kind = kinds[index]
            unit = "CS" if kind < case_below else "EA"
            upc_sum = head_sum + odd[index // 1_000_000] + even[index // 1000 % 1000]
            upc = f"{head}{index:09d}{-(upc_sum + odd[index % 1000]) % 10}"
            incoming = _incoming(index, unit, today) if kind >= incoming_from else ()
            yield Item(
                f"{prefix}-{index + 1:06d}",
                upc,
                quantity,
                unit,
                observed_at,
                incoming,
            )


def _incoming(index: int, unit: str, today: date) -> tuple[Incoming, ...]:
    return (Incoming(10 * (index % 10 + 1), today + timedelta(days=7 + index % 21), unit),)
