"""A lock holder whose host vanishes loses its locks within seconds, not hours.

The holder runs on a host of its own: a network namespace joined to this one by a veth
pair, as a second machine on a network would be. It talks to a PostgreSQL server of this
test's own, listening on this side of the pair (the machine's server listens on loopback
only). Then its network goes down and the process is frozen: no FIN, no RST, nothing, as
when a host loses power. The server learns of it only from TCP keepalives
(projections.leases); a standby on this host must then get the lease.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pgserver._commands import POSTGRES_BIN_PATH
from pgserver.utils import (
    ensure_folder_permissions,
    ensure_prefix_permissions,
    ensure_user_exists,
)
from psycopg.rows import tuple_row

from api.turns import StreamTurns
from projections.leases import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE_SECONDS,
    KEEPALIVE_INTERVAL_SECONDS,
    USER_TIMEOUT_MS,
    LeaseSession,
)
from projections.store import ViewStore

SRC = Path(__file__).resolve().parents[2] / "src"
# PostgreSQL refuses to run as root: its files and processes belong to this user (the
# one pgserver uses for the same reason).
SERVER_USER = "pgserver"


@dataclass(frozen=True)
class Network:
    """A second host: a namespace, and the veth pair that joins it to this one."""

    namespace: str
    here: str  # this side's interface
    there: str  # the namespace's
    prefix: str  # the pair's /24, without the last byte

    def run(self, *command: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.namespace, *command], check=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def network() -> Iterator[Network]:
    number = random.randrange(1000, 10_000)
    net = Network(f"hl{number}", f"hlh{number}", f"hln{number}", f"10.231.{number % 250}")
    _ip("netns", "add", net.namespace)
    try:
        _ip("link", "add", net.here, "type", "veth", "peer", "name", net.there)
        _ip("link", "set", net.there, "netns", net.namespace)
        _ip("addr", "add", f"{net.prefix}.1/24", "dev", net.here)
        _ip("link", "set", net.here, "up")
        net.run("ip", "addr", "add", f"{net.prefix}.2/24", "dev", net.there)
        net.run("ip", "link", "set", net.there, "up")
        yield net
    finally:
        subprocess.run(["ip", "link", "del", net.here], capture_output=True)
        subprocess.run(["ip", "netns", "del", net.namespace], capture_output=True)


@dataclass(frozen=True)
class Server:
    over_network: str  # the URL the other host uses
    here: str  # the URL for this host (its Unix socket)


@pytest.fixture
def server(network: Network) -> Iterator[Server]:
    """A PostgreSQL server of this test's own, on pgserver's binaries, listening on this
    side of the pair and on a Unix socket, trusting the pair's network."""
    ensure_user_exists(SERVER_USER)
    owner = pwd.getpwnam(SERVER_USER)
    root = Path(tempfile.mkdtemp(prefix="ledger-host-loss-"))
    os.chown(root, owner.pw_uid, owner.pw_gid)
    ensure_prefix_permissions(root)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o555)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o444)
    data = root / "data"
    port = 55_000 + random.randrange(1000)
    process = None
    try:
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"],
            user=SERVER_USER,
            check=True,
            capture_output=True,
        )
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {network.prefix}.0/24 trust\n")
        process = subprocess.Popen(
            [
                str(POSTGRES_BIN_PATH / "postgres"),
                *("-D", str(data), "-p", str(port)),
                *("-h", f"{network.prefix}.1", "-k", str(data)),
            ],
            user=SERVER_USER,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        here = f"postgresql://postgres@/postgres?host={data}&port={port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(here, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                assert process.poll() is None, "the test's PostgreSQL server exited"
                assert time.monotonic() < deadline, "the test's PostgreSQL server never answered"
                time.sleep(0.1)
        yield Server(f"postgresql://postgres@{network.prefix}.1:{port}/postgres", here)
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
        shutil.rmtree(root, ignore_errors=True)


# The holder asks for keepalives sooner than a deployed one, so that the test takes
# seconds: a deployed session is ended ~30 s after its host went silent (its probes
# unanswered, once its 30 s user timeout has run: on Linux that timeout, where set,
# decides when unanswered probes end a connection). That every session asks for the
# deployed values is the next test's.
IDLE, INTERVAL, COUNT, SILENT_MS = 2, 1, 2, 4000

HOLDER = f"""
import sys, time
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from projections import leases
from projections.leases import LeaseSession
leases.KEEPALIVE_IDLE_SECONDS = {IDLE}
leases.KEEPALIVE_INTERVAL_SECONDS = {INTERVAL}
leases.KEEPALIVE_COUNT = {COUNT}
leases.USER_TIMEOUT_MS = {SILENT_MS}
session = LeaseSession(sys.argv[1])
print("held" if session.hold("host-loss", session) else "refused", flush=True)
time.sleep(3600)
"""


@pytest.mark.alone
def test_a_lease_whose_holder_vanished_is_taken_over_within_seconds(
    network: Network, server: Server
) -> None:
    there = ("ip", "netns", "exec", network.namespace)
    holder = subprocess.Popen(
        [*there, sys.executable, "-c", HOLDER, server.over_network],
        env={**os.environ, "PYTHONPATH": str(SRC), "LEDGER_LOG_LEVEL": "WARNING"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        standby = LeaseSession(server.here)
        mine = object()
        assert not standby.hold("host-loss", mine)  # held over the network

        # The holder's host is gone: its link down, its process frozen.
        network.run("ip", "link", "set", network.there, "down")
        os.kill(holder.pid, signal.SIGSTOP)
        lost = time.monotonic()
        # Found out after IDLE seconds of silence, then probes unanswered until the user
        # timeout (4 s); without keepalives, after hours.
        bound = max(IDLE + COUNT * INTERVAL, SILENT_MS / 1000) + 15
        while not standby.hold("host-loss", mine):
            assert time.monotonic() - lost < bound, "the vanished holder kept its lease"
            time.sleep(0.2)
        assert time.monotonic() - lost >= IDLE  # found out by keepalives
        standby.close()
    finally:
        holder.kill()
        holder.wait()


def test_every_session_that_holds_locks_asks_for_keepalives(database_url: str) -> None:
    """Leases (above), inbox claims (the views' pool) and writers' turns: each session asks
    the server to probe its client; over TCP (the tests' server here) the values hold."""
    store = ViewStore(database_url).open()
    turns = StreamTurns(database_url)
    try:
        with store.connection() as claims, turns([]):
            assert turns._conn is not None
            for conn in (claims, turns._conn):
                with conn.cursor(row_factory=tuple_row) as cursor:
                    cursor.execute(
                        "SELECT name, setting::integer, source FROM pg_settings"
                        " WHERE name LIKE 'tcp_keepalives_%' OR name = 'tcp_user_timeout'"
                        " ORDER BY name"
                    )
                    rows = cursor.fetchall()
                assert [(name, source) for name, _, source in rows] == [
                    ("tcp_keepalives_count", "session"),
                    ("tcp_keepalives_idle", "session"),
                    ("tcp_keepalives_interval", "session"),
                    ("tcp_user_timeout", "session"),
                ]
                if not conn.info.host.startswith("/"):  # over a Unix socket they read 0
                    assert [setting for _, setting, _ in rows] == [
                        KEEPALIVE_COUNT,
                        KEEPALIVE_IDLE_SECONDS,
                        KEEPALIVE_INTERVAL_SECONDS,
                        USER_TIMEOUT_MS,
                    ]
    finally:
        turns.close()
        store.close()
