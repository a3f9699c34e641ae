"""How the tests start `ledger serve`: two tests run at a time, so a free port may be taken
before a server binds it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import fresh_database, start_server, stop_server


class AnswersReady(BaseHTTPRequestHandler):
    """Another server, which says it is ready to anything."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def taken_port() -> Iterator[int]:
    other = ThreadingHTTPServer(("127.0.0.1", 0), AnswersReady)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        yield other.server_address[1]
    finally:
        other.shutdown()
        other.server_close()


def test_a_server_whose_port_is_taken_starts_on_another_and_is_not_taken_for_the_other(
    postgres_server_url: str, tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = [taken_port]
    free_port = conftest.free_port
    monkeypatch.setattr(conftest, "free_port", lambda: ports.pop() if ports else free_port())

    with fresh_database(postgres_server_url) as url:
        server = start_server(url, tmp_path, workers=1)
        try:
            assert not server.base_url.endswith(f":{taken_port}")
            assert server.process.poll() is None
            with server.client() as anonymous:
                answer = anonymous.get("/readyz")
            assert answer.status_code == 200
            assert answer.json() != {}  # the ledger's, not the other server's
        finally:
            stop_server(server)
    assert "address already in use" in (tmp_path / f"server-{taken_port}.log").read_text().lower()
