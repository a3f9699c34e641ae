"""How the tests start `ledger serve`: two tests run at a time, so a free port may be taken
before a server binds it."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import uvicorn
from uvicorn.config import STARTUP_FAILURE

from api.serving import ListeningConfig
from tests import conftest
from tests.conftest import Server, fresh_database, start_server, stop_server


class AnswersReady(BaseHTTPRequestHandler):
    """Another server, which says it is ready to anything."""

    asked: list[str] = []  # the paths asked, by every instance

    def do_GET(self) -> None:
        self.asked.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def offered_first(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next server is offered `port` as free; those after it, free ones."""
    ports = [port]
    free_port = conftest.free_port
    monkeypatch.setattr(conftest, "free_port", lambda: ports.pop() if ports else free_port())


def ready_as_the_ledger(server: Server) -> None:
    """The server's /readyz answers, with the ledger's body (the other server's is `{}`)."""
    with server.client() as anonymous:
        answer = anonymous.get("/readyz")
    assert answer.status_code == 200
    assert answer.json() != {}


@pytest.fixture
def taken_port() -> Iterator[int]:
    AnswersReady.asked.clear()
    other = ThreadingHTTPServer(("127.0.0.1", 0), AnswersReady)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        yield other.server_address[1]
    finally:
        other.shutdown()
        other.server_close()


@pytest.mark.parametrize("workers", [1, 2])  # uvicorn binds in the server, or in its parent
def test_a_server_whose_port_is_taken_starts_on_another_and_is_not_taken_for_the_other(
    postgres_server_url: str,
    tmp_path: Path,
    taken_port: int,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    offered_first(taken_port, monkeypatch)

    with fresh_database(postgres_server_url) as url:
        server = start_server(url, tmp_path, workers=workers)
        try:
            assert not server.base_url.endswith(f":{taken_port}")
            assert server.process.poll() is None
            ready_as_the_ledger(server)
        finally:
            stop_server(server)
    assert "/readyz" in AnswersReady.asked  # it answered, and was not taken for the server


def test_a_socket_that_bound_the_port_beside_a_server_of_two_workers_cannot_listen_on_it(
    postgres_server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's parent binds the port with SO_REUSEADDR, and its workers listen on it a
    second or more later. A socket bound to the port before, and listening in between,
    took it: the workers' listen failed without a word (inside uvloop), and the server
    ran on without listening. `serve` now listens where it binds (api.serving): once its
    parent has started, the other socket's listen is refused, and the port is the
    server's."""
    AnswersReady.asked.clear()
    other = ThreadingHTTPServer(("127.0.0.1", 0), AnswersReady, bind_and_activate=False)
    other.server_bind()  # with SO_REUSEADDR (an HTTPServer's), not listening: so can the server
    port = other.server_address[1]
    offered_first(port, monkeypatch)
    log = tmp_path / f"server-{port}.log"
    refused: list[OSError] = []
    serving = threading.Event()

    def listen_once_started() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if log.exists() and "Started parent process" in log.read_text():
                try:
                    other.server_activate()
                except OSError as error:
                    refused.append(error)
                    return
                serving.set()
                other.serve_forever()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=listen_once_started, daemon=True)
    thread.start()
    try:
        with fresh_database(postgres_server_url) as url:
            server = start_server(url, tmp_path, workers=2)
            try:
                thread.join(timeout=30)
                assert [error.errno for error in refused] == [errno.EADDRINUSE]
                assert server.base_url.endswith(f":{port}")
                ready_as_the_ledger(server)
            finally:
                stop_server(server)
        assert AnswersReady.asked == []
    finally:
        if serving.is_set():  # it listened (the code before): `shutdown` waits for it to stop
            other.shutdown()
        other.server_close()


def test_a_server_whose_port_another_socket_listens_on_before_it_can_stops_saying_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where another socket, bound beside it, listens on the port between the server's bind
    and its listen, the server does not run on without listening: it stops, as a server
    of one worker does, with the error in its log."""
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.1", 0))
    port = other.getsockname()[1]
    bind = uvicorn.Config.bind_socket
    bound: list[socket.socket] = []

    def bind_then_the_other_listens(config: uvicorn.Config) -> socket.socket:
        bound.append(bind(config))
        other.listen()
        return bound[-1]

    monkeypatch.setattr(uvicorn.Config, "bind_socket", bind_then_the_other_listens)
    # No logging configured by uvicorn (as `serve` asks); its error logger told to the test.
    config = ListeningConfig("api.app", port=port, workers=2, log_config=None)
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(caplog.handler)
    try:
        with pytest.raises(SystemExit) as stop:
            config.bind_socket()
        assert stop.value.code == STARTUP_FAILURE
        assert "Address already in use" in caplog.text
        assert [sock.fileno() for sock in bound] == [-1]  # closed, not left bound
    finally:
        logger.removeHandler(caplog.handler)
        other.close()
