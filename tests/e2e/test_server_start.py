"""How the tests start `ledger serve`: two tests run at a time, so a free port may be taken
before a server binds it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import fresh_database, start_server, stop_server


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
            with server.client() as anonymous:
                answer = anonymous.get("/readyz")
            assert answer.status_code == 200
            assert answer.json() != {}  # the ledger's, not the other server's
        finally:
            stop_server(server)
    assert "/readyz" in AnswersReady.asked  # it answered, and was not taken for the server


def test_a_server_whose_port_another_listens_on_after_both_bound_it_starts_on_another(
    postgres_server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's parent binds with SO_REUSEADDR and its workers listen seconds later: a
    socket bound to the port before, and listening in between, answers for the server
    (whose workers then do not listen, and do not say so)."""
    AnswersReady.asked.clear()
    other = ThreadingHTTPServer(("127.0.0.1", 0), AnswersReady, bind_and_activate=False)
    other.server_bind()  # with SO_REUSEADDR (an HTTPServer's), not listening: so can the server
    port = other.server_address[1]
    offered_first(port, monkeypatch)
    log = tmp_path / f"server-{port}.log"

    def listen_once_bound() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if log.exists() and f"Uvicorn running on http://127.0.0.1:{port} " in log.read_text():
                other.server_activate()
                other.serve_forever()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=listen_once_bound, daemon=True)
    thread.start()
    try:
        with fresh_database(postgres_server_url) as url:
            server = start_server(url, tmp_path, workers=2)
            try:
                assert not server.base_url.endswith(f":{port}")
                with server.client() as anonymous:
                    assert anonymous.get("/readyz").json() != {}
            finally:
                stop_server(server)
        assert "/readyz" in AnswersReady.asked  # it answered first, and was not taken for it
        assert "Uvicorn running on" in log.read_text()  # where the server had bound it too
    finally:
        other.shutdown()
        other.server_close()
