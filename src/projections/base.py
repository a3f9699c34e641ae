"""What every projection shares: pages of notifications in, rows out, failures identified."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, NamedTuple
from uuid import UUID

import structlog
from eventsourcing.utils import get_topic
from psycopg import sql

from ledger.application import InventoryLedger
from ledger.base import LedgerAggregate, LedgerSnapshot
from projections.store import Connection, Generation, upgrade_generation

log = structlog.get_logger(__name__)


class Logged(NamedTuple):
    """A notification as the log holds it, not yet decoded: what the mapper reads."""

    id: int
    originator_id: UUID
    originator_version: int
    topic: str
    state: bytes


class Notified(NamedTuple):
    """An event as the log numbered it (a tuple: one is made for every event applied)."""

    position: int
    topic: str
    event: Any


class ProjectionFailed(Exception):
    """A projection could not apply an event; nothing of its page was written."""

    def __init__(self, name: str, position: int, topic: str, cause: BaseException) -> None:
        super().__init__(f"projection {name} failed at position {position} ({topic}): {cause!r}")
        self.name = name
        self.position = position
        self.topic = topic
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses process boundaries (a rebuild's shares) with its fields intact.
        return (type(self), (self.name, self.position, self.topic, self.cause))


class Projection(ABC):
    """A read model: its tables, the events it reads, and how a page of them changes its rows."""

    name: ClassVar[str]
    schema_version: ClassVar[int]
    # Each table is also published as the stable view `view_{table}`.
    tables: ClassVar[list[str]]
    # In-place upgrades, by schema version: the statements (with `{schema}` where the
    # schema goes) that bring a generation built at the version before to that one
    # without a rebuild. Only for a change that leaves every row as the events already
    # applied would have written it: a new column that no earlier event can fill, say.
    # A version without one is reached by a rebuild.
    upgrades: ClassVar[dict[int, list[str]]] = {}

    def __init__(self, app: InventoryLedger) -> None:
        self.app = app

    def upgrade_path(self, built: int) -> list[str] | None:
        """The statements that bring a generation built at schema version `built` to this
        one in place, in order; None where some version on the way needs a rebuild (or
        the generation is newer than this code)."""
        if built > self.schema_version:
            return None
        statements: list[str] = []
        for version in range(built + 1, self.schema_version + 1):
            if version not in self.upgrades:
                return None
            statements += self.upgrades[version]
        return statements

    def upgrade(self, conn: Connection, built: Generation) -> bool:
        """Brings a generation built at an older schema version to this one in place, where
        the upgrades on the way allow it; False where it takes a rebuild instead."""
        statements = self.upgrade_path(built.schema_version)
        if statements is None:
            return False
        if upgrade_generation(conn, built, self.schema_version, statements, self.tables):
            log.info(
                "projection.upgraded_in_place",
                projection=self.name,
                generation=built.generation,
                built=built.schema_version,
                now=self.schema_version,
            )
        return True

    @property
    @abstractmethod
    def topics(self) -> list[str]:
        """The event topics this projection reads; the others are skipped by the database."""

    @abstractmethod
    def ddl(self) -> list[str]:
        """CREATE statements for its tables, with `{schema}` where the schema goes."""

    @abstractmethod
    def begin(self, conn: Connection, schema: str, page: Sequence[Logged]) -> None:
        """Prepares for a page, e.g. loads the rows its events will change."""

    @abstractmethod
    def handle(self, notified: Notified) -> None:
        """Applies one event in memory."""

    @abstractmethod
    def flush(self, conn: Connection, schema: str) -> None:
        """Writes what the pages staged since the last flush, in the caller's transaction."""

    def reset(self) -> None:  # noqa: B027 - most projections keep nothing between pages
        """Forgets whatever it keeps between pages; called when a page did not commit."""

    def stage(self, conn: Connection, schema: str, page: Sequence[Logged]) -> None:
        """Applies a page in memory, naming the event that failed; `write` stores it.

        Each event is decoded just before it is applied and dropped after: a page of
        decoded events kept alive together would make the garbage collector walk them
        again and again (measured: a third of a rebuild's time).
        """
        self.begin(conn, schema, page)
        to_domain_event = self.app.mapper.to_domain_event
        for notification in page:
            try:
                event = to_domain_event(notification)  # type: ignore[arg-type]
                self.handle(Notified(notification.id, notification.topic, event))
            except Exception as error:
                raise ProjectionFailed(
                    self.name, notification.id, notification.topic, error
                ) from error

    def write(self, conn: Connection, schema: str, position: int) -> None:
        """Writes what was staged, inside the caller's transaction."""
        try:
            self.flush(conn, schema)
        except Exception as error:
            raise ProjectionFailed(self.name, position, "page write", error) from error


def table(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


@dataclass(frozen=True)
class ChildTable:
    """Rows of `parent` rows: `column` holds the parent's `parent_column`; `key` is the
    child table's primary key."""

    parent: str
    column: str
    parent_column: str
    key: tuple[str, ...]


# From this many rows a page's upsert goes through a temporary table (below). Measured
# per page, with a commit: 2 rows 0.9 against 2.1 ms, 50 rows 1.6 against 2.4 ms, 500
# rows 31 against 11 ms (one INSERT per row against COPY + one INSERT ... SELECT).
UPSERT_IN_BULK_FROM = 100


def _upsert(
    cursor: Any,
    schema: str,
    name: str,
    rows: list[dict[str, Any]],
    key: tuple[str, ...] = ("id",),
) -> None:
    """Upserts rows (distinct keys). A few go one INSERT each; many go in one statement:
    COPY into a temporary table shaped like theirs, then one INSERT ... SELECT. One INSERT
    per row cost the server a statement each: ~2/3 of the stock view's writes for a
    delivery of 50,000 changes."""
    columns = list(rows[0])
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    conflict = sql.SQL(", ").join(map(sql.Identifier, key))
    updates = sql.SQL(", ").join(
        sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in columns if c not in key
    )
    if len(rows) < UPSERT_IN_BULK_FROM:
        cursor.executemany(
            sql.SQL(
                "INSERT INTO {table} ({names}) VALUES ({values}) ON CONFLICT ({conflict})"
                " DO UPDATE SET {updates}"
            ).format(
                table=table(schema, name),
                names=names,
                values=sql.SQL(", ").join(sql.Placeholder(c) for c in columns),
                conflict=conflict,
                updates=updates,
            ),
            rows,
        )
        return
    staging = sql.Identifier(f"upsert_{schema}_{name}")
    cursor.execute(
        sql.SQL(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS"
            " AS SELECT {names} FROM {table} WITH NO DATA"
        ).format(staging=staging, names=names, table=table(schema, name))
    )
    _copy(cursor, staging, rows)
    cursor.execute(
        sql.SQL(
            "INSERT INTO {table} ({names}) SELECT {names} FROM {staging}"
            " ON CONFLICT ({conflict}) DO UPDATE SET {updates}"
        ).format(
            table=table(schema, name),
            names=names,
            staging=staging,
            conflict=conflict,
            updates=updates,
        )
    )
    # Emptied now, not only at commit: a transaction may write the same table again.
    cursor.execute(sql.SQL("DELETE FROM {}").format(staging))


def _copy(cursor: Any, target: sql.Composable, rows: list[dict[str, Any]]) -> None:
    """COPYs rows (dicts with the same keys, the columns) into the table `target`."""
    columns = list(rows[0])
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        target, sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    with cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])


@dataclass
class _ChildWrites:
    """What a page changes in one child table: the parents whose child rows are replaced
    whole (their last written rows are not known), the rows that went, and the rows that
    came or changed. A hold added to a SKU with a thousand writes one row, not a thousand."""

    replaced: list[Any] = field(default_factory=list)
    fresh: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    upserted: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        parent: Any,
        before: dict[tuple[Any, ...], dict[str, Any]] | None,
        after: dict[tuple[Any, ...], dict[str, Any]],
        *,
        new: bool,
    ) -> None:
        """A parent's child rows: `before` as last written (None: not known), `after` now;
        a `new` parent has none written yet."""
        if new or before is None:
            if not new:
                self.replaced.append(parent)
            self.fresh.extend(after.values())
            return
        self.removed.extend(row for key, row in before.items() if key not in after)
        self.upserted.extend(row for key, row in after.items() if before.get(key) != row)

    def write(self, cursor: Any, schema: str, name: str, spec: ChildTable) -> None:
        if self.replaced:
            cursor.execute(
                sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(
                    table(schema, name), sql.Identifier(spec.column)
                ),
                (self.replaced,),
            )
        if self.removed:
            cursor.executemany(
                sql.SQL("DELETE FROM {} WHERE {}").format(
                    table(schema, name),
                    sql.SQL(" AND ").join(
                        sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder(c))
                        for c in spec.key
                    ),
                ),
                self.removed,
            )
        if self.fresh:
            _copy(cursor, table(schema, name), self.fresh)
        if self.upserted:
            _upsert(cursor, schema, name, self.upserted, spec.key)


class StateProjection(Projection):
    """A projection whose rows are functions of aggregate states.

    Each aggregate type has a table holding its latest state (encoded as a snapshot) and
    columns derived from it; events are applied with the domain's own `mutate`, so the
    rows follow exactly the rules the aggregates follow, and a missing or repeated event
    shows up as a version error instead of a wrong number.
    """

    # aggregate class -> the table holding its states
    state_tables: ClassVar[dict[type[LedgerAggregate], str]]

    # child table -> how its rows hang off a state table; when a state changes, only the
    # child rows that differ from those last written are written (all, when not known)
    child_tables: ClassVar[dict[str, ChildTable]] = {}

    @abstractmethod
    def columns(self, aggregate: Any) -> dict[str, Any]:
        """The derived columns of an aggregate's row (besides id, version, position, state)."""

    def children(self, aggregate: Any) -> dict[str, list[dict[str, Any]]]:
        """Rows of the child tables of the aggregate's table, derived from the aggregate."""
        return {}

    @property
    def topics(self) -> list[str]:
        return [
            getattr(value, "TOPIC", "")
            for aggregate in self.state_tables
            for value in vars(aggregate).values()
            if isinstance(value, type)
            and getattr(value, "TOPIC", None)
            and value.__name__ != "Event"
        ]

    # States kept between pages, so that a busy stream is not decoded and encoded again
    # for every page; only the runner holding the lease writes these rows, and any page
    # that does not commit resets them.
    max_cached_states: ClassVar[int] = 20_000
    # And the child rows kept with them, at most (~400 bytes each, measured: a SKU with 900
    # hold buckets keeps ~330 kB), so that many busy SKUs cannot grow the worker unbounded.
    max_written_rows: ClassVar[int] = 250_000

    def __init__(self, app: InventoryLedger) -> None:
        super().__init__(app)
        # Keyed by the ids' integers: a UUID hashes and compares in Python, an int in C,
        # and these are looked up several times for every event applied.
        self._states: dict[int, Any] = {}
        self._changed: dict[int, tuple[str, int]] = {}
        # Changed states that have no row yet (`begin` looked for one): COPY inserts them.
        self._unstored: set[int] = set()
        # The child rows last written for a kept state, by child table and row key; a state
        # loaded from its row has none here, and its child rows are replaced whole.
        self._written: dict[int, dict[str, dict[tuple[Any, ...], dict[str, Any]]]] = {}
        self._written_rows = 0  # the rows in `_written`
        self._schema: str | None = None
        self._tables_by_topic: dict[str, str] = {}

    def reset(self) -> None:
        self._states, self._changed, self._unstored = {}, {}, set()
        self._written, self._written_rows = {}, 0
        self._schema = None

    def _table_of(self, topic: str) -> str:
        try:
            return self._tables_by_topic[topic]
        except KeyError:
            aggregate_topic = topic.rsplit(".", 1)[0]
            for aggregate, name in self.state_tables.items():
                if aggregate_topic == getattr(aggregate, "TOPIC", None):
                    self._tables_by_topic[topic] = name
                    return name
            raise LookupError(topic) from None

    def begin(self, conn: Connection, schema: str, page: Sequence[Logged]) -> None:
        if schema != self._schema:
            self.reset()
            self._schema = schema
        wanted: dict[str, set[UUID]] = defaultdict(set)
        for notification in page:
            originator_id = notification.originator_id
            assert isinstance(originator_id, UUID)
            if originator_id.int not in self._states:
                wanted[self._table_of(notification.topic)].add(originator_id)
        for name, ids in wanted.items():
            rows = conn.execute(
                sql.SQL("SELECT id, version, state FROM {} WHERE id = ANY(%b::uuid[])").format(
                    table(schema, name)
                ),
                (list(ids),),
            ).fetchall()
            aggregate_class = next(a for a, n in self.state_tables.items() if n == name)
            for row in rows:
                self._states[row["id"].int] = self._decode(aggregate_class, row)
            self._unstored.update(i.int for i in ids.difference(row["id"] for row in rows))

    def handle(self, notified: Notified) -> None:
        event = notified.event
        key = event.originator_id.int
        self._states[key] = event.mutate(self._states.get(key))
        self._changed[key] = (self._table_of(notified.topic), notified.position)

    def flush(self, conn: Connection, schema: str) -> None:
        by_table: dict[str, list[Any]] = defaultdict(list)
        for key, (name, position) in self._changed.items():
            by_table[name].append((self._states[key], position))
        self._changed = {}
        for name, changed in by_table.items():
            self._write(conn, schema, name, changed)
        self._unstored = set()
        if len(self._states) > self.max_cached_states or self._written_rows > self.max_written_rows:
            # Only now, with nothing left unwritten, may states be forgotten.
            self._states, self._written, self._written_rows = {}, {}, 0

    def _write(self, conn: Connection, schema: str, name: str, changed: list[Any]) -> None:
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        children = {c: t for c, t in self.child_tables.items() if t.parent == name}
        child_writes = {child: _ChildWrites() for child in children}
        for aggregate, position in changed:
            derived = self.columns(aggregate)
            rows.append(
                {
                    "id": aggregate.id,
                    "version": aggregate.version,
                    "position": position,
                    "updated_at": now,
                    "state": self._encode(aggregate),
                    **derived,
                }
            )
            if children:
                derived_children = self.children(aggregate)
                key = aggregate.id.int
                written = self._written.setdefault(key, {})
                for child, spec in children.items():
                    current = {
                        tuple(r[c] for c in spec.key): r for r in derived_children.get(child, [])
                    }
                    child_writes[child].add(
                        rows[-1][spec.parent_column],
                        written.get(child),
                        current,
                        new=key in self._unstored,
                    )
                    self._written_rows += len(current) - len(written.get(child) or ())
                    written[child] = current
        # A rebuild's rows are nearly all new: COPY them in; upsert those that exist.
        new = [row for row in rows if row["id"].int in self._unstored]
        known = [row for row in rows if row["id"].int not in self._unstored]
        with conn.cursor() as cursor:
            if new:
                _copy(cursor, table(schema, name), new)
            if known:
                _upsert(cursor, schema, name, known)
            for child, spec in children.items():
                child_writes[child].write(cursor, schema, child, spec)

    def _encode(self, aggregate: Any) -> bytes:
        return self.app.mapper.transcoder.encode(LedgerSnapshot.state_of(aggregate))

    def _decode(self, aggregate_class: type[Any], row: dict[str, Any]) -> Any:
        state = self.app.mapper.transcoder.decode(bytes(row["state"]))
        snapshot = LedgerSnapshot(
            originator_id=row["id"],
            originator_version=row["version"],
            timestamp=datetime.now(UTC),
            topic=get_topic(aggregate_class),
            state=state,
        )
        return snapshot.mutate(None)
