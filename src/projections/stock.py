"""The stock views: availability per SKU, level per (SKU, supplier), holds, supplier terms.

Rows hold what follows from the events alone; what depends on the clock (holds running
out, reports going stale) is applied when they are read, by the domain's own rules.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from ledger.base import LedgerAggregate
from ledger.stock import StockItem, incoming_json
from ledger.supplier import Supplier
from projections.base import ChildTable, StateProjection


class StockProjection(StateProjection):
    name = "stock"
    # 2: availability rows indexed by position, for the API's in-process copy to follow.
    # 3: levels keep the stock each supplier expects (`incoming`).
    # 4: levels keep the open orders committed while their supplier reported net of them.
    # 5: levels keep whether their last report was made net of our orders.
    schema_version = 5
    # 2 only adds an index. No event before version 3 carried incoming stock: a level of
    # a generation built before keeps none, as a rebuild would write it.
    upgrades: ClassVar[dict[int, list[str]]] = {
        2: [
            "CREATE INDEX IF NOT EXISTS availability_position_idx"
            " ON {schema}.availability (position)"
        ],
        3: ["ALTER TABLE {schema}.levels ADD COLUMN IF NOT EXISTS incoming jsonb"],
        # A level of a generation built before keeps none: as a snapshot taken before
        # does (see `ledger.application.PositionAsDict`); a rebuild counts them.
        4: [
            "ALTER TABLE {schema}.levels"
            " ADD COLUMN IF NOT EXISTS net_committed bigint NOT NULL DEFAULT 0"
        ],
        # As the events stored before are read (`StockItem.Observed`, version 2): net.
        5: [
            "ALTER TABLE {schema}.levels"
            " ADD COLUMN IF NOT EXISTS reported_net boolean NOT NULL DEFAULT true"
        ],
    }
    tables: ClassVar[list[str]] = ["availability", "levels", "holds", "suppliers"]
    state_tables: ClassVar[dict[type[LedgerAggregate], str]] = {
        StockItem: "availability",
        Supplier: "suppliers",
    }
    child_tables: ClassVar[dict[str, ChildTable]] = {
        "levels": ChildTable(
            parent="availability", column="sku", parent_column="sku", key=("sku", "supplier_id")
        ),
        "holds": ChildTable(
            parent="availability",
            column="sku",
            parent_column="sku",
            key=("sku", "supplier_id", "expires_s"),
        ),
    }

    def ddl(self) -> list[str]:
        return [
            """CREATE TABLE {schema}.availability (
                id uuid PRIMARY KEY, sku text NOT NULL UNIQUE, safety_stock bigint NOT NULL,
                on_hand bigint NOT NULL, committed bigint NOT NULL,
                version integer NOT NULL, position bigint NOT NULL,
                updated_at timestamptz NOT NULL, state bytea NOT NULL)""",
            "CREATE INDEX ON {schema}.availability (position)",
            """CREATE TABLE {schema}.levels (
                sku text NOT NULL, supplier_id text NOT NULL, quantity bigint NOT NULL,
                observed_at timestamptz, source text NOT NULL, committed bigint NOT NULL,
                unreported bigint NOT NULL, incoming jsonb,
                net_committed bigint NOT NULL DEFAULT 0,
                reported_net boolean NOT NULL DEFAULT true, PRIMARY KEY (sku, supplier_id))""",
            "CREATE INDEX ON {schema}.levels (supplier_id, observed_at)",
            """CREATE TABLE {schema}.holds (
                sku text NOT NULL, supplier_id text NOT NULL, expires_s bigint NOT NULL,
                quantity bigint NOT NULL, PRIMARY KEY (sku, supplier_id, expires_s))""",
            """CREATE TABLE {schema}.suppliers (
                id uuid PRIMARY KEY, supplier_id text NOT NULL UNIQUE, name text NOT NULL,
                priority integer NOT NULL, lead_time_days integer NOT NULL,
                buffer bigint NOT NULL, stale_after_seconds bigint, exclude_after_seconds bigint,
                reports_net_of_our_orders boolean NOT NULL, stale_since timestamptz,
                terms jsonb NOT NULL, version integer NOT NULL, position bigint NOT NULL,
                updated_at timestamptz NOT NULL, state bytea NOT NULL)""",
        ]

    def columns(self, aggregate: Any) -> dict[str, Any]:
        if isinstance(aggregate, Supplier):
            terms = aggregate.terms
            return {
                "supplier_id": aggregate.supplier_id,
                "name": terms.name,
                "priority": terms.priority,
                "lead_time_days": terms.lead_time_days,
                "buffer": terms.buffer,
                "stale_after_seconds": terms.stale_after_seconds,
                "exclude_after_seconds": terms.exclude_after_seconds,
                "reports_net_of_our_orders": terms.reports_net_of_our_orders,
                "stale_since": aggregate.stale_since,
                "terms": json.dumps(terms.as_dict()),
            }
        assert isinstance(aggregate, StockItem)
        return {
            "sku": aggregate.sku,
            "safety_stock": aggregate.safety_stock,
            "on_hand": sum(p.quantity for p in aggregate.positions.values()),
            "committed": sum(p.committed for p in aggregate.positions.values()),
        }

    def children(self, aggregate: Any) -> dict[str, list[dict[str, Any]]]:
        if not isinstance(aggregate, StockItem):
            return {}
        sku = aggregate.sku
        return {
            "levels": [
                {
                    "sku": sku,
                    "supplier_id": supplier_id,
                    "quantity": position.quantity,
                    "observed_at": position.observed_at,
                    "source": position.source,
                    "committed": position.committed,
                    "unreported": sum(position.unreported.values()),
                    "incoming": incoming_json(position.incoming),
                    "net_committed": position.net_committed,
                    "reported_net": position.reported_net,
                }
                for supplier_id, position in aggregate.positions.items()
            ],
            "holds": [
                {"sku": sku, "supplier_id": supplier_id, "expires_s": expires, "quantity": held}
                for supplier_id, position in aggregate.positions.items()
                for expires, held in position.held.items()
            ],
        }
