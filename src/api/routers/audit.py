"""Audit reads from the event store itself: a SKU's history, its state at a moment, the log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime

from api.deps import AuditorKey, RuntimeDep
from api.errors import ApiError, invalid
from api.routers.availability import availability_out
from api.routers.skus import SkuPath
from ledger.errors import UnknownSku
from ledger.stock import EPOCH, second_floor
from ledger.supplier import SupplierTerms
from projections.audit import PointInTime

router = APIRouter(tags=["audit"])


@router.get("/v1/skus/{sku}/history")
def history(
    sku: SkuPath,
    _: AuditorKey,
    runtime: RuntimeDep,
    after_version: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Every event of the SKU in order: position, time, type, payload, actor, reason, request."""
    try:
        events = runtime.audit.history(sku, after_version, limit)
    except UnknownSku as error:
        raise ApiError(404, "unknown_sku", {"message": error.message, "sku": sku}) from error
    return {
        "sku": sku,
        "items": [event.as_json() for event in events],
        "next_after_version": events[-1].version if len(events) == limit else None,
    }


@router.get("/v1/skus/{sku}/stock")
def stock_at(
    sku: SkuPath,
    _: AuditorKey,
    runtime: RuntimeDep,
    at: AwareDatetime | None = None,
    position: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    """The SKU's full state at a time or a log position: levels, holds, commitments, available."""
    if (at is None) == (position is None):
        raise invalid(
            ["query", "at" if at is None else "position"],
            "give exactly one of at (ISO 8601) and position",
            "missing" if at is None else "excluded",
        )
    try:
        moment = runtime.audit.stock_at(sku, at=at, position=position)
    except UnknownSku as error:
        raise ApiError(404, "unknown_sku", {"message": error.message, "sku": sku}) from error
    return point_in_time_out(moment, runtime.settings.limited_stock_at)


def point_in_time_out(moment: PointInTime, limited_at: int) -> dict[str, Any]:
    numbers = availability_out(moment.levels, limited_at, moment.position).model_dump(mode="json")
    # The holds that count then, as `held` counts them: one that runs out at that very
    # second was listed, though no longer counted (a walkthrough).
    now = second_floor(moment.at)
    numbers["suppliers"] = [
        {
            **supplier,
            # As the SKU's `committed` counts it (open orders committed while the supplier
            # reported net count once its report holds them): they did not add up.
            "committed": level.committed,
            "net_committed": position.net_committed,
            "unreported": sum(position.unreported.values()),
            "holds": [
                {"expires_at": _second(expires), "quantity": quantity}
                for expires, quantity in sorted(position.held.items())
                if expires > now
            ],
            # The terms the numbers were made with then: a change of them is in the
            # supplier's history, not the SKU's, and sellable moved with no event of the
            # SKU's to say why (an auditor's walkthrough).
            "terms": _terms_out(moment.terms.get(supplier["supplier_id"])),
        }
        for supplier, level in zip(numbers["suppliers"], moment.levels.suppliers, strict=True)
        for position in (moment.item.positions[level.supplier_id],)
    ]
    return {**numbers, "at": moment.at.isoformat(), "version": moment.version}


def _terms_out(terms: SupplierTerms | None) -> dict[str, Any] | None:
    if terms is None:
        return None
    return {
        "priority": terms.priority,
        "buffer": terms.buffer,
        "stale_after_seconds": terms.stale_after_seconds,
        "exclude_after_seconds": terms.exclude_after_seconds,
        "reports_net_of_our_orders": terms.reports_net_of_our_orders,
    }


def _second(unix_second: int) -> str:
    return (EPOCH + timedelta(seconds=unix_second)).isoformat()


class NdjsonResponse(StreamingResponse):
    """Newline-delimited JSON: one value a line."""

    media_type = "application/x-ndjson"


@router.get(
    "/v1/audit/events",
    response_class=NdjsonResponse,
    response_description="The events, one JSON object a line, in log order.",
)
def events(
    _: AuditorKey,
    runtime: RuntimeDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
) -> NdjsonResponse:
    """The global log from a position as NDJSON, one event a line, in log order."""

    def lines() -> Iterator[bytes]:
        for event in runtime.audit.events(after, limit):
            yield json.dumps(event.as_json(), separators=(",", ":")).encode() + b"\n"

    return NdjsonResponse(lines())
