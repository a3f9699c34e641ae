"""The ledger writer: the only code that saves to the event store, a batch at a time.

Callers on any thread submit commands and wait for their own outcome. The writer's
thread takes whatever gathered while its previous save ran (group commit): it loads
every aggregate the batch names in one round trip, runs the handlers in arrival order
on one unit of work (so commands on the same SKU see each other), and saves all their
changes in one transaction (with no round trip to load while no other process writes:
see ledger.hot). Each command gets its own outcome: one the domain refuses changes
nothing and is answered alone. A version conflict (another process wrote one
of the streams first) runs the batch again on fresh state, a bounded number of times;
optimistic concurrency on the streams is what makes overselling impossible across
processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from ledger.application import InventoryLedger
from ledger.commands import Command
from ledger.errors import ContentionTooHigh, LedgerError, Unstorable
from ledger.handlers import handler_for
from ledger.hot import HotAggregates, NotAsKept
from ledger.stock import StockItem
from ledger.uow import ReadAhead, UnitOfWork

T = TypeVar("T")

log = logging.getLogger(__name__)

# A batch naming more shared streams than this races for them instead of queueing.
MAX_TURNS = 64
# After another process wrote a stream this writer was about to, batches naming that stream
# take turns on it for this long; streams nobody collided on lately skip the round trips
# that turns cost.
TURNS_AFTER_CONFLICT_SECONDS = 10.0
# A batch that collided this many times in a row (turns are taken only by writers that
# collided themselves: one that keeps winning never queues) decides and saves holding the
# event table's lock, which every save takes: nothing can collide with it then. Held for
# one batch's reads and decisions, it makes every other writer wait that long.
EXCLUSIVE_AFTER = 3
# Under load (the last batch gathered this many commands or more), a batch that has
# gathered fewer than LINGER_BELOW when the queue runs dry waits once, up to the writer's
# `linger` seconds, for more: a save of 24 costs about what a save of 12 does, and with
# two API workers sharing two cores each writer's batches held 13-16 commands (measured:
# six alternating pairs across 10,000 SKUs, 2,813 against 2,549 reservations/s, five of
# six pairs ahead). Load is a batch of LINGER_AFTER or more, followed by the next command
# within LOADED_GAP of its end: a lone command, one after a small batch, or the first
# after a pause never waits.
LINGER_AFTER = 8
LINGER_BELOW = 24
LOADED_GAP = 0.01


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What a command returned; the log position its answer describes (None: no position
    of its batch does), which a command that wrote nothing also gets when it read what
    its batch wrote; how long the writer spent on the batch that decided it (a caller
    sending large commands sizes the next one by it); and whether it wrote events itself
    (a replay, say, does not)."""

    value: T
    position: int | None
    seconds: float = 0.0
    wrote: bool = False


@dataclass(eq=False)
class _Job:
    command: Command
    future: Future[Outcome[Any]]
    # A coroutine's command: where its outcome goes once its batch is answered.
    settler: _Settler | None = None
    waiter: asyncio.Future[Outcome[Any]] | None = None


class WriterStopped(RuntimeError):
    pass


class OutcomeUnknown(TimeoutError):
    """The caller stopped waiting for a command the writer had already taken into a batch:
    it may yet be applied. (One still queued is dropped, and raises TimeoutError.)"""


def after_the_wait(future: Future[Outcome[Any]], waited: TimeoutError) -> Outcome[Any]:
    """What a caller whose wait for `future` ran out (`waited`) is told: TimeoutError for
    a command still queued, now dropped, never applied late; the outcome of one decided
    just now; OutcomeUnknown for one the writer has taken into a batch, which runs on."""
    if future.cancel():
        raise waited
    if future.done():
        return future.result()
    raise OutcomeUnknown("the command may yet be applied") from waited


class _Settler:
    """Hands the outcomes of coroutines' commands to them on their event loop: the
    writer delivers a batch's outcomes together, once the batch is answered, in one
    call on the loop (`asyncio.wrap_future` would wake the loop once per command)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[_Job] = []

    def deliver(self, jobs: list[_Job]) -> None:
        """The jobs' futures are done (called on the writer's thread)."""
        with self._lock:
            first = not self._ready
            self._ready.extend(jobs)
        if first:
            # A loop closed meanwhile has nobody left to answer.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for job in ready:  # each alone: one that cannot be settled leaves the rest be
            try:
                _answer(job)
            except Exception as error:
                log.exception("writer.settle_failed")
                if job.waiter is not None and not job.waiter.done():
                    job.waiter.set_exception(RuntimeError(f"no outcome: {error!r}"))


def _answer(job: _Job) -> None:
    """Gives a coroutine's waiter its command's outcome."""
    waiter, future = job.waiter, job.future
    if waiter is None or waiter.done():  # its caller gave up
        return
    if future.cancelled():
        waiter.cancel()
        return
    error = future.exception(0)
    if isinstance(error, StopIteration):  # a future refuses one (Python 3.12 wraps it too)
        error = RuntimeError(f"a command raised {error!r}")
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(future.result(0))


def _wake(jobs: list[_Job]) -> None:
    """Delivers the answered jobs of coroutines, one call per event loop; a failure is
    logged, and never stops the writer over a caller's loop."""
    settlers: dict[_Settler, list[_Job]] = {}
    for job in jobs:
        if job.settler is not None:
            settlers.setdefault(job.settler, []).append(job)
    for settler, answered in settlers.items():
        try:
            settler.deliver(answered)
        except Exception:
            log.exception("writer.wake_failed")


class WriterMetrics(Protocol):
    """Where a writer counts what it does (api.metrics exports them to Prometheus)."""

    def batch(self, outcomes: Counter[tuple[str, str]], seconds: float) -> None:
        """A batch answered: how many commands of each kind had each outcome ("ok", or
        the refusal's code), and how long it took from gathered to answered."""

    def conflict(self) -> None:
        """A save collided with another process's."""

    def exclusive(self) -> None:
        """A batch saved holding the event table's lock (EXCLUSIVE_AFTER)."""

    def kept_try(self, outcome: str) -> None:
        """A batch decided on what the writer kept, without asking the store (see
        ledger.hot): "saved", or decided again ("not_as_kept", "nothing_to_save",
        "collided")."""


def outcome_of(future: Future[Any]) -> str:
    """How a command ended, as a label: "ok", the code of the ledger's refusal, "cancelled"
    (its caller gave up before it ran) or "error"."""
    if future.cancelled():
        return "cancelled"
    error = future.exception(0)
    if error is None:
        return "ok"
    return error.code if isinstance(error, LedgerError) else "error"


class LedgerWriter:
    def __init__(
        self,
        app: InventoryLedger,
        *,
        max_attempts: int = 20,
        timeout: float | None = 30.0,
        max_batch: int = 500,
        take_turns: Callable[[list[UUID]], AbstractContextManager[None]] | None = None,
        keep: int = 10_000,
        metrics: WriterMetrics | None = None,
        linger: float = 0.0,
    ) -> None:
        self.app = app
        self.linger = linger
        self._last_batch = 0  # how many commands the last batch gathered
        self._last_ended = -math.inf  # and when it was answered (time.monotonic)
        self._batch_started: float | None = None  # the batch under way, if any
        self.loaded_gap = LOADED_GAP
        self.metrics = metrics
        self.hot = HotAggregates(app, keep)
        self.take_turns = take_turns
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.batches = 0
        self.commands = 0
        self.conflicts = 0
        self.exclusive = 0  # tries to save holding the event table's lock (EXCLUSIVE_AFTER)
        # The shared streams other processes collided on lately, and until when.
        self._contended: dict[UUID, float] = {}
        self._settlers: dict[asyncio.AbstractEventLoop, _Settler] = {}
        self._settlers_lock = threading.Lock()

    # Lifecycle ---------------------------------------------------------------

    def start(self) -> LedgerWriter:
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy_seconds(self) -> float:
        """How long the writer has been on the batch it is on; 0.0 between batches. A
        writer whose thread lives but never finishes its batch (a save that never comes
        back) answers no one: readiness says so (`/readyz`)."""
        started = self._batch_started
        return 0.0 if started is None else time.monotonic() - started

    # Commands ---------------------------------------------------------------

    def execute(self, command: Command, *, timeout: float | None = None) -> Outcome[Any]:
        """Runs the command on the writer thread and returns its outcome, or raises its error.

        The caller waits `timeout` seconds if given, else the writer's own. A command still
        queued when the caller gives up is dropped, never applied late (TimeoutError); one
        already taken into a batch runs on, and may be applied (OutcomeUnknown).
        """
        future = self.submit(command)
        try:
            return future.result(self.timeout if timeout is None else timeout)
        except TimeoutError as waited:
            return after_the_wait(future, waited)

    async def execute_async(self, command: Command) -> Outcome[Any]:
        """`execute` for a coroutine: waits for the outcome without holding a thread.

        The outcomes of a batch reach the event loop together, in one wake-up
        (`_Settler`), where `asyncio.wrap_future` would wake it once per command."""
        loop = asyncio.get_running_loop()
        settler = self._settlers.get(loop)
        if settler is None:
            settler = self._settler_for(loop)
        waiter: asyncio.Future[Outcome[Any]] = loop.create_future()
        future = self._submit(_Job(command, Future(), settler, waiter))
        try:
            async with asyncio.timeout(self.timeout):
                return await waiter
        except TimeoutError as waited:
            return after_the_wait(future, waited)
        except asyncio.CancelledError:
            future.cancel()  # dropped if still queued, as `execute` does
            raise

    def _settler_for(self, loop: asyncio.AbstractEventLoop) -> _Settler:
        with self._settlers_lock:
            # Loops closed since (a test's, a portal's) are forgotten.
            settlers = {known: s for known, s in self._settlers.items() if not known.is_closed()}
            settler = settlers.setdefault(loop, _Settler(loop))
            self._settlers = settlers
            return settler

    def submit(self, command: Command) -> Future[Outcome[Any]]:
        return self._submit(_Job(command, Future()))

    def _submit(self, job: _Job) -> Future[Outcome[Any]]:
        if self._stopping.is_set() or not self.alive:
            raise WriterStopped("the ledger writer is not running")
        self._jobs.put(job)
        return job.future

    def apply(self, command: Command) -> Outcome[Any]:
        """Runs one command to completion on the calling thread (no other thread may write)."""
        future: Future[Outcome[Any]] = Future()
        self._run_batch([_Job(command, future)])
        return future.result(0)

    def _run(self) -> None:
        held: _Job | None = None  # a bulk command that ended the last batch's gathering
        while True:
            job = held if held is not None else self._jobs.get()
            held = None
            if job is None:
                break
            batch = [job]
            # How long this batch may wait for more, once, when the queue runs dry.
            linger = self.linger if self._loaded() else 0.0
            # A bulk command (a part of a large delivery) is decided in a batch of its own,
            # in its turn: the commands queued before it do not wait for it, and one that
            # is refused or collides with another process never makes it decided again.
            while not job.command.bulk and len(batch) < self.max_batch:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    if not linger or len(batch) >= LINGER_BELOW:
                        break
                    try:
                        more = self._jobs.get(timeout=linger)
                    except queue.Empty:
                        break
                    linger = 0.0
                if more is None:
                    self._jobs.put(None)  # stop after this batch
                    break
                if more.command.bulk:
                    held = more
                    break
                batch.append(more)
            self._last_batch = len(batch)
            started = self._batch_started = time.monotonic()
            try:
                self._run_batch(batch)
            except BaseException as error:  # never lose a caller: answer everyone left
                for left in batch:
                    if not left.future.done():
                        left.future.set_exception(error)
            finally:
                self._batch_started = None
            _wake(batch)
            self._last_ended = time.monotonic()
            if self.metrics is not None:
                outcomes = Counter(
                    (type(job.command).__name__, outcome_of(job.future)) for job in batch
                )
                self._note("batch", outcomes, time.monotonic() - started)
        self._fail_leftovers()

    def _loaded(self) -> bool:
        """Under load: the last batch was large and this one's first command came soon
        after it was answered."""
        return (
            self._last_batch >= LINGER_AFTER
            and time.monotonic() - self._last_ended < self.loaded_gap
        )

    def _note(self, what: str, *args: Any) -> None:
        """Counts a batch, a conflict or an exclusive save (`WriterMetrics.<what>`), if
        counting; a failure there is logged, and never stops the writer or fails a batch."""
        if self.metrics is not None:
            try:
                getattr(self.metrics, what)(*args)
            except Exception:
                log.exception("writer.metrics_failed")

    def _fail_leftovers(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                # A job its caller gave up on is cancelled already.
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(WriterStopped("the ledger writer stopped"))
                _wake([job])

    # Batches ----------------------------------------------------------------

    def _run_batch(self, jobs: list[_Job]) -> None:
        started = time.monotonic()
        self.hot.begin_batch()
        pending = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        for attempt in range(self.max_attempts):
            if not pending:
                return
            if attempt:
                # Full jitter, so that two writers that collided do not collide again.
                time.sleep(random.uniform(0, min(0.1, 0.002 * 2**attempt)))
                # Every try after the first decides on what the store holds (and so a try
                # holding the table's lock never tries on kept copies).
                self.hot.doubt()
            # Writers in other processes that collided with this one on a stream take turns
            # on it, so that they queue instead of racing (racing writers mostly redo each
            # other's work); optimistic concurrency still guards every stream, contended
            # or not, turns or none.
            streams = self._contended_among(pending)
            turns = (
                self.take_turns(streams)
                if self.take_turns is not None and 0 < len(streams) <= MAX_TURNS
                else nullcontext()
            )
            locked: AbstractContextManager[Any] = nullcontext()
            if attempt >= EXCLUSIVE_AFTER:
                exclusively = getattr(self.app.recorder, "exclusively", None)
                if exclusively is not None:
                    self.exclusive += 1
                    self._note("exclusive")
                    locked = exclusively()
            with turns, locked as exclusive:
                done = self._attempt(pending, started, exclusive)
            if done is None:
                return
            pending = done
        error = ContentionTooHigh(
            f"gave up after {self.max_attempts} optimistic-concurrency conflicts"
        )
        for job in pending:
            job.future.set_exception(error)

    def _attempt(
        self, pending: list[_Job], started: float, locked: Any = None
    ) -> list[_Job] | None:
        """One try at the batch: None when every command was answered, else those left.
        `locked`: a transaction holding the event table's lock (the recorder's
        `exclusively`), for the save to commit."""
        unit = UnitOfWork(
            self.hot.load,
            self.hot.load_many,
            getattr(self.app.recorder, "select_seen", None),
            _read_ahead(pending, self.hot),
        )
        named = [i for job in pending for i in job.command.aggregate_ids()]
        new = _new_streams(pending)
        unasked = self.hot.unasked
        self.hot.guessed.clear()
        unit.preload([*named, *self.hot.related(named)], new)
        answers, spoiled, reads, added = self._decide(unit, pending)
        if spoiled:
            # A command failed after changing aggregates; it keeps its error, the
            # others run again on a unit of work it never touched.
            for job in spoiled:
                job.future.set_exception(spoiled[job])
            return [job for job in pending if job not in spoiled]
        changed = unit.changed()
        touches = unit.touches()
        # Decided, in part, on what the writer kept without asking the store (see
        # ledger.hot): the save checks that no other process saved since the writer's
        # last one, and that the streams taken as new that the batch did not start (a
        # refused order's reservation) do not exist. A batch with nothing to save has
        # nothing to check that with (its commands refused, or changed nothing): its
        # copies, unchanged, go back, and it is decided again on what the store holds.
        kept_try = self.hot.unasked != unasked
        after = self.hot.last_saved if kept_try else None
        bulk = any(job.command.bulk for job in pending)
        if kept_try and not changed:
            self.hot.keep(unit.loaded(), new=not bulk)
            self.hot.doubt()
            self._note("kept_try", "nothing_to_save")
            return self._attempt(pending, started, locked)
        started_ids = {a.id for a in changed}
        # Taken as absent and not started (a refused order's reservation): to be checked.
        absent = [i for i in self.hot.guessed if i not in started_ids] if kept_try else []
        # The version each changed stream was read at (saving hands its events out).
        read_at = {a.id: a.version - len(a.pending_events) for a in changed}
        position = None
        try:
            if changed:
                began = self.hot.clock()
                recordings = self.app.save(
                    *changed,
                    levels=unit.changed_levels(),
                    touches=touches,
                    locked=locked,
                    after=after,
                    absent=absent,
                )
                numbers = [r.notification.id for r in recordings]
                position = max(numbers)
                self.hot.saved(min(numbers), position, began)
            elif touches:
                self.app.recorder.touch_levels(touches)  # type: ignore[attr-defined]
        except NotAsKept:
            # What was kept may have moved: decided again on what the store holds.
            self.hot.doubt(collided=True)
            self._note("kept_try", "not_as_kept")
            return self._attempt(pending, started, locked)
        except IntegrityError:
            if kept_try:
                self._note("kept_try", "collided")
            moved = self._moved(read_at)
            if kept_try and moved and moved <= set(new):
                # Only streams taken as new exist (an order replayed): the writer's own
                # guess, not another process; decided again on what the store holds.
                self.hot.doubt()
            else:
                # Another process wrote first: decide again on fresh state, taking turns.
                self.hot.doubt(collided=True)
                self.conflicts += 1
                self._note("conflict")
                self._contend(moved or {i for job in pending for i in job.command.shared_ids()})
            involved = self._involved(moved, pending, reads)
            if not involved or len(involved) == len(pending):
                return pending
            # The commands that read none of the streams that moved (nor anything such a
            # command changed) would decide the same again: they commit now, as they
            # decided (or, where that cannot be, decided again), the rest try again.
            clean = [job for job in pending if job not in involved]
            if (
                not kept_try
                and not touches
                and self._save_as_decided(unit, clean, answers, reads, started, locked)
            ):
                return involved
            return involved + (self._attempt(clean, started, locked) or [])
        except Exception:
            # Nothing was saved. A command whose events cannot be written (text no
            # encoding can hold, that its validation let through) is refused alone; the
            # others are decided again. Any other failure (the database's) is everyone's.
            unstorable = self._unstorable(pending, added)
            if not unstorable:
                raise
            for job, reason in unstorable.items():
                log.warning("writer.unstorable: %s refused: %s", type(job.command).__name__, reason)
                job.future.set_exception(
                    Unstorable(f"the command holds a value that cannot be stored: {reason}")
                )
            self.hot.doubt()
            return [job for job in pending if job not in unstorable]
        if kept_try:
            self._note("kept_try", "saved")
        self.hot.keep(unit.loaded(), new=not bulk, saved=started_ids)
        self._answer(pending, answers, reads, position, started)
        return None

    def _save_as_decided(
        self,
        unit: UnitOfWork,
        clean: list[_Job],
        answers: dict[_Job, tuple[Any, BaseException | None]],
        reads: dict[_Job, tuple[set[UUID], set[UUID]]],
        started: float,
        locked: Any,
    ) -> bool:
        """Saves what the commands of a collided save that read nothing that moved changed,
        as they decided it, and answers them; False (nothing saved, nothing answered) where
        that save fails too: they are then decided again.

        They read what the store held (the try was not on kept copies, whose currency
        only the save could check), and none of it moved: deciding them again would load
        the same state and decide the same. Their changes are theirs alone: a stream one
        of the others changed is one they did not read (`_involved`). Noted reports
        (touches) are not told apart by command: a batch with any is decided again."""
        wrote: set[UUID] = set().union(*(reads[job][1] for job in clean))
        read: set[UUID] = set().union(*(reads[job][0] for job in clean))
        changed = [a for a in unit.changed() if a.id in wrote]
        position = None
        if changed:
            levels = [r for r in unit.changed_levels() if StockItem.id_for(r.sku) in wrote]
            try:
                began = self.hot.clock()
                recordings = self.app.save(*changed, levels=levels, touches=[], locked=locked)
            except IntegrityError:
                return False
            numbers = [r.notification.id for r in recordings]
            position = max(numbers)
            self.hot.saved(min(numbers), position, began)
        self.hot.keep([a for a in unit.loaded() if a.id in read], saved=wrote)
        self._answer(clean, answers, reads, position, started)
        return True

    def _answer(
        self,
        jobs: list[_Job],
        answers: dict[_Job, tuple[Any, BaseException | None]],
        reads: dict[_Job, tuple[set[UUID], set[UUID]]],
        position: int | None,
        started: float,
    ) -> None:
        """Gives each command of a saved batch its answer: the batch's position to those
        that wrote events or read what the batch wrote (an order replayed in the batch that
        placed it: its client reads at it), none to the others (an order replayed long
        after, a report that changed nothing), whose answer no position of the batch's
        describes (an auditor's walkthrough saw replays carry other commands' positions)."""
        seconds = time.monotonic() - started
        self.batches += 1
        self.commands += len(jobs)
        written: set[UUID] = set().union(*(reads[job][1] for job in jobs))
        for job in jobs:
            value, error = answers[job]
            if error is not None:
                job.future.set_exception(error)
            else:
                read, wrote = reads[job]
                answered = position if wrote or read & written else None
                job.future.set_result(Outcome(value, answered, seconds, bool(wrote)))

    def _unstorable(self, pending: list[_Job], added: dict[_Job, list[Any]]) -> dict[_Job, str]:
        """The commands whose new events the store cannot be given, and why."""
        unstorable: dict[_Job, str] = {}
        for job in pending:
            for event in added.get(job, ()):
                try:
                    self.app.mapper.to_stored_event(event)
                except Exception as error:
                    unstorable[job] = f"{type(error).__name__}: {error}"
                    break
        return unstorable

    def _contended_among(self, pending: list[_Job]) -> list[UUID]:
        """The shared streams these commands name that other processes collided on lately."""
        if not self._contended:
            return []  # the common case: no need to name the commands' streams
        now = time.monotonic()
        return sorted(
            {
                i
                for job in pending
                for i in job.command.shared_ids()
                if self._contended.get(i, 0.0) > now
            }
        )

    def _contend(self, streams: set[UUID]) -> None:
        """Batches naming these streams take turns on them for a while."""
        now = time.monotonic()
        self._contended = {i: until for i, until in self._contended.items() if until > now}
        self._contended.update(dict.fromkeys(streams, now + TURNS_AFTER_CONFLICT_SECONDS))

    def _moved(self, read_at: dict[UUID, int]) -> set[UUID]:
        """The streams read at these versions that another process wrote since; empty when
        none did (a level moved, see LevelMoved) or the store cannot tell."""
        select_versions = getattr(self.app.recorder, "select_versions", None)
        if select_versions is None or not read_at:
            return set()
        stored = select_versions(list(read_at))
        return {i for i, version in read_at.items() if stored.get(i, 0) != version}

    def _involved(
        self,
        moved: set[UUID],
        pending: list[_Job],
        reads: dict[_Job, tuple[set[UUID], set[UUID]]],
    ) -> list[_Job]:
        """The commands a failed save must decide again: those that read a stream another
        process wrote meanwhile, and those that read what such a command changed. Empty
        when no stream is known to have moved: then all decide again."""
        if not moved:
            return []
        involved: set[_Job] = set()
        tainted = set(moved)
        grew = True
        while grew:
            grew = False
            for job in pending:
                read, wrote = reads[job]
                if job not in involved and read & tainted:
                    involved.add(job)
                    tainted |= wrote
                    grew = True
        return [job for job in pending if job in involved]

    def _decide(
        self, unit: UnitOfWork, jobs: list[_Job]
    ) -> tuple[
        dict[_Job, tuple[Any, BaseException | None]],
        dict[_Job, BaseException],
        dict[_Job, tuple[set[UUID], set[UUID]]],
        dict[_Job, list[Any]],
    ]:
        """Runs each handler in turn; returns each answer, the commands that failed after
        changing something (their changes cannot be taken back), what each read and what
        it changed, and the events each gave."""
        answers: dict[_Job, tuple[Any, BaseException | None]] = {}
        spoiled: dict[_Job, BaseException] = {}
        reads: dict[_Job, tuple[set[UUID], set[UUID]]] = {}
        added: dict[_Job, list[Any]] = {}
        for job in jobs:
            unit.begin()
            try:
                value = handler_for(job.command)(unit, job.command)
            except LedgerError as refused:
                answers[job] = (None, refused)
                if unit.changed_since_begin():
                    spoiled[job] = refused
            except Exception as error:  # a bug: the caller hears of it, the batch goes on
                answers[job] = (None, error)
                if unit.changed_since_begin():
                    spoiled[job] = error
            else:
                # Answers are read on other threads; the aggregates stay the writer's.
                answers[job] = (copy.deepcopy(value), None)
            reads[job] = (unit.read_since_begin(), unit.changed_ids_since_begin())
            added[job] = unit.added_since_begin()
        return answers, spoiled, reads, added


def _read_ahead(jobs: list[_Job], hot: HotAggregates) -> ReadAhead | None:
    """What was read ahead for a command alone in its batch (a bulk one), on its first
    try, less the aggregates the writer keeps: its own copies are current."""
    ahead = jobs[0].command.take_ahead() if len(jobs) == 1 else None
    if ahead is None:
        return None
    aggregates = {i: a for i, a in ahead.aggregates.items() if i not in hot}
    return ReadAhead(aggregates, ahead.seen)


def _new_streams(jobs: list[_Job]) -> list[UUID]:
    """The streams the commands mean to start (`Command.new_ids`) that no other command
    names without meaning to: those may be taken as absent without asking the store."""
    new: set[UUID] = set()
    named: set[UUID] = set()
    for job in jobs:
        meant = job.command.new_ids()
        new.update(meant)
        named.update(i for i in job.command.aggregate_ids() if i not in meant)
    return list(new - named)
