"""A circuit breaker per supplier: stop fetching from one that keeps failing, probe it later.

Closed, it lets every fetch through and counts the failed ones in a row; after
`failures_to_open` of them it opens. Open, no fetch is attempted for `cooldown_seconds`;
then it is half open and lets one fetch through as a probe: a success closes it, a
failure opens it for another cooldown. It counts whole fetches (each already retried by
the retry policy), reads time only from the injected `clock`, and does no I/O. One
breaker serves one supplier, from one thread at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable
from typing import Literal, TypeVar

from connectors.transports.retry import FetchFailed

T = TypeVar("T")

BreakerState = Literal["closed", "open", "half_open"]


class CircuitOpen(FetchFailed):
    """The breaker is open: the fetch was not attempted; a probe is allowed in `retry_after`."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("circuit_open", retriable=True, retry_after=retry_after)


class CircuitBreaker:
    """The breaker of one supplier's fetches; `state` is what feed health reports."""

    def __init__(
        self,
        failures_to_open: int = 5,
        cooldown_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures_to_open < 1:
            raise ValueError("failures_to_open must be at least 1")
        self.failures_to_open = failures_to_open
        self.cooldown_seconds = cooldown_seconds
        self.clock = clock
        self.failures = 0  # failed fetches in a row
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._probing or self.retry_in() == 0:
            return "half_open"
        return "open"

    def retry_in(self) -> float:
        """Seconds until a probe may be made (0 when closed or half open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_seconds - self.clock())

    def allow(self) -> bool:
        """Whether a fetch may start now; in half open, only the first caller probes."""
        state = self.state
        if state == "half_open":
            if self._probing:
                return False
            self._probing = True
        return state != "open"

    def opened_seconds_ago(self) -> float | None:
        """How long ago the breaker last opened; None while closed."""
        return None if self._opened_at is None else self.clock() - self._opened_at

    def restore(self, failures: int, opened_seconds_ago: float | None) -> None:
        """Takes up where another breaker of the same supplier left off (another process's,
        or this one's before a schedule was made anew): its failures in a row, and when
        it opened."""
        self.failures = failures
        self._opened_at = None if opened_seconds_ago is None else self.clock() - opened_seconds_ago
        self._probing = False

    def succeeded(self) -> None:
        self.failures = 0
        self._opened_at = None
        self._probing = False

    def failed(self) -> None:
        self.failures += 1
        if self._probing or self.failures >= self.failures_to_open:
            self._opened_at = self.clock()
        self._probing = False

    def abandoned(self) -> None:
        """A fetch let through ended neither well nor badly (its caller stopped reading):
        it counts for nothing, and a probe may be made again."""
        self._probing = False

    def guard(self, fetch: Callable[[], Iterable[T]]) -> Generator[T, None, None]:
        """The items of `fetch()`, counted as one fetch; raises CircuitOpen, without
        calling `fetch`, while the breaker is open."""
        if not self.allow():
            raise CircuitOpen(self.retry_in())
        try:
            yield from fetch()
        except GeneratorExit:
            self.abandoned()
            raise
        except Exception:
            self.failed()
            raise
        self.succeeded()
