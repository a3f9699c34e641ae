"""The `ledger` command on a real database: what it refuses, and what it never starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from api.database import NewerData, check_migrated, migrate, start_embedded
from api.runtime import Runtime, open_runtime
from api.settings import Settings
from ledger.commands import PutMappings
from ledger.mapping import MappingSpec
from ledger.stock import StockItem
from projections.data_version import DATA_VERSION
from tests.conftest import random_sku
from tests.integration.ledger_setup import CAUSE, put_supplier

SUPPLIER = "acme"


def mapped_sku(runtime: Runtime) -> str:
    """A SKU the supplier's A-1 maps to, once the mappings view (which `ingest` reads) has it."""
    sku = random_sku("CLI")
    put_supplier(runtime.writer, SUPPLIER)
    mapping = MappingSpec("A-1", sku, 1, upc=None)
    runtime.writer.execute(
        PutMappings(at=datetime.now(UTC), cause=CAUSE, supplier_id=SUPPLIER, mappings=[mapping])
    )
    runtime.views.wait_for("mappings", runtime.app.recorder.max_notification_id(), timeout=20)
    return sku


def ledger_command(
    database_url: str,
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    program: tuple[str, ...] = ("-m", "api"),
) -> subprocess.CompletedProcess[str]:
    """`ledger ARGS` in a process of its own, logging JSON at INFO, with the connectors and
    the projections turned on as a server's environment has them; `program`, the Python
    arguments that run the command (another program that ends in its `main`)."""
    environment = {
        **os.environ,
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_API_KEYS": "",
        "LEDGER_LOG_FORMAT": "json",
        "LEDGER_LOG_LEVEL": "INFO",
        "LEDGER_RUN_CONNECTORS": "true",
        "LEDGER_RUN_PROJECTIONS": "true",
        "COLUMNS": "200",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, *program, *args],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def started(ran: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The `ledger.started` line the command logged."""
    [line] = [line for line in ran.stderr.splitlines() if '"ledger.started"' in line]
    return dict(json.loads(line))


def test_a_command_runs_neither_the_connectors_nor_the_projections_whatever_the_settings_say(
    ledger: Runtime, tmp_path: Path
) -> None:
    sku = mapped_sku(ledger)
    feed = tmp_path / "stock.csv"
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    feed.write_text(f"sku,quantity,observed_at\nA-1,14,{at}\n")

    ingested = ledger_command(ledger.database_url, "ingest", str(feed), "--supplier", SUPPLIER)
    last = str(ledger.app.recorder.max_notification_id())
    ran = [
        ingested,
        ledger_command(ledger.database_url, "projections", "status"),
        ledger_command(ledger.database_url, "audit", "stock", sku, "--position", last),
        ledger_command(
            ledger.database_url, "audit", "export", "--output", str(tmp_path / "log.ndjson")
        ),
    ]

    for command in ran:
        assert command.returncode == 0, command.stderr
        assert started(command)["connectors"] is False, command.args
        assert started(command)["projections"] == 0, command.args
    # `ingest` applied its file all the same, through its own writer.
    assert "1 rows read: 1 changed" in ran[0].stdout
    item = ledger.app.repository.get(StockItem.id_for(sku))
    assert sum(position.quantity for position in item.positions.values()) == 14


def test_an_unknown_sku_or_supplier_is_said_in_one_line_with_status_1(
    ledger: Runtime, tmp_path: Path
) -> None:
    mapped_sku(ledger)  # the log has events, so its last position is a moment of its past
    last = str(ledger.app.recorder.max_notification_id())
    feed = tmp_path / "stock.csv"
    feed.write_text("sku,quantity,observed_at\n")

    sku = ledger_command(ledger.database_url, "audit", "stock", "NOPE", "--position", last)
    supplier = ledger_command(ledger.database_url, "ingest", str(feed), "--supplier", "ghost")

    assert sku.returncode == 1
    assert "error: SKU 'NOPE' did not exist then\n" in sku.stderr
    assert supplier.returncode == 1
    assert "error: unknown supplier 'ghost'\n" in supplier.stderr
    for command in (sku, supplier):
        assert "Traceback" not in command.stderr
        assert command.stdout == ""


def test_an_ingest_with_no_projections_worker_says_so_and_counts_no_supplier_failure(
    settings: Settings, tmp_path: Path
) -> None:
    """`ledger ingest` resolves a file by the mappings view, which a projections worker
    keeps: with none running, it printed a traceback, and counted the supplier a failure
    (an operator's walkthrough)."""
    runtime = open_runtime(settings, sweep=False, project=False, connect=False)
    try:
        put_supplier(runtime.writer, SUPPLIER)
        mapping = MappingSpec("A-1", random_sku("CLI"), 1, upc=None)
        runtime.writer.execute(
            PutMappings(at=datetime.now(UTC), cause=CAUSE, supplier_id=SUPPLIER, mappings=[mapping])
        )
        last = runtime.app.recorder.max_notification_id()
    finally:
        runtime.close()
    feed = tmp_path / "stock.csv"
    feed.write_text(f"sku,quantity,observed_at\nA-1,14,{datetime.now(UTC).isoformat()}\n")

    ran = ledger_command(
        settings.database_url.get_secret_value(), "ingest", str(feed), "--supplier", SUPPLIER
    )

    assert ran.returncode == 1, ran.stderr
    assert "Traceback" not in ran.stderr
    said = " ".join(line for line in ran.stderr.splitlines() if line.startswith("error:"))
    assert said.startswith(f"error: the mappings view is at 0, not yet at {last}, the log's")
    assert "is a projections worker running" in said
    with psycopg.connect(settings.database_url.get_secret_value()) as conn:
        counted = conn.execute(
            "SELECT failures FROM connector_health WHERE supplier_id = %s", (SUPPLIER,)
        ).fetchone()
        status = conn.execute("SELECT status FROM connector_inbox").fetchone()
    assert counted is None or counted[0] == 0
    assert status == ("failed",)


# `ledger ingest`, in a process of its own, stopped with Ctrl-C as it begins to apply.
INTERRUPTED_INGEST = """
import sys
from api import cli

def interrupted(*args):
    raise KeyboardInterrupt

cli._ingest_file = interrupted
sys.argv[0] = "ledger"
cli.main()
"""
# As an orchestrator stops it: SIGTERM, while it applies the file.
TERMINATED_INGEST = INTERRUPTED_INGEST.replace(
    "    raise KeyboardInterrupt\n",
    "    import os, signal, time\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n",
)


@pytest.mark.parametrize(
    "program", [INTERRUPTED_INGEST, TERMINATED_INGEST], ids=["ctrl-c", "sigterm"]
)
def test_an_ingest_stopped_with_ctrl_c_says_how_to_finish_and_is_finished_by_running_it_again(
    ledger: Runtime, tmp_path: Path, program: str
) -> None:
    # It exited with status 130 saying nothing, and left the delivery failed with the
    # error "KeyboardInterrupt: " (an operator's walkthrough); stopped by SIGTERM, with
    # status 143 saying nothing, the delivery left `processing` (another).
    from api.cli import INTERRUPTED

    sku = mapped_sku(ledger)
    feed = tmp_path / "stock.csv"
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    feed.write_text(f"sku,quantity,observed_at\nA-1,23,{at}\n")
    args = ["ingest", str(feed), "--supplier", SUPPLIER, "--delivery-id", "ctrl-c-1"]

    stopped = ledger_command(ledger.database_url, *args, program=("-c", program))
    with psycopg.connect(ledger.database_url) as conn:
        left = conn.execute(
            "SELECT status, error FROM connector_inbox WHERE delivery_id = 'ctrl-c-1'"
        ).fetchone()
        counted = conn.execute(
            "SELECT failures FROM connector_health WHERE supplier_id = %s", (SUPPLIER,)
        ).fetchone()
    again = ledger_command(ledger.database_url, *args)

    assert stopped.returncode == 130, stopped.stderr
    assert f"error: {INTERRUPTED}" in " ".join(stopped.stderr.split())
    assert "Traceback" not in stopped.stderr
    assert left == ("failed", INTERRUPTED)
    assert counted is None or counted[0] == 0  # stopped by its operator: no supplier failure
    assert again.returncode == 0, again.stderr
    assert "1 rows read: 1 changed" in again.stdout
    assert ledger.app.repository.get(StockItem.id_for(sku)).positions[SUPPLIER].quantity == 23


# Stopped as it writes its outcome and letters, once the file is applied.
TERMINATED_FINISHING = """
import os, signal, sys, time
from api import cli

def terminated(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

cli.record_delivery_letters = terminated
sys.argv[0] = "ledger"
cli.main()
"""


def test_an_ingest_stopped_as_it_writes_its_outcome_says_so_and_is_finished_by_running_it_again(
    ledger: Runtime, tmp_path: Path
) -> None:
    """A walkthrough: stopped while it wrote its dead letters, it exited saying nothing and
    left the delivery `processing`."""
    from api.cli import INTERRUPTED

    sku = mapped_sku(ledger)
    feed = tmp_path / "stock.csv"
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    feed.write_text(f"sku,quantity,observed_at\nA-1,31,{at}\nNOBODY,1,{at}\n")
    args = ["ingest", str(feed), "--supplier", SUPPLIER, "--delivery-id", "finishing-1"]

    stopped = ledger_command(ledger.database_url, *args, program=("-c", TERMINATED_FINISHING))
    with psycopg.connect(ledger.database_url) as conn:
        left = conn.execute(
            "SELECT status, error FROM connector_inbox WHERE delivery_id = 'finishing-1'"
        ).fetchone()
    again = ledger_command(ledger.database_url, *args)
    with psycopg.connect(ledger.database_url) as conn:
        letters = conn.execute(
            "SELECT count(*) FROM connector_dead_letters WHERE delivery_id = 'finishing-1'"
        ).fetchone()

    assert stopped.returncode == 130, stopped.stderr
    assert f"error: {INTERRUPTED}" in " ".join(stopped.stderr.split())
    assert left == ("failed", INTERRUPTED)
    assert again.returncode == 0, again.stderr
    assert "2 rows read: 0 changed, 1 unchanged" in again.stdout
    assert ", letters " in again.stdout  # the time its letters took, in its last line too
    assert letters == (1,)
    assert ledger.app.repository.get(StockItem.id_for(sku)).positions[SUPPLIER].quantity == 31


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("audit", "stock", "SKU-1", "--position", "0"), "Invalid value for '--position'"),
        (("audit", "export", "--after", "-5"), "Invalid value for '--after'"),
        (
            ("audit", "export", "--output", "/nonexistent/dir/x.ndjson"),
            "Invalid value for '--output': /nonexistent/dir/x.ndjson: No such file or directory",
        ),
        (("serve", "--port", "70000"), "Invalid value for '--port'"),
        (("serve", "--port", "0", "--workers", "2"), "Invalid value for '--port'"),
        # A directory's name: it wrote a file named `nodir` (an operator's walkthrough).
        (
            ("audit", "export", "--output", "nodir/"),
            "Invalid value for '--output': nodir/: Is a directory",
        ),
        # Taken for none, and the content hash used (the same walkthrough).
        (
            ("ingest", "/dev/null", "--supplier", "acme", "--delivery-id", ""),
            "Invalid value for '--delivery-id': is empty",
        ),
    ],
    ids=[
        "position-0",
        "after-negative",
        "output-in-no-directory",
        "port-70000",
        "port-0",
        "output-a-directory",
        "delivery-id-empty",
    ],
)
def test_a_position_out_of_range_or_an_output_that_cannot_be_written_is_a_usage_error(
    ledger: Runtime, tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    ran = ledger_command(ledger.database_url, *args, cwd=tmp_path)

    assert ran.returncode == 2, ran.stderr
    assert said in ran.stderr
    assert "Traceback" not in ran.stderr
    # Refused before the ledger was opened, or a file written.
    assert "ledger.started" not in ran.stderr
    assert not (tmp_path / "events.ndjson").exists()


def test_a_database_that_cannot_be_reached_is_said_in_one_line_with_status_1() -> None:
    """An outage, not a bug: one line, no traceback (an operator's walkthrough got a
    222-line one from `projections status`)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nobody listens there once it is closed
    nowhere = f"postgresql://postgres@127.0.0.1:{port}/ledger"
    for args in (("projections", "status"), ("audit", "stock", "SKU-1", "--position", "1")):
        ran = ledger_command(nowhere, *args)
        assert ran.returncode == 1, ran.stderr
        [said] = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
        assert said.startswith("error: the database cannot be reached: "), ran.stderr
        assert "Traceback" not in ran.stderr


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        (
            {"LEDGER_POOL_SIZE": "abc"},
            "error: setting LEDGER_POOL_SIZE: Input should be a valid integer",
        ),
        (
            {"LEDGER_API_KEYS": "x:boss:sec"},
            "error: setting LEDGER_API_KEYS: Value error, API key 'x' has unknown role 'boss'",
        ),
        (
            {"LEDGER_POOL_SIZE": "1", "LEDGER_POOL_MAX_OVERFLOW": "0"},
            "error: settings: Value error, LEDGER_POOL_SIZE + LEDGER_POOL_MAX_OVERFLOW must allow",
        ),
        # Each of these below was a traceback of 70-130 lines with status 1, or "cannot be
        # reached" (an operator's walkthrough).
        (
            {"LEDGER_LOG_LEVEL": "LOUD"},
            "error: setting LEDGER_LOG_LEVEL: Value error, one of DEBUG, INFO, WARNING",
        ),
        (
            {"LEDGER_DATABASE_URL": "notaurl"},
            "error: setting LEDGER_DATABASE_URL: Value error, not a PostgreSQL URL",
        ),
        (
            {"LEDGER_DATABASE_URL": "mysql://root@127.0.0.1/ledger"},
            "error: setting LEDGER_DATABASE_URL: Value error, a PostgreSQL URL begins"
            " postgresql://, not mysql://",
        ),
        (
            {"LEDGER_DATABASE_URL": "postgresql://postgres@127.0.0.1:99999/ledger"},
            "error: setting LEDGER_DATABASE_URL: Value error, its port is not a number from 1",
        ),
        (
            {"LEDGER_DATABASE_URL": "postgresql://postgres@127.0.0.1/ledger?sslmode=bogus"},
            "error: setting LEDGER_DATABASE_URL: Value error, sslmode 'bogus' is not one of",
        ),
        # Each of these below started, and then a thread died, every write failed, or the
        # sweeper failed each pass (an operator's walkthrough).
        (
            {"LEDGER_PROJECTION_POLL_SECONDS": "1e12"},
            "error: setting LEDGER_PROJECTION_POLL_SECONDS: Input should be less than or equal"
            " to 3600",
        ),
        (
            {"LEDGER_SWEEP_INTERVAL_SECONDS": "inf"},
            "error: setting LEDGER_SWEEP_INTERVAL_SECONDS: Input should be a finite number",
        ),
        (
            {"LEDGER_LOCK_TIMEOUT_SECONDS": "99999999999"},
            "error: setting LEDGER_LOCK_TIMEOUT_SECONDS: Input should be less than or equal to",
        ),
        (
            {"LEDGER_CONNECT_TIMEOUT_SECONDS": "99999999999"},
            "error: setting LEDGER_CONNECT_TIMEOUT_SECONDS: Input should be less than or equal",
        ),
        (
            {"LEDGER_INBOX_KEEP_DAYS": "1e10"},
            "error: setting LEDGER_INBOX_KEEP_DAYS: Input should be less than or equal to 3660",
        ),
        # The library's cache takes 0 for no bound.
        (
            {"LEDGER_AGGREGATE_CACHE_SIZE": "0"},
            "error: setting LEDGER_AGGREGATE_CACHE_SIZE: Input should be greater than or equal",
        ),
        # `serve` took an empty URL for none, and started the embedded server; the other
        # commands, and a URL naming no database, failed with a traceback.
        (
            {"LEDGER_DATABASE_URL": ""},
            "error: setting LEDGER_DATABASE_URL: Value error, is empty: unset it for the",
        ),
        (
            {"LEDGER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1"},
            "error: setting LEDGER_DATABASE_URL: Value error, it names no database",
        ),
        # Named by their variables, and a secret with a colon said to hold one.
        (
            {"LEDGER_DEFAULT_TTL_SECONDS": "900", "LEDGER_MAX_TTL_SECONDS": "60"},
            "error: settings: Value error, LEDGER_DEFAULT_TTL_SECONDS must not be longer than",
        ),
        (
            {"LEDGER_API_KEYS": "a:admin:sec:ret"},
            "error: setting LEDGER_API_KEYS: Value error, API key 'a': supplier keys, and only"
            " they, end with :supplier_id; a secret may not hold ':'",
        ),
        # A request is known by its secret: the admin key answered as the storefront one.
        (
            {"LEDGER_API_KEYS": "a:admin:same1,b:storefront:same1"},
            "error: setting LEDGER_API_KEYS: Value error, each API key needs a secret of its"
            " own: 'a' and 'b' share one",
        ),
    ],
)
def test_a_setting_that_cannot_be_used_is_said_in_one_line_with_status_2(
    settings: dict[str, str], said: str
) -> None:
    """A configuration mistake, not a bug: which setting and why, no traceback (a README
    walkthrough got 44 lines for `LEDGER_POOL_SIZE=abc`); nothing connects to a database.
    Every command reads its settings the same way: each is tried below with one mistake."""
    assert refused_setting(("projections", "status"), settings).startswith(said)


def refused_setting(args: tuple[str, ...], settings: dict[str, str]) -> str:
    """The one line `ledger ARGS` says with `settings`, which it refuses with status 2,
    before connecting to the database (there is none at the URL it is given)."""
    ran = ledger_command("postgresql://postgres@127.0.0.1:1/ledger", *args, env=settings)
    assert ran.returncode == 2, ran.stderr
    [line] = [line for line in ran.stderr.splitlines() if line.strip()]
    return line


def test_a_variable_named_nearly_as_a_setting_is_said_to_be_none() -> None:
    """`LEDGER_POOLSIZE=20` left the pool at 5 without a word (an operator's walkthrough);
    the command still runs, and other `LEDGER_*` variables (secrets) are not named."""
    ran = ledger_command(
        "postgresql://postgres@127.0.0.1:1/ledger",
        "--help",
        env={"LEDGER_POOLSIZE": "20", "LEDGER_ACME_TOKEN": "s3cret"},
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.splitlines() == [
        "warning: LEDGER_POOLSIZE is no setting, and is not read: LEDGER_POOL_SIZE?"
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_taken_port_stops_before_it_migrates_or_starts_anything(
    database_url: str, workers: str
) -> None:
    """With one worker it migrated, started its sweeper, projections and connectors, and
    only then found the port taken (an operator's walkthrough)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = ledger_command(
            database_url,
            "serve",
            "--port",
            str(port),
            "--workers",
            workers,
            env={"LEDGER_API_KEYS": "a:admin:secret-1"},
        )

    assert ran.returncode == 3, ran.stderr  # uvicorn's STARTUP_FAILURE
    assert "address already in use" in ran.stderr.lower()
    assert '"migrate' not in ran.stderr
    with psycopg.connect(database_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog',"
            " 'information_schema')"
        ).fetchone()
    assert tables == (0,)  # nothing migrated


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--port", "1"),
        ("connectors", "run"),
        ("ingest", "/dev/null", "--supplier", "acme"),
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_every_command_says_a_setting_that_cannot_be_used_in_one_line_with_status_2(
    args: tuple[str, ...],
) -> None:
    said = refused_setting(args, {"LEDGER_POOL_SIZE": "abc"})
    assert said.startswith("error: setting LEDGER_POOL_SIZE: ")


def test_a_data_directory_that_cannot_be_made_is_said_in_one_line_with_status_1(
    tmp_path: Path,
) -> None:
    """`LEDGER_DATA_DIR=/proc/x` was a traceback of 78 lines (an operator's walkthrough)."""
    occupied = tmp_path / "a-file"
    occupied.write_text("")
    environment = {key: value for key, value in os.environ.items() if key != "LEDGER_DATABASE_URL"}
    environment |= {
        "LEDGER_DATA_DIR": str(occupied / "var"),
        "LEDGER_API_KEYS": "",
        "COLUMNS": "200",
    }
    ran = subprocess.run(
        [sys.executable, "-m", "api", "projections", "status"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert ran.returncode == 1, ran.stderr
    assert ran.stderr.splitlines() == [f"error: Not a directory: {occupied / 'var'}"]


def embedded_running(data_dir: Path) -> bool:
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(data_dir.resolve() / "pgdata")
    return info is not None and info.is_running()


def test_a_command_on_the_embedded_default_leaves_no_server_it_started_running(
    tmp_path: Path,
) -> None:
    """Found by an operator's walkthrough: `ledger projections status` with no database
    URL started the embedded PostgreSQL and left it running after it exited. One it joined
    (`make run`'s) it leaves running."""
    data_dir = tmp_path / "var"
    environment = {key: value for key, value in os.environ.items() if key != "LEDGER_DATABASE_URL"}
    environment |= {"LEDGER_DATA_DIR": str(data_dir), "LEDGER_API_KEYS": "", "COLUMNS": "200"}

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "api", "projections", "status"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        alone = status()
        assert alone.returncode == 0, alone.stderr
        assert "stock" in alone.stdout
        assert not embedded_running(data_dir)

        joined = start_embedded(data_dir)  # as `make run` starts it
        beside = status()
        assert beside.returncode == 0, beside.stderr
        assert embedded_running(data_dir)
        joined.stop()
        assert not embedded_running(data_dir)
    finally:
        if embedded_running(data_dir):  # never left behind, whatever failed above
            from pgserver import pg_ctl

            user = "pgserver" if os.geteuid() == 0 else None  # as pgserver runs it
            pg_ctl(["-w", "stop"], pgdata=data_dir.resolve() / "pgdata", user=user)


def test_a_command_stopped_before_it_closed_its_connections_still_stops_the_server(
    tmp_path: Path,
) -> None:
    """A newcomer's walkthrough: `ledger projections run` stopped with Ctrl-C while it
    started left the embedded PostgreSQL running, its own connections, still open at exit,
    taken for another process's. Here a process exits with one open."""
    data_dir = tmp_path / "var"
    environment = {key: value for key, value in os.environ.items() if key != "LEDGER_DATABASE_URL"}
    environment |= {"LEDGER_DATA_DIR": str(data_dir), "LEDGER_API_KEYS": ""}
    environment.pop("PGAPPNAME", None)
    program = (
        "import psycopg\n"
        "from api.database import resolve_database_url\n"
        "from api.settings import Settings\n"
        "kept = psycopg.connect(resolve_database_url(Settings()))\n"
        "kept.execute('SELECT 1')\n"
    )
    try:
        ran = subprocess.run(
            [sys.executable, "-c", program], env=environment, capture_output=True, timeout=120
        )
        assert ran.returncode == 0, ran.stderr
        assert not embedded_running(data_dir), ran.stderr
    finally:
        if embedded_running(data_dir):  # never left behind, whatever failed above
            from pgserver import pg_ctl

            user = "pgserver" if os.geteuid() == 0 else None  # as pgserver runs it
            pg_ctl(["-w", "stop"], pgdata=data_dir.resolve() / "pgdata", user=user)


def test_code_older_than_the_data_refuses_the_database_before_touching_it(
    runtime: Runtime,
) -> None:
    """Found by an upgrade walkthrough: rolled back, older code migrated the database,
    said it was ready, then answered 500 for every SKU an event it cannot read named."""
    with psycopg.connect(runtime.database_url, autocommit=True) as conn:
        [(recorded,)] = conn.execute("SELECT version FROM ledger_data_version").fetchall()
        conn.execute("UPDATE ledger_data_version SET version = %s", (DATA_VERSION + 1,))

    with pytest.raises(NewerData, match="newer version of the ledger"):
        migrate(runtime.settings, runtime.database_url)
    with pytest.raises(NewerData):
        check_migrated(runtime.database_url, [])
    for args in (("migrate",), ("projections", "status"), ("serve", "--port", "1")):
        keys = {"LEDGER_API_KEYS": "ops:admin:" + "s" * 32}  # as `serve` needs one
        ran = ledger_command(runtime.database_url, *args, env=keys)
        assert ran.returncode == 2, ran.stderr
        assert "holds data of a newer version of the ledger" in ran.stderr
    with psycopg.connect(runtime.database_url) as conn:
        [(kept,)] = conn.execute("SELECT version FROM ledger_data_version").fetchall()
    assert (recorded, kept) == (DATA_VERSION, DATA_VERSION + 1)  # recorded, and not lowered


def test_an_export_that_cannot_run_leaves_the_last_one_as_it_was(
    ledger: Runtime, tmp_path: Path
) -> None:
    """Found by an auditor's walkthrough: the file was emptied before the database was
    reached, so an export run while it was down lost the last good copy."""
    mapped_sku(ledger)
    kept = tmp_path / "events.ndjson"
    kept.write_text("an older export\n")
    kept.chmod(0o600)  # an audit log holds actors and requests
    exported = ledger_command(ledger.database_url, "audit", "export", "--output", str(kept))
    assert exported.returncode == 0, exported.stderr
    good = kept.read_bytes()
    assert good.count(b"\n") >= 3
    assert kept.stat().st_mode & 0o777 == 0o600  # replaced, its mode kept

    down = ledger_command(
        "postgresql://postgres@127.0.0.1:1/nowhere", "audit", "export", "--output", str(kept)
    )

    assert down.returncode == 1
    assert "error: the database cannot be reached" in down.stderr
    assert kept.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.ndjson"]  # no part left

    # What is not a file (a pipe, /dev/stdout) is written in place, as before.
    piped = ledger_command(ledger.database_url, "audit", "export", "--output", "/dev/stdout")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.encode().startswith(good)
