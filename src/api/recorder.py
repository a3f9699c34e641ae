"""The ledger's PostgreSQL recorder: the library's, plus what the ledger keeps beside its events.

`inventoryledger_levels` holds each supplier's last report per SKU and is written in the
same transaction as the events (after them, under the same table lock, so concurrent
writers cannot deadlock): a delivery can be compared with it in bulk, and a row is never
behind the events. Its `seen_at` is the newest report of the level seen, recorded or
not: a report that only repeats the level leaves no event, but an older report that
arrives after it is still late. Both kinds of write are conditional on what the writer
decided from, and a save whose basis moved (another process saw a newer report, or
changed the level) fails as a conflict, to be decided again. `select_streams` loads many
aggregates from their latest snapshots in one round trip. Notifications are read in
binary, as plain rows: a third of the cost of the library's reading (measured).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
import structlog
from eventsourcing.persistence import IntegrityError, Notification, StoredEvent
from eventsourcing.persistence import InterfaceError as StoreInterface
from eventsourcing.persistence import OperationalError as StoreOperational
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg import Connection, Cursor
from psycopg.abc import Query
from psycopg.errors import LockNotAvailable, QueryCanceled
from psycopg.rows import DictRow, tuple_row
from psycopg.sql import SQL, Composable, Identifier, Literal
from psycopg_pool import PoolClosed, PoolTimeout

from api import pgpipeline
from ledger.hot import NotAsKept
from ledger.stock import LevelRow, LevelTouch, incoming_json

LEVELS_TABLE = "inventoryledger_levels"


# Before any save: see api.pgpipeline (a save of megabytes that waited on the table's
# lock never finished).
pgpipeline.install()

log = structlog.get_logger(__name__)


class LevelMoved(IntegrityError):
    """A level changed, or a newer report of it was seen, since the writer read it."""


class LedgerRecorder(PostgresApplicationRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name=events_table_name)
        schema = Identifier(self.datastore.schema)
        # As the library's, but the stored events travel in binary (%b): their text
        # form costs more to build than the insert itself, under the table lock.
        insert = (
            "INSERT INTO {schema}.{table} AS t (originator_id, originator_version, topic, state)"
            " SELECT originator_id, originator_version, topic, state"
            " FROM unnest(%b::{schema}.{stored_event_type}[]){condition}"
            " RETURNING notification_id"
        )
        names = {
            "schema": schema,
            "table": Identifier(self.events_table_name),
            "stored_event_type": Identifier(self.stored_event_type_name),
        }
        self.insert_events_statement = SQL(insert).format(condition=SQL(""), **names)
        self._select_notifications_statements: dict[tuple[str, ...], Any] = {}
        self.snapshots_table_name = events_table_name.removesuffix("_events") + "_snapshots"
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{table} ("
                " supplier_id text NOT NULL, sku text NOT NULL, quantity bigint NOT NULL,"
                " observed_at timestamptz, unreported_from bigint, seen_at timestamptz,"
                " incoming jsonb, PRIMARY KEY (supplier_id, sku))"
                # Rows are rewritten often (a delivery notes every repeated level): room
                # on their page lets PostgreSQL update them in place, index untouched.
                " WITH (fillfactor = 50)"
            ).format(schema=schema, table=Identifier(LEVELS_TABLE))
        )
        # A database made before reports seen were kept gains the column (empty: no
        # report is known to be newer than the level on record), and one made before
        # incoming stock was kept gains that one (empty: none known). Only then: the
        # ALTER would lock the table even where the column is there.
        for column, kind in (("seen_at", "timestamptz"), ("incoming", "jsonb")):
            self.sql_create_statements.append(
                SQL(
                    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM information_schema.columns"
                    " WHERE table_schema = {schema_name} AND table_name = {table_name}"
                    " AND column_name = {column_name}) THEN"
                    " ALTER TABLE {schema}.{table} ADD COLUMN {column} {kind};"
                    " END IF; END $$"
                ).format(
                    schema=schema,
                    table=Identifier(LEVELS_TABLE),
                    schema_name=Literal(self.datastore.schema or "public"),
                    table_name=Literal(LEVELS_TABLE),
                    column_name=Literal(column),
                    column=Identifier(column),
                    kind=SQL(kind),  # one of the two above
                )
            )
        levels = Identifier(LEVELS_TABLE)
        # The arrays below travel in binary (%b) too: a delivery's part sends thousands of
        # values in each, and their text form cost ~4x as long to build (5,000 levels:
        # 30 against 8 ms a statement; 5,000 stream ids: 15 against 4 ms; measured with
        # the round trip), on the writer's thread.
        # A row whose report moves on must not pass a newer report seen meanwhile.
        self.upsert_levels: bytes = _rendered(
            SQL(
                "INSERT INTO {schema}.{table} AS l"
                " (supplier_id, sku, quantity, observed_at, unreported_from, incoming, seen_at)"
                " SELECT r.supplier_id, r.sku, r.quantity, r.observed_at, r.unreported_from,"
                "  r.incoming::jsonb, r.observed_at FROM unnest("
                "  %b::text[], %b::text[], %b::bigint[], %b::timestamptz[], %b::bigint[],"
                "  %b::text[]"
                " ) AS r(supplier_id, sku, quantity, observed_at, unreported_from, incoming)"
                " ON CONFLICT (supplier_id, sku) DO UPDATE SET quantity = excluded.quantity,"
                "  observed_at = excluded.observed_at, unreported_from = excluded.unreported_from,"
                "  incoming = excluded.incoming,"
                "  seen_at = greatest(l.seen_at, excluded.observed_at)"
                " WHERE l.observed_at IS NOT DISTINCT FROM excluded.observed_at"
                "  OR coalesce(l.seen_at, l.observed_at) IS NULL"
                "  OR coalesce(l.seen_at, l.observed_at) <= excluded.observed_at"
                " RETURNING 1"
            ).format(schema=schema, table=levels)
        )
        # A repeated report is noted only while the level is still the one it repeated.
        self.touch_levels_statement: bytes = _rendered(
            SQL(
                "INSERT INTO {schema}.{table} AS l"
                " (supplier_id, sku, seen_at, quantity, observed_at, unreported_from, incoming)"
                " SELECT t.supplier_id, t.sku, t.seen_at, t.quantity, t.observed_at,"
                "  t.unreported_from, t.incoming::jsonb FROM unnest("
                "  %b::text[], %b::text[], %b::timestamptz[], %b::bigint[], %b::timestamptz[],"
                "  %b::bigint[], %b::text[]) AS t(supplier_id, sku, seen_at, quantity,"
                "  observed_at, unreported_from, incoming)"
                " ON CONFLICT (supplier_id, sku) DO UPDATE"
                "  SET seen_at = greatest(l.seen_at, excluded.seen_at)"
                " WHERE l.quantity = excluded.quantity"
                "  AND l.observed_at IS NOT DISTINCT FROM excluded.observed_at"
                "  AND l.unreported_from IS NOT DISTINCT FROM excluded.unreported_from"
                "  AND l.incoming IS NOT DISTINCT FROM excluded.incoming"
                " RETURNING 1"
            ).format(schema=schema, table=levels)
        )
        self.select_seen_statement = SQL(
            "SELECT sku, greatest(seen_at, observed_at) AS seen_at FROM {schema}.{table}"
            " WHERE supplier_id = %s AND sku = ANY(%b::text[])"
        ).format(schema=schema, table=levels)
        # A save decided on kept copies (see `insert_events`) inserts its events only if
        # no other process saved since the writer's last save (holding the table's lock,
        # the newest event is still that save's) and no stream taken as new exists; else
        # nothing, which the writer learns from the ids it gets back. Checked in the
        # insert itself, so that the save takes one round trip, COMMIT sent with it.
        # The streams are looked up one by one, on the primary key: as `originator_id =
        # ANY(...)` the planner scanned the whole table (and, for no streams, to the
        # end): PostgreSQL's CPU a reservation doubled across 10,000 SKUs.
        as_kept = SQL(
            " WHERE (SELECT max(notification_id) FROM {schema}.{table}) = %b::bigint"
            "  AND NOT EXISTS (SELECT FROM unnest(%b::uuid[]) AS a(id) CROSS JOIN LATERAL"
            "   (SELECT FROM {schema}.{table} WHERE originator_id = a.id LIMIT 1) e)"
        ).format(**names)
        self.insert_events_as_kept_statement = _rendered(
            SQL(insert).format(condition=as_kept, **names)
        )
        self.select_versions_statement = SQL(
            "SELECT w.id, (SELECT max(originator_version) FROM {schema}.{events}"
            " WHERE originator_id = w.id) AS version FROM unnest(%b::uuid[]) AS w(id)"
        ).format(schema=schema, events=Identifier(self.events_table_name))
        # LATERAL lookups, one per stream, on the primary keys: however the planner
        # estimates the array, it never scans a table whose size grows with the log
        # (OFFSET 0 keeps the planner from flattening the lookup into a hash join).
        self.select_streams_statement: bytes = _rendered(
            SQL(
                "WITH wanted AS MATERIALIZED (SELECT DISTINCT ON (id) id, after"
                "   FROM unnest(%b::uuid[], %b::integer[]) AS t(id, after)),"
                " latest AS MATERIALIZED (SELECT w.id AS originator_id, s.originator_version,"
                "   s.topic, s.state FROM wanted w CROSS JOIN LATERAL ("
                "     SELECT originator_version, topic, state FROM {schema}.{snapshots}"
                "     WHERE originator_id = w.id AND w.after = 0"
                "     ORDER BY originator_version DESC LIMIT 1) s)"
                " SELECT originator_id, originator_version, topic, state, 0 AS kind FROM latest"
                " UNION ALL"
                " SELECT w.id, e.originator_version, e.topic, e.state, 1 AS kind"
                " FROM wanted w LEFT JOIN latest l ON l.originator_id = w.id"
                " CROSS JOIN LATERAL (SELECT originator_version, topic, state"
                "   FROM {schema}.{events} WHERE originator_id = w.id"
                "   AND originator_version > greatest(coalesce(l.originator_version, 0), w.after)"
                "   OFFSET 0) e"
                " ORDER BY originator_id, kind, originator_version"
            ).format(
                schema=schema,
                snapshots=Identifier(self.snapshots_table_name),
                events=Identifier(self.events_table_name),
            )
        )
        # Every statement a save runs, composed once: psycopg composes a statement given
        # as SQL again on every execute, and a save runs four to six of them, holding the
        # table lock (~4% of the writer's time across 10,000 SKUs, measured with py-spy).
        self.lock_table_statements = [
            _rendered(statement) for statement in self.lock_table_statements
        ]
        self.notify_statement = _rendered(SQL("NOTIFY {0}").format(Identifier(self.channel_name)))
        self.break_stuck_lock_statement: bytes = _rendered(
            SQL(
                "SELECT a.pid, a.state, a.application_name, a.client_addr,"
                " extract(epoch FROM now() - a.xact_start) AS held_seconds,"
                " pg_terminate_backend(a.pid) AS ended"
                " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'relation' AND l.granted AND l.mode = 'ExclusiveLock'"
                " AND l.database = (SELECT oid FROM pg_database"
                "                   WHERE datname = current_database())"
                " AND l.relation = to_regclass({table}) AND a.pid <> pg_backend_pid()"
                " AND a.xact_start < now() - make_interval(secs => %s)"
            ).format(table=Literal(f"{self.datastore.schema or 'public'}.{self.events_table_name}"))
        )
        # (The library types it as its SQL; psycopg takes either.)
        self.insert_events_statement = _rendered(self.insert_events_statement)  # type: ignore[assignment]

    def _notify_channel(self, curs: Cursor[DictRow]) -> None:
        curs.execute(self.notify_statement)

    def _insert_stored_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        """The library's (lock, notify, insert), checked as kept where the save was
        decided on kept copies (`after`: see `insert_events`)."""
        after: int | None = kwargs.get("after")
        if after is None:
            super()._insert_stored_events(curs, stored_events, **kwargs)
            return
        self._lock_table(curs)
        self._notify_channel(curs)
        events = [
            self.construct_pg_stored_event(e.originator_id, e.originator_version, e.topic, e.state)
            for e in stored_events
        ]
        absent = list(kwargs.get("absent") or ())
        curs.execute(self.insert_events_as_kept_statement, (events, after, absent))

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """The library's insert (one transaction, table lock, pipelined), then the levels.

        Written out here because a failed check must roll the transaction back: the
        library catches what its steps raise and commits before raising it again.
        `locked`: an `Exclusive` transaction to save in (as a savepoint), committed once
        the save succeeds, before this returns, as a save of its own would be. `after`:
        the last notification the writer saved, when it decided on what it kept without
        asking (see `ledger.hot`): the events are inserted only while the newest event
        in the table is still that one (no other process saved meanwhile), and none of
        `absent` exists (streams the writer took as new without asking and did not
        start: a refused order's reservation); else nothing is, and the save raises
        NotAsKept. The check holds the table's lock, and the numbers come from a
        sequence that caches none (as PostgreSQL makes it; see `numbers_follow_saves`),
        so a save that committed before it is numbered above every earlier one: with a
        cached sequence, another process's save could be numbered below the newest, and
        go unseen.

        A save whose connection is lost fails at once, where the library's tries again:
        its commit may or may not have happened, which the writer learns by deciding
        again on what the store holds (its callers meanwhile hear that the store was
        unavailable; an order sent again under its idempotency key, or a delivery's part
        under its name, is recognised). The decorator this carried until
        2026-12-06 named psycopg's errors, which the library's connection turns into its
        own, so it fired only under the table lock: ten tries, 0.2 s apart, on the
        connection that was gone.
        """
        levels: Sequence[LevelRow] = kwargs.pop("levels", None) or ()
        touches: Sequence[LevelTouch] = kwargs.pop("touches", None) or ()
        locked: Exclusive | None = kwargs.get("locked")
        if locked is None:
            try:
                with self.datastore.get_connection() as conn:
                    return self._save(conn, stored_events, levels, touches, **kwargs)
            except Exception as error:
                if lock_timed_out(error):
                    self.break_stuck_lock()
                raise
        # In a transaction of its own already: the save is a savepoint in it.
        failure: Exception | None = None
        notification_ids: Sequence[int] | None = None
        with locked.conn.pipeline() as pipeline, locked.conn.transaction():
            try:
                read = self._queue_save(locked.conn, stored_events, levels, touches, **kwargs)
                pipeline.sync()
                notification_ids = read()
            except Exception as error:
                failure = error
            if isinstance(failure, (LevelMoved, NotAsKept)):
                raise psycopg.Rollback()
        if failure is not None:
            raise failure
        locked.commit()
        return notification_ids

    def _save(
        self,
        conn: Connection[DictRow],
        stored_events: Sequence[StoredEvent],
        levels: Sequence[LevelRow],
        touches: Sequence[LevelTouch],
        **kwargs: Any,
    ) -> Sequence[int] | None:
        """A save in a transaction of its own, in as few round trips as it can: one
        where nothing is left to check once PostgreSQL has run it (BEGIN, the insert and
        COMMIT sent together, their answers read as the pipeline ends), else two (the
        checks' answers read before COMMIT is sent). psycopg's `transaction()` would cost
        one more, to learn that BEGIN succeeded before sending the rest: the writer's
        thread waited on that round trip for 15% of its time across 10,000 SKUs
        (py-spy), as long as on the COMMIT, the save's slowest step being the wait for
        PostgreSQL and the GIL, not PostgreSQL's work. The connection is in autocommit
        mode (as the library keeps it), so BEGIN and COMMIT are sent as statements;
        whatever fails, the transaction is rolled back, once the pipeline has ended,
        before the connection goes back to the pool."""
        checked = bool(levels or touches)
        try:
            with conn.pipeline() as pipeline:
                conn.execute(b"BEGIN")
                read = self._queue_save(conn, stored_events, levels, touches, **kwargs)
                if checked:
                    pipeline.sync()
                    notification_ids = read()
                conn.execute(b"COMMIT")
            # The pipeline's end sent what was left and read every answer.
            return notification_ids if checked else read()
        except BaseException:
            _roll_back(conn)
            raise

    def _queue_save(
        self,
        conn: Connection[DictRow],
        stored_events: Sequence[StoredEvent],
        levels: Sequence[LevelRow],
        touches: Sequence[LevelTouch],
        **kwargs: Any,
    ) -> Callable[[], Sequence[int] | None]:
        """Sends a save's statements down the pipeline, inside a transaction the caller
        opened, without waiting for their answers; returns what reads and checks them
        once the caller has synced the pipeline, raising NotAsKept or LevelMoved where a
        check fails, and the notification ids of the events."""
        after: int | None = kwargs.get("after")
        inserted = conn.cursor()
        self._insert_events(inserted, stored_events, **kwargs)
        upserted = touched = None
        if stored_events:  # the levels go with events (see `touch_levels`)
            self._insert_stored_events(inserted, stored_events, **kwargs)
            if levels:
                upserted = conn.execute(self.upsert_levels, _columns(levels))
            if touches:
                touched = conn.execute(self.touch_levels_statement, _columns(touches))

        def read() -> Sequence[int] | None:
            if not stored_events:
                notification_ids = None
            else:
                notification_ids = self._fetch_ids_after_insert_events(
                    inserted, stored_events, **kwargs
                )
                if after is not None and not notification_ids:
                    raise NotAsKept("another process saved since, or a stream taken as new exists")
            if upserted is not None and len(upserted.fetchall()) != len(levels):
                raise LevelMoved("a newer report of a level was seen since it was read")
            if touched is not None and len(touched.fetchall()) != len(touches):
                raise LevelMoved("a level changed since a report was found to repeat it")
            return notification_ids

        return read

    def break_stuck_lock(self) -> list[int]:
        """Ends the sessions that have held the event table's lock (the one every save
        takes, EXCLUSIVE) for STUCK_LOCK_SECONDS; returns their process ids.

        A save holds it for milliseconds (a delivery's part, a second or two). A session
        that holds it far longer is a process that stopped mid-save (frozen: stopped,
        swapped out, its VM paused) with its connection open: PostgreSQL sees it as busy
        (not idle in a transaction, which it would end by itself), and every save of
        every process times out behind it, for as long as it stays so. Ending its
        session rolls its save back (its process, if it ever runs again, finds its
        connection gone and decides again on what the store holds). Saves that time out
        on the lock call this; migrations (their DDL takes another mode) are left be."""
        with self.datastore.get_connection() as conn:
            rows = conn.execute(self.break_stuck_lock_statement, (STUCK_LOCK_SECONDS,)).fetchall()
        ended = [int(row["pid"]) for row in rows if row["ended"]]
        for row in rows:
            log.error(
                "recorder.stuck_lock_ended",
                pid=row["pid"],
                state=row["state"],
                held_seconds=round(float(row["held_seconds"]), 1),
                application=row["application_name"],
                client=str(row["client_addr"]) if row["client_addr"] else None,
                ended=row["ended"],
            )
        return ended

    @contextmanager
    def exclusively(self) -> Iterator[Exclusive | None]:
        """A transaction holding the event table's lock from the start: until it ends, no
        other save, in any process, can commit, so a save made in it (`insert_events`
        with `locked=` what this yields) cannot collide with another. For a writer that
        keeps losing the race for a stream to one that does not take turns. It ends with
        that save, or else (nothing saved) with the block. None when the lock was not
        had within the lock timeout: the block then saves as any other save does."""
        with self.datastore.get_connection() as conn:
            transaction = ExitStack()
            try:
                transaction.enter_context(conn.transaction())
                with conn.cursor() as curs:
                    self._lock_table(curs)
            except LockNotAvailable as error:
                # The failed LOCK aborted the transaction: it is rolled back.
                transaction.__exit__(type(error), error, error.__traceback__)
                yield None
                return
            with transaction:
                yield Exclusive(conn, transaction)

    def touch_levels(self, touches: Sequence[LevelTouch]) -> None:
        """Notes repeated reports when a save has no events to carry them."""
        with self.datastore.transaction(commit=True) as curs:
            self._touch(curs, touches)

    def _touch(self, curs: Cursor[DictRow], touches: Sequence[LevelTouch]) -> None:
        curs.execute(self.touch_levels_statement, _columns(touches))
        if len(curs.fetchall()) != len(touches):
            raise LevelMoved("a level changed since a report was found to repeat it")

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        """As the library's, built from `select_notification_rows`."""
        rows = self.select_notification_rows(
            start, limit, stop, topics, inclusive_of_start=inclusive_of_start
        )
        return [_notification(*row) for row in rows]

    def select_notification_rows(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
        share: tuple[int, int] | None = None,
    ) -> list[tuple[int, UUID, int, str, bytes]]:
        """The notifications `select_notifications` selects, as plain tuples of (id,
        originator id, originator version, topic, state), read in binary. Projections and
        audits read the whole log through here: the library's rows (dicts, then frozen
        dataclasses built field by field) cost twice the query itself. `share` (k, n)
        keeps the streams whose id's last byte is k modulo n: a rebuild in n processes
        gives each a share of the streams. A lost connection fails the read at once: its
        callers (the projections' runner, the readers) try again themselves."""
        conditions = []
        params: list[Any] = []
        if start is not None:
            conditions.append(
                "notification_id >= %s" if inclusive_of_start else "notification_id > %s"
            )
            params.append(start)
        if stop is not None:
            conditions.append("notification_id <= %s")
            params.append(stop)
        if topics:
            conditions.append("topic = ANY(%s)")
            params.append(list(topics))
        if share is not None:
            conditions.append("get_byte(uuid_send(originator_id), 15) %% %s = %s")
            params.extend([share[1], share[0]])
        params.append(limit)
        statement = self._select_notifications_statements.get(tuple(conditions))
        if statement is None:
            statement = SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state"
                " FROM {schema}.{table}{where} ORDER BY notification_id LIMIT %s"
            ).format(
                schema=Identifier(self.datastore.schema),
                table=Identifier(self.events_table_name),
                where=SQL(" WHERE " + " AND ".join(conditions) if conditions else ""),
            )
            self._select_notifications_statements[tuple(conditions)] = statement
        with (
            self.datastore.get_connection() as conn,
            conn.cursor(binary=True, row_factory=tuple_row) as curs,
        ):
            curs.execute(statement, params, prepare=True)
            return curs.fetchall()

    def select_seen(self, supplier_id: str, skus: Sequence[str]) -> dict[str, datetime]:
        """When each SKU's level was last reported by the supplier, recorded or not."""
        with (
            self.datastore.get_connection() as conn,
            conn.cursor(row_factory=tuple_row) as curs,
        ):
            curs.execute(self.select_seen_statement, (supplier_id, list(skus)))
            return {sku: seen_at for sku, seen_at in curs.fetchall() if seen_at}

    def numbers_follow_saves(self) -> bool:
        """Whether events are numbered one after another, save after save: the sequence
        behind `notification_id` caches no numbers (PostgreSQL's default). A writer may
        then tell from its saves' numbers that no other process saved between them (see
        `ledger.hot`); with a cache, each connection hands out numbers of its own block."""
        table = ".".join(filter(None, [self.datastore.schema, self.events_table_name]))
        with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                "SELECT s.seqcache FROM pg_sequence s"
                " WHERE s.seqrelid = pg_get_serial_sequence(%s, 'notification_id')::regclass",
                (table,),
            )
            row = curs.fetchone()
        return row is not None and row[0] == 1

    def select_versions(self, originator_ids: Sequence[UUID]) -> dict[UUID, int]:
        """The stored version of each stream that has events, by primary-key lookups."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self.select_versions_statement, (list(originator_ids),))
            return {row["id"]: row["version"] for row in curs.fetchall() if row["version"]}

    def select_streams(
        self, originator_ids: Sequence[UUID], after: Sequence[int] | None = None
    ) -> list[StoredEvent]:
        """Each stream's latest snapshot, then its later events, stream after stream; a
        stream with a version in `after` (one held in memory at that version) gets only
        its events beyond it."""
        if not originator_ids:
            return []
        versions = list(after) if after is not None else [0] * len(originator_ids)
        with (
            self.datastore.get_connection() as conn,
            conn.cursor(row_factory=tuple_row) as curs,
        ):
            curs.execute(self.select_streams_statement, (list(originator_ids), versions))
            return [
                StoredEvent(
                    originator_id=originator_id,
                    originator_version=version,
                    topic=topic,
                    state=bytes(state),
                )
                for originator_id, version, topic, state, _kind in curs.fetchall()
            ]


# How long a session may hold the event table's lock before a save that waited for it
# ends the session (`LedgerRecorder.break_stuck_lock`): far beyond any save's.
STUCK_LOCK_SECONDS = 30.0


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """An error and those it was raised from, five deep (the library wraps psycopg's
    errors, and the writer may wrap those again)."""
    for _ in range(5):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


def lock_timed_out(error: BaseException | None) -> bool:
    """Whether this error, or one it was raised from, is a wait for a lock that timed out."""
    return any(isinstance(cause, LockNotAvailable) for cause in _causes(error))


def connection_lost(error: BaseException | None) -> bool:
    """Whether a connection failed (not a wait for one, or for a lock, or a statement
    cancelled, which a busy database answers: renewing every connection then would only
    add to its load)."""
    lost = (psycopg.OperationalError, psycopg.InterfaceError, StoreOperational, StoreInterface)
    busy = (PoolTimeout, PoolClosed, QueryCanceled, LockNotAvailable)
    return isinstance(error, lost) and not any(isinstance(c, busy) for c in _causes(error))


@dataclass
class Exclusive:
    """A transaction holding the event table's lock (see `LedgerRecorder.exclusively`)."""

    conn: Connection[DictRow]
    transaction: ExitStack

    def commit(self) -> None:
        self.transaction.close()


def _notification(
    notification_id: int, originator_id: UUID, version: int, topic: str, state: bytes
) -> Notification:
    # The frozen dataclass's own __init__ sets each field through object.__setattr__; this
    # is the same object, built as the library's mapper builds domain events.
    notification = object.__new__(Notification)
    notification.__dict__.update(
        id=notification_id,
        originator_id=originator_id,
        originator_version=version,
        topic=topic,
        state=state,
    )
    return notification


def _roll_back(conn: Connection[DictRow]) -> None:
    """Ends a failed save's transaction (its pipeline ended) as psycopg's own would:
    ROLLBACK, and the prepared statements forgotten (one an aborted pipeline skipped
    would otherwise be taken as prepared). Where the connection broke, the pool
    discards it."""
    try:
        conn.rollback()
    except psycopg.Error as error:
        log.warning("recorder.rollback_failed", error=str(error).strip())


def _rendered(statement: Query) -> bytes:
    """A composed statement as the bytes psycopg would send (identifiers and literals
    quoted)."""
    assert isinstance(statement, Composable), statement
    return statement.as_bytes(None)


def _columns(rows: Sequence[LevelRow] | Sequence[LevelTouch]) -> tuple[list[Any], ...]:
    """Rows as one array per field, in field order (the order the statements unnest);
    incoming stock as JSON text."""
    return tuple(
        [incoming_json(row.incoming) for row in rows]
        if f.name == "incoming"
        else [getattr(row, f.name) for row in rows]
        for f in fields(rows[0])
    )
