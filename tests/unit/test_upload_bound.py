"""The feed bytes a server holds at once are bounded; nobody without a key counts in it."""

from __future__ import annotations

import asyncio
from typing import Any

from api.auth import Authenticator
from api.middleware import RequestContextMiddleware
from api.settings import ApiKey


async def accept(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def bounded() -> RequestContextMiddleware:
    keys = [ApiKey.parse("acme-feed:supplier:s3cret:acme"), ApiKey.parse("ops:admin:adm")]
    return RequestContextMiddleware(
        accept,
        max_body_bytes=10,
        max_feed_bytes=1000,
        max_webhook_bytes=600,
        authenticator=Authenticator(keys),
        max_upload_bytes_in_flight=1000,
    )


def post(path: str, token: bytes | None = None) -> dict[str, Any]:
    headers = [(b"authorization", b"Bearer " + token)] if token else []
    return {"type": "http", "method": "POST", "path": path, "headers": headers}


async def stalled_then_upload(first: dict[str, Any], body: int) -> tuple[list[int], int]:
    """A request that sends `body` bytes and stalls; meanwhile the supplier's own upload
    of 500 bytes: the statuses that upload got, and the bytes counted once both ended."""
    middleware, stall = bounded(), asyncio.Event()
    sent = [False]

    async def slowly() -> dict[str, Any]:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": b"x" * body, "more_body": True}
        await stall.wait()
        return {"type": "http.disconnect"}

    async def ignored(message: Any) -> None:
        pass

    held = asyncio.create_task(middleware(first, slowly, ignored))
    await asyncio.sleep(0.05)
    statuses: list[int] = []

    async def whole() -> dict[str, Any]:
        return {"type": "http.request", "body": b"y" * 500, "more_body": False}

    async def answered(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await middleware(post("/v1/suppliers/acme/feeds", b"s3cret"), whole, answered)
    stall.set()
    await held
    return statuses, middleware._uploads_in_flight


def test_feed_uploads_past_the_bound_while_another_is_held_are_refused() -> None:
    statuses, left = asyncio.run(stalled_then_upload(post("/v1/suppliers/acme/feeds", b"adm"), 599))
    assert statuses == [503]
    assert left == 0  # every byte counted was let go


def test_a_webhook_without_a_key_does_not_count_against_the_suppliers_uploads() -> None:
    # Counted, bodies sent slowly to any webhook path, by anyone, filled the bound and
    # every supplier's upload was refused (a review).
    statuses, left = asyncio.run(stalled_then_upload(post("/v1/suppliers/nobody/webhook"), 599))
    assert statuses == [202]
    assert left == 0
