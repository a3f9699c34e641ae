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
from connectors.deadletters import record_dead_letters
from connectors.ingest import Ingestor
from connectors.outcome import FeedRejected, IngestResult
from connectors.parsers import Format
from projections.store import ViewStore

log = structlog.get_logger(__name__)

# A delivery that fails (not one rejected as broken) is tried again, backing off with
# jitter: 1-2, 2-4, ... 64-128 s apart, eight tries over about 2-4 minutes; then it is left
# failed, for an operator to queue again (POST /v1/feeds/{delivery_id}/retry) once fixed.
MAX_ATTEMPTS = 8


class InboxWorker:
    def __init__(self, ingestor: Ingestor, store: ViewStore, poll_seconds: float = 0.5) -> None:
        self.ingestor = ingestor
        self.store = store
        self.poll_seconds = poll_seconds
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
        with self.store.connection() as conn:
            delivery = inbox.claim(conn)
        if delivery is None:
            return False
        structlog.contextvars.bind_contextvars(delivery_id=delivery.delivery_id)
        try:
            self.process(delivery)
        finally:
            structlog.contextvars.unbind_contextvars("delivery_id")
        return True

    def process(self, delivery: inbox.Delivery) -> IngestResult | None:
        supplier = delivery.supplier_id
        try:
            result = self.ingestor.ingest(
                supplier,
                delivery.delivery_id,
                io.BytesIO(delivery.body),
                cast(Format, delivery.format),
                source=delivery.source,
                received_at=delivery.received_at,
                actor=f"connector:{supplier}",
                defaults=_source_options(delivery.source),
                heartbeat=lambda: self._heartbeat(delivery),
            )
        except FeedRejected as broken:
            self._finish(delivery, "rejected", None, broken.reason)
            log.warning("feed.delivery.rejected", supplier=supplier, reason=broken.reason)
            return None
        except Exception as error:  # whatever it was, the delivery is kept and tried again
            status = "failed" if delivery.attempts >= MAX_ATTEMPTS else "queued"
            retry_in = 2.0**delivery.attempts * random.uniform(0.5, 1)
            self._finish(delivery, status, None, f"{type(error).__name__}: {error}", retry_in)
            log.warning("feed.delivery.failed", supplier=supplier, error=str(error), retry=status)
            return None
        with self.store.transaction() as conn:
            record_dead_letters(conn, supplier, delivery.delivery_id, result.rejections)
            health.succeeded(
                conn,
                supplier,
                delivery.delivery_id,
                result.rows,
                result.applied,
                result.rejected,
                result.lag_seconds,
            )
            inbox.finish(conn, delivery.id, "applied", result.as_dict(), None)
        log.info(
            "feed.delivery.applied",
            supplier=supplier,
            rows=result.rows,
            changed=result.applied,
            unchanged=result.unchanged,
            late=result.late,
            rejected=result.rejected,
            seconds=result.as_dict()["seconds"],
            read_by=result.read_by,
            shares=result.shares,
        )
        return result

    def _heartbeat(self, delivery: inbox.Delivery) -> None:
        """Keeps the claim alive while a long delivery is applied, so no one takes it over."""
        with self.store.connection() as conn:
            inbox.heartbeat(conn, delivery.id)

    def _finish(
        self,
        delivery: inbox.Delivery,
        status: str,
        outcome: dict[str, Any] | None,
        error: str,
        retry_in: float | None = None,
    ) -> None:
        with self.store.transaction() as conn:
            inbox.finish(conn, delivery.id, status, outcome, error, retry_in)
            health.failed(conn, delivery.supplier_id, error)


def _source_options(source: str) -> dict[str, Any]:
    # A JSON webhook body is {"delivery_id", "observations": [...]} unless the supplier's
    # options say where its records are.
    return {"records": "observations"} if source == "webhook" else {}
