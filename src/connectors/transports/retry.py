"""One retry policy for every transport, and the failures it tells apart.

A failure is a `FetchFailed` whose `retriable` flag is the whole decision: retriable
failures (HTTP 429 and 5xx, timeouts, lost connections) are tried again within the fetch
with exponential backoff and jitter, waiting `Retry-After` instead when the server gave
one; fatal ones (any other 4xx, a refused login, a malformed page) end the fetch at once.
Transports turn their own errors into FetchFailed with a table of `Failure` rows, so what
is retried is data, not control flow.

Every transport's settings accept these options (`RetrySettings`). Their numbers, as all
numbers of a transport's settings, are JSON numbers (no strings, no true or false, whole
where a count), finite, and within bounds (these seconds at most 3600):

- `timeout_seconds` (default 30): one request, connection or file operation.
- `max_attempts` (default 4, at most 20): attempts of one request or operation, the
  first included.
- `backoff_seconds` (default 1): the first wait; it doubles each time, plus a random
  jitter of up to `backoff_seconds`.
- `max_backoff_seconds` (default 30): the longest backoff between two attempts, jitter
  and all (a `Retry-After` may ask for longer; one shorter than the backoff, `0` say,
  waits the backoff).
- `max_retry_after_seconds` (default 120): the longest `Retry-After` waited within a
  fetch; a longer one ends the fetch with a retriable FetchFailed carrying `retry_after`,
  for the scheduler to honour (up to `LONGEST_WAIT_SECONDS`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import structlog
import tenacity
from pydantic import BaseModel, ConfigDict, Field

log = structlog.get_logger(__name__)

T = TypeVar("T")

# The HTTP answers worth asking again: throttling and the server's own failures.
RETRIABLE_STATUSES = frozenset({429, *range(500, 600)})

# A fetch holds its supplier (and, in a request, one of the scheduler's few fetch slots)
# through a timeout or a wait between attempts: past an hour it is a mistake, and past
# the clock's range it overflowed every fetch (httpx, Event.wait). Not much less: SFTP
# times a whole file's read with `timeout_seconds`. Longer pauses are the schedule's.
LONGEST_WAIT_SECONDS = 3600


class FetchFailed(Exception):
    """A fetch that failed: `reason` is a short code for operators ("http_404",
    "timeout: …"), `retriable` whether trying again later may succeed, and `retry_after`
    the seconds the supplier asked us to wait, when it said."""

    def __init__(self, reason: str, retriable: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retriable = retriable
        self.retry_after = retry_after


@dataclass(frozen=True)
class Failure:
    """How errors of one kind are classified: the reason code and whether it is retried."""

    error: type[BaseException] | tuple[type[BaseException], ...]
    reason: str
    retriable: bool


def classify(error: BaseException, failures: Sequence[Failure]) -> FetchFailed | None:
    """The FetchFailed the first matching row makes of `error`; None when no row matches
    (an unforeseen error is a bug to see, not a failure to retry)."""
    for failure in failures:
        if isinstance(error, failure.error):
            detail = str(error) or type(error).__name__
            return FetchFailed(f"{failure.reason}: {detail}", retriable=failure.retriable)
    return None


@contextmanager
def classified(failures: Sequence[Failure]) -> Iterator[None]:
    """Raises the errors of the block that a row of `failures` matches as FetchFailed."""
    try:
        yield
    except Exception as error:
        failure = classify(error, failures)
        if failure is None:
            raise
        raise failure from error


def status_failure(status: int, retry_after: float | None = None) -> FetchFailed | None:
    """The failure an HTTP status means, or None for a 2xx or a 304."""
    if 200 <= status < 300 or status == 304:
        return None
    retriable = status in RETRIABLE_STATUSES
    return FetchFailed(f"http_{status}", retriable, retry_after if retriable else None)


LONGEST_RETRY_AFTER = 1e9


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """The wait a `Retry-After` header asks for, in seconds or as an HTTP date; None when
    it is absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²" is a digit to str.isdigit, not to float
        # At most a billion seconds: 400 digits were infinite, logged as `Infinity`, which
        # no JSON reader takes.
        return min(float(value), LONGEST_RETRY_AFTER)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())


class RetrySettings(BaseModel):
    """The options every transport shares: timeouts and how failures are retried."""

    # Finite: "inf" was read as a number, which saving accepted and every fetch then
    # failed on. Saving validates strictly too (no true for 1, no "3"; see
    # `transport_for`), as config.py's own checks do.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    timeout_seconds: float = Field(30.0, gt=0, le=LONGEST_WAIT_SECONDS)
    max_attempts: int = Field(4, ge=1, le=20)
    backoff_seconds: float = Field(1.0, ge=0, le=LONGEST_WAIT_SECONDS)
    max_backoff_seconds: float = Field(30.0, ge=0, le=LONGEST_WAIT_SECONDS)
    max_retry_after_seconds: float = Field(120.0, ge=0, le=LONGEST_WAIT_SECONDS)

    def policy(self, sleep: Callable[[float], None] = time.sleep) -> RetryPolicy:
        """The retry policy; `sleep` waits between attempts (one that raises ends them)."""
        return RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_seconds=self.backoff_seconds,
            max_backoff_seconds=self.max_backoff_seconds,
            max_retry_after_seconds=self.max_retry_after_seconds,
            sleep=sleep,
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Runs one request or operation until it succeeds, fails fatally, or runs out of
    attempts; then the last FetchFailed is raised as it was."""

    max_attempts: int = 4
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0
    max_retry_after_seconds: float = 120.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def run(self, attempt: Callable[[], T]) -> T:
        backoff = tenacity.wait_exponential(
            multiplier=self.backoff_seconds, max=self.max_backoff_seconds
        ) + tenacity.wait_random(0, self.backoff_seconds)

        def wait(state: tenacity.RetryCallState) -> float:
            # The jitter on top of the backoff passed `max_backoff_seconds` (2.17 s for 2).
            waited = min(float(backoff(state)), self.max_backoff_seconds)
            error = _failure_of(state)
            if error is not None and error.retry_after is not None:
                # No shorter than the backoff: `Retry-After: 0`, or a date past, sent
                # every attempt of a fetch within milliseconds (a walkthrough).
                return max(error.retry_after, waited)
            return waited

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=wait,
            retry=tenacity.retry_if_exception(self._worth_retrying),
            sleep=self.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(attempt)

    def _worth_retrying(self, error: BaseException) -> bool:
        if not isinstance(error, FetchFailed) or not error.retriable:
            return False
        return error.retry_after is None or error.retry_after <= self.max_retry_after_seconds


def _failure_of(state: tenacity.RetryCallState) -> FetchFailed | None:
    error = state.outcome.exception() if state.outcome is not None else None
    return error if isinstance(error, FetchFailed) else None


def _log_retry(state: tenacity.RetryCallState) -> None:
    error = _failure_of(state)
    log.warning(
        "transport.retrying",
        reason=error.reason if error is not None else None,
        attempt=state.attempt_number,
        wait_seconds=round(state.upcoming_sleep, 3),
    )
