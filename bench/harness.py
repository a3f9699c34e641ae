"""What every benchmark needs: a PostgreSQL, fresh databases, servers, and the load generator."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import make_conninfo

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def postgres() -> Iterator[str]:
    """LEDGER_BENCH_DATABASE_URL, else the local server, else an embedded one."""
    configured = os.environ.get("LEDGER_BENCH_DATABASE_URL")
    if configured:
        yield configured
        return
    try:
        psycopg.connect(LOCAL_SERVER, connect_timeout=2).close()
        yield LOCAL_SERVER
        return
    except psycopg.OperationalError:
        pass
    import pgserver

    data = Path(tempfile.mkdtemp(prefix="ledger-bench-pg-"))
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


# A fixed amount of work, timed before each workload and at the end of a run: how fast
# the machine was then. On 2026-12-05 a loop like this one (at a module's top level, so
# slower than here) took 0.86 s at 02:40 UTC and 1.38-1.57 s twenty minutes later, and
# the same code's rates fell alike: a run's rates and CPU times are to be read beside its
# probes; the ratios, measured minutes apart, less so.
PROBE_LOOP = 10_000_000
# The series in the select list is streamed: in FROM it would be stored first, and past
# work_mem written to disk.
PROBE_SQL = "SELECT sum(g) FROM (SELECT generate_series(1, 3000000) AS g) AS series"


def machine_probe(server_url: str) -> dict[str, float]:
    """Seconds this machine took over a fixed pure-Python loop and a fixed PostgreSQL
    query (each the best of two): lower is faster."""
    python, postgres = [], []
    with psycopg.connect(server_url, autocommit=True) as conn:
        for _ in range(2):
            started = time.perf_counter()
            total = 0
            for number in range(PROBE_LOOP):
                total += number
            python.append(time.perf_counter() - started)
            started = time.perf_counter()
            conn.execute(PROBE_SQL).fetchone()
            postgres.append(time.perf_counter() - started)
    return {"python_seconds": min(python), "postgres_seconds": min(postgres)}


def describe_probes(probes: list[dict[str, Any]]) -> str:
    """The run's probes in a line: seconds for the loop / the query, lower is faster."""
    told = ", ".join(
        f"{probe['when']} {probe['python_seconds']:.2f} / {probe['postgres_seconds']:.2f}"
        for probe in probes
    )
    return (
        "Machine speed (`bench.harness.machine_probe`: seconds for a fixed Python loop /"
        f" a fixed PostgreSQL query, lower is faster): {told}."
    )


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    name = f"ledger_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Served:
    """A server process that answers at `url`."""

    url: str
    pid: int


@contextmanager
def serving(
    command: list[str], env: dict[str, str], ready_path: str, port: int
) -> Iterator[Served]:
    """Runs a server process until the block ends; yields it once it answers."""
    log = Path(tempfile.mkstemp(prefix="bench-server-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(base + ready_path, timeout=1).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Served(base, process.pid)
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Asks a process to stop, and makes it if it has not within 20 s."""
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


@contextmanager
def projecting(env: dict[str, str]) -> Iterator[int]:
    """The projections in a worker process of their own (`ledger projections run`); yields
    its process id."""
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "projections", "run"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process.pid
    finally:
        stop(process)


class CpuMeter:
    """The CPU time processes take over a span, by part: each named process with its
    children (a server and its workers, by process id), and PostgreSQL's (every process on
    the machine called postgres: the benchmarks run alone). Read with psutil, as `ps` does.

    A part's children do not include another part and its own: the feed ingest measures
    the benchmark's own process, which started the projections worker, and until
    2026-12-05 counted that worker's CPU in both parts (2.4-2.6 core-seconds of a 5%
    delivery's "ledger" figure were the projections')."""

    def __init__(self, trees: dict[str, int]) -> None:
        self.trees = trees
        self.seconds: dict[str, float] = {}
        self._at_start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        import psutil

        def used(processes: list[psutil.Process]) -> float:
            total = 0.0
            for process in processes:
                try:
                    times = process.cpu_times()
                except psutil.Error:  # it ended meanwhile
                    continue
                total += times.user + times.system
            return total

        trees: dict[str, dict[int, psutil.Process]] = {}
        for part, pid in self.trees.items():
            try:
                root = psutil.Process(pid)
                trees[part] = {p.pid: p for p in (root, *root.children(recursive=True))}
            except psutil.Error:
                trees[part] = {}
        read = {}
        for part, tree in trees.items():
            # Another part started within this one's tree is that part's, with its own.
            mine = dict(tree)
            for other, root in self.trees.items():
                if other != part and root in tree:
                    for pid in trees[other]:
                        mine.pop(pid, None)
            read[part] = used(list(mine.values()))
        named = psutil.process_iter(["name"])
        read["postgres"] = used([p for p in named if (p.info["name"] or "").startswith("postgres")])
        return read

    def __enter__(self) -> CpuMeter:
        self._at_start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        ended = self._read()
        self.seconds = {part: ended[part] - self._at_start.get(part, 0.0) for part in ended}

    def per(self, count: int) -> dict[str, float]:
        """Milliseconds of CPU per unit of work (a request, a row), by part."""
        return {part: 1000 * seconds / max(count, 1) for part, seconds in self.seconds.items()}


def ensure_wrk() -> str:
    """wrk from Debian's packages, installed on first use."""
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk from Debian's packages...", file=sys.stderr)
    apt = ["apt-get", "install", "-y", "-q", "wrk"]
    if os.geteuid() != 0:
        apt.insert(0, "sudo")
    subprocess.run(apt, check=True, stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk could not be installed")
    return found


@dataclass(frozen=True)
class Load:
    """What the load generator saw, and how much CPU it burnt doing so."""

    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    generator_cores: float

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx - self.socket_errors

    @property
    def ok_per_second(self) -> float:
        return self.ok / self.seconds


def wrk(url: str, script: Path, env: dict[str, str], seconds: int, connections: int) -> Load:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [
        ensure_wrk(),
        "-t2",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    output = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(line for line in output.splitlines() if line.startswith("WRK_JSON "))
    data = json.loads(line.removeprefix("WRK_JSON "))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    duration = data["duration_us"] / 1e6
    return Load(
        requests=data["requests"],
        seconds=duration,
        non_2xx=data["non_2xx"],
        socket_errors=data["socket_errors"],
        p50_ms=data["p50_ms"],
        p99_ms=data["p99_ms"],
        max_ms=data["max_ms"],
        generator_cores=cpu / duration,
    )
