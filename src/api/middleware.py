"""Per-request context: a correlation id, an access log line, and a bound on body size."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import Authenticator, bearer_key
from api.errors import ApiError, error_body
from api.ratelimit import RateLimiter
from api.settings import ApiKey

log = structlog.get_logger("api.http")
_access = logging.getLogger("api.http")

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


# A request without an id of its own gets this process's random prefix and a count: as
# unique as a random UUID, without reading the system's randomness on every request.
_PROCESS_PREFIX = uuid.uuid4().hex[:16]
_COUNT = itertools.count(1)


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            candidate = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(candidate):
                return candidate
    return f"{_PROCESS_PREFIX}{next(_COUNT):016x}"


# Logged as the status of a request whose client went away before its body ended (the
# status nginx logs for a client that closed the request).
CLIENT_GONE = 499


# How long a body refused as `uploads_busy` or `webhooks_busy` is asked to wait before it
# is sent again.
BUSY_RETRY_SECONDS = 5


# Headers a request may send once, with the refusal of several. Which one counts? The
# first Idempotency-Key was kept, and the other, sent again, placed the order a second
# time (an API fuzzing walkthrough); the first key was used, silently, where a proxy in
# front may have read the other (an OMS walkthrough).
# So are the ledger's own headers (`repeated_header`): a second `X-Ledger-Delivery` was
# dropped, the upload kept under the first id; a second `X-Min-Position` was not read; of
# two webhook signatures, the first decided (an operator walkthrough).
ONCE = {
    b"authorization": ("invalid_authorization", "Authorization"),
    b"idempotency-key": ("invalid_idempotency_key", "Idempotency-Key"),
    b"x-ledger-delivery": ("repeated_header", "X-Ledger-Delivery"),
    b"x-min-position": ("repeated_header", "X-Min-Position"),
    b"x-ledger-signature": ("repeated_header", "X-Ledger-Signature"),
    b"x-ledger-timestamp": ("repeated_header", "X-Ledger-Timestamp"),
    # Of two, the stream resumed from the first (a storefront walkthrough).
    b"last-event-id": ("repeated_header", "Last-Event-ID"),
}


def _repeated(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The first header of ONCE (in its order) that a request sends more than once."""
    sent = Counter(name for name, _ in headers if name in ONCE)
    return next((name for name in ONCE if sent[name] > 1), None)


# The query parameters the routes read, each read once, except where a route reads it as a
# list (by path). Given twice (`status=held&status=expired`), a route read the last,
# silently, and an OMS took the answer for both (a walkthrough). A parameter no route
# reads is ignored, once or twice (a scraper's or a probe's). tests/unit/
# test_query_parameters.py checks both against the routes.
READ_ONCE = frozenset(
    {"after", "after_version", "at", "delivery_id", "format", "kind", "limit", "min_position"}
    | {"name", "order_id", "position", "reason", "sku", "state", "status", "supplier_id"}
)
LIST_PARAMETERS = frozenset({("/v1/availability", "sku"), ("/v1/stream/availability", "sku")})


def _repeated_parameter(path: str, query: bytes) -> str | None:
    """The first query parameter a route reads once that a request gives more than once
    (read as Starlette reads the query)."""
    if b"&" not in query:
        return None
    path = path.rstrip("/")
    given = Counter(name for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True))
    return next(
        (
            name
            for name, count in given.items()
            if count > 1 and name in READ_ONCE and (path, name) not in LIST_PARAMETERS
        ),
        None,
    )


class Busy(Exception):
    """A body would take the bodies of its kind held at once past their bound."""

    def __init__(self, held: InFlight) -> None:
        super().__init__(held.code)
        self.held = held


@dataclass
class InFlight:
    """The bytes of one kind of body (feed files, webhooks) a process holds at once, and
    their bound: past it, a body is refused `code` while another of its kind is held (one
    alone never is)."""

    bound: int
    code: str
    what: str  # the kind, as the refusal names it
    held: int = 0


class ClientGone(Exception):
    """The client disconnected before it sent the whole body."""


class RequestContextMiddleware:
    """Binds the request id to every log line, logs the request, refuses oversized bodies.

    The body is read here, up to the limit, and handed on whole: a body over the limit
    is answered 413 before any handler runs, whether or not it declared its length.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        max_feed_bytes: int,
        max_webhook_bytes: int,
        authenticator: Authenticator,
        limiter: RateLimiter | None = None,
        limited_roles: frozenset[str] = frozenset(),
        max_upload_bytes_in_flight: int | None = None,
        max_webhook_bytes_in_flight: int | None = None,
        webhook_body_seconds: float | None = None,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.limited_roles = limited_roles
        self.max_body_bytes = max_body_bytes
        self.max_feed_bytes = max_feed_bytes
        self.max_webhook_bytes = max_webhook_bytes
        self.authenticator = authenticator
        # The bytes of feed files this process holds at once, at most (None: no bound).
        # Each is held whole until its request is answered, and costs several times its
        # size on the way (a 100 MiB upload took the process from 118 to 823 MB): uploads
        # at once from one supplier's key ran the host out of memory (a security review).
        # Past it, an upload is refused 503 `uploads_busy`, to be sent again; ordinary
        # bodies (1 MiB at most) are not counted.
        self.uploads = (
            None
            if max_upload_bytes_in_flight is None
            else InFlight(max_upload_bytes_in_flight, "uploads_busy", "uploads")
        )
        # Webhook bodies (16 MiB each at most) on a bound of their own: they are read
        # before anything is known of their sender, so anyone may send them, and counted
        # with the uploads they let anyone lock every supplier's uploads out (a review);
        # uncounted, bodies sent at once to webhook paths were held without a bound. Past
        # it, a webhook is refused 503 `webhooks_busy`, which its sender retries.
        self.webhooks = (
            None
            if max_webhook_bytes_in_flight is None
            else InFlight(max_webhook_bytes_in_flight, "webhooks_busy", "webhook bodies")
        )
        # And each must arrive within this (None: no deadline): a few slow bodies would
        # otherwise hold that bound, and every supplier's webhooks wait, for as long as
        # their sender liked. Uploads have none: their keys are known, and a large file on
        # a slow line takes long.
        self.webhook_body_seconds = webhook_body_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        # Each request runs in a task of its own, in a copy of the server's context: the
        # id is bound in it for the request, and the binding undone after.
        bound = structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, request_id.encode()),
                ]
            await send(message)

        try:
            repeated = _repeated(scope["headers"])
            if repeated is not None:
                code, header = ONCE[repeated]
                await self._refuse(
                    send_with_id, 400, code, f"send one {header} header, not several"
                )
                return
            # The request's key, looked up once: the rate limit and the body's limit ask.
            try:
                key, unknown = bearer_key(self.authenticator, _authorization(scope)), None
            except ApiError as refused:
                key, unknown = None, refused
            wait = self._wait(key)
            if wait:
                await self._refuse(
                    send_with_id,
                    429,
                    "rate_limited",
                    f"too many requests with this key: try again in {wait} s",
                    [(b"retry-after", str(wait).encode())],
                )
                return
            limit = self._limit(scope, key)
            if limit is None:
                assert unknown is not None  # no limit only for a request with no known key
                await self._refuse(
                    send_with_id,
                    unknown.status,
                    unknown.code,
                    unknown.detail,
                    [(k.lower().encode(), v.encode()) for k, v in (unknown.headers or {}).items()],
                )
                return
            parameter = _repeated_parameter(scope["path"], scope.get("query_string", b""))
            if parameter is not None:
                await self._refuse(
                    send_with_id,
                    422,
                    "repeated_parameter",
                    f"give the query parameter {parameter!r} once: it takes one value",
                )
                return
            counted = self._counted(scope, limit)
            held = [0]  # the bytes of this request's body counted in flight
            try:
                deadline = self.webhook_body_seconds if self._webhook(scope["path"]) else None
                try:
                    async with asyncio.timeout(deadline):
                        body = await self._read_body(receive, limit, counted, held)
                except TimeoutError:
                    await self._refuse(
                        send_with_id,
                        408,
                        "body_timeout",
                        f"the request's body did not arrive within {deadline:g} s",
                    )
                    return
                except ClientGone:
                    # Nothing is done for a request whose body never arrived whole: the
                    # client is not there to hear of it, and would retry it.
                    status["code"] = CLIENT_GONE
                    return
                except Busy as busy:
                    await self._refuse(
                        send_with_id,
                        503,
                        busy.held.code,
                        f"this server holds as many {busy.held.what} as it may at once:"
                        f" send it again in {BUSY_RETRY_SECONDS} s",
                        [(b"retry-after", str(BUSY_RETRY_SECONDS).encode())],
                    )
                    return
                if body is None:
                    await self._too_large(send_with_id, limit)
                else:
                    await self.app(scope, replay(body, receive), send_with_id)
            finally:
                if counted is not None:
                    counted.held -= held[0]
        finally:
            # Asked of the standard logger first: structlog would build the line, then drop it.
            if _access.isEnabledFor(logging.INFO):
                log.info(
                    "http.request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status["code"],
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )
            structlog.contextvars.reset_contextvars(**bound)

    def _wait(self, key: ApiKey | None) -> int:
        """Seconds the request's key must wait before it may make another (0: it may now,
        and is counted). Requests without a known key of a limited role are not counted
        (they are refused, or let through, further in)."""
        if self.limiter is None or key is None or key.role not in self.limited_roles:
            return 0
        return math.ceil(self.limiter.take(key.name))

    def _limit(self, scope: Scope, key: ApiKey | None) -> int | None:
        """How much body this request may send; None: refused before reading any of it.

        A feed file may be large, so only a known key may send one; a webhook is signed
        (checked once read), so it gets a limit of its own, far smaller.
        """
        path = scope["path"]
        if not path.startswith("/v1/"):
            return self.max_body_bytes  # the probes, the metrics and the documents
        if self._webhook(path):
            return self.max_webhook_bytes
        # Every other `/v1` route takes a key: a request with none is refused before any of
        # its body is read (a hundred such bodies of 1 MiB each were held at once, the
        # process growing by 110 MB: a security review).
        if key is None:
            return None
        if not path.startswith("/v1/suppliers/") or not path.endswith("/feeds"):
            return self.max_body_bytes
        # Only a key that may upload to this supplier sends a file's worth: an admin, or
        # the supplier's own. Any other key's body is read up to the usual limit before
        # the route refuses it (a storefront's key, semi-public, was read 60 MB first).
        parts = path.split("/")  # "", "v1", "suppliers", its id, "feeds"
        may_upload = len(parts) == 5 and (
            key.role == "admin" or (key.role == "supplier" and key.supplier_id == parts[3])
        )
        return self.max_feed_bytes if may_upload else self.max_body_bytes

    def _counted(self, scope: Scope, limit: int) -> InFlight | None:
        """The bound a request's body counts in: a feed file's (sent with a key that may
        upload it, `_limit`) or a webhook's; None for other bodies, or with no bound."""
        path = scope["path"]
        if path.endswith("/feeds") and limit == self.max_feed_bytes > self.max_body_bytes:
            return self.uploads
        if self._webhook(path):
            return self.webhooks
        return None

    @staticmethod
    def _webhook(path: str) -> bool:
        return path.startswith("/v1/suppliers/") and path.endswith("/webhook")

    async def _read_body(
        self, receive: Receive, limit: int, counted: InFlight | None, held: list[int]
    ) -> bytes | None:
        """The body, or None past `limit`. Where it is `counted`, its bytes are counted in
        flight as they arrive (and in `held`), and Busy raised where they would pass the
        bound while another body of its kind is held: one alone is never refused,
        whatever its size within its limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            if counted is not None and chunk:
                others = counted.held - held[0]
                if others and counted.held + len(chunk) > counted.bound:
                    raise Busy(counted)
                counted.held += len(chunk)
                held[0] += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _too_large(self, send: Send, limit: int) -> None:
        await self._refuse(
            send, 413, "payload_too_large", f"the request body is over {limit} bytes"
        )

    async def _refuse(
        self,
        send: Send,
        status: int,
        code: str,
        detail: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        # Refused before its body was read: the connection is closed after the answer.
        body = error_body(code, detail)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    *(headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for a body already read: the body, then whatever `receive` gives next."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return dict(await receive())

    return replay


def _authorization(scope: Scope) -> str:
    """The request's `Authorization` header ("" without one), as Starlette reads it."""
    name: bytes
    value: bytes
    for name, value in scope["headers"]:
        if name == b"authorization":
            return value.decode("latin-1")
    return ""
