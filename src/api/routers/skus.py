"""The SKU catalogue: SKUs and their safety stock."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import AfterValidator

from api.auth import require
from api.deps import (
    AdminKey,
    Now,
    RequestId,
    RuntimeDep,
    StockAt,
    cause_for,
    set_position,
)
from api.routers.suppliers import upsert_out
from api.schemas import NOT_PRINTABLE, PRINTABLE, SkuIn, UpsertOut, addressable_sku
from api.settings import ApiKey
from ledger.commands import PutSku

router = APIRouter(prefix="/v1/skus", tags=["skus"])

SkuPath = Annotated[str, Path(min_length=1, max_length=128, pattern=PRINTABLE)]
# A SKU the catalogue may gain here must stay reachable by path (not `.` or `..`).
NewSkuPath = Annotated[SkuPath, AfterValidator(addressable_sku)]


CatalogueReaderKey = Annotated[ApiKey, Depends(require("storefront", "oms", "auditor"))]


@router.get("")
def catalogue(
    _: CatalogueReaderKey,
    runtime: RuntimeDep,
    wanted: StockAt,
    response: Response,
    after: Annotated[
        str,
        Query(max_length=128, pattern=rf"^[^{NOT_PRINTABLE}]*$", description="SKU cursor"),
    ] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The catalogue's SKUs in order, a page at a time (page on with `after=next_after`),
    from the stock view: a storefront reads their availability 100 at a time with
    `GET /v1/availability?sku=…` (found by a walkthrough: nothing listed the catalogue)."""
    position = runtime.views.wait_for("stock", wanted, runtime.settings.read_wait_max_seconds)
    set_position(response, position)
    rows = runtime.views.skus(after, limit)
    return {
        "items": rows,
        "next_after": rows[-1]["sku"] if len(rows) == limit else None,
        "position": position,
    }


@router.put("/{sku}", response_model=UpsertOut)
def put_sku(
    sku: NewSkuPath,
    body: SkuIn,
    key: AdminKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
    response: Response,
) -> UpsertOut:
    """Adds a SKU to the catalogue or sets its safety stock."""
    command = PutSku(
        at=at,
        cause=cause_for(key, "admin.sku.put", request_id),
        sku=sku,
        safety_stock=body.safety_stock,
    )
    outcome = runtime.writer.execute(command)
    set_position(response, outcome.position)
    return upsert_out(outcome.value, outcome.position)
