"""Leases on PostgreSQL advisory locks: one holder across processes and hosts at a time.

A lease is held by a database session; when the holder dies its session ends and a
standby's next attempt takes the lease over.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import tuple_row

log = structlog.get_logger(__name__)

# PostgreSQL learns that a client's host has vanished (power lost, cut off, its connection
# never closed) only from TCP keepalives, which by default begin after two hours of
# silence: until then the session stays, and every advisory lock it holds (a lease, an
# inbox claim, a writer's turn) with it. So every session that may hold one asks the
# server to probe after 10 s of silence, every 5 s, and to end the session once 3 probes
# go unanswered, or once data it sent goes unacknowledged for 30 s. On Linux that 30 s
# user timeout, where set, also decides when unanswered probes end a connection: a
# session is ended ~30 s after its host went silent (30.4 s measured, not 25 s); and
# its client does likewise, to learn that it has lost the server (and its locks). A
# holder that is merely idle answers the probes from its kernel and keeps its locks.
# Over a Unix socket (one host) there is nothing to lose: the server ignores these.
KEEPALIVE_IDLE_SECONDS = 10
KEEPALIVE_INTERVAL_SECONDS = 5
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 30_000
_CLIENT_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": KEEPALIVE_IDLE_SECONDS,
    "keepalives_interval": KEEPALIVE_INTERVAL_SECONDS,
    "keepalives_count": KEEPALIVE_COUNT,
    "tcp_user_timeout": USER_TIMEOUT_MS,
}
_SERVER_KEEPALIVES = (
    "SELECT set_config('tcp_keepalives_idle', %s, false),"
    " set_config('tcp_keepalives_interval', %s, false),"
    " set_config('tcp_keepalives_count', %s, false),"
    " set_config('tcp_user_timeout', %s, false)"
)


def with_keepalives(params: Mapping[str, Any]) -> dict[str, Any]:
    """Connection parameters with the client's keepalives (see above) where they set none."""
    return {**_CLIENT_KEEPALIVES, **params}


def lock_holding(database_url: str) -> str:
    """The database URL as a connection string whose client sends keepalives (see above),
    where the URL does not say otherwise."""
    return make_conninfo("", **with_keepalives(conninfo_to_dict(database_url)))


def lock_session(database_url: str) -> psycopg.Connection[tuple[object, ...]]:
    """A connection in autocommit for a session that holds locks: keepalives both ways."""
    conn = psycopg.connect(lock_holding(database_url), autocommit=True)
    keep_alive(conn)
    return conn


def keep_alive(conn: psycopg.Connection[Any]) -> None:
    """Asks the server to end this session soon after its client's host stops answering
    (see above); on a connection in autocommit, for the session."""
    conn.execute(
        _SERVER_KEEPALIVES,
        (
            str(KEEPALIVE_IDLE_SECONDS),
            str(KEEPALIVE_INTERVAL_SECONDS),
            str(KEEPALIVE_COUNT),
            str(USER_TIMEOUT_MS),
        ),
    )


def generation_lease(projection: str, generation: int) -> str:
    """The lease of a projection's generation: its live runner's, or its rebuild's."""
    return f"projection:{projection}:{generation}"


def lock_key(name: str) -> int:
    """A stable 64-bit advisory lock key for a name."""
    digest = hashlib.sha256(f"stockledger:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# The parts a process may run, each said by a shared lock of its sessions (`present`).
ROLES = ("api", "projections", "connectors")


def role_key(role: str) -> int:
    return lock_key(f"running:{role}")


# How many sessions hold each of the given advisory locks (64-bit keys: pg_locks splits
# one in halves, `classid` the high and `objid` the low, `objsubid` 1 saying so), but
# those silent for SILENT_SECONDS: a holder says it is alive every HEARTBEAT_SECONDS, so
# one silent that long is frozen (stopped, its VM paused), its kernel still answering
# keepalives (a walkthrough: a stopped worker was counted for good).
_HOLDERS = """
SELECT k.name, count(a.pid) AS holders
FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS k(name, high, low)
LEFT JOIN pg_locks l
  ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
 AND l.classid = k.high::oid AND l.objid = k.low::oid
LEFT JOIN pg_stat_activity a
  ON a.pid = l.pid
 AND NOT (a.state = 'idle' AND a.state_change < now() - make_interval(secs => %s))
GROUP BY k.name
"""


def running(conn: psycopg.Connection[Any], leases: tuple[str, ...] = ()) -> dict[str, int]:
    """How many live sessions say each role runs (`LeaseSession.present`: one a process),
    and hold each of `leases` (0 or 1)."""
    keys = {role: role_key(role) for role in ROLES} | {name: lock_key(name) for name in leases}
    unsigned = {name: key & 0xFFFF_FFFF_FFFF_FFFF for name, key in keys.items()}
    cursor = conn.cursor(row_factory=tuple_row)
    rows = cursor.execute(
        _HOLDERS,
        (
            list(unsigned),
            [key >> 32 for key in unsigned.values()],
            [key & 0xFFFF_FFFF for key in unsigned.values()],
            SILENT_SECONDS,
        ),
    ).fetchall()
    return {str(name): int(cast(int, holders)) for name, holders in rows}


# A session holding leases says so at least this often (`LeaseSession`'s heartbeat), and
# one silent for SILENT_SECONDS is taken for a holder that stopped: a standby ends it.
HEARTBEAT_SECONDS = 5.0
SILENT_SECONDS = 30.0
# How often a standby looks at the holder of a lease it could not take.
LOOK_EVERY_SECONDS = 5.0

_SILENT_HOLDER = (
    "SELECT a.pid, extract(epoch FROM now() - a.state_change) AS silent_seconds,"
    " a.application_name, a.client_addr"
    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.database ="
    " (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid = %s::oid AND l.objid = %s::oid AND l.objsubid = 1"
    " AND a.state = 'idle' AND a.state_change < now() - make_interval(secs => %s)"
)


class LeaseSession:
    """Named leases held on one database session; they are all lost together if it dies.

    Advisory locks are re-entrant within a session, so the session itself remembers which
    holder (a runner, a rebuild) has each lease: within a process, too, one holder each.

    A holder that dies ends its session, and a standby's next try takes the lease; one
    whose host vanishes, once keepalives end the session (see above). One that stops
    without dying (frozen: stopped, swapped out, its VM paused) keeps its session, and its
    leases, for as long as it stays so: so while it holds any lease, a session says it is
    alive every HEARTBEAT_SECONDS (a thread of its own, whatever its holders are busy
    with), and a standby that cannot take a lease ends the session holding it once that
    session has been silent for SILENT_SECONDS; its next try takes the lease.
    """

    def __init__(self, database_url: str, check_every: float = 1.0) -> None:
        self.database_url = database_url
        self.check_every = check_every
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._held: dict[str, object] = {}
        self._checked = 0.0
        self._reachable = True
        self._lock = threading.Lock()
        self._looked: dict[str, float] = {}  # when this standby last looked at a holder
        self._heartbeat: threading.Event | None = None  # set to stop the heartbeat
        self._roles: set[str] = set()  # what this process says it runs (`present`)

    def hold(self, name: str, holder: object) -> bool:
        """True when `holder` holds the lease, taking it if it is free."""
        with self._lock:
            if not self._alive():
                return False
            assert self._conn is not None
            if name in self._held:
                return self._held[name] is holder
            row = self._conn.execute(
                "SELECT pg_try_advisory_lock(%s)", (lock_key(name),)
            ).fetchone()
            if row is not None and row[0]:
                self._held[name] = holder
                log.info("lease.acquired", lease=name)
                self._beat()
                return True
            self._end_silent_holder(name)
            return False

    def present(self, role: str) -> None:
        """Says, for as long as this session lives, that this process runs `role` (the
        projections, the connectors, the API): a shared advisory lock that any number of
        sessions hold at once, so that `GET /metrics` counts the processes running each
        (`running`). Taken again when the session is lost and comes back."""
        with self._lock:
            self._roles.add(role)
            if self._alive():  # a session made now said it with the rest; a re-entrant lock
                assert self._conn is not None
                try:
                    self._conn.execute("SELECT pg_advisory_lock_shared(%s)", (role_key(role),))
                except psycopg.Error:
                    self._drop()
            self._beat()  # which says so again if the session is lost, or not yet made

    def _say_present(self) -> None:
        """Takes this session's shared locks of `present` (under `_lock`, once connected)."""
        assert self._conn is not None
        for role in sorted(self._roles):
            self._conn.execute("SELECT pg_advisory_lock_shared(%s)", (role_key(role),))

    def _end_silent_holder(self, name: str) -> None:
        """Ends the session that holds this lease if it has been silent too long (see
        the class's docstring); at most once every LOOK_EVERY_SECONDS a lease."""
        now = time.monotonic()
        if now - self._looked.get(name, -LOOK_EVERY_SECONDS) < LOOK_EVERY_SECONDS:
            return
        self._looked[name] = now
        assert self._conn is not None
        key = lock_key(name) & 0xFFFF_FFFF_FFFF_FFFF
        rows = self._conn.execute(
            _SILENT_HOLDER, (key >> 32, key & 0xFFFF_FFFF, SILENT_SECONDS)
        ).fetchall()
        for pid, silent, application, client in rows:
            self._conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            log.error(
                "lease.silent_holder_ended",
                lease=name,
                pid=pid,
                silent_seconds=round(float(cast(Any, silent)), 1),
                application=application,
                client=str(client) if client else None,
            )

    def _beat(self) -> None:
        """Starts the heartbeat, once a lease is held (under `_lock`)."""
        if self._heartbeat is None:
            self._heartbeat = threading.Event()
            threading.Thread(
                target=self._beating, args=(self._heartbeat,), name="lease-heartbeat", daemon=True
            ).start()

    def _beating(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                if self._conn is None:
                    if self._roles:  # back, to say so again
                        self._alive()
                    continue
                if not self._held and not self._roles:
                    continue
                try:
                    self._conn.execute("SELECT 1")
                except psycopg.Error:
                    log.warning("lease.session_lost", leases=sorted(self._held))
                    self._drop()

    def holds(self, name: str, holder: object) -> bool:
        """True when `holder` holds the lease as far as this session knows (no round trip)."""
        with self._lock:
            return self._held.get(name) is holder

    def release(self, name: str, holder: object) -> None:
        with self._lock:
            if self._held.get(name) is holder and self._conn is not None:
                del self._held[name]
                try:
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(name),))
                except psycopg.Error:
                    self._drop()

    def close(self) -> None:
        with self._lock:
            if self._heartbeat is not None:
                self._heartbeat.set()
                self._heartbeat = None
            self._drop()

    def _alive(self) -> bool:
        if self._conn is not None:
            if time.monotonic() - self._checked < self.check_every:
                return True
            try:
                self._conn.execute("SELECT 1")
                self._checked = time.monotonic()
                return True
            except psycopg.Error:
                log.warning("lease.session_lost", leases=sorted(self._held))
                self._drop()
        try:
            self._conn = lock_session(self.database_url)
            self._say_present()
        except psycopg.Error as error:
            if self._reachable:  # once per outage, not once per attempt
                log.warning("lease.unreachable", error=str(error))
            self._reachable = False
            self._drop()
            return False
        self._reachable = True
        self._checked = time.monotonic()
        return True

    def _drop(self) -> None:
        self._held.clear()
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


class AdvisoryLease:
    """One named lease on a session of its own."""

    def __init__(self, database_url: str, name: str) -> None:
        self.name = name
        self.session = LeaseSession(database_url)

    def held(self) -> bool:
        return self.session.hold(self.name, self)

    def release(self) -> None:
        self.session.close()
