"""The connector scheduler: fetches each supplier's deliveries on its schedule, into the inbox.

A supplier is scheduled when its `connector` settings name a transport ("poll", "folder",
"sftp" or "ftp"). Per supplier, at the connector's top level, all optional:
- `schedule`: {"interval_seconds": 60, "jitter": 0.1} — how often, spread by ±jitter.
- `breaker`: {"failures_to_open": 5, "cooldown_seconds": 60} — the circuit breaker.
- `format`: the format of what is fetched (default: the transport's).
Each supplier's schedule is run by one process at a time: the process holding the
advisory-lock lease `connector:{supplier}`; several schedulers can run side by side.
Within a process, suppliers are fetched on a few threads of their own, one fetch a
supplier at a time, so a supplier that is slow, down or throttling (its retries wait out
its Retry-After) never holds up the others; stopping cuts those waits short. A
Retry-After longer than the transport waits puts the supplier's next fetch off, by an
hour at most, and feed health's last error says until when; that, and the supplier's
breaker, are kept in `connector_state` and taken up by whichever schedule fetches the
supplier next (see `Scheduler._resume`).
A delivery is marked done at its source only once the inbox holds it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_all
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import structlog

from connectors import health, inbox
from connectors.ingest import content_hash
from connectors.transports import Fetched, FetchFailed, Transport, transport_for
from connectors.transports.breaker import BreakerState, CircuitBreaker
from connectors.transports.retry import LONGEST_WAIT_SECONDS
from connectors.worker import InboxWorker
from projections.leases import LeaseSession
from projections.store import Connection, ViewStore

log = structlog.get_logger(__name__)

DEFAULT_INTERVAL_SECONDS = 60.0
# Suppliers fetched at once by one process (each fetch mostly waits on the network).
FETCH_THREADS = 4
# The longest a supplier's Retry-After puts its next fetch off: the longest any wait of a
# fetch may be. A day's Retry-After (a server's mistake, or a default nobody chose) went
# unseen and stopped the feed for a day; a supplier that still means it says so again.
LONGEST_RETRY_AFTER_SECONDS = LONGEST_WAIT_SECONDS
# The connector state (`connector_state`) that holds a supplier's fetches off, whichever
# process fetches it: see `Scheduler._resume`.
HELD_OFF = "held_off"
# A REST poll's validators are used for this share of the supplier's staleness limit after
# a poll that fetched every page: after such a poll each level is younger than half the
# limit (an older one repeated is recorded again), so the next full poll finds them younger
# than three quarters of it, plus a poll interval.
REFRESH_SHARE = 0.25


class DatabaseState:
    """A transport's durable state, in `connector_state`."""

    def __init__(self, store: ViewStore, supplier_id: str) -> None:
        self.store = store
        self.supplier_id = supplier_id

    def get(self, name: str) -> Any:
        with self.store.connection() as conn:
            return inbox.get_state(conn, self.supplier_id, name)

    def set(self, name: str, value: Any) -> None:
        with self.store.connection() as conn:
            inbox.set_state(conn, self.supplier_id, name, value)


@dataclass
class Schedule:
    supplier_id: str
    connector: dict[str, Any]
    transport: Transport
    breaker: CircuitBreaker
    interval: float
    jitter: float
    refresh: float | None = None  # see `_follow`
    due: float = 0.0
    fetched: int = field(default=0)
    # The breaker's state as feed health shows it, None until written.
    shown: BreakerState | None = None
    # What puts the supplier's fetches off (see `Scheduler._resume`), as last written, and
    # whether this schedule has taken it up since its lease was taken here.
    held_off: dict[str, Any] | None = None
    resumed: bool = False

    @functools.cached_property
    def settings_key(self) -> str:
        """The connector's settings but when it runs: what a held-off state applies to."""
        fetching = {k: v for k, v in self.connector.items() if k not in ("schedule", "breaker")}
        return hashlib.sha256(repr(sorted(fetching.items())).encode()).hexdigest()[:32]

    def next_due(self, now: float, at_least: float = 0.0) -> None:
        spread = self.interval * self.jitter
        self.due = now + max(at_least, self.interval + random.uniform(-spread, spread))


class Scheduler:
    def __init__(
        self,
        store: ViewStore,
        leases: LeaseSession,
        worker: InboxWorker | None = None,
        *,
        client: httpx.Client | None = None,
        refresh_seconds: float = 30.0,
        tick_seconds: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        fetch_threads: int = FETCH_THREADS,
    ) -> None:
        self.store = store
        self.leases = leases
        self.worker = worker
        self.client = client
        self.refresh_seconds = refresh_seconds
        self.tick_seconds = tick_seconds
        self.clock = clock
        self.schedules: dict[str, Schedule] = {}
        # Suppliers whose stored settings cannot run, and why, as feed health last said.
        self._refused: dict[str, str] = {}
        # Suppliers whose files the inbox holds but could not be moved aside, and why, as
        # feed health last said.
        self._unmoved: dict[str, str] = {}
        # Suppliers whose files a fetch passed over, and why, as feed health last said.
        self._refused_files: dict[str, str] = {}
        # Suppliers whose files came again as deliveries refused before, as health said.
        self._delivered_before: dict[str, str] = {}
        # Suppliers not fetched whose breaker health shows closed, as this process made sure.
        self._not_fetched: dict[str, str] = {}
        self._refreshed = -1e9
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # A daemon thread a fetch, at most `fetch_threads` fetching at once: one stuck in a
        # request never keeps the process from exiting. A fetch waiting to retry (backing
        # off, or sitting out a `Retry-After`) gives its slot up meanwhile (see `_sleep`).
        self._slots = threading.BoundedSemaphore(fetch_threads)
        self._holding = threading.local()  # whether this fetch thread holds a slot now
        self.stop_wait_seconds = 30.0  # how long stopping waits for fetches under way
        self._running: dict[str, Future[int]] = {}  # supplier -> its fetch under way

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run, name="connector-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # fetches waiting to retry give up (see `_sleep`)
        if self._thread is not None:
            self._thread.join(30)
        wait_for_all(list(self._running.values()), timeout=self.stop_wait_seconds)
        self._reap()
        for schedule in self.schedules.values():
            if schedule.supplier_id in self._running:
                # Still in a request: its transport stays open and its lease held (until
                # the process ends), so that no other process fetches it meanwhile.
                log.warning("scheduler.fetch_still_running", supplier=schedule.supplier_id)
                continue
            schedule.transport.close()
            self.leases.release(f"connector:{schedule.supplier_id}", self)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            try:
                self.tick(wait=False)
            except psycopg.Error as error:
                log.warning("scheduler.unavailable", error=str(error))
            except Exception:
                log.exception("scheduler.failed")

    def tick(self, *, wait: bool = True) -> int:
        """Starts every schedule that is due and leased here, each on a fetch thread (one
        fetch a supplier at a time). With `wait`, waits for those it started and returns
        the deliveries they stored (raising what one raised); without, returns 0 at once:
        the background loop, where a slow supplier must not hold up the next tick."""
        now = self.clock()
        self._reap()
        if now - self._refreshed >= self.refresh_seconds:
            self.refresh()
            self._refreshed = now
        started: list[Future[int]] = []
        for schedule in list(self.schedules.values()):
            if schedule.due > now or self._stop.is_set() or schedule.supplier_id in self._running:
                continue
            if not self.leases.hold(f"connector:{schedule.supplier_id}", self):
                schedule.next_due(now)
                schedule.resumed = False  # another process fetches it, and holds it off
                continue
            if not schedule.resumed and self._resume(schedule, now):
                continue  # put off, as the supplier or its breaker asked
            fetch = self._start(schedule)
            self._running[schedule.supplier_id] = fetch
            started.append(fetch)
        if not wait:
            return 0
        stored = sum(fetch.result() for fetch in started)
        self._reap()
        return stored

    def _resume(self, schedule: Schedule, now: float) -> bool:
        """Takes up what held the supplier's fetches off when another schedule of it last
        fetched (another process's, before a handover; this one's, before its settings
        changed): a `Retry-After` not yet over, and its breaker. Made anew, a schedule
        fetched a supplier that had asked for 200 s within 28 (a settings change) or 3 s
        (a handover), and an open breaker closed (a supplier integrator's walkthrough).
        Not across a change of how it is fetched (its URL, say): the breaker then starts
        closed, and it is fetched at once. True when the fetch is put off."""
        with self.store.connection() as conn:
            state = inbox.get_state(conn, schedule.supplier_id, HELD_OFF)
        schedule.resumed = True
        if not isinstance(state, dict):
            return False
        # Under other settings of how it is fetched, it starts afresh; what was kept is
        # cleared by its next fetch (else settings changed back would take it up again).
        schedule.held_off = state
        if state.get("settings") != schedule.settings_key:
            return False
        wall = time.time()
        opened_at = state.get("opened_at")
        schedule.breaker.restore(
            int(state.get("failures") or 0), None if opened_at is None else wall - opened_at
        )
        not_before = state.get("not_before")
        if not_before is None or not_before <= wall:
            return False
        schedule.due = now + (not_before - wall)
        return True

    def _hold_off(self, schedule: Schedule, deferred: bool) -> None:
        """Writes what holds the supplier's fetches off now (see `_resume`), when it changed:
        the next fetch's time after a failed one, and the breaker."""
        opened = schedule.breaker.opened_seconds_ago()
        wall = time.time()
        state = {
            "settings": schedule.settings_key,
            "not_before": wall + (schedule.due - self.clock()) if deferred else None,
            "failures": schedule.breaker.failures,
            "opened_at": None if opened is None else wall - opened,
        }
        written = schedule.held_off
        held = written is not None and (
            written.get("settings") != state["settings"] or _holds_off(written)
        )
        if not _holds_off(state) and not held:
            return  # nothing holds it off, nor did: no write at each fetch
        with self.store.connection() as conn:
            inbox.set_state(conn, schedule.supplier_id, HELD_OFF, state)
        schedule.held_off = state

    def _start(self, schedule: Schedule) -> Future[int]:
        """Runs one fetch of a schedule on a thread of its own, once a slot is free."""
        fetch: Future[int] = Future()

        def run() -> None:
            self._slots.acquire()
            self._holding.slot = True
            try:
                if not fetch.set_running_or_notify_cancel():
                    return
                try:
                    fetch.set_result(0 if self._stop.is_set() else self.run(schedule))
                except BaseException as error:  # handed to whoever waits for the fetch
                    fetch.set_exception(error)
            finally:
                if self._holding.slot:
                    self._holding.slot = False
                    self._slots.release()

        name = f"connector-fetch-{schedule.supplier_id}"
        threading.Thread(target=run, name=name, daemon=True).start()
        return fetch

    def _reap(self) -> None:
        """Forgets the fetches that ended, logging one that failed unexpectedly."""
        for supplier, fetch in list(self._running.items()):
            if not fetch.done():
                continue
            del self._running[supplier]
            error = fetch.exception()
            if isinstance(error, psycopg.Error):
                log.warning("scheduler.unavailable", supplier=supplier, error=str(error))
            elif error is not None:
                log.error("scheduler.fetch_crashed", supplier=supplier, error=repr(error))

    def _sleep(self, seconds: float) -> None:
        """Waits between a fetch's retries, its slot free for another supplier's fetch
        meanwhile (four suppliers sitting out a `Retry-After` of two minutes held every
        slot, and no other supplier was fetched); gives the fetch up when the scheduler
        stops."""
        holding = getattr(self._holding, "slot", False)
        if holding:
            self._holding.slot = False
            self._slots.release()
        if self._stop.wait(seconds):
            raise FetchFailed("stopping", retriable=False)
        if holding:
            # Waits in line for a slot (fetches started later queue behind it), rather
            # than asking again and again and being overtaken each time.
            self._slots.acquire()
            self._holding.slot = True
            if self._stop.is_set():
                raise FetchFailed("stopping", retriable=False)

    def refresh(self) -> None:
        """Follows suppliers' connector settings, as the stock view holds them."""
        with self.store.connection() as conn:
            rows = conn.execute("SELECT supplier_id, terms FROM view_suppliers").fetchall()
        seen: set[str] = set()
        for row in rows:
            supplier_id = row["supplier_id"]
            try:
                self._follow(row, seen)
            except Exception as error:  # one supplier's settings never stop the others
                log.exception("scheduler.bad_settings", supplier=supplier_id)
                self._refuse(supplier_id, f"settings_refused: {error}")
            else:
                self._refused.pop(supplier_id, None)
        for gone in set(self.schedules) - seen - set(self._running):
            self.schedules.pop(gone).transport.close()

    def _refuse(self, supplier_id: str, reason: str) -> None:
        """Says in feed health why a supplier is not fetched (settings saved before a check
        that now refuses them), once per reason: an operator sees it beside the others."""
        self._tell_once(self._refused, supplier_id, reason, health.failed)

    def _tell_once(
        self,
        told: dict[str, str],
        supplier_id: str,
        problem: str,
        record: Callable[[Connection, str, str], object],
    ) -> None:
        """Records a lasting problem in feed health when it is new, not at every refresh
        or fetch that finds it again; `told` is what health last said of each supplier."""
        if told.get(supplier_id) == problem:
            return
        try:
            with self.store.connection() as conn:
                record(conn, supplier_id, problem)
        except psycopg.Error:
            log.warning("scheduler.health_unrecorded", supplier=supplier_id, exc_info=True)
            return
        told[supplier_id] = problem

    def _follow(self, row: dict[str, Any], seen: set[str]) -> None:
        """Keeps one supplier's schedule in step with its settings."""
        supplier_id = row["supplier_id"]
        terms = row["terms"] or {}
        connector = terms.get("connector") or {}
        # A poll's 304 records no report: its validators are used for a quarter of the
        # supplier's shorter limit (staleness, exclusion) after a full poll, then it is
        # fetched in full again.
        limits = [terms.get("stale_after_seconds"), terms.get("exclude_after_seconds")]
        given = [float(limit) for limit in limits if limit is not None]
        refresh = min(given) * REFRESH_SHARE if given else None
        current = self.schedules.get(supplier_id)
        if current is not None and current.connector == connector and current.refresh != refresh:
            # Its limits changed, not its connector: told in place, the breaker and the
            # next fetch as they were (rebuilt, an open breaker closed, fetched at once).
            current.refresh = refresh
            current.transport.refresh_seconds = refresh
        if current is not None and (current.connector == connector or supplier_id in self._running):
            seen.add(supplier_id)  # new settings wait for the fetch under way to end
            return
        if current is not None:
            current.transport.close()
            del self.schedules[supplier_id]
        schedule_settings = connector.get("schedule") or {}
        breaker_settings = connector.get("breaker") or {}
        breaker = CircuitBreaker(
            failures_to_open=int(breaker_settings.get("failures_to_open", 5)),
            cooldown_seconds=float(breaker_settings.get("cooldown_seconds", 60)),
        )
        interval = float(schedule_settings.get("interval_seconds", DEFAULT_INTERVAL_SECONDS))
        jitter = float(schedule_settings.get("jitter", 0.1))
        transport = transport_for(
            supplier_id,
            connector,
            state=DatabaseState(self.store, supplier_id),
            client=self.client,
            sleep=self._sleep,
            refresh_seconds=refresh,
        )
        if transport is None:
            self._tell_once(self._not_fetched, supplier_id, "not fetched", health.not_fetched)
            return
        self._not_fetched.pop(supplier_id, None)
        self.schedules[supplier_id] = Schedule(
            supplier_id=supplier_id,
            connector=connector,
            refresh=refresh,
            transport=transport,
            breaker=breaker,
            interval=interval,
            jitter=jitter,
        )
        seen.add(supplier_id)

    def run(self, schedule: Schedule) -> int:
        """One fetch of one supplier: each delivery into the inbox, then marked done."""
        supplier = schedule.supplier_id
        # Before the fetch too: a breaker whose cooldown has ended lets this fetch through
        # as its probe, and health shows it half open while the probe runs.
        self._show_breaker(schedule)
        structlog.contextvars.bind_contextvars(supplier=supplier)
        try:
            stored = self._fetch(schedule)
        finally:
            structlog.contextvars.unbind_contextvars("supplier")
        if not self._stop.is_set():
            self._show_breaker(schedule)
        if stored:
            log.info("connector.fetched", supplier=supplier, deliveries=stored)
            if self.worker is not None:
                self.worker.wake()
        schedule.fetched += stored
        return stored

    def _show_breaker(self, schedule: Schedule) -> None:
        """Writes the breaker's state to feed health when it is not what health shows."""
        state = schedule.breaker.state
        if state == schedule.shown:
            return
        with self.store.connection() as conn:
            health.set_breaker(conn, schedule.supplier_id, state)
        if schedule.shown is not None:
            log.info("connector.breaker", supplier=schedule.supplier_id, state=state)
        schedule.shown = state

    def _fetch(self, schedule: Schedule) -> int:
        supplier = schedule.supplier_id
        stored = 0
        try:
            # Closed at once if storing fails, so the breaker counts the fetch as abandoned
            # and a file session ends now, not whenever the garbage is collected.
            with closing(schedule.breaker.guard(schedule.transport.fetch)) as fetches:
                for fetched in fetches:
                    with self.store.connection() as conn:
                        received = inbox.enqueue(
                            conn,
                            supplier_id=supplier,
                            delivery_id=arrival_id(fetched, datetime.now(UTC)),
                            source=fetched.source,
                            format=schedule.connector.get("format") or fetched.format,
                            content_hash=content_hash(fetched.body),
                            body=fetched.body,
                            name=fetched.name,
                        )
                    self._done(schedule, fetched)
                    stored += 0 if received.duplicate else 1
                    if received.duplicate and received.status in ("rejected", "failed"):
                        self._tell_refused_again(supplier, fetched, received)
            # Whatever the last fetch was: the worker counts rejected deliveries as
            # failures too, and another process may have counted the failed fetches.
            with self.store.connection() as conn:
                health.reached(conn, supplier)
            schedule.next_due(self.clock())
            self._hold_off(schedule, deferred=False)
            self._tell_refused(schedule)
        except FetchFailed as failure:
            now = self.clock()
            asked = failure.retry_after
            schedule.next_due(now, at_least=min(asked or 0.0, LONGEST_RETRY_AFTER_SECONDS))
            if self._stop.is_set():
                return stored  # given up because the process stops: not the supplier's
            # Only a wait asked for (a Retry-After, an open breaker's cooldown) is kept for
            # the schedule that fetches next: another failure's next fetch is the interval's,
            # which new settings may shorten (a review).
            self._hold_off(schedule, deferred=asked is not None)
            if failure.reason != "circuit_open":
                wait = schedule.due - now
                with self.store.connection() as conn:
                    health.failed(conn, supplier, failure.reason + _deferral(asked, wait))
                log.warning(
                    "connector.fetch_failed",
                    reason=failure.reason,
                    retriable=failure.retriable,
                    breaker=schedule.breaker.state,
                    retry_after=asked,
                    next_fetch_in_seconds=round(wait, 3),
                )
        except Exception as error:
            if isinstance(error, psycopg.Error):
                raise  # the database, not the supplier: tried again at the next tick
            # A fault of ours, not the supplier's: shown in health and tried again at the
            # next interval, not at every tick (a file name the inbox could not record
            # was fetched twice a second, health silent).
            schedule.next_due(self.clock())
            with contextlib.suppress(psycopg.Error), self.store.connection() as conn:
                health.failed(conn, supplier, f"internal_error: {type(error).__name__}")
            raise
        return stored

    def _tell_refused_again(
        self, supplier: str, fetched: Fetched, received: inbox.Received
    ) -> None:
        """A file listed again as it was, once rejected or failed: put back by an operator
        after mending the settings, say (`mv` keeps the time). It is the same delivery,
        which is not applied again by itself (nor rejected again at each fetch): says
        which, to queue it again (a walkthrough: the file went back to processed/, and
        nothing said why)."""
        delivery = received.delivery_id
        problem = (
            f"delivered_before: {fetched.name} is delivery {delivery}, {received.status};"
            f" queue it again with POST /v1/feeds/{delivery}/retry"
        )
        log.warning(
            "connector.refused_delivery_again",
            supplier=supplier,
            name=fetched.name,
            delivery=delivery,
            status=received.status,
        )
        self._tell_once(self._delivered_before, supplier, problem, health.noted)

    def _tell_refused(self, schedule: Schedule) -> None:
        """Shows in health the files the fetch passed over, once while they stay so."""
        refused = schedule.transport.refused
        if not refused:
            self._refused_files.pop(schedule.supplier_id, None)
            return
        (name, why), *others = sorted(refused.items())
        problem = f"file_refused: {name}: {why}"
        if others:
            problem += f" (and {len(others)} more: see the transport.file_refused log lines)"
        self._tell_once(self._refused_files, schedule.supplier_id, problem, health.noted)

    def _done(self, schedule: Schedule, fetched: Fetched) -> None:
        supplier = schedule.supplier_id
        try:
            schedule.transport.done(fetched)
        except FetchFailed as failure:
            # The inbox holds it: listed again as it is, it is recognised and skipped, and
            # the transport tries the move again. Shown in health, not counted as a
            # failure: the supplier's files are still taken, once each.
            log.warning("connector.mark_done_failed", name=fetched.name, reason=failure.reason)
            problem = f"not_put_aside: {failure.reason}"
            self._tell_once(self._unmoved, supplier, problem, health.noted)
        else:
            self._unmoved.pop(supplier, None)


def _holds_off(state: dict[str, Any]) -> bool:
    """Whether a held-off state puts fetches off: a wait asked for, or a breaker that has
    counted failures or opened."""
    return (
        state.get("not_before") is not None
        or bool(state.get("failures"))
        or state.get("opened_at") is not None
    )


def _deferral(retry_after: float | None, wait: float) -> str:
    """What a failure's Retry-After did to the next fetch, for feed health's last error."""
    if retry_after is None:
        return ""
    at = datetime.now(UTC) + timedelta(seconds=wait)
    said = f": Retry-After {retry_after:g} s, next fetch at {at:%Y-%m-%dT%H:%M:%SZ}"
    if retry_after > LONGEST_RETRY_AFTER_SECONDS:
        said += f" (capped at {LONGEST_RETRY_AFTER_SECONDS:g} s)"
    return said


def arrival_id(fetched: Fetched, now: datetime) -> str:
    """The inbox's delivery id of one arrival of a fetched delivery.

    A file is named by its content, its name and its modification time as listed: the
    same file listed again (its move failed, or the process stopped before it) is
    recognised by the inbox and skipped, while the same content dropped again later (a
    new modification time) is news that the stock still stands, its undated rows observed
    now. A poll page, or a file whose server lists no modification time, is named by its
    content and when it came: each fetch of it is an arrival."""
    if fetched.modified is not None:
        try:
            listed = datetime.fromtimestamp(fetched.modified, UTC)
        except (OverflowError, OSError, ValueError):  # a server's nonsense time
            pass
        else:
            name = hashlib.sha256((fetched.name or "").encode()).hexdigest()[:8]
            return f"{fetched.delivery_id}@{listed:%Y%m%dT%H%M%S.%f}~{name}"
    return f"{fetched.delivery_id}@{now:%Y%m%dT%H%M%S.%f}"
