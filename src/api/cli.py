"""The `ledger` command: serve the API, prepare the database."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Annotated

import typer
import uvicorn

from api.database import migrate, resolve_database_url, start_embedded
from api.logs import configure_logging
from api.settings import Settings

cli = typer.Typer(help="Stockledger: an event-sourced inventory ledger.", no_args_is_help=True)


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    demo: Annotated[bool, typer.Option(help="seed the demo catalogue and demo keys")] = False,
) -> None:
    """Runs the HTTP API. Workers share nothing but PostgreSQL."""
    from api.demo import DEMO_KEYS, demo_settings_banner, seed_demo
    from api.runtime import open_runtime

    if demo and not os.environ.get("LEDGER_API_KEYS"):
        os.environ["LEDGER_API_KEYS"] = DEMO_KEYS
    settings = Settings()
    configure_logging(settings)
    if not settings.api_keys:
        raise typer.BadParameter("set LEDGER_API_KEYS (name:role:secret,...), or use --demo")
    # Resolve (or start) the database once, here, and hand its URL to every worker.
    embedded = None if settings.database_url else start_embedded(settings.data_dir)
    database_url = embedded.url if embedded else resolve_database_url(settings)
    os.environ["LEDGER_DATABASE_URL"] = database_url
    os.environ["LEDGER_MIGRATE_ON_START"] = "false"
    # Uvicorn re-raises SIGTERM once it has shut down; as SystemExit it unwinds through
    # the `finally` below, which stops the embedded database this command started.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        migrate(settings, database_url)
        if demo:
            runtime = open_runtime(Settings(), migrate_first=False, sweep=False)
            try:
                seed_demo(runtime.writer)
            finally:
                runtime.close()
            typer.echo(demo_settings_banner(settings, f"http://{host}:{port}"))
        uvicorn.run(
            "api.app:create_app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=None,
            access_log=False,
        )
    finally:
        if embedded is not None:
            embedded.stop()


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@cli.command("migrate")
def migrate_command() -> None:
    """Creates the event store's tables and makes the event log append-only."""
    settings = Settings()
    configure_logging(settings)
    migrate(settings, resolve_database_url(settings))


def main() -> None:
    cli()
