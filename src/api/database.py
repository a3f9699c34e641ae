"""Finding the database (or starting the embedded one) and preparing its schema."""

from __future__ import annotations

import atexit
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg.rows import dict_row

from api.settings import Settings
from connectors.inbox import create_tables as create_connector_tables
from ledger.application import InventoryLedger
from projections.base import Projection
from projections.data_version import DATA_VERSION, newer_data_version
from projections.leases import lock_key, lock_session
from projections.registry import all_projections, ensure_live_generations
from projections.store import live

log = structlog.get_logger(__name__)

EVENTS_TABLE = "inventoryledger_events"
# The aggregates' snapshots: loads and audits start from them, so they are kept as the
# events are (one changed in place was read by the audit and the writer alike as the
# SKU's state: an auditor's walkthrough).
SNAPSHOTS_TABLE = "inventoryledger_snapshots"
# How long a command on the embedded default waits for client backends to go before it
# takes them for another process's and leaves the server running (`stop_unless_used`).
CLIENTS_SETTLE_SECONDS = 1.0

# Events and snapshots are never updated or deleted through the ledger's role:
# corrections are new events. (The tables' owner or a superuser can still turn the
# triggers off; the database's privileges are the last word.)
IMMUTABLE_EVENTS_SQL = """
CREATE OR REPLACE FUNCTION stockledger_refuse_history_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;
""" + "".join(
    f"""
CREATE OR REPLACE TRIGGER {table}_append_only
    BEFORE UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION stockledger_refuse_history_change();
CREATE OR REPLACE TRIGGER {table}_no_truncate
    BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION stockledger_refuse_history_change();
"""
    for table in (EVENTS_TABLE, SNAPSHOTS_TABLE)
)

# The ledger's queries are short lookups whose cost the planner overestimates (arrays
# of ids, temporary tables): with JIT on, PostgreSQL compiled a loader's 5,000-stream
# read for 137 ms of its 247 ms, and a delivery's batches paid that each (measured). Set
# for the database, so every session of every process has it.
NO_JIT_SQL = """
DO $$ BEGIN
    EXECUTE format('ALTER DATABASE %I SET jit = off', current_database());
END $$
"""


@dataclass
class EmbeddedPostgres:
    """The embedded PostgreSQL under the data directory; stop() stops it if it started here."""

    url: str
    pgdata: Path
    started_here: bool
    system_user: str | None
    # The `application_name` this process's connections give (PGAPPNAME, set here), told
    # from others' at exit; None where the environment named them already.
    own_application: str | None = None

    def stop(self, *, said: bool = True) -> None:
        if self.started_here:
            from pgserver import pg_ctl  # type: ignore[attr-defined]

            pg_ctl(["-w", "stop"], pgdata=self.pgdata, user=self.system_user)
            if said:
                log.info("database.embedded.stopped", pgdata=str(self.pgdata))

    def stop_unless_used(self) -> None:
        """Stops the server if it started here and no other process is connected to it:
        a command run on the embedded default (`ledger audit stock …` with no `make run`)
        leaves none behind (an operator's walkthrough found one left running), and one run
        beside a server that another process joined meanwhile leaves it to that one."""
        if not self.started_here:
            return
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                clients = self._other_clients(conn, self.own_application)
        except psycopg.Error as error:  # too busy to say (out of connections): left running
            log.info("database.embedded.left_running", pgdata=str(self.pgdata), error=str(error))
            return
        if clients:
            log.info("database.embedded.left_running", pgdata=str(self.pgdata), clients=clients)
            return
        try:
            # Unsaid: a command's last line on stderr is its own (its error, if any).
            self.stop(said=False)
        except Exception as error:  # at exit: said in a line, not a traceback
            log.warning("database.embedded.not_stopped", pgdata=str(self.pgdata), error=str(error))

    @staticmethod
    def _other_clients(conn: psycopg.Connection[Any], own: str | None) -> int:
        """Client backends of other processes, once the command's own have had a moment to
        go: a backend outlives its client's hang-up briefly, longer on a busy machine,
        where one left the server running (a test run beside fuzzers). Those still open
        in this process (a command stopped as it started: Ctrl-C before its runtime could
        close) name it, and do not count: they left the server running (a newcomer's
        walkthrough)."""
        deadline = time.monotonic() + CLIENTS_SETTLE_SECONDS
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                "  AND application_name IS DISTINCT FROM %s",
                (own,),
            ).fetchone()
            clients = 0 if row is None else int(row[0])
            if not clients or time.monotonic() >= deadline:
                return clients
            time.sleep(0.1)


def start_embedded(data_dir: Path) -> EmbeddedPostgres:
    """Starts the embedded PostgreSQL under `data_dir`, or joins the one already running."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset, as on servers and in CI.
        warnings.simplefilter("ignore")
        import pgserver  # imported here: only the embedded default needs it
        from pgserver.utils import PostmasterInfo

        data_dir.mkdir(parents=True, exist_ok=True)
        pgdata = data_dir.resolve() / "pgdata"
        running = pgdata.exists() and PostmasterInfo.read_from_pgdata(pgdata) is not None
        already = running and PostmasterInfo.read_from_pgdata(pgdata).is_running()  # type: ignore[union-attr]
        # The library's own stop-at-exit is skipped when a process dies by a signal, and
        # a stale handle then keeps the server up for good; stop() is explicit instead.
        server = pgserver.get_server(pgdata, cleanup_mode=None)  # type: ignore[attr-defined]
    log.info("database.embedded.started", pgdata=str(pgdata), already_running=already)
    return EmbeddedPostgres(server.get_uri(), pgdata, not already, server.system_user)


def resolve_database_url(settings: Settings) -> str:
    """The configured URL, else the embedded server's, which is started on first use."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    embedded = start_embedded(settings.data_dir)
    if "PGAPPNAME" not in os.environ:
        # Every connection this process (and its children) makes names it (libpq reads
        # PGAPPNAME), so that at exit `stop_unless_used` tells them from others'.
        os.environ["PGAPPNAME"] = embedded.own_application = f"stockledger:{os.getpid()}"
    atexit.register(embedded.stop_unless_used)
    return embedded.url


@contextmanager
def advisory_lock(database_url: str, name: str) -> Iterator[None]:
    with lock_session(database_url) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (lock_key(name),))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(name),))


def migrate(settings: Settings, database_url: str) -> None:
    """Creates the event store's tables once and makes the event log append-only.

    Safe to run from several processes at once: they take turns on an advisory lock.
    """
    with advisory_lock(database_url, "migrate"):
        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
            check_data_version(conn)  # before anything of it is touched
        app = InventoryLedger(settings.event_store_env(database_url, create_tables=True))
        try:
            with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
                conn.execute(IMMUTABLE_EVENTS_SQL)
                _without_jit(conn)
                ensure_live_generations(conn, all_projections(app))
                create_connector_tables(conn)
                conn.execute(DATA_VERSION_SQL)
                conn.execute(RECORD_DATA_VERSION_SQL, (DATA_VERSION,))
        finally:
            app.close()
    log.info("database.migrated", pid=os.getpid())


DATA_VERSION_SQL = """
CREATE TABLE IF NOT EXISTS ledger_data_version (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    version integer NOT NULL
)
"""
RECORD_DATA_VERSION_SQL = """
INSERT INTO ledger_data_version (version) VALUES (%s)
ON CONFLICT (one) DO UPDATE SET version = greatest(ledger_data_version.version, excluded.version)
"""


class NotMigrated(RuntimeError):
    """The database lacks what this code needs, and this process was told not to migrate."""


class NewerData(NotMigrated):
    """The database holds what newer code wrote, which this code cannot read (a rollback)."""


def check_data_version(conn: psycopg.Connection[dict[str, Any]]) -> None:
    """Raises NewerData where newer code migrated the database: this code would start,
    and then fail on what it cannot read (an upgrade walkthrough rolled back: ready, then
    500 on every SKU a new kind of event named)."""
    newer = newer_data_version(conn)
    if newer is not None:
        raise NewerData(
            f"the database holds data of a newer version of the ledger (data version"
            f" {newer}; this one reads up to {DATA_VERSION}): run that version, or"
            " restore a backup taken before it ran"
        )


def check_migrated(database_url: str, projections: list[Projection]) -> None:
    """Raises NotMigrated, saying what is missing, where the database is not ready for
    this code: no event store, or a projection with no live generation, or one whose live
    generation waits for an in-place upgrade (`ledger migrate` makes it). A generation
    that needs a rebuild instead is rebuilt by its runner while it keeps serving."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        check_data_version(conn)
        found = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL AS events,"
            " to_regclass('ledger_projection_generations') IS NOT NULL AS control",
            (EVENTS_TABLE,),
        ).fetchone()
        assert found is not None
        missing = [] if found["events"] else ["the event store"]
        if found["control"]:
            for projection in projections:
                current = live(conn, projection.name)
                if current is None:
                    missing.append(f"the {projection.name} view")
                elif current.schema_version < projection.schema_version and (
                    projection.upgrade_path(current.schema_version) is not None
                ):
                    missing.append(
                        f"the {projection.name} view's upgrade to schema version"
                        f" {projection.schema_version} (it is at {current.schema_version})"
                    )
        else:
            missing.append("the views")
    if missing:
        raise NotMigrated(
            f"the database is not migrated for this version of the ledger: it lacks"
            f" {', '.join(missing)}. Run `ledger migrate`, or start with"
            " LEDGER_MIGRATE_ON_START=true"
        )


def require_migrated(settings: Settings, database_url: str) -> None:
    """`check_migrated` for a process that opens no ledger of its own (`ledger serve`,
    whose workers do)."""
    app = InventoryLedger(settings.event_store_env(database_url))
    try:
        check_migrated(database_url, all_projections(app))
    finally:
        app.close()


def _without_jit(conn: psycopg.Connection[dict[str, Any]]) -> None:
    """Turns JIT off for the ledger's database where the role may (it owns the database)."""
    setting = conn.execute("SELECT setting FROM pg_settings WHERE name = 'jit'").fetchone()
    if setting is not None and setting["setting"] == "off":
        return
    try:
        conn.execute(NO_JIT_SQL)
    except psycopg.errors.InsufficientPrivilege as refused:
        log.warning("database.jit_left_on", reason=str(refused).strip())
