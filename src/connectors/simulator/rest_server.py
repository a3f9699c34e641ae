"""A supplier's REST inventory API on 127.0.0.1, served from a background thread.

`GET /inventory` answers the catalogue a page at a time in the server's pagination style:

- "page":   `?page=1&page_size=100` -> `{"items", "page", "page_size", "total", "total_pages"}`
- "offset": `?offset=0&limit=100`   -> `{"items", "offset", "limit", "total"}`
- "cursor": `?cursor=…&limit=100`   -> `{"items", "next_cursor"}` (null on the last page)
- "link":   `?page=1&page_size=100` -> a bare JSON array, and `Link: <…>; rel="next"` while
  there are more pages (`link_template` writes it otherwise: `{next}` and `{first}` are
  the pages' URLs, e.g. `<{first}>; rel="first", <{next}>; rel="Next last"`).

Items are `{"supplier_sku", "upc", "quantity", "unit", "observed_at"}`. Every answer
carries the catalogue version's `ETag` and `Last-Modified`; a matching `If-None-Match`
(or, without one, an `If-Modified-Since` not older than the catalogue) gets 304. With a
`token`, requests without `Authorization: Bearer <token>` get 401. `faults` makes the
next requests fail, and `requests` lists what was asked and answered.
"""

from __future__ import annotations

import base64
import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from hmac import compare_digest
from typing import Literal, get_args

from connectors.simulator.catalogue import Catalogue, Page
from connectors.simulator.faults import Faults
from connectors.simulator.http_thread import HttpThread, Request, Response, error_response
from connectors.simulator.writers import json_item

Pagination = Literal["page", "offset", "cursor", "link"]
PAGINATIONS: tuple[Pagination, ...] = get_args(Pagination)
MALFORMED_BODY = b'{"items": [{"supplier_sku": "SIM-0'


@dataclass(frozen=True)
class LoggedRequest:
    """One request the supplier answered (header names in lower case), and its status."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    status: int


@dataclass
class RestSupplier:
    """The REST supplier of one catalogue; `start()` it, or use it as a context manager.

    `pagination`, `page_size` and `token` may be changed while it runs; `port` 0 picks a
    free one.
    """

    catalogue: Catalogue
    pagination: Pagination = "page"
    page_size: int = 100
    max_page_size: int = 1000
    token: str | None = None
    link_template: str = '<{next}>; rel="next"'
    port: int = 0
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if self.pagination not in PAGINATIONS:
            raise ValueError(f"pagination is one of {', '.join(PAGINATIONS)}")
        self._http = HttpThread(self._answer, port=self.port)
        self._log: list[LoggedRequest] = []
        self._log_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>` once started."""
        return self._http.base_url

    def start(self) -> RestSupplier:
        self._http.start()
        return self

    def stop(self) -> None:
        """Stop serving; delayed requests are dropped and open connections closed."""
        self._http.stop()

    def __enter__(self) -> RestSupplier:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def requests(self) -> list[LoggedRequest]:
        """Every request answered so far, oldest first (a delayed one once it is answered)."""
        with self._log_lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._log.clear()

    def _answer(self, request: Request) -> Response:
        fault = self.faults.take()
        if fault is not None and fault.kind == "delay" and self._http.stopping.wait(fault.seconds):
            return error_response(503, "stopping", "the supplier is shutting down")
        if fault is None or fault.kind == "delay":
            response = self._inventory(request)
        elif fault.kind == "malformed":
            response = Response(200, {"Content-Type": "application/json"}, MALFORMED_BODY)
        else:
            response = error_response(fault.status, "simulated_fault", f"status {fault.status}")
            if fault.retry_after is not None:
                response.headers["Retry-After"] = str(fault.retry_after)
        logged = LoggedRequest(
            request.method, request.path, request.query, request.headers, response.status
        )
        with self._log_lock:
            self._log.append(logged)
        return response

    def _inventory(self, request: Request) -> Response:
        if request.path != "/inventory":
            return error_response(404, "not_found", f"no resource at {request.path}")
        if request.method != "GET":
            return error_response(405, "method_not_allowed", "only GET /inventory")
        headers = request.headers
        if self.token is not None and not _bearer_matches(headers.get("authorization"), self.token):
            response = error_response(401, "unauthorized", "a valid bearer token is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="supplier"'
            return response
        try:
            start, size = self._window(request.query)
        except ValueError as error:
            return error_response(400, "bad_request", str(error))
        page = self.catalogue.page(start, start + size)
        etag = f'"{self.catalogue.seed}-{page.total}-{page.version}"'
        validators = {
            "ETag": etag,
            "Last-Modified": format_datetime(page.observed_at.astimezone(UTC), usegmt=True),
        }
        if _not_modified(headers, etag, page.observed_at):
            return Response(304, validators, b"")
        body, links = self._body(page, start, size)
        return Response(200, {"Content-Type": "application/json", **validators, **links}, body)

    def _window(self, query: Mapping[str, str]) -> tuple[int, int]:
        """The first index and the number of items the query asks for."""
        if self.pagination in ("page", "link"):
            size = min(_number(query, "page_size", self.page_size, least=1), self.max_page_size)
            return (_number(query, "page", 1, least=1) - 1) * size, size
        size = min(_number(query, "limit", self.page_size, least=1), self.max_page_size)
        if self.pagination == "offset":
            return _number(query, "offset", 0, least=0), size
        return _offset(query["cursor"]) if "cursor" in query else 0, size

    def _body(self, page: Page, start: int, size: int) -> tuple[bytes, dict[str, str]]:
        items = "[" + ",\n".join(json_item(item) for item in page.items) + "]"
        after = start + len(page.items)
        more = after < page.total
        meta: dict[str, object]
        if self.pagination == "link":
            if not more:
                return items.encode(), {}
            url = f"{self.base_url}/inventory?page={start // size + 2}&page_size={size}"
            first = f"{self.base_url}/inventory?page=1&page_size={size}"
            return items.encode(), {"Link": self.link_template.format(next=url, first=first)}
        if self.pagination == "page":
            meta = {
                "page": start // size + 1,
                "page_size": size,
                "total": page.total,
                "total_pages": math.ceil(page.total / size),
            }
        elif self.pagination == "offset":
            meta = {"offset": start, "limit": size, "total": page.total}
        else:
            meta = {"next_cursor": _cursor(after) if more else None}
        fields = "".join(f", {json.dumps(key)}: {json.dumps(value)}" for key, value in meta.items())
        return f'{{"items": {items}{fields}}}'.encode(), {}


def _number(query: Mapping[str, str], name: str, default: int, *, least: int) -> int:
    written = query.get(name)
    if written is None:
        return default
    if not written.isdigit() or int(written) < least:
        raise ValueError(f"{name} must be a whole number of at least {least}, not {written!r}")
    return int(written)


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def _offset(cursor: str) -> int:
    try:
        written = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:
        written = ""
    label, _, offset = written.partition(":")
    if label != "offset" or not offset.isdigit():
        raise ValueError(f"cursor {cursor!r} is not one this supplier gave")
    return int(offset)


def _bearer_matches(authorization: str | None, token: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and compare_digest(given.strip().encode(), token.encode())


def _not_modified(headers: Mapping[str, str], etag: str, modified: datetime) -> bool:
    """Whether the client's copy is current (If-None-Match wins over If-Modified-Since)."""
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or etag in tags
    since = headers.get("if-modified-since")
    if not since:
        return False
    try:
        seen = parsedate_to_datetime(since)
    except (TypeError, ValueError):
        return False
    return modified <= (seen if seen.tzinfo else seen.replace(tzinfo=UTC))
