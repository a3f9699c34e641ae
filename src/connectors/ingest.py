"""Applying a delivery: parse, normalise, compare with what the ledger holds, apply the changes.

The records are streamed into a staging table (connectors.staging); SQL resolves them to
SKUs through the mappings view and compares them with `inventoryledger_levels`
(connectors.comparison), which the ledger writes in the same transaction as its events
(so a lagging view can never hide a change). Records that repeat the level on record are
noted there as seen; only what may change something — a new level, a late report, a
report that retires unreported changes or refreshes an ageing one, several records for
one SKU — goes to the ledger, in parts (connectors.parts), where the domain decides.
Refused records go to the dead letters with their reason; the rest of the delivery still
applies. A structurally broken delivery (a parser's FeedError) changes nothing and is
refused whole (connectors.outcome). A large CSV delivery is read in shares, on several
connections at once (connectors.shares).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import io
import itertools
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import psycopg
import structlog
from psycopg_pool import PoolTimeout

from connectors.comparison import (
    AS_WRITTEN,
    CHANGES,
    DROP_TABLES,
    MOVED,
    REPORTED_ELSEWHERE,
    RESOLVE,
    SKUS,
    STAGING,
    UNRESOLVED,
    index_resolved,
    note_repeats,
    tune_for_delivery,
)
from connectors.copy_csv import NotByCopy
from connectors.normalise import FeedRules
from connectors.outcome import IngestResult, Rejections, timed
from connectors.parsers import Format, Record, RecordError, parse
from connectors.parsers.csv_feed import CsvSettings
from connectors.parts import PartSender
from connectors.shares import Share, sku_order, split
from connectors.staging import Reading, copy_delivery, stage_records
from ledger.commands import RETRY_SOURCE, Observation
from ledger.delivery import Rejection
from ledger.errors import UnknownSupplier
from ledger.mapping import MADE_BEFORE_UNITS, unknown_unit
from ledger.queries import LedgerQueries
from ledger.stock import incoming_of
from ledger.supplier import SupplierTerms
from ledger.writer import LedgerWriter
from projections.queries import Views
from projections.store import Connection, ViewStore

log = structlog.get_logger(__name__)


# How long a delivery waits for a spare connection to read a share on.
SPARE_WAIT_SECONDS = 1.0

# A CSV delivery this large or larger is read and compared in shares, on several
# connections at once (see `Ingestor._compare`); a smaller one on one connection. Each
# share hashes all the supplier's mappings and levels (~1.2 s of its work at 1,000,000 of
# each), so small deliveries gain nothing from being split.
SPLIT_FROM_BYTES = 8 << 20

# A delivery's changes are read from PostgreSQL this many at a time (see `_Changes`).
CHANGES_PAGE = 2000
# Unresolved records are read (by a cursor) as many at a time, and what the supplier wrote
# of the ledger's own refusals looked up for as many at a time.
UNRESOLVED_PAGE = AS_WRITTEN_PAGE = 2000


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
        self.parts = PartSender(writer, batch_size, part_seconds, clock)
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
        defaults: dict[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> IngestResult:
        """Applies one delivery; raises FeedRejected when it is broken as a whole.

        Parser options: `defaults` (the source's), under the supplier's own, under its
        webhook's own (for a webhook), under `options`. `heartbeat` is called after each
        batch, e.g. to keep an inbox claim alive."""
        terms = self.terms(supplier_id)
        # A webhook may carry a shape of its own beside the supplier's feeds.
        webhook = (terms.connector.get("webhook") or {}) if source == "webhook" else {}
        parser_options = {
            **(defaults or {}),
            **(terms.connector.get("options") or {}),
            **(webhook.get("options") or {}),
            **(options or {}),
        }
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
            source=RETRY_SOURCE,
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
        rules = FeedRules.of(terms)
        params: dict[str, Any] = {
            "supplier": supplier_id,
            "refresh": refresh_interval(terms),
            "upc_fallback": bool(terms.connector.get("upc_fallback", False)),
            "ceiling": rules.max_quantity,
        }
        send = functools.partial(
            self.parts.send,
            supplier_id,
            delivery_id,
            source,
            result=result,
            actor=actor,
            now=now,
            heartbeat=heartbeat,
        )
        reading = Reading(rules, received_at, now, params, progress)
        with ExitStack() as held:
            sides = [_Side(held.enter_context(self.store.connection()))]
            try:
                sides = self._compare(held, sides[0], records, bulk, reading, result)
                refused = self._unresolved(sides, result)
                changes = _Changes(sides, params, self._observations, result, self.parts.batch_size)
                # The changes are read a page at a time as the parts are made, so that a
                # large delivery's are never all in memory. The repeats are noted on the
                # same connections (they hold the delivery, in their sessions' tables)
                # while the writer applies the changes, between pages: they are other
                # levels, so neither waits for the other, and the two share the
                # machine's cores.
                with ThreadPoolExecutor(1, thread_name_prefix="ingest-changes") as reader:
                    reading_changes = reader.submit(changes.read)
                    try:
                        with timed(result, "apply"):
                            send(changes)
                    except BaseException:
                        changes.stop()
                        raise
                    left = reading_changes.result()
                _refusals_as_written(sides, result)
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
        result.unchanged += (
            sum(side.staged for side in sides) - refused - changes.count - len(moved)
        )
        if moved:
            with timed(result, "apply"):
                send(moved, refusals=False)
            # The delivery's tables are gone: such a refusal keeps what the ledger was sent.
            result.keep_ledger_refusals()
        reported = [o.observed_at for o in moved]
        if changes.newest is not None:
            reported.append(changes.newest)
        newest = max(reported, default=None)
        if newest is not None:
            result.lag_seconds = max(0.0, (self.clock() - newest).total_seconds())
        return result

    def _compare(
        self,
        held: ExitStack,
        side: _Side,
        records: Iterator[Record | RecordError],
        bulk: _Bulk | None,
        reading: Reading,
        result: IngestResult,
    ) -> list[_Side]:
        """Stages the delivery and compares it with the levels on record; returns the
        connections that hold it, in their sessions' tables (`feed_resolved`, from which
        the records the ledger must see are read, see `_Changes`).

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
                if self._compare_shares(sides, shares, bulk, reading, result):
                    return sides
                # Declined: the delivery is read in Python, on the first connection; the
                # time the shares took counts as reading, as a declined COPY's does.
                for other in sides[1:]:
                    other.release()
                result.seconds["read"] = time.perf_counter() - began
                bulk.body.seek(start)
                bulk = None
        with side.conn.transaction():
            tune_for_delivery(side.conn, self.work_mem_mb)
            with timed(result, "read"):
                side.staged = self._stage(side.conn, records, bulk, reading, result)
            with timed(result, "compare"):
                side.conn.execute(RESOLVE, reading.params)
                index_resolved(side.conn)
                return [side]

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
        reading: Reading,
        result: IngestResult,
    ) -> bool:
        """Reads and compares each share on its side, at the same time; returns whether
        it could: not where a share could not be read by COPY (the sides then hold
        nothing)."""
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
            return False
        for counted in counts:
            result.rows += counted.rows
            result.rejections.extend(counted.rejections)
        if reading.progress is not None:
            reading.progress(result.rows)
        result.read_by, result.shares = "copy", len(sides)
        _with_reported_twice(sides)
        # The shares were read at the same time, each then compared: the slowest read is
        # the delivery's, the rest of the time its comparison.
        result.seconds["read"] = max(counted.seconds["read"] for counted in counts)
        result.seconds["compare"] = time.perf_counter() - began - result.seconds["read"]
        return True

    def _compare_share(self, side: _Side, share: Share, bulk: _Bulk, reading: Reading) -> _Counted:
        """Loads one share of a delivery by COPY and compares it; what it read (rows,
        refusals, time taken) is returned for the delivery to add up, or why COPY
        declined it. An error while comparing is raised: it is not the file's."""
        counted = _Counted("")
        with side.conn.transaction():
            tune_for_delivery(side.conn, self.work_mem_mb)
            with timed(counted, "read"):
                try:
                    side.staged = copy_delivery(
                        side.conn, share.body, bulk.settings, share.first_position, reading, counted
                    )
                except (NotByCopy, psycopg.Error) as declined:
                    counted.declined = declined
                    return counted
            side.conn.execute(RESOLVE, reading.params)
            index_resolved(side.conn)
            skus = side.conn.execute(SKUS, binary=True).fetchone()
            side.skus = set(skus["skus"] or ()) if skus is not None else set()
        return counted

    def _unresolved(self, sides: list[_Side], result: IngestResult) -> int:
        """Refuses the records that could not be resolved (in `result`), read a page at a
        time (a delivery nobody mapped yet has nothing else); returns how many."""
        before = len(result.rejections)
        for side in sides:
            with side.conn.transaction(), side.conn.cursor(name="feed_unresolved") as cursor:
                cursor.itersize = UNRESOLVED_PAGE
                self._observations(cursor.execute(UNRESOLVED), result)
        return len(result.rejections) - before

    def _observations(self, rows: Iterable[Any], result: IngestResult) -> list[Observation]:
        """The records the ledger must see; unresolved ones are refused (in `result`)."""
        observations: list[Observation] = []
        for row in rows:
            if row["sku"] is None:
                if row["refused_unit"] is not None:
                    reason = unknown_unit(row["refused_unit"])
                elif row["beyond"]:
                    reason = "quantity_out_of_range"
                elif row["before_units"]:
                    reason = MADE_BEFORE_UNITS
                elif row["supplier_sku"]:
                    reason = "unmapped_supplier_sku"
                else:
                    reason = "unmapped_upc"
                fields = _as_written(row)
                letter = {"fields": fields, "raw": fields}
                result.rejections.append(Rejection(row["position"], reason, letter))
            else:
                observations.append(
                    Observation(
                        index=row["position"],
                        sku=row["sku"],
                        quantity=row["quantity"],
                        observed_at=row["observed_at"],
                        incoming=None if row["incoming"] is None else incoming_of(row["incoming"]),
                    )
                )
        return observations

    def _stage(
        self,
        conn: Connection,
        records: Iterator[Record | RecordError],
        bulk: _Bulk | None,
        reading: Reading,
        result: IngestResult,
    ) -> int:
        """Puts the valid records in the staging table; returns how many.

        A CSV delivery is loaded by COPY where it can be (see connectors.copy_csv), in a
        savepoint; where it cannot, it is read again from the start, in Python."""
        if bulk is not None:
            start, read = bulk.body.tell(), IngestResult(result.delivery_id, rows=result.rows)
            try:
                staged = copy_delivery(
                    conn, bulk.body, bulk.settings, 1, reading, read, reading.progress
                )
            except (NotByCopy, psycopg.Error) as refused_copy:
                log.info("ingest.copy_declined", reason=str(refused_copy).strip())
                bulk.body.seek(start)
            else:
                result.rows = read.rows
                result.rejections.extend(read.rejections)
                result.read_by = "copy"
                return staged
        conn.execute(STAGING)
        return stage_records(conn, records, reading, result, reading.progress)


@dataclass(frozen=True)
class _Bulk:
    """A CSV delivery's body and settings, for loading it by COPY."""

    body: BinaryIO
    settings: CsvSettings


@dataclass
class _Side:
    """A connection holding (part of) a delivery in its session's tables: `feed_staging`,
    then `feed_resolved` (RESOLVE), `staged` records in all. Reading a share, it also
    keeps the SKUs the share reports. `own`: what gives a borrowed connection back
    (before the delivery ends, when it has no share to hold)."""

    conn: Connection
    own: ExitStack | None = None
    staged: int = 0
    skus: set[str] = field(default_factory=set)

    def release(self) -> None:
        if self.own is not None:
            self.own.close()


@dataclass
class _Counted(IngestResult):
    """What reading one share counted, or why COPY declined it."""

    declined: Exception | None = None


def _as_written(row: Any) -> dict[str, Any]:
    """A record as the supplier wrote it (a staged row: its SKU, UPC, unit, quantity and
    incoming stock as reported, observed_at in UTC), for a dead letter to be tried again
    from."""
    return {
        "supplier_sku": row["supplier_sku"],
        "upc": row["upc"],
        "quantity": row["reported"],
        "unit": row["unit"],
        "observed_at": row["observed_at"].isoformat(),
        "incoming": None
        if row["incoming"] is None
        else [
            {"quantity": quantity, "expected_on": on, "unit": unit}
            for on, quantity, _, unit, *_ in row["incoming"]
        ],
    }


def _refusals_as_written(sides: list[_Side], result: IngestResult) -> None:
    """The ledger's own refusals (two records of a SKU at one time that disagree, say) come
    back as the observations it was sent: resolved to our SKU, in base units. Their dead
    letters keep what the supplier wrote instead (from the staging tables, while the
    delivery holds them), like every other letter, so that a retry resolves them again
    against the mappings and units of then; `raw` also names the SKU they resolved to."""
    by_ledger, result.by_ledger = iter(result.by_ledger), Rejections(first_kept=0)
    while page := list(itertools.islice(by_ledger, AS_WRITTEN_PAGE)):
        at = {rejection.index: n for n, rejection in enumerate(page)}
        for side in sides:
            for row in side.conn.execute(AS_WRITTEN, {"positions": list(at)}):
                rejection = page[at[row["position"]]]
                fields = _as_written(row)
                raw = {**fields, "sku": (rejection.record or {}).get("sku")}
                page[at[row["position"]]] = Rejection(
                    rejection.index, rejection.reason, {"fields": fields, "raw": raw}
                )
        result.rejections.extend(page)


def _drop_tables(sides: list[_Side]) -> None:
    """Drops the delivery's tables on every connection that held some; one that cannot
    (its connection broke) does not keep the others from it."""
    for side in sides:
        try:
            side.conn.execute(DROP_TABLES)
        except psycopg.Error as error:
            log.warning("ingest.tables_not_dropped", error=str(error).strip())


def _with_reported_twice(sides: list[_Side]) -> None:
    """Makes changes of the records of SKUs that several shares report: such a SKU has
    several records, and the ledger must see them all, as it does the records of a SKU
    reported twice within one share (RESOLVE's `repeated`)."""
    seen: set[str] = set()
    shared: set[str] = set()
    for side in sides:
        shared |= seen & side.skus
        seen |= side.skus
    if shared:
        for side in sides:
            side.conn.execute(REPORTED_ELSEWHERE, {"skus": sorted(shared)})


class _Changes:
    """A delivery's changes for the ledger, in the writer's order (by SKU, bytewise: the
    shares' merged), read a page at a time on the connections that hold them; and, on
    the same connections between pages, the notes of its repeats (`read`, on a thread of
    its own, is the only user of the connections meanwhile). Iterated by the sender, as
    observations. Pages are read ahead of the sender up to two parts' worth (`part`
    changes each): while the writer applies one part, the next is ready however long the
    chunk of notes under way takes."""

    def __init__(
        self,
        sides: list[_Side],
        params: dict[str, Any],
        observations: Callable[[list[Any], IngestResult], list[Observation]],
        result: IngestResult,
        part: int,
    ) -> None:
        self.sides = sides
        self.params = params
        self.observations = observations
        self.result = result
        self.count = 0  # the changes the sender took
        self.newest: datetime | None = None  # the newest report among them
        ahead = 2 * part // CHANGES_PAGE + 2
        self._pages: queue.Queue[list[Any] | BaseException | None] = queue.Queue(ahead)
        self._stopped = threading.Event()

    def read(self) -> list[int]:
        """Reads the changes into pages for the sender, noting the repeats meanwhile; the
        positions of the repeats it could not note are returned."""
        left: list[int] = []
        try:
            notes = [note_repeats(side.conn, self.params, side.staged, left) for side in self.sides]
            rows = heapq.merge(*(self._read(side) for side in self.sides), key=sku_order)
            while page := list(itertools.islice(rows, CHANGES_PAGE)):
                self._put(page, notes)
        except _SenderGone:
            raise
        except BaseException as error:
            if self._stopped.is_set():  # the sender failed first: this one is only logged
                log.warning("ingest.changes_not_read", error=repr(error))
                raise
            self._put(error, [])
            raise
        self._put(None, [])
        while self._note_one(notes):  # the repeats still to note, once every page is read
            if self._stopped.is_set():
                raise _SenderGone()
        return left

    def stop(self) -> None:
        """The sender gave up: reading (and noting) ends at the next page or chunk."""
        self._stopped.set()

    def __iter__(self) -> Iterator[Observation]:
        while (page := self._pages.get()) is not None:
            if isinstance(page, BaseException):
                raise page
            observations = self.observations(page, self.result)
            self.count += len(observations)
            for observation in observations:
                if self.newest is None or observation.observed_at > self.newest:
                    self.newest = observation.observed_at
                yield observation

    def _read(self, side: _Side) -> Iterator[Any]:
        after = 0
        while True:
            rows = side.conn.execute(CHANGES, {"after": after, "limit": CHANGES_PAGE}).fetchall()
            yield from rows
            if len(rows) < CHANGES_PAGE:
                return
            after = rows[-1]["n"]

    def _put(self, page: list[Any] | BaseException | None, notes: list[Iterator[None]]) -> None:
        """Hands a page to the sender; while the sender has pages enough, notes a chunk of
        repeats, or waits."""
        while True:
            if self._stopped.is_set():
                raise _SenderGone()
            try:
                self._pages.put_nowait(page)
                return
            except queue.Full:
                pass
            if not self._note_one(notes):
                with contextlib.suppress(queue.Full):
                    self._pages.put(page, timeout=0.1)
                    return

    def _note_one(self, notes: list[Iterator[None]]) -> bool:
        """Notes one chunk of repeats, if any are left."""
        for steps in notes:
            with timed(self.result, "notes"):
                if next(steps, _DONE) is not _DONE:
                    return True
        return False


class _SenderGone(Exception):
    """The sender stopped taking changes (it failed): reading them ends."""


_DONE = object()


def _size(body: BinaryIO) -> int:
    """The bytes left to read in a seekable body."""
    at = body.tell()
    end = body.seek(0, io.SEEK_END)
    body.seek(at)
    return end - at
