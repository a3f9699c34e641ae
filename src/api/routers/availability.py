"""What the storefront may sell, per SKU."""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.answers import availability_fields, written
from api.deps import POSITION_HEADER, Read, ReadDep, json_answer
from api.errors import ApiError
from api.routers.skus import SkuPath
from api.schemas import AvailabilityBatchOut, AvailabilityOut, IncomingOut, Sku, SupplierLevelOut
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
                incoming=[
                    IncomingOut(
                        quantity=quantity,
                        expected_on=None if on is None else date.fromisoformat(on),
                    )
                    for on, quantity in level.incoming
                ],
            )
            for level in levels.suppliers
        ],
        eta_days=levels.eta_days,
        position=position,
    )


async def availability_at(read: Read, skus: list[str]) -> tuple[int, dict[str, StockLevels]]:
    """The stock view's numbers for these SKUs, and the position they are exactly at.

    From the in-process copy when it holds them all and is recent enough (no thread, no
    round trip); otherwise fetched from the view by the copy with other readers' SKUs,
    awaited on the loop (for up to the copy's `fetch_wait_seconds`); otherwise (no copy,
    its read failed or was late, or the view is short of `wanted`) from the view on a
    worker thread, waiting for `wanted`.
    """
    views = read.runtime.views
    cache = views.cache
    limit = read.runtime.settings.read_wait_max_seconds
    loop = asyncio.get_running_loop()
    began = loop.time()
    if cache is not None:
        cached = cache.lookup(skus, read.wanted)
        if cached is not None:
            return cached.position, {entry.sku: entry.levels(read.at) for entry in cached.entries}
        fetched = cache.fetch(skus, read.at)
        if fetched is not None:
            try:
                waited = asyncio.wrap_future(fetched)
                snapshot = await asyncio.wait_for(waited, cache.fetch_wait_seconds)
            except TimeoutError:
                snapshot = None  # the database is slow: read it on a thread, as without the copy
            if snapshot is not None and (read.wanted is None or snapshot.position >= read.wanted):
                found = {sku: entry.levels(read.at) for sku, entry in snapshot.entries.items()}
                return snapshot.position, found
    # A view short of `wanted` is waited for here, on the loop, not on a shared thread
    # (see `Views.reach`); the read on the thread then finds it there.
    await views.reach("stock", read.wanted, limit - (loop.time() - began))
    left = max(0.0, limit - (loop.time() - began))
    return await run_in_threadpool(views.availability_after, skus, read.at, read.wanted, left)


@router.get("/{sku}", response_model=AvailabilityOut)
async def one(sku: SkuPath, read: ReadDep) -> Response:
    """A SKU's availability from the stock view, once it reflects `min_position` if asked."""
    position, found = await availability_at(read, [sku])
    levels = found.get(sku)
    if levels is None:
        # Unknown at this position: a client that made the SKU reads again with its write's
        # position as `min_position` (it said neither before: a walkthrough).
        detail = {"message": f"unknown SKU {sku!r}", "sku": sku, "position": position}
        raise ApiError(404, "unknown_sku", detail, {POSITION_HEADER: str(position)})
    limited_at = read.runtime.settings.limited_stock_at
    return availability_answer([levels], limited_at, position, batch=False)


@router.get("", response_model=AvailabilityBatchOut)
async def many(
    sku: Annotated[list[Sku], Query(min_length=1, max_length=MAX_BATCH)],
    read: ReadDep,
) -> Response:
    names = list(dict.fromkeys(sku))
    position, found = await availability_at(read, names)
    limited_at = read.runtime.settings.limited_stock_at
    known = [found[name] for name in names if name in found]
    unknown = [name for name in names if name not in found]
    return availability_answer(known, limited_at, position, batch=True, unknown=unknown)


def availability_answer(
    found: list[StockLevels],
    limited_at: int,
    position: int,
    *,
    batch: bool,
    unknown: list[str] | None = None,
) -> Response:
    """The answer to a read of one SKU (`found` holds its levels), or of a list: as
    AvailabilityOut or AvailabilityBatchOut, written by api.answers."""
    items = [availability_fields(levels, limited_at, position) for levels in found]
    unknown = unknown or []

    def model() -> BaseModel:
        answers = [availability_out(levels, limited_at, position) for levels in found]
        return AvailabilityBatchOut(items=answers, unknown=unknown) if batch else answers[0]

    fields = {"items": items, "unknown": unknown} if batch else items[0]
    return json_answer(written(fields, model), position)
