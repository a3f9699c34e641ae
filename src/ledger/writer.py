"""The ledger writer: the only code that saves to the event store.

Handlers run on the writer's own thread, one command at a time, and each command's
changes go into one atomic save. A version conflict (another process wrote the
same stream first) reloads and re-runs the command. Callers on other threads get
their command's own outcome through a future; the queue in between is the seam
where commands can later be coalesced into shared saves.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from eventsourcing.persistence import IntegrityError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from ledger.application import InventoryLedger
from ledger.commands import Command
from ledger.errors import ContentionTooHigh
from ledger.handlers import handler_for
from ledger.uow import UnitOfWork

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What a command returned, and the log position of what it wrote (None: nothing)."""

    value: T
    position: int | None


@dataclass
class _Job:
    command: Command
    future: Future[Outcome[Any]]


class WriterStopped(RuntimeError):
    pass


class LedgerWriter:
    def __init__(
        self, app: InventoryLedger, *, max_attempts: int = 20, timeout: float | None = 30.0
    ) -> None:
        self.app = app
        self.max_attempts = max_attempts
        self.timeout = timeout
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

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

    # Commands ---------------------------------------------------------------

    def execute(self, command: Command) -> Outcome[Any]:
        """Runs the command on the writer thread and returns its outcome, or raises its error.

        A command still queued when the caller gives up is dropped, never applied late.
        """
        future = self.submit(command)
        try:
            return future.result(self.timeout)
        except TimeoutError:
            future.cancel()
            raise

    def submit(self, command: Command) -> Future[Outcome[Any]]:
        if self._stopping.is_set() or not self.alive:
            raise WriterStopped("the ledger writer is not running")
        future: Future[Outcome[Any]] = Future()
        self._jobs.put(_Job(command, future))
        return future

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(self.apply(job.command))
                except BaseException as error:  # the caller decides what an error means
                    job.future.set_exception(error)
        self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.future.set_exception(WriterStopped("the ledger writer stopped"))

    def apply(self, command: Command) -> Outcome[Any]:
        """Runs one command to completion on the calling thread."""
        handler = handler_for(command)
        retrying = Retrying(
            retry=retry_if_exception_type(IntegrityError),
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_random_exponential(multiplier=0.001, max=0.05),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    unit = UnitOfWork(self.app.repository.get, self.app.get_many)
                    value = handler(unit, command)
                    changed = unit.changed()
                    if not changed:
                        return Outcome(value, None)
                    recordings = self.app.save(*changed)
                    position = max(r.notification.id for r in recordings)
                    return Outcome(value, position)
        except IntegrityError as conflict:
            raise ContentionTooHigh(
                f"gave up after {self.max_attempts} optimistic-concurrency conflicts"
            ) from conflict
        raise AssertionError("unreachable")  # pragma: no cover
