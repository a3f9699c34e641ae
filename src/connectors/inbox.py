"""The durable inbox of deliveries, the dead letters of refused records, and feed health.

A delivery (an upload, a webhook body, a dropped or pulled file, a poll page) is stored
here first and answered at once; a worker applies it later. Keyed by supplier and
delivery id (the supplier's own, or the content hash), so the same delivery twice is
stored once. These are operational tables beside the event log: what the ledger did
with each delivery is recorded as events too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

TABLES = """
CREATE TABLE IF NOT EXISTS connector_inbox (
    id bigserial PRIMARY KEY,
    supplier_id text NOT NULL,
    delivery_id text NOT NULL,
    source text NOT NULL,
    format text NOT NULL,
    content_hash text NOT NULL,
    name text,
    signed_at bigint,
    body bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    status text NOT NULL DEFAULT 'queued',
    retry_at timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    started_at timestamptz,
    finished_at timestamptz,
    error text,
    outcome jsonb,
    UNIQUE (supplier_id, delivery_id)
);
CREATE INDEX IF NOT EXISTS connector_inbox_waiting
    ON connector_inbox (id) WHERE status IN ('queued', 'processing');
CREATE INDEX IF NOT EXISTS connector_inbox_delivery ON connector_inbox (delivery_id);
CREATE TABLE IF NOT EXISTS connector_dead_letters (
    id bigserial PRIMARY KEY,
    supplier_id text NOT NULL,
    delivery_id text NOT NULL,
    position integer NOT NULL,
    reason text NOT NULL,
    record jsonb,
    raw jsonb NOT NULL,
    status text NOT NULL DEFAULT 'open',
    attempts integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (supplier_id, delivery_id, position)
);
CREATE INDEX IF NOT EXISTS connector_dead_letters_open
    ON connector_dead_letters (supplier_id, id) WHERE status = 'open';
CREATE TABLE IF NOT EXISTS connector_health (
    supplier_id text PRIMARY KEY,
    last_success_at timestamptz,
    last_error_at timestamptz,
    last_error text,
    consecutive_failures integer NOT NULL DEFAULT 0,
    breaker text NOT NULL DEFAULT 'closed',
    last_delivery_id text,
    last_rows integer,
    last_applied integer,
    last_rejected integer,
    last_lag_seconds double precision,
    deliveries integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Every failure, not only those in a row (for the failures counter at /metrics).
ALTER TABLE connector_health ADD COLUMN IF NOT EXISTS failures bigint NOT NULL DEFAULT 0;
ALTER TABLE connector_health ADD COLUMN IF NOT EXISTS rows bigint NOT NULL DEFAULT 0;
-- Feed health as operators and dashboards read it (GET /v1/feeds/health reads it too).
CREATE OR REPLACE VIEW view_feed_health AS
SELECT supplier_id, last_success_at, last_error_at, last_error, consecutive_failures, breaker,
       last_delivery_id, last_rows, last_applied, last_rejected, last_lag_seconds, deliveries,
       failures, updated_at,
       round(rows::numeric / nullif(deliveries, 0), 1)::double precision AS rows_per_delivery
FROM connector_health;
CREATE TABLE IF NOT EXISTS connector_webhook_signatures (
    supplier_id text NOT NULL,
    signature text NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (supplier_id, signature)
);
CREATE TABLE IF NOT EXISTS connector_state (
    supplier_id text NOT NULL,
    name text NOT NULL,
    value jsonb NOT NULL,
    PRIMARY KEY (supplier_id, name)
);
-- An applied delivery's body is let go after a while (see `forget_bodies`); only then
-- (the ALTER would lock the table even where the column is nullable already).
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
               AND table_name = 'connector_inbox' AND column_name = 'body'
               AND is_nullable = 'NO') THEN
        ALTER TABLE connector_inbox ALTER COLUMN body DROP NOT NULL;
    END IF;
END $$;
"""

Connection = psycopg.Connection[dict[str, Any]]


def create_tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(TABLES)


@dataclass(frozen=True)
class Delivery:
    """A delivery as the inbox holds it."""

    id: int
    supplier_id: str
    delivery_id: str
    source: str
    format: str
    content_hash: str
    name: str | None
    body: bytes
    received_at: datetime
    status: str
    attempts: int


@dataclass(frozen=True)
class Received:
    """What enqueueing found: a new delivery, the same one again, or a clash."""

    delivery_id: str
    status: str
    duplicate: bool
    clash: bool


def enqueue(
    conn: Connection,
    *,
    supplier_id: str,
    delivery_id: str,
    source: str,
    format: str,
    content_hash: str,
    body: bytes,
    name: str | None = None,
    signed_at: int | None = None,
) -> Received:
    """Stores a delivery once. The same id with the same content is a duplicate (nothing
    happens); with other content it is a clash."""
    row = conn.execute(
        "INSERT INTO connector_inbox"
        " (supplier_id, delivery_id, source, format, content_hash, name, signed_at, body)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (supplier_id, delivery_id) DO NOTHING RETURNING status",
        (supplier_id, delivery_id, source, format, content_hash, name, signed_at, body),
    ).fetchone()
    if row is not None:
        conn.execute("NOTIFY connector_inbox")
        return Received(delivery_id, row["status"], duplicate=False, clash=False)
    existing = conn.execute(
        "SELECT status, content_hash FROM connector_inbox"
        " WHERE supplier_id = %s AND delivery_id = %s",
        (supplier_id, delivery_id),
    ).fetchone()
    assert existing is not None
    return Received(
        delivery_id,
        existing["status"],
        duplicate=True,
        clash=existing["content_hash"] != content_hash,
    )


def first_use_of_signature(conn: Connection, supplier_id: str, signature: str) -> bool:
    """True the first time a signed request is seen; a replay, under any delivery id, is not."""
    row = conn.execute(
        "INSERT INTO connector_webhook_signatures (supplier_id, signature) VALUES (%s, %s)"
        " ON CONFLICT DO NOTHING RETURNING 1",
        (supplier_id, signature),
    ).fetchone()
    return row is not None


def forget_bodies(conn: Connection, older_than_days: float, limit: int = 100) -> int:
    """Lets go of the bodies of deliveries applied more than `older_than_days` ago, up to
    `limit` at a time; returns how many. What they changed is in the event log, their
    counts stay here; a failed or rejected delivery keeps its body, to be queued again."""
    cursor = conn.execute(
        "UPDATE connector_inbox SET body = NULL WHERE id IN ("
        " SELECT id FROM connector_inbox WHERE status = 'applied' AND body IS NOT NULL"
        " AND finished_at < now() - make_interval(secs => %s) LIMIT %s)",
        (older_than_days * 86_400, limit),
    )
    return cursor.rowcount


def forget_signatures(conn: Connection, older_than_seconds: int) -> None:
    """Signatures older than the time window are refused as expired anyway."""
    conn.execute(
        "DELETE FROM connector_webhook_signatures"
        " WHERE seen_at < now() - make_interval(secs => %s)",
        (older_than_seconds,),
    )


def claim(conn: Connection, stale_after_seconds: int = 300) -> Delivery | None:
    """Takes the oldest waiting delivery for this worker; a claim left by a dead worker
    (no news for `stale_after_seconds`) is taken over."""
    row = conn.execute(
        "UPDATE connector_inbox SET status = 'processing', attempts = attempts + 1,"
        " started_at = now() WHERE id = ("
        "  SELECT id FROM connector_inbox"
        "  WHERE (status = 'queued' AND (retry_at IS NULL OR retry_at <= now()))"
        "   OR (status = 'processing' AND started_at < now() - make_interval(secs => %s))"
        "  ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1)"
        " RETURNING id, supplier_id, delivery_id, source, format, content_hash, name, body,"
        " received_at, status, attempts",
        (stale_after_seconds,),
    ).fetchone()
    if row is None:
        return None
    return Delivery(**{**row, "body": bytes(row["body"])})


def heartbeat(conn: Connection, inbox_id: int) -> None:
    conn.execute("UPDATE connector_inbox SET started_at = now() WHERE id = %s", (inbox_id,))


def finish(
    conn: Connection,
    inbox_id: int,
    status: str,
    outcome: dict[str, Any] | None,
    error: str | None,
    retry_in: float | None = None,
) -> None:
    """Records what became of a delivery; a `queued` one is tried again after `retry_in`."""
    conn.execute(
        "UPDATE connector_inbox SET status = %s, outcome = %s, error = %s, finished_at = now(),"
        " retry_at = now() + make_interval(secs => %s) WHERE id = %s",
        (status, Jsonb(outcome) if outcome is not None else None, error, retry_in or 0, inbox_id),
    )


def requeue(conn: Connection, delivery_id: str, supplier_id: str | None = None) -> list[str]:
    """Queues again the deliveries of that id that failed for good or were rejected whole
    (once what stopped them is fixed: a mapping view back, parser options corrected);
    returns the suppliers whose delivery it queued."""
    rows = conn.execute(
        "UPDATE connector_inbox SET status = 'queued', attempts = 0, retry_at = now(),"
        " error = NULL, outcome = NULL, finished_at = NULL"
        " WHERE delivery_id = %s AND (%s::text IS NULL OR supplier_id = %s)"
        " AND status IN ('failed', 'rejected') RETURNING supplier_id",
        (delivery_id, supplier_id, supplier_id),
    ).fetchall()
    if rows:
        conn.execute("NOTIFY connector_inbox")
    return [row["supplier_id"] for row in rows]


def delivery_status(
    conn: Connection, delivery_id: str, supplier_id: str | None = None
) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT supplier_id, delivery_id, source, format, name, received_at, status, attempts,"
        " finished_at, error, outcome FROM connector_inbox WHERE delivery_id = %s"
        " AND (%s::text IS NULL OR supplier_id = %s) ORDER BY id DESC",
        (delivery_id, supplier_id, supplier_id),
    ).fetchall()


def get_state(conn: Connection, supplier_id: str, name: str) -> Any:
    row = conn.execute(
        "SELECT value FROM connector_state WHERE supplier_id = %s AND name = %s",
        (supplier_id, name),
    ).fetchone()
    return None if row is None else row["value"]


def set_state(conn: Connection, supplier_id: str, name: str, value: Any) -> None:
    conn.execute(
        "INSERT INTO connector_state (supplier_id, name, value) VALUES (%s, %s, %s)"
        " ON CONFLICT (supplier_id, name) DO UPDATE SET value = excluded.value",
        (supplier_id, name, Jsonb(value)),
    )
