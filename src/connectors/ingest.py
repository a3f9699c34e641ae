"""Applying a delivery: parse, normalise, compare with what the ledger holds, apply the changes.

The records are streamed into a staging table; SQL resolves them to SKUs through the
mappings view and compares them with `inventoryledger_levels`, which the ledger writes
in the same transaction as its events (so a lagging view can never hide a change).
Records that repeat the level on record are noted there as seen; only what may change
something — a new level, a late report, a report that
retires unreported changes or refreshes an ageing one, several records for one SKU —
goes to the ledger, in batches, where the domain decides. Refused records go to the
dead letters with their reason; the rest of the delivery still applies. A structurally
broken delivery (a parser's FeedError) changes nothing and is refused whole.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import psycopg
import structlog
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import PoolTimeout

from connectors.copy_csv import NotByCopy, copy_csv
from connectors.normalise import FeedRules, Staged, normalise, record_fields
from connectors.parsers import FeedError, Format, Record, RecordError, parse
from connectors.parsers.csv_feed import CsvSettings
from connectors.shares import Share, in_sku_order, sku_order, split
from ledger.base import Cause
from ledger.commands import BULK_FROM, Observation, ReportStock
from ledger.delivery import DeliveryOutcome, Rejection
from ledger.errors import UnknownSupplier
from ledger.queries import LedgerQueries
from ledger.supplier import SupplierTerms
from ledger.writer import LedgerWriter
from projections.queries import Views
from projections.store import Connection, ViewStore

log = structlog.get_logger(__name__)

# Rejections recorded on the delivery's event; all of them go to the dead letters.
MAX_REJECTIONS_IN_EVENT = 1000

STAGING = """
CREATE TEMPORARY TABLE feed_staging (
    position integer NOT NULL, supplier_sku text, upc text, quantity bigint NOT NULL,
    factor integer, unit text, observed_at timestamptz NOT NULL
)
"""


def _repeats(record: str) -> sql.Composed:
    """SQL: the record aliased `record` repeats its level on record `l` (which exists): the
    same quantity, no unreported change (a shipment from the supplier's stock) that a report
    this new retires, and the level not so old that the domain records it again
    (`refresh`). RESOLVE, TOUCH and NOT_NOTED share it."""
    return sql.SQL(
        """(l.quantity = {c}.quantity
     AND NOT (l.unreported_from IS NOT NULL
              AND floor(extract(epoch FROM {c}.observed_at)) >= l.unreported_from)
     AND NOT (%(refresh)s::interval IS NOT NULL
              AND {c}.observed_at - l.observed_at >= %(refresh)s))"""
    ).format(c=sql.Identifier(record))


# Resolve each record to a SKU (by supplier SKU; by UPC only where the record has no
# supplier SKU, the first mapping in supplier-SKU order when several share the UPC),
# convert it to base units, and compare it with the level on record. Two hash joins for
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
# Only an unresolved record keeps what the supplier wrote (its supplier SKU, UPC, unit and
# quantity), for its dead letter: the others are sorted and written without them, 3.5
# against 4.0 s for 1,000,000 rows (means of three alternating runs in psql).
RESOLVE = sql.SQL("""
CREATE TEMPORARY TABLE feed_resolved AS
WITH resolved AS (
    SELECT s.position, s.observed_at,
           CASE WHEN coalesce(m.sku, u.sku) IS NULL THEN s.supplier_sku END AS supplier_sku,
           CASE WHEN coalesce(m.sku, u.sku) IS NULL THEN s.upc END AS upc,
           CASE WHEN coalesce(m.sku, u.sku) IS NULL THEN s.unit END AS unit,
           CASE WHEN coalesce(m.sku, u.sku) IS NULL THEN s.quantity END AS reported,
           coalesce(m.sku, u.sku) AS sku,
           s.quantity * coalesce(s.factor, m.units_per_supplier_unit,
                                 u.units_per_supplier_unit, 1) AS quantity
    FROM feed_staging s
    LEFT JOIN view_mappings m
        ON m.supplier_id = %(supplier)s AND m.supplier_sku = s.supplier_sku
    LEFT JOIN (
        SELECT DISTINCT ON (upc) upc, sku, units_per_supplier_unit
        FROM view_mappings WHERE supplier_id = %(supplier)s
          AND upc IN (SELECT upc FROM feed_staging WHERE supplier_sku IS NULL)
        ORDER BY upc, supplier_sku
    ) u ON s.supplier_sku IS NULL AND u.upc = s.upc
), numbered AS (
    SELECT r.*, row_number() OVER w AS n,
           coalesce(r.sku = lag(r.sku) OVER w OR r.sku = lead(r.sku) OVER w, false) AS repeated
    FROM resolved r
    WINDOW w AS (ORDER BY r.sku COLLATE "C")
)
SELECT r.position, r.supplier_sku, r.upc, r.observed_at, r.unit, r.reported, r.sku,
       r.quantity, r.n, l.ctid AS level,
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
    SELECT c.level, c.sku, c.quantity, c.observed_at FROM feed_resolved c
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

# The records the ledger must see, a SKU's together (see `_parts`); and (MOVED) the
# repeats that could not be noted.
CHANGES = """
SELECT position, supplier_sku, upc, sku, quantity, observed_at, unit, reported
FROM feed_resolved WHERE kind = 'change' ORDER BY n
"""
# A delivery read in shares: the SKUs a share reports (in binary: 0.16 against 0.19 s for
# 500,000), and (REPORTED_ELSEWHERE) the records of those that other shares report too,
# which the ledger must see however they compare.
SKUS = "SELECT array_agg(sku) AS skus FROM feed_resolved WHERE sku IS NOT NULL"
REPORTED_ELSEWHERE = """
UPDATE feed_resolved SET kind = 'change' WHERE sku = ANY(%(skus)b::text[]) AND kind <> 'change'
RETURNING position, supplier_sku, upc, sku, quantity, observed_at, unit, reported
"""
DROP_TABLES = "DROP TABLE IF EXISTS feed_staging, feed_resolved, feed_raw, feed_units, feed_times"
MOVED = """
SELECT position, supplier_sku, upc, sku, quantity, observed_at, unit, reported
FROM feed_resolved WHERE position = ANY(%(left)s) ORDER BY position
"""

# How long a delivery waits for the ledger to apply one part. Not the writer's own
# 30 s, meant for a request: on a cold cache, loading the stock items of a part of 5,000
# changes from disk took longer than that here (the delivery failed half applied, to be
# retried), after the OS had dropped the event table's pages.
PART_TIMEOUT = 600.0

# With a time per part (LEDGER_CONNECTOR_PART_SECONDS), a delivery's first part holds
# this many changes, and no part fewer than MIN_PART (unless the delivery has fewer): so
# every part is bulk, decided by the writer in a batch of its own.
FIRST_PART = 500
MIN_PART = BULK_FROM

# Records read in Python go to the staging table this many at a time.
STAGE_BATCH = 10_000

# How long a delivery waits for a spare connection to read a share on.
SPARE_WAIT_SECONDS = 1.0

# A CSV delivery this large or larger is read and compared in shares, on several
# connections at once (see `Ingestor._compare`); a smaller one on one connection. Each
# share hashes all the supplier's mappings and levels (~1.2 s of its work at 1,000,000 of
# each), so small deliveries gain nothing from being split.
SPLIT_FROM_BYTES = 8 << 20

# Rows noted per transaction (~0.3 s at 50,000): a writer saving one of the supplier's
# levels waits for the note's row locks while it holds the event table's lock.
TOUCH_CHUNK = 50_000


@dataclass
class IngestResult:
    """What became of a delivery, summed over the batches it was applied in."""

    delivery_id: str
    rows: int = 0
    applied: int = 0
    unchanged: int = 0
    late: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    position: int | None = None
    lag_seconds: float | None = None
    # How the delivery was read: "copy" (PostgreSQL's COPY, see connectors.copy_csv) or
    # "python" (record by record).
    read_by: str = "python"
    # How many connections read and compared it at once (see `Ingestor._compare`).
    shares: int = 1
    # Where the time went, by phase: "read" (parse, judge, stage), "compare" (with the
    # levels on record), "apply" (the ledger applying the changes) and "notes" (noting the
    # repeats as seen, beside "apply", so not part of the sum).
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id,
            "rows": self.rows,
            "applied": self.applied,
            "unchanged": self.unchanged,
            "late": self.late,
            "rejected": self.rejected,
            "position": self.position,
            "seconds": {phase: round(took, 3) for phase, took in self.seconds.items()},
        }


class FeedRejected(Exception):
    """The delivery is structurally broken; nothing of it was applied."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def content_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def refresh_interval(terms: SupplierTerms) -> timedelta | None:
    """The age at which an unchanged level is recorded again (the domain's own rule)."""
    limits = [limit for limit in (terms.stale_after, terms.exclude_after) if limit]
    return min(limits) / 2 if limits else None


class Ingestor:
    def __init__(
        self,
        writer: LedgerWriter,
        store: ViewStore,
        views: Views,
        *,
        batch_size: int = 5000,
        part_seconds: float = 0.0,
        work_mem_mb: int = 128,
        read_connections: int = 2,
        split_from_bytes: int = SPLIT_FROM_BYTES,
        mapping_wait_seconds: float = 5.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.writer = writer
        self.store = store
        self.views = views
        self.queries = LedgerQueries(writer.app)
        self.batch_size = batch_size
        self.part_seconds = part_seconds
        self.work_mem_mb = work_mem_mb
        self.read_connections = read_connections
        self.split_from_bytes = split_from_bytes
        self.mapping_wait_seconds = mapping_wait_seconds
        self.clock = clock

    def terms(self, supplier_id: str) -> SupplierTerms:
        supplier = self.queries.supplier(supplier_id)
        if supplier is None:
            raise UnknownSupplier(f"unknown supplier {supplier_id!r}")
        return supplier.terms

    def ingest(
        self,
        supplier_id: str,
        delivery_id: str,
        body: BinaryIO,
        format: Format,
        *,
        source: str,
        received_at: datetime,
        actor: str,
        options: dict[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> IngestResult:
        """Applies one delivery; raises FeedRejected when it is broken as a whole.

        `heartbeat` is called after each batch, e.g. to keep an inbox claim alive."""
        terms = self.terms(supplier_id)
        parser_options = {**(terms.connector.get("options") or {}), **(options or {})}
        records = parse(format, body, parser_options)
        bulk = (
            _Bulk(body, CsvSettings.from_options(parser_options))
            if format == "csv" and body.seekable()
            else None
        )
        return self._apply(
            supplier_id,
            delivery_id,
            terms,
            records,
            bulk=bulk,
            source=source,
            received_at=received_at,
            actor=actor,
            progress=progress,
            heartbeat=heartbeat,
        )

    def retry(self, supplier_id: str, records: list[Record], actor: str) -> IngestResult:
        """Applies records again (dead letters), as a delivery of their own."""
        terms = self.terms(supplier_id)
        delivery_id = f"retry:{uuid.uuid4().hex[:16]}"
        return self._apply(
            supplier_id,
            delivery_id,
            terms,
            iter(records),
            source="dead-letter-retry",
            received_at=self.clock(),
            actor=actor,
        )

    def _apply(
        self,
        supplier_id: str,
        delivery_id: str,
        terms: SupplierTerms,
        records: Iterator[Record | RecordError],
        *,
        bulk: _Bulk | None = None,
        source: str,
        received_at: datetime,
        actor: str,
        progress: Callable[[int], None] | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> IngestResult:
        now = self.clock()
        result = IngestResult(delivery_id)
        # The mappings view must have seen every mapping made before this delivery.
        head = self.writer.app.recorder.max_notification_id() or 0
        self.views.wait_for("mappings", head, self.mapping_wait_seconds)
        params: dict[str, Any] = {"supplier": supplier_id, "refresh": refresh_interval(terms)}
        send = functools.partial(
            self._send,
            supplier_id,
            delivery_id,
            source,
            result=result,
            actor=actor,
            now=now,
            heartbeat=heartbeat,
        )
        reading = _Reading(FeedRules.of(terms), received_at, now, params, progress)
        with ExitStack() as held:
            sides = [_Side(held.enter_context(self.store.connection()))]
            try:
                sides, changes = self._compare(held, sides[0], records, bulk, reading, result)
                observations = self._observations(changes, result)
                result.rejections.sort(key=lambda rejection: rejection.index)

                # The repeats are noted on the connections that hold them (in their
                # sessions' tables) while the writer applies the changes: they are other
                # levels, so neither waits for the other, and the two share the
                # machine's cores. The notes' index is built there too, not before the
                # first part is sent.
                def note() -> list[int]:
                    with _timed(result, "notes"):
                        return [
                            position
                            for side in sides
                            for position in self._note_repeats(side.conn, params, side.staged)
                        ]

                with ThreadPoolExecutor(1, thread_name_prefix="ingest-notes") as notes:
                    noting = notes.submit(note)
                    with _timed(result, "apply"):
                        send(observations)
                    left = noting.result()
                # Repeats whose level moved before they were noted: the ledger decides.
                moved = self._observations(
                    [
                        row
                        for side in sides
                        for row in side.conn.execute(MOVED, {"left": left}).fetchall()
                    ],
                    result,
                )
            finally:
                _drop_tables(sides)
        result.unchanged += sum(side.staged for side in sides) - len(changes) - len(moved)
        if moved:
            with _timed(result, "apply"):
                send(moved, refusals=False)
        observations += moved
        if observations:
            newest = max(o.observed_at for o in observations)
            result.lag_seconds = max(0.0, (self.clock() - newest).total_seconds())
        return result

    def _compare(
        self,
        held: ExitStack,
        side: _Side,
        records: Iterator[Record | RecordError],
        bulk: _Bulk | None,
        reading: _Reading,
        result: IngestResult,
    ) -> tuple[list[_Side], list[Any]]:
        """Stages the delivery and compares it with the levels on record; returns the
        connections that hold it (in their sessions' tables, for the notes), and the
        records the ledger must see, a SKU's together, in the writer's order (by SKU,
        bytewise), the unresolved ones last.

        A large CSV delivery is split into shares of whole lines, each read (by COPY) and
        compared on a connection of its own at the same time: PostgreSQL does that work
        on one core a connection, ~8 of a 5% delivery's ~20 s at 1,000,000 rows while the
        machine's other core had nothing to do. A SKU that two shares both report has
        several records, so it goes to the ledger, as it would from a delivery read
        whole. Where a share cannot be read by COPY, the delivery is read whole, on the
        first connection, as if it had not been split."""
        sides = [side, *self._more_sides(held, bulk)]
        if len(sides) > 1:
            assert bulk is not None
            began, start = time.perf_counter(), bulk.body.tell()
            shares = split(bulk.body, bulk.settings, len(sides))
            used = len(shares) if shares is not None else 1  # fewer lines than connections
            for spare in sides[used:]:
                spare.release()
            if shares is not None:
                sides = sides[:used]
                changes = self._compare_shares(sides, shares, bulk, reading, result)
                if changes is not None:
                    return sides, changes
                # Declined: the delivery is read in Python, on the first connection; the
                # time the shares took counts as reading, as a declined COPY's does.
                for other in sides[1:]:
                    other.release()
                result.seconds["read"] = time.perf_counter() - began
                bulk.body.seek(start)
                bulk = None
        with side.conn.transaction():
            self._work_mem(side.conn)
            with _timed(result, "read"):
                side.staged = self._stage(side.conn, records, bulk, reading, result)
            with _timed(result, "compare"):
                side.conn.execute(RESOLVE, reading.params)
                return [side], side.conn.execute(CHANGES).fetchall()

    def _more_sides(self, held: ExitStack, bulk: _Bulk | None) -> list[_Side]:
        """Connections beyond the first for reading a large CSV delivery in shares: none
        for a smaller one, or while the pool has none to spare (the delivery is then
        read on fewer, or on one)."""
        if bulk is None or self.read_connections <= 1 or _size(bulk.body) < self.split_from_bytes:
            return []
        sides: list[_Side] = []
        for _ in range(self.read_connections - 1):
            own = ExitStack()
            try:
                conn = own.enter_context(self.store.connection(timeout=SPARE_WAIT_SECONDS))
            except PoolTimeout:
                break
            held.push(own)
            sides.append(_Side(conn, own))
        return sides

    def _compare_shares(
        self,
        sides: list[_Side],
        shares: list[Share],
        bulk: _Bulk,
        reading: _Reading,
        result: IngestResult,
    ) -> list[Any] | None:
        """Reads and compares each share on its side, at the same time; returns the
        delivery's changes, or None where a share could not be read by COPY (the sides
        then hold nothing)."""
        began = time.perf_counter()
        with ThreadPoolExecutor(len(sides) - 1, thread_name_prefix="ingest-share") as pool:
            others = [
                pool.submit(self._compare_share, side, share, bulk, reading)
                for side, share in zip(sides[1:], shares[1:], strict=True)
            ]
            first = self._compare_share(sides[0], shares[0], bulk, reading)
            counts = [first, *(other.result() for other in others)]
        declined = [c.declined for c in counts if c.declined is not None]
        if declined:
            log.warning(
                "ingest.copy_declined",
                reason=str(declined[0]).strip(),
                error=type(declined[0]).__name__,
                shares=len(sides),
            )
            _drop_tables(sides)
            return None
        for counted in counts:
            result.rows += counted.rows
            result.rejections += counted.rejections
        if reading.progress is not None:
            reading.progress(result.rows)
        result.read_by, result.shares = "copy", len(sides)
        changes = in_sku_order(_with_reported_twice(sides))
        # The shares were read at the same time, each then compared: the slowest read is
        # the delivery's, the rest of the time its comparison.
        result.seconds["read"] = max(counted.seconds["read"] for counted in counts)
        result.seconds["compare"] = time.perf_counter() - began - result.seconds["read"]
        return changes

    def _compare_share(self, side: _Side, share: Share, bulk: _Bulk, reading: _Reading) -> _Counted:
        """Loads one share of a delivery by COPY and compares it; what it read (rows,
        refusals, time taken) is returned for the delivery to add up, or why COPY
        declined it. An error while comparing is raised: it is not the file's."""
        counted = _Counted("")
        with side.conn.transaction():
            self._work_mem(side.conn)
            with _timed(counted, "read"):
                try:
                    side.staged = self._copy(
                        side.conn, share.body, bulk.settings, share.first_position, reading, counted
                    )
                except (NotByCopy, psycopg.Error) as declined:
                    counted.declined = declined
                    return counted
            side.conn.execute(RESOLVE, reading.params)
            side.found = side.conn.execute(CHANGES).fetchall()
            skus = side.conn.execute(SKUS, binary=True).fetchone()
            side.skus = set(skus["skus"] or ()) if skus is not None else set()
        return counted

    def _copy(
        self,
        conn: Connection,
        body: BinaryIO,
        settings: CsvSettings,
        first_position: int,
        reading: _Reading,
        result: IngestResult,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Stages a CSV delivery (or a share of one) by COPY, in a savepoint, the rows
        SQL cannot vouch for read in Python; returns how many were staged. Raises
        NotByCopy, or COPY's error, where it cannot be read so (nothing is then staged)."""
        with conn.transaction():
            conn.execute(STAGING)
            loaded = copy_csv(
                conn,
                body,
                settings,
                reading.rules,
                reading.received_at,
                reading.now,
                first_position=first_position,
            )
            result.rows += loaded.staged
            if progress is not None:
                progress(result.rows)
            staged = loaded.staged + self._stage_records(
                conn, loaded.rest, reading, result, progress
            )
            conn.execute("DROP TABLE feed_raw, feed_units, feed_times")
        return staged

    def _work_mem(self, conn: Connection) -> None:
        # RESOLVE hashes the supplier's mappings and levels and sorts the delivery: at
        # PostgreSQL's default work_mem (4 MB), a delivery of 1,000,000 rows spilled ~500
        # MB to temporary files. At 128 MB (64 to 512 MB alike) it took 4.0-4.4 s against
        # 5.5-6.6 s with the tables in memory, 5.8 against 6.3 s (means of four) on a
        # database just copied from disk.
        conn.execute(
            sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(f"{self.work_mem_mb}MB"))
        )

    def _note_repeats(self, conn: Connection, params: dict[str, Any], staged: int) -> list[int]:
        """Notes the delivery's repeats as seen, a chunk per transaction; returns the
        positions of those it could not note."""
        conn.execute("CREATE INDEX ON feed_resolved (n)")
        conn.execute("ANALYZE feed_resolved")
        left: list[int] = []
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
                counts = conn.execute(TOUCH, {**params, **chunk}).fetchone()
                if counts is not None and counts["noted"] < counts["candidates"]:
                    query = conn.execute(NOT_NOTED, {**params, **chunk})
                    left += [row["position"] for row in query]
        return left

    def _observations(self, rows: list[Any], result: IngestResult) -> list[Observation]:
        """The records the ledger must see; unresolved ones are refused (in `result`)."""
        observations: list[Observation] = []
        for row in rows:
            if row["sku"] is None:
                reason = "unmapped_supplier_sku" if row["supplier_sku"] else "unmapped_upc"
                fields = {
                    "supplier_sku": row["supplier_sku"],
                    "upc": row["upc"],
                    "quantity": row["reported"],
                    "unit": row["unit"],
                    "observed_at": row["observed_at"].isoformat(),
                }
                letter = {"fields": fields, "raw": fields}
                result.rejections.append(Rejection(row["position"], reason, letter))
            else:
                observations.append(
                    Observation(
                        index=row["position"],
                        sku=row["sku"],
                        quantity=row["quantity"],
                        observed_at=row["observed_at"],
                    )
                )
        return observations

    def _stage(
        self,
        conn: Connection,
        records: Iterator[Record | RecordError],
        bulk: _Bulk | None,
        reading: _Reading,
        result: IngestResult,
    ) -> int:
        """Puts the valid records in the staging table; returns how many.

        A CSV delivery is loaded by COPY where it can be (see connectors.copy_csv), in a
        savepoint; where it cannot, it is read again from the start, in Python."""
        if bulk is not None:
            start, rows, refused = bulk.body.tell(), result.rows, len(result.rejections)
            try:
                staged = self._copy(
                    conn, bulk.body, bulk.settings, 1, reading, result, reading.progress
                )
                result.read_by = "copy"
                return staged
            except (NotByCopy, psycopg.Error) as refused_copy:
                log.info("ingest.copy_declined", reason=str(refused_copy).strip())
                bulk.body.seek(start)
                result.rows = rows
                del result.rejections[refused:]
        conn.execute(STAGING)
        return self._stage_records(conn, records, reading, result, reading.progress)

    def _stage_records(
        self,
        conn: Connection,
        records: Iterator[Record | RecordError],
        reading: _Reading,
        result: IngestResult,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Streams records read in Python into the staging table; returns how many.
        `progress` (the delivery's, where this reads it whole) hears of every 10,000."""
        staged = 0
        rows: list[tuple[Any, ...]] = []
        try:
            for item in records:
                result.rows += 1
                if progress is not None and result.rows % 10_000 == 0:
                    progress(result.rows)
                if isinstance(item, RecordError):
                    result.rejections.append(
                        Rejection(item.position, item.reason, {"fields": None, "raw": item.raw})
                    )
                    continue
                outcome = normalise(item, reading.rules, reading.received_at, reading.now)
                if isinstance(outcome, str):
                    letter = _letter(item, reading.received_at)
                    result.rejections.append(Rejection(item.position, outcome, letter))
                    continue
                rows.append(_row(outcome, item.unit))
                if len(rows) == STAGE_BATCH:
                    staged += _copy_staged(conn, rows)
        except FeedError as broken:
            raise FeedRejected(broken.reason) from broken
        staged += _copy_staged(conn, rows)
        if progress is not None:
            progress(result.rows)
        return staged

    def _send(
        self,
        supplier_id: str,
        delivery_id: str,
        source: str,
        observations: list[Observation],
        *,
        result: IngestResult,
        actor: str,
        now: datetime,
        heartbeat: Callable[[], None] | None = None,
        refusals: bool = True,
    ) -> None:
        """Sends the changes to the ledger in parts; the first carries the refusals
        (unless `refusals` is false: they went with an earlier part).

        The writer applies one command at a time, so every reservation waits while it
        applies a part: with `part_seconds` set, while other commands are waiting each
        part is sized to take about that long at the rate the one before it was applied,
        and grows while none are (see `_next_size`); with 0, each holds `batch_size`."""
        size = min(self.batch_size, FIRST_PART) if self.part_seconds else self.batch_size
        start, first = 0, refusals
        while start < len(observations) or first:
            end = _part_end(observations, start, size)
            batch = observations[start:end]
            decided = self.writer.commands
            seconds = self._send_part(
                supplier_id,
                delivery_id,
                source,
                batch,
                first=first,
                result=result,
                actor=actor,
                now=now,
                heartbeat=heartbeat,
            )
            # Commands besides this part decided meanwhile: others are waiting on the writer.
            contended = self.writer.commands - decided > 1
            size = self._next_size(len(batch), seconds, contended)
            start, first = end, False

    def _next_size(self, size: int, seconds: float, contended: bool) -> int:
        """The size of the part after one of `size` changes that took the writer `seconds`.
        While other commands wait on the writer (`contended`), as many as it applies in
        `part_seconds` at that rate; while none do, larger. At most twice as many as
        before, at least MIN_PART, at most `batch_size`."""
        if not self.part_seconds:
            return self.batch_size
        fitting = round(size * self.part_seconds / max(seconds, 1e-3)) if contended else 2 * size
        return max(min(MIN_PART, self.batch_size), min(fitting, 2 * size, self.batch_size))

    def _send_part(
        self,
        supplier_id: str,
        delivery_id: str,
        source: str,
        batch: list[Observation],
        *,
        first: bool,
        result: IngestResult,
        actor: str,
        now: datetime,
        heartbeat: Callable[[], None] | None,
    ) -> float:
        """One part, as one command (the first carries the refusals); returns how long
        the writer took over it."""
        rejections = result.rejections[:MAX_REJECTIONS_IN_EVENT] if first else []
        # A part is named by what it carries: applying the delivery again (after a
        # crash or a timeout) sends only what is still unapplied, under new names,
        # while an identical part is recognised and changes nothing.
        digest = _part_hash(batch, rejections)
        command = ReportStock(
            at=now,
            cause=Cause(actor, f"supplier.feed.{source}", delivery_id),
            supplier_id=supplier_id,
            delivery_id=f"{delivery_id}~{digest[:16]}",
            content_hash=digest,
            source=source,
            rows=len(batch) + len(rejections),
            observations=batch,
            rejected=rejections,
        )
        outcome = self.writer.execute(command, timeout=PART_TIMEOUT)
        if heartbeat is not None:
            heartbeat()
        counted: DeliveryOutcome = outcome.value
        result.applied += counted.applied
        result.unchanged += counted.unchanged
        result.late += counted.late
        new = {r.index for r in counted.rejected} - {r.index for r in rejections}
        result.rejections.extend(r for r in counted.rejected if r.index in new)
        if outcome.position is not None:
            result.position = max(result.position or 0, outcome.position)
        return outcome.seconds


def describe_phases(seconds: Mapping[str, float]) -> str:
    """A delivery's phase times (`IngestResult.seconds`), as a person reads them."""
    shown = [
        f"{phase} {seconds[phase]:.1f} s"
        for phase in ("read", "compare", "apply")
        if phase in seconds
    ]
    if "notes" in seconds:
        shown.append(f"notes {seconds['notes']:.1f} s beside apply")
    return ", ".join(shown)


@contextmanager
def _timed(result: IngestResult, phase: str) -> Iterator[None]:
    """Adds the time the block takes to the delivery's `phase`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - started
        result.seconds[phase] = result.seconds.get(phase, 0.0) + took


@dataclass(frozen=True)
class _Bulk:
    """A CSV delivery's body and settings, for loading it by COPY."""

    body: BinaryIO
    settings: CsvSettings


@dataclass(frozen=True)
class _Reading:
    """What reading a delivery needs besides the records."""

    rules: FeedRules
    received_at: datetime
    now: datetime
    params: dict[str, Any]
    progress: Callable[[int], None] | None


@dataclass
class _Side:
    """A connection holding (part of) a delivery in its session's tables: `feed_staging`,
    then `feed_resolved` (RESOLVE), `staged` records in all. Reading a share, it also
    keeps the share's changes (`found`) and the SKUs it reports. `own`: what gives a
    borrowed connection back (before the delivery ends, when it has no share to hold)."""

    conn: Connection
    own: ExitStack | None = None
    staged: int = 0
    found: list[Any] = field(default_factory=list)
    skus: set[str] = field(default_factory=set)

    def release(self) -> None:
        if self.own is not None:
            self.own.close()


@dataclass
class _Counted(IngestResult):
    """What reading one share counted, or why COPY declined it."""

    declined: Exception | None = None


def _drop_tables(sides: list[_Side]) -> None:
    """Drops the delivery's tables on every connection that held some; one that cannot
    (its connection broke) does not keep the others from it."""
    for side in sides:
        try:
            side.conn.execute(DROP_TABLES)
        except psycopg.Error as error:
            log.warning("ingest.tables_not_dropped", error=str(error).strip())


def _with_reported_twice(sides: list[_Side]) -> list[list[Any]]:
    """Each share's changes, with the records of SKUs that other shares report too: such a
    SKU has several records, and the ledger must see them all, as it does the records of
    a SKU reported twice within one share (RESOLVE's `repeated`)."""
    seen: set[str] = set()
    shared: set[str] = set()
    for side in sides:
        shared |= seen & side.skus
        seen |= side.skus
    found = [side.found for side in sides]
    if shared:
        for changes, side in zip(found, sides, strict=True):
            changes += side.conn.execute(REPORTED_ELSEWHERE, {"skus": sorted(shared)}).fetchall()
            changes.sort(key=sku_order)
    return found


def _size(body: BinaryIO) -> int:
    """The bytes left to read in a seekable body."""
    at = body.tell()
    end = body.seek(0, io.SEEK_END)
    body.seek(at)
    return end - at


def _part_end(observations: list[Observation], start: int, size: int) -> int:
    """Where the part of about `size` from `start` ends. A SKU's records, adjacent in
    `observations`, stay in one part: the ledger compares them (two that disagree at the
    same time are both refused), which it cannot across parts."""
    end = min(start + size, len(observations))
    while 0 < end < len(observations) and observations[end].sku == observations[end - 1].sku:
        end += 1
    return end


def _copy_staged(conn: Connection, rows: list[tuple[Any, ...]]) -> int:
    """COPYs rows into the staging table (between the reads of a server-side cursor, which
    a COPY left open would block) and empties the list; returns how many."""
    count = len(rows)
    if rows:
        with (
            conn.cursor() as cursor,
            cursor.copy(
                "COPY feed_staging"
                " (position, supplier_sku, upc, quantity, factor, unit, observed_at)"
                " FROM STDIN"
            ) as copy,
        ):
            for row in rows:
                copy.write_row(row)
        rows.clear()
    return count


def _row(staged: Staged, unit: str | None) -> tuple[Any, ...]:
    return (
        staged.position,
        staged.supplier_sku,
        staged.upc,
        staged.quantity,
        staged.factor,
        unit,
        staged.observed_at,
    )


def _letter(record: Record, received_at: datetime) -> dict[str, Any]:
    return {"fields": record_fields(record, received_at), "raw": record.raw}


def _part_hash(batch: Iterable[Observation], rejections: list[Rejection]) -> str:
    digest = hashlib.sha256()
    for observation in batch:
        digest.update(
            f"{observation.index}|{observation.sku}|{observation.quantity}|"
            f"{observation.observed_at.isoformat()}\n".encode()
        )
    digest.update(json.dumps([r.as_dict() for r in rejections], default=str).encode())
    return digest.hexdigest()


def record_dead_letters(
    conn: Connection, supplier_id: str, delivery_id: str, rejections: list[Rejection]
) -> None:
    """Stores every refused record with its reason, once per delivery and position."""
    if not rejections:
        return
    rows = []
    for rejection in rejections:
        record = rejection.record or {}
        fields, raw = record.get("fields"), record.get("raw", record)
        rows.append(
            (
                supplier_id,
                delivery_id,
                rejection.index,
                rejection.reason,
                None if fields is None else Jsonb(fields),
                Jsonb(raw),
            )
        )
    with conn.cursor() as cursor:
        cursor.executemany(
            sql.SQL(
                "INSERT INTO connector_dead_letters"
                " (supplier_id, delivery_id, position, reason, record, raw)"
                " VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (supplier_id, delivery_id, position) DO NOTHING"
            ),
            rows,
        )
