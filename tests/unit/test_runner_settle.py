"""How long a projection runner lets writes gather after it is woken: briefly when the log
was quiet, longer while writes keep coming (fewer, larger pages); and that its thread lives
through a database that goes away."""

from __future__ import annotations

from typing import Any

import psycopg

from projections.base import ProjectionFailed
from projections.runner import ProjectionRunner

QUIET, BUSY = 0.02, 0.1


class Notifier:
    """LogNotifier's side the runner uses; a wait on a quiet log returns when a write
    comes, which here is at once."""

    def __init__(self) -> None:
        self.count = 0

    def bump(self) -> None:
        self.count += 1

    def wait(self, seen: int, timeout: float) -> int:
        if self.count == seen:
            self.bump()  # the next write, after a while
        return self.count


class Stop:
    """The runner's stop event: records each pause; set after `pauses` of them."""

    def __init__(self, pauses: int) -> None:
        self.pauses: list[float] = []
        self.left = pauses

    def is_set(self) -> bool:
        return self.left <= 0

    def wait(self, seconds: float) -> bool:
        self.pauses.append(seconds)
        self.left -= 1
        return self.is_set()


def runner_writing_during(steps: list[bool]) -> tuple[ProjectionRunner, Stop]:
    """A runner whose k-th step sees writes come in while it runs if `steps[k]`."""
    notifier = Notifier()
    unused: Any = None  # the projection, application, store and leases: not reached
    runner = ProjectionRunner(
        unused,
        unused,
        unused,
        unused,
        notifier,  # type: ignore[arg-type]
        settle_seconds=QUIET,
        busy_settle_seconds=BUSY,
    )
    calls = iter(steps)

    def step() -> int:
        if next(calls):
            notifier.bump()
        return 1

    runner.step = step  # type: ignore[method-assign]
    stop = Stop(len(steps))
    runner._stop = stop  # type: ignore[assignment]
    return runner, stop


def test_writes_that_came_in_during_a_step_make_the_runner_gather_longer() -> None:
    runner, stop = runner_writing_during([True, True, False, True, False])

    runner._supervise()

    assert stop.pauses == [BUSY, BUSY, QUIET, BUSY, QUIET]


def test_a_lone_write_on_a_quiet_log_waits_only_the_short_pause() -> None:
    runner, stop = runner_writing_during([False, False])

    runner._supervise()

    assert stop.pauses == [QUIET, QUIET]


class DownStore:
    """A view store whose database is gone."""

    def connection(self) -> Any:
        raise psycopg.OperationalError("connection refused")


class Named:
    name = "stock"


def test_a_page_that_fails_as_the_database_goes_leaves_the_runner_running() -> None:
    """A page write that lost its connection, then a look at the data version on a database
    still down, raised out of the runner's thread: the thread died, and its view froze for
    good while the process ran on (a test's warning of an unhandled thread exception)."""
    unused: Any = None
    runner = ProjectionRunner(Named(), unused, DownStore(), unused)  # type: ignore[arg-type]
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    failures = iter(
        [
            ProjectionFailed("stock", 4, "page write", lost),
            ProjectionFailed("stock", 5, "stockledger:StockItem.Observed", ValueError("x")),
        ]
    )

    def step() -> int:
        raise next(failures)

    runner.step = step  # type: ignore[method-assign]
    stop = Stop(2)
    runner._stop = stop  # type: ignore[assignment]

    runner._supervise()  # returns once stopped, having raised nothing

    assert len(stop.pauses) == 2
    assert runner.health.state != "failed"
