"""Conflicts for operators and auditors: what needs an eye, and acknowledging it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, StringConstraints

from api.deps import (
    AdminKey,
    AuditorKey,
    ConflictsAt,
    Now,
    RequestId,
    RuntimeDep,
    cause_for,
    set_position,
)
from api.errors import ApiError
from api.schemas import NO_NUL, PRINTABLE, SUPPLIER_ID_PATTERN, Strict
from connectors.parts import delivery_of
from ledger.commands import AcknowledgeConflict
from projections.conflicts import ConflictKind

router = APIRouter(prefix="/v1/conflicts", tags=["conflicts"])


class ConflictOut(BaseModel):
    conflict_id: UUID
    kind: str
    sku: str | None
    supplier_id: str | None
    occurred_at: datetime
    detail: dict[str, Any]
    caused_by: dict[str, Any]
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    note: str | None


class ConflictsOut(BaseModel):
    items: list[ConflictOut]
    next_after: int | None
    position: int


class AcknowledgeIn(Strict):
    # Kept in the conflicts view as text, where PostgreSQL refuses a NUL: the view would
    # stop at it.
    note: Annotated[str, StringConstraints(max_length=2000, pattern=NO_NUL)] | None = None


def conflict_out(row: dict[str, Any]) -> ConflictOut:
    return ConflictOut(
        conflict_id=row["conflict_id"],
        kind=row["kind"],
        sku=row["sku"],
        supplier_id=row["supplier_id"],
        occurred_at=row["occurred_at"],
        detail=_named_by_delivery(row["detail"]),
        caused_by={
            "position": row["position"],
            "type": row["topic"],
            "originator_id": str(row["originator_id"]),
            "version": row["originator_version"],
            "actor": row["actor"],
            "correlation_id": row["correlation_id"],
        },
        acknowledged_at=row["acknowledged_at"],
        acknowledged_by=row["acknowledged_by"],
        note=row["note"],
    )


@router.get("", response_model=ConflictsOut)
def list_conflicts(
    _: AuditorKey,
    runtime: RuntimeDep,
    wanted: ConflictsAt,
    response: Response,
    kind: ConflictKind | None = None,
    sku: Annotated[str | None, Query(max_length=128, pattern=PRINTABLE)] = None,
    supplier_id: Annotated[str | None, Query(pattern=SUPPLIER_ID_PATTERN)] = None,
    state: Literal["open", "acknowledged"] | None = None,
    after: Annotated[int, Query(ge=0, description="position cursor")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ConflictsOut:
    """Conflicts in log order, filtered; page on with `after=next_after`. A page holds
    every conflict of the last position it reaches (one event can raise several), so it
    may run a few past `limit`."""
    position = runtime.views.wait_for("conflicts", wanted, runtime.settings.read_wait_max_seconds)
    set_position(response, position)
    rows = runtime.views.conflicts(
        kind=kind,
        sku=sku,
        supplier_id=supplier_id,
        acknowledged=None if state is None else state == "acknowledged",
        after=after,
        limit=limit,
    )
    return ConflictsOut(
        items=[conflict_out(row) for row in rows],
        next_after=rows[-1]["position"] if len(rows) >= limit else None,
        position=position,
    )


@router.post("/{conflict_id}/acknowledge")
def acknowledge(
    conflict_id: UUID,
    key: AdminKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
    response: Response,
    body: AcknowledgeIn | None = None,
) -> dict[str, Any]:
    """Records that an operator has seen the conflict (once; repeating changes nothing)."""
    if not runtime.views.conflict_exists(conflict_id):
        raise ApiError(404, "conflict_not_found", f"no conflict {conflict_id}")
    command = AcknowledgeConflict(
        at=at,
        cause=cause_for(key, "admin.conflict.acknowledged", request_id),
        conflict_id=conflict_id,
        note=body.note if body else None,
    )
    outcome = runtime.writer.execute(command)
    set_position(response, outcome.position)
    return {"conflict_id": str(conflict_id), "acknowledged": True, "position": outcome.position}


def _named_by_delivery(detail: dict[str, Any]) -> dict[str, Any]:
    """A conflict raised by a delivery's part names the delivery, as `GET /v1/feeds/{id}`
    and the dead letters know it, and the part (`part`), as its events do; so does the
    last delivery that repeated it (`last_delivery_id`, `last_part`)."""
    named = dict(detail)
    for key, part_key in (("delivery_id", "part"), ("last_delivery_id", "last_part")):
        value = detail.get(key)
        if isinstance(value, str):
            delivery, part = delivery_of(value)
            if part is not None:
                named.update({key: delivery, part_key: part})
    return named
