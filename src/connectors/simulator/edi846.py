"""EDI X12 846 (Inventory Inquiry/Advice) interchanges, as the 846 parser reads them by default.

One interchange, one functional group (GS "IB"), and a transaction set per run of items
observed at the same moment (at most `set_size` items each). Every set has a BIA with
that moment in UTC (BIA04 CCYYMMDD, BIA05 HHMMSS: naive, as X12 is), then per item a LIN
(SK supplier SKU, UP/EN code), a QTY 33 (available) with its unit and, with
`schedules=True`, an SCH line per shipment on the way. Counts and control numbers are
filled in: SE01, SE02 = ST02, GE01, GE02 = GS06, IEA01, IEA02 = ISA13.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from connectors.simulator.catalogue import Item, whole_seconds_utc

FLUSH_EVERY = 4096  # segments


@dataclass(frozen=True)
class Separators:
    """The three characters an interchange declares in its ISA."""

    element: str = "*"
    sub_element: str = ">"
    terminator: str = "~"

    def check(self) -> None:
        chosen = (self.element, self.sub_element, self.terminator)
        if len(set(chosen)) != 3 or any(len(c) != 1 or c.isalnum() or c == " " for c in chosen):
            raise ValueError(f"separators must be three distinct punctuation marks: {chosen}")


def write_edi846(
    items: Iterable[Item],
    target: BinaryIO,
    *,
    sender: str = "SIMULATOR",
    receiver: str = "STOCKLEDGER",
    control_number: int = 1,
    schedules: bool = False,
    separators: Separators = Separators(),
    set_size: int = 10_000,
) -> None:
    """The items as one 846 interchange; `control_number` is ISA13 and GS06."""
    separators.check()
    if not (0 < len(sender) <= 15 and 0 < len(receiver) <= 15):
        raise ValueError("sender and receiver are 1 to 15 characters")
    if not 0 < control_number < 10**9 or set_size < 1:
        raise ValueError("control_number is 1 to 999999999 and set_size at least 1")
    stream = iter(items)
    first = next(stream, None)
    prepared = _utc(first.observed_at) if first else whole_seconds_utc(datetime.now(UTC))
    out = _Output(target, separators)
    out.write(_isa(separators, sender, receiver, prepared, control_number))
    group = str(control_number)
    day, time = f"{prepared:%Y%m%d}", f"{prepared:%H%M}"
    out.segment("GS", "IB", out.clean(sender), out.clean(receiver), day, time, group, "X", "004010")
    sets = 0
    current: _Set | None = None
    for item in itertools.chain([first] if first else [], stream):
        observed_at = _utc(item.observed_at)
        if current is None or current.lines == set_size or observed_at != current.observed_at:
            if current is not None:
                current.close()
            sets += 1
            current = _Set(out, sets, observed_at, f"SIM{control_number:09d}-{sets}")
        current.add(item, schedules)
    if current is None:
        sets, current = 1, _Set(out, 1, prepared, f"SIM{control_number:09d}-1")
    current.close()
    out.segment("GE", str(sets), group)
    out.segment("IEA", "1", f"{control_number:09d}")
    out.flush()


class _Set:
    """One ST…SE transaction set being written; it counts its own segments."""

    def __init__(self, out: _Output, number: int, observed_at: datetime, reference: str) -> None:
        self.out, self.observed_at, self.lines = out, observed_at, 0
        self.control = f"{number:04d}"
        self.segments = 0
        self._segment("ST", "846", self.control)
        self._segment(
            "BIA", "00", "SI", reference, f"{observed_at:%Y%m%d}", f"{observed_at:%H%M%S}"
        )

    def add(self, item: Item, schedules: bool) -> None:
        self.lines += 1
        code = "UP" if len(item.upc) == 12 else "EN"
        sku, unit = self.out.clean(item.supplier_sku), self.out.clean(item.unit)
        self._segment("LIN", str(self.lines), "SK", sku, code, self.out.clean(item.upc))
        self._segment("QTY", "33", str(item.quantity), unit)
        for incoming in item.incoming if schedules else ():
            expected = f"{incoming.expected_on:%Y%m%d}" if incoming.expected_on else ""
            dated = ("", "", "018", expected) if expected else ()
            self._segment(
                "SCH", str(incoming.quantity), self.out.clean(incoming.unit or unit), *dated
            )

    def close(self) -> None:
        self._segment("CTT", str(self.lines))
        self._segment("SE", str(self.segments + 1), self.control)

    def _segment(self, *elements: str) -> None:
        self.segments += 1
        self.out.segment(*elements)


class _Output:
    """Segments joined with the declared separators, written to the target in batches."""

    def __init__(self, target: BinaryIO, separators: Separators) -> None:
        self._target = target
        self._element = separators.element
        self._ending = separators.terminator + "\n"
        self._reserved = (separators.element, separators.sub_element, separators.terminator)
        self._pending: list[str] = []

    def segment(self, *elements: str) -> None:
        self._pending.append(self._element.join(elements) + self._ending)
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def write(self, text: str) -> None:
        self._pending.append(text)

    def clean(self, value: str) -> str:
        """The value, refused if it holds a separator (X12 has no escaping)."""
        if any(reserved in value for reserved in self._reserved):
            raise ValueError(f"{value!r} holds one of the separators {self._reserved}")
        return value

    def flush(self) -> None:
        self._target.write("".join(self._pending).encode())
        self._pending.clear()


def _isa(separators: Separators, sender: str, receiver: str, at: datetime, control: int) -> str:
    """The fixed-width 106-character ISA, its terminator included."""
    e = separators.element
    elements = (
        "ISA", "00", " " * 10, "00", " " * 10, "ZZ", f"{sender:<15}", "ZZ", f"{receiver:<15}",
        f"{at:%y%m%d}", f"{at:%H%M}", "U", "00401", f"{control:09d}", "0", "P",
    )  # fmt: skip
    isa = e.join(elements) + e + separators.sub_element + separators.terminator
    assert len(isa) == 106
    return isa + "\n"


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo else moment
