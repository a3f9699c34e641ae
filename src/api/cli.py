"""The `ledger` command: serve the API, prepare the database."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn, cast

import psycopg
import typer
from eventsourcing.persistence import OperationalError as StoreUnavailable
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from api import serving
from api.database import (
    NotMigrated,
    migrate,
    require_migrated,
    resolve_database_url,
    start_embedded,
)
from api.logs import configure_logging
from api.metrics import prepare_directory, serve_worker_metrics
from api.runtime import (
    SERVE_PID,
    Runtime,
    jump_thresholds,
    open_runtime,
    rebuild_processes,
    tune_collector,
)
from api.schemas import delivery_id_problem
from api.settings import Settings, misspelt_settings
from api.transport import JoiningHttpToolsProtocol
from connectors import health, inbox
from connectors.deadletters import record_delivery_letters
from connectors.outcome import FeedRejected, IngestResult, describe_phases
from connectors.parsers import FORMATS, Format
from connectors.transports import delivery_format
from connectors.worker import ClaimLost
from ledger.errors import LedgerError
from projections.data_version import DATA_VERSION, NewerData
from projections.queries import PositionNotReached
from projections.registry import all_projections
from projections.runner import RebuildRunning, rebuild
from projections.status import ProjectionStatus, projection_status

cli = typer.Typer(help="Stockledger: an event-sourced inventory ledger.", no_args_is_help=True)


def _show_version(wanted: bool) -> None:
    if wanted:
        typer.echo(f"stockledger {version('stockledger')} (data version {DATA_VERSION})")
        raise typer.Exit


@cli.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="The version, and the data version it writes (see the README's rolling back).",
        ),
    ] = False,
) -> None:
    """Stockledger: an event-sourced inventory ledger."""


# How long a stopping server waits for requests still running before it cuts them off.
GRACEFUL_SHUTDOWN_SECONDS = 10


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    # In range: 70000 listened on 4464 (its remainder), saying 70000; with two workers,
    # a traceback (an operator's walkthrough).
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    demo: Annotated[bool, typer.Option(help="seed the demo catalogue and demo keys")] = False,
) -> None:
    """Runs the HTTP API. Workers share nothing but PostgreSQL."""
    # The demo's suppliers only with --demo: a third of a second of every start.
    if demo:
        from api.demo import DEMO_KEYS, LiveSuppliers, demo_settings_banner, seed_demo

        if not os.environ.get("LEDGER_API_KEYS"):
            os.environ["LEDGER_API_KEYS"] = DEMO_KEYS
    settings = Settings()
    configure_logging(settings)
    if not settings.api_keys:
        raise typer.BadParameter("set LEDGER_API_KEYS (name:role:secret,...), or use --demo")
    # The port first: one that is taken stops `serve` before anything starts.
    config, sock = serving.bind(
        "api.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        # A response's head and body in one write (api.transport).
        http=JoiningHttpToolsProtocol,
        # Streams end when the server stops (api.stream); one stuck writing to a client
        # that stopped reading is cut off after this.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    # Resolve (or start) the database once, here, and hand its URL to every worker.
    embedded = None if settings.database_url else start_embedded(settings.data_dir)
    database_url = embedded.url if embedded else resolve_database_url(settings)
    os.environ["LEDGER_DATABASE_URL"] = database_url
    # Migrated here, once for every worker (where this process is told to), or left to
    # others: then a database they have not migrated yet is refused before any worker
    # starts.
    os.environ["LEDGER_MIGRATE_ON_START"] = "false"
    # Uvicorn re-raises SIGTERM once it has shut down; as SystemExit it unwinds through
    # the `finally` below, which stops the embedded database this command started.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    live = None
    try:
        if settings.migrate_on_start:
            migrate(settings, database_url)
        else:
            require_migrated(settings, database_url)
        if demo:
            live = LiveSuppliers(settings.data_dir.resolve() / "demo").start()
            runtime = open_runtime(
                Settings(), migrate_first=False, sweep=False, project=False, connect=False
            )
            try:
                seed_demo(runtime.writer, live)
            finally:
                runtime.close()
            live.feed(f"http://{host}:{port}")
            typer.echo(demo_settings_banner(settings, f"http://{host}:{port}"))
        # Workers end with this process (api.app.create_app_from_env): killed with
        # `kill -9`, it left them serving, and a `serve` started again found the port
        # taken (a walkthrough).
        os.environ[SERVE_PID] = str(os.getpid())
        # Every worker counts in one directory, for /metrics to sum (api.metrics).
        with prepare_directory():
            # uvicorn.run, on the port bound above (api.serving).
            serving.run(config, sock)
    finally:
        if live is not None:
            live.stop()
        if embedded is not None:
            embedded.stop()


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM taken as Ctrl-C, by the commands that tidy up and say so when stopped."""
    raise KeyboardInterrupt


@cli.command("migrate")
def migrate_command() -> None:
    """Creates the event store's tables and makes the event log append-only."""
    settings = Settings()
    configure_logging(settings)
    migrate(settings, resolve_database_url(settings))


projections_cli = typer.Typer(help="Projections: status, the worker, rebuilds.")
audit_cli = typer.Typer(help="Audit: the log and the past, from the event store.")
cli.add_typer(projections_cli, name="projections")
cli.add_typer(audit_cli, name="audit")


@contextmanager
def _ledger(project: bool = False) -> Iterator[Runtime]:
    """The ledger without HTTP, for commands; projections run only when asked."""
    settings = Settings()
    configure_logging(settings)
    # Never the connectors, whatever LEDGER_RUN_CONNECTORS says: a command would take
    # supplier leases, fetch and move their files. `ingest` applies its file itself.
    runtime = open_runtime(
        settings,
        migrate_first=settings.migrate_on_start,
        sweep=False,
        project=project,
        connect=False,
    )
    tune_collector()
    try:
        yield runtime
    except LedgerError as refused:
        # A refusal is an answer, not a bug: its reason, without a traceback.
        typer.echo(f"error: {refused.message}", err=True)
        raise typer.Exit(1) from None
    finally:
        runtime.close()


connectors_cli = typer.Typer(help="Connectors: the worker that fetches and applies deliveries.")
cli.add_typer(connectors_cli, name="connectors")


MetricsPort = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=65535,
        envvar="LEDGER_METRICS_PORT",
        help="serve Prometheus metrics (GET /metrics) on this port, as `serve` does",
    ),
]
MetricsHost = Annotated[
    str, typer.Option(envvar="LEDGER_METRICS_HOST", help="the address the metrics listen on")
]


@contextmanager
def _metrics_served(runtime: Runtime, host: str, port: int | None) -> Iterator[None]:
    if port is None:
        yield
        return
    try:
        stop = serve_worker_metrics(runtime, host, port)
    except OSError as error:  # the port taken, say: said in a line, as a bad setting is
        typer.echo(f"error: cannot serve metrics on {host}:{port}: {error.strerror}", err=True)
        raise typer.Exit(2) from None
    try:
        yield
    finally:
        stop()


@connectors_cli.command("run")
def connectors_run(
    metrics_port: MetricsPort = None, metrics_host: MetricsHost = "127.0.0.1"
) -> None:
    """The connector worker: supplier schedules and the inbox, until stopped."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = Settings()
    configure_logging(settings)
    runtime = open_runtime(
        settings,
        migrate_first=settings.migrate_on_start,
        sweep=False,
        project=False,
        connect=True,
        observe=metrics_port is not None,
    )
    tune_collector()
    try:
        with _metrics_served(runtime, metrics_host, metrics_port), suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        runtime.close()


@projections_cli.command("status")
def projections_status() -> None:
    """Position and lag of every projection, in events and in seconds."""
    with _ledger() as runtime:
        table = Table("projection", "generation", "position", "lag (events)", "lag (s)", "error")
        for status in projection_status(runtime.store, runtime.app):
            table.add_row(
                status.name,
                str(status.generation) + _unless_live(status),
                str(status.position),
                str(status.lag_events),
                f"{status.lag_seconds:.1f}",
                status.error or "",
            )
        Console().print(table)


def _unless_live(status: ProjectionStatus) -> str:
    """What a generation that is not live is: being built, or left by a rebuild that was
    killed (shown as building for good: an operator walkthrough)."""
    if status.live:
        return ""
    return " (building)" if status.building else " (abandoned: the next rebuild drops it)"


@projections_cli.command("run")
def projections_run(
    metrics_port: MetricsPort = None, metrics_host: MetricsHost = "127.0.0.1"
) -> None:
    """The projection worker: keeps every projection it can lease up to date until stopped."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with (
        _ledger(project=True) as runtime,
        _metrics_served(runtime, metrics_host, metrics_port),
        suppress(KeyboardInterrupt),
    ):
        stop.wait()


@projections_cli.command("rebuild")
def projections_rebuild(
    name: Annotated[str | None, typer.Argument(help="one projection; all when omitted")] = None,
    in_place: Annotated[
        bool, typer.Option(help="switch to the empty new generation at once (no blue/green)")
    ] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            min=1, help="processes to apply a state view in (default LEDGER_REBUILD_PROCESSES)"
        ),
    ] = None,
) -> None:
    """Builds a projection again from position zero under a new generation, then switches."""
    # Stopped by SIGTERM as by Ctrl-C: its unfinished generation dropped, and said (it
    # ended at once with status 143, saying nothing, the generation left: a walkthrough).
    signal.signal(signal.SIGTERM, _interrupt)
    with _ledger() as runtime:
        chosen = [
            p
            for p in all_projections(runtime.app, jump_thresholds(runtime.settings))
            if name in (None, p.name)
        ]
        if not chosen:
            raise typer.BadParameter(f"no projection named {name!r}")
        last = runtime.app.recorder.max_notification_id() or 0
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        ) as progress:
            for projection in chosen:
                task = progress.add_task(projection.name, total=last)

                def advance(position: int, _applied: int, task: TaskID = task) -> None:
                    progress.update(task, completed=min(position, last))

                try:
                    built = rebuild(
                        projection,
                        runtime.app,
                        runtime.store,
                        runtime.leases,
                        in_place=in_place,
                        page_size=max(runtime.settings.projection_page_size, 10_000),
                        progress=advance,
                        processes=processes or rebuild_processes(runtime.settings),
                    )
                except RebuildRunning as running:
                    progress.stop()
                    typer.echo(f"error: {running}", err=True)
                    raise typer.Exit(1) from None
                except KeyboardInterrupt:
                    progress.stop()
                    left = (
                        "its new generation, live already (in place), is left for the"
                        " projections worker to go on with"
                        if in_place
                        else "its unfinished generation is dropped, the live one untouched:"
                        " run it again"
                    )
                    typer.echo(
                        f"error: the rebuild of {projection.name} was stopped; {left}", err=True
                    )
                    raise typer.Exit(130) from None
                progress.update(task, completed=last)
                progress.console.print(
                    f"{projection.name}: generation {built.generation} is live at {built.position}"
                )


@audit_cli.command("export")
def audit_export(
    after: Annotated[int, typer.Option(min=0, help="start after this log position")] = 0,
    named: Annotated[
        str,
        typer.Option("--output", help="NDJSON file to write (replaced if it exists); - for stdout"),
    ] = "events.ndjson",
) -> None:
    """Streams the global log from a position to an NDJSON file (or stdout)."""
    output = Path(named)
    to_stdout = named == "-"
    # A file is written beside itself, and replaced only once complete: an export that
    # could not run (the database down) or failed part-way emptied the last good one (an
    # auditor's walkthrough), taking its mode. Anything else (a pipe, /dev/stdout, a link)
    # is written in place. Opened first: a place that cannot be written is refused before
    # the ledger is opened.
    in_place = to_stdout or output.is_symlink() or (output.exists() and not output.is_file())
    part = output if in_place else output.with_name(f".{output.name}.{os.getpid()}.part")
    try:
        # A name ending in "/" names a directory (`/tmp/nodir/` wrote a file `/tmp/nodir`).
        if output.is_dir() or named.endswith(("/", os.sep)):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        out = sys.stdout if to_stdout else part.open("w")
    except OSError as error:
        raise typer.BadParameter(f"{named}: {error.strerror}", param_hint="'--output'") from None
    complete = False
    try:
        with _ledger() as runtime:
            last = runtime.audit.last_position()
            written = 0
            with Progress(
                TextColumn("export"),
                BarColumn(),
                MofNCompleteColumn(),
                console=Console(stderr=True),
            ) as progress:
                task = progress.add_task("export", total=max(0, last - after))
                for event in runtime.audit.events(after):
                    out.write(json.dumps(event.as_json(), separators=(",", ":")) + "\n")
                    written += 1
                    progress.update(task, completed=event.position - after)
            complete = True
    finally:
        if not to_stdout:
            out.close()
        if not in_place:
            if complete:
                if output.exists():
                    part.chmod(stat.S_IMODE(output.stat().st_mode))
                part.replace(output)
            else:
                part.unlink(missing_ok=True)
    typer.echo(f"{written} events written to {output}", err=to_stdout)


@audit_cli.command("snapshots")
def audit_snapshots(
    sku: Annotated[
        list[str] | None, typer.Option(help="check only this SKU's (may be given again)")
    ] = None,
) -> None:
    """Checks the snapshots against the events they stand for (status 1 where one differs)."""
    from projections.audit import check_snapshots

    with _ledger() as runtime:
        checked = check_snapshots(runtime.app, runtime.store, sku or [])
    for sku_asked in checked.missing:
        typer.echo(f"error: no SKU {sku_asked!r}: it has no events", err=True)
    for differs in checked.differing:
        typer.echo(
            f"error: {differs.name} at version {differs.version}: its snapshot is not what"
            f" its events give, in {', '.join(differs.fields)}",
            err=True,
        )
    typer.echo(
        f"{checked.snapshots} snapshots of {checked.streams} streams checked:"
        f" {len(checked.differing)} differ from their events"
    )
    if checked.differing or checked.missing:
        raise typer.Exit(1)


@audit_cli.command("stock")
def audit_stock(
    sku: str,
    at: Annotated[datetime | None, typer.Option(help="ISO 8601 time, with its zone")] = None,
    position: Annotated[int | None, typer.Option(min=1, help="log position")] = None,
) -> None:
    """Prints a SKU's state at a time or a log position."""
    from api.routers.audit import point_in_time_out

    if (at is None) == (position is None):
        raise typer.BadParameter("give exactly one of --at and --position")
    if at is not None and at.tzinfo is None:
        raise typer.BadParameter("--at needs a time zone, e.g. 2026-11-27T10:00:00+00:00")
    with _ledger() as runtime:
        moment = runtime.audit.stock_at(sku, at=at, position=position)
        typer.echo(
            json.dumps(point_in_time_out(moment, runtime.settings.limited_stock_at), indent=2)
        )


# The format of a file whose supplier has none set, by the file's name.
BY_SUFFIX = {
    ".csv": "csv",
    ".json": "json",
    ".xml": "xml",
    ".edi": "edi846",
    ".x12": "edi846",
    ".846": "edi846",
}


@cli.command("ingest")
def ingest_command(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    supplier: Annotated[str, typer.Option(help="the supplier the file comes from")],
    format: Annotated[
        str | None,
        typer.Option(
            help="csv, json, xml or edi846 (default: the supplier's, else by the file's suffix)"
        ),
    ] = None,
    delivery_id: Annotated[
        str | None, typer.Option(help="the supplier's id for it (default: the content hash)")
    ] = None,
) -> None:
    """Applies one feed file now, with a progress bar and a summary."""
    # Stopped by SIGTERM as by Ctrl-C: the delivery left failed, to be run again, and said
    # (it ended with status 143, saying nothing, the delivery left `processing`).
    signal.signal(signal.SIGTERM, _interrupt)
    problem = None if delivery_id is None else delivery_id_problem(delivery_id)
    if delivery_id == "":
        # It was taken for none, and the content hash used (an operator's walkthrough).
        problem = "is empty: leave it out for the content hash"
    if problem is not None:
        raise typer.BadParameter(problem, param_hint="'--delivery-id'")
    with _ledger() as runtime:
        terms = runtime.ingestor.terms(supplier)
        chosen = delivery_format(format, terms.connector) or BY_SUFFIX.get(file.suffix.lower())
        if chosen not in FORMATS:
            raise typer.BadParameter(
                f"--format is one of {', '.join(FORMATS)}"
                + ("" if format else " (the supplier has none set, nor does the file's name say)")
            )
        digest = hashlib.sha256()
        with file.open("rb") as source:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
        delivery = delivery_id or f"sha256:{digest.hexdigest()[:32]}"
        # Held for the run: it holds the delivery's claim, as an inbox worker's would,
        # so that no one else applies it meanwhile, and a run that dies lets go of it.
        with runtime.store.connection() as claiming:
            taken = inbox.take_up(
                claiming,
                supplier_id=supplier,
                delivery_id=delivery,
                source="cli",
                format=cast(str, chosen),
                content_hash=digest.hexdigest(),
                name=file.name,
            )
            if taken.delivery is None:
                _answer_taken(delivery, taken, chosen)
                return
            try:
                result = _apply_file(runtime, file, taken.delivery, chosen)
            finally:
                # (A session that broke took its lock with it.)
                with suppress(Exception):
                    inbox.release(claiming, taken.delivery)
        reasons = Counter(r.reason.split(":")[0] for r in result.rejections)
        typer.echo(_summary(result.as_dict(), reasons))
        typer.echo(f"took {describe_phases(result.seconds)}")


def _apply_file(
    runtime: Runtime, file: Path, delivery: inbox.Delivery, format: Format
) -> IngestResult:
    """Applies the file and records what became of it: applied, with its refused records
    as dead letters; or rejected whole (status 1), or failed."""
    try:
        result = _ingest_file(runtime, file, delivery, format)
    except FeedRejected as broken:
        _finish_file(runtime, delivery, "rejected", broken.reason)
        # The file is a file: the ledger refuses what is in it (status 1, not 2).
        typer.echo(f"error: the file is rejected whole: {broken.reason}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _interrupted(runtime, delivery)
    except ClaimLost:
        typer.echo(f"error: {TAKEN_OVER.format(delivery=delivery.delivery_id)}", err=True)
        raise typer.Exit(1) from None
    except PositionNotReached as behind:
        # The mappings view, which a delivery is resolved by, is kept by a projections
        # worker, not by this command: none is running. Not the supplier's failure (it
        # was counted one, after a traceback: an operator's walkthrough).
        with suppress(Exception):
            _finish_file(runtime, delivery, "failed", str(behind), counted=False)
        typer.echo(
            f"error: the {behind.projection} view is at {behind.reached}, not yet at"
            f" {behind.wanted}, the log's last event: is a projections worker running"
            " (`ledger serve` or `ledger projections run`)? Nothing is applied; run the"
            " same command again once it is.",
            err=True,
        )
        raise typer.Exit(1) from None
    except BaseException as error:
        # Left failed, not processing: the same file may be ingested again at once.
        with suppress(Exception):
            _finish_file(runtime, delivery, "failed", f"{type(error).__name__}: {error}")
        raise
    supplier, delivery_id = delivery.supplier_id, delivery.delivery_id
    try:
        with runtime.store.transaction() as conn:
            # Its outcome first: a run taken over (gone silent) records nothing more.
            if not inbox.finish(
                conn, delivery.id, "applied", result.as_dict(), None, attempt=delivery.attempts
            ):
                typer.echo(
                    f"error: delivery {delivery_id!r} was taken over by another run", err=True
                )
                raise typer.Exit(1)
            letters = record_delivery_letters(
                conn, delivery.id, supplier, delivery_id, result.rejections
            )
            if letters is not None:
                result.seconds["letters"] = letters
            health.succeeded(
                conn,
                supplier,
                delivery_id,
                result.rows,
                result.applied,
                result.rejected,
                result.lag_seconds,
                late=result.late,
            )
    except KeyboardInterrupt:
        # Stopped while its outcome and letters were written (they are not): as midway,
        # said, and left for the same command to finish (it left the delivery
        # `processing`, saying nothing: a walkthrough). Stopped just after they were
        # committed, it is applied, and said so (a review).
        if not _applied(runtime, delivery):
            _interrupted(runtime, delivery)
    return result


def _applied(runtime: Runtime, delivery: inbox.Delivery) -> bool:
    with suppress(Exception), runtime.store.connection() as conn:
        row = conn.execute(
            "SELECT status FROM connector_inbox WHERE id = %s", (delivery.id,)
        ).fetchone()
        return row is not None and row["status"] == "applied"
    return False


def _interrupted(runtime: Runtime, delivery: inbox.Delivery) -> NoReturn:
    """A run stopped by its operator (Ctrl-C, SIGTERM; it left the delivery failed, saying
    only "KeyboardInterrupt", and exited saying nothing): what is applied stays applied,
    and running the same command again applies the rest."""
    queued = False
    with suppress(Exception):
        # Stopped by its operator: no failure of the supplier's.
        queued = _finish_file(runtime, delivery, "failed", INTERRUPTED, counted=False)
    typer.echo(f"error: {INTERRUPTED_KEPT if queued else INTERRUPTED}", err=True)
    raise typer.Exit(130) from None


INTERRUPTED = (
    "interrupted before the whole file was applied: run the same `ledger ingest` again to"
    " apply the rest (what was applied stays, and is not applied twice)"
)
# When the same delivery was uploaded (or sent by webhook) while the file was applied, the
# inbox keeps that copy (see inbox.enqueue), and a worker finishes the delivery from it.
INTERRUPTED_KEPT = (
    "interrupted before the whole file was applied: the same delivery was received"
    " meanwhile, and an inbox worker applies the rest from that copy"
)
TAKEN_OVER = (
    "delivery {delivery!r} was taken over by an inbox worker (this run went silent too"
    " long), which applies the rest from the copy the inbox received"
)


# How often a file being applied says so in the inbox, at most: a run that stops saying
# so for inbox.take_up's `stale_after_seconds` is taken to have stopped.
HEARTBEAT_SECONDS = 30.0


def _ingest_file(
    runtime: Runtime, file: Path, delivery: inbox.Delivery, format: Format
) -> IngestResult:
    """Applies the file with a progress bar (bytes read, rows counted), renewing its
    claim in the inbox as it goes."""
    size = file.stat().st_size
    beaten = time.monotonic()

    def heartbeat() -> None:
        nonlocal beaten
        if time.monotonic() - beaten >= HEARTBEAT_SECONDS:
            with runtime.store.connection() as conn:
                # Taken over (a copy of the file came through the inbox, and this run
                # went silent): the worker applies it, so this run stops, as a worker would.
                if not inbox.heartbeat(conn, delivery):
                    raise ClaimLost(delivery.delivery_id)
            beaten = time.monotonic()

    with (
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]:,} rows"),
            TimeElapsedColumn(),
        ) as progress,
        file.open("rb") as source,
    ):
        # The bar follows the bytes read, the count the rows: a file's size is known
        # at once, its number of records only once it is read.
        task = progress.add_task(f"{file.name}", total=max(size, 1), rows=0)

        def advanced(rows: int) -> None:
            progress.update(task, completed=min(source.tell(), size), rows=rows)
            heartbeat()

        try:
            result = runtime.ingestor.ingest(
                delivery.supplier_id,
                delivery.delivery_id,
                source,
                format,
                source="cli",
                received_at=datetime.now(UTC),
                actor="cli",
                progress=advanced,
                heartbeat=heartbeat,
            )
        except BaseException:
            progress.stop()
            raise
        progress.update(task, completed=max(size, 1), rows=result.rows)
    return result


def _finish_file(
    runtime: Runtime, delivery: inbox.Delivery, status: str, error: str, *, counted: bool = True
) -> bool:
    """Records a file's delivery as rejected or failed, while this run's claim holds, and
    (`counted`) as the supplier's failure in feed health, as an inbox worker does: a file
    rejected by `ledger ingest` showed in neither feed health nor its metrics (a supplier
    integrator's walkthrough). A failed one that the inbox received a copy of meanwhile
    (see inbox.enqueue) is queued again, for a worker to finish from it: returns whether
    it was."""
    with runtime.store.transaction() as conn:
        finished = inbox.finish(conn, delivery.id, status, None, error, attempt=delivery.attempts)
        if finished and counted:
            health.failed(conn, delivery.supplier_id, error)
        return status == "failed" and inbox.queue_kept(conn, delivery)


def _answer_taken(delivery: str, taken: inbox.TakenUp, format: str) -> None:
    """Answers a file whose delivery id is taken: the same delivery applied already in the
    same format is answered with its first counts (status 0); anything else is refused
    (status 1), as an upload is (`409`)."""
    if taken.clash:
        message = f"delivery {delivery!r} was already received with other content" + (
            " (a stock report)" if taken.status == "reported" else ""
        )
    elif taken.status == "applied" and taken.format not in (None, format):
        # It was applied as read then: said, not passed over as the same delivery (an
        # operator's walkthrough), as an upload in another format is refused.
        message = (
            f"delivery {delivery!r} was already applied as {taken.format}: it is not read"
            f" again as {format} (give it another --delivery-id to apply it as a new one)"
        )
    elif taken.status == "applied":
        typer.echo(f"delivery {delivery!r} was already applied: nothing is applied again")
        typer.echo(_summary(taken.outcome or {}, Counter()))
        return
    elif taken.status in ("queued", "processing"):
        message = f"delivery {delivery!r} is {taken.status} (by {taken.source}): not applied yet"
    else:  # an inbox delivery that failed or was rejected keeps its copy to queue again
        message = (
            f"delivery {delivery!r} is {taken.status} ({taken.error}): once fixed, queue it"
            f" again with POST /v1/feeds/{delivery}/retry"
        )
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _summary(counts: dict[str, Any], reasons: Counter[str]) -> str:
    """A delivery's counts (`IngestResult.as_dict`), with its commonest refusals."""
    return (
        f"{counts.get('rows', 0):,} rows read: {counts.get('applied', 0):,} changed,"
        f" {counts.get('unchanged', 0):,} unchanged, {counts.get('late', 0):,} late,"
        f" {counts.get('rejected', 0):,} rejected"
        + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.most_common(5))})" if reasons else "")
    )


def main() -> None:
    for name, setting in misspelt_settings(os.environ):
        Console(stderr=True).print(
            f"[yellow]warning: {name} is no setting, and is not read: {setting}?[/yellow]",
            highlight=False,
            soft_wrap=True,
        )
    try:
        cli()
    except (NotMigrated, NewerData) as refused:
        # NewerData: newer code migrated the database while a command ran (a rebuild).
        Console(stderr=True).print(f"[red]{refused}[/red]", highlight=False)
        raise SystemExit(2) from None
    except (psycopg.OperationalError, StoreUnavailable) as lost:
        # The database away, refusing connections or too busy to give one: an outage to
        # say in one line, not a bug to trace (an operator's walkthrough got 222 lines).
        reason = str(lost).strip().splitlines()[0] if str(lost).strip() else type(lost).__name__
        Console(stderr=True).print(
            f"[red]error: the database cannot be reached: {reason}[/red]",
            highlight=False,
            soft_wrap=True,
        )
        raise SystemExit(1) from None
    except (FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError) as bad:
        # A path of the operator's that cannot be used (`LEDGER_DATA_DIR` under /proc, a
        # PROMETHEUS_MULTIPROC_DIR that is a file): one line, not a trace of 78 (an
        # operator's walkthrough).
        where = f": {bad.filename}" if bad.filename else ""
        Console(stderr=True).print(
            f"[red]error: {bad.strerror or bad}{where}[/red]", highlight=False, soft_wrap=True
        )
        raise SystemExit(1) from None
    except ValidationError as refused:
        if refused.title != Settings.__name__:
            raise
        # A setting that cannot be used: say which and why, one line each, not a trace of
        # the loading (a README walkthrough got 44 lines for LEDGER_POOL_SIZE=abc).
        console = Console(stderr=True)
        for error in refused.errors():
            loc = error["loc"]
            which = f"setting LEDGER_{str(loc[0]).upper()}" if loc else "settings"
            console.print(
                f"[red]error: {which}: {error['msg']}[/red]", highlight=False, soft_wrap=True
            )
        raise SystemExit(2) from None
