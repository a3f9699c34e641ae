"""A delivery whose worker process dies mid-apply is taken over within seconds; one whose
worker lives is not. The dying worker is a real process, killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from api.runtime import Runtime, open_runtime
from connectors import inbox
from connectors.ingest import Ingestor, content_hash
from connectors.outcome import IngestResult
from connectors.worker import MAX_ATTEMPTS, InboxWorker
from ledger.commands import PutMappings
from ledger.mapping import MappingSpec
from projections.leases import lock_key
from tests.conftest import make_settings
from tests.integration.ledger_setup import CAUSE, put_supplier

SUPPLIER = "acme"
ROWS = 400
PART = 100  # the dying worker's parts: it applies one, then hangs until killed
REPO = Path(__file__).resolve().parents[2]
# Well under the 300 s a claim had to go silent before it was taken over.
TAKEOVER_SECONDS = 10


class HangingAfterFirstPart:
    """An ingestor that hangs, alive and holding its claim, once its first part is applied."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    def ingest(self, *args: Any, heartbeat: Callable[[], None], **kwargs: Any) -> IngestResult:
        def hang() -> None:
            heartbeat()
            time.sleep(3600)

        return self.ingestor.ingest(*args, heartbeat=hang, **kwargs)


def apply_then_hang(database_url: str) -> None:
    """The dying worker (run in a process of its own): claims the delivery, applies its
    first part, then hangs until killed."""
    settings = make_settings(database_url, connector_batch_size=PART, connector_part_seconds=0)
    runtime = open_runtime(settings, migrate_first=False, sweep=False, project=False, connect=False)
    hanging = cast(Ingestor, HangingAfterFirstPart(runtime.ingestor))
    InboxWorker(hanging, runtime.store).work_once()


@pytest.fixture
def delivery(ledger: Runtime) -> dict[str, int]:
    """A delivery of ROWS mapped SKUs, queued in the inbox; returns the levels it reports."""
    put_supplier(ledger.writer, SUPPLIER)
    levels = {f"SKU-T{n:04d}": n % 7 + 1 for n in range(ROWS)}
    mappings = [MappingSpec(f"S-{sku}", sku, 1, upc=None) for sku in levels]
    ledger.writer.execute(
        PutMappings(at=datetime.now(UTC), cause=CAUSE, supplier_id=SUPPLIER, mappings=mappings)
    )
    ledger.views.wait_for("mappings", ledger.app.recorder.max_notification_id(), timeout=20)
    at = datetime.now(UTC).isoformat()
    lines = ["sku,quantity,observed_at"] + [f"S-{sku},{q},{at}" for sku, q in levels.items()]
    body = ("\n".join(lines) + "\n").encode()
    with ledger.store.connection() as conn:
        inbox.enqueue(
            conn,
            supplier_id=SUPPLIER,
            delivery_id="big",
            source="upload",
            format="csv",
            content_hash=content_hash(body),
            body=body,
        )
    return levels


def start_dying_worker(ledger: Runtime, log: Path) -> subprocess.Popen[bytes]:
    """The dying worker, once it has applied its first part and hangs."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from tests.integration.test_inbox_takeover import apply_then_hang;"
                " apply_then_hang(sys.argv[1])",
                ledger.database_url,
            ],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while len(levels_written(ledger)) < PART:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the worker applied nothing"
        time.sleep(0.05)
    time.sleep(0.3)  # had it not hung, it would go on to its next part meanwhile
    assert len(levels_written(ledger)) == PART
    return process


def levels_written(ledger: Runtime) -> dict[str, int]:
    with psycopg.connect(ledger.database_url) as conn:
        rows = conn.execute(
            "SELECT sku, quantity FROM inventoryledger_levels WHERE supplier_id = %s",
            (SUPPLIER,),
        ).fetchall()
    return dict(rows)


def inbox_row(ledger: Runtime) -> dict[str, Any]:
    with ledger.store.connection() as conn:
        [row] = conn.execute(
            "SELECT status, attempts, outcome FROM connector_inbox WHERE delivery_id = 'big'"
        ).fetchall()
    return row


def claim_locks_held(ledger: Runtime) -> int:
    """How many advisory locks on inbox claims (of any attempt up to 10) are held."""
    with ledger.store.connection() as conn:
        ids = [row["id"] for row in conn.execute("SELECT id FROM connector_inbox").fetchall()]
        keys = [lock_key(f"inbox:{i}:{attempt}") for i in ids for attempt in range(11)]
        # A bigint key is held as its high and low 32 bits, in classid and objid.
        row = conn.execute(
            "SELECT count(*) AS held FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1"
            " AND (classid::bigint, objid::bigint) IN"
            " (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))",
            ([(key >> 32) & 0xFFFFFFFF for key in keys], [key & 0xFFFFFFFF for key in keys]),
        ).fetchone()
    assert row is not None
    return int(row["held"])


def kill(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)


def take_over(worker: InboxWorker) -> float:
    """Has `worker` apply the waiting delivery; returns how long it took to get it (the
    server notices a killed client's session end a moment after the process is gone)."""
    started = time.monotonic()
    while not worker.work_once():
        assert time.monotonic() - started < TAKEOVER_SECONDS, "the dead worker's claim is kept"
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_delivery_whose_worker_is_killed_mid_apply_is_taken_over_in_seconds_and_applied_once(
    ledger: Runtime, delivery: dict[str, int], tmp_path: Path
) -> None:
    dying = start_dying_worker(ledger, tmp_path / "worker.log")
    kill(dying)
    assert inbox_row(ledger)["status"] == "processing"  # half applied, as storefronts see it
    survivor = InboxWorker(ledger.ingestor, ledger.store)

    take_over(survivor)

    row = inbox_row(ledger)
    assert (row["status"], row["attempts"], row["outcome"]["taken_over"]) == ("applied", 2, True)
    # The counts are the finishing attempt's: the first part, applied by the dead worker,
    # is unchanged for it, and nothing was applied twice.
    outcome = row["outcome"]
    assert (outcome["rows"], outcome["applied"], outcome["unchanged"]) == (ROWS, ROWS - PART, PART)
    assert levels_written(ledger) == delivery
    assert claim_locks_held(ledger) == 0


def test_a_live_worker_s_delivery_is_never_taken_over(
    ledger: Runtime, delivery: dict[str, int], tmp_path: Path
) -> None:
    living = start_dying_worker(ledger, tmp_path / "worker.log")
    other = InboxWorker(ledger.ingestor, ledger.store)
    try:
        until = time.monotonic() + 3
        while time.monotonic() < until:
            assert not other.work_once()
            time.sleep(0.1)
        row = inbox_row(ledger)
        assert (row["status"], row["attempts"]) == ("processing", 1)
        assert len(levels_written(ledger)) == PART
        assert claim_locks_held(ledger) == 1
    finally:
        kill(living)
    # Only its worker's life kept it: once that ends, the other takes it over.
    take_over(other)
    assert inbox_row(ledger)["status"] == "applied"


def queue(ledger: Runtime, supplier_id: str, delivery_id: str, body: bytes) -> None:
    with ledger.store.connection() as conn:
        inbox.enqueue(
            conn,
            supplier_id=supplier_id,
            delivery_id=delivery_id,
            source="upload",
            format="csv",
            content_hash=content_hash(body),
            body=body,
        )


def test_a_claim_s_connection_goes_back_to_the_pool_unlocked_whatever_became_of_its_delivery(
    ledger: Runtime, delivery: dict[str, int]
) -> None:
    queue(ledger, SUPPLIER, "broken", b"sku,observed_at\nS-SKU-T0001,2026-01-01T00:00:00Z\n")
    queue(ledger, "nobody", "unknown", b"sku,quantity\nX,1\n")
    worker = InboxWorker(ledger.ingestor, ledger.store)

    while worker.work_once():
        pass

    with ledger.store.connection() as conn:
        rows = conn.execute("SELECT delivery_id, status FROM connector_inbox").fetchall()
    statuses = {row["delivery_id"]: row["status"] for row in rows}
    assert statuses == {"big": "applied", "broken": "rejected", "unknown": "queued"}
    assert claim_locks_held(ledger) == 0


def test_a_claim_locks_the_one_delivery_it_takes_of_those_waiting(
    ledger: Runtime, delivery: dict[str, int]
) -> None:
    queue(ledger, SUPPLIER, "second", b"sku,quantity\nS-SKU-T0001,1\n")
    queue(ledger, SUPPLIER, "third", b"sku,quantity\nS-SKU-T0002,1\n")
    with ledger.store.connection() as conn:
        claimed = inbox.claim(conn)
        assert claimed is not None
        assert claimed.delivery_id == "big"
        assert claim_locks_held(ledger) == 1
        assert inbox.release(conn, claimed)


def test_a_claimer_taken_over_after_going_silent_can_no_longer_finish_its_delivery(
    ledger: Runtime, delivery: dict[str, int]
) -> None:
    with ledger.store.connection() as silent, ledger.store.connection() as other:
        first = inbox.claim(silent)
        assert first is not None
        assert not first.taken_over
        assert inbox.claim(other) is None  # alive, and with news
        other.execute("UPDATE connector_inbox SET started_at = now() - interval '10 minutes'")

        second = inbox.claim(other)

        assert second is not None
        assert (second.taken_over, second.attempts) == (True, 2)
        assert not inbox.heartbeat(silent, first)
        assert not inbox.finish(silent, first.id, "applied", {}, None, attempt=first.attempts)
        assert inbox_row(ledger)["status"] == "processing"
        assert inbox.claim(silent) is None  # the successor's claim is alive in its own right
        assert inbox.release(silent, first)
        assert inbox.release(other, second)


class SlowParts:
    """An ingestor that takes a while over each part: time for a stop to come mid-delivery."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    def ingest(self, *args: Any, heartbeat: Callable[[], None], **kwargs: Any) -> IngestResult:
        def slowly() -> None:
            time.sleep(0.3)
            heartbeat()

        return self.ingestor.ingest(*args, heartbeat=slowly, **kwargs)


@pytest.mark.alone
def test_a_worker_stopped_mid_delivery_hands_it_back_at_once_and_the_next_applies_the_rest(
    ledger: Runtime, delivery: dict[str, int]
) -> None:
    """Found by an operator's walkthrough: a stopped worker applied on for 30 s (the most
    its stop waits), then left the delivery claimed until its claim went stale. It now
    stops between two parts and queues the delivery again."""
    settings = make_settings(
        ledger.database_url, connector_batch_size=PART, connector_part_seconds=0
    )
    runtime = open_runtime(settings, migrate_first=False, sweep=False, project=False, connect=False)
    try:
        worker = InboxWorker(cast(Ingestor, SlowParts(runtime.ingestor)), runtime.store).start()
        deadline = time.monotonic() + 60
        while not levels_written(ledger):
            assert time.monotonic() < deadline, "the worker applied nothing"
            time.sleep(0.05)
        started = time.monotonic()
        worker.stop()
        stopped_in = time.monotonic() - started
    finally:
        runtime.close()

    assert stopped_in < 2
    applied = len(levels_written(ledger))
    assert 0 < applied < ROWS
    with ledger.store.connection() as conn:
        [row] = conn.execute(
            "SELECT status, attempts, error FROM connector_inbox WHERE delivery_id = 'big'"
        ).fetchall()
        health = conn.execute(
            "SELECT consecutive_failures FROM connector_health WHERE supplier_id = %s",
            (SUPPLIER,),
        ).fetchone()
    assert (row["status"], row["attempts"]) == ("queued", 0)  # a stop is no failed attempt
    assert "handed back" in row["error"]
    assert health is None or health["consecutive_failures"] == 0  # no failure of the feed's
    assert claim_locks_held(ledger) == 0

    assert InboxWorker(ledger.ingestor, ledger.store).work_once()

    finished = inbox_row(ledger)
    assert (finished["status"], finished["attempts"]) == ("applied", 1)
    outcome = finished["outcome"]
    assert (outcome["applied"], outcome["unchanged"]) == (ROWS - applied, applied)
    assert levels_written(ledger) == delivery


def test_a_delivery_claimed_again_shows_this_attempt_not_the_last_one_s_error(
    ledger: Runtime, delivery: dict[str, int]
) -> None:
    """Found by a walkthrough: while a delivery handed back (or failed, or taken over) was
    applied again, its status (`GET /v1/feeds/{id}`) showed the last attempt's error and
    end, as if this attempt had ended so."""
    with ledger.store.connection() as first:
        taken = inbox.claim(first)
        assert taken is not None
        assert inbox.hand_back(first, taken, "handed back: its worker stopped")
        assert inbox.release(first, taken)
    with ledger.store.connection() as conn:
        [queued] = inbox.delivery_status(conn, "big")
    assert (queued["status"], queued["error"]) == ("queued", "handed back: its worker stopped")
    assert queued["finished_at"] is not None

    with ledger.store.connection() as second:
        again = inbox.claim(second)
        assert again is not None
        try:
            with ledger.store.connection() as conn:
                [shown] = inbox.delivery_status(conn, "big")
        finally:
            assert inbox.release(second, again)
    assert (shown["status"], shown["attempts"]) == ("processing", 1)
    assert (shown["error"], shown["outcome"], shown["finished_at"]) == (None, None, None)


def test_a_delivery_whose_letters_cannot_be_stored_waits_its_retry_behind_the_others(
    ledger: Runtime, delivery: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a fuzzing walkthrough: a delivery whose letters PostgreSQL refused was left
    claimed, taken over at once, again and again, ahead of every later delivery of every
    supplier. It is now tried again as any failure is: after a pause, then left failed."""

    def refused(*_: object) -> None:
        raise psycopg.errors.InvalidTextRepresentation("invalid input syntax for type json")

    queue(ledger, SUPPLIER, "later", b"sku,quantity\nS-SKU-T0001,99\n")
    worker = InboxWorker(ledger.ingestor, ledger.store)
    monkeypatch.setattr("connectors.worker.record_delivery_letters", refused)

    assert worker.work_once()  # "big", whose letters cannot be stored
    monkeypatch.undo()
    assert worker.work_once()  # the next waiting one, not "big" again
    assert not worker.work_once()  # "big" waits for its retry

    with ledger.store.connection() as conn:
        rows = conn.execute(
            "SELECT delivery_id, status, attempts, error, retry_at > now() AS waits"
            " FROM connector_inbox ORDER BY id"
        ).fetchall()
    big, later = rows
    assert (big["status"], big["attempts"], big["waits"]) == ("queued", 1, True)
    assert "invalid input syntax for type json" in big["error"]
    assert (later["delivery_id"], later["status"]) == ("later", "applied")
    assert claim_locks_held(ledger) == 0


def test_a_delivery_whose_worker_stopped_on_its_last_try_is_left_failed_not_tried_again(
    ledger: Runtime, delivery: dict[str, int]
) -> None:
    """A security walkthrough: a delivery that crashed the process applying it was taken
    over at each restart, for ever, and took `ledger serve` down each time. Here its
    claimers die (their sessions end) without an outcome, attempt after attempt."""
    for _ in range(MAX_ATTEMPTS):
        deadline = time.monotonic() + 10
        with ledger.store.connection() as conn:
            # Once the last claimer's session is gone (its server process ends a moment
            # after the client hangs up) its lock is free, and the claim taken over.
            while inbox.claim(conn) is None:
                assert time.monotonic() < deadline, "never taken over"
                time.sleep(0.05)
            conn.close()  # the claimer's session ends, as at a crash (the pool replaces it)
    worker = InboxWorker(ledger.ingestor, ledger.store)
    deadline = time.monotonic() + 10

    while not worker.work_once():  # once the last claimer's session is gone
        assert time.monotonic() < deadline, "never taken over"
        time.sleep(0.05)

    row = inbox_row(ledger)
    assert (row["status"], row["attempts"]) == ("failed", MAX_ATTEMPTS + 1)
    assert levels_written(ledger) == {}, "not applied again"
    assert not worker.work_once(), "nor claimed again"
    with ledger.store.connection() as conn:
        [health] = conn.execute(
            "SELECT last_error FROM connector_health WHERE supplier_id = %s", (SUPPLIER,)
        ).fetchall()
    assert health["last_error"].startswith("abandoned: its worker stopped")
