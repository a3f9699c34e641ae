"""Sending a delivery's changes to the ledger, in parts the writer applies one at a time."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from connectors.outcome import FIRST_KEPT, IngestResult
from ledger.base import Cause
from ledger.commands import BULK_FROM, Observation, ReportStock
from ledger.delivery import DeliveryOutcome, Rejection
from ledger.handlers.reports import read_ahead
from ledger.writer import LedgerWriter, Outcome, after_the_wait

log = structlog.get_logger(__name__)

# Rejections recorded on the delivery's event; all of them go to the dead letters.
MAX_REJECTIONS_IN_EVENT = FIRST_KEPT

# How long a delivery waits for the ledger to apply one part. Not the writer's own
# 30 s, meant for a request: on a cold cache, loading the stock items of a part of 5,000
# changes from disk took longer than that here (the delivery failed half applied, to be
# retried), after the OS had dropped the event table's pages.
PART_TIMEOUT = 600.0

# With a time per part (LEDGER_CONNECTOR_PART_SECONDS), a delivery's first part holds
# this many changes, and no part fewer than MIN_PART (unless the delivery has fewer): so
# every part is bulk, decided by the writer in a batch of its own.
FIRST_PART = 500
MIN_PART = BULK_FROM


class PartSender:
    """Sends changes to the ledger's writer in parts of at most `batch_size`, sized by
    time when `part_seconds` is set (see `send`)."""

    def __init__(
        self,
        writer: LedgerWriter,
        batch_size: int,
        part_seconds: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.writer = writer
        self.batch_size = batch_size
        self.part_seconds = part_seconds
        self.clock = clock

    def send(
        self,
        supplier_id: str,
        delivery_id: str,
        source: str,
        observations: Iterable[Observation],
        *,
        result: IngestResult,
        actor: str,
        now: datetime,
        heartbeat: Callable[[], None] | None = None,
        refusals: bool = True,
    ) -> None:
        """Sends the changes to the ledger in parts, taking them from `observations` as
        each part is made (a SKU's records, adjacent there, in one part); the first part
        carries the refusals (unless `refusals` is false: they went with an earlier part).

        The writer applies one command at a time, so every reservation waits while it
        applies a part: with `part_seconds` set, while other commands are waiting each
        part is sized to take about that long at the rate the one before it was applied,
        and grows while none are (see `next_size`); with 0, each holds `batch_size`.

        While the writer applies a part, the next is made, and what the writer will load
        for it read ahead (`read_ahead`): its stock items and their levels' last reports,
        on this thread and another connection, so that the writer goes from one part to
        the next without waiting for them. The part made meanwhile has the size the one
        before it was given; the size of the part after it follows from the one applied."""
        size = min(self.batch_size, FIRST_PART) if self.part_seconds else self.batch_size
        parts = _Parts(iter(observations))
        first = refusals
        applying: _Applying | None = None
        while True:
            command = None
            try:
                batch = parts.take(size)
                if batch or first:
                    command = self._command(
                        supplier_id,
                        delivery_id,
                        source,
                        batch,
                        first=first,
                        result=result,
                        actor=actor,
                        now=now,
                        ahead=applying is not None,
                    )
                    first = False
            finally:
                if applying is not None:  # never left applying once this one has stopped
                    seconds, contended = self._settle(applying, result, heartbeat)
                    # At the rate of the part just applied, from the size of the last made.
                    at_rate = seconds * size / max(applying.size, 1)
                    size = self.next_size(size, at_rate, contended)
            if command is None:
                return
            decided = self.writer.commands
            applying = _Applying(self.writer.submit(command), len(batch), command.rejected, decided)

    def next_size(self, size: int, seconds: float, contended: bool) -> int:
        """The size of the part after one of `size` changes that took the writer `seconds`.
        While other commands wait on the writer (`contended`), as many as it applies in
        `part_seconds` at that rate; while none do, larger. At most twice as many as
        before, at least MIN_PART, at most `batch_size`."""
        if not self.part_seconds:
            return self.batch_size
        fitting = round(size * self.part_seconds / max(seconds, 1e-3)) if contended else 2 * size
        return max(min(MIN_PART, self.batch_size), min(fitting, 2 * size, self.batch_size))

    def _command(
        self,
        supplier_id: str,
        delivery_id: str,
        source: str,
        batch: list[Observation],
        *,
        first: bool,
        result: IngestResult,
        actor: str,
        now: datetime,
        ahead: bool,
    ) -> ReportStock:
        """One part, as one command (the first carries the refusals); a bulk part made
        while the writer applies another (`ahead`) carries what it will load, read now."""
        rejections = result.rejections.first(MAX_REJECTIONS_IN_EVENT) if first else []
        # A part is named by what it carries: applying the delivery again (after a
        # crash or a timeout) sends only what is still unapplied, under new names,
        # while an identical part is recognised and changes nothing.
        digest = _part_hash(batch, rejections)
        command = ReportStock(
            # When the part is made, not when the delivery began: a delivery applies for
            # seconds, and the orders decided meanwhile must not seem to come after it.
            at=max(now, self.clock()),
            cause=Cause(actor, f"supplier.feed.{source}", delivery_id),
            supplier_id=supplier_id,
            delivery_id=part_name(delivery_id, digest),
            content_hash=digest,
            source=source,
            rows=len(batch) + len(rejections),
            observations=batch,
            rejected=rejections,
        )
        if ahead and command.bulk:
            try:
                command = replace(command, ahead=read_ahead(self.writer.app, command))
            except Exception:  # only a head start: the writer then reads it itself
                log.warning("ingest.read_ahead_failed", exc_info=True)
        return command

    def _settle(
        self,
        applying: _Applying,
        result: IngestResult,
        heartbeat: Callable[[], None] | None,
    ) -> tuple[float, bool]:
        """Waits for a part's outcome and counts it; returns how long the writer took over
        it, and whether other commands were decided meanwhile (others are waiting on the
        writer). A part still queued when the wait gives up is dropped, never applied late."""
        try:
            outcome = applying.future.result(PART_TIMEOUT)
        except TimeoutError as waited:
            outcome = after_the_wait(applying.future, waited)
        if heartbeat is not None:
            heartbeat()
        counted: DeliveryOutcome = outcome.value
        result.applied += counted.applied
        result.unchanged += counted.unchanged
        result.late += counted.late
        new = {r.index for r in counted.rejected} - {r.index for r in applying.rejections}
        result.by_ledger.extend(r for r in counted.rejected if r.index in new)
        if outcome.position is not None:
            result.position = max(result.position or 0, outcome.position)
        contended = self.writer.commands - applying.decided > 1
        return outcome.seconds, contended


@dataclass(frozen=True)
class _Applying:
    """A part the writer was given: its outcome to come, its size, the refusals it
    carried, and how many commands the writer had decided when it was given."""

    future: Future[Outcome[Any]]
    size: int
    rejections: list[Rejection]
    decided: int


class _Parts:
    """Parts of about a size from changes in the writer's order: a part ends where it has
    the size and the next change is another SKU's, so a SKU's records stay in one part.
    The ledger compares them (two that disagree at the same time are both refused), which
    it cannot across parts."""

    def __init__(self, changes: Iterator[Observation]) -> None:
        self.changes = changes
        self.next: Observation | None = None  # read, and the next part's first

    def take(self, size: int) -> list[Observation]:
        batch = [] if self.next is None else [self.next]
        self.next = None
        for change in self.changes:
            if len(batch) >= size and change.sku != batch[-1].sku:
                self.next = change
                break
            batch.append(change)
        return batch


def part_name(delivery_id: str, digest: str) -> str:
    """A part's name: its delivery's id, `~` and 16 hex digits of what it carries. Its
    events and the record of it carry it as their delivery id."""
    return f"{delivery_id}~{digest[:16]}"


_PART_SUFFIX = re.compile(r"~[0-9a-f]{16}\Z")


def delivery_of(name: str) -> tuple[str, str | None]:
    """The delivery a part's name names, and that name; a name that is no part's (a
    report sent to the API names its delivery itself), with None."""
    found = _PART_SUFFIX.search(name)
    return (name, None) if found is None else (name[: found.start()], name)


def _part_hash(batch: Iterable[Observation], rejections: list[Rejection]) -> str:
    digest = hashlib.sha256()
    for observation in batch:
        line = (
            f"{observation.index}|{observation.sku}|{observation.quantity}|"
            f"{observation.observed_at.isoformat()}"
        )
        if observation.incoming is not None:  # parts without it keep the names they had
            line += f"|{observation.incoming}"
        digest.update(f"{line}\n".encode())
    digest.update(json.dumps([r.as_dict() for r in rejections], default=str).encode())
    return digest.hexdigest()
