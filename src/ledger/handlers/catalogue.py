"""Suppliers, SKU mappings and SKUs: what operators configure."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from ledger.commands import AcknowledgeConflict, NoteLastReports, PutMappings, PutSku, PutSupplier
from ledger.conflict import ConflictAcknowledgement
from ledger.errors import InvalidTerms, OpenAgainstSupplier, OrdersOpenOnRemap, UnknownSupplier
from ledger.handlers import handles
from ledger.mapping import SkuMapping
from ledger.stock import REMAP_SOURCE, IncomingStock, Position, StockItem, second_floor
from ledger.supplier import Supplier, SupplierTerms
from ledger.uow import UnitOfWork

__all__ = ["REMAP_SOURCE"]  # the source of the level a remap retires (`_retire_level`)


@dataclass(frozen=True)
class Upserted:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@handles(PutSupplier)
def put_supplier(uow: UnitOfWork, command: PutSupplier) -> Upserted:
    supplier = uow.get(Supplier, Supplier.id_for(command.supplier_id))
    if supplier is None:
        uow.add(Supplier.register(command.supplier_id, command.terms, command.at, command.cause))
        return Upserted(created=1)
    terms = replace(command.terms, **{name: getattr(supplier.terms, name) for name in command.kept})
    _check_staleness(terms)
    if supplier.change_terms(terms, command.at, command.cause):
        return Upserted(updated=1)
    return Upserted(unchanged=1)


def _check_staleness(terms: SupplierTerms) -> None:
    """A supplier is never excluded before it is stale: the request body is checked alone
    (api.schemas), and an update that sets one of the two is checked here with the other
    as saved (a walkthrough saved `stale_after_seconds` 10 over a saved
    `exclude_after_seconds` 5, and the supplier could not be read after)."""
    stale, exclude = terms.stale_after_seconds, terms.exclude_after_seconds
    if stale is not None and exclude is not None and exclude < stale:
        raise InvalidTerms(
            "exclude_after_seconds must not be shorter than stale_after_seconds"
            " (a term the request leaves out keeps its saved value)",
            stale_after_seconds=stale,
            exclude_after_seconds=exclude,
        )


def ensure_sku(uow: UnitOfWork, sku: str, command: PutMappings | PutSku) -> StockItem:
    item = uow.get(StockItem, StockItem.id_for(sku))
    if item is None:
        item = StockItem.register(sku, command.at, command.cause)
        uow.add(item)
    return item


@handles(PutMappings)
def put_mappings(uow: UnitOfWork, command: PutMappings) -> Upserted:
    supplier = uow.get(Supplier, Supplier.id_for(command.supplier_id))
    if supplier is None:
        raise UnknownSupplier(f"unknown supplier {command.supplier_id!r}")
    created = updated = unchanged = 0
    mappings = {
        spec.supplier_sku: uow.get(
            SkuMapping, SkuMapping.id_for(command.supplier_id, spec.supplier_sku)
        )
        for spec in command.mappings
    }
    # The SKUs mappings move away from, and their reports seen, each in one go: before the
    # mappings the API says other supplier SKUs still map there are read. A PUT that
    # moved one of those off such a SKU and saved between the two reads is then either
    # seen in the mapping (the claim fails) or collides with this one on the SKU's
    # stream; read the other way round, the SKU already held its event and the claim
    # still held (a review).
    leaving = Counter(
        found.sku
        for spec in command.mappings
        if (found := mappings[spec.supplier_sku]) is not None and found.sku != spec.sku
    )
    left = sorted(leaving)
    uow.preload(StockItem.id_for(sku) for sku in left)
    for sku in left:  # read now: `preload` leaves a lone one to its first `get`
        uow.get(StockItem, StockItem.id_for(sku))
    uow.preload_seen(command.supplier_id, left)
    # SKUs another supplier SKU of the supplier maps to (one of this PUT staying there, or
    # one the API names and the ledger's own mapping confirms), and SKUs several of this
    # PUT's mappings leave: the supplier's level there is not the leaving supplier SKU's
    # alone, as one level per SKU and supplier does not say which supplier SKU reported
    # it. It retires all the same, and moves with none of them. Kept for the others, it
    # could be the leaving one's own report, sold again on its new SKU (a fuzzer: 28
    # held of 14); moved with the first of two leaving, it stood beside the other's
    # next report (52 sold of 26).
    shared = (
        _confirmed(uow, command, mappings)
        | {
            spec.sku
            for spec in command.mappings
            if (found := mappings[spec.supplier_sku]) is not None and found.sku == spec.sku
        }
        | {sku for sku, count in leaving.items() if count > 1}
    )
    blocked = [
        open_orders
        for spec in command.mappings
        if (found := mappings[spec.supplier_sku]) is not None
        and found.sku != spec.sku
        and (open_orders := _open_against(uow, command, spec.supplier_sku, found.sku))
    ]
    if blocked:
        raise OrdersOpenOnRemap(command.supplier_id, blocked)
    for spec in command.mappings:
        ensure_sku(uow, spec.sku, command)
        mapping = mappings[spec.supplier_sku]
        if mapping is None:
            uow.add(SkuMapping.map(command.supplier_id, spec, command.at, command.cause))
            created += 1
            continue
        before = mapping.sku
        units = (mapping.units_per_supplier_unit, mapping.unit)
        if not mapping.remap(spec, command.at, command.cause):
            unchanged += 1
            continue
        updated += 1
        if before == spec.sku:
            continue
        reported = _newest_report(uow, command.supplier_id, before)
        # The level moves with the supplier SKU where it is the supplier SKU's alone (by a
        # view that had every mapping), counted in the same units, onto a SKU no mapping
        # of this PUT leaves.
        alone = command.view_complete and before not in shared and spec.sku not in left
        same_units = units == (spec.units_per_supplier_unit, spec.unit)
        level = _reported_level(uow, command.supplier_id, before) if alone and same_units else None
        _retire_level(uow, supplier, before, command)
        moved = reported is not None and _open_level(
            uow, supplier, spec.sku, command, reported, level
        )
        left_item = uow.get(StockItem, StockItem.id_for(before))
        if left_item is not None:
            became: Literal["moved", "retired"] = "moved" if moved else "retired"
            left_item.note_remap(
                command.supplier_id,
                spec.supplier_sku,
                spec.sku,
                became,
                command.at,
                command.cause,
            )
    return Upserted(created=created, updated=updated, unchanged=unchanged)


def _confirmed(
    uow: UnitOfWork, command: PutMappings, mappings: dict[str, SkuMapping | None]
) -> set[str]:
    """The SKUs the API said other SKUs of the supplier map to that the ledger's own
    mappings confirm (loaded in one go)."""
    claimed = [(sku, s) for sku, s in sorted(command.kept) if s not in mappings]
    ids = {s: SkuMapping.id_for(command.supplier_id, s) for _, s in claimed}
    uow.preload(ids.values())
    return {
        sku
        for sku, s in claimed
        if (other := uow.get(SkuMapping, ids[s])) is not None and other.sku == sku
    }


def _open_against(
    uow: UnitOfWork, command: PutMappings, supplier_sku: str, sku: str
) -> OpenAgainstSupplier | None:
    """What is open against the supplier on the SKU a remap would retire its level on, or
    None when nothing is. The supplier's next report lands whole on the new SKU, so units
    of orders held or committed here (a net supplier's too: a report it made before the
    commitment holds them) and shipped units its reports have not shown yet would be sold
    again there (a review). Refused instead: the commitments cannot be carried across,
    as the new SKU cannot know when the old SKU's orders ship."""
    position = _position(uow, command.supplier_id, sku)
    if position is None:
        return None
    held = position.live_held(second_floor(command.at))
    committed = position.committed + position.net_committed
    awaiting_report = -sum(change for change in position.unreported.values() if change < 0)
    if not (held or committed or awaiting_report):
        return None
    return OpenAgainstSupplier(supplier_sku, sku, held, committed, awaiting_report)


def _position(uow: UnitOfWork, supplier_id: str, sku: str) -> Position | None:
    """The supplier's position on `sku`, if the SKU and the position exist."""
    item = uow.get(StockItem, StockItem.id_for(sku))
    return None if item is None else item.positions.get(supplier_id)


def _newest_report(uow: UnitOfWork, supplier_id: str, sku: str) -> datetime | None:
    """The newest report of the supplier's level on `sku` the ledger has seen, if any."""
    current = _position(uow, supplier_id, sku)
    if current is None or current.observed_at is None:
        return None
    return max(current.observed_at, uow.seen_at(supplier_id, sku) or current.observed_at)


# A supplier's level as a remap moves it: quantity and incoming stock, in base units.
Moved = tuple[int, IncomingStock]


def _reported_level(uow: UnitOfWork, supplier_id: str, sku: str) -> Moved | None:
    """The supplier's level on `sku` where a report set it, or a remap moved it there (not
    a remap's 0), as it is now (a copy: retiring the level changes the position). A level
    moved once moves again: a remap corrected at once left every SKU at 0 (a review)."""
    current = _position(uow, supplier_id, sku)
    if current is None or current.observed_at is None:
        return None
    if current.source == REMAP_SOURCE and current.quantity == 0 and not current.incoming:
        return None
    return current.quantity, current.incoming


def _retire_level(uow: UnitOfWork, supplier: Supplier, sku: str, command: PutMappings) -> None:
    """The supplier's level on a SKU a supplier SKU leaves is 0 from the remap on (no
    stock expected either; another supplier SKU still mapped there restores it with its
    next report), recorded as an observation of the ledger's own
    (source `remap`): a remap left it sellable there while the next report landed on the
    new SKU, the same stock counted under both (a walkthrough). Recorded where the
    supplier has no level there yet too: a report resolved through the old mapping before
    the remap (a delivery under way, another process) is then late there, not a new level
    beside the new SKU's (a review)."""
    _record_level(uow, supplier, sku, command, command.at)


def _open_level(
    uow: UnitOfWork,
    supplier: Supplier,
    sku: str,
    command: PutMappings,
    reported: datetime,
    level: Moved | None,
) -> bool:
    """The SKU a supplier SKU moves onto takes the supplier's level from the old SKU
    (`level`, where there is one to move), as of the newest report of it seen
    (`reported`), where the supplier has no level there of its own. It showed out of stock
    until the supplier's next report, a day for a daily file (an operator's walkthrough):
    nothing is promised against the level, or the remap is refused. Without one to move,
    0 as of then: an older report, arriving after the remap, is late there as on the old
    SKU either way (it landed whole on the new one, which had no report of the supplier to
    compare it with; a review). Not as of the remap's own time: a report made between the
    two is the newest the supplier has said (a review of the first version, which took a
    day's pull feed for late). Returns whether it moved the level."""
    current = _position(uow, command.supplier_id, sku)
    if current is not None and not (
        current.source == REMAP_SOURCE and current.effective_level() == 0
    ):
        return False
    newest = _newest_report(uow, command.supplier_id, sku)
    if newest is not None and newest > reported:
        level = None  # stamped later than it was reported: 0 then, not the level
    _record_level(uow, supplier, sku, command, reported, level)
    return level is not None


def _record_level(
    uow: UnitOfWork,
    supplier: Supplier,
    sku: str,
    command: PutMappings,
    since: datetime,
    level: Moved | None = None,
) -> None:
    """Records the supplier's level on `sku` (source `remap`) as of `since`, or of any newer
    report of it seen: 0, or the quantity and incoming stock of `level`, moved from another
    SKU. An event even where it changes nothing: a report that another process decided on
    the level before the remap, saved after it, then conflicts with it and is decided
    again (it wrote no event there, and the report's level stood beside the new SKU's; a
    review)."""
    item = uow.get(StockItem, StockItem.id_for(sku))
    if item is None:
        return
    newest = _newest_report(uow, command.supplier_id, sku)
    item.observe(
        command.supplier_id,
        0 if level is None else level[0],
        since if newest is None else max(since, newest),
        supplier.terms,
        command.at,
        command.cause,
        source=REMAP_SOURCE,
        incoming=() if level is None else level[1],
        net_since=supplier.net_since,
        always=True,
    )


@handles(PutSku)
def put_sku(uow: UnitOfWork, command: PutSku) -> Upserted:
    existed = uow.get(StockItem, StockItem.id_for(command.sku)) is not None
    item = ensure_sku(uow, command.sku, command)
    changed = item.set_safety_stock(command.safety_stock, command.at, command.cause)
    if not existed:
        return Upserted(created=1)
    return Upserted(updated=1) if changed else Upserted(unchanged=1)


@handles(NoteLastReports)
def note_last_reports(uow: UnitOfWork, command: NoteLastReports) -> list[str]:
    """Returns the suppliers whose staleness changed."""
    changed = []
    for supplier_id, last_report_at in command.last_reports.items():
        supplier = uow.get(Supplier, Supplier.id_for(supplier_id))
        if supplier is not None and supplier.note_last_report(
            last_report_at, command.at, command.cause
        ):
            changed.append(supplier_id)
    return changed


@handles(AcknowledgeConflict)
def acknowledge_conflict(uow: UnitOfWork, command: AcknowledgeConflict) -> bool:
    """Acknowledges once; False when it already was."""
    if uow.get(ConflictAcknowledgement, command.conflict_id) is not None:
        return False
    uow.add(
        ConflictAcknowledgement.acknowledge(
            command.conflict_id, command.note, command.at, command.cause
        )
    )
    return True
