"""Fixtures every layer shares: a real PostgreSQL, a fresh database per test, a running server.

PostgreSQL is found at LEDGER_TEST_DATABASE_URL, else at 127.0.0.1:5432 when it
answers, else an embedded one is started: the database tests never skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

from api.logs import configure_logging
from api.runtime import Runtime, open_runtime
from api.settings import Settings
from ledger import hot
from tests.turns import pytest_runtest_protocol, pytest_xdist_make_scheduler  # noqa: F401 (hooks)

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"

TEST_KEYS = (
    "admin:admin:test-admin,"
    "oms:oms:test-oms,"
    "oms2:oms:test-oms-2,"
    "shop:storefront:test-shop,"
    "audit:auditor:test-audit,"
    "acme-feed:supplier:test-acme:acme"
)


# An event-sourced application opens its pool's `pool_size` connections at once and keeps
# them: an idle `ledger serve --workers 2` held 25 connections with the defaults (5 + 10),
# and holds 15 with these, which open one and grow to the same ceiling on demand; so that
# two tests at a time (tests/turns.py) stay within the server's 100 connections.
TEST_POOL = {"LEDGER_POOL_SIZE": "1", "LEDGER_POOL_MAX_OVERFLOW": "14"}


def pytest_configure(config: pytest.Config) -> None:
    for name, value in TEST_POOL.items():
        os.environ.setdefault(name, value)  # every process a test starts inherits them


def random_sku(prefix: str = "SKU") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _local_server_answers() -> bool:
    try:
        psycopg.connect(LOCAL_SERVER, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A maintenance URL of a real PostgreSQL server, found or started."""
    configured = os.environ.get("LEDGER_TEST_DATABASE_URL")
    if configured:
        yield configured
    elif _local_server_answers():
        yield LOCAL_SERVER
    else:
        import pgserver

        data = Path(tempfile.mkdtemp(prefix="ledger-test-pg-"))
        server = pgserver.get_server(data, cleanup_mode="delete")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
            shutil.rmtree(data, ignore_errors=True)


@contextmanager
def fresh_database(postgres_server_url: str) -> Iterator[str]:
    """A database of its own, dropped afterwards; yields its URL."""
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(postgres_server_url, dbname=name)
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A database of its own for one test."""
    with fresh_database(postgres_server_url) as url:
        yield url


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "api_keys": TEST_KEYS,
        "sweep_interval_seconds": 0.2,
        "pool_size": int(os.environ["LEDGER_POOL_SIZE"]),
        "pool_max_overflow": int(os.environ["LEDGER_POOL_MAX_OVERFLOW"]),
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture(autouse=True, scope="session")
def json_logs() -> None:
    """Logs as a deployed ledger writes them when not on a terminal (JSON), for the apps
    tests serve in process: structlog's own defaults render a traceback with every
    frame's locals (the runtime and its settings among them), which took the server
    longer than a client's timeout on a slow machine."""
    configure_logging(make_settings("postgresql://unused/unused", log_format="json"))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    """The ledger on a fresh database, without the background sweeper."""
    opened = open_runtime(settings, sweep=False)
    try:
        yield opened
    finally:
        opened.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A `ledger serve` process answering over real HTTP."""

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    database_url: str
    last_position: int = 0

    def client(self, key: str | None = None, *, consistent: bool = True) -> httpx.Client:
        """A client; a consistent one reads its own writes, as a careful client does.

        It remembers the highest X-Ledger-Position any write answered with and sends it
        as X-Min-Position with every read, so reads reflect every write made before.
        """
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        hooks = {"request": [self._ask], "response": [self._note]} if consistent else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, event_hooks=hooks)

    def _ask(self, request: httpx.Request) -> None:
        if request.method == "GET" and self.last_position:
            request.headers.setdefault("X-Min-Position", str(self.last_position))

    def _note(self, response: httpx.Response) -> None:
        position = response.headers.get("X-Ledger-Position")
        if response.request.method != "GET" and position:
            self.last_position = max(self.last_position, int(position))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`GET /metrics` on a connection of its own (so any worker may answer), no key."""
    answer = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def start_server(
    database_url: str,
    tmp_path: Path,
    workers: int = 2,
    extra_env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> Server:
    env = {
        **os.environ,
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_API_KEYS": TEST_KEYS,
        "LEDGER_LOG_FORMAT": "json",
        "LEDGER_SWEEP_INTERVAL_SECONDS": "0.2",
        "LEDGER_LOG_LEVEL": "INFO",  # it says when it listens (below), whatever the shell's
        **(extra_env or {}),
    }
    # A free port may be taken before the server binds it (by another test's server, two
    # run at a time, or any outgoing connection): the server is then stopped, and started
    # again on another. It is ready once its /readyz answers and the socket listening on
    # its port is its own. (Before `serve` listened where it binds, api.serving, two
    # servers could both bind a port, uvicorn's SO_REUSEADDR, and the one that listened
    # first answered for both; the check stays, as cheap as it is sure.)
    for _ in range(3):
        port = free_port()
        log_path = tmp_path / f"server-{port}.log"
        command = [sys.executable, "-m", "api", "serve", "--port", str(port)]
        command += ["--workers", str(workers), *extra_args]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        server = Server(f"http://127.0.0.1:{port}", process, log_path, database_url)
        if _ready(server, port):
            return server
        stop_process(process)
    raise RuntimeError(f"ledger serve found no free port in three tries:\n{server.log()}")


def _taken(server: Server) -> bool:
    return "address already in use" in server.log().lower()


def listens_on(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether the socket listening on `port` is the process's (or its workers')."""
    parent = psutil.Process(process.pid)
    for each in (parent, *parent.children(recursive=True)):
        with suppress(psutil.NoSuchProcess):
            if any(
                held.laddr and held.laddr.port == port and held.status == psutil.CONN_LISTEN
                for held in each.net_connections(kind="tcp")
            ):
                return True
    return False


def _ready(server: Server, port: int) -> bool:
    """Whether the server became ready; False when its port was taken."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _taken(server):
            return False
        if server.process.poll() is not None:
            raise RuntimeError(f"ledger serve exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=1).status_code == 200:
                # Its own, not that of another process that listens on the port.
                return listens_on(server.process, port)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_process(server.process)
    raise RuntimeError(f"ledger serve did not become ready:\n{server.log()}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Asks a process to stop (SIGTERM), and kills it if it has not within 20 s."""
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def stop_server(server: Server) -> None:
    stop_process(server.process)


@contextmanager
def serving(
    postgres_server_url: str,
    tmp_path: Path,
    workers: int = 2,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """`ledger serve` on a database of its own, for as long as the block runs."""
    with fresh_database(postgres_server_url) as url:
        running = start_server(url, tmp_path, workers, extra_env)
        try:
            yield running
        finally:
            stop_server(running)


@pytest.fixture
def server(postgres_server_url: str, tmp_path: Path) -> Iterator[Server]:
    """`ledger serve --workers 2` on a fresh database."""
    with serving(postgres_server_url, tmp_path) as running:
        yield running


@pytest.fixture
def quiet_lasts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer's quiet spell after its saves (about one batch) lasts the whole test, and
    starts at its first save, so that what another writer does in between lands inside
    it, as it may under load (see `ledger.hot`)."""
    monkeypatch.setattr(hot, "QUIET_SECONDS", 600.0)
    monkeypatch.setattr(hot, "LONE_SECONDS", 0.0)
