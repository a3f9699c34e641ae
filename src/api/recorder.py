"""The ledger's PostgreSQL recorder: the library's, plus what the ledger keeps beside its events.

`inventoryledger_levels` holds each supplier's last report per SKU and is written in the
same transaction as the events (after them, under the same table lock, so concurrent
writers cannot deadlock): a delivery can be compared with it in bulk, and a row is never
behind the events. `select_streams` loads many aggregates from their latest snapshots in
one round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

LEVELS_TABLE = "inventoryledger_levels"


class LedgerRecorder(PostgresApplicationRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name=events_table_name)
        schema = Identifier(self.datastore.schema)
        # As the library's, but the stored events travel in binary (%b): their text
        # form costs more to build than the insert itself, under the table lock.
        self.insert_events_statement = SQL(
            "INSERT INTO {schema}.{table} AS t (originator_id, originator_version, topic, state)"
            " SELECT originator_id, originator_version, topic, state"
            " FROM unnest(%b::{schema}.{stored_event_type}[]) RETURNING notification_id"
        ).format(
            schema=schema,
            table=Identifier(self.events_table_name),
            stored_event_type=Identifier(self.stored_event_type_name),
        )
        self.snapshots_table_name = events_table_name.removesuffix("_events") + "_snapshots"
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{table} ("
                " supplier_id text NOT NULL, sku text NOT NULL, quantity bigint NOT NULL,"
                " observed_at timestamptz, unreported_from bigint,"
                " PRIMARY KEY (supplier_id, sku))"
            ).format(schema=schema, table=Identifier(LEVELS_TABLE))
        )
        self.upsert_levels = SQL(
            "INSERT INTO {schema}.{table}"
            " (supplier_id, sku, quantity, observed_at, unreported_from)"
            " VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (supplier_id, sku) DO UPDATE SET quantity = excluded.quantity,"
            " observed_at = excluded.observed_at, unreported_from = excluded.unreported_from"
        ).format(schema=schema, table=Identifier(LEVELS_TABLE))
        self.select_streams_statement = SQL(
            "WITH wanted AS (SELECT unnest(%s::uuid[]) AS id),"
            " latest AS (SELECT DISTINCT ON (s.originator_id) s.originator_id,"
            "   s.originator_version, s.topic, s.state FROM {schema}.{snapshots} s"
            "   JOIN wanted ON s.originator_id = wanted.id"
            "   ORDER BY s.originator_id, s.originator_version DESC)"
            " SELECT originator_id, originator_version, topic, state, 0 AS kind FROM latest"
            " UNION ALL"
            " SELECT e.originator_id, e.originator_version, e.topic, e.state, 1 AS kind"
            " FROM {schema}.{events} e JOIN wanted ON e.originator_id = wanted.id"
            " LEFT JOIN latest ON latest.originator_id = e.originator_id"
            " WHERE e.originator_version > coalesce(latest.originator_version, 0)"
            " ORDER BY originator_id, kind, originator_version"
        ).format(
            schema=schema,
            snapshots=Identifier(self.snapshots_table_name),
            events=Identifier(self.events_table_name),
        )

    def _fetch_ids_after_insert_events(
        self,
        curs: Cursor[DictRow],
        stored_events: Sequence[StoredEvent],
        **kwargs: Any,
    ) -> Sequence[int] | None:
        notification_ids = super()._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        levels = kwargs.get("levels")
        if levels:
            curs.executemany(
                self.upsert_levels,
                [
                    (r.supplier_id, r.sku, r.quantity, r.observed_at, r.unreported_from)
                    for r in levels
                ],
            )
        return notification_ids

    def select_streams(self, originator_ids: Sequence[UUID]) -> list[StoredEvent]:
        """Each stream's latest snapshot, then its later events, stream after stream."""
        if not originator_ids:
            return []
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self.select_streams_statement, (list(originator_ids),))
            return [
                StoredEvent(
                    originator_id=row["originator_id"],
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=bytes(row["state"]),
                )
                for row in curs.fetchall()
            ]
