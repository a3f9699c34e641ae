"""A batch decides its commands as if they had come one by one, in the order they arrived."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import pytest

from ledger import writer as writer_module
from ledger.commands import Command, PutSku, Reserve
from ledger.errors import InsufficientStock
from ledger.queries import LedgerQueries
from ledger.writer import LedgerWriter, _Job
from tests.unit.test_writer import (
    CAUSE,
    held_up_writer,
    in_memory_writer,
    put_supplier,
    report_stock,
)


def stocked(quantity: int) -> LedgerWriter:
    """An in-memory writer with SKU "TOP", of which supplier acme has `quantity`."""
    writer = in_memory_writer()
    at = datetime.now(UTC)
    writer.apply(put_supplier("acme"))
    writer.apply(PutSku(at=at, cause=CAUSE, sku="TOP", safety_stock=0))
    writer.apply(report_stock("d", {"TOP": quantity}, at))
    return writer


def order(key: str, quantity: int) -> Reserve:
    return Reserve(
        at=datetime.now(UTC),
        cause=CAUSE,
        client="oms",
        idempotency_key=key,
        order_id=key,
        lines=[("TOP", quantity)],
        ttl_seconds=None,
        default_ttl_seconds=600,
    )


def outcome(future: Future[Any]) -> str:
    try:
        future.result(0)
    except InsufficientStock:
        return "refused"
    return "held"


def saves_counted(writer: LedgerWriter) -> list[int]:
    """The number of aggregates in each save the writer makes from now on."""
    saves: list[int] = []
    save = writer.app.save

    def counted(*aggregates: Any, **kwargs: Any) -> Any:
        saves.append(len(aggregates))
        return save(*aggregates, **kwargs)

    writer.app.save = counted  # type: ignore[method-assign]
    return saves


def test_orders_for_one_sku_in_one_batch_are_decided_in_the_order_they_arrived() -> None:
    quantities = [3, 3, 3, 1, 2]  # against 7: held, held, refused, held, refused
    batched = stocked(7)
    saves = saves_counted(batched)
    batch = [_Job(order(f"k{n}", q), Future()) for n, q in enumerate(quantities)]
    batched._run_batch(batch)

    one_by_one = stocked(7)
    alone = []
    for n, q in enumerate(quantities):
        job = _Job(order(f"k{n}", q), Future())
        one_by_one._run_batch([job])
        alone.append(outcome(job.future))

    assert [outcome(job.future) for job in batch] == ["held", "held", "refused", "held", "refused"]
    assert alone == [outcome(job.future) for job in batch]
    assert saves == [4]  # the stock item and the three reservations, together
    positions = {job.future.result(0).position for job in batch if outcome(job.future) == "held"}
    assert len(positions) == 1
    for writer in (batched, one_by_one):
        levels = LedgerQueries(writer.app).stock_levels("TOP", datetime.now(UTC))
        assert (levels.held, levels.available) == (7, 0)


def test_a_command_that_fails_after_changing_something_leaves_nothing_of_it_saved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handler that raises after its changes (a bug) cannot take them back: the others in
    its batch are decided again without it, and only theirs are saved."""
    real = writer_module.handler_for

    def failing_late(command: Command) -> Any:
        handler = real(command)
        if getattr(command, "idempotency_key", None) != "broken":
            return handler

        def broken(unit: Any, command: Command) -> Any:
            handler(unit, command)  # holds its stock, then fails
            raise RuntimeError("failed after holding")

        return broken

    monkeypatch.setattr(writer_module, "handler_for", failing_late)
    writer = stocked(10)
    saves = saves_counted(writer)
    batch = [_Job(order(key, 2), Future()) for key in ("first", "broken", "last")]
    writer._run_batch(batch)

    with pytest.raises(RuntimeError, match="failed after holding"):
        batch[1].future.result(0)
    assert [outcome(batch[0].future), outcome(batch[2].future)] == ["held", "held"]
    assert saves == [3]  # once: the stock item and the two good reservations
    levels = LedgerQueries(writer.app).stock_levels("TOP", datetime.now(UTC))
    assert (levels.held, levels.available) == (4, 6)


def test_a_batch_never_holds_more_commands_than_the_writer_is_allowed() -> None:
    gate = threading.Event()
    writer, sizes = held_up_writer(gate)
    writer.max_batch = 5
    writer.start()
    try:
        futures = [writer.submit(put_supplier(f"s{n}")) for n in range(23)]
        gate.set()
        for future in futures:
            future.result(5)
    finally:
        writer.stop()
    assert sum(sizes) == 23
    assert max(sizes) == 5  # the commands that waited went in batches of five
