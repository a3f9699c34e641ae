"""Comparing a staged delivery with the levels on record, in SQL, and noting its repeats.

A delivery's records are staged in `feed_staging` (see connectors.staging); RESOLVE maps
them to SKUs and compares them with `inventoryledger_levels`, into `feed_resolved`, in
the connection's session; the queries below read what the ledger must see and note the
rest as seen. connectors.ingest runs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from psycopg import sql

from projections.store import Connection

STAGING = """
CREATE TEMPORARY TABLE feed_staging (
    position integer NOT NULL, supplier_sku text, upc text, quantity bigint NOT NULL,
    factor integer, unit text, unit_key text, observed_at timestamptz NOT NULL, incoming jsonb
)
"""


def _repeats(record: str) -> sql.Composed:
    """SQL: the record aliased `record` repeats its level on record `l` (which exists): the
    same quantity and incoming stock, no unreported change (a shipment from the supplier's
    stock) that a report this new retires, and the level not so old that the domain
    records it again (`refresh`). RESOLVE, TOUCH and NOT_NOTED share it."""
    return sql.SQL(
        """(l.quantity = {c}.quantity
     AND ({c}.incoming IS NULL OR l.incoming IS NOT DISTINCT FROM nullif({c}.incoming, '[]'))
     AND NOT (l.unreported_from IS NOT NULL
              AND floor(extract(epoch FROM {c}.observed_at)) >= l.unreported_from)
     AND NOT (%(refresh)s::interval IS NOT NULL
              AND {c}.observed_at - l.observed_at >= %(refresh)s))"""
    ).format(c=sql.Identifier(record))


# Resolve each record to a SKU (by supplier SKU; by UPC where the record has no supplier
# SKU, or, for a supplier whose connector says `upc_fallback`, where its supplier SKU is
# not mapped; the first mapping in supplier-SKU order when several share the UPC),
# convert it to base units, and compare it with the level on record. A record in no unit,
# or in its mapping's own `unit`, counts the mapping's `units_per_supplier_unit` a unit;
# one in another unit, the factor staged for it (the supplier's unit table, or 1 for a
# base unit); a unit that neither knows (the record's, or an incoming line's) leaves the
# record unresolved, `refused_unit` saying which, as does a quantity in base units over
# the supplier's ceiling (`beyond`: compared by division, which cannot overflow; its
# reading checked what it could without the mapping). A mapping matched by supplier SKU
# (m) and one matched by UPC (u) never both match. Most records name no unit and no
# incoming stock (`plain`), and skip the rest of that. The planner folds the layers into
# one, repeating a column's expression wherever it is used: unfenced, RESOLVE took 4.2
# against 3.4 s at 1,000,000 rows; fenced (OFFSET 0) so that each is computed once a row,
# 3.48 against 3.36 s for the RESOLVE of before units were resolved here (means of three
# alternating runs). Two hash joins for
# the mappings: an OR in one join made the planner look each record up in turn
# (measured: twice the time). One sort by SKU (bytewise, the writer's order) numbers the
# records (`n`, for the chunks below: a chunk's levels then lie together on disk, and a
# delivery rewrites each page of them once instead of once a chunk) and counts the
# records of each SKU; a hash count beside it cost 1.7 s of 4.8 at 1,000,000 rows
# (EXPLAIN ANALYZE). `kind` is what the record is to the ledger:
# - "change": what the ledger must see (a new level, a late report, a report that retires
#   unreported changes or refreshes an ageing one, several records for one SKU, an
#   unresolved record);
# - "repeat": repeats the level on record and is newer than any report of it seen, to be
#   noted below (an older report arriving later is then late);
# - "seen": repeats the newest report seen (a delivery again): nothing to do.
# `incoming` (EDI SCH lines) is, for a resolved record, in base units as [expected on,
# quantity] pairs, the form the ledger keeps beside the level ([] when none is expected,
# where the level keeps null); null where the record says nothing of it (CSV, JSON, XML):
# the level's schedule then stands.
# Only an unresolved record keeps what the supplier wrote (its supplier SKU, UPC, unit,
# quantity and incoming stock as staged), for its dead letter: the others are sorted and
# written without them, 3.5 against 4.0 s for 1,000,000 rows (means of three alternating
# runs in psql).
RESOLVE = sql.SQL("""
CREATE TEMPORARY TABLE feed_resolved AS
WITH matched AS (
    SELECT s.*, coalesce(m.sku, u.sku) AS mapped,
           coalesce(m.units_per_supplier_unit, u.units_per_supplier_unit) AS per,
           coalesce(m.unit, u.unit) AS per_unit,
           coalesce(m.units_since, u.units_since) AS units_since,
           coalesce(m.own_unit_since, u.own_unit_since) AS own_unit_since,
           s.unit_key IS NULL AND s.incoming IS NULL AS plain
    FROM feed_staging s
    LEFT JOIN view_mappings m
        ON m.supplier_id = %(supplier)s AND m.supplier_sku = s.supplier_sku
    LEFT JOIN (
        SELECT DISTINCT ON (upc) upc, sku, units_per_supplier_unit, unit, units_since,
               own_unit_since
        FROM view_mappings WHERE supplier_id = %(supplier)s
          AND upc IN (SELECT upc FROM feed_staging
                      WHERE supplier_sku IS NULL OR %(upc_fallback)s)
        ORDER BY upc, supplier_sku
    ) u ON (s.supplier_sku IS NULL OR (%(upc_fallback)s AND m.sku IS NULL)) AND u.upc = s.upc
), factored AS (
    SELECT x.*,
           CASE WHEN x.unit_key IS NULL OR x.unit_key = x.per_unit THEN coalesce(x.per, 1)
                ELSE x.factor END AS f
    FROM matched x
), judged AS (
    SELECT x.*,
           CASE WHEN x.plain OR x.mapped IS NULL THEN NULL
                WHEN x.f IS NULL THEN x.unit
                WHEN x.incoming IS NULL THEN NULL
                ELSE (SELECT e ->> 3
                      FROM jsonb_array_elements(x.incoming) WITH ORDINALITY AS y(e, o)
                      WHERE e ->> 3 IS NOT NULL AND e ->> 2 IS NULL
                        AND (e ->> 4) IS DISTINCT FROM x.per_unit
                      ORDER BY o LIMIT 1)
           END AS refused_unit
    FROM factored x
), bounded AS (
    SELECT x.*,
           CASE WHEN x.mapped IS NULL OR x.f IS NULL OR x.refused_unit IS NOT NULL THEN false
                WHEN x.quantity > %(ceiling)s / x.f THEN true
                WHEN x.incoming IS NULL THEN false
                ELSE EXISTS (SELECT FROM jsonb_array_elements(x.incoming) AS y(e)
                             WHERE (e ->> 1)::bigint > %(ceiling)s
                                   / CASE WHEN e ->> 3 IS NULL THEN x.f
                                          WHEN e ->> 4 = x.per_unit THEN x.per
                                          ELSE (e ->> 2)::integer END)
           END AS beyond,
           x.mapped IS NOT NULL
               AND CASE WHEN x.unit_key IS NULL THEN x.observed_at < x.units_since
                        WHEN x.unit_key = x.per_unit THEN x.observed_at < x.own_unit_since
                   END IS TRUE AS before_units
    FROM judged x
), resolved AS (
    SELECT x.position, x.observed_at, x.refused_unit, x.beyond, x.before_units,
           CASE WHEN x.sku IS NULL THEN x.supplier_sku END AS supplier_sku,
           CASE WHEN x.sku IS NULL THEN x.upc END AS upc,
           CASE WHEN x.sku IS NULL THEN x.unit END AS unit,
           CASE WHEN x.sku IS NULL THEN x.quantity END AS reported,
           x.sku,
           CASE WHEN x.sku IS NOT NULL THEN x.quantity * x.f END AS quantity,
           CASE WHEN x.incoming IS NULL OR x.sku IS NULL THEN x.incoming
           ELSE (SELECT coalesce(jsonb_agg(jsonb_build_array(
                            e -> 0,
                            (e ->> 1)::bigint * CASE WHEN e ->> 3 IS NULL THEN x.f
                                                     WHEN e ->> 4 = x.per_unit THEN x.per
                                                     ELSE (e ->> 2)::integer END)
                        ORDER BY o), '[]')
                 FROM jsonb_array_elements(x.incoming) WITH ORDINALITY AS y(e, o))
           END AS incoming
    FROM (SELECT j.position, j.observed_at, j.refused_unit, j.beyond, j.before_units,
                 j.supplier_sku, j.upc, j.unit, j.quantity, j.incoming, j.f, j.per, j.per_unit,
                 CASE WHEN NOT j.beyond AND j.refused_unit IS NULL AND NOT j.before_units
                      THEN j.mapped END AS sku
          FROM bounded j OFFSET 0) x  -- `sku` computed once a row, for the columns above
    OFFSET 0  -- each column computed once a row: the sort and window below read them
), numbered AS (
    SELECT r.*, row_number() OVER w AS n,
           coalesce(r.sku = lag(r.sku) OVER w OR r.sku = lead(r.sku) OVER w, false) AS repeated
    FROM resolved r
    WINDOW w AS (ORDER BY r.sku COLLATE "C")
)
SELECT r.position, r.supplier_sku, r.upc, r.observed_at, r.unit, r.reported, r.sku,
       r.quantity, r.incoming, r.n, r.refused_unit, r.beyond, r.before_units,
       l.ctid AS level,
       CASE
           WHEN r.sku IS NULL OR r.repeated OR l.sku IS NULL
                OR l.observed_at IS NULL
                OR r.observed_at < greatest(l.seen_at, l.observed_at)
                OR NOT {repeats}
               THEN 'change'
           WHEN r.observed_at = greatest(l.seen_at, l.observed_at) THEN 'seen'
           ELSE 'repeat'
       END AS kind
FROM numbered r
LEFT JOIN inventoryledger_levels l ON l.supplier_id = %(supplier)s AND l.sku = r.sku
""").format(repeats=_repeats("r"))

# Notes the repeats of one chunk as seen; returns how many it was to note and how many it
# noted. The conditions are checked again on each row as updated (after waiting for a
# writer that holds it), and rows are taken in the writer's order (by SKU, bytewise: the
# order of `n`), so the two wait for each other without deadlocking. Locking the rows
# first (FOR UPDATE SKIP LOCKED) doubled the cost: 668 vs 319 ms for 50,000 rows at 1M
# levels (EXPLAIN ANALYZE). A row is found where RESOLVE saw it (`level`, its ctid): 170
# against 300 ms a chunk by the primary key. Where the row has moved since (another
# transaction updated it), the lookup finds nothing, or PostgreSQL's recheck of the
# newer version fails: the record is not noted, and goes to the ledger as one whose
# level moved.
TOUCH = sql.SQL("""
WITH candidates AS MATERIALIZED (
    SELECT c.level, c.sku, c.quantity, c.observed_at, c.incoming FROM feed_resolved c
    WHERE c.n >= %(first)s AND c.n < %(last)s AND c.kind = 'repeat'
    ORDER BY c.n
), noted AS (
    UPDATE inventoryledger_levels l SET seen_at = c.observed_at
    FROM candidates c
    WHERE l.ctid = c.level
      -- The row there is still this supplier's level of this SKU (written so that it is
      -- a check, not a second way to find the row: no index can serve it).
      AND (l.supplier_id, l.sku) IS NOT DISTINCT FROM (%(supplier)s, c.sku)
      AND c.observed_at > greatest(l.seen_at, l.observed_at)
      AND {repeats}
    RETURNING 1
)
SELECT (SELECT count(*) FROM candidates) AS candidates, (SELECT count(*) FROM noted) AS noted
""").format(repeats=_repeats("c"))

# When a chunk could not note them all: the repeats its notes do not account for (their
# level moved since RESOLVE), for the ledger to decide.
NOT_NOTED = sql.SQL("""
SELECT c.position
FROM feed_resolved c
JOIN inventoryledger_levels l ON l.supplier_id = %(supplier)s AND l.sku = c.sku
WHERE c.n >= %(first)s AND c.n < %(last)s AND c.kind = 'repeat'
  AND NOT (c.observed_at = greatest(l.seen_at, l.observed_at)
           AND {repeats})
""").format(repeats=_repeats("c"))

# The records the ledger must see: those it cannot resolve (UNRESOLVED, refused in the
# delivery's first part), and the others a page at a time in the writer's order (CHANGES,
# after the `n` of the page before; `n` is indexed before they are read), so that a
# delivery's changes are never all in memory at once; and (MOVED) the repeats that could
# not be noted.
UNRESOLVED = """
SELECT position, supplier_sku, upc, sku, quantity, observed_at, unit, reported, incoming,
       refused_unit, beyond, before_units
FROM feed_resolved WHERE kind = 'change' AND sku IS NULL ORDER BY n
"""
CHANGES = """
SELECT position, supplier_sku, upc, sku, quantity, observed_at, unit, reported, incoming, n
FROM feed_resolved WHERE kind = 'change' AND sku IS NOT NULL AND n > %(after)s
ORDER BY n LIMIT %(limit)s
"""
# Records as the supplier wrote them, by position (for the letters of those the ledger
# itself refused).
AS_WRITTEN = """
SELECT position, supplier_sku, upc, quantity AS reported, unit, observed_at, incoming
FROM feed_staging WHERE position = ANY(%(positions)s)
"""
# A delivery read in shares: the SKUs a share reports (in binary: 0.16 against 0.19 s for
# 500,000), and (REPORTED_ELSEWHERE) the records of those that other shares report too,
# which the ledger must see however they compare.
SKUS = "SELECT array_agg(sku) AS skus FROM feed_resolved WHERE sku IS NOT NULL"
REPORTED_ELSEWHERE = """
UPDATE feed_resolved SET kind = 'change' WHERE sku = ANY(%(skus)b::text[]) AND kind <> 'change'
"""
DROP_TABLES = "DROP TABLE IF EXISTS feed_staging, feed_resolved, feed_raw, feed_units, feed_times"
MOVED = """
SELECT position, supplier_sku, upc, sku, quantity, observed_at, unit, reported, incoming
FROM feed_resolved WHERE position = ANY(%(left)s) ORDER BY position
"""

# Rows noted per transaction (~0.3 s at 50,000): a writer saving one of the supplier's
# levels waits for the note's row locks while it holds the event table's lock.
TOUCH_CHUNK = 50_000


def tune_for_delivery(conn: Connection, megabytes: int) -> None:
    """Settings for the transaction that stages and compares a delivery (or a share).

    RESOLVE hashes the supplier's mappings and levels and sorts the delivery: at
    PostgreSQL's default work_mem (4 MB), a delivery of 1,000,000 rows spilled ~500 MB
    to temporary files. At 128 MB (64 to 512 MB alike) it took 4.0-4.4 s against 5.5-6.6
    s with the tables in memory, 5.8 against 6.3 s (means of four) on a database just
    copied from disk.

    JIT off here too, for a database whose migration could not turn it off (a role that
    does not own it: see `api.database._without_jit`; elsewhere it is off already). With
    it on, PostgreSQL compiled RESOLVE for 0.65-0.79 s at each run (the plan's cost is
    far above `jit_above_cost`), and the compiled plan ran ~0.3 s faster, so each share
    paid ~0.4 s more: 4.50-4.67 against 4.10-4.31 s for 1,000,000 rows at 1,000,000
    levels (three alternating pairs, EXPLAIN ANALYZE)."""
    conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(f"{megabytes}MB")))
    conn.execute("SET LOCAL jit = off")


def index_resolved(conn: Connection) -> None:
    """Indexes the delivery's records in the writer's order, and counts them for the
    planner (it never analyses temporary tables itself), before its changes are read a
    page at a time (CHANGES) and its repeats noted (`note_repeats`)."""
    conn.execute("CREATE INDEX ON feed_resolved (n)")
    conn.execute("ANALYZE feed_resolved")


def note_repeats(
    conn: Connection, params: dict[str, Any], staged: int, left: list[int]
) -> Iterator[None]:
    """Notes the delivery's repeats as seen, a chunk per transaction, pausing after each
    (a generator: its caller reads the delivery's changes on the same connection between
    chunks); adds to `left` the positions of those it could not note. `feed_resolved`
    must be indexed on `n` and analysed (`index_resolved`)."""
    last = staged + 1
    for first in range(1, last, TOUCH_CHUNK):
        chunk = {"first": first, "last": min(first + TOUCH_CHUNK, last)}
        with conn.transaction():
            # A chunk looks its own records' levels up by key. Left to itself the
            # planner hashed every level of the supplier for every chunk (its
            # estimate of them stale after a large delivery): quadratic in the size
            # of the delivery, ~1 s a chunk at 1M levels.
            conn.execute("SET LOCAL enable_hashjoin = off")
            conn.execute("SET LOCAL enable_mergejoin = off")
            # Where JIT is on (see `tune_for_delivery`): compiling a chunk's plan took
            # ~13 ms of its ~150 and gained nothing.
            conn.execute("SET LOCAL jit = off")
            counts = conn.execute(TOUCH, {**params, **chunk}).fetchone()
            if counts is not None and counts["noted"] < counts["candidates"]:
                query = conn.execute(NOT_NOTED, {**params, **chunk})
                left += [row["position"] for row in query]
        yield
