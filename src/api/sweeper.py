"""The expiry sweeper: appends `Expired` for holds past their time, in one process at a time."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import structlog

from api.leases import AdvisoryLease
from ledger.base import Cause
from ledger.commands import ExpireHolds
from ledger.expiry import OpenHolds
from ledger.writer import LedgerWriter

log = structlog.get_logger(__name__)

BATCH = 500


class ExpirySweeper:
    def __init__(self, writer: LedgerWriter, database_url: str, interval_seconds: float) -> None:
        self.writer = writer
        self.interval_seconds = interval_seconds
        self.holds = OpenHolds(writer.app)
        self.lease = AdvisoryLease(database_url, "expiry-sweeper")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ExpirySweeper:
        self._thread = threading.Thread(target=self._run, name="expiry-sweeper", daemon=True)
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
            except Exception:
                log.exception("sweeper.failed")

    def sweep(self, at: datetime) -> int:
        """Expires every hold due at `at`, if this process holds the sweeper's lease."""
        if not self.lease.held():
            return 0
        self.holds.catch_up()
        due = self.holds.due(at)
        expired = 0
        for start in range(0, len(due), BATCH):
            batch = due[start : start + BATCH]
            cause = Cause("expiry-sweeper", "hold.expired", uuid.uuid4().hex)
            outcome = self.writer.execute(ExpireHolds(at=at, cause=cause, reservation_ids=batch))
            expired += len(outcome.value)
            self.holds.forget(batch)
        if expired:
            log.info("sweeper.expired", holds=expired)
        return expired
