"""The writer: each caller gets its own outcome, and a caller who gave up is not applied late."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from ledger.application import InventoryLedger
from ledger.base import Cause
from ledger.commands import Command, PutSupplier, Reserve
from ledger.errors import UnknownSku
from ledger.queries import LedgerQueries
from ledger.supplier import SupplierTerms
from ledger.writer import LedgerWriter, Outcome

CAUSE = Cause("test", "test", "test")


def in_memory_writer(timeout: float = 5) -> LedgerWriter:
    app = InventoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True)
    return LedgerWriter(app, timeout=timeout)


def put_supplier(supplier_id: str) -> PutSupplier:
    return PutSupplier(
        at=datetime.now(UTC), cause=CAUSE, supplier_id=supplier_id, terms=SupplierTerms("x")
    )


def test_a_command_whose_caller_gave_up_while_it_waited_is_never_applied() -> None:
    writer = in_memory_writer(timeout=0.2)
    gate = threading.Event()
    apply = writer.apply

    def held_up(command: Command) -> Outcome[object]:
        if isinstance(command, PutSupplier) and command.supplier_id == "first":
            gate.wait(5)
        return apply(command)

    writer.apply = held_up  # type: ignore[method-assign]
    writer.start()
    try:
        first = writer.submit(put_supplier("first"))
        with pytest.raises(TimeoutError):
            writer.execute(put_supplier("second"))
        gate.set()
        first.result(5)
        writer.execute(put_supplier("third"))
    finally:
        writer.stop()

    queries = LedgerQueries(writer.app)
    assert queries.supplier("first") is not None
    assert queries.supplier("second") is None
    assert queries.supplier("third") is not None


def test_a_refused_command_is_its_callers_error_and_the_writer_carries_on() -> None:
    writer = in_memory_writer().start()
    try:
        with pytest.raises(UnknownSku):
            writer.execute(
                Reserve(
                    at=datetime.now(UTC),
                    cause=CAUSE,
                    client="oms",
                    idempotency_key="k",
                    order_id="o",
                    lines=[("NOPE", 1)],
                    ttl_seconds=None,
                    default_ttl_seconds=60,
                )
            )
        assert writer.execute(put_supplier("after")).position is not None
        assert writer.alive
    finally:
        writer.stop()
