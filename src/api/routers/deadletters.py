"""Dead letters: refused records, listed for operators and tried again once fixed."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Query, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from api.deps import AdminKey, AuditorKey, RuntimeDep, set_position
from api.errors import ApiError
from api.schemas import PRINTABLE, SUPPLIER_ID_PATTERN, Strict
from connectors.deadletters import (
    RetryBusy,
    RetryOutcome,
    dismiss,
    letter_suppliers,
    listing,
    retry,
    superseded_by,
)

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/dead-letters", tags=["dead letters"])


class BulkRetryIn(Strict):
    """Which open letters to apply again (all those of a supplier, of a reason, of a
    delivery, or of several of these), in id order after `after`, at most `limit`."""

    supplier_id: Annotated[str | None, Field(pattern=SUPPLIER_ID_PATTERN)] = None
    reason: Annotated[
        str | None, Field(max_length=100, pattern=PRINTABLE, description="a reason prefix")
    ] = None
    delivery_id: Annotated[str | None, Field(max_length=200, pattern=PRINTABLE)] = None
    # Past letters that will not clear (a negative quantity, a report too old), which
    # took every one of a retry's `limit` places, again and again (a walkthrough).
    after: Annotated[int, Field(ge=0, strict=True, description="letters after this id")] = 0
    limit: Annotated[int, Field(ge=1, le=100_000, strict=True)] = 1000


class BulkDismissIn(BulkRetryIn):
    """Which open letters to close unapplied: those of a supplier, of a reason, of a
    delivery, or of several of these (at least one), in id order after `after`, at most
    `limit`."""


def _out(outcome: RetryOutcome) -> dict[str, Any]:
    """A retry's answer, each list in letter id order (they are applied by supplier),
    and what the resolved ones did: `late` ones are resolved and changed nothing, as a
    newer report stands."""
    return {
        "resolved": sorted(outcome.resolved),
        "still_refused": [{"id": k, "reason": v} for k, v in sorted(outcome.still_refused.items())],
        "not_retryable": sorted(outcome.not_retryable),
        "being_retried": outcome.being_retried,
        "applied": outcome.applied,
        "unchanged": outcome.unchanged,
        "late": outcome.late,
        "position": outcome.position,
    }


async def _retried(runtime: RuntimeDep, ids: list[int], actor: str) -> RetryOutcome:
    try:
        return await run_in_threadpool(retry, runtime.store, runtime.ingestor, ids, actor)
    except RetryBusy as busy:
        raise ApiError(503, "retry_busy", str(busy), {"Retry-After": "5"}) from None


async def _not_open(runtime: RuntimeDep, letter_id: int) -> ApiError:
    """Why a letter asked for by id is not open: superseded by a newer one (`409`, naming
    it: retry that one), or not there or closed (`404`)."""
    newer = await run_in_threadpool(superseded_by, runtime.store, letter_id)
    if newer is not None:
        return ApiError(
            409,
            "dead_letter_superseded",
            {
                "message": f"dead letter {letter_id} was superseded by a newer report of its"
                f" record, letter {newer}: retry or dismiss that one",
                "superseded_by": newer,
            },
        )
    return ApiError(404, "dead_letter_not_found", f"no open dead letter {letter_id}")


def _being_retried(ids: list[int]) -> ApiError:
    return ApiError(
        409,
        "dead_letter_being_retried",
        {"message": "another retry holds these letters: try again once it ends", "ids": ids},
    )


@router.get("")
def list_letters(
    _: AuditorKey,
    runtime: RuntimeDep,
    supplier_id: Annotated[str | None, Query(pattern=SUPPLIER_ID_PATTERN)] = None,
    reason: Annotated[
        str | None, Query(max_length=100, pattern=PRINTABLE, description="a reason prefix")
    ] = None,
    status: Literal["open", "resolved", "dismissed", "superseded", "all"] = "open",
    delivery_id: Annotated[str | None, Query(max_length=200, pattern=PRINTABLE)] = None,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    rows = listing(
        runtime.store,
        supplier_id=supplier_id,
        reason=reason,
        status=None if status == "all" else status,
        delivery_id=delivery_id,
        after=after,
        limit=limit,
    )
    return {"items": rows, "next_after": rows[-1]["id"] if len(rows) == limit else None}


@router.post("/{letter_id}/retry")
async def retry_one(
    letter_id: int, key: AdminKey, runtime: RuntimeDep, response: Response
) -> dict[str, Any]:
    """Applies one refused record again, e.g. after its mapping was added."""
    outcome = await _retried(runtime, [letter_id], key.name)
    if outcome.being_retried:
        raise _being_retried(outcome.being_retried)
    if not (outcome.resolved or outcome.still_refused or outcome.not_retryable):
        raise await _not_open(runtime, letter_id)
    set_position(response, outcome.position)
    return _out(outcome)


@router.post("/{letter_id}/dismiss")
async def dismiss_one(letter_id: int, key: AdminKey, runtime: RuntimeDep) -> dict[str, Any]:
    """Closes an open letter without applying it: e.g. the false one of records that
    disagreed, before the true one is retried."""
    dismissal = await run_in_threadpool(dismiss, runtime.store, [letter_id])
    if dismissal.being_retried:
        raise _being_retried(dismissal.being_retried)
    if not dismissal.dismissed:
        raise await _not_open(runtime, letter_id)
    log.info("dead_letter.dismissed", letter=letter_id, actor=key.name)
    return {"dismissed": dismissal.dismissed, "reopened": dismissal.reopened}


@router.post("/dismiss")
async def dismiss_many(key: AdminKey, runtime: RuntimeDep, body: BulkDismissIn) -> dict[str, Any]:
    """Closes open letters unapplied in bulk (the negative quantities a supplier sent, say,
    which no retry can clear), by supplier, reason and delivery: at least one of them. Those
    a retry holds are left open (`being_retried`); `next_after` is the last letter looked
    at when `limit` were, to go on from."""
    if body.supplier_id is None and body.reason is None and body.delivery_id is None:
        raise ApiError(
            422, "filter_required", "say supplier_id, reason or delivery_id: which letters"
        )
    ids = await _open_letters(runtime, body)
    dismissal = await run_in_threadpool(dismiss, runtime.store, ids)
    log.info("dead_letter.dismissed", letters=len(dismissal.dismissed), actor=key.name)
    return {
        "dismissed": dismissal.dismissed,
        "being_retried": dismissal.being_retried,
        "reopened": dismissal.reopened,
        "next_after": ids[-1] if len(ids) == body.limit else None,
    }


async def _open_letters(runtime: RuntimeDep, body: BulkRetryIn) -> list[int]:
    """The ids of the open letters a bulk request picks (a delivery id is a supplier's: one
    that several suppliers used needs `supplier_id`)."""
    if body.delivery_id is not None and body.supplier_id is None:
        suppliers = await run_in_threadpool(letter_suppliers, runtime.store, body.delivery_id)
        if len(suppliers) > 1:
            raise ApiError(
                409, "ambiguous_delivery", "several suppliers used this id: say supplier_id"
            )
    letters = await run_in_threadpool(
        listing,
        runtime.store,
        supplier_id=body.supplier_id,
        reason=body.reason,
        status="open",
        delivery_id=body.delivery_id,
        after=body.after,
        ids_only=True,
        limit=body.limit,
    )
    return [letter["id"] for letter in letters]


@router.post("/retry")
async def retry_many(
    key: AdminKey, runtime: RuntimeDep, response: Response, body: BulkRetryIn | None = None
) -> dict[str, Any]:
    """Applies open letters again in bulk, by supplier, reason and delivery (a delivery id
    is a supplier's: one that several suppliers used needs `supplier_id`). Every field is
    optional, so no body at all is `{}`: every open letter, up to the limit. `next_after`
    is the last letter looked at when `limit` were, to go on from past letters that
    stay refused."""
    body = body or BulkRetryIn()
    ids = await _open_letters(runtime, body)
    outcome = await _retried(runtime, ids, key.name)
    set_position(response, outcome.position)
    return {**_out(outcome), "next_after": ids[-1] if len(ids) == body.limit else None}
