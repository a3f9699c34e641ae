"""Connector workers side by side: one owner per supplier's schedule, and when it next polls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from api.runtime import Runtime
from connectors import health
from connectors.scheduler import Schedule, Scheduler
from connectors.simulator import Catalogue, RestSupplier
from connectors.simulator.http_thread import Request, Response
from connectors.transports import Fetched
from connectors.transports.breaker import CircuitBreaker
from ledger.delivery import FeedDelivery
from ledger.stock import StockItem
from tests.conftest import stop_process
from tests.integration.test_scheduler import supplier_fed_by

T = TypeVar("T")

# A standby polls for the lease every scheduler tick (0.5 s); a dead owner's session, and
# with it the lease, ends as soon as PostgreSQL sees its connection close.
TAKEOVER_SECONDS = 10.0
STARTUP_SECONDS = 30.0
APPLIED_SECONDS = 15.0


@dataclass
class SlowRestSupplier(RestSupplier):
    """The simulated REST supplier, each answer taking a while; notes the most at once."""

    answer_seconds: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_once = 0
        self.most_at_once = 0
        self._at_once_lock = threading.Lock()

    def _answer(self, request: Request) -> Response:
        with self._at_once_lock:
            self.at_once += 1
            self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            time.sleep(self.answer_seconds)
            return super()._answer(request)
        finally:
            with self._at_once_lock:
                self.at_once -= 1


@dataclass
class Worker:
    """A `ledger connectors run` process, logging JSON to a file of its own."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def events(self, event: str | None = None, **fields: object) -> list[dict[str, Any]]:
        """Its log lines, oldest first, with that event name and those fields."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            if event is not None and entry.get("event") != event:
                continue
            if all(entry.get(key) == value for key, value in fields.items()):
                found.append(entry)
        return found

    def polls(self, supplier: str) -> list[str]:
        """What each of its polls of the supplier came to, oldest first."""
        return [
            entry["event"]
            for entry in self.events(supplier=supplier)
            if entry["event"] in ("transport.poll.complete", "transport.poll.unchanged")
        ]

    def owns(self, supplier: str) -> bool:
        return bool(self.events("lease.acquired", lease=f"connector:{supplier}"))

    def alive(self) -> bool:
        return self.process.poll() is None


def start_worker(database_url: str, tmp_path: Path, name: str) -> Worker:
    log_path = tmp_path / f"connectors-{name}.log"
    env = {
        **os.environ,
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_LOG_FORMAT": "json",
        "LEDGER_LOG_LEVEL": "INFO",
    }
    command = [sys.executable, "-m", "api", "connectors", "run"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Worker(name, process, log_path)


def stop_worker(worker: Worker) -> None:
    if worker.alive():
        stop_process(worker.process)


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[Callable[[str], Worker]]:
    """Starts `ledger connectors run` processes on the test's database; all stopped after."""
    started: list[Worker] = []

    def start(name: str) -> Worker:
        worker = start_worker(database_url, tmp_path, name)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            stop_worker(worker)


def wait_until(
    condition: Callable[[], T | None], timeout: float, what: str, alive: Sequence[Worker] = ()
) -> T:
    """The condition's first true value within `timeout` seconds; fails if a worker dies."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        for worker in alive:
            if not worker.alive():
                log = worker.log_path.read_text(errors="replace")
                raise AssertionError(f"worker {worker.name} died while waiting for {what}:\n{log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def levels_match(ledger: Runtime, supplier: str, catalogue: Catalogue) -> bool:
    """Whether the ledger holds the catalogue's current report for every item."""
    for item in catalogue.items():
        stock: StockItem = ledger.app.repository.get(
            StockItem.id_for(f"{supplier}-{item.supplier_sku}")
        )
        position = stock.positions.get(supplier)
        if position is None or position.quantity != item.quantity * item.units_per_supplier_unit:
            return False
    return True


def last_poll_unchanged(worker: Worker, supplier: str) -> bool:
    """Whether its latest poll found nothing new: the feed's validators are saved."""
    polls = worker.polls(supplier)
    return bool(polls) and polls[-1] == "transport.poll.unchanged"


def inbox_of(ledger: Runtime, supplier: str) -> list[dict[str, Any]]:
    with ledger.store.connection() as conn:
        return conn.execute(
            "SELECT content_hash, status FROM connector_inbox WHERE supplier_id = %s ORDER BY id",
            (supplier,),
        ).fetchall()


def recorded_deliveries(ledger: Runtime) -> int:
    with ledger.store.connection() as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM inventoryledger_events WHERE topic = %s",
            (FeedDelivery.Recorded.TOPIC,),
        ).fetchone()
    assert row is not None
    return int(row["n"])


def test_one_worker_polls_a_supplier_and_another_takes_over_when_it_is_killed(
    ledger: Runtime, workers: Callable[[str], Worker]
) -> None:
    catalogue = Catalogue(3, seed=21, observed_at=datetime.now(UTC) - timedelta(minutes=1))
    rest = SlowRestSupplier(catalogue, pagination="page", page_size=10)
    with rest:
        supplier_fed_by(
            ledger,
            "polled",
            catalogue,
            poll={"url": f"{rest.base_url}/inventory", "pagination": "page", "page_size": 10},
            schedule={"interval_seconds": 0.2, "jitter": 0.5},
        )
        first, second = workers("first"), workers("second")
        both = [first, second]
        wait_until(
            lambda: all(w.events("ledger.started") for w in both), STARTUP_SECONDS, "both started"
        )
        owner = wait_until(
            lambda: next((w for w in both if w.owns("polled")), None),
            STARTUP_SECONDS,
            "a worker leases the supplier",
            alive=both,
        )
        standby = second if owner is first else first
        wait_until(
            lambda: levels_match(ledger, "polled", catalogue),
            APPLIED_SECONDS,
            "the first report applied",
            alive=both,
        )
        catalogue.advance(1.0)
        wait_until(
            lambda: levels_match(ledger, "polled", catalogue),
            APPLIED_SECONDS,
            "the second report applied",
            alive=both,
        )
        # Side by side for a while, so that a standby that polled too would be seen.
        wait_until(
            lambda: len(owner.polls("polled")) >= 8 and last_poll_unchanged(owner, "polled"),
            APPLIED_SECONDS,
            "the owner polls on",
            alive=both,
        )
        most_at_once_side_by_side = rest.most_at_once
        standby_polls_side_by_side = standby.polls("polled")
        standby_owned_side_by_side = standby.owns("polled")

        owner.process.send_signal(signal.SIGKILL)
        owner.process.wait(10)
        wait_until(
            lambda: standby.owns("polled"),
            TAKEOVER_SECONDS,
            "the standby takes the supplier over",
            alive=[standby],
        )
        first_poll_taken_over = wait_until(
            lambda: standby.polls("polled"),
            APPLIED_SECONDS,
            "the standby polls the supplier",
            alive=[standby],
        )[0]
        for report in ("third", "fourth"):
            catalogue.advance(1.0)
            wait_until(
                lambda: levels_match(ledger, "polled", catalogue),
                APPLIED_SECONDS,
                f"the {report} report applied by the standby",
                alive=[standby],
            )
        wait_until(
            lambda: all(row["status"] == "applied" for row in inbox_of(ledger, "polled")),
            APPLIED_SECONDS,
            "every delivery applied",
        )
        inbox = inbox_of(ledger, "polled")
        deliveries = recorded_deliveries(ledger)

        standby.process.terminate()
        stopped = standby.process.wait(20)

    assert most_at_once_side_by_side == 1
    assert standby_polls_side_by_side == []
    assert not standby_owned_side_by_side
    # The dead owner's validators carry over: taking over costs a 304, not the feed again.
    assert first_poll_taken_over == "transport.poll.unchanged"
    assert standby.polls("polled").count("transport.poll.complete") == 2
    # Four reports, each fetched once, stored once and recorded once.
    assert len(inbox) == 4
    assert len({row["content_hash"] for row in inbox}) == 4
    assert deliveries == 4
    assert stopped == 0
    assert not standby.events(level="error")


class NoTransport:
    """A transport never asked for anything: these tests only time the next fetch."""

    def fetch(self) -> Iterator[Fetched]:
        raise AssertionError("not fetched here")

    def done(self, fetched: Fetched) -> None:
        raise AssertionError("not fetched here")

    def close(self) -> None:
        """Nothing to close."""

    refused: dict[str, str] = {}
    refresh_seconds = None


def schedule_of(interval: float, jitter: float) -> Schedule:
    return Schedule(
        supplier_id="timed",
        connector={},
        transport=NoTransport(),
        breaker=CircuitBreaker(),
        interval=interval,
        jitter=jitter,
    )


def next_waits(schedule: Schedule, draws: int, at_least: float = 0.0) -> list[float]:
    """How long after `now` the schedule is next due, drawn `draws` times."""
    now = 1000.0
    waits = []
    for _ in range(draws):
        schedule.next_due(now, at_least=at_least)
        waits.append(schedule.due - now)
    return waits


def test_the_next_poll_is_an_interval_away_spread_by_its_jitter() -> None:
    waits = next_waits(schedule_of(60.0, 0.1), 2000)

    assert all(54.0 <= wait <= 66.0 for wait in waits)
    # Spread over the whole band, both ways, around the interval: not a fixed wait.
    assert min(waits) < 55.0
    assert max(waits) > 65.0
    assert len(set(waits)) > 1900
    assert abs(sum(waits) / len(waits) - 60.0) < 0.5


def test_without_jitter_the_next_poll_is_exactly_an_interval_away() -> None:
    assert set(next_waits(schedule_of(60.0, 0.0), 50)) == {60.0}


def test_a_retry_after_beyond_the_interval_puts_the_next_poll_off_until_then() -> None:
    assert set(next_waits(schedule_of(60.0, 0.1), 200, at_least=600.0)) == {600.0}


def test_a_retry_after_within_the_interval_never_brings_the_next_poll_forward() -> None:
    waits = next_waits(schedule_of(60.0, 0.1), 500, at_least=5.0)

    assert all(54.0 <= wait <= 66.0 for wait in waits)
    assert len(set(waits)) > 450


def test_a_retry_after_longer_than_the_transport_waits_is_honoured_by_the_scheduler(
    ledger: Runtime,
) -> None:
    catalogue = Catalogue(3, seed=8, observed_at=datetime.now(UTC) - timedelta(minutes=1))
    with RestSupplier(catalogue, pagination="page", page_size=10) as rest:
        supplier_fed_by(
            ledger,
            "throttled",
            catalogue,
            poll={
                "url": f"{rest.base_url}/inventory",
                "pagination": "page",
                "page_size": 10,
                "max_retry_after_seconds": 5,
            },
            schedule={"interval_seconds": 30, "jitter": 0.1},
        )
        now = [1000.0]
        scheduler = Scheduler(ledger.store, ledger.leases, clock=lambda: now[0])
        rest.faults.throttle_next(1, retry_after=600)

        assert scheduler.tick() == 0
        due_after_throttle = scheduler.schedules["throttled"].due
        asked_when_throttled = [request.status for request in rest.requests]
        now[0] = 1599.0
        assert scheduler.tick() == 0
        asked_before_the_wait_ended = len(rest.requests)
        now[0] = 1600.0
        assert scheduler.tick() == 1
        with ledger.store.connection() as conn:
            [throttled] = health.report(conn, "throttled")

    assert asked_when_throttled == [429]  # not retried within the fetch
    assert due_after_throttle == 1600.0
    assert asked_before_the_wait_ended == 1
    assert [request.status for request in rest.requests] == [429, 200]
    assert throttled["last_error"].startswith("http_429")
