"""Signed webhook deliveries, the way a supplier pushes stock changes to the ledger.

The signature rule (DESIGN.md, HTTP API): `X-Ledger-Signature: sha256=<hex HMAC-SHA256
of "{X-Ledger-Timestamp}.{raw body}">` keyed with the supplier's secret,
`X-Ledger-Timestamp` in Unix seconds and `X-Ledger-Delivery` the delivery id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable

import httpx
import structlog

from connectors.simulator.catalogue import Item

log = structlog.get_logger(__name__)

TIMEOUT_SECONDS = 10.0


def webhook_body(items: Iterable[Item], delivery_id: str) -> bytes:
    """`{"delivery_id", "observations": [{"supplier_sku", "quantity", "unit", "observed_at"}]}`."""
    observations = [
        {
            "supplier_sku": item.supplier_sku,
            "quantity": item.quantity,
            "unit": item.unit,
            "observed_at": item.observed_at.isoformat(),
        }
        for item in items
    ]
    return json.dumps({"delivery_id": delivery_id, "observations": observations}).encode()


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The `X-Ledger-Signature` value of `body` sent at `timestamp`: `sha256=<hex>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def send_webhook(
    url: str,
    supplier_id: str,
    secret: str | bytes,
    body: bytes,
    delivery_id: str,
    timestamp: int | None = None,
    client: httpx.Client | None = None,
) -> httpx.Response:
    """POST `body` to `url` (e.g. the ledger's `/v1/suppliers/{supplier_id}/webhook`), signed
    with `secret` at `timestamp` (default: now); a client of the caller's is reused."""
    moment = int(time.time()) if timestamp is None else timestamp
    headers = {
        "Content-Type": "application/json",
        "X-Ledger-Signature": sign(secret, moment, body),
        "X-Ledger-Timestamp": str(moment),
        "X-Ledger-Delivery": delivery_id,
    }
    if client is None:
        with httpx.Client(timeout=TIMEOUT_SECONDS) as own:
            response = own.post(url, content=body, headers=headers)
    else:
        response = client.post(url, content=body, headers=headers)
    log.info(
        "simulator.webhook.sent",
        supplier=supplier_id,
        delivery=delivery_id,
        status=response.status_code,
        bytes=len(body),
    )
    return response
