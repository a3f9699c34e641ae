"""Where projections keep their tables: one PostgreSQL schema per generation, stable views on top.

Each projection has a live generation. Its tables live in the schema
`projection_{name}_{generation}`, and readers always query the stable views
`public.view_{table}`. A rebuild builds the next generation beside the live one and
switches the views over in one transaction; the tracking position of each generation is
kept in `ledger_projection_generations`, updated in the same transaction as its rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from projections.leases import keep_alive, lock_holding

CONTROL_TABLES = """
CREATE TABLE IF NOT EXISTS ledger_projections (
    name text PRIMARY KEY,
    live_generation integer NOT NULL,
    switched_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ledger_projection_generations (
    name text NOT NULL,
    generation integer NOT NULL,
    schema_version integer NOT NULL,
    position bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    failed_position bigint,
    failed_at timestamptz,
    PRIMARY KEY (name, generation)
);
"""

Connection = psycopg.Connection[dict[str, Any]]


@dataclass(frozen=True)
class Generation:
    name: str
    generation: int
    schema_version: int
    position: int
    updated_at: datetime
    last_error: str | None
    failed_position: int | None

    @property
    def schema(self) -> str:
        return schema_name(self.name, self.generation)


def schema_name(name: str, generation: int) -> str:
    return f"projection_{name}_{generation}"


class ViewStore:
    """A connection pool to the database that holds the views."""

    def __init__(self, database_url: str, *, max_size: int = 8, timeout: float = 5.0) -> None:
        self.database_url = database_url
        # Its connections hold inbox claims' locks too (connectors.inbox.claim).
        self.pool: ConnectionPool[Connection] = ConnectionPool(
            lock_holding(database_url),
            min_size=1,
            max_size=max_size,
            timeout=timeout,
            kwargs={"row_factory": dict_row, "autocommit": True},
            configure=keep_alive,
            open=False,
            name="views",
        )

    def open(self) -> ViewStore:
        self.pool.open(wait=False)
        return self

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Connection]:
        """A connection from the pool; `timeout`: how long to wait for one (PoolTimeout)
        when not the pool's own."""
        with self.pool.connection(timeout=timeout) as conn:
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A transaction on derived data, committed without waiting for the disk.

        Views and their positions commit together, so a commit lost in a crash loses
        both and the runner applies those events again: exactly once still holds. The
        event log itself is written by the ledger's recorder, which always waits.
        """
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit TO OFF")
            yield conn


def create_control_tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(CONTROL_TABLES)


def generations(conn: Connection, name: str | None = None) -> list[Generation]:
    rows = conn.execute(
        "SELECT name, generation, schema_version, position, updated_at, last_error,"
        " failed_position FROM ledger_projection_generations"
        " WHERE %(name)s::text IS NULL OR name = %(name)s ORDER BY name, generation",
        {"name": name},
    ).fetchall()
    return [Generation(**row) for row in rows]


def generation(conn: Connection, name: str, number: int) -> Generation | None:
    found = [g for g in generations(conn, name) if g.generation == number]
    return found[0] if found else None


def live_generation(conn: Connection, name: str) -> int | None:
    row = conn.execute(
        "SELECT live_generation FROM ledger_projections WHERE name = %s", (name,)
    ).fetchone()
    return None if row is None else int(row["live_generation"])


def live(conn: Connection, name: str) -> Generation | None:
    """The projection's live generation, or None where it has none."""
    number = live_generation(conn, name)
    return None if number is None else generation(conn, name, number)


def create_generation(
    conn: Connection, name: str, schema_version: int, ddl: list[str]
) -> Generation:
    """A new, empty generation: its schema, its tables and a tracking row at position 0."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('ledger_projections:' || %s))", (name,))
        row = conn.execute(
            "SELECT coalesce(max(generation), 0) + 1 AS next"
            " FROM ledger_projection_generations WHERE name = %s",
            (name,),
        ).fetchone()
        assert row is not None
        number = int(row["next"])
        schema = schema_name(name, number)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for statement in ddl:
            conn.execute(sql.SQL(statement).format(schema=sql.Identifier(schema)))
        conn.execute(
            "INSERT INTO ledger_projection_generations (name, generation, schema_version)"
            " VALUES (%s, %s, %s)",
            (name, number, schema_version),
        )
    created = generation(conn, name, number)
    assert created is not None
    return created


def switch_live(conn: Connection, name: str, number: int, tables: list[str]) -> int | None:
    """Points the public views at generation `number` in one transaction; returns the old one."""
    schema = schema_name(name, number)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('ledger_projections:' || %s))", (name,))
        old = live_generation(conn, name)
        _publish(conn, schema, tables)
        conn.execute(
            "INSERT INTO ledger_projections (name, live_generation) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE"
            " SET live_generation = excluded.live_generation, switched_at = now()",
            (name, number),
        )
    return old


def _publish(conn: Connection, schema: str, tables: list[str]) -> None:
    """(Re)creates the public views over a schema's tables: a view keeps the columns its
    table had when it was made."""
    for table in tables:
        view = sql.Identifier(f"view_{table}")
        conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(view))
        conn.execute(
            sql.SQL("CREATE VIEW {} AS SELECT * FROM {}.{}").format(
                view, sql.Identifier(schema), sql.Identifier(table)
            )
        )


def upgrade_generation(
    conn: Connection,
    built: Generation,
    schema_version: int,
    statements: list[str],
    tables: list[str],
) -> bool:
    """Brings a generation to `schema_version` in place, in one transaction: its
    statements, its tracking row, and (when it is live) the public views over its tables.
    False where its schema version is no longer the one `built` read (another process
    upgraded it, or it is gone): nothing is done then."""
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('ledger_projections:' || %s))", (built.name,)
        )
        # The statements wait for the readers and writers of the tables, and new readers
        # queue behind them: not for long (a migration that gives up is run again).
        conn.execute("SET LOCAL lock_timeout = '5s'")
        row = conn.execute(
            "SELECT schema_version FROM ledger_projection_generations"
            " WHERE name = %s AND generation = %s FOR UPDATE",
            (built.name, built.generation),
        ).fetchone()
        if row is None or row["schema_version"] != built.schema_version:
            return False
        for statement in statements:
            conn.execute(sql.SQL(statement).format(schema=sql.Identifier(built.schema)))
        conn.execute(
            "UPDATE ledger_projection_generations SET schema_version = %s"
            " WHERE name = %s AND generation = %s",
            (schema_version, built.name, built.generation),
        )
        if live_generation(conn, built.name) == built.generation:
            _publish(conn, built.schema, tables)
    return True


def drop_generation(conn: Connection, name: str, number: int) -> None:
    """Drops a generation that is no longer live, with its tables and tracking row."""
    with conn.transaction():
        if live_generation(conn, name) == number:
            raise ValueError(f"generation {number} of {name} is live")
        conn.execute("SET LOCAL lock_timeout = '10s'")
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema_name(name, number))
            )
        )
        conn.execute(
            "DELETE FROM ledger_projection_generations WHERE name = %s AND generation = %s",
            (name, number),
        )


def advance(conn: Connection, name: str, number: int, old: int, new: int) -> bool:
    """Moves a generation's position inside the caller's transaction; False if someone else did."""
    cursor = conn.execute(
        "UPDATE ledger_projection_generations"
        " SET position = %s, updated_at = now(), last_error = NULL,"
        "     failed_position = NULL, failed_at = NULL"
        " WHERE name = %s AND generation = %s AND position = %s",
        (new, name, number, old),
    )
    return cursor.rowcount == 1


def record_failure(conn: Connection, name: str, number: int, position: int, error: str) -> None:
    conn.execute(
        "UPDATE ledger_projection_generations"
        " SET last_error = %s, failed_position = %s, failed_at = now()"
        " WHERE name = %s AND generation = %s",
        (error[:2000], position, name, number),
    )
