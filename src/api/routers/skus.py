"""The SKU catalogue: SKUs and their safety stock."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import AfterValidator

from api.deps import AdminKey, Now, RequestId, RuntimeDep, cause_for, set_position
from api.routers.suppliers import upsert_out
from api.schemas import PRINTABLE, SkuIn, UpsertOut, addressable_sku
from ledger.commands import PutSku

router = APIRouter(prefix="/v1/skus", tags=["skus"])

SkuPath = Annotated[str, Path(min_length=1, max_length=128, pattern=PRINTABLE)]
# A SKU the catalogue may gain here must stay reachable by path (not `.` or `..`).
NewSkuPath = Annotated[SkuPath, AfterValidator(addressable_sku)]


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
