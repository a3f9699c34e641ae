"""One error envelope for every refusal: `{"error": code, "detail": ...}` with the right status."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

import structlog
from eventsourcing.persistence import OperationalError as StoreUnavailable
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg import OperationalError as DatabaseUnavailable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.recorder import connection_lost, lock_timed_out
from ledger.errors import (
    Conflict,
    ContentionTooHigh,
    InvalidTerms,
    LedgerError,
    NotFound,
    NotYetRecorded,
    SupplierNotOnLine,
    UnknownSku,
    Unstorable,
)
from ledger.writer import OutcomeUnknown, WriterStopped
from projections.queries import PositionNotReached

log = structlog.get_logger(__name__)


class ApiError(Exception):
    """A refusal decided in the HTTP layer (auth, headers, limits)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


def error_body(code: str, detail: Any = None) -> bytes:
    # Written as every other error body is (Starlette's JSONResponse: compact, UTF-8).
    body = {"error": code, "detail": detail}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def error_response(
    status: int, code: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def status_of(error: LedgerError) -> int:
    if isinstance(
        error, UnknownSku | Unstorable | NotYetRecorded | InvalidTerms | SupplierNotOnLine
    ):
        # A SKU named in a request body that the ledger does not know; a value in it that
        # the event store cannot keep; terms that break a rule once merged with the saved;
        # a supplier a line was never allocated to.
        return 422
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, Conflict):
        return 409
    if isinstance(error, ContentionTooHigh):
        return 503
    return 400


def _validation_errors(error: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(item.get("loc", ())), "msg": item.get("msg"), "type": item.get("type")}
        for item in error.errors()
    ]


UNREAD_BODY = {
    "loc": ["header", "content-type"],
    "msg": "send Content-Type: application/json",
    "type": "unsupported_media_type",
}


def invalid(loc: list[str | int], msg: str, type: str) -> ApiError:
    """A 422 `validation_error` of the route's own, shaped as FastAPI's are: a list of
    `{loc, msg, type}` (two routes gave a string, which a client reading the list broke on:
    a walkthrough)."""
    return ApiError(422, "validation_error", [{"loc": loc, "msg": msg, "type": type}])


def _malformed_json(detail: str = "the request body is not valid JSON") -> JSONResponse:
    return error_response(400, "malformed_json", detail)


async def on_api_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(error.status, error.code, error.detail, error.headers)


async def on_ledger_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, LedgerError)
    status = status_of(error)
    detail = {"message": error.message, **error.detail}
    headers = {"Retry-After": "1"} if status == 503 else None
    return error_response(status, error.code, detail, headers)


def _refused_first(request: Request) -> JSONResponse | None:
    """The route's 401 or 403, where the request's key would be refused (see
    `api.auth.refusal_before`)."""
    from api.auth import refusal_before  # api.auth raises this module's ApiError

    refused = refusal_before(request)
    if refused is None:
        return None
    return error_response(refused.status, refused.code, refused.detail, refused.headers)


async def on_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    refused = _refused_first(request)
    if refused is not None:
        return refused
    errors = _validation_errors(error)
    if isinstance(error.body, bytes):
        # FastAPI reads a body as JSON only when its Content-Type says so (none is not
        # JSON: a browser sends a form without preflight); else it hands the model the
        # bytes, and the client read "a valid dictionary" with no word of the header.
        # Still a 422 validation_error, as it was, with the header named.
        errors = [item for item in errors if item["loc"][:1] != ["body"]]
        errors.append(UNREAD_BODY)
    if any(item["type"] == "json_invalid" for item in errors):
        return _malformed_json()
    return error_response(422, "validation_error", errors)


async def on_http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    if isinstance(error.__cause__, UnicodeDecodeError | RecursionError | ValueError):
        # A body FastAPI could not read, before the route's key check ran.
        refused = _refused_first(request)
        if refused is not None:
            return refused
    if isinstance(error.__cause__, UnicodeDecodeError):
        # FastAPI's own 400 for a JSON body that is not text in a JSON encoding: as
        # malformed as one that does not parse, and said so.
        return _malformed_json("the request body is not text in a JSON encoding (UTF-8, -16, -32)")
    if isinstance(error.__cause__, RecursionError):
        # FastAPI's own 400 for JSON nested deeper than Python's parser goes.
        return _malformed_json("the request body is JSON nested too deeply to read")
    if isinstance(error.__cause__, ValueError):
        # ... and for a number of more digits than Python converts (4,300).
        return _malformed_json(f"the request body's JSON cannot be read: {error.__cause__}")
    code = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    headers = dict(error.headers) if error.headers else None
    return error_response(error.status_code, code, error.detail, headers)


async def on_unavailable(request: Request, error: Exception) -> JSONResponse:
    log.warning("http.unavailable", error=str(error))
    detail = "the ledger cannot reach its database"
    runtime = getattr(getattr(request.scope.get("app"), "state", None), "runtime", None)
    if runtime is not None and connection_lost(error):
        # Its pools' other connections may be as dead: renewed before the client, told to
        # retry, comes back.
        runtime.renew_connections()
    if lock_timed_out(error):
        detail = (
            "the ledger's database is busy: a write waited too long for the event log's lock"
            " (a session that holds it for over 30 s is ended by the next write that waits)"
        )
    return error_response(503, "unavailable", detail, {"Retry-After": "1"})


async def on_position_not_reached(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, PositionNotReached)
    detail = {"view": error.projection, "min_position": error.wanted, "position": error.reached}
    if error.head is not None:
        detail["log_position"] = error.head
        detail["message"] = "no write has reached this position: it is past the log's end"
        return error_response(503, "position_not_reached", detail)
    return error_response(503, "position_not_reached", detail, {"Retry-After": "1"})


async def on_timeout(_: Request, error: Exception) -> JSONResponse:
    if isinstance(error, OutcomeUnknown):
        # Told to retry, a fulfil or return sent without an Idempotency-Key was recorded
        # twice: the first, stuck in its save, was applied after its 503 (an OMS walkthrough).
        log.warning("http.command_outcome_unknown")
        return error_response(
            503,
            "outcome_unknown",
            "the ledger took the command and did not finish in time: it may yet be applied."
            " Sent again as it was, an order, or a fulfil or return with its Idempotency-Key,"
            " is answered as the first if it was applied; without a key, read the reservation"
            " before sending it again",
            {"Retry-After": "1"},
        )
    log.warning("http.command_timeout")
    return error_response(
        503,
        "timeout",
        "the ledger did not take the command in time and never will: nothing of it was"
        " applied; send it again",
        {"Retry-After": "1"},
    )


async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
    # Rendered on a worker thread: a traceback rendered for a terminal (rich) took up to
    # seconds under load, with the event loop, and every request on it, stopped.
    await run_in_threadpool(
        log.error, "http.unexpected_error", path=request.url.path, exc_info=error
    )
    return error_response(
        500, "internal_error", {"request_id": getattr(request.state, "request_id", None)}
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(LedgerError, on_ledger_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    for unavailable in (StoreUnavailable, DatabaseUnavailable, WriterStopped):
        app.add_exception_handler(unavailable, on_unavailable)
    app.add_exception_handler(TimeoutError, on_timeout)
    app.add_exception_handler(PositionNotReached, on_position_not_reached)
    app.add_exception_handler(Exception, on_unexpected)
