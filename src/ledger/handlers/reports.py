"""Supplier stock reports: absolute levels, applied only where they change something."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from ledger.application import InventoryLedger
from ledger.commands import RETRY_SOURCE, Observation, ReportStock
from ledger.delivery import DeliveryOutcome, FeedDelivery, Rejection
from ledger.errors import DeliveryConflict, UnknownSupplier
from ledger.handlers import handles
from ledger.mapping import MADE_BEFORE_UNITS, SkuMapping, unknown_unit
from ledger.stock import IncomingStock, ObservationOutcome, StockItem
from ledger.supplier import Supplier
from ledger.uow import ReadAhead, UnitOfWork

# A supplier's clock may run a little ahead of ours; beyond this a report is refused.
CLOCK_SKEW_TOLERANCE = timedelta(minutes=5)

# Quantities beyond this are a broken feed, not stock.
MAX_QUANTITY = 10**12


@dataclass(frozen=True)
class Level:
    """One observation resolved to an internal SKU, in base units."""

    index: int
    sku: str
    quantity: int
    observed_at: datetime
    incoming: IncomingStock | None = None


@handles(ReportStock)
def report_stock(uow: UnitOfWork, command: ReportStock) -> DeliveryOutcome:
    supplier = uow.get(Supplier, Supplier.id_for(command.supplier_id))
    if supplier is None:
        raise UnknownSupplier(f"unknown supplier {command.supplier_id!r}")
    delivery = uow.get(FeedDelivery, FeedDelivery.id_for(command.supplier_id, command.delivery_id))
    if delivery is not None:
        if delivery.content_hash != command.content_hash:
            raise DeliveryConflict(
                f"delivery {command.delivery_id!r} was already received with other content",
                delivery_id=command.delivery_id,
            )
        return delivery.outcome

    _preload(uow, command)
    rejected = list(command.rejected)
    levels, superseded, repeated = _newest_per_sku(uow, command, rejected)
    counts = {outcome: 0 for outcome in ObservationOutcome}
    counts[ObservationOutcome.LATE] = superseded
    counts[ObservationOutcome.UNCHANGED] = repeated
    uow.preload_seen(command.supplier_id, [level.sku for level in levels])
    for level in levels:
        item = uow.get(StockItem, StockItem.id_for(level.sku))
        assert item is not None  # _resolve keeps only SKUs that exist
        seen_at = uow.seen_at(command.supplier_id, level.sku)
        result = item.observe(
            command.supplier_id,
            level.quantity,
            level.observed_at,
            supplier.terms,
            command.at,
            command.cause,
            source=command.source,
            delivery_id=command.delivery_id,
            seen_at=seen_at,
            incoming=level.incoming,
            ties_lose=command.source == RETRY_SOURCE,
            net_since=supplier.net_since,
        )
        if result is ObservationOutcome.UNCHANGED and (
            seen_at is None or level.observed_at > seen_at
        ):
            # It leaves no event, but an older report arriving after it is late.
            uow.touch(command.supplier_id, level.sku, level.observed_at)
        counts[result] += 1

    outcome = DeliveryOutcome(
        delivery_id=command.delivery_id,
        rows=command.rows,
        applied=counts[ObservationOutcome.APPLIED],
        unchanged=counts[ObservationOutcome.UNCHANGED],
        late=counts[ObservationOutcome.LATE],
        rejected=sorted(rejected, key=lambda rejection: rejection.index),
    )
    uow.add(
        FeedDelivery.record(
            command.supplier_id,
            command.content_hash,
            command.source,
            outcome,
            command.at,
            command.cause,
        )
    )
    return outcome


def _preload(uow: UnitOfWork, command: ReportStock) -> None:
    """Loads the delivery's mappings, then its stock items, a round trip each."""
    mapping_ids = _mapping_ids(command)
    uow.preload(mapping_ids)
    skus = _skus(command, (uow.get(SkuMapping, mapping_id) for mapping_id in mapping_ids))
    uow.preload(StockItem.id_for(sku) for sku in skus)


def _mapping_ids(command: ReportStock) -> list[UUID]:
    """The mappings of the records named by the supplier's SKU, once each."""
    return list(
        dict.fromkeys(
            SkuMapping.id_for(command.supplier_id, o.supplier_sku)
            for o in command.observations
            if o.supplier_sku is not None
        )
    )


def _skus(command: ReportStock, mappings: Iterable[SkuMapping | None]) -> list[str]:
    """The SKUs the records name, through these mappings of theirs or as ours, once each."""
    mapped = (m.sku for m in mappings if m is not None)
    ours = (o.sku for o in command.observations if o.sku is not None)
    return list(dict.fromkeys([*mapped, *ours]))


def read_ahead(app: InventoryLedger, command: ReportStock) -> ReadAhead:
    """What `report_stock` will load for the command (`_preload`, `seen_at`), as the store
    holds it now: its mappings, its stock items and when each of their levels was last
    reported, a round trip each (see ReadAhead)."""
    mapping_ids = _mapping_ids(command)
    mappings = app.get_many(mapping_ids) if mapping_ids else {}
    skus = _skus(command, mappings.values())
    items = app.get_many(StockItem.id_for(sku) for sku in skus)
    select_seen = getattr(app.recorder, "select_seen", None)
    seen = select_seen(command.supplier_id, skus) if select_seen is not None else {}
    # Only what exists: one made meanwhile (a SKU registered) is not refused as unknown
    # on a stale read, which no save would catch; the writer asks for the rest itself.
    return ReadAhead(
        {**mappings, **items}, {(command.supplier_id, sku): seen.get(sku) for sku in skus}
    )


def _newest_per_sku(
    uow: UnitOfWork, command: ReportStock, rejected: list[Rejection]
) -> tuple[list[Level], int, int]:
    """Keeps the newest level per SKU; returns it with the superseded and repeated counts.

    Records at the newest time that disagree on the quantity are all refused: the
    delivery does not say which one is true. Exact repeats count as unchanged.
    """
    records = {observation.index: observation for observation in command.observations}
    by_sku: dict[str, list[Level]] = {}
    for observation in command.observations:
        level = _resolve(uow, command, observation)
        if isinstance(level, str):
            rejected.append(Rejection(observation.index, level, observation.as_record()))
        else:
            by_sku.setdefault(level.sku, []).append(level)
    newest: list[Level] = []
    superseded = repeated = 0
    for levels in by_sku.values():
        latest = max(level.observed_at for level in levels)
        at_latest = [level for level in levels if level.observed_at == latest]
        superseded += len(levels) - len(at_latest)
        if len({(level.quantity, level.incoming) for level in at_latest}) > 1:
            rejected.extend(
                Rejection(level.index, "conflicting_duplicate", records[level.index].as_record())
                for level in at_latest
            )
        else:
            newest.append(at_latest[0])
            repeated += len(at_latest) - 1
    return newest, superseded, repeated


def _resolve(uow: UnitOfWork, command: ReportStock, observation: Observation) -> Level | str:
    """The observation as a level of an internal SKU in base units, or why it is refused."""
    if observation.quantity < 0:
        return "negative_quantity"
    if observation.observed_at > command.at + CLOCK_SKEW_TOLERANCE:
        return "observed_at_in_future"
    quantity, sku, incoming = observation.quantity, observation.sku, observation.incoming
    if any(expected < 0 for _, expected in incoming or ()):
        return "negative_incoming"
    # Base units in one reported unit: the mapping's where the record names no unit or
    # the mapping's own, else the record's unit's by the supplier's table (a SKU of ours
    # is counted in base units).
    factor = observation.factor
    if observation.supplier_sku is not None:
        mapping = uow.get(
            SkuMapping, SkuMapping.id_for(command.supplier_id, observation.supplier_sku)
        )
        if mapping is None:
            return "unmapped_supplier_sku"
        if mapping.made_before_units(observation.unit, observation.observed_at):
            return MADE_BEFORE_UNITS
        sku = mapping.sku
        factor = mapping.factor(observation.unit) or factor
    if factor is None and observation.unit is not None:
        return unknown_unit(observation.unit)
    if factor is not None:
        quantity *= factor
        if incoming is not None:
            incoming = tuple((on, q * factor) for on, q in incoming)
    ceiling = min(MAX_QUANTITY, command.ceiling or MAX_QUANTITY)
    if quantity > ceiling or any(q > ceiling for _, q in incoming or ()):
        return "quantity_out_of_range"
    if sku is None or uow.get(StockItem, StockItem.id_for(sku)) is None:
        return "unknown_sku"
    return Level(observation.index, sku, quantity, observation.observed_at, incoming)
