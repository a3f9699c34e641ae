"""The OpenAPI document as the API answers: every refusal in its one envelope (api.errors),
under the statuses each operation can give, and the raw bodies the feed routes read."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ERROR_REF = "#/components/schemas/ErrorOut"


class ErrorOut(BaseModel):
    """Every refusal's body, whatever its status."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": "unauthorized", "detail": "unknown API key"},
                {
                    "error": "validation_error",
                    "detail": [
                        {"loc": ["body", "quantity"], "msg": "Input should be > 0", "type": "gt"}
                    ],
                },
                {
                    "error": "unknown_sku",
                    "detail": {"message": "unknown SKU(s): NOPE", "skus": ["NOPE"]},
                },
            ]
        }
    )

    error: str = Field(
        description="A stable code to act on: `unauthorized`, `unknown_sku`, "
        "`insufficient_stock`, `validation_error`, `rate_limited`..."
    )
    detail: Any = Field(
        description="What went wrong, for people and logs: a string, an object (a ledger "
        "refusal's `message` and its particulars), or, for invalid fields, a list of "
        "`{loc, msg, type}`; null when there is nothing to add."
    )


REASONS: dict[int, str] = {
    400: "The body is not JSON in a JSON encoding (`malformed_json`), or a header is "
    "missing or malformed, or sent twice (`missing_idempotency_key`, "
    "`invalid_idempotency_key`, `invalid_authorization`, `repeated_header`: any operation).",
    401: "No API key or an unknown one (`unauthorized`); on a webhook, a signature that "
    "does not hold (`missing_signature`, `bad_signature`, `expired_signature`...).",
    403: "The key's role may not do this, or a supplier's key names another supplier "
    "(`forbidden`).",
    404: "It does not exist: `unknown_sku`, `unknown_supplier`, `reservation_not_found`, "
    "`delivery_not_found`...",
    409: "It contradicts what the ledger holds: `insufficient_stock`, "
    "`idempotency_key_mismatch`, `invalid_state`, `delivery_id_conflict`...",
    408: "The webhook's body did not arrive within `LEDGER_WEBHOOK_BODY_SECONDS` "
    "(`body_timeout`); nothing of it was applied: send it again.",
    413: "The body is over its limit (`payload_too_large`); nothing of it was applied.",
    422: "Invalid fields (`validation_error`, `detail` a list of `{loc, msg, type}`), or a "
    "check of the route's own (`detail` a string or an object): `unknown_sku` in a body, "
    "`ttl_too_long`, `supplier_not_on_line`, `repeated_parameter`, `empty_feed`, "
    "`unknown_format`...",
    429: "The key is over its rate (`rate_limited`); nothing of the request was applied.",
    500: "A failure of the service's own (`internal_error`; `detail.request_id`, also in "
    "the `X-Request-ID` header, finds it in the logs). A write may have been applied: send "
    "it again as it was (an order with the same `Idempotency-Key`, a stock report with "
    "its `delivery_id`), and it is answered as the first time if it was.",
    503: "The ledger cannot answer now (`unavailable`, `timeout`: nothing applied; "
    "`outcome_unknown`: taken, and may yet be applied; `position_not_reached`, "
    "`contention`; for a feed file `uploads_busy`, for a webhook `webhooks_busy`): try "
    "again after `Retry-After`.",
}
_RETRY_AFTER = {"description": "Seconds to wait", "schema": {"type": "integer"}}
HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "`Bearer`, when the API key is missing or unknown",
            "schema": {"type": "string"},
        }
    },
    429: {"Retry-After": _RETRY_AFTER},
    503: {"Retry-After": _RETRY_AFTER},
}

WEBHOOK = ("post", "/v1/suppliers/{supplier_id}/webhook")
BEARER = "apiKey"
# Every `/v1` operation but the webhook (signed, not keyed) takes an API key.
KEYED = frozenset({401, 403, 429})
# What operations refuse beyond what their shape tells (a key, a body, parameters).
REFUSALS: dict[tuple[str, str], frozenset[int]] = {
    ("get", "/v1/availability/{sku}"): frozenset({404}),
    ("post", "/v1/reservations"): frozenset({409}),
    ("get", "/v1/reservations/{reservation_id}"): frozenset({404}),
    ("get", "/v1/reservations/{reservation_id}/history"): frozenset({404}),
    ("post", "/v1/reservations/{reservation_id}/confirm"): frozenset({404, 409}),
    ("post", "/v1/reservations/{reservation_id}/extend"): frozenset({404, 409}),
    ("post", "/v1/reservations/{reservation_id}/release"): frozenset({404, 409}),
    ("post", "/v1/reservations/{reservation_id}/fulfil"): frozenset({404, 409}),
    ("post", "/v1/reservations/{reservation_id}/cancel"): frozenset({404, 409}),
    ("post", "/v1/reservations/{reservation_id}/return"): frozenset({404, 409}),
    ("get", "/v1/suppliers/{supplier_id}"): frozenset({404}),
    ("put", "/v1/suppliers/{supplier_id}/mappings"): frozenset({404, 409}),
    ("get", "/v1/suppliers/{supplier_id}/mappings"): frozenset({404}),
    ("post", "/v1/suppliers/{supplier_id}/stock"): frozenset({404, 409}),
    ("post", "/v1/conflicts/{conflict_id}/acknowledge"): frozenset({404}),
    ("get", "/v1/skus/{sku}/history"): frozenset({404}),
    ("get", "/v1/skus/{sku}/stock"): frozenset({404}),
    ("post", "/v1/suppliers/{supplier_id}/feeds"): frozenset({404, 409}),
    WEBHOOK: frozenset({401, 408, 409}),
    ("post", "/v1/feeds/{delivery_id}/retry"): frozenset({404, 409}),
    ("get", "/v1/feeds/{delivery_id}"): frozenset({404, 409}),
    ("post", "/v1/dead-letters/{letter_id}/retry"): frozenset({404, 409}),
    ("post", "/v1/dead-letters/{letter_id}/dismiss"): frozenset({404, 409}),
    ("post", "/v1/dead-letters/retry"): frozenset({409}),
    ("post", "/v1/dead-letters/dismiss"): frozenset({409}),
}

# Parameters an operation declares optional, to refuse their absence with a code of its
# own, that a client must send all the same: an order without its Idempotency-Key is
# `400 missing_idempotency_key` (a client generated from the document sent none: an OMS
# engineer's walkthrough).
REQUIRED: dict[tuple[str, str], frozenset[tuple[str, str]]] = {
    ("post", "/v1/reservations"): frozenset({("header", "Idempotency-Key")}),
}

FEED_MEDIA_TYPES = (
    "application/octet-stream",
    "text/csv",
    "application/json",
    "application/xml",
    "application/edi-x12",
)


def raw_body(description: str) -> dict[str, Any]:
    """`openapi_extra` of a route that reads its body as it is: a file in a feed format,
    whatever its Content-Type says (the format is chosen otherwise)."""
    file = {"type": "string", "format": "binary"}
    content = {
        media: {"schema": {} if media == "application/json" else file} for media in FEED_MEDIA_TYPES
    }
    return {"requestBody": {"required": True, "description": description, "content": content}}


def truthful(document: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document, its errors corrected: each operation lists the statuses it can
    refuse with, each as `ErrorOut` (FastAPI's own 422 model is never what it answers)."""
    unknown = set(REFUSALS) - {
        (method, path) for path, item in document["paths"].items() for method in item
    }
    if unknown:
        raise LookupError(f"api.openapi.REFUSALS names no operation: {sorted(unknown)}")
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", ()):
                if (parameter["in"], parameter["name"]) in REQUIRED.get((method, path), ()):
                    parameter["required"] = True
            responses = operation.setdefault("responses", {})
            for status in sorted(_refusals(method, path, operation)):
                responses[str(status)] = _error(status)
            if _keyed(method, path):
                # So that generated clients send the key (`Authorization: Bearer <secret>`).
                operation["security"] = [{BEARER: []}]
    if path_item := document["paths"].get("/readyz"):
        ready = path_item["get"]["responses"]["200"]
        path_item["get"]["responses"]["503"] = {
            "description": "Not ready: the same body, `status` `not_ready`, `checks` saying why.",
            "content": ready.get("content", {}),
        }
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key's secret (`LEDGER_API_KEYS`); its role decides what it may do.",
    }
    schemas = components.setdefault("schemas", {})
    schemas["ErrorOut"] = ErrorOut.model_json_schema()
    _drop_unreferenced(document, ("HTTPValidationError", "ValidationError"))
    return document


def _keyed(method: str, path: str) -> bool:
    """Whether the operation takes an API key: every `/v1` one but the (signed) webhook."""
    return path.startswith("/v1/") and (method, path) != WEBHOOK


def _refusals(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    statuses = set(REFUSALS.get((method, path), ()))
    statuses.add(500)  # any operation, should the service fail
    # Any operation, sent a header twice that is read once (api.middleware.ONCE): the
    # read routes answered 400 and declared none (a storefront walkthrough).
    statuses.add(400)
    if path.startswith("/v1/"):
        statuses.add(503)
    if _keyed(method, path):
        statuses |= KEYED
    body = operation.get("requestBody")
    if body is not None:
        statuses.add(413)
        # A body FastAPI reads as a model is JSON only; the raw bodies are files of any type.
        if set(body["content"]) == {"application/json"}:
            statuses.add(400)
    if "422" in operation["responses"]:  # FastAPI's: the operation has parameters or a body
        statuses.add(422)
    return statuses


def _error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": REASONS[status],
        "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
    }
    if status in HEADERS:
        response["headers"] = HEADERS[status]
    return response


def _drop_unreferenced(document: dict[str, Any], names: Iterable[str]) -> None:
    schemas = document["components"]["schemas"]
    for name in names:
        schema = schemas.pop(name, None)
        if schema is not None and f'"#/components/schemas/{name}"' in json.dumps(document):
            schemas[name] = schema
