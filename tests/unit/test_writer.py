"""The writer: each caller gets its own outcome, and a caller who gave up is not applied late."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import pytest

from api.metrics import Metrics
from connectors import parts as parts_module
from connectors.outcome import IngestResult
from connectors.parts import MIN_PART, PartSender, _Applying
from ledger import writer as writer_module
from ledger.application import InventoryLedger
from ledger.base import Cause
from ledger.commands import BULK_FROM, Observation, PutSku, PutSupplier, ReportStock, Reserve
from ledger.errors import InsufficientStock, UnknownSku
from ledger.queries import LedgerQueries
from ledger.supplier import SupplierTerms
from ledger.writer import LedgerWriter, OutcomeUnknown, WriterStopped, _Job, _Settler

CAUSE = Cause("test", "test", "test")


def in_memory_writer(timeout: float = 5) -> LedgerWriter:
    app = InventoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True)
    return LedgerWriter(app, timeout=timeout)


def put_supplier(supplier_id: str) -> PutSupplier:
    return PutSupplier(
        at=datetime.now(UTC), cause=CAUSE, supplier_id=supplier_id, terms=SupplierTerms("x")
    )


def refused_order() -> Reserve:
    return Reserve(
        at=datetime.now(UTC),
        cause=CAUSE,
        client="oms",
        idempotency_key="k",
        order_id="o",
        lines=[("NOPE", 1)],
        ttl_seconds=None,
        default_ttl_seconds=60,
    )


def held_up_writer(
    gate: threading.Event, *, timeout: float = 5, linger: float = 0.0
) -> tuple[LedgerWriter, list[int]]:
    """A writer whose batches wait for the gate, and the size of each batch."""
    writer = in_memory_writer(timeout)
    writer.linger = linger
    run_batch = writer._run_batch
    sizes: list[int] = []

    def held_up(jobs: list[Any]) -> None:
        HELD.set()
        gate.wait(5)
        sizes.append(len(jobs))
        run_batch(jobs)

    writer._run_batch = held_up  # type: ignore[method-assign]
    HELD.clear()
    return writer, sizes


# Set when a held-up writer's batch has begun (reset by `held_up_writer`).
HELD = threading.Event()


def test_a_command_whose_caller_gave_up_while_it_waited_is_never_applied() -> None:
    writer = in_memory_writer(timeout=0.2)
    gate = threading.Event()
    run_batch = writer._run_batch

    def held_up(jobs: list[Any]) -> None:
        if any(getattr(job.command, "supplier_id", None) == "first" for job in jobs):
            gate.wait(5)
        run_batch(jobs)

    writer._run_batch = held_up  # type: ignore[method-assign]
    writer.metrics = metrics = Metrics()
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
    counted = metrics.registry.get_sample_value
    assert counted("ledger_commands_total", {"command": "PutSupplier", "outcome": "ok"}) == 2
    assert counted("ledger_commands_total", {"command": "PutSupplier", "outcome": "cancelled"}) == 1
    assert queries.supplier("third") is not None


def test_a_refused_command_is_its_callers_error_and_the_writer_carries_on() -> None:
    writer = in_memory_writer().start()
    try:
        with pytest.raises(UnknownSku):
            writer.execute(refused_order())
        assert writer.execute(put_supplier("after")).position is not None
        assert writer.alive
    finally:
        writer.stop()


def test_commands_that_arrive_together_are_saved_together_each_with_its_own_answer() -> None:
    gate = threading.Event()
    writer, sizes = held_up_writer(gate)
    writer.start()
    try:
        futures = [writer.submit(put_supplier(f"s{n}")) for n in range(30)]
        refused = writer.submit(refused_order())
        gate.set()
        outcomes = [future.result(5) for future in futures]
        with pytest.raises(UnknownSku):
            refused.result(5)
    finally:
        writer.stop()
    assert sum(sizes) == 31
    assert len(sizes) <= 2  # the first few, perhaps, then everything that waited
    # One save a batch: as many positions as batches (each holds a supplier).
    assert len({outcome.position for outcome in outcomes}) == len(sizes)
    assert all(outcome.value.created == 1 for outcome in outcomes)
    assert LedgerQueries(writer.app).supplier("s29") is not None


def report_stock(delivery_id: str, levels: dict[str, int], at: datetime) -> ReportStock:
    """Supplier acme's report of these levels (by our SKUs), one observation each."""
    return ReportStock(
        at=at,
        cause=CAUSE,
        supplier_id="acme",
        delivery_id=delivery_id,
        content_hash="h",
        source="test",
        rows=len(levels),
        observations=[
            Observation(index=n, sku=sku, quantity=quantity, observed_at=at)
            for n, (sku, quantity) in enumerate(levels.items())
        ],
    )


def test_a_refusal_in_a_batch_costs_the_other_commands_nothing() -> None:
    writer = in_memory_writer()
    at = datetime.now(UTC)
    writer.apply(put_supplier("acme"))
    writer.apply(PutSku(at=at, cause=CAUSE, sku="EMPTY", safety_stock=0))
    writer.apply(report_stock("d", {"EMPTY": 0}, at))
    attempts: list[int] = []
    attempt = writer._attempt

    def counted(jobs: list[Any], started: float, locked: Any = None) -> Any:
        attempts.append(len(jobs))
        return attempt(jobs, started, locked)

    writer._attempt = counted  # type: ignore[method-assign]
    short = [
        Reserve(
            at=at,
            cause=CAUSE,
            client="oms",
            idempotency_key=f"k{n}",
            order_id="o",
            lines=[("EMPTY", 1)],
            ttl_seconds=None,
            default_ttl_seconds=60,
        )
        for n in range(5)
    ]
    batch = [_Job(command, Future()) for command in [*short, put_supplier("other")]]
    writer._run_batch(batch)

    # Each refusal read the supplier for the first time, and changed nothing.
    assert attempts == [6]
    for job in batch[:5]:
        with pytest.raises(InsufficientStock):
            job.future.result(0)
    assert batch[5].future.result(0).value.created == 1


@pytest.mark.alone
def test_an_outcome_tells_how_long_the_writer_spent_on_its_batch() -> None:
    """A delivery sizes its next part by this (see connectors.parts)."""
    writer = in_memory_writer()
    save = writer.app.save

    def slow_save(*aggregates: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return save(*aggregates, **kwargs)

    writer.app.save = slow_save  # type: ignore[method-assign]
    writer.start()
    try:
        started = time.monotonic()
        outcome = writer.execute(put_supplier("timed"))
        waited = time.monotonic() - started
    finally:
        writer.stop()
    assert 0.05 <= outcome.seconds <= waited


def test_a_bulk_command_is_decided_in_a_batch_of_its_own_in_its_turn() -> None:
    """A part of a large delivery neither holds up the commands queued before it nor
    takes those after it into its batch; the order of arrival is kept."""
    writer = in_memory_writer()
    at = datetime.now(UTC)
    writer.apply(put_supplier("acme"))
    for n in range(BULK_FROM + 1):
        writer.apply(PutSku(at=at, cause=CAUSE, sku=f"B{n}", safety_stock=0))
    part = report_stock("big", {f"B{n}": 5 for n in range(BULK_FROM + 1)}, at)
    assert part.bulk
    assert not put_supplier("x").bulk
    assert not report_stock("small", {"B0": 5}, at).bulk
    least = report_stock("least", {f"B{n}": 5 for n in range(MIN_PART)}, at)
    assert least.bulk, "every part of a delivery the ingest sends is bulk"
    gate = threading.Event()
    run_batch = writer._run_batch
    batches: list[list[str]] = []

    def recorded(jobs: list[Any]) -> None:
        gate.wait(5)
        batches.append([type(job.command).__name__ for job in jobs])
        run_batch(jobs)

    writer._run_batch = recorded  # type: ignore[method-assign]
    writer.start()
    try:
        futures = [writer.submit(put_supplier(f"before{n}")) for n in range(3)]
        futures.append(writer.submit(part))
        futures += [writer.submit(put_supplier(f"after{n}")) for n in range(3)]
        gate.set()
        for future in futures:
            future.result(5)
    finally:
        writer.stop()
    # The first batch may have started before the rest arrived: what matters is that the
    # part is alone, after every command sent before it and before every one after it.
    flat = [name for batch in batches for name in batch]
    assert flat == ["PutSupplier"] * 3 + ["ReportStock"] + ["PutSupplier"] * 3
    assert ["ReportStock"] in batches
    assert futures[3].result(0).value.applied == BULK_FROM + 1


class BrokenMetrics:
    def batch(self, outcomes: Any, seconds: float) -> None:
        raise RuntimeError("the metrics broke")

    def conflict(self) -> None:
        raise RuntimeError("the metrics broke")

    def exclusive(self) -> None:
        raise RuntimeError("the metrics broke")

    def kept_try(self, outcome: str) -> None:
        raise RuntimeError("the metrics broke")


def test_metrics_that_fail_never_stop_the_writer() -> None:
    writer = in_memory_writer()
    writer.metrics = BrokenMetrics()
    writer.start()
    try:
        writer.execute(put_supplier("one"))
        writer.execute(put_supplier("two"))
    finally:
        writer.stop()
    assert writer.alive is False
    assert LedgerQueries(writer.app).supplier("two") is not None


def test_coroutines_get_their_own_outcomes_a_batch_in_one_wake_up_of_their_loop() -> None:
    gate = threading.Event()
    writer, sizes = held_up_writer(gate)
    wake_ups = 0
    settle = _Settler._settle

    def counted(self: _Settler) -> None:
        nonlocal wake_ups
        wake_ups += 1
        settle(self)

    async def orders() -> list[Any]:
        tasks = [writer.execute_async(put_supplier(f"a{n}")) for n in range(30)]
        waiting = asyncio.gather(
            *tasks, writer.execute_async(refused_order()), return_exceptions=True
        )
        await asyncio.sleep(0.05)  # all queued behind the held-up first batch
        gate.set()
        return await waiting

    writer.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_Settler, "_settle", counted)
            answers = asyncio.run(orders())
    finally:
        writer.stop()
    *outcomes, refused = answers
    assert isinstance(refused, UnknownSku)
    assert all(outcome.value.created == 1 for outcome in outcomes)
    assert len({outcome.position for outcome in outcomes[1:]}) == 1
    assert sum(sizes) == 31
    assert wake_ups == len(sizes) <= 2
    assert LedgerQueries(writer.app).supplier("a29") is not None


@pytest.mark.parametrize("gives_up", ["times out", "is cancelled"])
def test_a_coroutine_that_gives_up_while_its_command_waits_leaves_it_unapplied(
    gives_up: str,
) -> None:
    gate = threading.Event()
    writer, _ = held_up_writer(gate, timeout=0.2 if gives_up == "times out" else 5)

    async def orders() -> None:
        first = writer.submit(put_supplier("first"))
        await asyncio.sleep(0.05)  # the first batch is held up
        second = asyncio.ensure_future(writer.execute_async(put_supplier("second")))
        if gives_up == "times out":
            with pytest.raises(TimeoutError):
                await second
        else:
            await asyncio.sleep(0.05)
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
        gate.set()
        await asyncio.wrap_future(first)
        await writer.execute_async(put_supplier("third"))

    writer.start()
    try:
        asyncio.run(orders())
    finally:
        writer.stop()
    queries = LedgerQueries(writer.app)
    assert queries.supplier("first") is not None
    assert queries.supplier("second") is None
    assert queries.supplier("third") is not None


def test_an_outcome_a_coroutine_cannot_take_leaves_the_rest_of_its_batch_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An asyncio future refuses StopIteration as an exception (Python 3.11): the command
    that raised it gets an error of its own, and the rest of its batch their outcomes."""
    handler_for = writer_module.handler_for

    def some_raise_stop_iteration(command: Any) -> Any:
        if getattr(command, "supplier_id", None) == "bad":

            def bad(unit: Any, command: Any) -> Any:
                raise StopIteration

            return bad
        return handler_for(command)

    monkeypatch.setattr(writer_module, "handler_for", some_raise_stop_iteration)
    gate = threading.Event()
    writer, _ = held_up_writer(gate, timeout=5)

    async def orders() -> list[Any]:
        names = ("first", "bad", "after1", "after2")
        tasks = [asyncio.ensure_future(writer.execute_async(put_supplier(n))) for n in names]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)

    writer.start()
    try:
        first, bad, *after = asyncio.run(orders())
    finally:
        writer.stop()
    assert isinstance(bad, RuntimeError)
    assert "StopIteration" in str(bad)
    assert first.value.created == 1
    assert all(outcome.value.created == 1 for outcome in after)


def test_a_loop_that_closed_before_its_outcomes_arrive_never_stops_the_writer() -> None:
    writer = in_memory_writer().start()
    closed = asyncio.new_event_loop()
    closed.close()
    try:
        job = _Job(put_supplier("gone"), Future(), _Settler(closed), None)
        writer._jobs.put(job)
        assert job.future.result(5).value.created == 1
        assert writer.execute(put_supplier("after")).position is not None
        assert writer.alive
    finally:
        writer.stop()


def test_callers_left_when_the_writer_stops_are_told_so_even_after_one_gave_up() -> None:
    gate = threading.Event()
    writer, _ = held_up_writer(gate)

    async def orders() -> None:
        first = writer.submit(put_supplier("first"))
        await asyncio.sleep(0.05)  # the first batch is held up
        writer._jobs.put(None)  # and the writer asked to stop after it
        gave_up = asyncio.ensure_future(writer.execute_async(put_supplier("gave-up")))
        later = asyncio.ensure_future(writer.execute_async(put_supplier("later")))
        await asyncio.sleep(0.05)
        gave_up.cancel()
        gate.set()
        with pytest.raises(WriterStopped):
            await asyncio.wait_for(later, 2)
        first.result(5)

    writer.start()
    try:
        asyncio.run(orders())
    finally:
        writer.stop()


def batches_of_one_and_ten(writer: LedgerWriter, gate: threading.Event) -> None:
    """Load: a first command held up in its batch, then ten saved together after it."""
    first = writer.submit(put_supplier("first"))
    assert HELD.wait(5)
    load = [writer.submit(put_supplier(f"l{n}")) for n in range(10)]
    gate.set()
    for future in [first, *load]:
        future.result(5)


def test_under_load_a_small_batch_waits_a_moment_for_more() -> None:
    gate = threading.Event()
    writer, sizes = held_up_writer(gate, linger=0.3)
    writer.loaded_gap = 1.0  # the next order below comes as soon as this test sees the last
    writer.start()
    try:
        batches_of_one_and_ten(writer, gate)
        alone = writer.submit(put_supplier("alone"))
        time.sleep(0.05)  # within the linger: saved with the one before
        joined = writer.submit(put_supplier("joined"))
        assert alone.result(5).position == joined.result(5).position
    finally:
        writer.stop()
    assert sizes == [1, 10, 2]


@pytest.mark.alone
def test_a_lone_command_is_never_held_back() -> None:
    """Not after small batches, nor when it comes after a pause that followed a large one."""
    gate = threading.Event()
    writer, sizes = held_up_writer(gate, linger=5)
    writer.start()
    try:
        batches_of_one_and_ten(writer, gate)
        for n in range(3):
            time.sleep(0.05)  # a pause: no load
            started = time.monotonic()
            writer.execute(put_supplier(f"lone{n}"))
            assert time.monotonic() - started < 2
    finally:
        writer.stop()
    assert sizes == [1, 10, 1, 1, 1]


def stuck_in_its_save(writer: LedgerWriter, gate: threading.Event) -> None:
    """The writer's batches, once taken, wait for the gate before they are decided."""
    attempt = writer._attempt

    def held_up(*args: Any, **kwargs: Any) -> Any:
        gate.wait(5)
        return attempt(*args, **kwargs)

    writer._attempt = held_up  # type: ignore[method-assign]


@pytest.mark.parametrize("waits", ["on a thread", "in a coroutine"])
def test_a_command_taken_into_a_batch_past_its_deadline_may_yet_be_applied_and_says_so(
    waits: str,
) -> None:
    """Told it timed out and to retry, an OMS recorded a fulfil twice: the first, stuck in
    its save, was applied after its 503 (an OMS walkthrough)."""
    writer = in_memory_writer(timeout=0.2)
    gate = threading.Event()
    stuck_in_its_save(writer, gate)
    writer.start()

    async def waited() -> None:
        await writer.execute_async(put_supplier("taken"))

    def taken() -> None:
        if waits == "on a thread":
            writer.execute(put_supplier("taken"))
        else:
            asyncio.run(waited())

    try:
        with pytest.raises(OutcomeUnknown):
            taken()
        # A command queued behind it is dropped, and says so.
        with pytest.raises(TimeoutError) as dropped:
            writer.execute(put_supplier("queued"))
        gate.set()
        writer.execute(put_supplier("after"))
    finally:
        writer.stop()
    queries = LedgerQueries(writer.app)
    assert not isinstance(dropped.value, OutcomeUnknown)
    assert queries.supplier("taken") is not None  # applied after its caller gave up
    assert queries.supplier("queued") is None


class DecidedAtTheDeadline(Future[Any]):
    """A command's outcome that arrives as its caller's wait runs out."""

    def __init__(self, outcome: Any) -> None:
        super().__init__()
        self.outcome = outcome

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self.set_running_or_notify_cancel()
            self.set_result(self.outcome)
            raise TimeoutError
        return super().result(timeout)


def test_a_command_decided_just_as_its_deadline_passed_gets_its_own_answer() -> None:
    writer = in_memory_writer(timeout=0.2)
    decided = DecidedAtTheDeadline("its outcome")
    writer.submit = lambda command: decided  # type: ignore[method-assign,assignment,return-value]
    assert writer.execute(put_supplier("x")) == "its outcome"


def test_a_feed_part_taken_past_its_deadline_may_yet_be_applied_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a command's (above): a part the writer took runs on; one still queued is dropped."""
    monkeypatch.setattr(parts_module, "PART_TIMEOUT", 0.05)
    sender = PartSender(in_memory_writer(), batch_size=10, part_seconds=1)
    taken: Future[Any] = Future()
    taken.set_running_or_notify_cancel()
    queued: Future[Any] = Future()
    result = IngestResult("delivery")

    with pytest.raises(OutcomeUnknown):
        sender._settle(_Applying(taken, 1, [], 0), result, None)
    with pytest.raises(TimeoutError) as dropped:
        sender._settle(_Applying(queued, 1, [], 0), result, None)

    assert not isinstance(dropped.value, OutcomeUnknown)
    assert queued.cancelled()
    assert not taken.cancelled()
