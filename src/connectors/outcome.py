"""What became of a delivery: its counts, refusals and phase times, or why it was refused whole."""

from __future__ import annotations

import heapq
import pickle
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ledger.delivery import Rejection, kept_cheaply

# Refusals kept in memory as objects, the first by position (a delivery's event carries
# as many, see connectors.parts), and the bytes of the others held in memory before they
# go to a file.
FIRST_KEPT = 1000
SPOOL_BYTES = 16 << 20
READ_PAGE = 1000


class Rejections:
    """A delivery's refused records, in the order refused: every one kept, pickled, in a
    spool (in memory up to SPOOL_BYTES, then in a temporary file), and the first
    FIRST_KEPT by position also as objects. A delivery of 1,000,000 records that nobody
    mapped held 1.3 GB of them as objects, and its letters took 27 s to write one by one
    (`/tmp` script); now they pass through the spool and, by COPY, to the dead letters.
    One thread adds to it at a time."""

    def __init__(self, first_kept: int = FIRST_KEPT) -> None:
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - kept open, as long as the delivery's result
        self._count = 0
        self._first_kept = first_kept
        # The first FIRST_KEPT by position, the last of them on top: a heap of
        # (-position, -order refused, refusal).
        self._first: list[tuple[int, int, Rejection]] = []

    def append(self, rejection: Rejection) -> None:
        # As a tuple: a dataclass took twice as long to read back; the record as a letter
        # keeps it (one nested too deeply would not pickle).
        written = (rejection.index, rejection.reason, kept_cheaply(rejection.record))
        pickle.dump(written, self._spool, pickle.HIGHEST_PROTOCOL)
        entry = (-rejection.index, -self._count, rejection)
        self._count += 1
        if len(self._first) < self._first_kept:
            heapq.heappush(self._first, entry)
        elif self._first and entry > self._first[0]:
            heapq.heapreplace(self._first, entry)

    def extend(self, rejections: Iterable[Rejection]) -> None:
        for rejection in rejections:
            self.append(rejection)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Rejection]:
        """Every refusal, in the order refused (those added meanwhile too), read a page at
        a time: with a seek a refusal, reading 1,000,000 took 7.1 s; a page at a time,
        3.6 s, most of it unpickling."""
        read, at = 0, 0
        while read < self._count:
            self._spool.seek(at)
            # One unpickler each: an unpickler's memo outlives a load, and the next pickle
            # (written with its own) would take the last one's objects for its own.
            page = [
                Rejection(*pickle.load(self._spool))  # noqa: S301 - our own spool
                for _ in range(min(READ_PAGE, self._count - read))
            ]
            at = self._spool.tell()
            self._spool.seek(0, 2)
            read += len(page)
            yield from page

    def first(self, count: int) -> list[Rejection]:
        """The first `count` (at most the `first_kept` it keeps) by position, the first
        refused first among those of one position."""
        if count > self._first_kept:
            raise ValueError(f"only the first {self._first_kept} are kept")
        return [rejection for _, _, rejection in sorted(self._first, reverse=True)][:count]


@dataclass
class IngestResult:
    """What became of a delivery, summed over the batches it was applied in."""

    delivery_id: str
    rows: int = 0
    applied: int = 0
    unchanged: int = 0
    late: int = 0
    rejections: Rejections = field(default_factory=Rejections)
    # The ledger's own refusals (records of a SKU at one time that disagree), as it sent
    # them back, until what the supplier wrote is put in them (see connectors.ingest);
    # spooled too: a file could be all such records.
    by_ledger: Rejections = field(default_factory=lambda: Rejections(first_kept=0))
    position: int | None = None
    lag_seconds: float | None = None
    # How the delivery was read: "copy" (PostgreSQL's COPY, see connectors.copy_csv) or
    # "python" (record by record).
    read_by: str = "python"
    # How many connections read and compared it at once (see connectors.ingest).
    shares: int = 1
    # Where the time went, by phase: "read" (parse, judge, stage), "compare" (with the
    # levels on record), "apply" (the ledger applying the changes) and "notes" (noting the
    # repeats as seen, beside "apply", so not part of the sum).
    seconds: dict[str, float] = field(default_factory=dict)

    def keep_ledger_refusals(self) -> None:
        """Counts the ledger's refusals among the delivery's, as they now stand."""
        self.rejections.extend(self.by_ledger)
        self.by_ledger = Rejections(first_kept=0)

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id,
            "rows": self.rows,
            "applied": self.applied,
            "unchanged": self.unchanged,
            "late": self.late,
            "rejected": self.rejected,
            "position": self.position,
            "seconds": {phase: round(took, 3) for phase, took in self.seconds.items()},
        }


class FeedRejected(Exception):
    """The delivery is structurally broken; nothing of it was applied."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe_phases(seconds: Mapping[str, float]) -> str:
    """A delivery's phase times (`IngestResult.seconds`), as a person reads them."""
    shown = [
        f"{phase} {seconds[phase]:.1f} s"
        for phase in ("read", "compare", "apply")
        if phase in seconds
    ]
    if "notes" in seconds:
        shown.append(f"notes {seconds['notes']:.1f} s beside apply")
    if "letters" in seconds:
        shown.append(f"letters {seconds['letters']:.1f} s")
    return ", ".join(shown)


@contextmanager
def timed(result: IngestResult, phase: str) -> Iterator[None]:
    """Adds the time the block takes to the delivery's `phase`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - started
        result.seconds[phase] = result.seconds.get(phase, 0.0) + took
