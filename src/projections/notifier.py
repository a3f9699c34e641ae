"""Wakes projection runners when the event log grows: LISTEN on the channel the store NOTIFYs."""

from __future__ import annotations

import selectors
import socket
import threading
from contextlib import suppress

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
        # Written to by `stop`: the listener waits on it beside its connection, so that it
        # stops at once rather than at the end of its wait (half a second at every close
        # of a runtime: two and a half minutes of the test suite). Sockets, not a pipe's
        # numbers: once closed (by the listener, as it ends), a late use fails cleanly
        # instead of reaching whatever file took the number since (a review).
        self._wake: tuple[socket.socket, socket.socket] | None = None

    def start(self) -> LogNotifier:
        self._wake = socket.socketpair()
        self._thread = threading.Thread(
            target=self._listen, args=self._wake, name="log-notifier", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.bump()
        if self._wake is not None:
            with suppress(OSError):  # the listener has ended, and closed it
                self._wake[1].send(b"x")
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

    def _listen(self, woken: socket.socket, waker: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._listen_once(woken)
                except psycopg.Error as error:
                    log.warning("notifier.disconnected", error=str(error))
                    self._stop.wait(1.0)
        finally:
            woken.close()
            waker.close()

    def _listen_once(self, woken: socket.socket) -> None:
        with (
            psycopg.connect(self.database_url, autocommit=True) as conn,
            selectors.DefaultSelector() as selector,
        ):
            conn.execute(f"LISTEN {CHANNEL}")
            selector.register(conn.fileno(), selectors.EVENT_READ)
            selector.register(woken, selectors.EVENT_READ)
            while not self._stop.is_set():
                # What has arrived, read without waiting (some may have come with the
                # LISTEN's answer); then a wait for more, or for `stop`.
                if any(True for _ in conn.notifies(timeout=0)):
                    self.bump()
                selector.select(timeout=5.0)
