"""The feed bytes a server holds at once are bounded, and the webhook bytes on a bound of
their own: nobody without a key counts in the uploads'."""

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
        max_webhook_bytes_in_flight=1000,
    )


def post(path: str, token: bytes | None = None) -> dict[str, Any]:
    headers = [(b"authorization", b"Bearer " + token)] if token else []
    return {"type": "http", "method": "POST", "path": path, "headers": headers}


async def stalled_then(
    first: dict[str, Any], body: int, then: dict[str, Any] | None = None
) -> tuple[list[int], int]:
    """A request that sends `body` bytes and stalls; meanwhile `then` (the supplier's own
    upload) with 500 bytes: the statuses that got, and the bytes counted (uploads and
    webhooks) once both ended."""
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

    await middleware(then or post("/v1/suppliers/acme/feeds", b"s3cret"), whole, answered)
    stall.set()
    await held
    assert middleware.uploads is not None
    assert middleware.webhooks is not None
    return statuses, middleware.uploads.held + middleware.webhooks.held


def test_feed_uploads_past_the_bound_while_another_is_held_are_refused() -> None:
    statuses, left = asyncio.run(stalled_then(post("/v1/suppliers/acme/feeds", b"adm"), 599))
    assert statuses == [503]
    assert left == 0  # every byte counted was let go


def test_a_webhook_without_a_key_does_not_count_against_the_suppliers_uploads() -> None:
    # Counted, bodies sent slowly to any webhook path, by anyone, filled the bound and
    # every supplier's upload was refused (a review).
    statuses, left = asyncio.run(stalled_then(post("/v1/suppliers/nobody/webhook"), 599))
    assert statuses == [202]
    assert left == 0


def test_webhook_bodies_past_their_own_bound_while_another_is_held_are_refused() -> None:
    # Uncounted, bodies sent at once to webhook paths were held without a bound.
    hook = post("/v1/suppliers/acme/webhook")
    statuses, left = asyncio.run(stalled_then(post("/v1/suppliers/other/webhook"), 599, hook))
    assert statuses == [503]
    assert left == 0
    statuses, left = asyncio.run(stalled_then(post("/v1/suppliers/other/webhook"), 400, hook))
    assert statuses == [202]  # within the bound beside it
    assert left == 0


def test_an_upload_held_does_not_count_against_the_webhooks() -> None:
    hook = post("/v1/suppliers/acme/webhook")
    statuses, left = asyncio.run(stalled_then(post("/v1/suppliers/acme/feeds", b"adm"), 599, hook))
    assert statuses == [202]
    assert left == 0


def test_a_webhook_alone_is_never_refused_for_the_bound() -> None:
    middleware = bounded()
    assert middleware.webhooks is not None
    middleware.webhooks.bound = 100  # below the webhook's own limit (600)
    statuses: list[int] = []

    async def whole() -> dict[str, Any]:
        return {"type": "http.request", "body": b"y" * 500, "more_body": False}

    async def answered(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    asyncio.run(middleware(post("/v1/suppliers/acme/webhook"), whole, answered))
    assert statuses == [202]
    assert middleware.webhooks.held == 0


async def stalled_for(path: str, token: bytes | None, seconds: float) -> list[int]:
    """A request whose body comes in two parts, `seconds` apart, on a server that gives a
    webhook's body 0.2 s: the statuses it was answered."""
    middleware = bounded()
    middleware.webhook_body_seconds = 0.2
    parts = [b"x" * 100, b"y" * 100]
    statuses: list[int] = []

    async def slowly() -> dict[str, Any]:
        if len(parts) == 1:
            await asyncio.sleep(seconds)
        body = parts.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(parts)}

    async def answered(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await middleware(post(path, token), slowly, answered)
    assert middleware.webhooks is not None
    assert middleware.uploads is not None
    assert middleware.webhooks.held == middleware.uploads.held == 0
    return statuses


def test_a_webhook_body_that_does_not_arrive_in_time_is_refused() -> None:
    # Slow bodies held the webhooks' bound, and every supplier's webhooks waited, for as
    # long as their sender liked.
    assert asyncio.run(stalled_for("/v1/suppliers/acme/webhook", None, 0.5)) == [408]
    assert asyncio.run(stalled_for("/v1/suppliers/acme/webhook", None, 0.01)) == [202]


def test_an_upload_has_no_deadline_for_its_body() -> None:
    # A large file on a slow line takes long; its key is known.
    assert asyncio.run(stalled_for("/v1/suppliers/acme/feeds", b"s3cret", 0.5)) == [202]
