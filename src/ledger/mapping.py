"""SKU mappings: which internal SKU a supplier's item is, and how many base units it holds.

One aggregate per (supplier, supplier SKU): a supplier with 100k mappings has 100k
small streams, none of which ever needs a snapshot, and an auditor can read why a
report landed on a SKU from the mapping's own history.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import AggregateCreated

from ledger.base import Cause, LedgerAggregate


@dataclass(frozen=True)
class MappingSpec:
    """A wanted mapping, as an operator states it."""

    supplier_sku: str
    sku: str
    units_per_supplier_unit: int = 1
    upc: str | None = None


class SkuMapping(LedgerAggregate):
    TOPIC = "stockledger:SkuMapping"

    class Mapped(LedgerAggregate.Event, AggregateCreated):
        TOPIC = "stockledger:SkuMapping.Mapped"
        supplier_id: str
        supplier_sku: str
        sku: str
        units_per_supplier_unit: int
        upc: str | None

    class Remapped(LedgerAggregate.Event):
        TOPIC = "stockledger:SkuMapping.Remapped"
        sku: str
        units_per_supplier_unit: int
        upc: str | None

        def apply(self, mapping: SkuMapping) -> None:
            mapping.sku = self.sku
            mapping.units_per_supplier_unit = self.units_per_supplier_unit
            mapping.upc = self.upc

    def __init__(
        self,
        supplier_id: str,
        supplier_sku: str,
        sku: str,
        units_per_supplier_unit: int,
        upc: str | None,
    ) -> None:
        self.supplier_id = supplier_id
        self.supplier_sku = supplier_sku
        self.sku = sku
        self.units_per_supplier_unit = units_per_supplier_unit
        self.upc = upc

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
            timestamp=at,
            **cause.as_kwargs(),
        )

    def remap(self, spec: MappingSpec, at: datetime, cause: Cause) -> bool:
        """Records a changed mapping; False when it is already as wanted."""
        if (spec.sku, spec.units_per_supplier_unit, spec.upc) == (
            self.sku,
            self.units_per_supplier_unit,
            self.upc,
        ):
            return False
        self.trigger_event(
            self.Remapped,
            sku=spec.sku,
            units_per_supplier_unit=spec.units_per_supplier_unit,
            upc=spec.upc,
            timestamp=at,
            **cause.as_kwargs(),
        )
        return True
