"""Webhook signatures: HMAC-SHA256 over "{timestamp}.{raw body}", within a time window.

Headers, as DESIGN.md fixes them: `X-Ledger-Signature: sha256=<hex>`,
`X-Ledger-Timestamp: <unix seconds>`, `X-Ledger-Delivery: <delivery id>`.
"""

from __future__ import annotations

import hashlib
import hmac

DEFAULT_TOLERANCE_SECONDS = 300


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def refusal(
    secret: str,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
) -> str | None:
    """Why the request must be refused, or None when the signature holds."""
    if not timestamp or not signature:
        return "missing_signature"
    if len(timestamp) > 12:
        return "bad_timestamp"
    try:
        signed_at = int(timestamp)
    except ValueError:
        return "bad_timestamp"
    if abs(now - signed_at) > tolerance:
        return "expired_signature"
    if not hmac.compare_digest(sign(secret, signed_at, body), signature.strip()):
        return "bad_signature"
    return None
