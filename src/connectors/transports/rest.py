"""REST polling: a supplier's inventory API read page by page, with conditional requests.

Each page is one delivery (id: its content hash; name: its URL). Each request of a poll
carries the `If-None-Match` and `If-Modified-Since` its URL was answered with at the last
complete poll, so an unchanged page costs a request answered 304 and yields nothing, and
an unchanged feed one 304 a page; the poll goes on to the page that followed it then. A
page's validators say nothing of the pages after it (found by an integrator's
walkthrough: only the first page was asked conditionally, and a 304 to it ended the poll,
so a change on page 2 was never read). The validators of a poll are saved only when
`done()` has been called for every page it yielded and its last page has been fetched: a
crash before the inbox stored them all repeats the poll rather than losing it. They are
kept with the connector's settings they were read under (a page rejected for a wrong
`records` path, say, is asked for in full once the settings are mended: a 304 kept it
unread), and, for a supplier with `stale_after_seconds`, used only for a quarter of that
after the last poll that fetched every page in full: a 304 records no report, so the
levels of a feed answered 304 would turn stale, and those of the same feed answered 200
do not (each poll is an arrival; see `Scheduler`). Every request runs under the retry
policy (`retry`). A page that is not what its format and pagination need is fatal, with
a reason starting "malformed_page"; one whose records could be read, but not where the
next page is, is yielded first, then the poll fails.

Options of `connector["poll"]` (and those of `retry`):

- `url` (required): the inventory endpoint, http or https; its own query is kept on
  the pages asked for (a `link` page is followed as its Link header gives it).
- `pagination` (default none, one request): how pages follow each other, as the
  simulator's REST supplier serves them:
  - "page":   `?page=1&page_size=N`, then `page + 1` until `page` reaches `total_pages`;
  - "offset": `?offset=0&limit=N`, then `offset + len(items)` until it reaches `total`;
  - "cursor": `?limit=N`, then `&cursor=<next_cursor>` until `next_cursor` is null;
  - "link":   `?page=1&page_size=N`, then the `Link: <…>; rel="next"` URL as given.
  "page", "offset" and "cursor" read a JSON object with an `items` list, and these fields
  beside it: `page` and `total_pages` (whole numbers), `offset` and `total`, or
  `next_cursor` (a string or a whole number; null, absent or "" on the last page). An
  empty page is followed by the next as any other ("offset" cannot go on from one before
  `total`: that fails), so that a page of an error object (`{"error": …, "items": []}`)
  fails the poll instead of ending it as complete.
- `page_size` (default 100, at most 100000): N above.
- `format` (default "json"): the pages' format, one of `connectors.parsers.FORMATS`.
- `token_ref` (default none): where the bearer token lives ("env:NAME" or "file:PATH");
  it is sent only to the origin of `url`, never to another host a Link points to.
- `max_pages` (default 10000, at most a million) and `max_page_bytes` (default 64 MiB,
  at most 1 GiB): bounds on one poll and one page, past which the fetch fails
  ("too_many_pages", "page_too_large").
- `other_origins` (default false): pages (a `Link`) and redirects on another server than
  `url`'s are refused ("other_origin") unless this is true; redirects are followed up to
  5 a page ("too_many_redirects").
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import structlog
from pydantic import Field, field_validator, model_validator

from connectors.parsers import Format
from connectors.transports import Fetched, StateStore, content_id, read_secret
from connectors.transports.retry import (
    Failure,
    FetchFailed,
    RetrySettings,
    classified,
    retry_after_seconds,
    status_failure,
)

log = structlog.get_logger(__name__)

Pagination = Literal["page", "offset", "cursor", "link"]

# The last complete poll: {"url", "reading", "full_at", "pages": [{"url", "etag",
# "last_modified", "next"}, …]}, each page as asked, with its validators and the URL of
# the page after it (None after the last); `reading` is the digest of the connector's
# settings, `full_at` when a poll last fetched every page in full (Unix seconds).
STATE = "poll.validators"

HTTP_FAILURES = (
    Failure(httpx.TimeoutException, "timeout", retriable=True),
    Failure(httpx.UnsupportedProtocol, "unsupported_protocol", retriable=False),
    Failure(httpx.TransportError, "connection_error", retriable=True),
    Failure(httpx.DecodingError, "malformed_page", retriable=False),
    Failure(httpx.TooManyRedirects, "too_many_redirects", retriable=False),
)

# The query of each style's first page, given the page size.
FIRST_PAGE: dict[Pagination | None, Callable[[int], dict[str, int]]] = {
    None: lambda size: {},
    "page": lambda size: {"page": 1, "page_size": size},
    "link": lambda size: {"page": 1, "page_size": size},
    "offset": lambda size: {"offset": 0, "limit": size},
    "cursor": lambda size: {"limit": size},
}


class PollSettings(RetrySettings):
    """`connector["poll"]`: a REST API polled page by page."""

    url: str
    pagination: Pagination | None = None
    page_size: int = Field(100, ge=1, le=100_000)
    format: Format = "json"
    token_ref: str | None = None
    max_pages: int = Field(10_000, ge=1, le=1_000_000)  # a poll keeps each page's URL
    # A page is held whole in memory, then in an inbox row, where PostgreSQL keeps at most
    # 1 GB a value.
    max_page_bytes: int = Field(64 * 2**20, ge=1, le=2**30)
    # Pages and redirects on other servers than `url`'s (a CDN's, say) are followed only
    # when this is set (see `Poller._check_origin`).
    other_origins: bool = False

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as error:
            raise ValueError(str(error)) from error
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("an http or https URL is needed")
        # Each was saved, then failed every fetch (`a..b` crashed it, UnicodeError): a
        # supplier integrator's walkthrough.
        try:
            url.host.encode("idna")
        except UnicodeError:
            raise ValueError(f"{url.host!r} is not a host name") from None
        if url.port is not None and not 1 <= url.port <= 65535:
            raise ValueError(f"the port is 1 to 65535, not {url.port}")
        if url.userinfo:
            # Settings are events, kept for ever and shown to auditors: a password here
            # could never be taken back. Credentials go by reference (`token_ref`).
            raise ValueError("no credentials in the URL: name a token by reference (token_ref)")
        return value

    @field_validator("token_ref")
    @classmethod
    def _by_reference(cls, value: str | None) -> str | None:
        # As `webhook.secret_ref`: anything else was saved, then every fetch failed
        # `secret_unavailable` (a supplier integrator's walkthrough).
        if value is not None and not value.startswith(("env:", "file:")):
            raise ValueError("token_ref is env:NAME or file:PATH")
        return value

    @model_validator(mode="after")
    def _json_to_paginate(self) -> PollSettings:
        if self.pagination in ("page", "offset", "cursor") and self.format != "json":
            raise ValueError(f"{self.pagination} pagination reads JSON pages, not {self.format}")
        return self


@dataclass(frozen=True)
class _Page:
    url: httpx.URL
    status: int
    headers: httpx.Headers
    body: bytes


# A Link header's links (RFC 8288): `<target>` and its parameters, a quoted value possibly
# holding ';' or ','. httpx's own reading keys a link on its whole rel ("next last"), by
# case, and cuts a target at its first ';'.
_LINK = re.compile(r'<([^>]*)>((?:\s*;\s*[^;,"=\s]+\s*(?:=\s*(?:"(?:[^"\\]|\\.)*"|[^;,\s]*))?)*)')
_PARAMETER = re.compile(r';\s*([^;,"=\s]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*))?')


def next_link(values: list[str]) -> str | None:
    """The target of the first link whose relations include "next" (any case), from a
    response's Link headers; None when there is none."""
    for value in values:
        for link in _LINK.finditer(value):
            for name, written in _PARAMETER.findall(link.group(2)):
                relations = written.strip('"').lower().split()
                if name.lower() == "rel" and "next" in relations:
                    return link.group(1).strip()
    return None


@dataclass
class _Poll:
    """The pages of one poll that the inbox has yet to store, and what to save after."""

    saved: dict[str, Any]
    waiting: set[tuple[str, str | None]] = field(default_factory=set)
    complete: bool = False  # its last page has been fetched
    unchanged: int = 0  # its pages answered 304


class RestPoller:
    """Polls one supplier's REST API through the given client."""

    def __init__(
        self,
        supplier_id: str,
        settings: PollSettings,
        *,
        state: StateStore,
        client: httpx.Client,
        owns_client: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        reading: str = "",
        refresh_seconds: float | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        """`reading`: a digest of the settings the pages are read under (validators saved
        under others are not used); `refresh_seconds`: how long after the last poll that
        fetched every page in full validators are used (None: always)."""
        self.settings = settings
        self.state = state
        self.reading = reading
        self.refresh_seconds = refresh_seconds
        self.now = now
        self._client = client
        self._owns_client = owns_client
        self._policy = settings.policy(sleep)
        self._log = log.bind(supplier=supplier_id, source="poll")
        self._poll: _Poll | None = None
        self._origin = _origin(httpx.URL(settings.url))

    def fetch(self) -> Iterator[Fetched]:
        settings = self.settings
        token = read_secret(settings.token_ref) if settings.token_ref else None
        if token is not None and not token.isascii():
            # An HTTP header carries ASCII: httpx's refusal quoted the header, token and all,
            # into the log at every fetch (a security review).
            raise FetchFailed(
                f"secret_unavailable: the token of {settings.token_ref} is not ASCII",
                retriable=False,
            )
        url: httpx.URL | None = httpx.URL(settings.url).copy_merge_params(
            FIRST_PAGE[settings.pagination](settings.page_size)
        )
        known = self._known_pages()
        pages: list[dict[str, Any]] = []
        poll = _Poll(saved={"url": settings.url, "reading": self.reading, "pages": pages})
        self._poll = poll
        requested: set[str] = set()
        while url is not None:
            asked = str(url)
            if asked in requested:
                raise FetchFailed(f"pagination_loop: {url} was asked twice", retriable=False)
            if len(requested) == settings.max_pages:
                raise FetchFailed(f"too_many_pages: over {settings.max_pages}", retriable=False)
            self._check_origin(url, "a page")
            requested.add(asked)
            validators = known.get(asked)
            headers = self._headers(url, token, validators)
            page = self._policy.run(functools.partial(self._get, url, headers))
            if page.status == 304:
                if validators is None:
                    raise FetchFailed("http_304: to a request that was not conditional", True)
                pages.append(validators)
                poll.unchanged += 1
                url = None if validators["next"] is None else httpx.URL(validators["next"])
                continue
            failure: FetchFailed | None = None
            try:
                url = _next_page(settings.pagination, url, page, settings.format)
            except _NextUnknown as unknown:  # the page's records stand: kept, then failed
                url, failure = None, unknown.failure
            pages.append(
                {
                    "url": asked,
                    "etag": page.headers.get("etag"),
                    "last_modified": page.headers.get("last-modified"),
                    "next": None if url is None else str(url),
                }
            )
            fetched = Fetched(
                content_id(page.body), page.body, settings.format, str(page.url), "poll"
            )
            poll.waiting.add((fetched.delivery_id, fetched.name))
            poll.complete = url is None and failure is None
            yield fetched
            if failure is not None:
                raise failure
        if poll.unchanged == len(pages):
            self._poll = None
            self._log.info("transport.poll.unchanged", pages=poll.unchanged)
        elif self._poll is poll:  # not yet saved: its last page was a 304
            poll.complete = True
            if not poll.waiting:
                self._save(poll)

    def _known_pages(self) -> dict[str, dict[str, Any]]:
        """The pages of the last complete poll by URL, with their validators, where they
        may be used: the same URL and settings, and (with `refresh_seconds`) a full poll
        recent enough."""
        saved = self.state.get(STATE)
        if not isinstance(saved, dict) or not isinstance(saved.get("pages"), list):
            return {}  # none, or saved in another form (before validators were per page)
        if saved.get("url") != self.settings.url or saved.get("reading") != self.reading:
            return {}
        full_at = saved.get("full_at")
        if self.refresh_seconds is not None and (
            not isinstance(full_at, int | float) or self.now() - full_at >= self.refresh_seconds
        ):
            return {}
        return {page["url"]: page for page in saved["pages"]}

    def done(self, fetched: Fetched) -> None:
        """Saves the poll's validators once every page of it is done; a page of an
        earlier, abandoned poll changes nothing."""
        poll = self._poll
        if poll is None:
            return
        poll.waiting.discard((fetched.delivery_id, fetched.name))
        if poll.complete and not poll.waiting:
            self._save(poll)

    def _save(self, poll: _Poll) -> None:
        """Saves a complete poll's pages; when it fetched every one in full, as the time
        from which validators may be used (`refresh_seconds`)."""
        full_at = self.now()
        if poll.unchanged:  # not every page fetched in full: the last full poll's time
            previous = self.state.get(STATE)
            if isinstance(previous, dict) and isinstance(previous.get("full_at"), int | float):
                full_at = previous["full_at"]
        self.state.set(STATE, {**poll.saved, "full_at": full_at})
        self._poll = None
        self._log.info(
            "transport.poll.complete", pages=len(poll.saved["pages"]), unchanged=poll.unchanged
        )

    @property
    def refused(self) -> dict[str, str]:
        return {}  # a page that cannot be read fails the poll

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _headers(
        self, url: httpx.URL, token: str | None, validators: dict[str, Any] | None
    ) -> dict[str, str]:
        headers: dict[str, str] = {}
        if token is not None and _origin(url) == self._origin:
            headers["Authorization"] = f"Bearer {token}"
        if validators is not None:
            if validators.get("etag"):
                headers["If-None-Match"] = validators["etag"]
            if validators.get("last_modified"):
                headers["If-Modified-Since"] = validators["last_modified"]
        return headers

    def _get(self, url: httpx.URL, headers: dict[str, str]) -> _Page:
        """One attempt at one page, following its redirects (on the feed's own server,
        unless the settings say otherwise: see `_check_origin`)."""
        timeout = self.settings.timeout_seconds
        started = time.monotonic()
        for _ in range(MAX_REDIRECTS + 1):
            with (
                classified(HTTP_FAILURES),
                self._client.stream(
                    "GET", url, headers=headers, timeout=timeout, follow_redirects=False
                ) as response,
            ):
                if response.has_redirect_location:
                    url = response.url.join(response.headers["location"])
                    self._check_origin(url, "a redirect")
                    if _origin(url) != self._origin:
                        # The token is the feed's server's: a redirect elsewhere (where
                        # `other_origins` allows one) was sent it (a security review).
                        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                    continue
                wait = retry_after_seconds(response.headers.get("retry-after"))
                failure = status_failure(response.status_code, wait)
                if failure is not None:
                    raise failure
                body = _read(response, self.settings.max_page_bytes, started, timeout)
                return _Page(response.url, response.status_code, response.headers, body)
        raise FetchFailed(f"too_many_redirects: over {MAX_REDIRECTS}", retriable=False)

    def _check_origin(self, url: httpx.URL, what: str) -> None:
        """A page or a redirect on another server than the feed's URL names is refused
        (`other_origins` allows it): a supplier's server, or whoever controls its name,
        could otherwise send the ledger to fetch from the network it sits in (found by a
        security review: a `Link` to 127.0.0.1, whose answer reached the dead letters)."""
        if not self.settings.other_origins and _origin(url) != self._origin:
            raise FetchFailed(
                f"other_origin: {what} leads to {url.scheme}://{url.host}"
                f"{'' if url.port is None else f':{url.port}'}, not the feed's server",
                retriable=False,
            )


# Redirects followed for one page, at most (each checked: see `Poller._check_origin`).
MAX_REDIRECTS = 5


def default_client(settings: PollSettings) -> httpx.Client:
    """The client a poller builds for itself when none is given (it follows redirects
    itself, page by page)."""
    return httpx.Client(timeout=settings.timeout_seconds, follow_redirects=False)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


# A page's body may take `timeout_seconds`, and that again for each MiB of it.
TIMEOUT_BYTES = 1 << 20


def _read(response: httpx.Response, limit: int, started: float, timeout: float) -> bytes:
    """The page's body, up to `limit` bytes, at no less than a MiB every `timeout` seconds:
    httpx's timeout bounds each read, and a body sent a byte a second held an attempt of a 3
    s timeout for 77 s (a supplier integrator's walkthrough), its supplier among the few
    fetched at once. A large page on a slow line is given its time, and one that arrived
    whole is kept, however late."""
    chunks: list[bytes] = []
    size = 0
    overdue = False
    for chunk in response.iter_bytes():
        if overdue:
            raise httpx.ReadTimeout(
                "the page came more slowly than a MiB every timeout_seconds",
                request=response.request,
            )
        size += len(chunk)
        if size > limit:
            raise FetchFailed(f"page_too_large: over {limit} bytes", retriable=False)
        chunks.append(chunk)
        overdue = time.monotonic() - started > timeout * (1 + size // TIMEOUT_BYTES)
    return b"".join(chunks)


class _NextUnknown(Exception):
    """A page whose records could be read, but not where the next page is."""

    def __init__(self, failure: FetchFailed) -> None:
        super().__init__(failure.reason)
        self.failure = failure


def _next_page(
    style: Pagination | None, url: httpx.URL, page: _Page, format: Format
) -> httpx.URL | None:
    """The URL of the page after this one, None after the last; checks the page's shape:
    FetchFailed when its records cannot be read, _NextUnknown when they can but where the
    next page is cannot."""
    document = _json(page.body) if format == "json" else None
    if style is None:
        return None
    if style == "link":
        target = next_link(page.headers.get_list("link"))
        return page.url.join(target) if target else None
    if not isinstance(document, dict) or not isinstance(document.get("items"), list):
        raise _malformed(f"{style} pagination needs an object with an items list")
    try:
        return _after(style, url, document)
    except FetchFailed as failure:
        raise _NextUnknown(failure) from failure


def _after(style: Pagination, url: httpx.URL, document: dict[str, Any]) -> httpx.URL | None:
    items = document["items"]
    if style == "page":
        number = _whole(document, "page")
        if number >= _whole(document, "total_pages"):
            return None
        return url.copy_merge_params({"page": number + 1})
    if style == "offset":
        offset, total = _whole(document, "offset"), _whole(document, "total")
        if offset + len(items) >= total:
            return None
        if not items:
            raise _malformed(f"an empty page at offset {offset} of {total}")
        return url.copy_merge_params({"offset": offset + len(items)})
    cursor = document.get("next_cursor")
    if cursor is None or cursor == "":
        return None
    if isinstance(cursor, int) and not isinstance(cursor, bool):
        cursor = str(cursor)
    if not isinstance(cursor, str):
        raise _malformed("next_cursor is neither a string, a whole number nor null")
    return url.copy_merge_params({"cursor": cursor})


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as error:
        raise _malformed(f"not JSON ({error})") from error


def _whole(document: dict[str, Any], key: str) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _malformed(f"{key} is missing or not a whole number")
    return value


def _malformed(detail: str) -> FetchFailed:
    return FetchFailed(f"malformed_page: {detail}", retriable=False)
