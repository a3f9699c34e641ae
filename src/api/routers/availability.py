"""What the storefront may sell, per SKU."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import Now, ReaderKey, RuntimeDep
from api.errors import ApiError
from api.routers.skus import SkuPath
from api.runtime import Runtime
from api.schemas import AvailabilityBatchOut, AvailabilityOut, SupplierLevelOut
from ledger.errors import UnknownSku
from ledger.stock import StockLevels

router = APIRouter(prefix="/v1/availability", tags=["availability"])

MAX_BATCH = 100


def availability_out(levels: StockLevels, limited_at: int, position: int) -> AvailabilityOut:
    return AvailabilityOut(
        sku=levels.sku,
        on_hand=levels.on_hand,
        sellable=levels.sellable,
        held=levels.held,
        committed=levels.committed,
        available=levels.available,
        safety_stock=levels.safety_stock,
        status=levels.status(limited_at),
        suppliers=[
            SupplierLevelOut(
                supplier_id=level.supplier_id,
                quantity=level.quantity,
                observed_at=level.observed_at,
                age_seconds=level.age_seconds,
                stale=level.stale,
                excluded=level.excluded,
                lead_time_days=level.lead_time_days,
            )
            for level in levels.suppliers
        ],
        position=position,
    )


def _position(runtime: Runtime) -> int:
    # Read before the aggregates: the answer reflects at least everything up to here.
    return runtime.app.recorder.max_notification_id() or 0


@router.get("/{sku}", response_model=AvailabilityOut)
def one(sku: SkuPath, _: ReaderKey, runtime: RuntimeDep, at: Now) -> AvailabilityOut:
    position = _position(runtime)
    try:
        levels = runtime.queries.stock_levels(sku, at)
    except UnknownSku as error:
        raise ApiError(404, "unknown_sku", {"message": error.message, "sku": sku}) from error
    return availability_out(levels, runtime.settings.limited_stock_at, position)


@router.get("", response_model=AvailabilityBatchOut)
def many(
    sku: Annotated[list[str], Query(min_length=1, max_length=MAX_BATCH)],
    _: ReaderKey,
    runtime: RuntimeDep,
    at: Now,
) -> AvailabilityBatchOut:
    position = _position(runtime)
    items: list[AvailabilityOut] = []
    unknown: list[str] = []
    for name in dict.fromkeys(sku):
        try:
            levels = runtime.queries.stock_levels(name, at)
        except UnknownSku:
            unknown.append(name)
            continue
        items.append(availability_out(levels, runtime.settings.limited_stock_at, position))
    return AvailabilityBatchOut(items=items, unknown=unknown)
