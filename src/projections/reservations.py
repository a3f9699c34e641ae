"""The reservations view: for OMS reads by id or order, and for the expiry sweeper."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from ledger.base import LedgerAggregate
from ledger.reservation import Reservation
from projections.base import StateProjection


class ReservationsProjection(StateProjection):
    name = "reservations"
    # 2: reservations indexed by client, for an OMS key's listings (of its own only).
    schema_version = 2
    upgrades: ClassVar[dict[int, list[str]]] = {
        2: [
            "CREATE INDEX IF NOT EXISTS reservations_client_id_idx"
            " ON {schema}.reservations (client, id)"
        ],
    }
    tables: ClassVar[list[str]] = ["reservations"]
    state_tables: ClassVar[dict[type[LedgerAggregate], str]] = {Reservation: "reservations"}

    def ddl(self) -> list[str]:
        return [
            """CREATE TABLE {schema}.reservations (
                id uuid PRIMARY KEY, client text NOT NULL, order_id text NOT NULL,
                status text NOT NULL, expires_at timestamptz NOT NULL,
                created_at timestamptz NOT NULL, confirmed_at timestamptz,
                closed_at timestamptz, lines jsonb NOT NULL,
                version integer NOT NULL, position bigint NOT NULL,
                updated_at timestamptz NOT NULL, state bytea NOT NULL)""",
            "CREATE INDEX ON {schema}.reservations (order_id)",
            # An OMS key lists its own reservations by id: without this, a client with few
            # among many read the whole primary key a page.
            "CREATE INDEX ON {schema}.reservations (client, id)",
            "CREATE INDEX ON {schema}.reservations (expires_at) WHERE status = 'held'",
        ]

    def columns(self, aggregate: Any) -> dict[str, Any]:
        assert isinstance(aggregate, Reservation)
        return {
            "client": aggregate.client,
            "order_id": aggregate.order_id,
            "status": str(aggregate.status),
            "expires_at": aggregate.expires_at,
            "created_at": aggregate.created_on,
            "confirmed_at": aggregate.confirmed_at,
            "closed_at": aggregate.closed_at,
            "lines": json.dumps(
                [
                    {
                        "sku": line.sku,
                        "quantity": line.quantity,
                        "allocations": line.allocations,
                        "fulfilled": line.fulfilled,
                        "returned": line.returned,
                        "cancelled": aggregate.cancelled_on(line),
                    }
                    for line in aggregate.lines.values()
                ]
            ),
        }
