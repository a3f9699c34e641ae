"""An ASGI app on a real uvicorn server in a thread, and the writes it makes on its sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.transport import JoiningHttpToolsProtocol


@contextmanager
def served(app: Starlette, protocol: type[Any] = JoiningHttpToolsProtocol) -> Iterator[str]:
    """The app on a uvicorn server in a thread of this process, with the HTTP protocol
    `ledger serve` runs it with (unless told another); yields its URL. The app's middleware
    stack is built first, so that tests can look into it."""
    app.middleware_stack = app.build_middleware_stack()
    # Bound here, to a port of its own, so that no other test's server takes it between
    # finding it free and binding it (two tests run at a time).
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, http=protocol))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            threading.Event().wait(0.02)
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        listening.close()


class Counted:
    """Counts the writes that reach the real transport."""

    def __init__(self, transport: asyncio.Transport, writes: list[int]) -> None:
        self._transport, self._writes = transport, writes

    def write(self, data: bytes) -> None:
        self._writes.append(len(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def counting(base: type[HttpToolsProtocol], writes: list[int]) -> type[HttpToolsProtocol]:
    class Protocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(Counted(transport, writes))

    return Protocol
