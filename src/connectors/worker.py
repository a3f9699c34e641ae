"""The inbox worker: applies queued deliveries, one at a time per worker, any number of workers."""

from __future__ import annotations

import io
import random
import threading
from typing import Any, cast

import psycopg
import structlog
from eventsourcing.persistence import PersistenceError

from connectors import health, inbox
from connectors.deadletters import record_delivery_letters
from connectors.ingest import Ingestor
from connectors.outcome import FeedRejected, IngestResult
from connectors.parsers import Format
from projections.store import ViewStore

log = structlog.get_logger(__name__)

# A delivery that fails (not one rejected as broken) is tried again, backing off with
# jitter: 1-2, 2-4, ... 64-128 s apart, eight tries over about 2-4 minutes; then it is left
# failed, for an operator to queue again (POST /v1/feeds/{delivery_id}/retry) once fixed.
MAX_ATTEMPTS = 8


class ClaimLost(Exception):
    """Another worker took the delivery over from this one, which had gone silent too long."""


class Stopping(Exception):
    """The worker was asked to stop while it applied a delivery: it hands it back."""


class InboxWorker:
    def __init__(
        self,
        ingestor: Ingestor,
        store: ViewStore,
        poll_seconds: float = 0.5,
        stale_after_seconds: int = 300,
    ) -> None:
        self.ingestor = ingestor
        self.store = store
        self.poll_seconds = poll_seconds
        self.stale_after_seconds = stale_after_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> InboxWorker:
        self._thread = threading.Thread(target=self._run, name="inbox-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.work_once()
            except (psycopg.Error, PersistenceError) as error:
                log.warning("inbox.unavailable", error=str(error))
                worked = False
            except Exception:  # never let one delivery stop every later one
                log.exception("inbox.worker_error")
                worked = False
            if not worked:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def work_once(self) -> bool:
        """Applies the oldest waiting delivery, if any; True when there was one."""
        # The claim's connection is kept until the delivery is finished: its session
        # holds the claim's lock, the sign that this worker is alive (see inbox.claim).
        with self.store.connection() as claim:
            delivery = inbox.claim(claim, self.stale_after_seconds)
            if delivery is None:
                return False
            structlog.contextvars.bind_contextvars(delivery_id=delivery.delivery_id)
            try:
                self.process(delivery, claim)
            finally:
                structlog.contextvars.unbind_contextvars("delivery_id")
                _release(claim, delivery)
        return True

    def process(self, delivery: inbox.Delivery, claim: inbox.Connection) -> IngestResult | None:
        """Applies a claimed delivery; `claim` is the connection its claim was made on."""
        supplier = delivery.supplier_id
        if delivery.taken_over:
            log.warning("feed.delivery.taken_over", supplier=supplier, attempts=delivery.attempts)
            if delivery.attempts > MAX_ATTEMPTS:
                # Its tries are spent, the last one ending with its worker: a delivery that
                # crashes the process applying it was claimed again at each restart, and
                # took `ledger serve` down each time (a security walkthrough).
                reason = f"abandoned: its worker stopped while applying it, attempt {MAX_ATTEMPTS}"
                self._finish(delivery, "failed", None, f"{reason} of {MAX_ATTEMPTS} (a crash?)")
                log.error("feed.delivery.abandoned", supplier=supplier, attempts=delivery.attempts)
                return None
        try:
            result = self.ingestor.ingest(
                supplier,
                delivery.delivery_id,
                io.BytesIO(delivery.body),
                cast(Format, delivery.format),
                source=delivery.source,
                received_at=delivery.received_at,
                # Its events name who sent it: the key that uploaded it, else the
                # supplier's connector (a webhook, poll, folder, SFTP or FTP).
                actor=delivery.received_by or f"connector:{supplier}",
                defaults=_source_options(delivery.source),
                heartbeat=lambda: self._heartbeat(claim, delivery),
            )
        except ClaimLost:
            log.warning("feed.delivery.claim_lost", supplier=supplier)
            return None
        except Stopping:
            self._hand_back(delivery)
            return None
        except FeedRejected as broken:
            self._finish(delivery, "rejected", None, broken.reason)
            log.warning("feed.delivery.rejected", supplier=supplier, reason=broken.reason)
            return None
        except Exception as error:  # whatever it was, the delivery is kept and tried again
            self._failed(delivery, error)
            return None
        outcome = result.as_dict()
        if delivery.taken_over:
            # Its counts are this attempt's: what the dead one applied counts as unchanged.
            outcome["taken_over"] = True
        try:
            with self.store.transaction() as conn:
                if not inbox.finish(
                    conn, delivery.id, "applied", outcome, None, attempt=delivery.attempts
                ):
                    log.warning("feed.delivery.claim_lost", supplier=supplier)
                    return None
                letters = record_delivery_letters(
                    conn, delivery.id, supplier, delivery.delivery_id, result.rejections
                )
                if letters is not None:
                    outcome["seconds"]["letters"] = letters
                health.succeeded(
                    conn,
                    supplier,
                    delivery.delivery_id,
                    result.rows,
                    result.applied,
                    result.rejected,
                    result.lag_seconds,
                    late=result.late,
                )
        except psycopg.OperationalError:
            raise  # the database away: the claim stands, and is taken over once it is back
        except Exception as error:
            # Its letters or counts could not be stored: tried again, backing off, then
            # failed, as any failure. Left claimed, it was taken over at once, for good,
            # ahead of every later delivery (a fuzzing walkthrough).
            self._failed(delivery, error)
            return None
        log.info(
            "feed.delivery.applied",
            supplier=supplier,
            rows=result.rows,
            changed=result.applied,
            unchanged=result.unchanged,
            late=result.late,
            rejected=result.rejected,
            seconds=outcome["seconds"],
            read_by=result.read_by,
            shares=result.shares,
        )
        return result

    def _failed(self, delivery: inbox.Delivery, error: Exception) -> None:
        """Queues the delivery again after a pause that grows with its attempts; after
        MAX_ATTEMPTS, leaves it failed."""
        status = "failed" if delivery.attempts >= MAX_ATTEMPTS else "queued"
        retry_in = 2.0**delivery.attempts * random.uniform(0.5, 1)
        self._finish(delivery, status, None, f"{type(error).__name__}: {error}", retry_in)
        log.warning(
            "feed.delivery.failed", supplier=delivery.supplier_id, error=str(error), retry=status
        )

    def _finish(
        self,
        delivery: inbox.Delivery,
        status: str,
        outcome: dict[str, Any] | None,
        error: str,
        retry_in: float | None = None,
    ) -> None:
        with self.store.transaction() as conn:
            if inbox.finish(
                conn, delivery.id, status, outcome, error, retry_in, attempt=delivery.attempts
            ):
                health.failed(conn, delivery.supplier_id, error)
            else:
                log.warning("feed.delivery.claim_lost", supplier=delivery.supplier_id)

    def _heartbeat(self, claim: inbox.Connection, delivery: inbox.Delivery) -> None:
        """News of a long delivery's claim, after each part; stops applying a claim lost,
        or when the worker is asked to stop."""
        if self._stop.is_set():
            raise Stopping(delivery.delivery_id)
        if not inbox.heartbeat(claim, delivery):
            raise ClaimLost(delivery.delivery_id)

    def _hand_back(self, delivery: inbox.Delivery) -> None:
        """Queues a delivery this worker stopped applying, between two of its parts, for
        the next worker at once: what it applied is then unchanged, the rest applied. A
        stop is no failure of the supplier's: feed health does not count it. (Applying on
        to its end could take longer than a supervisor waits before it kills the process;
        left claimed, it would wait for its claim to go stale.)"""
        with self.store.transaction() as conn:
            handed = inbox.hand_back(
                conn, delivery, "handed back unfinished: its worker was stopped"
            )
            if handed:
                conn.execute("NOTIFY connector_inbox")
        log.warning(
            "feed.delivery.handed_back" if handed else "feed.delivery.claim_lost",
            supplier=delivery.supplier_id,
        )


def _release(claim: inbox.Connection, delivery: inbox.Delivery) -> None:
    """Gives the claim's connection back to the pool without the claim's lock, whatever
    became of the delivery: closed when that cannot be made sure of (the pool replaces a
    closed connection, and the server lets go of a closed session's locks)."""
    try:
        if inbox.release(claim, delivery):
            return
        log.warning("inbox.claim_lock_missing")
    except psycopg.Error as error:
        log.warning("inbox.claim_release_failed", error=str(error))
    claim.close()


def _source_options(source: str) -> dict[str, Any]:
    # A JSON webhook body is {"delivery_id", "observations": [...]} unless the supplier's
    # options say where its records are.
    return {"records": "observations"} if source == "webhook" else {}
