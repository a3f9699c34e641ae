"""One small handler per command: load, ask the domain, hand the changes to the writer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ledger.commands import Command
from ledger.uow import UnitOfWork

Handler = Callable[[UnitOfWork, Any], Any]

HANDLERS: dict[type[Command], Handler] = {}


def handles(command_type: type[Command]) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[command_type] = handler
        return handler

    return register


def handler_for(command: Command) -> Handler:
    return HANDLERS[type(command)]


# Importing the modules registers their handlers.
from ledger.handlers import catalogue, reports, reservations  # noqa: E402

__all__ = ["HANDLERS", "catalogue", "handler_for", "handles", "reports", "reservations"]
