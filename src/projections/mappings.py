"""The SKU mappings view: supplier SKU (or UPC) to internal SKU, for lookups and operators."""

from __future__ import annotations

from typing import Any, ClassVar

from ledger.base import LedgerAggregate
from ledger.mapping import SkuMapping
from projections.base import StateProjection


class MappingsProjection(StateProjection):
    name = "mappings"
    schema_version = 1
    tables: ClassVar[list[str]] = ["mappings"]
    state_tables: ClassVar[dict[type[LedgerAggregate], str]] = {SkuMapping: "mappings"}

    def ddl(self) -> list[str]:
        return [
            """CREATE TABLE {schema}.mappings (
                id uuid PRIMARY KEY, supplier_id text NOT NULL, supplier_sku text NOT NULL,
                sku text NOT NULL, units_per_supplier_unit integer NOT NULL, upc text,
                version integer NOT NULL, position bigint NOT NULL,
                updated_at timestamptz NOT NULL, state bytea NOT NULL,
                UNIQUE (supplier_id, supplier_sku))""",
            "CREATE INDEX ON {schema}.mappings (supplier_id, upc)",
            "CREATE INDEX ON {schema}.mappings (sku)",
        ]

    def columns(self, aggregate: Any) -> dict[str, Any]:
        assert isinstance(aggregate, SkuMapping)
        return {
            "supplier_id": aggregate.supplier_id,
            "supplier_sku": aggregate.supplier_sku,
            "sku": aggregate.sku,
            "units_per_supplier_unit": aggregate.units_per_supplier_unit,
            "upc": aggregate.upc,
        }
