"""SKU mappings: which internal SKU a supplier's item is, and how many base units it holds.

`units_per_supplier_unit` counts the base units in one of the supplier's units of this
item: in a report that names no unit, or that names the mapping's own `unit` (say "CA",
where this item's case holds 24 and another item's 12). A report in any other unit is
converted by the supplier's unit table, or counts as is in a base unit.

One aggregate per (supplier, supplier SKU): a supplier with 100k mappings has 100k
small streams, none of which ever needs a snapshot, and an auditor can read why a
report landed on a SKU from the mapping's own history.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import AggregateCreated

from ledger.base import Cause, LedgerAggregate

# Units that count one base unit each, whatever the supplier.
BASE_UNITS = frozenset({"EA", "EACH", "PC", "PCS", "PIECE", "PIECES", "UNIT", "UNITS", "UN"})


def unit_key(unit: str) -> str:
    """A unit as units are compared: trimmed, in upper case ("cs " is "CS")."""
    return unit.strip().upper()


# Why a report that names no unit, made before its mapping's factor changed, is refused.
MADE_BEFORE_UNITS = "made_before_units_changed"


def unknown_unit(unit: str) -> str:
    """Why a record in a unit that neither its supplier nor its mapping knows is refused."""
    return f"unknown_unit: {unit!r}"


@dataclass(frozen=True)
class MappingSpec:
    """A wanted mapping, as an operator states it."""

    supplier_sku: str
    sku: str
    units_per_supplier_unit: int = 1
    upc: str | None = None
    # The supplier's unit that `units_per_supplier_unit` counts (kept as units compare:
    # trimmed, upper case); None: only a report that names no unit.
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.unit is not None:
            key = unit_key(self.unit)
            if key in BASE_UNITS:
                raise ValueError(f"{self.unit!r} is a base unit: it always counts one")
            object.__setattr__(self, "unit", key)


def _naming_no_unit(state: dict[str, Any]) -> None:
    """Upcasts a mapping's state or event from before mappings named units (version 1)."""
    state["unit"] = None


def _units_never_changed(state: dict[str, Any]) -> None:
    """Upcasts a mapping's state from before it kept when its factor changed (version 2):
    none known, as no report was refused for it then."""
    state["units_since"] = None
    state["own_unit_since"] = None


class SkuMapping(LedgerAggregate):
    TOPIC = "stockledger:SkuMapping"
    # 2: a mapping may name its own unit (a state stored before names none).
    # 3: when `units_per_supplier_unit` last changed (`units_since`, `own_unit_since`).
    class_version = 3

    upcast_v1_v2 = staticmethod(_naming_no_unit)
    upcast_v2_v3 = staticmethod(_units_never_changed)

    class Mapped(LedgerAggregate.Event, AggregateCreated):
        """An item mapped to a SKU of ours; `unit`, the supplier's unit its factor counts
        (version 2: one stored before names none)."""

        TOPIC = "stockledger:SkuMapping.Mapped"
        class_version = 2
        supplier_id: str
        supplier_sku: str
        sku: str
        units_per_supplier_unit: int
        upc: str | None
        unit: str | None

        upcast_v1_v2 = staticmethod(_naming_no_unit)

    class Remapped(LedgerAggregate.Event):
        """A mapping changed (version 2 names the unit; one stored before names none)."""

        TOPIC = "stockledger:SkuMapping.Remapped"
        class_version = 2
        sku: str
        units_per_supplier_unit: int
        upc: str | None
        unit: str | None

        upcast_v1_v2 = staticmethod(_naming_no_unit)

        def apply(self, mapping: SkuMapping) -> None:
            if self.units_per_supplier_unit != mapping.units_per_supplier_unit:
                mapping.units_since = self.timestamp
                if self.unit is not None and self.unit == mapping.unit:
                    mapping.own_unit_since = self.timestamp
            mapping.sku = self.sku
            mapping.units_per_supplier_unit = self.units_per_supplier_unit
            mapping.upc = self.upc
            mapping.unit = self.unit

    def __init__(
        self,
        supplier_id: str,
        supplier_sku: str,
        sku: str,
        units_per_supplier_unit: int,
        upc: str | None,
        unit: str | None,
    ) -> None:
        self.supplier_id = supplier_id
        self.supplier_sku = supplier_sku
        self.sku = sku
        self.units_per_supplier_unit = units_per_supplier_unit
        self.upc = upc
        self.unit = unit
        # When `units_per_supplier_unit` last changed: a report that names no unit, made
        # before then, counted the old factor; and when it last changed while the mapping
        # named the same `unit`: a report naming it, made before then, did too (see
        # `made_before_units`).
        self.units_since: datetime | None = None
        self.own_unit_since: datetime | None = None

    def made_before_units(self, unit: str | None, observed_at: datetime) -> bool:
        """Whether a report in this unit (None: it names none), made then, was counted in
        a factor the mapping no longer has: 9 pieces reported before a change to cases of
        12, delivered after it, counted 108 (a fuzzer); so was one naming the mapping's
        own unit before the factor of that unit changed (a case of 12 now of 24: a
        review). A report naming another unit, or a unit the mapping came to name, is
        taken at its word (a letter refused for a unit the change names then applies)."""
        if unit is None:
            since = self.units_since
        elif self.unit is not None and unit_key(unit) == self.unit:
            since = self.own_unit_since
        else:
            return False
        return since is not None and observed_at < since

    def factor(self, unit: str | None) -> int | None:
        """Base units in one of this item's units as reported (None: it names none), where
        the mapping counts that unit; None where it does not."""
        if unit is None or (self.unit is not None and unit_key(unit) == self.unit):
            return self.units_per_supplier_unit
        return None

    @staticmethod
    @functools.lru_cache(maxsize=200_000)
    def id_for(supplier_id: str, supplier_sku: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/mapping/{supplier_id}/{supplier_sku}")

    @classmethod
    def map(cls, supplier_id: str, spec: MappingSpec, at: datetime, cause: Cause) -> SkuMapping:
        return cls._create(
            cls.Mapped,
            id=cls.id_for(supplier_id, spec.supplier_sku),
            supplier_id=supplier_id,
            supplier_sku=spec.supplier_sku,
            sku=spec.sku,
            units_per_supplier_unit=spec.units_per_supplier_unit,
            upc=spec.upc,
            unit=spec.unit,
            timestamp=at,
            **cause.as_kwargs(),
        )

    def remap(self, spec: MappingSpec, at: datetime, cause: Cause) -> bool:
        """Records a changed mapping; False when it is already as wanted."""
        if (spec.sku, spec.units_per_supplier_unit, spec.upc, spec.unit) == (
            self.sku,
            self.units_per_supplier_unit,
            self.upc,
            self.unit,
        ):
            return False
        self.trigger_event(
            self.Remapped,
            sku=spec.sku,
            units_per_supplier_unit=spec.units_per_supplier_unit,
            upc=spec.upc,
            unit=spec.unit,
            timestamp=at,
            **cause.as_kwargs(),
        )
        return True
