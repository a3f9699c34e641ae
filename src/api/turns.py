"""Writers that keep colliding on the same streams take turns, on PostgreSQL advisory locks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

import psycopg

from projections.leases import lock_key, lock_session


class StreamTurns:
    """Session-level advisory locks on stream ids, always taken in the same order."""

    def __init__(self, database_url: str, timeout_seconds: float = 10.0) -> None:
        self.database_url = database_url
        self.timeout_ms = int(timeout_seconds * 1000)
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stream_ids: list[UUID]) -> Iterator[None]:
        keys = sorted({lock_key(f"stream:{stream_id}") for stream_id in stream_ids})
        with self._lock:
            conn = self._connection()
            try:
                # One round trip; unnest yields the sorted keys in order, so every writer
                # takes them in the same order and none can deadlock another.
                conn.execute("SELECT pg_advisory_lock(k) FROM unnest(%s::bigint[]) AS k", (keys,))
                yield
            finally:
                try:
                    conn.execute("SELECT pg_advisory_unlock_all()")
                except psycopg.Error:
                    self.close()

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = lock_session(self.database_url)
            self._conn.execute(f"SET lock_timeout = {self.timeout_ms}")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
