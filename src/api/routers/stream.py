"""Availability as it changes: server-sent events for storefronts (see api.stream)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import MAX_POSITION, RuntimeDep, StockAt
from api.errors import ApiError
from api.routers.availability import MAX_BATCH, availability_out
from api.routers.skus import CatalogueReaderKey
from api.schemas import PRINTABLE
from api.stream import events, shutting_down
from projections.entries import StockEntry

router = APIRouter(prefix="/v1/stream", tags=["availability"])

SKU = re.compile(PRINTABLE)
MAX_SKU = 128  # as api.schemas.Sku
POSITION = re.compile(r"[0-9]{1,18}")


class EventStreamResponse(StreamingResponse):
    """Server-sent events (so OpenAPI declares the stream as what it is)."""

    media_type = "text/event-stream"


@router.get(
    "/availability",
    response_class=EventStreamResponse,
    response_description="`availability` (and `reset`) events, each `data` one JSON object.",
)
async def availability_stream(
    request: Request,
    _: CatalogueReaderKey,  # first: a key is checked before any wait
    runtime: RuntimeDep,
    reached: StockAt,
    sku: Annotated[list[str] | None, Query(max_length=MAX_BATCH)] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_POSITION)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventStreamResponse:
    """`text/event-stream` of availability changes, for the SKUs named (up to 100) or all.

    Each change is an `availability` event whose data is what `GET /v1/availability/{sku}`
    answers and whose `id` is the view's position. Named SKUs start with their current
    availability; `after` (or `Last-Event-ID`, which an EventSource sends when it
    reconnects, and which wins) starts with what changed since that position instead. A
    `reset` event says more changed than one burst carries: read afresh, then follow.
    With `min_position` (or `X-Min-Position`) the stream starts once the view has reached
    it, so that the SKUs' first events show the client's own write, or it is `503
    position_not_reached` as a read is.
    """
    del reached  # waited for by its dependency, before the stream begins
    skus = None
    if sku is not None:
        bad = [name for name in sku if len(name) > MAX_SKU or not SKU.fullmatch(name)]
        if bad:
            raise ApiError(422, "invalid_sku", "1 to 128 characters, no control characters")
        skus = frozenset(sku)
    start = after
    if last_event_id is not None:
        if not POSITION.fullmatch(last_event_id):
            raise ApiError(422, "invalid_last_event_id", "Last-Event-ID is a log position")
        start = int(last_event_id)
    limited_at = runtime.settings.limited_stock_at

    def render(entry: StockEntry, position: int) -> dict[str, Any]:
        levels = entry.levels(datetime.now(UTC))
        return availability_out(levels, limited_at, position).model_dump(mode="json")

    stream = events(
        request.app.state.availability_feed,
        runtime.store,
        skus,
        start,
        render,
        shutting_down(),
    )
    return EventStreamResponse(
        stream,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
