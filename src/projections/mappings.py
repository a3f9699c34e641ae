"""The SKU mappings view: supplier SKU (or UPC) to internal SKU, for lookups and operators."""

from __future__ import annotations

from typing import Any, ClassVar

from ledger.base import LedgerAggregate
from ledger.mapping import SkuMapping
from projections.base import StateProjection


class MappingsProjection(StateProjection):
    name = "mappings"
    # 2: a mapping's own unit. No event before it named one: an upgraded generation's
    # rows name none, as a rebuild would write them.
    # 3: when its factor last changed (`units_since`, `own_unit_since`). Upgraded in
    # place, though the events before could fill them (see `Projection.upgrades`): a
    # rebuild of a large catalogue's mappings takes minutes, while the live generation,
    # lacking the columns, would fail every delivery. A generation so upgraded knows of
    # no change made before (its rows' states kept none), and feeds then read a record
    # made before such a change in the new factor, as before this version; the ledger's
    # own reports (it replays the mappings' events) and a rebuild (`ledger projections
    # rebuild`) know every one.
    schema_version = 3
    upgrades: ClassVar[dict[int, list[str]]] = {
        2: ["ALTER TABLE {schema}.mappings ADD COLUMN IF NOT EXISTS unit text"],
        3: [
            "ALTER TABLE {schema}.mappings ADD COLUMN IF NOT EXISTS units_since timestamptz",
            "ALTER TABLE {schema}.mappings ADD COLUMN IF NOT EXISTS own_unit_since timestamptz",
        ],
    }
    tables: ClassVar[list[str]] = ["mappings"]
    state_tables: ClassVar[dict[type[LedgerAggregate], str]] = {SkuMapping: "mappings"}

    def ddl(self) -> list[str]:
        return [
            """CREATE TABLE {schema}.mappings (
                id uuid PRIMARY KEY, supplier_id text NOT NULL, supplier_sku text NOT NULL,
                sku text NOT NULL, units_per_supplier_unit integer NOT NULL, upc text,
                unit text, units_since timestamptz, own_unit_since timestamptz,
                version integer NOT NULL,
                position bigint NOT NULL, updated_at timestamptz NOT NULL, state bytea NOT NULL,
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
            "unit": aggregate.unit,
            "units_since": aggregate.units_since,
            "own_unit_since": aggregate.own_unit_since,
        }
