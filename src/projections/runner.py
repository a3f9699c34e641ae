"""Running projections: follow the log a page at a time, one live instance per projection.

Each page of notifications is applied in one transaction together with the new tracking
position, so a runner killed mid-page loses nothing and applies nothing twice. A runner
works only while it holds its projection's lease; the others stand by and take over when
the holder dies. A failing event stops the runner with its position in the log and the
error recorded; the runner retries it after a growing pause.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg
import structlog
from eventsourcing.persistence import PersistenceError

from ledger.application import InventoryLedger
from projections.base import Logged, Projection, ProjectionFailed, StateProjection
from projections.data_version import NewerData, newer_data_version
from projections.leases import LeaseSession, generation_lease
from projections.notifier import LogNotifier
from projections.store import (
    Connection,
    Generation,
    ViewStore,
    advance,
    create_generation,
    drop_generation,
    generation,
    generations,
    live,
    live_generation,
    record_failure,
    switch_live,
)

log = structlog.get_logger(__name__)


# A rebuild commits its rows and position every this many events: fewer, larger writes
# (each busy row is written once per transaction); it holds the changed states meanwhile.
REBUILD_EVENTS_PER_TRANSACTION = 1_000_000
# prctl(2): the signal a process gets when its parent ends.
PR_SET_PDEATHSIG = 1


class LostOwnership(RuntimeError):
    """Another runner moved this generation's position: this one must not write."""


def fetch_page(
    app: InventoryLedger,
    after: int,
    limit: int,
    topics: list[str],
    upto: int | None = None,
    share: tuple[int, int] | None = None,
) -> tuple[Sequence[Logged], int]:
    """The next page of events of these topics (up to `upto`, or the head of the log),
    undecoded (`Projection.stage` decodes them one by one), and how far the log was
    scanned for it. `share` (k, n) keeps the events of the k-th of n shares of streams."""
    bound = upto if upto is not None else app.recorder.max_notification_id() or 0
    if bound <= after:
        return [], after
    select = getattr(app.recorder, "select_notification_rows", None)
    if select is not None:
        rows = select(after + 1, limit, bound, topics, share=share)
        page: Sequence[Any] = list(map(Logged._make, rows))
    elif share is None:  # a recorder of the library's: its notifications have the same fields
        page = app.recorder.select_notifications(
            start=after + 1, limit=limit, stop=bound, topics=topics
        )
    else:
        raise TypeError("this recorder cannot select a share of the streams")
    scanned = page[-1].id if len(page) == limit else bound
    return page, scanned


def catch_up(
    projection: Projection,
    app: InventoryLedger,
    store: ViewStore,
    current: Generation,
    page_size: int,
    keep_going: Callable[[], bool] = lambda: True,
    progress: Callable[[int, int], None] | None = None,
    events_per_transaction: int = 0,
) -> int:
    """Applies pages to a generation until it has seen the whole log; returns events applied.

    Rows and position commit together: one page per transaction for a live view, or as
    many pages as make `events_per_transaction` for a generation being built, which
    writes each busy row once per transaction instead of once per page. A live view stops
    after a page that came short, having seen the log as it stood when the page was read:
    what was written since woke its runner, which lets it gather for a moment (a short
    read after every page cost a quarter of the database's transactions under load).
    """
    position, applied = current.position, 0
    with _Pages(app, projection.topics, page_size) as pages:
        while keep_going():
            start, staged = position, 0
            try:
                with store.transaction() as conn:
                    while True:
                        scanned, count = _stage_next(
                            projection, conn, current.schema, partial(pages.after, position)
                        )
                        if scanned == position:
                            break
                        position, staged = scanned, staged + count
                        if progress is not None:
                            progress(position, count)
                        if staged >= events_per_transaction or not keep_going():
                            break
                    if position == start:
                        return applied
                    # Asked after the page was read, in the transaction that would advance:
                    # newer code migrates before it writes events of a new kind, so a page
                    # holding one is seen with the newer version here, and not written. A
                    # runner reads only the kinds it knows, and passed over the others.
                    newer = newer_data_version(conn)
                    if newer is not None:
                        raise NewerData(newer)
                    projection.write(conn, current.schema, position)
                    if not advance(conn, current.name, current.generation, start, position):
                        raise LostOwnership(f"{current.name} generation {current.generation}")
            except BaseException:
                position = start
                projection.reset()  # what it kept in memory may not match the rows any more
                raise
            applied += staged
            if not events_per_transaction and staged < page_size:
                return applied
    return applied


class _Pages:
    """Reads the log a page at a time; after a full page (more is likely: a rebuild, a
    runner catching up) the next is read on a thread of its own while this one is
    applied, so that the database's part and the projection's overlap."""

    def __init__(self, app: InventoryLedger, topics: list[str], page_size: int) -> None:
        self.app, self.topics, self.page_size = app, topics, page_size
        self._reader: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future[tuple[Sequence[Logged], int]]] | None = None

    def after(self, position: int) -> tuple[Sequence[Logged], int]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == position:
            page, scanned = ahead[1].result()
        else:
            page, scanned = fetch_page(self.app, position, self.page_size, self.topics)
        if len(page) == self.page_size:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="projection-pages")
            future = self._reader.submit(fetch_page, self.app, scanned, self.page_size, self.topics)
            self._ahead = (scanned, future)
        return page, scanned

    def __enter__(self) -> _Pages:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)


def _stage_next(
    projection: Projection,
    conn: Connection,
    schema: str,
    read: Callable[[], tuple[Sequence[Logged], int]],
) -> tuple[int, int]:
    """Reads a page and stages it with the collector paused; returns how far the log was
    scanned and how many events were staged. The page is freed before the pause ends,
    so the collector never sees it."""
    with _collector_paused():
        page, scanned = read()
        if page:
            projection.stage(conn, schema, page)
        count = len(page)
        del page
    return scanned, count


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector while a page is read and applied.

    A page is thousands of short-lived objects that reference counting frees as soon as
    the page is done; with the collector running, each page's objects are walked again
    and again as they age, together with every state held (measured: a fifth of a
    rebuild's time). The pause lasts one page; cycles made meanwhile are collected once
    it ends. Nested or concurrent pauses leave the collector as they found it.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


@dataclass
class RunnerHealth:
    state: str = "starting"  # starting, standby, running, failed, newer_data, stopped
    generation: int | None = None
    error: str | None = None
    failed_position: int | None = None
    restarts: int = field(default=0)


class ProjectionRunner:
    """Keeps one projection's live generation up to date while holding its lease."""

    def __init__(
        self,
        projection: Projection,
        app: InventoryLedger,
        store: ViewStore,
        leases: LeaseSession,
        notifier: LogNotifier | None = None,
        *,
        page_size: int = 1000,
        poll_seconds: float = 1.0,
        settle_seconds: float = 0.02,
        busy_settle_seconds: float = 0.1,
    ) -> None:
        self.projection = projection
        self.app = app
        self.store = store
        self.leases = leases
        self.notifier = notifier
        self.page_size = page_size
        self.poll_seconds = poll_seconds
        self.settle_seconds = settle_seconds
        self.busy_settle_seconds = busy_settle_seconds
        self.health = RunnerHealth()
        self._lease: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.projection.name

    def start(self) -> ProjectionRunner:
        self._thread = threading.Thread(
            target=self._supervise, name=f"projection-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.notifier is not None:
            self.notifier.bump()
        if self._thread is not None:
            self._thread.join(15)
        if self._lease is not None:
            self.leases.release(self._lease, self)
        self.health.state = "stopped"

    def _supervise(self) -> None:
        pause = self.poll_seconds
        seen = self.notifier.count if self.notifier else 0
        while not self._stop.is_set():
            try:
                self.step()
                pause = self.poll_seconds
            except NewerData as newer:
                # Newer code migrated the database while this process ran (an upgrade
                # walkthrough: an old runner skipped the new events it could not read, its
                # view wrong until rebuilt). It stops, its lease left to a newer runner.
                self._newer_data(newer)
                return
            except ProjectionFailed as failure:
                if isinstance(failure.cause, psycopg.OperationalError):
                    # The connection lost as the page was written (the database restarted):
                    # interrupted, as a read would be, not failed by an event.
                    self._interrupted(failure, pause)
                    continue
                # An event of a stream it cannot read (newer code's) fails it before the
                # check of the page it writes: newer data stops it here (a review).
                try:
                    self._stop_on_newer_data()
                except NewerData as newer:
                    self._newer_data(newer)
                    return
                except (psycopg.Error, PersistenceError) as error:
                    # The database gone as well: the thread died here, its view frozen for
                    # good while the process ran on (a test's warning).
                    self._interrupted(error, pause)
                    continue
                self._failed(failure)
                pause = min(60.0, max(pause, 0.5) * 2)
                self._stop.wait(pause)
                continue
            except (LostOwnership, psycopg.Error, PersistenceError) as error:
                self._interrupted(error, pause)
                continue
            except Exception:
                log.exception("projection.crashed", projection=self.name)
                pause = min(60.0, max(pause, 0.5) * 2)
                self._stop.wait(pause)
                continue
            if self.notifier is not None:
                # Writes that came in while the step ran: the log is busy.
                busy = self.notifier.count != seen
                woken = self.notifier.wait(seen, self.poll_seconds)
                if woken != seen:
                    self._stop.wait(self.settle(busy))
                seen = woken
            else:
                self._stop.wait(self.poll_seconds)

    def settle(self, busy: bool) -> float:
        """How long to let writes gather after a wake-up, so that writes arriving together
        share one page, not one each. While the log is busy (writes came in while the
        last step ran), longer: each step has a cost of its own (a transaction, the
        generation and the lease looked up, the position advanced) and each page writes
        a SKU's row once however many of its events it holds. Measured under the
        reservations benchmark's load (64 clients, 10,000 SKUs, 2 API workers): the projections'
        CPU per reservation fell from ~0.46 to ~0.25 ms, and PostgreSQL's from ~0.50 to
        ~0.33 ms, with 0.1 s instead of 0.02 s; the view then trails a busy log by about
        that much more. A quiet log's lone write still shows after `settle_seconds`."""
        return self.busy_settle_seconds if busy else self.settle_seconds

    def step(self) -> int:
        """Catches the live generation up while holding its lease; returns events applied."""
        with self.store.connection() as conn:
            current = live(conn, self.name)
        if current is None:
            raise LookupError(f"projection {self.name} has no live generation: run ledger migrate")
        lease = generation_lease(self.name, current.generation)
        if self._lease not in (None, lease):
            self.leases.release(self._lease, self)  # that generation is no longer live
            self._lease = None
        held = self.leases.holds(lease, self)
        if not self.leases.hold(lease, self):
            self.health.state, self.health.generation = "standby", current.generation
            return 0
        if not held:
            # Taken, or taken back: another holder may have written since this runner
            # last did, so the states and rows it kept in memory are not to be trusted.
            self.projection.reset()
            # And generations nobody builds or follows go (a killed rebuild's; those an
            # older version's runner left half built when rolled back onto newer data,
            # shown as building for good: an upgrade walkthrough), unless a rebuild is
            # under way: its generation is made a moment before it holds its lease.
            guard = _rebuild_guard(self.name)
            if self.leases.hold(guard, self):
                try:
                    _drop_abandoned(self.name, self.store, self.leases)
                finally:
                    self.leases.release(guard, self)
        self._lease = lease
        if current.schema_version > self.projection.schema_version:
            # Built by newer code: this runner's rows would be of an older shape. Newer
            # data stops it (NewerData), its lease let go: standing by here, it held the
            # lease for good, never reaching the check of a page it writes (a review).
            self._stop_on_newer_data()
            log.error(
                "projection.generation_newer_than_code",
                projection=self.name,
                live=current.schema_version,
                code=self.projection.schema_version,
            )
            self.health.state, self.health.generation = "standby", current.generation
            return 0
        if current.schema_version != self.projection.schema_version:
            with self.store.connection() as conn:
                if self.projection.upgrade(conn, current):
                    return 0  # the next step reads it at its new version
            log.warning(
                "projection.schema_changed",
                projection=self.name,
                live=current.schema_version,
                code=self.projection.schema_version,
            )
            try:
                rebuild(
                    self.projection, self.app, self.store, self.leases, page_size=self.page_size
                )
            except RebuildRunning:  # another process rebuilds it: its generation goes live
                self.health.state, self.health.generation = "standby", current.generation
            return 0
        self.health.state, self.health.generation = "running", current.generation
        self.health.error = self.health.failed_position = None
        return catch_up(
            self.projection,
            self.app,
            self.store,
            current,
            self.page_size,
            keep_going=lambda: not self._stop.is_set(),
        )

    def _interrupted(self, error: BaseException, pause: float) -> None:
        """Waits out a step the database or the lease cut short, to be tried again."""
        log.warning("projection.interrupted", projection=self.name, error=str(error))
        self._stop.wait(pause)

    def _stop_on_newer_data(self) -> None:
        """Raises NewerData where newer code migrated the database. Asked where a step
        would not reach the check of a page it writes; not at every step: a runner steps
        at every write, and one more query a step showed in the projections worker's CPU
        a reservation (0.137 against 0.082 ms on one hot SKU with two API workers; 0.091
        without it, in adjacent benchmark runs)."""
        with self.store.connection() as conn:
            newer = newer_data_version(conn)
        if newer is not None:
            raise NewerData(newer)

    def _newer_data(self, why: BaseException) -> None:
        log.error("projection.newer_data", projection=self.name, error=str(why))
        self.health.state, self.health.error = "newer_data", str(why)
        if self._lease is not None:
            self.leases.release(self._lease, self)
            self._lease = None

    def _failed(self, failure: ProjectionFailed) -> None:
        log.error(
            "projection.failed",
            projection=self.name,
            position=failure.position,
            topic=failure.topic,
            error=repr(failure.cause),
        )
        try:
            with self.store.connection() as conn:
                number = live_generation(conn, self.name)
                if number is not None:
                    record_failure(conn, self.name, number, failure.position, repr(failure.cause))
        except psycopg.Error:
            pass
        self.health.error = repr(failure.cause)
        self.health.failed_position = failure.position
        self.health.restarts += 1
        self.health.state = "failed"


class RebuildRunning(RuntimeError):
    """Another process is rebuilding the projection: one rebuild of a projection at a time."""


def rebuild(
    projection: Projection,
    app: InventoryLedger,
    store: ViewStore,
    leases: LeaseSession,
    *,
    in_place: bool = False,
    page_size: int = 10_000,
    progress: Callable[[int, int], None] | None = None,
    processes: int = 1,
) -> Generation:
    """Builds a new generation from position zero and makes it live (see `_rebuild`), one
    rebuild of a projection at a time: a second is refused (`RebuildRunning`). Two used to
    both run, the later to switch dropping the generation the earlier had just made live
    (an operator's walkthrough). First it drops the generations nobody builds or follows:
    one a killed rebuild left half built, or an old one a reader held when it was to go."""
    guard, holder = _rebuild_guard(projection.name), object()
    if not leases.hold(guard, holder):
        raise RebuildRunning(f"a rebuild of {projection.name} is already running")
    try:
        _drop_abandoned(projection.name, store, leases)
        return _rebuild(
            projection,
            app,
            store,
            leases,
            in_place=in_place,
            page_size=page_size,
            progress=progress,
            processes=processes,
        )
    finally:
        leases.release(guard, holder)


def _rebuild_guard(name: str) -> str:
    """The lease a rebuild of the projection holds throughout (one at a time)."""
    return f"projection-rebuild:{name}"


def _drop_abandoned(name: str, store: ViewStore, leases: LeaseSession) -> None:
    """Drops the projection's generations that are not live and whose lease nobody holds
    (a rebuild holds its new generation's, a runner its live one's); the caller holds the
    rebuild guard, so that no rebuild is between making its generation and holding its
    lease. Only beside a live generation: a first one is made live just after it is made
    (`ensure_live_generations`)."""
    with store.connection() as conn:
        live_number = live_generation(conn, name)
        if live_number is None:
            return
        others = [g.generation for g in generations(conn, name) if g.generation != live_number]
    for number in others:
        lease, holder = generation_lease(name, number), object()
        if not leases.hold(lease, holder):
            continue
        try:
            with store.connection() as conn:
                drop_generation(conn, name, number)
            log.warning(
                "projection.abandoned_generation_dropped", projection=name, generation=number
            )
        except psycopg.Error as error:  # a reader holds it: the next rebuild drops it
            log.warning(
                "projection.old_generation_kept",
                projection=name,
                generation=number,
                error=str(error),
            )
        finally:
            leases.release(lease, holder)


def _rebuild(
    projection: Projection,
    app: InventoryLedger,
    store: ViewStore,
    leases: LeaseSession,
    *,
    in_place: bool,
    page_size: int,
    progress: Callable[[int, int], None] | None,
    processes: int,
) -> Generation:
    """Builds a new generation from position zero and makes it live.

    Blue/green (the default): the live generation keeps serving until the new one has
    caught up, then the views switch over in one transaction. In place: the views switch
    to the new, empty generation at once and fill as it is built.

    With `processes` > 1, a blue/green rebuild of a state view first applies the log as
    it stands in that many processes at once, each the events of its share of the
    aggregates (a view's rows are per aggregate, so the shares never touch the same
    row), each in one transaction; the generation's position moves only once all have
    committed, and the rest of the log follows as usual.
    """
    name = projection.name
    with store.connection() as conn:
        built = create_generation(conn, name, projection.schema_version, projection.ddl())
    lease = generation_lease(name, built.generation)
    holder = object()
    if not leases.hold(lease, holder):
        raise LostOwnership(f"cannot hold the new generation {built.generation} of {name}")
    try:
        log.info("projection.rebuild.started", projection=name, generation=built.generation)
        if in_place:
            _switch(store, projection, built)
        elif processes > 1 and isinstance(projection, StateProjection):
            built = _build_in_shares(projection, app, store, built, page_size, processes, progress)
        batch = REBUILD_EVENTS_PER_TRANSACTION
        catch_up(
            projection,
            app,
            store,
            built,
            page_size,
            progress=progress,
            events_per_transaction=batch,
        )
        if not in_place:
            with store.connection() as conn:
                current = generation(conn, name, built.generation)
            assert current is not None
            catch_up(
                projection,
                app,
                store,
                current,
                page_size,
                progress=progress,
                events_per_transaction=batch,
            )
            _switch(store, projection, built)
        with store.connection() as conn:
            final = generation(conn, name, built.generation)
        assert final is not None
        log.info(
            "projection.rebuild.switched",
            projection=name,
            generation=built.generation,
            position=final.position,
        )
        return final
    except BaseException as stopped:
        # Stopped (a failure, Ctrl-C, SIGTERM): its half-built generation is dropped, not
        # left for `projections status` to show as building for good (an operator
        # walkthrough). One made live already (in place) stays, for the runner to go on.
        _drop_unfinished(store, name, built.generation, stopped)
        raise
    finally:
        leases.release(lease, holder)


def _drop_unfinished(store: ViewStore, name: str, number: int, stopped: BaseException) -> None:
    reason = type(stopped).__name__
    try:
        with store.connection() as conn:
            if generation(conn, name, number) is None:  # dropped already (a share failed)
                return
            if live_generation(conn, name) == number:
                log.warning("projection.rebuild.stopped", projection=name, reason=reason)
                return
            drop_generation(conn, name, number)
        log.warning("projection.rebuild.stopped", projection=name, generation=number, reason=reason)
    except Exception as error:  # the database away: the next rebuild drops it
        log.warning(
            "projection.rebuild.stopped",
            projection=name,
            generation=number,
            reason=reason,
            kept=str(error),
        )


_END_SHARE_SESSIONS = """
SELECT pg_terminate_backend(holder.pid, 5000)
FROM (SELECT DISTINCT l.pid FROM pg_locks l
      JOIN pg_class c ON c.oid = l.relation
      JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = %s AND l.pid <> pg_backend_pid()
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
     ) AS holder
"""


def _build_in_shares(
    projection: StateProjection,
    app: InventoryLedger,
    store: ViewStore,
    built: Generation,
    page_size: int,
    processes: int,
    progress: Callable[[int, int], None] | None,
) -> Generation:
    """Applies the log up to its present head to `built` in `processes` processes."""
    bound = app.recorder.max_notification_id() or 0
    env = dict(app.env)
    context = multiprocessing.get_context("spawn")  # no inherited connections or threads
    try:
        with ProcessPoolExecutor(
            processes - 1,
            mp_context=context,
            initializer=end_with_parent,
            initargs=(os.getpid(),),
        ) as others:
            shares = [
                others.submit(
                    _apply_share_alone,
                    env,
                    store.database_url,
                    type(projection),
                    built.schema,
                    (share, processes),
                    bound,
                    page_size,
                )
                for share in range(1, processes)
            ]
            try:
                _apply_share(
                    projection, app, store, built.schema, (0, processes), bound, page_size, progress
                )
                for share in shares:
                    applied = share.result()
                    if progress is not None:
                        progress(bound, applied)
            except BaseException:
                for share in shares:
                    share.cancel()  # those not started yet
                # And those under way, ended now: each applies its share in one transaction,
                # which a rebuild stopped (SIGTERM, Ctrl-C) waited for, past an
                # orchestrator's grace period and its SIGKILL (a review).
                for process in list(others._processes.values()):
                    process.terminate()
                raise
    except BaseException:
        # Nothing of it is live: the half-built generation goes, once no share writes to it.
        # A share's process ended mid-statement leaves its session running the statement,
        # and holding its locks, until it next writes to the gone client: ended too, so
        # that the drop does not wait past its lock timeout and leave the generation (a
        # review). Only a share of this rebuild holds a lock on a generation not live.
        projection.reset()
        with store.connection() as conn:
            conn.execute(_END_SHARE_SESSIONS, (built.schema,))
            drop_generation(conn, projection.name, built.generation)
        raise
    with store.transaction() as conn:
        if not advance(conn, built.name, built.generation, built.position, bound):
            raise LostOwnership(f"{built.name} generation {built.generation}")
        moved = generation(conn, built.name, built.generation)
    assert moved is not None
    return moved


def _apply_share(
    projection: StateProjection,
    app: InventoryLedger,
    store: ViewStore,
    schema: str,
    share: tuple[int, int],
    bound: int,
    page_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Applies one share of the streams' events up to `bound`, in one transaction; the
    generation's position is the caller's to move. Returns the events applied."""
    position = applied = 0
    with store.transaction() as conn:
        while position < bound:
            # A page is a range of the log, read by its index, whatever part of it falls
            # in the share: asked for a share's first N rows, the planner reads it all.
            upto = min(position + page_size, bound)
            scanned, count = _stage_next(
                projection,
                conn,
                schema,
                partial(fetch_page, app, position, page_size, projection.topics, upto, share),
            )
            position, applied = scanned, applied + count
            if progress is not None:
                progress(position, count)
        projection.write(conn, schema, bound)
    return applied


def end_with_parent(parent: int, signum: int = signal.SIGKILL) -> None:
    """This process is sent `signum` when its parent (`parent`) ends: a share's process
    when the rebuild's ends (a rebuild killed with `kill -9` left its share processes
    waiting for work for good: an operator's walkthrough), an HTTP worker when `serve`
    ends (SIGTERM: it shuts down as when `serve` stops it). The parent's pid, not 1: the
    parent may itself be PID 1, in a container."""
    with suppress(OSError, AttributeError):  # Linux's prctl; elsewhere they may outlive it
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # it ended before this one could ask
        os._exit(1)


def _apply_share_alone(
    env: dict[str, str],
    database_url: str,
    projection_class: type[StateProjection],
    schema: str,
    share: tuple[int, int],
    bound: int,
    page_size: int,
) -> int:
    """`_apply_share` in a process of its own, with its own application and connections."""
    app = InventoryLedger(env)
    store = ViewStore(database_url).open()
    try:
        return _apply_share(projection_class(app), app, store, schema, share, bound, page_size)
    finally:
        store.close()
        app.close()


def _switch(store: ViewStore, projection: Projection, built: Generation) -> None:
    with store.connection() as conn:
        old = switch_live(conn, projection.name, built.generation, projection.tables)
        if old is not None and old != built.generation:
            try:
                drop_generation(conn, projection.name, old)
            except psycopg.Error as error:  # a reader held it too long; drop it later
                log.warning(
                    "projection.old_generation_kept",
                    projection=projection.name,
                    generation=old,
                    error=str(error),
                )
