"""The writer's kept aggregates: what it keeps, for how long, and never while in use."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from ledger import hot as hot_module
from ledger.base import Cause
from ledger.hot import HotAggregates
from ledger.stock import StockItem
from ledger.supplier import Supplier, SupplierTerms

CAUSE = Cause("unit-test", "test", "test")
AT = datetime(2026, 1, 1, tzinfo=UTC)


class Store:
    """Stands in for the application: records what it is asked to load and fast-forward."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[UUID], set[UUID]]] = []

    def get_many(self, ids: list[UUID], known: dict[UUID, Any]) -> dict[UUID, Any]:
        self.calls.append((ids, set(known)))
        return dict(known)


def saved_item(sku: str, supplier: str | None = None) -> StockItem:
    item = StockItem.register(sku, AT, CAUSE)
    if supplier is not None:
        item.observe(supplier, 5, AT, SupplierTerms(supplier), AT, CAUSE)
    item.collect_events()
    return item


def test_only_saved_stock_items_and_suppliers_are_kept() -> None:
    hot = HotAggregates(Store(), capacity=10)  # type: ignore[arg-type]
    unsaved = StockItem.register("UNSAVED", AT, CAUSE)
    saved = saved_item("SAVED")
    supplier = Supplier.register("north", SupplierTerms("North"), AT, CAUSE)
    supplier.collect_events()

    hot.keep([unsaved, saved, supplier])

    assert saved.id in hot
    assert supplier.id in hot
    assert unsaved.id not in hot, "an aggregate with unsaved events is never kept"


def test_a_kept_item_is_taken_out_while_a_batch_uses_it_and_its_suppliers_come_along() -> None:
    store = Store()
    hot = HotAggregates(store, capacity=10)  # type: ignore[arg-type]
    item = saved_item("A", supplier="north")
    hot.keep([item])

    assert hot.related([item.id]) == [Supplier.id_for("north")]
    found = hot.load_many([item.id])

    assert found[item.id] is item
    assert store.calls == [([item.id], {item.id})], "asked only for what came after it"
    assert item.id not in hot, "a batch that fails must not leave it behind, changed"


def test_the_least_recently_used_go_first() -> None:
    hot = HotAggregates(Store(), capacity=2)  # type: ignore[arg-type]
    first, second, third = (saved_item(sku) for sku in ("A", "B", "C"))
    hot.keep([first, second])
    hot.keep([first])
    hot.keep([third])

    assert [i in hot for i in (first.id, second.id, third.id)] == [True, False, True]


def test_a_part_of_a_large_delivery_keeps_only_what_it_took_out() -> None:
    """A delivery's thousands of stock items would push out the SKUs being ordered."""
    store = Store()
    hot = HotAggregates(store, capacity=3)  # type: ignore[arg-type]
    busy = saved_item("BUSY", supplier="north")
    hot.keep([busy])
    delivered = [saved_item(f"D{n}") for n in range(5)]
    supplier = Supplier.register("north", SupplierTerms("North"), AT, CAUSE)
    supplier.collect_events()

    loaded = hot.load_many([busy.id, *(item.id for item in delivered)])
    hot.keep([*loaded.values(), *delivered, supplier], new=False)

    assert busy.id in hot, "taken out by the part: kept again, at its new version"
    assert supplier.id in hot
    assert not any(item.id in hot for item in delivered)

    # The next batch of reservations keeps what it loads, as before.
    hot.keep(delivered[:1])
    assert delivered[0].id in hot
    assert busy.id in hot

    # What a batch that failed (no keep) took out is not the next part's to keep.
    hot.load_many([busy.id])
    hot.begin_batch()
    hot.keep([busy], new=False)
    assert busy.id not in hot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def quiet_writer(clock: Clock) -> tuple[Store, HotAggregates]:
    """Kept aggregates of a writer that has saved alone for longer than LONE_SECONDS."""
    store = Store()
    hot = HotAggregates(store, capacity=10, clock=clock)  # type: ignore[arg-type]
    hot.saved(1, 1, clock.now)
    clock.now += hot_module.LONE_SECONDS + 1
    return store, hot


def test_right_after_saves_no_other_process_came_between_a_batch_decides_on_what_is_kept() -> None:
    clock = Clock()
    store, hot = quiet_writer(clock)
    item = saved_item("A", supplier="north")
    order = UUID(int=7)  # a stream the batch means to start
    hot.keep([item], saved=[item.id])
    hot.saved(2, 3, clock.now)  # follows 1: nobody saved between

    assert hot.load_many([item.id, order], new=[order]) == {item.id: item}
    assert store.calls == [], "decided on what is kept, the order taken as new"
    assert hot.unasked == 1

    hot.keep([item])  # read, unasked: as current as it was
    hot.load_many([item.id, UUID(int=8)], new=[order])
    assert len(store.calls) == 1, "a stream neither kept nor new: asked"

    hot.keep([item])  # read from the store just now
    hot.saved(4, 4, clock.now)
    hot.doubt()
    hot.load_many([item.id])
    assert len(store.calls) == 2, "after a batch decided again (nothing to save): asked"


def test_a_quiet_spell_lasts_only_a_moment() -> None:
    clock = Clock()
    store, hot = quiet_writer(clock)
    item = saved_item("A")
    hot.keep([item], saved=[item.id])
    hot.saved(2, 2, clock.now)
    clock.now += hot_module.QUIET_SECONDS * 2

    hot.load_many([item.id])

    assert len(store.calls) == 1, "another process may have saved since: asked"


def test_only_a_writer_that_saw_no_other_process_save_lately_decides_on_what_is_kept() -> None:
    """Where another process saves too, a batch that skipped the store would often be
    decided again: the writer asks until it has seen none for LONE_SECONDS."""
    clock = Clock()
    store, hot = quiet_writer(clock)
    item = saved_item("A")
    hot.keep([item], saved=[item.id])
    hot.saved(3, 3, clock.now)  # 2 went to another process (or to a save that failed)
    hot.load_many([item.id])
    assert len(store.calls) == 1, "another process saved between: asked"

    hot.keep([item], saved=[item.id])
    clock.now += hot_module.LONE_SECONDS / 2
    hot.saved(4, 4, clock.now)
    hot.load_many([item.id])
    assert len(store.calls) == 2, "not alone for long enough yet"

    hot.keep([item], saved=[item.id])
    clock.now += hot_module.LONE_SECONDS
    hot.saved(5, 5, clock.now)
    hot.load_many([item.id])
    assert len(store.calls) == 2, "alone for long enough"

    hot.keep([item], saved=[item.id])
    hot.doubt(collided=True)
    clock.now += hot_module.LONE_SECONDS / 2
    hot.saved(6, 6, clock.now)
    hot.load_many([item.id])
    assert len(store.calls) == 3, "a collision is another process saving"


def test_a_copy_read_before_another_process_saved_is_read_again_however_quiet_since() -> None:
    """Saves that follow each other show only that nobody saved between them: a copy
    read (or saved) before a sign of another process is not known current any more."""
    clock = Clock()
    store, hot = quiet_writer(clock)
    old, busy = saved_item("OLD", supplier="north"), saved_item("BUSY")
    hot.keep([old, busy], saved=[old.id, busy.id])
    hot.saved(3, 3, clock.now)  # a gap: another process saved
    clock.now += hot_module.LONE_SECONDS + 1
    hot.load_many([busy.id])  # asked: read again, current now
    hot.keep([busy], saved=[busy.id])
    hot.saved(4, 4, clock.now)  # alone long enough: quiet
    assert len(store.calls) == 1

    hot.load_many([busy.id])
    assert len(store.calls) == 1, "read since the gap: current"
    hot.keep([busy], saved=[busy.id])
    hot.saved(5, 5, clock.now)
    hot.load_many([old.id])
    assert len(store.calls) == 2, "kept from before the gap: read again"
    hot.keep([old])
    hot.saved(6, 6, clock.now)
    hot.load_many([old.id])
    assert len(store.calls) == 2, "and current from then on"
