"""Leases on PostgreSQL advisory locks: one holder across processes and hosts at a time."""

from __future__ import annotations

import psycopg
import structlog

from api.database import lock_key

log = structlog.get_logger(__name__)


class AdvisoryLease:
    """Held while its own connection lives; a holder that dies frees it for a standby."""

    def __init__(self, database_url: str, name: str) -> None:
        self.database_url = database_url
        self.name = name
        self._key = lock_key(name)
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._reachable = True

    def held(self) -> bool:
        """True when this process holds the lease, taking it if it is free."""
        if self._conn is not None:
            try:
                self._conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                log.warning("lease.lost", lease=self.name)
                self.release()
        try:
            conn = psycopg.connect(self.database_url, autocommit=True)
        except psycopg.Error as error:
            if self._reachable:  # once per outage, not once per attempt
                log.warning("lease.unreachable", lease=self.name, error=str(error))
            self._reachable = False
            return False
        self._reachable = True
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
        if row is not None and row[0]:
            self._conn = conn
            log.info("lease.acquired", lease=self.name)
            return True
        conn.close()
        return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
