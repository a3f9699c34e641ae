"""Feeds: uploaded files and signed webhooks go to the inbox; their status; feed health."""

from __future__ import annotations

import time
from typing import Annotated, Any, cast
from urllib.parse import quote, urlencode

import structlog
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.deps import AdminKey, AuditorKey, FeedReaderKey, RuntimeDep, SupplierId, SupplierKey
from api.errors import ApiError
from api.openapi import raw_body
from api.runtime import Runtime
from api.schemas import PRINTABLE, PRINTABLE_ASCII, SUPPLIER_ID_PATTERN, delivery_id_problem
from connectors import health, inbox
from connectors.ingest import content_hash
from connectors.parsers import FORMATS, Format
from connectors.secrets import SecretUnavailable, resolve
from connectors.transports import delivery_format
from connectors.webhooks import (
    DEFAULT_TOLERANCE_SECONDS,
    MAX_TOLERANCE_SECONDS,
    canonical,
    refusal,
)
from ledger.errors import UnknownSupplier
from ledger.supplier import SupplierTerms

log = structlog.get_logger(__name__)

router = APIRouter(tags=["feeds"])

DeliveryHeader = Annotated[
    str | None, Header(alias="X-Ledger-Delivery", max_length=200, pattern=PRINTABLE_ASCII)
]


# A delivery's id is looked up at `/v1/feeds/{id}`, where these name other things.
def _named(delivery: str | None) -> str | None:
    problem = None if delivery is None else delivery_id_problem(delivery)
    if problem is not None:
        raise ApiError(422, "invalid_delivery_id", problem)
    return delivery


def _terms(runtime: Runtime, supplier_id: str) -> SupplierTerms:
    supplier = runtime.queries.supplier(supplier_id)
    if supplier is None:
        raise UnknownSupplier(f"unknown supplier {supplier_id!r}")
    return supplier.terms


def _accepted(runtime: Runtime, received: inbox.Received, supplier_id: str) -> JSONResponse:
    if received.clash and received.received_as is not None:
        raise ApiError(
            409,
            "delivery_id_conflict",
            f"delivery {received.delivery_id!r} was already received as"
            f" {received.received_as} and is {received.status}: the same content in another"
            " format is queued again only once that one was rejected or failed",
        )
    if received.clash:
        raise ApiError(
            409,
            "delivery_id_conflict",
            f"delivery {received.delivery_id!r} was already received with other content",
        )
    if runtime.inbox_worker is not None:
        runtime.inbox_worker.wake()
    # An id may hold what a URL must escape (a slash is kept: the routes below take it).
    location = f"/v1/feeds/{quote(received.delivery_id, safe='/:@')}?" + urlencode(
        {"supplier_id": supplier_id}
    )
    return JSONResponse(
        {
            "delivery_id": received.delivery_id,
            "status": received.status,
            "duplicate": received.duplicate,
        },
        status_code=202,
        headers={"Location": location},
    )


@router.post(
    "/v1/suppliers/{supplier_id}/feeds",
    status_code=202,
    openapi_extra=raw_body(
        "The feed file as it is, in the format `format` names (else the supplier's); "
        "its Content-Type is not read."
    ),
)
async def upload(
    supplier_id: SupplierId,
    request: Request,
    key: SupplierKey,
    runtime: RuntimeDep,
    delivery: DeliveryHeader = None,
    format: Annotated[
        str | None, Query(max_length=16, pattern=PRINTABLE, description="csv, json, xml or edi846")
    ] = None,
    name: Annotated[
        str | None, Query(max_length=255, pattern=PRINTABLE, description="the file's name")
    ] = None,
) -> JSONResponse:
    """Accepts a feed file (raw body) into the inbox; it is applied in the background."""
    if key.role == "supplier" and key.supplier_id != supplier_id:
        raise ApiError(403, "forbidden", "this key uploads for another supplier")
    delivery = _named(delivery)
    body = await request.body()
    if not body:
        raise ApiError(422, "empty_feed", "the request body is the feed file, and it is empty")
    terms = await _in_thread(_terms, runtime, supplier_id)
    chosen = delivery_format(format, terms.connector)
    if chosen not in FORMATS:
        raise ApiError(
            422,
            "unknown_format",
            f"format is one of {', '.join(FORMATS)}"
            + ("" if format else " (none was given, and the supplier has none set)"),
        )
    digest = content_hash(body)
    received = await _in_thread(
        _enqueue,
        runtime,
        supplier_id,
        delivery or f"sha256:{digest[:32]}",
        "upload",
        chosen,
        digest,
        body,
        name,
        None,
        key.name,
    )
    return _accepted(runtime, received, supplier_id)


# What each refusal of a webhook's signature says (every one said "the webhook signature
# does not hold", a request sent without one too: an operator's walkthrough).
WHY_REFUSED = {
    "missing_signature": "a webhook is signed: X-Ledger-Signature and X-Ledger-Timestamp"
    " are both required",
    "bad_timestamp": "X-Ledger-Timestamp is the signing time in whole Unix seconds",
    "expired_signature": "the request was signed more than {tolerance} s from now:"
    " sign it again as it is sent",
    "bad_signature": "the signature does not hold for this body and timestamp",
}


@router.post(
    "/v1/suppliers/{supplier_id}/webhook",
    status_code=202,
    openapi_extra=raw_body(
        "The supplier's payload as it is, in its webhook's format (JSON unless it says "
        "otherwise), signed: `X-Ledger-Signature: sha256=<hex>`, the HMAC-SHA256 of "
        "`{X-Ledger-Timestamp}.{body}`."
    ),
)
async def webhook(
    supplier_id: SupplierId,
    request: Request,
    runtime: RuntimeDep,
    delivery: DeliveryHeader = None,
    timestamp: Annotated[str | None, Header(alias="X-Ledger-Timestamp")] = None,
    signature: Annotated[str | None, Header(alias="X-Ledger-Signature")] = None,
) -> JSONResponse:
    """A supplier's own payload, verified by its HMAC signature, acknowledged at once."""
    delivery = _named(delivery)
    body = await request.body()
    # An unknown supplier is answered as one without a webhook: a caller without a key
    # learns nothing of which suppliers exist (it was a 404, where a known one's is 401).
    supplier = await _in_thread(runtime.queries.supplier, supplier_id)
    settings = (supplier.terms.connector.get("webhook") if supplier else None) or {}
    try:
        secret = resolve(settings.get("secret_ref"))
    except SecretUnavailable as error:
        log.warning("webhook.refused", supplier=supplier_id, reason="no_secret", error=str(error))
        raise ApiError(
            401, "webhook_not_configured", "this supplier has no webhook secret"
        ) from error
    # (Settings saved before the cap existed may say more: the cap holds all the same.)
    tolerance = min(
        int(settings.get("tolerance_seconds", DEFAULT_TOLERANCE_SECONDS)), MAX_TOLERANCE_SECONDS
    )
    reason = refusal(secret, timestamp, signature, body, time.time(), tolerance)
    if reason is not None:
        log.warning("webhook.refused", supplier=supplier_id, reason=reason)
        raise ApiError(401, reason, WHY_REFUSED[reason].format(tolerance=tolerance))
    assert timestamp is not None
    assert signature is not None
    if not body:  # as an upload's: refused now, not acknowledged and rejected later
        raise ApiError(
            422, "empty_feed", "the request body is the supplier's payload, and it is empty"
        )
    digest = content_hash(body)
    received = await _in_thread(
        _receive_signed,
        runtime,
        supplier_id,
        # The supplier's own delivery id, else its content's hash (as for an upload).
        delivery or f"sha256:{digest[:32]}",
        canonical(signature),
        body,
        digest,
        int(timestamp),
        cast(Format, settings.get("format", "json")),  # checked when the supplier was saved
    )
    if received is None:
        log.warning("webhook.refused", supplier=supplier_id, reason="replayed_signature")
        raise ApiError(401, "replayed_signature", "this signed request was already received")
    return _accepted(runtime, received, supplier_id)


def _receive_signed(
    runtime: Runtime,
    supplier_id: str,
    delivery_id: str,
    signature: str,
    body: bytes,
    digest: str,
    at: int,
    format: Format,
) -> inbox.Received | None:
    """Stores a signed delivery and its signature as used, together (a delivery that could
    not be stored leaves its signature to be sent again); None for a replayed signature."""
    with runtime.store.connection() as conn, conn.transaction():
        if not inbox.first_use_of_signature(conn, supplier_id, signature.strip()):
            return None
        return inbox.receive(
            conn,
            supplier_id=supplier_id,
            delivery_id=delivery_id,
            source="webhook",
            format=format,
            content_hash=digest,
            body=body,
            signed_at=at,
        )


def _enqueue(
    runtime: Runtime,
    supplier_id: str,
    delivery_id: str,
    source: str,
    format: Format,
    digest: str,
    body: bytes,
    name: str | None,
    signed_at: int | None,
    received_by: str | None = None,
) -> inbox.Received:
    with runtime.store.connection() as conn:
        return inbox.receive(
            conn,
            supplier_id=supplier_id,
            delivery_id=delivery_id,
            source=source,
            format=format,
            content_hash=digest,
            body=body,
            name=name,
            signed_at=signed_at,
            received_by=received_by,
        )


async def _in_thread(function: Any, *args: Any) -> Any:
    return await run_in_threadpool(function, *args)


@router.get("/v1/feeds/health")
def feeds_health(_: AuditorKey, runtime: RuntimeDep) -> dict[str, Any]:
    """Per supplier: last success and error, failures in a row, breaker, lag, rows."""
    with runtime.store.connection() as conn:
        return {"suppliers": health.report(conn)}


@router.post("/v1/feeds/{delivery_id:path}/retry", status_code=202)
def retry_delivery(
    delivery_id: Annotated[str, Path(max_length=200, pattern=PRINTABLE)],
    _: AdminKey,
    runtime: RuntimeDep,
    supplier_id: Annotated[str | None, Query(pattern=SUPPLIER_ID_PATTERN)] = None,
) -> dict[str, Any]:
    """Queues again a delivery that failed for good or was rejected whole, once what
    stopped it is fixed; it is applied as it was received (its inbox copy)."""
    with runtime.store.connection() as conn, conn.transaction():
        found = inbox.delivery_status(conn, delivery_id, supplier_id)
        if not found:
            raise ApiError(404, "delivery_not_found", f"no delivery {delivery_id!r}")
        if len(found) > 1:
            raise ApiError(
                409, "ambiguous_delivery", "several suppliers used this id: say supplier_id"
            )
        queued = inbox.requeue(conn, delivery_id, found[0]["supplier_id"])
    if not queued and found[0]["source"] == "cli":
        raise ApiError(
            409,
            "delivery_not_retriable",
            f"delivery {delivery_id!r} was a file applied by `ledger ingest`, which keeps no"
            " copy of it: ingest the file again, or upload its bytes (they are kept) and"
            " queue it again",
        )
    if not queued:
        raise ApiError(
            409,
            "delivery_not_retriable",
            f"delivery {delivery_id!r} is {found[0]['status']}: only a failed or rejected"
            " one is queued again",
        )
    if runtime.inbox_worker is not None:
        runtime.inbox_worker.wake()
    return {"delivery_id": delivery_id, "supplier_id": queued[0], "status": "queued"}


@router.get("/v1/feeds/{delivery_id:path}")
def feed_status(
    delivery_id: Annotated[str, Path(max_length=200, pattern=PRINTABLE)],
    key: FeedReaderKey,
    runtime: RuntimeDep,
    response: Response,
    supplier_id: Annotated[str | None, Query(pattern=SUPPLIER_ID_PATTERN)] = None,
) -> dict[str, Any]:
    """A delivery's status and counts."""
    if key.role == "supplier":
        supplier_id = key.supplier_id
    with runtime.store.connection() as conn:
        found = inbox.delivery_status(conn, delivery_id, supplier_id)
    if not found:
        raise ApiError(404, "delivery_not_found", f"no delivery {delivery_id!r}")
    if len(found) > 1:
        raise ApiError(409, "ambiguous_delivery", "several suppliers used this id: say supplier_id")
    row = found[0]
    counts = row["outcome"] or {}
    return {
        "delivery_id": row["delivery_id"],
        "supplier_id": row["supplier_id"],
        "source": row["source"],
        "format": row["format"],
        "name": row["name"],
        "status": row["status"],
        "rows": counts.get("rows"),
        "applied": counts.get("applied"),
        "unchanged": counts.get("unchanged"),
        "late": counts.get("late"),
        "rejected": counts.get("rejected"),
        "position": counts.get("position"),
        "seconds": counts.get("seconds"),
        "error": row["error"],
        "attempts": row["attempts"],
        # Its worker died while applying it, and another finished it (connectors.inbox).
        "taken_over": bool(counts.get("taken_over", False)),
        "received_at": row["received_at"],
        # The API key that uploaded it (null for a supplier's own transports, `source`).
        "received_by": row["received_by"],
        "finished_at": row["finished_at"],
    }
