"""A small threaded HTTP/1.1 server on 127.0.0.1 for the simulator, run in the background.

The standard library's ThreadingHTTPServer serves; one function turns each `Request`
into a `Response`. `stop()` also closes kept-alive connections and wakes handlers that
wait on `stopping`, so no thread outlives the server for long.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

NO_BODY = frozenset({204, 304})


@dataclass(frozen=True)
class Request:
    """What a client sent; header names in lower case, a repeated query name's last value."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    """What to answer; Content-Length is added."""

    status: int
    headers: dict[str, str]
    body: bytes


Answer = Callable[[Request], Response]


def error_response(status: int, code: str, detail: str) -> Response:
    """An error the way Stockledger writes them: `{"error": code, "detail": …}`."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    return Response(status, {"Content-Type": "application/json"}, body)


class HttpThread:
    """An HTTP server answering with `answer` from a background thread."""

    def __init__(self, answer: Answer, host: str = "127.0.0.1", port: int = 0) -> None:
        self._answer = answer
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.stopping = threading.Event()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the server is already running")
        self.stopping.clear()
        self._server = _Server(self._address, self._answer)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="simulator-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join()
        self._server = self._thread = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], answer: Answer) -> None:
        self.answer = answer
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake every handler blocked reading a kept-alive connection, so that it ends."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # a client that gave up (e.g. on a delayed answer) is no error here
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the supplier keeps its own request log."""

    def _handle(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            method=self.command,
            path=url.path,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
        )
        response = self.server.answer(request)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.status not in NO_BODY:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if response.status not in NO_BODY:
            self.wfile.write(response.body)
