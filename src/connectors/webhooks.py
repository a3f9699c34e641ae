"""Webhook signatures: HMAC-SHA256 over "{timestamp}.{raw body}", within a time window.

Headers, as DESIGN.md fixes them: `X-Ledger-Signature: sha256=<hex>`,
`X-Ledger-Timestamp: <unix seconds>`, `X-Ledger-Delivery: <delivery id>`.
"""

from __future__ import annotations

import hashlib
import hmac

DEFAULT_TOLERANCE_SECONDS = 300
# Signatures seen are remembered this long, against replays (the sweeper forgets older
# ones); a request is valid within its timestamp's window either side, so a window must
# end before its signature is forgotten.
SIGNATURES_KEPT_SECONDS = 3600
MAX_TOLERANCE_SECONDS = SIGNATURES_KEPT_SECONDS // 2


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
    given = canonical(signature)
    # compare_digest takes only ASCII text (a header may carry any byte)
    if not given.isascii() or not hmac.compare_digest(sign(secret, signed_at, body), given):
        return "bad_signature"
    return None


def canonical(signature: str) -> str:
    """A signature as `sign` writes it: hexadecimal is read in either case (some HMAC
    libraries write capitals), and a signature is remembered against replays in this
    form, so that the same one in other capitals is a replay too."""
    return signature.strip().lower()
