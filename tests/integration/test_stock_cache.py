"""The API's in-process copy of the stock view, against a real PostgreSQL and live projections."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest

from api.runtime import Runtime
from ledger.commands import PutSupplier
from ledger.stock import StockLevels, second_floor
from ledger.supplier import SupplierTerms
from projections.entries import Snapshot, read_entries
from projections.runner import rebuild
from projections.stock import StockProjection
from projections.stockcache import CachedRead, StockCache
from projections.store import Connection, ViewStore
from tests.conftest import random_sku
from tests.integration.ledger_setup import CAUSE, reserve, stock_sku
from tests.integration.workload import report


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def copy_of(
    runtime: Runtime, capacity: int = 100, clock: Clock | None = None, seen_limit: int | None = None
) -> StockCache:
    """A copy refreshed by the test alone (no thread)."""
    return StockCache(
        runtime.store,
        capacity=capacity,
        refresh_seconds=60,
        max_lag_seconds=5,
        follow_seconds=30,
        clock=clock or Clock(),
        seen_limit=seen_limit,
    )


def caught_up(runtime: Runtime) -> int:
    head = runtime.app.recorder.max_notification_id() or 0
    return runtime.views.wait_for("stock", head, timeout=30)


def from_copy(cache: StockCache, sku: str, at: datetime, wanted: int | None = None) -> StockLevels:
    found = cache.lookup([sku], wanted)
    assert found is not None, f"the copy does not answer for {sku}"
    (entry,) = found.entries
    return entry.levels(at)


def from_view(runtime: Runtime, sku: str, at: datetime) -> StockLevels:
    return runtime.views.availability([sku], at)[sku]


def test_the_copy_answers_as_the_view_does_and_follows_each_change_once_refreshed(
    runtime: Runtime,
) -> None:
    sku = random_sku("COPY")
    stock_sku(runtime.writer, sku, 9)
    caught_up(runtime)
    cache = copy_of(runtime)
    cache.refresh()
    at = datetime.now(UTC)
    assert from_copy(cache, sku, at) == from_view(runtime, sku, at)
    before = cache.position

    placed = runtime.writer.execute(reserve([(sku, 4)]))
    assert placed.position is not None
    caught_up(runtime)
    assert from_copy(cache, sku, at).held == 0, "a copy moves only when refreshed"
    assert cache.lookup([sku], wanted=placed.position) is None, "nor claims a later position"

    cache.refresh()
    at = datetime.now(UTC)
    assert cache.position >= placed.position > before
    assert from_copy(cache, sku, at, wanted=placed.position).held == 4
    assert from_copy(cache, sku, at) == from_view(runtime, sku, at)


def test_a_hold_that_ran_out_stops_counting_in_the_copy_without_a_refresh(
    runtime: Runtime,
) -> None:
    sku = random_sku("COPY")
    stock_sku(runtime.writer, sku, 9)
    runtime.writer.execute(reserve([(sku, 3)], ttl=60))
    caught_up(runtime)
    cache = copy_of(runtime)
    cache.refresh()
    now = datetime.now(UTC)

    assert from_copy(cache, sku, now).available == 6
    later = from_copy(cache, sku, now + timedelta(seconds=61))
    assert (later.held, later.available) == (0, 9)
    assert later == from_view(runtime, sku, now + timedelta(seconds=61))


def test_new_terms_of_a_supplier_reach_every_sku_of_the_copy(runtime: Runtime) -> None:
    skus = [random_sku("TERMS") for _ in range(3)]
    for sku in skus:
        stock_sku(runtime.writer, sku, 20, supplier_id="terms")
    caught_up(runtime)
    cache = copy_of(runtime)
    cache.refresh()
    at = datetime.now(UTC)
    assert [from_copy(cache, sku, at).sellable for sku in skus] == [20, 20, 20]

    terms = SupplierTerms(name="terms", buffer=5)
    runtime.writer.execute(PutSupplier(at=at, cause=CAUSE, supplier_id="terms", terms=terms))
    caught_up(runtime)
    cache.refresh()

    assert [from_copy(cache, sku, at).sellable for sku in skus] == [15, 15, 15]
    assert [from_copy(cache, sku, at) for sku in skus] == [
        from_view(runtime, sku, at) for sku in skus
    ]


def test_a_copy_not_refreshed_within_its_lag_answers_nothing(runtime: Runtime) -> None:
    sku = random_sku("COPY")
    stock_sku(runtime.writer, sku, 9)
    caught_up(runtime)
    clock = Clock()
    cache = copy_of(runtime, clock=clock)
    assert cache.lookup([sku], None) is None, "before its first refresh"
    cache.refresh()
    assert cache.lookup([sku], None) is not None

    clock.now += cache.max_lag_seconds + 0.1

    assert cache.lookup([sku], None) is None


def test_an_entry_read_before_the_copy_moved_on_is_turned_away(runtime: Runtime) -> None:
    """A reader that fetched a SKU from the view offers it to the copy; if the copy moved
    past that read meanwhile, the SKU may have changed in between: the copy must not keep it."""
    kept, late = random_sku("KEPT"), random_sku("LATE")
    stock_sku(runtime.writer, kept, 5)
    stock_sku(runtime.writer, late, 5)
    caught_up(runtime)
    cache = copy_of(runtime, capacity=1)
    cache.refresh()
    assert len(cache) == 1, "the copy keeps no more than its capacity"
    missing = late if cache.lookup([kept], None) is not None else kept
    with runtime.store.connection() as conn:
        old = read_entries(conn, [missing], second_floor(datetime.now(UTC)))

    report(runtime.writer, "acme", {missing: 2}, datetime.now(UTC))
    caught_up(runtime)
    cache.refresh()
    cache.offer(old)

    assert cache.lookup([missing], None) is None
    with runtime.store.connection() as conn:
        cache.offer(read_entries(conn, [missing], second_floor(datetime.now(UTC))))
    assert from_copy(cache, missing, datetime.now(UTC)).on_hand == 2
    assert len(cache) == 1


def test_a_rebuilt_view_starts_the_copy_afresh_from_the_new_generation(runtime: Runtime) -> None:
    sku = random_sku("COPY")
    stock_sku(runtime.writer, sku, 7)
    caught_up(runtime)
    cache = copy_of(runtime)
    cache.refresh()
    at = datetime.now(UTC)
    expected = from_copy(cache, sku, at)

    built = rebuild(StockProjection(runtime.app), runtime.app, runtime.store, runtime.leases)
    cache.refresh()

    assert cache.generation == built.generation
    assert from_copy(cache, sku, at) == expected


def test_the_copy_reads_again_only_the_skus_read_lately_and_drops_the_others_that_moved(
    runtime: Runtime,
) -> None:
    """Following every change of the catalogue costs the API processes CPU for SKUs
    nobody is reading: a SKU not read within `follow_seconds` is dropped when it moves,
    and comes back with its next read from the view."""
    read, unread, still = random_sku("READ"), random_sku("UNREAD"), random_sku("STILL")
    for sku in (read, unread, still):
        stock_sku(runtime.writer, sku, 9)
    caught_up(runtime)
    clock = Clock()
    cache = copy_of(runtime, clock=clock)
    cache.refresh()
    at = datetime.now(UTC)
    for sku in (read, unread, still):
        assert from_copy(cache, sku, at).available == 9

    clock.now += cache.follow_seconds + 1
    cache.refresh()  # nothing moved: it keeps all three
    assert from_copy(cache, read, at).available == 9  # read lately; the others not
    placed = runtime.writer.execute(reserve([(read, 2), (unread, 3)]))
    assert placed.position is not None
    caught_up(runtime)
    cache.refresh()

    at = datetime.now(UTC)
    assert cache.position >= placed.position
    assert from_copy(cache, read, at, wanted=placed.position).held == 2, "followed"
    assert cache.lookup([unread], None) is None, "moved unread: dropped, not kept stale"
    assert from_copy(cache, still, at).available == 9, "unread but unmoved: kept"

    # The reader goes to the view; what it read is offered to the copy, as Views does
    # with its own copy (this one is the test's, so the offer is made here).
    levels = runtime.views.availability([unread], at)[unread]
    assert levels.held == 3
    cache.offer(_read(runtime, [unread]))
    assert from_copy(cache, unread, at) == from_view(runtime, unread, at)


def test_an_entry_offered_from_beyond_the_copy_is_answered_at_its_own_position(
    runtime: Runtime,
) -> None:
    """A reader that fetched a SKU from the view at a newer position than the copy's offers
    it: answered as at the copy's position, a read named a position older than its numbers
    (an OMS walkthrough, 13 reads in 40). Until the next refresh it answers alone at its
    own position, and with SKUs at the copy's position goes to the view."""
    ahead, behind = random_sku("AHEAD"), random_sku("BEHIND")
    stock_sku(runtime.writer, ahead, 5)
    stock_sku(runtime.writer, behind, 5)
    caught_up(runtime)
    cache = copy_of(runtime)
    cache.refresh()
    copied_at = cache.position
    assert cache.lookup([ahead, behind], None) is not None
    runtime.writer.execute(reserve([(ahead, 2)]))
    newer = caught_up(runtime)
    cache.offer(_read(runtime, [ahead]))

    alone = cache.lookup([ahead], None)
    both = cache.lookup([ahead, behind], None)
    waited = cache.lookup([ahead], newer)
    assert alone is not None
    assert (alone.position, alone.entries[0].levels(datetime.now(UTC)).held) == (newer, 2)
    assert copied_at < newer
    assert both is None
    assert waited is not None
    assert waited.position == newer
    assert cache.lookup([behind], None) == CachedRead(copied_at, [cache._entries[behind]])

    cache.refresh()  # the copy reaches the view's position: one position for all
    together = cache.lookup([ahead, behind], None)
    assert together is not None
    assert together.position == cache.position >= newer


def test_an_entry_offered_while_a_refresh_runs_is_not_kept_if_it_moved(runtime: Runtime) -> None:
    """A reader may offer a SKU after the refresh chose which SKUs to read again and
    before it moved the copy on: if that SKU moved in between, it must not stay stale."""
    sku = random_sku("RACE")
    stock_sku(runtime.writer, sku, 9)
    caught_up(runtime)
    clock = Clock()
    cache = copy_of(runtime, clock=clock)
    cache.refresh()
    old = _read(runtime, [sku])
    assert old.position == cache.position
    clock.now += cache.follow_seconds + 1  # held, no longer followed
    runtime.writer.execute(reserve([(sku, 4)]))
    caught_up(runtime)

    split = cache._followed

    def followed_then_offered(moved: list[str], now: float) -> list[str]:
        chosen = split(moved, now)
        cache.offer(old)  # a reader's read from before the reservation
        return chosen

    cache._followed = followed_then_offered  # type: ignore[method-assign]
    cache.refresh()

    at = datetime.now(UTC)
    assert cache.position > old.position
    assert cache.lookup([sku], None) is None, "the stale entry was dropped"
    cache.offer(_read(runtime, [sku]))
    assert from_copy(cache, sku, at).held == 4


def _read(runtime: Runtime, skus: list[str]) -> Snapshot:
    with runtime.store.connection() as conn:
        return read_entries(conn, skus, second_floor(datetime.now(UTC)))


def test_a_sku_new_to_the_copy_is_taken_while_there_is_room_and_dropped_once_it_moves_unread(
    runtime: Runtime,
) -> None:
    """A SKU that appears after the copy started is taken by the refresh that sees it
    move, without a read (a worker that never read it would otherwise go to the view for
    it); not read since, it is dropped when it moves again, and not taken again."""
    first = random_sku("FIRST")
    stock_sku(runtime.writer, first, 9)
    caught_up(runtime)
    clock = Clock()
    cache = copy_of(runtime, capacity=2, clock=clock)
    cache.refresh()
    assert len(cache) == 1

    new, beyond = random_sku("NEW"), random_sku("BEYOND")
    stock_sku(runtime.writer, new, 6)
    caught_up(runtime)
    cache.refresh()
    at = datetime.now(UTC)
    assert from_copy(cache, new, at) == from_view(runtime, new, at)

    stock_sku(runtime.writer, beyond, 4)  # no room left for it
    caught_up(runtime)
    cache.refresh()
    assert cache.lookup([beyond], None) is None
    assert len(cache) == 2

    clock.now += cache.follow_seconds + 1  # read above, not since
    placed = runtime.writer.execute(reserve([(new, 2)]))
    assert placed.position is not None
    caught_up(runtime)
    cache.refresh()
    assert cache.lookup([new], None) is None, "moved unread: dropped"
    runtime.writer.execute(reserve([(new, 1)]))
    caught_up(runtime)
    cache.refresh()
    assert cache.lookup([new], None) is None, "seen before: not taken again unread"
    assert len(cache) == 1


def test_the_skus_a_copy_remembers_are_bounded_and_one_forgotten_counts_as_new_again(
    runtime: Runtime,
) -> None:
    """The copy remembers the SKUs it held so as to take only new ones unread; past its
    limit it remembers only those it holds, so that its memory does not grow with every
    SKU it ever held. A SKU it forgot is taken again, unread, when it moves with room."""
    old, *offered = (random_sku(name) for name in ("OLD", "X1", "X2", "X3"))
    stock_sku(runtime.writer, old, 9)
    caught_up(runtime)
    clock = Clock()
    cache = copy_of(runtime, capacity=2, clock=clock, seen_limit=3)
    cache.refresh()
    assert len(cache) == 1
    assert cache.remembered == 1
    for sku in offered:
        stock_sku(runtime.writer, sku, 9)
    caught_up(runtime)
    for sku in offered:  # each read from the view pushes the oldest entry out
        cache.offer(_read(runtime, [sku]))
        assert cache.remembered <= 3
    x1, x2, _ = offered
    cache.refresh()  # past their stocking, read again: they were read lately
    assert cache.lookup([old], None) is None
    assert cache.lookup([x1], None) is None
    assert len(cache) == 2
    assert cache.remembered == 2, "past the limit it remembers only what it holds"

    clock.now += cache.follow_seconds + 1
    runtime.writer.execute(reserve([(x2, 1)]))  # moved unread: dropped, making room
    caught_up(runtime)
    cache.refresh()
    assert cache.lookup([x2], None) is None
    assert len(cache) == 1

    placed = runtime.writer.execute(reserve([(old, 2)]))
    caught_up(runtime)
    cache.refresh()
    at = datetime.now(UTC)
    found = from_copy(cache, old, at, wanted=placed.position)
    assert found == from_view(runtime, old, at), "forgotten: taken again as new"
    assert found.held == 2
    assert cache.remembered <= 3


def test_each_lookup_is_counted_by_its_result_and_reported_once(runtime: Runtime) -> None:
    """What sends reads to the view instead of the copy, as /metrics shows it
    (ledger_read_copy_lookups_total); a miss the reader looks up again is counted once."""
    held, absent = random_sku("COUNTED"), random_sku("ABSENT")
    stock_sku(runtime.writer, held, 3)
    caught_up(runtime)
    clock = Clock()
    reported: list[dict[str, int]] = []
    cache = StockCache(
        runtime.store,
        capacity=100,
        refresh_seconds=60,
        max_lag_seconds=5,
        follow_seconds=30,
        clock=clock,
        report=reported.append,
    )
    cache.refresh()
    assert cache.lookup([held], None) is not None
    assert cache.lookup([held], None) is not None
    assert cache.lookup([held, absent], None) is None
    assert cache.lookup([absent], None, count_miss=False) is None  # the lane's, not counted
    assert cache.lookup([held], cache.position + 1) is None
    clock.now += 6
    assert cache.lookup([held], None) is None
    assert cache.lookups() == {"hit": 2, "absent": 1, "behind": 1, "stale": 1}

    cache.report_lookups()
    assert reported == [{"hit": 2, "absent": 1, "behind": 1, "stale": 1}]
    cache.report_lookups()
    assert len(reported) == 1, "nothing new, nothing reported"
    assert cache.lookup([held], None) is None
    cache.report_lookups()
    assert reported[1:] == [{"stale": 1}]


def test_a_report_that_fails_loses_its_counts_and_the_next_goes_on(runtime: Runtime) -> None:
    handed: list[dict[str, int]] = []

    def report(counts: dict[str, int]) -> None:
        handed.append(counts)
        if len(handed) == 1:
            raise OSError("no room for the counts")

    cache = StockCache(
        runtime.store, capacity=10, refresh_seconds=60, max_lag_seconds=5, report=report
    )
    assert cache.lookup(["ANY"], None) is None  # never refreshed: stale
    cache.report_lookups()  # fails: logged, not raised
    assert cache.lookup(["ANY"], None) is None
    cache.report_lookups()
    assert handed == [{"stale": 1}, {"stale": 1}], "the lost count is not handed again"


# Readers the copy misses --------------------------------------------------------


class FetchGate(ViewStore):
    """The views' store, whose connections for the copy's reads for readers (`fetch`) wait
    until `opened`, and say so in `waiting`: the test's hand on when those reads happen."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url)
        self.waiting, self.opened = threading.Event(), threading.Event()
        self.dies_with: BaseException | None = None  # raised there once opened

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Connection]:
        if threading.current_thread().name == "stock-cache-fetch":
            self.waiting.set()
            assert self.opened.wait(10), "the test never opened the gate"
            if self.dies_with is not None:
                raise self.dies_with
        with super().connection(timeout) as conn:
            yield conn


@contextmanager
def running_copy(
    runtime: Runtime, fetch_wait_seconds: float = 2.0
) -> Iterator[tuple[StockCache, FetchGate]]:
    """A started copy that refreshed once (and not again for a minute), on a gated store."""
    store = FetchGate(runtime.database_url)
    store.open()
    cache = StockCache(
        store,
        capacity=100,
        refresh_seconds=60,
        max_lag_seconds=60,
        fetch_wait_seconds=fetch_wait_seconds,
    ).start()
    try:
        deadline = time.monotonic() + 10
        while cache.generation is None:
            assert time.monotonic() < deadline, "the copy never refreshed"
            time.sleep(0.01)
        yield cache, store
    finally:
        store.opened.set()
        cache.stop()
        store.close()


def stocked(runtime: Runtime, count: int, quantity: int) -> list[str]:
    """New SKUs with `quantity` in stock each, once the stock view has them."""
    skus = [random_sku("FETCHED") for _ in range(count)]
    for sku in skus:
        stock_sku(runtime.writer, sku, quantity)
    caught_up(runtime)
    return skus


def answered(answer: Future[Snapshot | None] | None) -> Snapshot:
    """What the copy read for a reader (not sent to the view itself)."""
    assert answer is not None, "the copy took the reader"
    snapshot = answer.result(10)
    assert snapshot is not None, "the copy read for the reader"
    return snapshot


def test_readers_the_copy_misses_are_read_for_together_and_their_skus_kept(
    runtime: Runtime,
) -> None:
    """A reader on a worker thread of its own waited for the interpreter in turn with every
    other one: the copy reads for all those waiting, in one statement, on one thread."""
    with running_copy(runtime) as (cache, store):
        skus = stocked(runtime, 6, 4)  # the copy, refreshed before, holds none of them
        assert all(cache.lookup([sku], None) is None for sku in skus)
        at = datetime.now(UTC)

        first = cache.fetch([skus[0]], at)
        assert first is not None
        assert store.waiting.wait(10), "the copy reads for the first reader at once"
        unknown = random_sku("UNKNOWN")
        asked = [skus[1:3], [skus[2], unknown], [skus[3]], skus[4:]]
        waiting = [cache.fetch(names, at) for names in asked]
        gave_up = cache.fetch([random_sku("GAVE-UP")], at)
        assert gave_up is not None
        assert gave_up.cancel()
        store.opened.set()

        answers = [answered(answer) for answer in [first, *waiting]]
        assert cache.fetch_reads == 2, "the first reader, then the four waiting, together"
        for names, snapshot in zip([[skus[0]], *asked], answers, strict=True):
            assert list(snapshot.entries) == [name for name in names if name != unknown]
            for sku, entry in snapshot.entries.items():
                assert entry.levels(at) == from_view(runtime, sku, at)
        assert len({snapshot.position for snapshot in answers[1:]}) == 1, "at one position"
        kept = cache.lookup(skus, None)
        assert kept is not None, "what was read for the readers is kept in the copy"
        assert [entry.levels(at).on_hand for entry in kept.entries] == [4] * 6


def test_a_read_for_readers_that_fails_sends_each_to_the_view_and_the_next_goes_on(
    runtime: Runtime,
) -> None:
    """Each reader then reads the view itself, and meets the failure there as its own."""
    (sku,) = stocked(runtime, 1, 4)
    with running_copy(runtime) as (cache, store):
        store.opened.set()
        at = datetime.now(UTC)
        broken = cache.fetch(["NUL\x00", sku], at)  # PostgreSQL's text cannot hold it
        assert broken is not None
        assert broken.result(10) is None
        assert cache.fetch_reads == 0
        assert answered(cache.fetch([sku], at)).entries[sku].levels(at).on_hand == 4


def test_readers_waiting_when_the_copy_stops_are_read_for_and_no_later_one_is_taken(
    runtime: Runtime,
) -> None:
    skus = stocked(runtime, 2, 3)
    with running_copy(runtime) as (cache, store):
        at = datetime.now(UTC)
        first = cache.fetch([skus[0]], at)
        assert store.waiting.wait(10)
        queued = cache.fetch([skus[1]], at)
        stopping = threading.Thread(target=cache.stop)
        stopping.start()
        deadline = time.monotonic() + 10
        while cache.fetch([skus[1]], at) is not None:  # taken (and answered) until stopped
            assert time.monotonic() < deadline, "the copy never stopped taking readers"
            time.sleep(0.01)
        store.opened.set()
        stopping.join(10)
        assert not stopping.is_alive()
        assert answered(first).entries[skus[0]].levels(at).on_hand == 3
        assert answered(queued).entries[skus[1]].levels(at).on_hand == 3


def test_while_a_read_for_readers_is_late_new_readers_are_sent_to_the_view(
    runtime: Runtime,
) -> None:
    """A slow or stuck statement would hold every miss of the process behind it: past
    `fetch_wait_seconds`, readers read the view each on their own, as without the copy."""
    (sku,) = stocked(runtime, 1, 4)
    with running_copy(runtime, fetch_wait_seconds=0.2) as (cache, store):
        at = datetime.now(UTC)
        first = cache.fetch([sku], at)
        assert store.waiting.wait(10)
        queued = cache.fetch([sku], at)
        assert queued is not None, "taken while the read is young"
        time.sleep(0.3)
        assert cache.fetch([sku], at) is None, "sent to the view while the read is late"
        store.opened.set()
        assert answered(first).entries[sku].levels(at).on_hand == 4
        assert answered(queued).entries[sku].levels(at).on_hand == 4
        assert answered(cache.fetch([sku], at)).entries[sku].levels(at).on_hand == 4


class Unforeseen(BaseException):
    """What no `except Exception` catches."""


# The thread ends with the exception, as it is to: pytest reports it as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_copy_whose_reading_thread_dies_leaves_no_reader_waiting_and_takes_no_more(
    runtime: Runtime,
) -> None:
    with running_copy(runtime) as (cache, store):
        at = datetime.now(UTC)
        first = cache.fetch(["ANY"], at)
        assert store.waiting.wait(10)
        queued = cache.fetch(["OTHER"], at)
        assert first is not None
        assert queued is not None
        store.dies_with = Unforeseen("the thread ends")
        store.opened.set()
        assert first.result(10) is None, "sent to the view"
        assert queued.result(10) is None, "sent to the view"
        assert cache.fetch(["ANY"], at) is None


class HeldRefresh(ViewStore):
    """The views' store, whose connection for the copy's own refresh, once `hold` is set,
    is given back only when `released`: that refresh has read the view, and waits."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url)
        self.hold, self.held, self.released = (
            threading.Event(),
            threading.Event(),
            threading.Event(),
        )

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Connection]:
        with super().connection(timeout) as conn:
            yield conn
        if threading.current_thread().name == "stock-cache" and self.hold.is_set():
            self.hold.clear()
            self.held.set()
            assert self.released.wait(10), "the test never released the refresh"


def test_a_refresh_that_read_the_view_before_another_never_takes_the_copy_back(
    runtime: Runtime,
) -> None:
    """Under load a refresh can take a second (PostgreSQL waiting for a CPU); one that
    read the view before a later one must not undo it when it ends."""
    store = HeldRefresh(runtime.database_url)
    store.open()
    cache = StockCache(store, capacity=100, refresh_seconds=0.01, max_lag_seconds=60).start()
    try:
        store.hold.set()
        assert store.held.wait(10), "the copy's own refresh read the view and waits"
        sku = random_sku("LATER")
        stock_sku(runtime.writer, sku, 8)
        later = caught_up(runtime)
        cache.refresh()  # a later one, from the test's thread
        assert cache.position >= later
        # The next refresh of the copy's own to have read the view comes after the held
        # one has ended.
        store.held.clear()
        store.hold.set()
        store.released.set()
        assert store.held.wait(10), "the copy refreshed again"

        assert cache.position >= later, "the copy went back to an earlier position"
        found = cache.lookup([sku], None)
        assert found is not None
        assert found.entries[0].levels(datetime.now(UTC)).on_hand == 8
    finally:
        store.released.set()
        cache.stop()
        store.close()
