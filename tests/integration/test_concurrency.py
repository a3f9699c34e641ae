"""The no-oversell contract under concurrency, against a real PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Any
from uuid import UUID

import psycopg
import pytest

from api.metrics import Metrics
from api.runtime import Runtime, open_runtime
from ledger import hot
from ledger.commands import PutMappings
from ledger.errors import InsufficientStock, Unstorable
from ledger.mapping import MappingSpec
from ledger.reservation import Reservation
from ledger.stock import StockItem
from ledger.writer import LedgerWriter, _Job
from tests.conftest import make_settings, random_sku
from tests.integration.ledger_setup import (
    CAUSE,
    now,
    put_supplier,
    report,
    reserve,
    stock_sku,
)
from tests.integration.workers import compete, compete_spread


def placed_events(runtime: Runtime, reservation_id: str) -> int:
    events = runtime.app.events.get(UUID(reservation_id))
    return sum(isinstance(event, Reservation.Placed) for event in events)


def test_sixteen_threads_on_one_hot_sku_are_granted_exactly_the_stock(runtime: Runtime) -> None:
    sku = random_sku("HOT")
    stock_sku(runtime.writer, sku, 50)
    granted: list[str] = []
    refused = 0
    lock = threading.Lock()

    def attempt(_: int) -> None:
        nonlocal refused
        try:
            outcome = runtime.writer.execute(reserve([(sku, 1)]))
        except InsufficientStock:
            with lock:
                refused += 1
            return
        with lock:
            granted.append(str(outcome.value.reservation.id))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(attempt, range(120)))

    assert len(granted) == 50
    assert refused == 70
    levels = runtime.queries.stock_levels(sku, now())
    assert (levels.held, levels.available) == (50, 0)


def test_the_configured_batch_cap_holds_under_load_and_the_stock_is_granted_exactly(
    database_url: str,
) -> None:
    runtime = open_runtime(make_settings(database_url, writer_max_batch=4), sweep=False)
    try:
        sku = random_sku("CAPPED")
        stock_sku(runtime.writer, sku, 30)
        sizes: list[int] = []
        run_batch = runtime.writer._run_batch

        def counted(jobs: list[_Job]) -> None:
            sizes.append(len(jobs))
            run_batch(jobs)

        runtime.writer._run_batch = counted  # type: ignore[method-assign]

        def attempt(_: int) -> bool:
            try:
                runtime.writer.execute(reserve([(sku, 1)]))
            except InsufficientStock:
                return False
            return True

        with ThreadPoolExecutor(16) as pool:
            granted = sum(pool.map(attempt, range(60)))
        levels = runtime.queries.stock_levels(sku, now())
    finally:
        runtime.close()
    assert sum(sizes) == 60
    assert max(sizes) == 4  # 16 callers at once: full batches, never more
    assert granted == 30
    assert (levels.held, levels.available) == (30, 0)


def test_two_processes_on_one_hot_sku_are_granted_exactly_the_stock(
    runtime: Runtime, database_url: str
) -> None:
    sku = random_sku("HOT")
    stock_sku(runtime.writer, sku, 200)
    # Each process tries for 150 of the 200: neither can take it all, however fast it is.
    per_process = compete(database_url, sku, processes=2, attempts=150, threads=8)
    granted = [rid for rids in per_process for rid in rids]

    assert all(len(rids) >= 50 for rids in per_process), [len(r) for r in per_process]
    assert len(granted) == 200
    assert len(set(granted)) == 200
    item = runtime.app.repository.get(StockItem.id_for(sku))
    assert item.levels(now(), {}).held == 200


def test_two_processes_ordering_across_many_scarce_skus_grant_each_exactly_what_it_holds(
    runtime: Runtime, database_url: str
) -> None:
    """Batches of one- and two-line orders over 20 SKUs of 5 units each, from two
    processes at once: their writers collide on shared SKUs and decide again, and every
    SKU ends holding exactly the lines the two were told were granted, never past its
    stock."""
    skus = [random_sku("SCARCE") for _ in range(20)]
    for sku in skus:
        stock_sku(runtime.writer, sku, 5)
    returned = [line for lines in compete_spread(database_url, skus, 2, 150, 8) for line in lines]
    granted = Counter(line for line in returned if not line.startswith("conflicts="))
    conflicts = sum(int(line.split("=")[1]) for line in returned if line.startswith("conflicts="))
    assert conflicts > 0, conflicts  # the two did collide
    for sku in skus:
        levels = runtime.queries.stock_levels(sku, now())
        assert levels.held == granted[sku] <= 5, sku
        assert levels.available == 5 - granted[sku], sku
    assert sum(granted.values()) >= 80  # 300 orders for 100 units: most of them sell


def test_one_idempotency_key_replayed_concurrently_by_two_processes_makes_one_reservation(
    runtime: Runtime, database_url: str
) -> None:
    sku = random_sku("IDEM")
    stock_sku(runtime.writer, sku, 100)
    per_process = compete(database_url, sku, processes=2, attempts=20, threads=8, key="same")
    answers = [rid for rids in per_process for rid in rids]

    assert len(answers) == 40
    assert len(Counter(answers)) == 1
    assert placed_events(runtime, answers[0]) == 1
    assert runtime.queries.stock_levels(sku, now()).held == 1


def test_a_multi_line_order_short_on_one_line_leaves_every_sku_untouched(
    runtime: Runtime,
) -> None:
    plenty, scarce = random_sku("PLENTY"), random_sku("SCARCE")
    stock_sku(runtime.writer, plenty, 100)
    stock_sku(runtime.writer, scarce, 3)
    versions = {
        sku: runtime.app.repository.get(StockItem.id_for(sku)).version for sku in (plenty, scarce)
    }
    position = runtime.app.recorder.max_notification_id()

    with pytest.raises(InsufficientStock) as refused:
        runtime.writer.execute(reserve([(plenty, 10), (scarce, 2), (scarce, 2)]))

    assert [(s.sku, s.requested, s.available) for s in refused.value.shortfalls] == [(scarce, 4, 3)]
    assert runtime.app.recorder.max_notification_id() == position
    for sku, version in versions.items():
        assert runtime.app.repository.get(StockItem.id_for(sku)).version == version
    assert runtime.queries.stock_levels(plenty, now()).available == 100
    assert runtime.queries.stock_levels(scarce, now()).available == 3


def another_process_orders_before_the_next_save(
    runtime: Runtime, sku: str
) -> list[list[list[str]]]:
    """Has another process order one unit of `sku` between this writer's next read and
    its save (once); returns what that process was granted, once it has run."""
    return other_processes_order_before_the_next_saves(runtime, sku)


def other_processes_order_before_the_next_saves(
    runtime: Runtime, *skus: str
) -> list[list[list[str]]]:
    """Has another process order one unit of `skus[i]` just before this writer's i-th
    save from now; returns what those processes were granted, once they have run."""
    save = runtime.app.save
    other_process: list[list[list[str]]] = []

    def save_after_another_process_wrote(*aggregates: Any, **kwargs: Any) -> Any:
        if len(other_process) < len(skus):
            other_process.append(compete(runtime.database_url, skus[len(other_process)], 1, 1, 1))
        return save(*aggregates, **kwargs)

    runtime.app.save = save_after_another_process_wrote  # type: ignore[method-assign]
    return other_process


def test_a_conflict_from_another_process_runs_again_and_takes_turns_only_on_its_streams(
    runtime: Runtime,
) -> None:
    skus = [random_sku("SPREAD") for _ in range(8)]
    for sku in skus:
        stock_sku(runtime.writer, sku, 10)
    writer = runtime.writer
    # Between this writer's read and its save, another process reserves the first SKU.
    other_process = another_process_orders_before_the_next_save(runtime, skus[0])

    attempts: list[list[str]] = []
    attempt = writer._attempt

    def counted(jobs: list[_Job], started: float, locked: Any = None) -> Any:
        attempts.append([job.command.lines[0][0] for job in jobs])  # type: ignore[attr-defined]
        return attempt(jobs, started, locked)

    turns: list[list[UUID]] = []
    take_turns = writer.take_turns
    assert take_turns is not None

    def recorded(streams: list[UUID]) -> AbstractContextManager[None]:
        turns.append(streams)
        return take_turns(streams)

    writer._attempt = counted  # type: ignore[method-assign]
    writer.take_turns = recorded
    batch = [_Job(reserve([(sku, 1)]), Future()) for sku in skus]
    conflicts = writer.conflicts
    writer._run_batch(batch)

    # The seven orders on streams nobody else wrote commit at once, as they were decided
    # (the store held what they read); only the first SKU's order is decided again, on
    # the state the other process left.
    assert attempts == [skus, skus[:1]]
    assert writer.conflicts == conflicts + 1
    assert [len(granted) for granted in other_process[0]] == [1]
    for job in batch:
        assert job.future.result(0).value.reservation.lines
    for sku in skus:
        held = runtime.queries.stock_levels(sku, now()).held
        assert held == (2 if sku == skus[0] else 1), sku
    # From then on, batches take turns with other processes on the stream that collided,
    # and on no other: the round trips are spent only where writers meet.
    contended = StockItem.id_for(skus[0])
    assert turns == [[contended]]
    writer.execute(reserve([(skus[1], 1), (skus[0], 1)]))
    writer.execute(reserve([(skus[2], 1)]))
    assert turns == [[contended], [contended]]


def test_after_a_conflict_the_orders_that_read_what_a_retried_order_changed_retry_with_it(
    runtime: Runtime,
) -> None:
    """Another process writes SKU a; an order for a and b must be decided again, and so
    must a later order for b alone, which read the b that order changed; orders for c and
    d read nothing that moved, and commit at once, as decided."""
    a, b, c, d = (random_sku(name) for name in "ABCD")
    for sku in (a, b, c, d):
        stock_sku(runtime.writer, sku, 10)
    writer = runtime.writer
    another_process_orders_before_the_next_save(runtime, a)

    attempts: list[list[tuple[str, ...]]] = []
    attempt = writer._attempt

    def counted(jobs: list[_Job], started: float, locked: Any = None) -> Any:
        attempts.append([tuple(s for s, _ in job.command.lines) for job in jobs])  # type: ignore[attr-defined]
        return attempt(jobs, started, locked)

    writer._attempt = counted  # type: ignore[method-assign]
    orders = [[(a, 1), (b, 1)], [(b, 2)], [(c, 1)], [(d, 1)]]
    batch = [_Job(reserve(lines), Future()) for lines in orders]
    writer._run_batch(batch)

    assert attempts == [[(a, b), (b,), (c,), (d,)], [(a, b), (b,)]]
    for job in batch:
        assert job.future.result(0).value.reservation.lines
    held = {sku: runtime.queries.stock_levels(sku, now()).held for sku in (a, b, c, d)}
    assert held == {a: 2, b: 3, c: 1, d: 1}
    # Each order was answered with where its own save put it: c and d's first.
    positions = [job.future.result(0).position for job in batch]
    assert positions[2] == positions[3] < positions[0] == positions[1]


def test_orders_saved_as_decided_after_a_conflict_are_decided_again_if_that_save_collides(
    runtime: Runtime,
) -> None:
    """Another process writes a before the batch's save, and c before the save of the
    orders that read nothing that moved: those are then decided again too, on what the
    store holds, and every order is granted once."""
    a, c, d = (random_sku(name) for name in "ACD")
    for sku in (a, c, d):
        stock_sku(runtime.writer, sku, 10)
    writer = runtime.writer
    other_processes_order_before_the_next_saves(runtime, a, c)

    attempts: list[list[str]] = []
    attempt = writer._attempt

    def counted(jobs: list[_Job], started: float, locked: Any = None) -> Any:
        attempts.append([job.command.lines[0][0] for job in jobs])  # type: ignore[attr-defined]
        return attempt(jobs, started, locked)

    writer._attempt = counted  # type: ignore[method-assign]
    batch = [_Job(reserve([(sku, 1)]), Future()) for sku in (a, c, d)]
    writer._run_batch(batch)

    assert attempts == [[a, c, d], [c, d], [a]]
    for job in batch:
        assert job.future.result(0).value.reservation.lines
    held = {sku: runtime.queries.stock_levels(sku, now()).held for sku in (a, c, d)}
    assert held == {a: 2, c: 2, d: 1}
    for job in batch:
        assert placed_events(runtime, str(job.future.result(0).value.reservation.id)) == 1


def test_a_command_whose_events_cannot_be_stored_is_refused_alone_and_its_batch_saved(
    runtime: Runtime,
) -> None:
    """An order whose id holds a lone surrogate (which no validation upstream let through
    here: this is the writer's own guard) fails to encode when the batch is saved: it is
    refused alone, and the orders beside it, one on the same SKU, are saved."""
    a, b = random_sku("A"), random_sku("B")
    for sku in (a, b):
        stock_sku(runtime.writer, sku, 10)
    orders = [
        reserve([(a, 1)]),
        reserve([(a, 2)], order_id="bad-\ud800"),
        reserve([(a, 3)]),
        reserve([(b, 4)]),
    ]
    batch = [_Job(order, Future()) for order in orders]
    runtime.writer._run_batch(batch)

    with pytest.raises(Unstorable, match="cannot be stored"):
        batch[1].future.result(0)
    for job in (batch[0], batch[2], batch[3]):
        assert job.future.result(0).value.reservation.lines
    held = {sku: runtime.queries.stock_levels(sku, now()).held for sku in (a, b)}
    assert held == {a: 4, b: 4}
    # The writer carries on: the next batch saves.
    assert runtime.writer.execute(reserve([(b, 1)])).value.reservation.lines


def test_a_batch_that_keeps_losing_its_stream_to_another_writer_saves_holding_the_lock(
    runtime: Runtime,
) -> None:
    """Turns are taken only by a writer that collided: another that keeps winning never
    queues, and could starve it. After a few collisions in a row the loser decides and
    saves holding the event table's lock, which the winner's saves wait for."""
    from ledger.application import InventoryLedger
    from ledger.writer import EXCLUSIVE_AFTER, LedgerWriter

    sku = random_sku("STARVED")
    stock_sku(runtime.writer, sku, 100)
    other_app = InventoryLedger(runtime.settings.event_store_env(runtime.database_url))
    other = LedgerWriter(other_app).start()
    save = runtime.app.save
    rival: list[str] = []
    threads: list[threading.Thread] = []

    def save_after_the_other_writer_reserved(*aggregates: Any, **kwargs: Any) -> Any:
        # Between every read of this writer and its save, the other writer reserves the
        # same SKU, unless it has to wait for this one.
        reserved = threading.Event()

        def other_reserves() -> None:
            other.execute(reserve([(sku, 1)]))
            reserved.set()

        threads.append(threading.Thread(target=other_reserves))
        threads[-1].start()
        rival.append("reserved" if reserved.wait(1.0) else "waited")
        return save(*aggregates, **kwargs)

    conflicts, exclusive = runtime.writer.conflicts, runtime.writer.exclusive
    metrics = runtime.writer.metrics = Metrics()
    runtime.app.save = save_after_the_other_writer_reserved  # type: ignore[method-assign]
    try:
        placed = runtime.writer.execute(reserve([(sku, 2)]))
    finally:
        runtime.app.save = save  # type: ignore[method-assign]
        for thread in threads:
            thread.join(10)
        other.stop()
        other_app.close()

    assert rival == ["reserved"] * EXCLUSIVE_AFTER + ["waited"]
    assert runtime.writer.conflicts == conflicts + EXCLUSIVE_AFTER
    assert runtime.writer.exclusive == exclusive + 1
    # What /metrics shows of it: one order answered, after every collision and the save
    # under the lock.
    counted = metrics.registry.get_sample_value
    assert counted("ledger_writer_conflicts_total") == EXCLUSIVE_AFTER
    assert counted("ledger_writer_exclusive_saves_total") == 1
    assert counted("ledger_commands_total", {"command": "Reserve", "outcome": "ok"}) == 1
    assert counted("ledger_writer_batch_commands_count") == 1
    assert placed.value.reservation.lines[sku].quantity == 2
    # The other writer's last order, decided before this save and saved after it, was
    # decided again on the state this save left: nothing lost, nothing oversold.
    assert runtime.queries.stock_levels(sku, now()).held == 2 + EXCLUSIVE_AFTER + 1


def test_a_kept_stock_item_is_brought_up_to_date_with_another_process_s_writes(
    runtime: Runtime,
) -> None:
    """The writer keeps the SKUs it saved; when another process orders the same SKU, the
    next batch reads only the events written since, and decides on them: no conflict, no
    stale stock, no oversell."""
    sku = random_sku("KEPT")
    stock_sku(runtime.writer, sku, 5)
    runtime.writer.execute(reserve([(sku, 2)]))
    item_id = StockItem.id_for(sku)
    assert item_id in runtime.writer.hot

    [granted] = compete(runtime.database_url, sku, 1, 2, 1)  # another process: 2 orders
    assert len(granted) == 2
    conflicts = runtime.writer.conflicts

    with pytest.raises(InsufficientStock):
        runtime.writer.execute(reserve([(sku, 2)]))
    last = runtime.writer.execute(reserve([(sku, 1)]))

    assert runtime.writer.conflicts == conflicts, "the kept item was fast-forwarded"
    kept = last.value.reservation
    assert kept.lines[sku].quantity == 1
    stored = runtime.app.repository.get(item_id)
    assert stored.levels(now(), {}).held == 5


# Deciding on what the writer keeps, without asking the store (ledger.hot) -----------


@contextmanager
def another_writer(runtime: Runtime) -> Iterator[LedgerWriter]:
    """A second writer on the same store, as another process's: the first one's kept
    aggregates never see what it saves."""
    other = LedgerWriter(runtime.app).start()
    try:
        yield other
    finally:
        other.stop()


@pytest.mark.usefixtures("quiet_lasts")
def test_an_order_granted_on_kept_state_another_writer_changed_saves_nothing_and_is_refused(
    runtime: Runtime,
) -> None:
    sku = random_sku("QUIET")
    stock_sku(runtime.writer, sku, 5)
    runtime.writer.execute(reserve([(sku, 1)]))
    runtime.writer.execute(reserve([(sku, 1)]))
    with another_writer(runtime) as other:
        other.execute(reserve([(sku, 3)]))  # all that is left
    unasked, conflicts = runtime.writer.hot.unasked, runtime.writer.conflicts
    metrics = runtime.writer.metrics = Metrics()

    with pytest.raises(InsufficientStock):
        runtime.writer.execute(reserve([(sku, 1)]))

    assert runtime.writer.hot.unasked > unasked, "decided first on what it kept"
    tries = metrics.registry.get_sample_value
    assert tries("ledger_writer_kept_tries_total", {"outcome": "not_as_kept"}) == 1, (
        "its save found that another process had saved since, and inserted nothing"
    )
    assert runtime.writer.conflicts == conflicts, "so it collided with nothing"
    stored = runtime.app.repository.get(StockItem.id_for(sku))
    assert stored.levels(now(), {}).held == 5, "nothing oversold"


@pytest.mark.usefixtures("quiet_lasts")
def test_an_order_refused_on_kept_state_is_decided_again_on_what_the_store_holds(
    runtime: Runtime,
) -> None:
    sku = random_sku("QUIET")
    stock_sku(runtime.writer, sku, 2)
    runtime.writer.execute(reserve([(sku, 2)]))
    with another_writer(runtime) as other:
        report(other, sku, 10)  # the supplier has more now
    unasked, conflicts = runtime.writer.hot.unasked, runtime.writer.conflicts

    granted = runtime.writer.execute(reserve([(sku, 3)]))

    assert granted.value.reservation.lines[sku].quantity == 3
    assert runtime.writer.hot.unasked > unasked, "refused first on what it kept"
    assert runtime.writer.conflicts == conflicts, "a refusal writes nothing to collide with"


@pytest.mark.usefixtures("quiet_lasts")
@pytest.mark.parametrize(("stock", "how"), [(5, "collides"), (2, "is refused, then asks")])
def test_an_order_replayed_right_after_it_was_placed_is_answered_as_placed(
    runtime: Runtime, stock: int, how: str
) -> None:
    """The writer takes a new order's reservation as absent while quiet; a replay's
    exists: the replay's save collides (stock left) or, refused, it has nothing to save
    (none left), and either way it is decided again on what the store holds and answered
    with the reservation placed, once. Its own guess, not another process's write: no
    conflict counted."""
    sku = random_sku("QUIET")
    stock_sku(runtime.writer, sku, stock)
    order = reserve([(sku, 2)], key=f"replayed-{sku}")
    placed = runtime.writer.execute(order)
    unasked, conflicts = runtime.writer.hot.unasked, runtime.writer.conflicts

    replayed = runtime.writer.execute(order)

    assert runtime.writer.hot.unasked > unasked, f"decided first on what it kept ({how})"
    assert replayed.value.replayed
    assert replayed.value.reservation.id == placed.value.reservation.id
    assert placed_events(runtime, str(placed.value.reservation.id)) == 1
    assert runtime.writer.conflicts == conflicts
    stored = runtime.app.repository.get(StockItem.id_for(sku))
    assert stored.levels(now(), {}).held == 2


@pytest.mark.usefixtures("quiet_lasts")
def test_an_order_decided_on_kept_state_is_decided_again_if_another_writer_saved_meanwhile(
    runtime: Runtime,
) -> None:
    """The supplier's terms are read, never written, by an order: no collision guards
    them. The save does: it finds that another process saved since this writer's last
    save, saves nothing, and the order is decided on what the store holds."""
    sku = random_sku("QUIET")
    stock_sku(runtime.writer, sku, 5, "held-back")
    runtime.writer.execute(reserve([(sku, 1)]))
    with another_writer(runtime) as other:
        put_supplier(other, "held-back", buffer=5)  # nothing of it is to be sold now
    unasked = runtime.writer.hot.unasked

    with pytest.raises(InsufficientStock):
        runtime.writer.execute(reserve([(sku, 1)]))

    assert runtime.writer.hot.unasked > unasked, "decided first on what it kept"
    stored = runtime.app.repository.get(StockItem.id_for(sku))
    assert stored.levels(now(), {}).held == 1


def test_a_supplier_another_writer_changed_is_read_again_before_it_is_relied_on(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saves that follow each other show only that nobody saved between them: a kept
    copy read before another process's save is read again, however long this writer has
    saved alone since."""
    monkeypatch.setattr(hot, "QUIET_SECONDS", 600.0)
    monkeypatch.setattr(hot, "LONE_SECONDS", 0.2)
    held_back, other_sku = random_sku("QUIET"), random_sku("QUIET")
    stock_sku(runtime.writer, held_back, 5, "held-back")
    stock_sku(runtime.writer, other_sku, 5, "elsewhere")
    runtime.writer.execute(reserve([(held_back, 1)]))  # kept, with its supplier
    with another_writer(runtime) as other:
        put_supplier(other, "held-back", buffer=5)
    runtime.writer.execute(reserve([(other_sku, 1)]))  # its save shows the other's
    time.sleep(0.25)
    runtime.writer.execute(reserve([(other_sku, 1)]))  # alone since: it may try unasked
    unasked = runtime.writer.hot.unasked
    runtime.writer.execute(reserve([(other_sku, 1)]))
    assert runtime.writer.hot.unasked > unasked, "quiet again"

    with pytest.raises(InsufficientStock):
        runtime.writer.execute(reserve([(held_back, 1)]))


@pytest.mark.usefixtures("quiet_lasts")
def test_an_order_replayed_beside_others_that_save_is_answered_as_placed(
    runtime: Runtime,
) -> None:
    """A replay refused on what was kept (its stock all held since by the order itself)
    in a batch whose other orders save: the save finds that the reservation taken as new
    exists, saves nothing, and every order is decided again on what the store holds."""
    sku, other = random_sku("QUIET"), random_sku("QUIET")
    stock_sku(runtime.writer, sku, 2)
    stock_sku(runtime.writer, other, 5)
    order = reserve([(sku, 2)], key=f"replayed-{sku}")
    placed = runtime.writer.execute(order)
    runtime.writer.execute(reserve([(other, 1)]))
    unasked = runtime.writer.hot.unasked

    batch = [_Job(order, Future()), _Job(reserve([(other, 1)]), Future())]
    runtime.writer._run_batch(batch)

    assert runtime.writer.hot.unasked > unasked, "decided first on what it kept"
    replayed = batch[0].future.result(0).value
    assert replayed.replayed
    assert replayed.reservation.id == placed.value.reservation.id
    assert batch[1].future.result(0).value.reservation.lines[other].quantity == 1
    stored = runtime.app.repository.get(StockItem.id_for(other))
    assert stored.levels(now(), {}).held == 2


@pytest.mark.usefixtures("quiet_lasts")
def test_a_writer_whose_event_numbers_are_cached_never_tries_on_kept_copies(
    runtime: Runtime,
) -> None:
    """With a cache on the events' sequence, each connection numbers from a block of its
    own: numbers that follow each other would prove nothing, and the writer always asks."""
    assert runtime.app.recorder.numbers_follow_saves()  # type: ignore[attr-defined]
    with psycopg.connect(runtime.database_url, autocommit=True) as conn:
        conn.execute("ALTER SEQUENCE inventoryledger_events_notification_id_seq CACHE 10")
    assert not runtime.app.recorder.numbers_follow_saves()  # type: ignore[attr-defined]
    sku = random_sku("CACHED")
    stock_sku(runtime.writer, sku, 5)
    for _ in range(3):
        runtime.writer.execute(reserve([(sku, 1)]))

    assert runtime.writer.hot.unasked == 0


def test_a_replayed_order_saved_beside_new_ones_is_answered_without_their_position(
    runtime: Runtime,
) -> None:
    """A position tells a client how far to read to see what its command wrote. A replay
    wrote nothing: saved in a batch with orders that did write, it is given no position
    (it had theirs, which says nothing of it), and they keep the batch's."""
    a, b = random_sku("A"), random_sku("B")
    for sku in (a, b):
        stock_sku(runtime.writer, sku, 10)
    first = reserve([(a, 1)], order_id="replayed-order")
    placed = runtime.writer.execute(first)
    assert placed.position is not None
    batch = [_Job(order, Future()) for order in (reserve([(b, 2)]), first, reserve([(a, 3)]))]
    runtime.writer._run_batch(batch)

    new_b, replay, new_a = (job.future.result(0) for job in batch)
    assert replay.value.replayed
    assert replay.value.reservation.id == placed.value.reservation.id
    assert replay.position is None
    assert new_b.position is not None
    assert new_b.position > placed.position
    assert new_a.position == new_b.position
    held = {sku: runtime.queries.stock_levels(sku, now()).held for sku in (a, b)}
    assert held == {a: 4, b: 2}

    # Replayed in the batch that placed it (a client retrying before its answer came), it
    # is given the batch's position: its client reads at it to see the order (a review).
    again = reserve([(b, 1)], order_id="retried-at-once")
    pair = [_Job(again, Future()), _Job(again, Future())]
    runtime.writer._run_batch(pair)
    placed_now, retried = (job.future.result(0) for job in pair)
    assert retried.value.replayed
    assert retried.position is not None
    assert retried.position == placed_now.position


def test_two_mapping_puts_moving_supplier_skus_off_one_sku_at_once_leave_no_level_behind(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two PUTs of one supplier in two processes, each moving one of the two supplier SKUs
    off a SKU and each finding the other still there, kept the level for each other: it
    stood fed by no mapping. Each move writes on the SKU it leaves, so on PostgreSQL too
    the later save conflicts there and is decided again on what the first saved."""
    old, one, two = (random_sku("LEFT") for _ in range(3))
    supplier = random_sku("remapper")
    at = now()
    put_supplier(runtime.writer, supplier, at)
    specs = [MappingSpec("K-1", old), MappingSpec("K-2", old)]
    runtime.writer.execute(PutMappings(at=at, cause=CAUSE, supplier_id=supplier, mappings=specs))
    report(runtime.writer, old, 10, supplier, at)

    def put(supplier_sku: str, sku: str, other: str) -> PutMappings:
        # As the API finds it before either PUT: the other supplier SKU on the old SKU.
        return PutMappings(
            at=now(),
            cause=CAUSE,
            supplier_id=supplier,
            mappings=[MappingSpec(supplier_sku, sku)],
            kept=frozenset({(old, other)}),
        )

    save = runtime.app.save
    conflicts = runtime.writer.conflicts
    with another_writer(runtime) as other:

        def the_other_saves_first(*aggregates: Any, **kwargs: Any) -> Any:
            monkeypatch.setattr(runtime.app, "save", save)
            other.execute(put("K-2", two, "K-1"))
            return save(*aggregates, **kwargs)

        monkeypatch.setattr(runtime.app, "save", the_other_saves_first)
        runtime.writer.execute(put("K-1", one, "K-2"))

    levels = [runtime.queries.stock_levels(sku, now()).on_hand for sku in (old, one, two)]
    assert runtime.writer.conflicts == conflicts + 1
    # The first retired it (K-1 still mapped there: it may have been K-1's report), and
    # the later, decided again, found the first one's 0: each used to keep it for the
    # other, 10 fed by no mapping.
    assert levels == [0, 0, 0]
