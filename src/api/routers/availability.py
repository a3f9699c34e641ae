"""What the storefront may sell, per SKU."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from api.deps import MinPosition, Now, ReaderKey, RuntimeDep, model_answer, set_position
from api.errors import ApiError
from api.routers.skus import SkuPath
from api.schemas import AvailabilityBatchOut, AvailabilityOut, SupplierLevelOut
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
        eta_days=levels.eta_days,
        position=position,
    )


@router.get("/{sku}", response_model=AvailabilityOut)
def one(
    sku: SkuPath,
    _: ReaderKey,
    runtime: RuntimeDep,
    at: Now,
    wanted: MinPosition,
) -> Response:
    """A SKU's availability from the stock view, once it reflects `min_position` if asked."""
    position, found = runtime.views.availability_after(
        [sku], at, wanted, runtime.settings.read_wait_max_seconds
    )
    levels = found.get(sku)
    if levels is None:
        raise ApiError(404, "unknown_sku", {"message": f"unknown SKU {sku!r}", "sku": sku})
    return model_answer(
        availability_out(levels, runtime.settings.limited_stock_at, position), position
    )


@router.get("", response_model=AvailabilityBatchOut)
def many(
    sku: Annotated[list[str], Query(min_length=1, max_length=MAX_BATCH)],
    _: ReaderKey,
    runtime: RuntimeDep,
    at: Now,
    wanted: MinPosition,
    response: Response,
) -> AvailabilityBatchOut:
    names = list(dict.fromkeys(sku))
    position, found = runtime.views.availability_after(
        names, at, wanted, runtime.settings.read_wait_max_seconds
    )
    set_position(response, position)
    return AvailabilityBatchOut(
        items=[
            availability_out(found[name], runtime.settings.limited_stock_at, position)
            for name in names
            if name in found
        ],
        unknown=[name for name in names if name not in found],
    )
