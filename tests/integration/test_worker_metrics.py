"""`ledger connectors run` and `ledger projections run` serve metrics of their own: the
deliveries a connectors worker applied were counted by no scrape (an operator's gap)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.runtime import Runtime
from connectors import inbox
from connectors.ingest import content_hash
from tests.conftest import free_port, listens_on
from tests.integration.test_cli_errors import SUPPLIER, ledger_command, mapped_sku

REPO = Path(__file__).resolve().parents[2]


def worker(database_url: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    environment = {
        **os.environ,
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_API_KEYS": "",
        "LEDGER_MIGRATE_ON_START": "false",
    }
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "api", *args],
            env=environment,
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def metrics_worker(
    database_url: str, tmp_path: Path, name: str, *args: str
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`ledger <name> run --metrics-port P`, with its port and log. A port found free may
    be taken before the worker binds it (two tests run at a time): the worker then stops
    saying so, and is started again on another, up to three tries."""
    for _ in range(3):
        port = free_port()
        log = tmp_path / f"{name}-{port}.log"
        process = worker(database_url, log, name, "run", "--metrics-port", str(port))
        deadline = time.monotonic() + 60
        while process.poll() is None and not listens_on(process, port):
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        if process.poll() is None:
            return process, port, log
        if f"cannot serve metrics on 127.0.0.1:{port}" not in log.read_text():
            raise AssertionError(log.read_text())
    raise AssertionError(f"no free metrics port in three tries:\n{log.read_text()}")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(port: int) -> Samples | None:
    """A scrape's samples by name and labels; None while nothing answers."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except httpx.TransportError:
        return None
    assert answer.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def scraped_until(port: int, wanted: str, process: subprocess.Popen[bytes], log: Path) -> Samples:
    """The first scrape holding a sample named `wanted` with a value above 0."""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, log.read_text()
        found = samples(port)
        if found and any(name == wanted and value > 0 for (name, _), value in found.items()):
            return found
        assert time.monotonic() < deadline, (wanted, found, log.read_text()[-2000:])
        time.sleep(0.2)


@pytest.fixture
def stopped() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_each_worker_serves_its_own_counts_and_the_stored_figures(
    ledger: Runtime, tmp_path: Path, stopped: list[subprocess.Popen[bytes]]
) -> None:
    mapped_sku(ledger)
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    body = f"sku,quantity,observed_at\nA-1,14,{at}\n".encode()
    with ledger.store.connection() as conn:
        inbox.enqueue(
            conn,
            supplier_id=SUPPLIER,
            delivery_id="metrics-1",
            source="upload",
            format="csv",
            content_hash=content_hash(body),
            body=body,
        )
    connectors, connectors_port, connectors_log = metrics_worker(
        ledger.database_url, tmp_path, "connectors"
    )
    stopped.append(connectors)
    projections, projections_port, projections_log = metrics_worker(
        ledger.database_url, tmp_path, "projections"
    )
    stopped.append(projections)

    # The delivery, applied by the worker's own writer, counted there.
    applied = scraped_until(connectors_port, "ledger_commands_total", connectors, connectors_log)
    running = scraped_until(
        projections_port, "ledger_projection_position", projections, projections_log
    )

    assert any(
        name == "ledger_commands_total" and ("outcome", "ok") in labels and value >= 1
        for (name, labels), value in applied.items()
    ), applied
    assert applied[("ledger_processes", (("part", "connectors"),))] >= 1
    assert running[("ledger_processes", (("part", "projections"),))] >= 1
    assert running[("ledger_projection_position", (("projection", "stock"),))] > 0
    # A projections worker writes no commands: none counted, only the stored figures.
    assert not any(name == "ledger_commands_total" for name, _ in running)
    for process in (connectors, projections):
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_a_metrics_port_already_taken_is_said_in_one_line_with_status_2(
    ledger: Runtime,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = ledger_command(ledger.database_url, "connectors", "run", "--metrics-port", str(port))

    assert ran.returncode == 2, ran.stderr
    assert (
        ran.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: cannot serve metrics on 127.0.0.1:{port}: ")
    )


def test_a_metrics_port_taken_before_the_worker_binds_it_is_tried_again_elsewhere(
    ledger: Runtime,
    tmp_path: Path,
    stopped: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tests' own retry (`metrics_worker`), as two tests at a time need it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        offered, any_free = [port], free_port
        monkeypatch.setattr(
            sys.modules[__name__], "free_port", lambda: offered.pop() if offered else any_free()
        )
        process, served_on, _ = metrics_worker(ledger.database_url, tmp_path, "projections")
        stopped.append(process)

    assert served_on != port
    assert (tmp_path / f"projections-{port}.log").read_text().count("cannot serve metrics") == 1
    assert samples(served_on) is not None
