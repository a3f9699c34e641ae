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

from ledger.delivery import FeedDelivery

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
-- The deliveries `rows` counts. `rows` came after `deliveries`: a database older than it
-- counted every earlier delivery in the average's divisor and none of its rows (an upgrade
-- walkthrough: 0.0 rows a delivery). The average starts again where this column arrives.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'connector_health'
                   AND column_name = 'rows_deliveries') THEN
        ALTER TABLE connector_health ADD COLUMN rows_deliveries bigint NOT NULL DEFAULT 0;
        UPDATE connector_health SET rows = 0;
    END IF;
END $$;
-- The last delivery's reports older than the levels on record (which change nothing).
ALTER TABLE connector_health ADD COLUMN IF NOT EXISTS last_late integer;
-- Feed health as operators and dashboards read it (GET /v1/feeds/health reads it too).
-- (A column is added at the end: OR REPLACE keeps those before.)
CREATE OR REPLACE VIEW view_feed_health AS
SELECT supplier_id, last_success_at, last_error_at, last_error, consecutive_failures, breaker,
       last_delivery_id, last_rows, last_applied, last_rejected, last_lag_seconds, deliveries,
       failures, updated_at,
       round(rows::numeric / nullif(rows_deliveries, 0), 1)::double precision AS rows_per_delivery,
       last_late
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
-- Which API key uploaded a delivery (null for those the supplier's own transports brought:
-- webhooks, polls, folders, SFTP, FTP, whose `source` says so); only where missing.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'connector_inbox'
                   AND column_name = 'received_by') THEN
        ALTER TABLE connector_inbox ADD COLUMN received_by text;
    END IF;
END $$;
-- The newer letter of the same supplier record that closed an open one (`superseded`: see
-- connectors.deadletters.SUPERSEDE); only where missing.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema()
                   AND table_name = 'connector_dead_letters'
                   AND column_name = 'superseded_by') THEN
        ALTER TABLE connector_dead_letters ADD COLUMN superseded_by bigint;
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS connector_dead_letters_superseded
    ON connector_dead_letters (superseded_by) WHERE superseded_by IS NOT NULL;
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
    # Claimed from a claimer that died (or went silent) while applying it.
    taken_over: bool = False
    # The API key that uploaded it, if one did.
    received_by: str | None = None


@dataclass(frozen=True)
class Received:
    """What enqueueing found: a new delivery, the same one again, or a clash."""

    delivery_id: str
    status: str
    duplicate: bool
    clash: bool
    # The same content already received in this other format (a clash: see `enqueue`).
    received_as: str | None = None


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
    received_by: str | None = None,
) -> Received:
    """Stores a delivery once. The same id with the same content is a duplicate (nothing
    happens); with other content it is a clash."""
    row = conn.execute(
        "INSERT INTO connector_inbox (supplier_id, delivery_id, source, format, content_hash,"
        " name, signed_at, body, received_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (supplier_id, delivery_id) DO NOTHING RETURNING status",
        (
            supplier_id,
            delivery_id,
            source,
            format,
            content_hash,
            name,
            signed_at,
            body,
            received_by,
        ),
    ).fetchone()
    if row is not None:
        conn.execute("NOTIFY connector_inbox")
        return Received(delivery_id, row["status"], duplicate=False, clash=False)
    existing = conn.execute(
        "SELECT status, content_hash, format, body IS NOT NULL AS kept FROM connector_inbox"
        " WHERE supplier_id = %s AND delivery_id = %s",
        (supplier_id, delivery_id),
    ).fetchone()
    assert existing is not None
    if (
        existing["content_hash"] == content_hash
        and existing["format"] == format
        and not existing["kept"]
        and existing["status"] in ("processing", "failed", "rejected")
    ):
        # The same delivery, sent while `ledger ingest` applies it from a file of which
        # it keeps no copy (see `take_up`), or after that run stopped: this copy is kept
        # (answered as a duplicate and kept nothing, it was lost with the run). A run
        # going on finishes the delivery itself; once its claim is free, an inbox worker
        # takes it over. One statement, so that it sees the run's last word whichever
        # comes first: a delivery the run left failed is queued again here (its attempts
        # kept: a worker's claim then takes a lock the run never held), one it leaves
        # failed after this is queued again by the run (`queue_kept`). One the run left
        # rejected keeps the copy and stays rejected, as an upload rejected whole does: an
        # admin queues it again once what stopped it is fixed (`requeue`); the copy was
        # thrown away, and the delivery could only be ingested again (a walkthrough).
        kept = conn.execute(
            "UPDATE connector_inbox SET body = %s, received_by = coalesce(received_by, %s),"
            " status = CASE WHEN status = 'failed' THEN 'queued' ELSE status END,"
            " retry_at = CASE WHEN status = 'failed' THEN now() ELSE retry_at END,"
            " finished_at = CASE WHEN status = 'failed' THEN NULL ELSE finished_at END"
            " WHERE supplier_id = %s AND delivery_id = %s AND body IS NULL"
            " AND status IN ('processing', 'failed', 'rejected') RETURNING status",
            (body, received_by, supplier_id, delivery_id),
        ).fetchone()
        conn.execute("NOTIFY connector_inbox")
        status = existing["status"] if kept is None else kept["status"]
        return Received(delivery_id, status, duplicate=True, clash=False)
    if existing["content_hash"] == content_hash and existing["format"] != format:
        # The same bytes said to be in another format: a delivery read in the wrong one
        # (rejected whole, or failed) is queued again in this one, where it used to be
        # answered as a duplicate and left as it was; one still waiting, or applied, stays.
        if existing["status"] in ("failed", "rejected") and existing["kept"]:
            conn.execute(
                "UPDATE connector_inbox SET format = %s, status = 'queued', attempts = 0,"
                " retry_at = now(), error = NULL, outcome = NULL, finished_at = NULL"
                " WHERE supplier_id = %s AND delivery_id = %s",
                (format, supplier_id, delivery_id),
            )
            conn.execute("NOTIFY connector_inbox")
            return Received(delivery_id, "queued", duplicate=False, clash=False)
        return Received(delivery_id, existing["status"], True, True, received_as=existing["format"])
    return Received(
        delivery_id,
        existing["status"],
        duplicate=True,
        clash=existing["content_hash"] != content_hash,
    )


def reported_as_stock(conn: Connection, supplier_id: str, delivery_id: str) -> bool:
    """Whether a stock report of the supplier (`POST /v1/suppliers/{id}/stock`) used this
    delivery id: the ledger keeps its record under the id itself, while the parts of a
    delivery applied from here are recorded under names of their own (connectors.parts)."""
    row = conn.execute(
        "SELECT 1 FROM inventoryledger_events WHERE originator_id = %s LIMIT 1",
        (FeedDelivery.id_for(supplier_id, delivery_id),),
    ).fetchone()
    return row is not None


def receive(
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
    received_by: str | None = None,
) -> Received:
    """Stores a delivery once, as `enqueue` does, unless a stock report of the supplier
    used its id: that is a clash too, as a supplier's delivery ids are one namespace."""
    if reported_as_stock(conn, supplier_id, delivery_id):
        return Received(delivery_id, "reported", duplicate=True, clash=True)
    return enqueue(
        conn,
        supplier_id=supplier_id,
        delivery_id=delivery_id,
        source=source,
        format=format,
        content_hash=content_hash,
        body=body,
        name=name,
        signed_at=signed_at,
        received_by=received_by,
    )


def held_by(conn: Connection, supplier_id: str, delivery_id: str) -> str | None:
    """The source of the supplier's delivery of this id in the inbox, if there is one."""
    row = conn.execute(
        "SELECT source FROM connector_inbox WHERE supplier_id = %s AND delivery_id = %s",
        (supplier_id, delivery_id),
    ).fetchone()
    return None if row is None else str(row["source"])


@dataclass(frozen=True)
class TakenUp:
    """What taking up a delivery to apply in this process found: `delivery`, when it is
    this process's to apply (its `body` empty: not kept), to renew (`heartbeat`) and
    `finish` as this attempt; else the delivery that holds the id (its status, source,
    outcome and error), and whether it is a clash."""

    delivery: Delivery | None
    status: str
    source: str
    clash: bool
    outcome: dict[str, Any] | None = None
    error: str | None = None
    format: str | None = None  # what the delivery that holds the id was received as


TAKEN = (
    "id, supplier_id, delivery_id, source, format, content_hash, name, received_at, status,"
    " attempts"
)


def take_up(
    conn: Connection,
    *,
    supplier_id: str,
    delivery_id: str,
    source: str,
    format: str,
    content_hash: str,
    name: str | None = None,
    stale_after_seconds: int = 300,
) -> TakenUp:
    """Records a delivery that this process applies itself (`ledger ingest`: a file can
    be hundreds of MiB, so no body is kept, and a row without one is no inbox worker's to
    claim or queue again) as `processing`, claimed as `claim` claims one: holding its
    advisory lock on `conn`'s session until `release` (keep `conn` out of the pool until
    then); or says what holds its id. Its own delivery of the same content that was
    rejected, failed, or left `processing` by a run that stopped (its lock free, or no
    `heartbeat` for `stale_after_seconds`) is taken up again; a stock report's id is a
    clash. Run it outside a transaction: the row is seen only with its lock taken."""
    with conn.transaction():
        if reported_as_stock(conn, supplier_id, delivery_id):
            return TakenUp(None, "reported", "api", clash=True)
        row = conn.execute(
            "INSERT INTO connector_inbox (supplier_id, delivery_id, source, format,"  # noqa: S608 (constant fragments only)
            " content_hash, name, body, status, attempts, started_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, NULL, 'processing', 1, now())"
            f" ON CONFLICT (supplier_id, delivery_id) DO NOTHING RETURNING {TAKEN}",
            (supplier_id, delivery_id, source, format, content_hash, name),
        ).fetchone()
        if row is None:
            row = conn.execute(
                TAKE_UP_AGAIN,
                (format, name, supplier_id, delivery_id, content_hash, stale_after_seconds),
            ).fetchone()
        if row is not None:
            conn.execute(
                f"SELECT pg_advisory_lock({_claim_key('%s::bigint', '%s::integer')})",
                (row["id"], row["attempts"]),
            )
            return TakenUp(Delivery(**row, body=b""), "processing", source, clash=False)
        found = conn.execute(
            "SELECT status, source, content_hash, outcome, error, format FROM connector_inbox"
            " WHERE supplier_id = %s AND delivery_id = %s",
            (supplier_id, delivery_id),
        ).fetchone()
    assert found is not None
    return TakenUp(
        None,
        found["status"],
        found["source"],
        clash=found["content_hash"] != content_hash,
        outcome=found["outcome"],
        error=found["error"],
        format=found["format"],
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


def _claim_key(inbox_id: str, attempt: str) -> str:
    """SQL for a claim's advisory lock key: the one `lock_key(f"inbox:{id}:{attempt}")`
    (projections.leases) gives, so it shares the project's scheme and collides with none
    of its other names. One key per attempt, not per row: a claimer taken over because it
    went silent, and which lets go of its lock later, never frees its successor's."""
    return (
        "('x' || encode(substr(sha256(convert_to("
        f"'stockledger:inbox:' || {inbox_id} || ':' || {attempt}, 'UTF8')), 1, 8), 'hex'))"
        "::bit(64)::bigint"
    )


# In one statement, so a claim and its lock are taken together: the row is locked first
# (FOR UPDATE SKIP LOCKED), then its advisory lock is tried, in id order, stopping at the
# first taken (the CASE fixes the order the locks are tried in, the LIMIT stops there).
# OFFSET 0 keeps the planner from pushing the CASE down into the scan, below the sort and
# the row locks: it did, and tried (and took) the lock of every waiting row. A
# `processing` row is abandoned when its claimer's lock is free (the claimer's session
# ended: it crashed or was killed), or, failing that, when it has had no news for
# `stale_after_seconds` (see `claim`).
CLAIM = f"""
UPDATE connector_inbox AS inbox
SET status = 'processing', attempts = inbox.attempts + 1, started_at = now(),
    -- the last attempt's: its status showed them as this one's until it ended (a review)
    finished_at = NULL, error = NULL, outcome = NULL
FROM (
    SELECT id, status AS was FROM (
        SELECT id, status, attempts, started_at FROM connector_inbox
        WHERE ((status = 'queued' AND (retry_at IS NULL OR retry_at <= now()))
           OR status = 'processing')
          AND body IS NOT NULL  -- one without is applied by its own process (`take_up`)
        ORDER BY id FOR UPDATE SKIP LOCKED
        OFFSET 0
    ) AS waiting
    WHERE CASE
        WHEN status = 'queued' THEN pg_try_advisory_lock({_claim_key("id", "attempts + 1")})
        WHEN pg_try_advisory_lock({_claim_key("id", "attempts")}) THEN CASE
            WHEN pg_advisory_unlock({_claim_key("id", "attempts")})
            THEN pg_try_advisory_lock({_claim_key("id", "attempts + 1")}) END
        WHEN started_at < now() - make_interval(secs => %s)
        THEN pg_try_advisory_lock({_claim_key("id", "attempts + 1")})
        ELSE false
    END
    LIMIT 1
) AS claimed
WHERE inbox.id = claimed.id
RETURNING inbox.id, supplier_id, delivery_id, source, format, content_hash, name, body,
    received_at, status, attempts, claimed.was = 'processing' AS taken_over, received_by
"""  # noqa: S608 (constant fragments only)


def claim(conn: Connection, stale_after_seconds: int = 300) -> Delivery | None:
    """Takes the oldest waiting delivery for this worker, holding the claim's advisory lock
    on `conn`'s session until `release`: keep `conn` (out of the pool) until then.

    A claim whose claimer's session is gone (a crash, a kill -9) is taken over at once.
    One whose claimer still holds its lock is taken over only after `stale_after_seconds`
    without news (`heartbeat`): a host that vanished (power lost, cut off) leaves its
    session, and the lock, to the server until TCP keepalives end it, by default hours."""
    try:
        row = conn.execute(CLAIM, (stale_after_seconds,)).fetchone()
    except BaseException:
        # A session lock outlives the transaction that took it, if the statement failed
        # after taking it; the session does not: the pool replaces a closed connection.
        conn.close()
        raise
    if row is None:
        return None
    return Delivery(**{**row, "body": bytes(row["body"])})


def heartbeat(conn: Connection, delivery: Delivery) -> bool:
    """Renews a claim's news while its delivery is applied; False when the claim is no
    longer this attempt's (it was taken over as silent)."""
    cursor = conn.execute(
        "UPDATE connector_inbox SET started_at = now()"
        " WHERE id = %s AND attempts = %s AND status = 'processing'",
        (delivery.id, delivery.attempts),
    )
    return cursor.rowcount == 1


def hand_back(conn: Connection, delivery: Delivery, error: str) -> bool:
    """Queues again, for the next worker at once, a delivery its worker stopped applying,
    giving back the attempt it took: a stop is no failure, and stops during deploys must not
    bring a delivery to MAX_ATTEMPTS (a review). Only while this attempt's claim holds. Its
    lock is let go after (`release`): a worker that claims it meanwhile takes that attempt
    again, whose lock it cannot have yet, and tries once it is free."""
    cursor = conn.execute(
        "UPDATE connector_inbox SET status = 'queued', attempts = attempts - 1, error = %s,"
        " finished_at = now(), retry_at = now()"
        " WHERE id = %s AND attempts = %s AND status = 'processing'",
        (error, delivery.id, delivery.attempts),
    )
    return cursor.rowcount == 1


def release(conn: Connection, delivery: Delivery) -> bool:
    """Lets go of a claim's advisory lock (after `finish`); False when `conn` did not hold it."""
    row = conn.execute(
        f"SELECT pg_advisory_unlock({_claim_key('%s::bigint', '%s::integer')}) AS released",
        (delivery.id, delivery.attempts),
    ).fetchone()
    return row is not None and bool(row["released"])


def finish(
    conn: Connection,
    inbox_id: int,
    status: str,
    outcome: dict[str, Any] | None,
    error: str | None,
    retry_in: float | None = None,
    *,
    attempt: int | None = None,
) -> bool:
    """Records what became of a delivery; a `queued` one is tried again after `retry_in`.
    With `attempt`, only while that attempt's claim holds: False when it no longer does."""
    cursor = conn.execute(
        "UPDATE connector_inbox SET status = %s, outcome = %s, error = %s, finished_at = now(),"
        " retry_at = now() + make_interval(secs => %s) WHERE id = %s"
        " AND (%s::integer IS NULL OR (attempts = %s AND status = 'processing'))",
        (
            status,
            Jsonb(outcome) if outcome is not None else None,
            error,
            retry_in or 0,
            inbox_id,
            attempt,
            attempt,
        ),
    )
    return cursor.rowcount == 1


def queue_kept(conn: Connection, delivery: Delivery) -> bool:
    """Queues again, for a worker at once, a delivery `ledger ingest` left failed of which
    the inbox received a copy meanwhile (an upload or webhook of the same bytes: see
    `enqueue`); False where it has none (the same command finishes it). Its attempts are
    kept: a worker's claim then takes a lock the run never held."""
    cursor = conn.execute(
        "UPDATE connector_inbox SET status = 'queued', retry_at = now(), finished_at = NULL"
        " WHERE id = %s AND status = 'failed' AND body IS NOT NULL",
        (delivery.id,),
    )
    if cursor.rowcount:
        conn.execute("NOTIFY connector_inbox")
    return cursor.rowcount == 1


def requeue(conn: Connection, delivery_id: str, supplier_id: str | None = None) -> list[str]:
    """Queues again the deliveries of that id that failed for good or were rejected whole
    (once what stopped them is fixed: a mapping view back, parser options corrected);
    returns the suppliers whose delivery it queued."""
    rows = conn.execute(
        "UPDATE connector_inbox SET status = 'queued', attempts = 0, retry_at = now(),"
        " error = NULL, outcome = NULL, finished_at = NULL"
        " WHERE delivery_id = %s AND (%s::text IS NULL OR supplier_id = %s)"
        # A file applied by `ledger ingest` is not kept (`take_up`): nothing to queue.
        " AND status IN ('failed', 'rejected') AND body IS NOT NULL RETURNING supplier_id",
        (delivery_id, supplier_id, supplier_id),
    ).fetchall()
    if rows:
        conn.execute("NOTIFY connector_inbox")
    return [row["supplier_id"] for row in rows]


def delivery_status(
    conn: Connection, delivery_id: str, supplier_id: str | None = None
) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT supplier_id, delivery_id, source, format, name, received_at, received_by,"
        " status, attempts, finished_at, error, outcome FROM connector_inbox"
        " WHERE delivery_id = %s"
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


# A run's own delivery (no body) of the same content, taken up again: as `claim` takes
# over a claim, where the last attempt's lock is free or its news is stale.
TAKE_UP_AGAIN = f"""
UPDATE connector_inbox SET status = 'processing', attempts = attempts + 1, started_at = now(),
    finished_at = NULL, error = NULL, outcome = NULL, format = %s, name = %s
WHERE supplier_id = %s AND delivery_id = %s AND content_hash = %s AND body IS NULL
  AND CASE
    WHEN status IN ('rejected', 'failed') THEN true
    WHEN status <> 'processing' THEN false
    WHEN pg_try_advisory_lock({_claim_key("id", "attempts")})
    THEN pg_advisory_unlock({_claim_key("id", "attempts")})
    ELSE started_at < now() - make_interval(secs => %s)
  END
RETURNING {TAKEN}
"""  # noqa: S608 (constant fragments only)
