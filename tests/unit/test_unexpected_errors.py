"""The catch-all for errors the API did not expect."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from starlette.requests import Request

from api import errors
from api.errors import on_unexpected


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], threading.Thread]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.calls.append((event, fields, threading.current_thread()))


def test_an_unexpected_error_is_logged_with_its_traceback_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(errors, "log", recorder)
    request = Request({"type": "http", "method": "GET", "path": "/v1/x", "headers": []})
    error = RuntimeError("boom")
    loop_thread: list[threading.Thread] = []

    async def answer() -> int:
        loop_thread.append(threading.current_thread())
        response = await on_unexpected(request, error)
        return response.status_code

    assert asyncio.run(answer()) == 500
    [(event, fields, logged_on)] = recorder.calls
    assert event == "http.unexpected_error"
    assert fields == {"path": "/v1/x", "exc_info": error}
    assert logged_on is not loop_thread[0]


def test_a_write_that_timed_out_on_the_event_log_s_lock_says_so() -> None:
    """Not "cannot reach its database": the database answered, a lock was not had."""
    from eventsourcing.persistence import OperationalError
    from psycopg.errors import LockNotAvailable

    request = Request({"type": "http", "method": "POST", "path": "/v1/x", "headers": []})
    waited = OperationalError("canceling statement due to lock timeout")
    waited.__cause__ = LockNotAvailable("canceling statement due to lock timeout")
    lost = OperationalError("connection refused")
    answers = [asyncio.run(errors.on_unavailable(request, e)) for e in (waited, lost)]
    details = [answer.body.decode() for answer in answers]
    assert [answer.status_code for answer in answers] == [503, 503]
    assert "waited too long for the event log's lock" in details[0]
    assert "cannot reach its database" in details[1]


def test_only_a_connection_that_failed_renews_the_pools() -> None:
    """Not a wait for a connection or a lock, nor a statement cancelled: a busy database
    answers those, and renewing every connection would add to its load."""
    from eventsourcing.persistence import OperationalError
    from psycopg import OperationalError as Lost
    from psycopg.errors import LockNotAvailable, QueryCanceled
    from psycopg_pool import PoolTimeout

    from api.recorder import connection_lost

    def wrapped(cause: BaseException) -> OperationalError:
        error = OperationalError(str(cause))
        error.__cause__ = cause
        return error

    assert connection_lost(Lost("server closed the connection unexpectedly"))
    assert connection_lost(wrapped(Lost("server closed the connection unexpectedly")))
    assert not connection_lost(PoolTimeout("couldn't get a connection after 5.00 sec"))
    assert not connection_lost(wrapped(LockNotAvailable("lock timeout")))
    assert not connection_lost(wrapped(QueryCanceled("statement timeout")))
    assert not connection_lost(ValueError("not the database's"))
