"""Wakes projection runners when the event log grows: LISTEN on the channel the store NOTIFYs."""

from __future__ import annotations

import threading

import psycopg
import structlog

log = structlog.get_logger(__name__)

CHANNEL = "inventoryledger_events"


class LogNotifier:
    """Counts notifications; runners wait for the count to move, or for their poll interval."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._count = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LogNotifier:
        self._thread = threading.Thread(target=self._listen, name="log-notifier", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.bump()
        if self._thread is not None:
            self._thread.join(5)

    def bump(self) -> None:
        with self._changed:
            self._count += 1
            self._changed.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Blocks until a notification newer than `seen`, or `timeout`; returns the new count."""
        with self._changed:
            self._changed.wait_for(lambda: self._count != seen, timeout)
            return self._count

    @property
    def count(self) -> int:
        return self._count

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.database_url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self.bump()
            except psycopg.Error as error:
                log.warning("notifier.disconnected", error=str(error))
                self._stop.wait(1.0)
