"""Reserving and reading availability, the hottest paths, answered without FastAPI's
routing and dependency solving.

FastAPI costs more per request than anything the ledger does for a one-line order. On this
machine (uvicorn, one worker, `wrk` with 64 connections), a constant JSON body was answered
at 4,800 req/s by a FastAPI coroutine, 14,900 by a Starlette route and 21,700 by a bare
ASGI app. So `POST /v1/reservations` is taken here, in front of FastAPI, when the route
would accept it: the same checks in the same order (key, role, Idempotency-Key, JSON, the
body's model, limits), then the same command, writer and answer as the route
(`reserve_command`, `reserved`). Anything the route would refuse goes on to the route
itself, untouched, so every refusal is the route's own; a refusal from the ledger (not
enough stock, an unknown SKU) is answered by the app's own exception handlers. The route
stays the contract: it is what OpenAPI describes, and what answers when the lane steps
aside.

`GET /v1/availability/{sku}` and `GET /v1/availability?sku=…` are taken the same way
(`ReadLane`) when the in-process copy of the stock view can answer them: a reader's key,
an optional `min_position` the copy has reached, and SKUs it holds, all of them. A read
the copy cannot answer (an unknown SKU, a position it has not reached, a copy refreshed
too long ago) goes to the route, which reads the view.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import Authenticator, key_for
from api.deps import OMS, READERS, OmsWrite
from api.errors import ApiError
from api.middleware import replay
from api.routers.availability import MAX_BATCH, availability_answer
from api.routers.reservations import reserve_command, reserved
from api.runtime import Runtime
from api.schemas import NOT_PRINTABLE, ReservationIn
from api.settings import ApiKey
from ledger.commands import Reserve

PATH = "/v1/reservations"
BATCH = "/v1/availability"
AVAILABILITY = BATCH + "/"
# What the read route's SKU path parameter accepts (api.routers.skus.SkuPath), one path
# segment; anything else is the route's to refuse.
_SKU = re.compile(rf"[^/{NOT_PRINTABLE}]{{1,128}}")
# A position the lane reads itself: plain digits, as the route's int reads them, and
# never past the route's bound (api.deps.MAX_POSITION has 19 digits): a longer one, which
# the route may refuse, is the route's to judge.
_DIGITS = re.compile(r"[0-9]{1,18}")

# An HTTP exception handler, as the app registers them.
Handler = Callable[[Request, Exception], Response | Awaitable[Response]]
SyncHandler = Callable[[Request, Exception], Response]


class _Lane:
    """ASGI middleware in front of `service`, handing on to `app` what it does not answer."""

    def __init__(self, app: ASGIApp, service: FastAPI) -> None:
        self.app = app
        self.service = service

    def _takes(self, scope: Scope, method: str) -> bool:
        """Whether an HTTP request with this method may be taken from the route at all:
        behind a root_path the app routes on a shorter path, and overridden dependencies
        (tests, tools) are the route's."""
        return (
            scope["type"] == "http"
            and scope["method"] == method
            and not scope.get("root_path")
            and not self.service.dependency_overrides
        )

    async def _failed(self, error: Exception, scope: Scope, receive: Receive, send: Send) -> None:
        """Answers an error raised before the answer began as the app would: with its
        handler for the error's class, looked up as FastAPI does. An unexpected error gets
        the app's catch-all answer, as Starlette's server-error middleware gives it (that
        middleware is inside the lanes, see api.app.Service), and is raised again after
        it, for the server to log."""
        handlers = self.service.exception_handlers
        handler: Handler | None = None
        for cls in type(error).__mro__:
            if cls is Exception:
                break
            handler = handlers.get(cls)
            if handler is not None:
                break
        unexpected = handler is None
        if unexpected:
            handler = handlers.get(500) or handlers.get(Exception)
            if handler is None:  # no catch-all: the server's own 500
                raise error
        request = Request(scope, receive)
        if inspect.iscoroutinefunction(handler):
            response = await handler(request, error)
        else:  # as Starlette runs a plain function: off the event loop
            response = await run_in_threadpool(cast(SyncHandler, handler), request, error)
        await response(scope, receive, send)
        if unexpected:
            raise error

    def _key(self, headers: dict[bytes, bytes], allowed: frozenset[str]) -> ApiKey | None:
        """The request's key if the route's own check admits it for these roles; None
        leaves the refusal (401 or 403) to the route."""
        authenticator: Authenticator = self.service.state.authenticator
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        try:
            return key_for(authenticator, authorization, allowed)
        except ApiError:
            return None


class ReserveLane(_Lane):
    """ASGI middleware: answers an order the reservation route would accept; passes every
    other request (and an order the route would refuse) on to the app."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._takes(scope, "POST") or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        body = await _body(receive)
        receive = replay(body, receive)
        try:
            accepted = self._accepted(scope, body)
            if accepted is not None:
                write, command = accepted
                outcome = await write.runtime.writer.execute_async(command)
                response = reserved(outcome, write.at)
        except Exception as error:
            await self._failed(error, scope, receive, send)
            return
        if accepted is None:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def _accepted(self, scope: Scope, body: bytes) -> tuple[OmsWrite, Reserve] | None:
        """The writer's command, if the route would send this request to the writer too."""
        headers = _first(scope["headers"])
        # FastAPI reads a body as JSON only when the request says it is (no Content-Type:
        # not JSON); other JSON types (`+json`) are left to it.
        media_type = headers.get(b"content-type", b"").partition(b";")[0]
        if media_type.strip().lower() != b"application/json":
            return None
        key = self._key(headers, OMS)
        if key is None:
            return None
        try:
            text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads
            order = ReservationIn.model_validate(_DECODER.decode(text))
        except Exception:
            # Not JSON, not an order, nested too deep to parse (RecursionError), or a
            # repeated key: a repeat could hide nesting the route's parser (deeper in the
            # stack) would fail on, so only the route judges one.
            return None
        runtime: Runtime = self.service.state.runtime
        state = scope.setdefault("state", {})
        state["principal"] = key.name
        write = OmsWrite(
            runtime=runtime, key=key, at=datetime.now(UTC), request_id=state["request_id"]
        )
        idempotency = headers.get(b"idempotency-key")
        try:
            command = reserve_command(
                write, order, None if idempotency is None else idempotency.decode("latin-1")
            )
        except ApiError:
            return None
        return write, command


class ReadLane(_Lane):
    """ASGI middleware: answers `GET /v1/availability/{sku}` and `GET /v1/availability?sku=…`
    from the in-process copy of the stock view when it holds every SKU asked for at the
    position asked for; passes every other request on to the app."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = None
        if self._takes(scope, "GET") and scope["path"].startswith(BATCH):
            try:
                response = self._answer(scope)
            except Exception as error:
                await self._failed(error, scope, receive, send)
                return
        if response is None:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def _answer(self, scope: Scope) -> Response | None:
        """The route's answer, if the route would answer from the copy too."""
        path: str = scope["path"]
        batch = path == BATCH
        sku = path[len(AVAILABILITY) :]
        if not batch and not (path.startswith(AVAILABILITY) and _SKU.fullmatch(sku)):
            return None
        query = _read_query(scope["query_string"], batch)
        if query is None:
            return None
        skus, wanted = query
        if batch and not 1 <= len(skus) <= MAX_BATCH:
            return None
        names = list(dict.fromkeys(skus)) if batch else [sku]
        headers = _first(scope["headers"])
        if b"x-min-position" in headers:
            return None
        key = self._key(headers, READERS)
        if key is None:
            return None
        runtime: Runtime = self.service.state.runtime
        cache = runtime.views.cache
        at = datetime.now(UTC)
        # A miss goes to the route, whose own lookup counts it.
        cached = None if cache is None else cache.lookup(names, wanted, count_miss=False)
        if cached is None:
            return None
        scope.setdefault("state", {})["principal"] = key.name
        found = [entry.levels(at) for entry in cached.entries]
        limited_at = runtime.settings.limited_stock_at
        return availability_answer(found, limited_at, cached.position, batch=batch)


def _read_query(query: bytes, batch: bool) -> tuple[list[str], int | None] | None:
    """The `sku` values (of a list read) and the `min_position`, read as the route reads
    them (Starlette's parser); None when the route must judge the query: a parameter the
    lane does not read, a repeated position, or one that is not plain digits."""
    if not query:
        return [], None
    params = QueryParams(query)
    skus = params.getlist("sku") if batch else []
    positions = params.getlist("min_position")
    if (
        len(positions) > 1
        or len(skus) + len(positions) != len(params.multi_items())
        or (positions and not _DIGITS.fullmatch(positions[0]))
    ):
        return None
    return skus, int(positions[0]) if positions else None


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object without repeated keys (a ValueError for one with)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key is repeated")
    return found


# One decoder for every order: `json.loads` with a hook builds a new one for each call.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique)


def _first(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Each header's first value, as Starlette's `Headers.get` reads it."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        found.setdefault(name, value)
    return found
