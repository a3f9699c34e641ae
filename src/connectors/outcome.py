"""What became of a delivery: its counts, refusals and phase times, or why it was refused whole."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ledger.delivery import Rejection


@dataclass
class IngestResult:
    """What became of a delivery, summed over the batches it was applied in."""

    delivery_id: str
    rows: int = 0
    applied: int = 0
    unchanged: int = 0
    late: int = 0
    rejections: list[Rejection] = field(default_factory=list)
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
