"""The sweeper: expires holds past their time and records suppliers gone stale.

One process at a time runs it, holding an advisory-lock lease. It reads the views and
writes through the ledger's writer; correctness never waits for it (holds stop counting
at their expiry anyway), it makes the history say what happened.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import structlog
from eventsourcing.persistence import OperationalError as StoreUnavailable
from psycopg import OperationalError as DatabaseUnavailable

from connectors.inbox import forget_bodies, forget_signatures
from connectors.webhooks import SIGNATURES_KEPT_SECONDS
from ledger.base import Cause
from ledger.commands import ExpireHolds, NoteLastReports
from ledger.writer import LedgerWriter
from projections.data_version import NewerData, newer_data_version
from projections.leases import AdvisoryLease
from projections.queries import Views

log = structlog.get_logger(__name__)

BATCH = 1000
LEASE = "sweeper"


class Sweeper:
    def __init__(
        self,
        writer: LedgerWriter,
        views: Views,
        database_url: str,
        interval_seconds: float,
        inbox_keep_days: float = 7.0,
    ) -> None:
        self.writer = writer
        self.views = views
        self.interval_seconds = interval_seconds
        self.inbox_keep_days = inbox_keep_days
        self.lease = AdvisoryLease(database_url, LEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Sweeper:
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.lease.release()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                self.sweep(datetime.now(UTC))
            except NewerData as newer:
                # Newer code migrated the database while this process ran: its events are
                # not this code's to read, nor its holds to expire (an upgrade walkthrough:
                # an old sweeper failed every second on a hold a new one had changed, and
                # recorded no expiry at all meanwhile). The lease goes to a newer process.
                log.error("sweeper.newer_data", error=str(newer))
                self.lease.release()
                return
            except TimeoutError as error:
                # The writer was busy or stuck past the command's deadline (a lock, a slow
                # database): the next sweep tries again, as every other one would. Not an
                # error with a traceback (a walkthrough).
                log.warning("sweeper.timed_out", outcome=type(error).__name__)
            except (DatabaseUnavailable, StoreUnavailable) as error:
                # A connection lost (the database restarted, a session ended): the next
                # sweep reconnects. Logged with a traceback at error level each time, it
                # read as a failure of the sweeper's own (an OMS walkthrough).
                log.warning("sweeper.database_unavailable", error=str(error).strip())
            except Exception:
                log.exception("sweeper.failed")

    def sweep(self, at: datetime) -> int:
        """Expires the holds due at `at` (one batch) and notes stale suppliers; returns expired."""
        if not self.lease.held():
            return 0
        with self.views.store.connection() as conn:
            newer = newer_data_version(conn)
        if newer is not None:
            raise NewerData(newer)
        cause = Cause("sweeper", "hold.expired", uuid.uuid4().hex)
        due = self.views.due_holds(at, BATCH)
        expired = []
        if due:
            expired = self.writer.execute(
                ExpireHolds(at=at, cause=cause, reservation_ids=due)
            ).value
            log.info("sweeper.expired", holds=len(expired))
        with self.views.store.connection() as conn:
            forget_signatures(conn, SIGNATURES_KEPT_SECONDS)
            forget_bodies(conn, self.inbox_keep_days)
        last_reports = self.views.last_reports()
        if last_reports:
            stale_cause = Cause("sweeper", "supplier.staleness", cause.correlation_id)
            changed = self.writer.execute(
                NoteLastReports(at=at, cause=stale_cause, last_reports=last_reports)
            ).value
            if changed:
                log.info("sweeper.staleness_changed", suppliers=changed)
        return len(expired)
