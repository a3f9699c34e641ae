"""The composition root: settings in, a running ledger out."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from api.database import migrate, resolve_database_url
from api.settings import Settings
from api.sweeper import ExpirySweeper
from ledger.application import InventoryLedger
from ledger.queries import LedgerQueries
from ledger.writer import LedgerWriter

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    settings: Settings
    database_url: str
    app: InventoryLedger
    writer: LedgerWriter
    queries: LedgerQueries
    sweeper: ExpirySweeper | None

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
        self.writer.stop()
        self.app.close()


def open_runtime(settings: Settings, *, migrate_first: bool = True, sweep: bool = True) -> Runtime:
    database_url = resolve_database_url(settings)
    if migrate_first:
        migrate(settings, database_url)
    app = InventoryLedger(settings.event_store_env(database_url))
    writer = LedgerWriter(app, timeout=settings.command_timeout_seconds).start()
    sweeper = (
        ExpirySweeper(writer, database_url, settings.sweep_interval_seconds).start()
        if sweep
        else None
    )
    log.info("ledger.started", sweeper=sweep)
    return Runtime(settings, database_url, app, writer, LedgerQueries(app), sweeper)
