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
