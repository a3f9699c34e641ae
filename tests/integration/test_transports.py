"""Supplier transports against the simulator's real servers: REST, drop folders, SFTP, FTP.

No database: the inbox is played by the tests, which call `done()` once they hold a
delivery, as the scheduler does once the inbox has stored it.
"""

from __future__ import annotations

import contextlib
import ftplib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest

from connectors.config import check_connector
from connectors.simulator import (
    PAGINATIONS,
    Catalogue,
    FtpSupplier,
    Pagination,
    RestSupplier,
    SftpSupplier,
    drop,
)
from connectors.transports import (
    Fetched,
    FetchFailed,
    Transport,
    content_id,
    delivery_format,
    transport_for,
)
from connectors.transports.breaker import CircuitBreaker, CircuitOpen
from connectors.transports.folder import (
    Entry,
    FolderSettings,
    FolderTransport,
    LocalFolder,
    local_folder,
)
from connectors.transports.rest import STATE, RestPoller
from connectors.transports.retry import RetryPolicy, retry_after_seconds

T0 = datetime(2026, 1, 15, 14, 30, tzinfo=UTC)
ETAG = '"7-250-0"'  # what the simulator answers for catalogue() as first made
LAST_MODIFIED = "Thu, 15 Jan 2026 14:30:00 GMT"
FAST = {"backoff_seconds": 0.01, "max_backoff_seconds": 0.05}  # retries without the waits


class DictState:
    """The per-supplier state store, as a dict."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def set(self, name: str, value: Any) -> None:
        self.values[name] = value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(breaker: CircuitBreaker) -> str:
    """The breaker's state as health reports it (read afresh: it changes as time passes)."""
    return breaker.state


def catalogue(size: int = 250) -> Catalogue:
    return Catalogue(size, seed=7, observed_at=T0)


def pull(transport: Transport) -> list[Fetched]:
    """Fetches, marking each delivery done as soon as it is held, as the scheduler does."""
    fetched = []
    for delivery in transport.fetch():
        fetched.append(delivery)
        transport.done(delivery)
    return fetched


def skus_of(pages: list[Fetched], style: Pagination) -> list[str]:
    documents = [json.loads(page.body) for page in pages]
    items = [item for doc in documents for item in (doc if style == "link" else doc["items"])]
    return [item["supplier_sku"] for item in items]


@pytest.fixture
def supplier() -> Iterator[RestSupplier]:
    with RestSupplier(catalogue(), pagination="page", page_size=100) as running:
        yield running


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        yield client


def poller(
    server: RestSupplier,
    http: httpx.Client,
    state: DictState | None = None,
    path: str = "/inventory",
    **options: Any,
) -> Transport:
    settings = {"url": server.base_url + path, "pagination": server.pagination, **FAST}
    transport = transport_for(
        "acme", {"poll": {**settings, **options}}, state=state or DictState(), client=http
    )
    assert transport is not None
    return transport


def statuses(server: RestSupplier) -> list[int]:
    return [request.status for request in server.requests]


# REST polling: pagination


@pytest.mark.parametrize("style", PAGINATIONS)
def test_each_pagination_style_yields_every_page_once(
    style: Pagination, http: httpx.Client
) -> None:
    c = catalogue()
    with RestSupplier(c, pagination=style) as server:
        pages = pull(poller(server, http, page_size=100))
        assert len(server.requests) == 3
        base_url = server.base_url
    assert skus_of(pages, style) == [item.supplier_sku for item in c]
    assert [page.delivery_id for page in pages] == [content_id(page.body) for page in pages]
    assert len({page.delivery_id for page in pages}) == 3
    assert all(page.name and page.name.startswith(base_url) for page in pages)
    assert {(page.source, page.format) for page in pages} == {("poll", "json")}


@pytest.mark.parametrize(
    "link",
    [
        '<{next}>; rel="Next"',
        '<{next}>; rel="next last"',
        '<{first}>; rel="first"; title="page one; of, many", <{next}>; rel=next',
        '<{first}>; rel="prev nextish", <{next}>; rel="next"',
    ],
)
def test_a_link_header_is_read_however_the_server_writes_it(link: str, http: httpx.Client) -> None:
    c = catalogue()
    with RestSupplier(c, pagination="link", link_template=link) as server:
        pages = pull(poller(server, http, page_size=100))
        asked = [request.query.get("page") for request in server.requests]
    assert asked == ["1", "2", "3"]
    assert skus_of(pages, "link") == [item.supplier_sku for item in c]


def test_the_query_of_the_configured_url_is_kept_on_every_page(
    supplier: RestSupplier, http: httpx.Client
) -> None:
    pull(poller(supplier, http, path="/inventory?warehouse=north"))
    assert [request.query for request in supplier.requests] == [
        {"warehouse": "north", "page": str(number), "page_size": "100"} for number in (1, 2, 3)
    ]


def test_a_content_hash_names_each_page(supplier: RestSupplier, http: httpx.Client) -> None:
    [first, *_] = pull(poller(supplier, http))
    assert first.delivery_id.startswith("sha256:")
    assert len(first.delivery_id) == len("sha256:") + 32


# REST polling: conditional requests


def test_an_unchanged_feed_costs_one_304_a_page_and_yields_nothing(
    supplier: RestSupplier, http: httpx.Client
) -> None:
    transport = poller(supplier, http)
    assert len(pull(transport)) == 3
    supplier.clear_requests()
    assert pull(transport) == []
    assert statuses(supplier) == [304, 304, 304]
    for request in supplier.requests:
        assert request.headers["if-none-match"] == ETAG
        assert request.headers["if-modified-since"] == LAST_MODIFIED


def test_an_unchanged_feed_on_one_page_costs_one_304(http: httpx.Client) -> None:
    with RestSupplier(catalogue(), pagination="page", page_size=1000) as one_page:
        transport = poller(one_page, http, page_size=1000)
        assert len(pull(transport)) == 1
        one_page.clear_requests()
        assert pull(transport) == []
        assert statuses(one_page) == [304]


def test_a_changed_feed_is_fetched_again_in_full(
    supplier: RestSupplier, http: httpx.Client
) -> None:
    transport = poller(supplier, http)
    before = pull(transport)
    supplier.catalogue.advance(0.1, T0 + timedelta(minutes=5))
    supplier.clear_requests()
    after = pull(transport)
    assert statuses(supplier) == [200, 200, 200]
    assert {page.delivery_id for page in after}.isdisjoint(page.delivery_id for page in before)


def test_the_etag_is_saved_only_when_the_last_page_is_done(
    supplier: RestSupplier, http: httpx.Client
) -> None:
    state = DictState()
    transport = poller(supplier, http, state)
    first, second, last = transport.fetch()
    transport.done(first)
    transport.done(second)
    assert state.get(STATE) is None
    transport.done(last)
    url = supplier.base_url + "/inventory"
    saved = state.get(STATE)
    assert saved["url"] == url
    assert [(page["url"], page["next"]) for page in saved["pages"]] == [
        (f"{url}?page=1&page_size=100", f"{url}?page=2&page_size=100"),
        (f"{url}?page=2&page_size=100", f"{url}?page=3&page_size=100"),
        (f"{url}?page=3&page_size=100", None),
    ]
    assert {(page["etag"], page["last_modified"]) for page in saved["pages"]} == {
        (ETAG, LAST_MODIFIED)
    }


def test_a_poll_whose_pages_were_not_all_stored_is_repeated(
    supplier: RestSupplier, http: httpx.Client
) -> None:
    state = DictState()
    transport = poller(supplier, http, state)
    for page in list(transport.fetch())[:2]:
        transport.done(page)  # then the scheduler dies before storing the last page
    supplier.clear_requests()
    again = pull(poller(supplier, http, state))
    assert len(again) == 3
    assert "if-none-match" not in supplier.requests[0].headers


# REST polling: retries and failures


def test_a_503_is_retried_until_the_supplier_answers(
    supplier: RestSupplier, http: httpx.Client
) -> None:
    supplier.faults.fail_next(2, status=503)
    assert len(pull(poller(supplier, http))) == 3
    assert statuses(supplier) == [503, 503, 200, 200, 200]


def test_retries_stop_after_max_attempts_and_the_failure_stays_retriable(
    supplier: RestSupplier, http: httpx.Client
) -> None:
    supplier.faults.fail_next(5, status=502)
    with pytest.raises(FetchFailed) as failed:
        pull(poller(supplier, http, max_attempts=3))
    assert (failed.value.reason, failed.value.retriable) == ("http_502", True)
    assert statuses(supplier) == [502, 502, 502]


@pytest.mark.alone
def test_a_429_is_retried_after_the_wait_its_retry_after_asks_for(
    supplier: RestSupplier,
) -> None:
    sent: list[float] = []

    def note(request: httpx.Request) -> None:
        sent.append(time.monotonic())

    supplier.faults.throttle_next(retry_after=1)
    with httpx.Client(event_hooks={"request": [note]}) as http:
        assert len(pull(poller(supplier, http))) == 3
    assert statuses(supplier) == [429, 200, 200, 200]
    assert 1.0 <= sent[1] - sent[0] < 2.0


def test_a_retry_after_longer_than_allowed_is_left_to_the_scheduler(
    supplier: RestSupplier, http: httpx.Client
) -> None:
    supplier.faults.throttle_next(retry_after=30)
    with pytest.raises(FetchFailed) as failed:
        pull(poller(supplier, http, max_retry_after_seconds=5))
    assert (failed.value.reason, failed.value.retriable) == ("http_429", True)
    assert failed.value.retry_after == 30
    assert statuses(supplier) == [429]


def test_a_timeout_is_retried(supplier: RestSupplier) -> None:
    sent: list[str] = []

    def note(request: httpx.Request) -> None:
        sent.append(request.url.params["page"])

    supplier.faults.delay_next(seconds=1.0)
    with httpx.Client(event_hooks={"request": [note]}) as http:
        pages = pull(poller(supplier, http, timeout_seconds=0.25))
    assert len(pages) == 3
    assert sent == ["1", "1", "2", "3"]


@pytest.mark.parametrize(("path", "status"), [("/elsewhere", 404), ("/inventory", 401)])
def test_a_4xx_is_fatal_without_retries(
    supplier: RestSupplier,
    http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    status: int,
) -> None:
    supplier.token = "right"
    monkeypatch.setenv("ACME_TOKEN", "wrong")
    with pytest.raises(FetchFailed) as failed:
        pull(poller(supplier, http, path=path, token_ref="env:ACME_TOKEN"))
    assert (failed.value.reason, failed.value.retriable) == (f"http_{status}", False)
    assert statuses(supplier) == [status]


def test_the_bearer_token_is_read_from_its_reference(
    supplier: RestSupplier, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    supplier.token = "right"
    monkeypatch.setenv("ACME_TOKEN", "right")
    assert len(pull(poller(supplier, http, token_ref="env:ACME_TOKEN"))) == 3
    assert {r.headers["authorization"] for r in supplier.requests} == {"Bearer right"}


@pytest.mark.parametrize("lead", ["link", "redirect"])
def test_the_bearer_token_never_follows_a_link_or_a_redirect_to_another_host(
    monkeypatch: pytest.MonkeyPatch, lead: str
) -> None:
    """A redirect to another server was sent the token (a security review)."""
    sent: dict[str, str | None] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        sent[request.url.host] = request.headers.get("authorization")
        if request.url.host != "api":
            return httpx.Response(200, json=[])
        if lead == "redirect":
            return httpx.Response(302, headers={"Location": "https://mirror.example/inventory"})
        more = {"Link": '<https://mirror.example/inventory?page=2>; rel="next"'}
        return httpx.Response(200, json=[], headers=more if lead == "link" else {})

    monkeypatch.setenv("ACME_TOKEN", "secret")
    settings = {
        "url": "https://api/inventory",
        "pagination": "link",
        "token_ref": "env:ACME_TOKEN",
        "other_origins": True,  # a mirror is followed only when the settings allow it
    }
    with httpx.Client(transport=httpx.MockTransport(answer)) as http:
        transport = transport_for("acme", {"poll": settings}, state=DictState(), client=http)
        assert transport is not None
        assert len(pull(transport)) == (2 if lead == "link" else 1)
    assert sent == {"api": "Bearer secret", "mirror.example": None}


def test_a_token_that_no_header_can_carry_fails_the_fetch_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx's refusal of a non-ASCII header quoted the token into the log at every fetch
    (a security review)."""
    monkeypatch.setenv("ACME_TOKEN", "S3cretPollTok\u00e9n")
    settings = {"url": "https://api/inventory", "token_ref": "env:ACME_TOKEN"}
    with httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(200))) as http:
        transport = transport_for("acme", {"poll": settings}, state=DictState(), client=http)
        assert transport is not None
        with pytest.raises(FetchFailed) as failed:
            pull(transport)

    assert not failed.value.retriable
    assert str(failed.value) == "secret_unavailable: the token of env:ACME_TOKEN is not ASCII"


@pytest.mark.parametrize("lead", ["link", "redirect"])
def test_a_page_or_redirect_to_another_server_is_refused_before_it_is_asked_for(
    lead: str,
) -> None:
    """Found by a security review: a supplier's Link (or redirect) to 127.0.0.1 made the
    ledger fetch from its own network, and the answer reached the dead letters."""
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        if request.url.host != "api":
            return httpx.Response(200, json=[{"sku": "INTERNAL", "qty": 1}])
        if lead == "redirect":
            return httpx.Response(302, headers={"Location": "http://127.0.0.1:8106/metrics"})
        more = {"Link": '<http://127.0.0.1:8198/internal-admin>; rel="next"'}
        return httpx.Response(200, json=[], headers=more)

    settings = {"url": "https://api/inventory", "pagination": "link"}
    with httpx.Client(transport=httpx.MockTransport(answer)) as http:
        transport = transport_for("acme", {"poll": settings}, state=DictState(), client=http)
        assert transport is not None
        with pytest.raises(FetchFailed, match=r"other_origin: .* leads to http://127\.0\.0\.1:81"):
            pull(transport)
    assert all("127.0.0.1" not in url for url in asked), asked


def test_a_malformed_page_is_fatal(supplier: RestSupplier, http: httpx.Client) -> None:
    supplier.faults.malform_next()
    transport = poller(supplier, http)
    with pytest.raises(FetchFailed) as failed:
        next(transport.fetch())
    assert failed.value.reason.startswith("malformed_page")
    assert failed.value.retriable is False
    assert statuses(supplier) == [200]


def test_settings_naming_no_transport_give_none_and_bad_ones_are_refused() -> None:
    state = DictState()
    assert transport_for("acme", {"options": {}}, state=state) is None
    with pytest.raises(ValueError, match="bad_option: a connector uses one transport"):
        transport_for("acme", {"poll": {"url": "http://x"}, "ftp": {}}, state=state)
    with pytest.raises(ValueError, match=r"bad_option: poll\.pagination"):
        transport_for("acme", {"poll": {"url": "http://x", "pagination": "pages"}}, state=state)
    with pytest.raises(ValueError, match=r"bad_option: poll\.url"):
        transport_for("acme", {"poll": {"url": "ftp://x"}}, state=state)
    # Settings are kept for ever in the log: a password in the URL could never be undone.
    with pytest.raises(ValueError, match="no credentials in the URL"):
        transport_for("acme", {"poll": {"url": "https://user:pw@x/feed"}}, state=state)


@pytest.mark.parametrize(
    ("connector", "why"),
    [
        pytest.param({"poll": {"url": "http://a..b/feed"}}, "is not a host name", id="host"),
        pytest.param({"poll": {"url": "http://x:99999/f"}}, "port is 1 to 65535", id="port"),
        pytest.param({"poll": {"url": "http://x:0/f"}}, "port is 1 to 65535", id="port 0"),
        pytest.param(
            {"poll": {"url": "http://x/f", "token_ref": "plain"}},
            "token_ref is env:NAME or file:PATH",
            id="token by value",
        ),
        pytest.param(
            {"format": "csv", "poll": {"url": "http://x/f", "pagination": "page"}},
            "page pagination reads JSON pages, not csv",
            id="JSON pages of a CSV supplier",
        ),
        pytest.param(
            {"format": "xml", "poll": {"url": "http://x/f", "pagination": "cursor"}},
            "cursor pagination reads JSON pages, not xml",
            id="JSON pages of an XML supplier",
        ),
    ],
)
def test_poll_settings_that_could_never_fetch_are_refused_when_saved(
    connector: dict[str, Any], why: str
) -> None:
    """A supplier integrator's walkthrough: each was saved, then every fetch failed (`a..b`
    crashed it), or every page was refused."""
    with pytest.raises(ValueError, match=why):
        check_connector(connector)


def test_a_poll_reads_its_pages_in_the_supplier_s_format() -> None:
    transport = transport_for(
        "acme", {"format": "csv", "poll": {"url": "http://x/f"}}, state=DictState()
    )
    assert isinstance(transport, RestPoller)
    assert transport.settings.format == "csv"
    transport.close()


def test_a_drop_folder_reads_its_files_in_the_supplier_s_format(tmp_path: Path) -> None:
    """A folder that names no format of its own is read in the supplier's, as a poll is
    (such settings could not be saved: an operator's walkthrough)."""
    connector = {"format": "edi846", "folder": {"path": str(tmp_path), "settle_seconds": 0}}
    check_connector(connector)
    (tmp_path / "stock.txt").write_bytes(b"ISA*00*...")
    transport = transport_for("acme", connector, state=DictState())
    assert isinstance(transport, FolderTransport)
    [fetched] = transport.fetch()
    assert (fetched.format, fetched.name) == ("edi846", "stock.txt")
    transport.close()


@pytest.mark.parametrize(
    ("connector", "format"),
    [
        pytest.param(
            {"format": "xml", "folder": {"path": "/d", "format": "xml"}}, "xml", id="both"
        ),
        pytest.param({"format": "xml", "ftp": {"host": "h"}}, "xml", id="the supplier's"),
        pytest.param({"sftp": {"host": "h", "format": "edi846"}}, "edi846", id="its transport's"),
        pytest.param({"poll": {"url": "http://x/f", "format": "csv"}}, "csv", id="a poll's"),
        pytest.param({"poll": {"url": "http://x/f"}}, None, id="a poll's default unsaid"),
        pytest.param({"webhook": {"format": "csv"}}, None, id="a webhook's is its own"),
        pytest.param({}, None, id="none"),
        pytest.param({"format": None, "folder": {"format": "xml"}}, "xml", id="a null one"),
        pytest.param({"format": 3, "folder": {"path": "/d"}}, None, id="no text"),
    ],
)
def test_the_supplier_s_format_is_its_connector_s_else_its_transport_s(
    connector: dict[str, Any], format: str | None
) -> None:
    """What an upload or `ledger ingest` that names no format reads a file in."""
    assert delivery_format(None, connector) == format


def test_transport_numbers_are_taken_up_to_their_bounds_and_refused_past_them() -> None:
    state = DictState()
    poll: dict[str, Any] = {
        "url": "http://x",
        "timeout_seconds": 3600,
        "max_attempts": 20,
        "backoff_seconds": 0,
        "max_backoff_seconds": 3600.0,
        "max_retry_after_seconds": 3600,
        "page_size": 100_000,
        "max_pages": 10**6,
        "max_page_bytes": 2**30,
    }
    transport = transport_for("acme", {"poll": poll}, state=state)
    assert transport is not None
    transport.close()
    for name, past in (
        ("timeout_seconds", 3600.5),
        ("max_retry_after_seconds", float("inf")),
        ("max_pages", 10**6 + 1),
        ("max_page_bytes", 2**30 + 1),
    ):
        with pytest.raises(ValueError, match=rf"bad_option: poll\.{name}"):
            transport_for("acme", {"poll": {**poll, name: past}}, state=state)


def test_numbers_saved_as_a_lax_check_took_them_still_run_and_are_refused_when_saved() -> None:
    # As settings saved before saving was strict may hold them.
    lax = {"url": "http://x", "max_attempts": 4.0, "timeout_seconds": "30"}
    transport = transport_for("acme", {"poll": lax}, state=DictState())
    assert transport is not None
    transport.close()
    with pytest.raises(ValueError, match=r"poll\.max_attempts"):
        transport_for("check", {"poll": lax}, state=DictState(), strict=True)


def test_retry_after_is_read_in_seconds_or_as_an_http_date() -> None:
    now = datetime(2026, 1, 15, 14, 30, tzinfo=UTC)
    assert retry_after_seconds("7", now) == 7
    assert retry_after_seconds("Thu, 15 Jan 2026 14:30:20 GMT", now) == 20
    assert retry_after_seconds("Thu, 15 Jan 2026 14:29:00 GMT", now) == 0
    assert retry_after_seconds("soon", now) is None
    # Finite, however many digits: 400 were logged as `Infinity`, which JSON does not take.
    assert retry_after_seconds("9" * 400, now) == 1e9
    # A digit to str.isdigit, not to float: every fetch crashed while a supplier sent it.
    assert retry_after_seconds("²", now) is None


def test_waits_keep_within_the_longest_backoff_and_a_retry_after_never_shortens_them() -> None:
    """A supplier integrator's walkthrough: the jitter took a wait past
    `max_backoff_seconds`, and `Retry-After: 0` sent every attempt within milliseconds."""
    for retry_after in (None, 0.0):
        waits: list[float] = []

        def failing(retry_after: float | None = retry_after) -> None:
            raise FetchFailed("http_429", retriable=True, retry_after=retry_after)

        policy = RetryPolicy(
            max_attempts=12, backoff_seconds=0.5, max_backoff_seconds=2, sleep=waits.append
        )
        with pytest.raises(FetchFailed):
            policy.run(failing)
        assert len(waits) == 11
        assert all(0.5 <= wait <= 2 for wait in waits), waits
        assert waits[-1] == 2  # the backoff grew to its bound


# The circuit breaker


def test_the_breaker_opens_after_n_failed_fetches_and_skips_fetches_while_open(
    supplier: RestSupplier, http: httpx.Client
) -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=2, cooldown_seconds=60, clock=clock)
    transport = poller(supplier, http, max_attempts=2)
    supplier.faults.fail_next(10)
    for _ in range(2):
        assert state(breaker) == "closed"
        with pytest.raises(FetchFailed, match="http_503"):
            list(breaker.guard(transport.fetch))
    assert state(breaker) == "open"
    assert len(supplier.requests) == 4  # two fetches of two attempts each
    clock.now += 59
    with pytest.raises(CircuitOpen) as skipped:
        list(breaker.guard(transport.fetch))
    assert skipped.value.retry_after == pytest.approx(1)
    assert len(supplier.requests) == 4


def test_after_the_cooldown_one_probe_goes_through_and_its_success_closes_the_breaker(
    supplier: RestSupplier, http: httpx.Client
) -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=1, cooldown_seconds=60, clock=clock)
    transport = poller(supplier, http, max_attempts=1)
    supplier.faults.fail_next()
    with pytest.raises(FetchFailed):
        list(breaker.guard(transport.fetch))
    clock.now += 60
    assert state(breaker) == "half_open"
    probe = breaker.guard(transport.fetch)
    first = next(probe)
    assert not breaker.allow()  # one probe at a time
    assert len([first, *probe]) == 3
    assert state(breaker) == "closed"


def test_a_failed_probe_opens_the_breaker_for_another_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=3, cooldown_seconds=60, clock=clock)
    for _ in range(3):
        breaker.failed()
    clock.now += 60
    assert breaker.allow()
    breaker.failed()
    assert state(breaker) == "open"
    clock.now += 59
    assert not breaker.allow()
    clock.now += 1
    assert state(breaker) == "half_open"


def test_a_probe_its_caller_abandons_counts_for_nothing() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=1, cooldown_seconds=60, clock=clock)
    breaker.failed()
    clock.now += 60
    probe = breaker.guard(lambda: iter([1, 2]))
    assert next(probe) == 1
    probe.close()
    assert (state(breaker), breaker.failures) == ("half_open", 1)
    assert breaker.allow()


# Drop folders


def folder_transport(path: Path, **options: Any) -> Transport:
    """A drop folder's transport; its files are dropped whole (renamed into place), so it
    takes them as soon as they are listed unless told otherwise."""
    settings = {"path": str(path), "format": "csv", "settle_seconds": 0, **options}
    transport = transport_for("acme", {"folder": settings}, state=DictState())
    assert transport is not None
    return transport


def test_a_drop_folder_yields_whole_files_and_ignores_partial_and_hidden_ones(
    tmp_path: Path,
) -> None:
    dropped = drop(tmp_path, "csv", catalogue(3), name="stock.csv")
    (tmp_path / ".stock-2.csv.0123abcd.part").write_bytes(b"supplier_sku,quantity\nSIM-1,")
    (tmp_path / "stock-3.csv.part").write_bytes(b"supplier_sku,quantity\n")
    (tmp_path / "stock-4.csv.filepart").write_bytes(b"supplier_sku,quantity\n")
    (tmp_path / ".stock-hidden.csv").write_bytes(b"supplier_sku,quantity\n")
    [fetched] = folder_transport(tmp_path).fetch()
    assert fetched == Fetched(
        content_id(dropped.read_bytes()),
        dropped.read_bytes(),
        "csv",
        "stock.csv",
        "folder",
        modified=dropped.stat().st_mtime,  # what tells this upload from a later one
    )


def settling(path: Path, monotonic: Clock, **options: Any) -> FolderTransport:
    """A drop folder's transport with the default settle time (2 s)."""
    settings = FolderSettings.model_validate({"path": str(path), "format": "csv", **options})
    return FolderTransport(
        "acme", settings, local_folder(settings), source="folder", monotonic=monotonic
    )


def test_a_file_written_in_place_is_taken_only_once_it_has_been_left_alone(
    tmp_path: Path,
) -> None:
    """A supplier's client that writes under the final name (a copy, SMB, many SFTP
    clients) leaves a file that lists whole only once it is done."""
    monotonic = Clock()  # the monotonic clock
    transport = settling(tmp_path, monotonic)
    written = tmp_path / "stock.csv"
    written.write_bytes(b"supplier_sku,quantity\nSIM-1,12")  # "125" is still to come

    assert list(transport.fetch()) == []  # modified just now
    written.write_bytes(b"supplier_sku,quantity\nSIM-1,125\n")
    old = time.time() - 3
    os.utime(written, (old, old))
    [fetched] = transport.fetch()
    assert fetched.body.endswith(b"SIM-1,125\n")


def test_a_file_from_a_clock_ahead_is_taken_once_it_lists_the_same_for_the_settle_time(
    tmp_path: Path,
) -> None:
    monotonic = Clock()  # the monotonic clock
    transport = settling(tmp_path, monotonic)
    written = tmp_path / "stock.csv"
    written.write_bytes(b"supplier_sku,quantity\nSIM-1,1")
    ahead = time.time() + 3600  # the server's clock runs an hour ahead of ours
    os.utime(written, (ahead, ahead))

    assert list(transport.fetch()) == []
    monotonic.now += 1.5
    written.write_bytes(b"supplier_sku,quantity\nSIM-1,12")  # still being written
    os.utime(written, (ahead + 1, ahead + 1))
    assert list(transport.fetch()) == []
    monotonic.now += 1.5  # 3 s since first listed, but only 1.5 s listing the same
    assert list(transport.fetch()) == []
    monotonic.now += 0.5
    [fetched] = transport.fetch()
    assert fetched.body == b"supplier_sku,quantity\nSIM-1,12"


def unsettled(path: Path, folder: type[LocalFolder]) -> FolderTransport:
    """A drop folder's transport that takes files at once, over a folder of this kind."""
    settings = FolderSettings(path=str(path), format="csv", settle_seconds=0)
    return FolderTransport(
        "acme", settings, lambda: folder(path, path / "processed"), source="folder"
    )


class Growing(LocalFolder):
    """A folder whose file grows between its first listing and reading, once."""

    grown = False

    def read(self, name: str) -> bytes | None:
        if not Growing.grown:
            Growing.grown = True
            with (self.folder / name).open("ab") as file:
                file.write(b"SIM-2,7\n")
        return super().read(name)


def test_a_file_longer_when_read_than_when_listed_is_left_for_a_later_fetch(
    tmp_path: Path,
) -> None:
    Growing.grown = False
    transport = unsettled(tmp_path, Growing)
    (tmp_path / "stock.csv").write_bytes(b"supplier_sku,quantity\nSIM-1,1\n")

    assert list(transport.fetch()) == []  # listed at one length, read at another
    [fetched] = transport.fetch()  # the same at both, the next time
    assert fetched.body == b"supplier_sku,quantity\nSIM-1,1\nSIM-2,7\n"


class Unmovable(LocalFolder):
    """A folder on a read-only account: files cannot be moved aside; `timeless` lists
    no modification times (an FTP server without MLSD)."""

    timeless = False
    reads: list[str] = []

    def files(self) -> list[Entry]:
        listed = super().files()
        return [Entry(e.name, e.size, None) for e in listed] if self.timeless else listed

    def stat(self, name: str) -> Entry | None:
        entry = super().stat(name)
        return Entry(entry.name, entry.size, None) if entry and self.timeless else entry

    def read(self, name: str) -> bytes | None:
        Unmovable.reads.append(name)
        return super().read(name)

    def move(self, name: str, target: str) -> None:
        raise FetchFailed("permission_denied", retriable=False)


@pytest.mark.parametrize("timeless", [False, True])
def test_a_file_that_cannot_be_moved_is_downloaded_again_only_where_it_may_have_changed(
    tmp_path: Path, timeless: bool
) -> None:
    Unmovable.timeless, Unmovable.reads = timeless, []
    transport = unsettled(tmp_path, Unmovable)
    (tmp_path / "stock.csv").write_bytes(b"supplier_sku,quantity\nSIM-1,12\n")
    [fetched] = transport.fetch()
    with pytest.raises(FetchFailed):
        transport.done(fetched)
    again = list(transport.fetch())
    (tmp_path / "stock.csv").write_bytes(b"supplier_sku,quantity\nSIM-1,15\n")  # same length
    rewritten = list(transport.fetch())

    if timeless:  # nothing tells a rewrite from the file listed before: read each time
        assert Unmovable.reads == ["stock.csv"] * 3
        assert [f.body[-3:] for f in again + rewritten] == [b"12\n", b"15\n"]
    else:  # listed as it was: not read again; rewritten (a new time): read
        assert Unmovable.reads == ["stock.csv", "stock.csv"]
        assert again == []
        assert [f.body[-3:] for f in rewritten] == [b"15\n"]


def test_a_processed_file_is_moved_away_and_not_fetched_again(tmp_path: Path) -> None:
    dropped = drop(tmp_path, "csv", catalogue(3), name="stock.csv")
    body = dropped.read_bytes()
    transport = folder_transport(tmp_path)
    assert [f.name for f in pull(transport)] == ["stock.csv"]
    assert not dropped.exists()
    assert (tmp_path / "processed" / "stock.csv").read_bytes() == body
    assert pull(transport) == []


def test_a_later_file_with_the_same_name_is_new_again(tmp_path: Path) -> None:
    transport = folder_transport(tmp_path)
    c = catalogue(3)
    drop(tmp_path, "csv", c, name="stock.csv")
    [first] = pull(transport)
    c.advance(0.5, T0 + timedelta(minutes=5))
    drop(tmp_path, "csv", c, name="stock.csv")
    [second] = pull(transport)
    assert second.delivery_id != first.delivery_id
    digest = second.delivery_id.removeprefix("sha256:")[:16]
    processed = tmp_path / "processed"
    assert {p.name for p in processed.iterdir()} == {"stock.csv", f"stock.{digest}.csv"}
    assert (processed / f"stock.{digest}.csv").read_bytes() == second.body


def test_a_file_rewritten_after_it_was_fetched_is_left_for_the_next_fetch(
    tmp_path: Path,
) -> None:
    transport = folder_transport(tmp_path)
    c = catalogue(3)
    drop(tmp_path, "csv", c, name="stock.csv")
    [stale] = transport.fetch()
    c.advance(0.5, T0 + timedelta(minutes=5))
    rewritten = drop(tmp_path, "csv", c, name="stock.csv").read_bytes()
    transport.done(stale)
    assert (tmp_path / "stock.csv").read_bytes() == rewritten
    [fresh] = pull(transport)
    assert fresh.body == rewritten != stale.body


@pytest.mark.alone
def test_files_matching_the_pattern_are_fetched_oldest_first_and_deleted_when_done(
    tmp_path: Path,
) -> None:
    (tmp_path / "notes.txt").write_text("not a feed")
    for number, name in enumerate(["b.csv", "a.csv", "c.csv"]):
        drop(tmp_path, "csv", catalogue(2), name=name)
        stamp = T0.timestamp() + number
        os.utime(tmp_path / name, (stamp, stamp))
    transport = folder_transport(tmp_path, pattern="*.csv", done_action="delete")
    assert [f.name for f in pull(transport)] == ["b.csv", "a.csv", "c.csv"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# SFTP and FTP


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ACME_FEED_PASSWORD", "feed-pw")
    return "env:ACME_FEED_PASSWORD"


def remote_settings(
    host: str, port: int, password_ref: str | None, **options: Any
) -> dict[str, Any]:
    return {
        "host": host,
        "port": port,
        "username": "acme",
        "password_ref": password_ref,
        "format": "csv",
        "pattern": "*.csv",
        "timeout_seconds": 5,
        "settle_seconds": 0,  # files are dropped whole (see folder_transport)
        **FAST,
        **options,
    }


def pinned(server: SftpSupplier, folder: Path) -> str:
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(server.known_hosts + "\n")
    return str(known_hosts)


def fatal(kind: str, settings: dict[str, Any]) -> FetchFailed:
    """The failure a pull with these settings ends in, checked to be fatal: reported at
    once, without retries."""
    transport = transport_for("acme", {kind: settings}, state=DictState())
    assert transport is not None
    started = time.monotonic()
    with pytest.raises(FetchFailed) as failed:
        pull(transport)
    assert failed.value.retriable is False
    assert time.monotonic() - started < 1
    return failed.value


def test_an_sftp_pull_fetches_new_files_once_and_moves_them(tmp_path: Path, password: str) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    body = drop(remote, "csv", catalogue(5), name="stock-1.csv").read_bytes()
    (remote / ".stock-2.csv.0123abcd.part").write_bytes(b"supplier_sku,")
    with SftpSupplier(remote, username="acme", password="feed-pw") as server:
        settings = remote_settings(
            server.host, server.port, password, known_hosts=pinned(server, tmp_path)
        )
        transport = transport_for("acme", {"sftp": settings}, state=DictState())
        assert transport is not None
        [fetched] = pull(transport)
        assert pull(transport) == []
        second = drop(remote, "csv", catalogue(7), name="stock-2.csv")
        [later] = pull(transport)
        transport.close()
    assert (fetched.name, fetched.source, fetched.body) == ("stock-1.csv", "sftp", body)
    assert later.body == (remote / "processed" / "stock-2.csv").read_bytes()
    assert not second.exists()
    assert {p.name for p in (remote / "processed").iterdir()} == {"stock-1.csv", "stock-2.csv"}


def test_an_sftp_pull_takes_a_file_written_in_place_once_it_has_settled(
    tmp_path: Path, password: str
) -> None:
    """By the modification time the server lists (the default settle time, 2 s)."""
    remote = tmp_path / "remote"
    remote.mkdir()
    written = remote / "stock.csv"
    written.write_bytes(b"supplier_sku,quantity\nSIM-1,12")  # still being written
    with SftpSupplier(remote, username="acme", password="feed-pw") as server:
        settings = remote_settings(
            server.host, server.port, password, known_hosts=pinned(server, tmp_path)
        )
        del settings["settle_seconds"]
        transport = transport_for("acme", {"sftp": settings}, state=DictState())
        assert transport is not None
        assert pull(transport) == []  # listed as modified just now
        written.write_bytes(b"supplier_sku,quantity\nSIM-1,125\n")
        old = time.time() - 3
        os.utime(written, (old, old))
        [fetched] = pull(transport)
        transport.close()
    assert fetched.body == b"supplier_sku,quantity\nSIM-1,125\n"


@pytest.mark.alone
def test_an_sftp_server_with_another_host_key_is_refused_without_retries(
    tmp_path: Path, password: str
) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    with SftpSupplier(tmp_path, username="acme", password="feed-pw") as server:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"[{server.host}]:{server.port} {other}")
        settings = remote_settings(server.host, server.port, password, known_hosts=str(known_hosts))
        failure = fatal("sftp", settings)
    assert failure.reason.startswith("host_key_not_verifiable")


def key_file(folder: Path, key: asyncssh.SSHKey, passphrase: str | None = None) -> str:
    """A private key in a file, OpenSSH format, as a secret reference. Encrypted with 16
    bcrypt rounds, not ssh-keygen's 128: reading it (or failing to, with a wrong
    passphrase) then takes ~0.13 s here instead of ~1 s, which left a refusal no time to
    show it came at once."""
    path = folder / "id_ed25519"
    path.write_bytes(
        key.export_private_key("openssh", passphrase, rounds=16, ignore_few_rounds=True)
    )
    return f"file:{path}"


@pytest.mark.parametrize("passphrase", [None, "key-pass"])
def test_an_sftp_pull_logs_in_with_a_private_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passphrase: str | None
) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    body = drop(remote, "csv", catalogue(3), name="stock-1.csv").read_bytes()
    key = asyncssh.generate_private_key("ssh-ed25519")
    options: dict[str, Any] = {"private_key_ref": key_file(tmp_path, key, passphrase)}
    if passphrase is not None:
        monkeypatch.setenv("ACME_KEY_PASSPHRASE", passphrase)
        options["private_key_passphrase_ref"] = "env:ACME_KEY_PASSPHRASE"
    public = key.export_public_key().decode()
    # No password on the server: only the key can log in.
    with SftpSupplier(remote, username="acme", authorized_keys=[public]) as server:
        settings = remote_settings(
            server.host, server.port, None, known_hosts=pinned(server, tmp_path), **options
        )
        transport = transport_for("acme", {"sftp": settings}, state=DictState())
        assert transport is not None
        [fetched] = pull(transport)
        transport.close()
    assert fetched.body == body == (remote / "processed" / "stock-1.csv").read_bytes()


@pytest.mark.alone
def test_an_sftp_key_the_server_does_not_authorize_is_refused_without_retries(
    tmp_path: Path, password: str
) -> None:
    authorized = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    other = asyncssh.generate_private_key("ssh-ed25519")
    with SftpSupplier(tmp_path, username="acme", authorized_keys=[authorized]) as server:
        settings = remote_settings(
            server.host,
            server.port,
            None,
            known_hosts=pinned(server, tmp_path),
            private_key_ref=key_file(tmp_path, other),
        )
        failure = fatal("sftp", settings)
    assert failure.reason.startswith("auth_failed")


@pytest.mark.alone
def test_a_private_key_that_cannot_be_read_fails_the_pull_without_showing_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    reference = key_file(tmp_path, key, "the-right-one")
    monkeypatch.setenv("ACME_KEY_PASSPHRASE", "a-wrong-one")
    public = key.export_public_key().decode()
    with SftpSupplier(tmp_path, username="acme", authorized_keys=[public]) as server:
        settings = remote_settings(
            server.host,
            server.port,
            None,
            known_hosts=pinned(server, tmp_path),
            private_key_ref=reference,
            private_key_passphrase_ref="env:ACME_KEY_PASSPHRASE",
        )
        failure = fatal("sftp", settings)
    assert failure.reason.startswith(f"private_key_unreadable: {reference}")
    assert "PRIVATE KEY" not in failure.reason


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({}, "needs private_key_ref or password_ref"),
        (
            {"password_ref": "env:P", "private_key_passphrase_ref": "env:X"},
            "passphrase_ref without",
        ),
    ],
)
def test_sftp_settings_without_a_login_are_refused(options: dict[str, Any], problem: str) -> None:
    settings = {**remote_settings("127.0.0.1", 22, None, known_hosts=None), **options}
    with pytest.raises(ValueError, match="bad_option") as refused:
        transport_for("acme", {"sftp": settings}, state=DictState())
    assert problem in str(refused.value)


def test_an_ftp_pull_fetches_new_files_once_and_moves_them(tmp_path: Path, password: str) -> None:
    body = drop(tmp_path, "csv", catalogue(5), name="stock-1.csv").read_bytes()
    (tmp_path / ".stock-2.csv.0123abcd.part").write_bytes(b"supplier_sku,")
    with FtpSupplier(tmp_path, username="acme", password="feed-pw") as server:
        settings = remote_settings(server.host, server.port, password)
        transport = transport_for("acme", {"ftp": settings}, state=DictState())
        assert transport is not None
        fetched = list(transport.fetch())  # all fetched first: each done() has its own session
        for delivery in fetched:
            transport.done(delivery)
        assert pull(transport) == []
        drop(tmp_path, "csv", catalogue(5), name="stock-1.csv")  # the same name, the same body
        [again] = pull(transport)
    [only] = fetched
    assert (only.name, only.source, only.body) == ("stock-1.csv", "ftp", body)
    assert again.delivery_id == only.delivery_id
    digest = only.delivery_id.removeprefix("sha256:")[:16]
    assert {p.name for p in (tmp_path / "processed").iterdir()} == {
        "stock-1.csv",
        f"stock-1.{digest}.csv",
    }


def test_an_ftp_pull_moves_files_into_a_processed_folder_of_several_levels(
    tmp_path: Path, password: str
) -> None:
    # FTP's MKD makes one level: every file failed to move (550) and stayed in the folder,
    # where SFTP and a local folder made each level (a walkthrough).
    body = drop(tmp_path, "csv", catalogue(5), name="stock-1.csv").read_bytes()
    with FtpSupplier(tmp_path, username="acme", password="feed-pw") as server:
        settings = remote_settings(
            server.host, server.port, password, processed_path="done/2026-12"
        )
        transport = transport_for("acme", {"ftp": settings}, state=DictState())
        assert transport is not None
        [fetched] = pull(transport)
        assert pull(transport) == []
    assert fetched.body == body
    assert (tmp_path / "done" / "2026-12" / "stock-1.csv").read_bytes() == body
    assert not (tmp_path / "stock-1.csv").exists()


def test_an_ftp_server_without_mlsd_is_listed_with_nlst(
    tmp_path: Path, password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unknown_command(*args: object, **kwargs: object) -> Iterator[tuple[str, dict[str, str]]]:
        raise ftplib.error_perm("500 Command MLSD not understood.")

    monkeypatch.setattr(ftplib.FTP, "mlsd", unknown_command)
    body = drop(tmp_path, "csv", catalogue(5), name="stock-1.csv").read_bytes()
    with FtpSupplier(tmp_path, username="acme", password="feed-pw") as server:
        settings = remote_settings(server.host, server.port, password)
        transport = transport_for("acme", {"ftp": settings}, state=DictState())
        assert transport is not None
        [fetched] = pull(transport)
        assert pull(transport) == []
    assert fetched.body == body == (tmp_path / "processed" / "stock-1.csv").read_bytes()


@pytest.mark.alone
def test_an_ftp_login_refused_is_fatal(tmp_path: Path, password: str) -> None:
    with FtpSupplier(tmp_path, username="acme", password="another") as server:
        settings = remote_settings(server.host, server.port, password)
        failure = fatal("ftp", settings)
    assert failure.reason.startswith("ftp_refused: 530")


@pytest.mark.parametrize("reuse", [False, True], ids=["any-session", "session-reuse-required"])
def test_an_ftps_pull_logs_in_and_transfers_over_tls(
    tmp_path: Path, password: str, reuse: bool
) -> None:
    """Also from a server that, like vsftpd by default, refuses a data connection that
    does not resume the control connection's TLS session (listing and each transfer)."""
    remote = tmp_path / "remote"
    remote.mkdir()
    body = drop(remote, "csv", catalogue(4), name="stock-1.csv").read_bytes()
    other = drop(remote, "csv", catalogue(6), name="stock-2.csv").read_bytes()
    with FtpSupplier(
        remote, username="acme", password="feed-pw", tls=True, require_session_reuse=reuse
    ) as server:
        trusted = tmp_path / "supplier-ca.pem"
        trusted.write_text(server.certificate)
        settings = remote_settings(
            server.host, server.port, password, tls=True, ca_file=str(trusted)
        )
        transport = transport_for("acme", {"ftp": settings}, state=DictState())
        assert transport is not None
        fetched = pull(transport)  # a listing and two transfers in one session
        assert pull(transport) == []
    assert [(f.name, f.source, f.body) for f in fetched] == [
        ("stock-1.csv", "ftp", body),
        ("stock-2.csv", "ftp", other),
    ]
    assert (remote / "processed" / "stock-1.csv").read_bytes() == body


def test_a_server_requiring_session_reuse_refuses_the_standard_library_s_client(
    tmp_path: Path,
) -> None:
    """The simulator refuses what vsftpd refuses, so the test above shows the client
    resumes its session: ftplib's own FTP_TLS, which does not, is turned away with 522."""
    drop(tmp_path, "csv", catalogue(4), name="stock-1.csv")
    with FtpSupplier(
        tmp_path, username="acme", password="feed-pw", tls=True, require_session_reuse=True
    ) as server:
        trusted = tmp_path / "supplier-ca.pem"
        trusted.write_text(server.certificate)
        client = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=str(trusted)))
        try:
            client.connect(server.host, server.port)
            client.login("acme", "feed-pw")
            client.prot_p()
            with pytest.raises(ftplib.error_perm, match=r"^522"):
                client.nlst()
        finally:
            client.close()


@pytest.mark.alone
def test_an_ftps_certificate_not_trusted_is_refused_without_retries(
    tmp_path: Path, password: str
) -> None:
    with FtpSupplier(tmp_path, username="acme", password="feed-pw", tls=True) as server:
        # No ca_file: the system's authorities, which never signed this certificate.
        settings = remote_settings(server.host, server.port, password, tls=True)
        failure = fatal("ftp", settings)
    assert failure.reason.startswith("tls_certificate_not_verified")


@pytest.mark.alone
def test_plain_ftp_to_a_server_that_requires_tls_is_refused(tmp_path: Path, password: str) -> None:
    with FtpSupplier(tmp_path, username="acme", password="feed-pw", tls=True) as server:
        settings = remote_settings(server.host, server.port, password)
        failure = fatal("ftp", settings)
    assert failure.reason.startswith("ftp_refused")


def test_a_ca_file_without_tls_is_refused() -> None:
    settings = remote_settings("127.0.0.1", 21, "env:X", ca_file="/etc/ssl/certs/x.pem")
    with pytest.raises(ValueError, match=r"bad_option: .*ca_file is for FTPS"):
        transport_for("acme", {"ftp": settings}, state=DictState())


def test_a_server_that_does_not_answer_is_retried_then_reported_retriable(
    tmp_path: Path, password: str
) -> None:
    with FtpSupplier(tmp_path, username="acme", password="feed-pw") as server:
        port = server.port
    settings = remote_settings("127.0.0.1", port, password, max_attempts=2)
    transport = transport_for("acme", {"ftp": settings}, state=DictState())
    assert transport is not None
    with pytest.raises(FetchFailed) as failed:
        pull(transport)
    assert failed.value.reason.startswith("connection_error")
    assert failed.value.retriable is True


@pytest.mark.parametrize("kind", ["folder", "ftp", "sftp"])
def test_a_file_past_max_file_bytes_is_refused_not_read_whole(
    kind: str, tmp_path: Path, password: str
) -> None:
    """Found by a security review: a folder's, an FTP or SFTP server's file was read whole,
    however large (a hostile server could serve one without end, in the API process). It
    is passed over, and the files behind it taken (see test_file_refusals)."""
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "huge.csv").write_bytes(b"supplier_sku,quantity\n" + b"SIM-1,1\n" * 200)
    limit = {"max_file_bytes": 1000}
    with contextlib.ExitStack() as running:
        if kind == "folder":
            settings: dict[str, Any] = {"path": str(remote), "format": "csv", "settle_seconds": 0}
        elif kind == "ftp":
            server = running.enter_context(FtpSupplier(remote, username="acme", password="feed-pw"))
            settings = remote_settings(server.host, server.port, password)
        else:
            sftp = running.enter_context(SftpSupplier(remote, username="acme", password="feed-pw"))
            settings = remote_settings(
                sftp.host, sftp.port, password, known_hosts=pinned(sftp, tmp_path)
            )
        transport = transport_for("acme", {kind: {**settings, **limit}}, state=DictState())
        assert transport is not None
        assert pull(transport) == []
        [(name, why)] = transport.refused.items()
        transport.close()
    assert (name, why) == ("huge.csv", "file_too_large: 1622 bytes, over 1000")
    assert (remote / "huge.csv").exists()  # left where it was, for a person to look at


def test_a_drop_folder_never_reads_through_a_link(tmp_path: Path) -> None:
    """Found by a security review: a file swapped for a link between the listing (which
    takes regular files only) and the read was read through the link."""
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("not the supplier's")
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "stock.csv").symlink_to(secret)
    session = LocalFolder(folder, folder / "processed")
    assert session.files() == []
    assert session.read("stock.csv") is None  # as a file gone since it was listed


@pytest.mark.parametrize("processed", ["processed", "done/2026"])
def test_a_drop_folder_never_moves_files_through_a_link_planted_in_it(
    tmp_path: Path, processed: str
) -> None:
    """A security walkthrough: a link planted at `processed` (any level of it inside the
    drop folder) had the files moved into the folder it named, one the service could
    write to, under names and with content the supplier chose."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / processed.split("/")[0]).symlink_to(elsewhere, target_is_directory=True)
    (folder / "stock.csv").write_text("sku,quantity\nA,1\n")
    session = LocalFolder(folder, folder / processed)

    with pytest.raises(FetchFailed) as refused:
        session.move("stock.csv", "stock.csv")
    with pytest.raises(FetchFailed):
        session.processed("stock.csv")

    assert refused.value.reason.startswith("processed_not_a_folder: ")
    assert not refused.value.retriable
    assert list(elsewhere.iterdir()) == []
    assert (folder / "stock.csv").exists()


@pytest.mark.parametrize("spelt", ["folder-through-a-link", "processed-through-a-link"])
def test_a_link_planted_in_the_drop_folder_is_refused_however_the_paths_are_spelt(
    tmp_path: Path, spelt: str
) -> None:
    """A walkthrough: the drop folder named through a link, and the processed folder by its
    real path (or the other way round), were taken for two folders apart, and the link
    planted at `processed` was followed."""
    real = tmp_path / "drop"
    real.mkdir()
    named = tmp_path / "drop-link"
    named.symlink_to(real, target_is_directory=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (real / "processed").symlink_to(elsewhere, target_is_directory=True)
    (real / "stock.csv").write_text("sku,quantity\nA,1\n")
    if spelt == "folder-through-a-link":
        session = LocalFolder(named, real / "processed")
    else:
        session = LocalFolder(real, named / "processed")

    with pytest.raises(FetchFailed) as refused:
        session.move("stock.csv", "stock.csv")

    assert refused.value.reason.startswith("processed_not_a_folder: ")
    assert list(elsewhere.iterdir()) == []


def test_a_processed_path_going_up_goes_up_from_where_the_drop_folder_really_is(
    tmp_path: Path,
) -> None:
    """A review: `..` was taken from how the path was spelt, so that through a linked drop
    folder `../processed` went to another folder than the kernel's (and the code before's)."""
    real = tmp_path / "real" / "drop"
    real.mkdir(parents=True)
    (tmp_path / "pub").mkdir()
    named = tmp_path / "pub" / "drop"
    named.symlink_to(real, target_is_directory=True)
    (real / "stock.csv").write_text("sku,quantity\nA,1\n")

    LocalFolder(named, named / ".." / "processed").move("stock.csv", "stock.csv")

    assert (tmp_path / "real" / "processed" / "stock.csv").exists()
    assert not (tmp_path / "pub" / "processed").exists()


def test_a_drop_folder_under_a_folder_the_service_may_pass_but_not_list_moves_its_files() -> None:
    """A review: each level above the processed folder was opened to be read, which a
    folder the service may pass through (`--x`) but not list refuses: every move failed."""
    top = Path(tempfile.mkdtemp(prefix="ledger-pass-only-"))
    try:
        os.chmod(top, 0o711)
        passing = top / "service"  # the service may pass through, not list
        passing.mkdir()
        drop = passing / "drop"
        drop.mkdir()
        (drop / "stock.csv").write_text("sku,quantity\nA,1\n")
        program = (
            "import os, sys\n"
            "from pathlib import Path\n"
            "from connectors.transports.folder import LocalFolder\n"
            "if os.geteuid() == 0:  # root passes any permission: as another user\n"
            "    os.setgid(65534)\n"
            "    os.setuid(65534)\n"
            "drop = Path(sys.argv[1])\n"
            "LocalFolder(drop, drop / 'processed').move('stock.csv', 'stock.csv')\n"
        )
        if os.geteuid() == 0:
            os.chown(drop, 65534, 65534)
            os.chown(drop / "stock.csv", 65534, 65534)
        os.chmod(passing, 0o311 if os.geteuid() != 0 else 0o711)
        ran = subprocess.run(
            [sys.executable, "-c", program, str(drop)], capture_output=True, text=True
        )
        os.chmod(passing, 0o755)

        assert ran.returncode == 0, ran.stderr
        assert (drop / "processed" / "stock.csv").exists()
    finally:
        if (top / "service").exists():
            os.chmod(top / "service", 0o755)
        shutil.rmtree(top)


def test_a_drop_folder_moves_files_into_a_processed_folder_inside_or_outside_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    outside = tmp_path / "admin" / "done"
    for processed in (folder / "done" / "2026", outside):
        (folder / "stock.csv").write_text("sku,quantity\nA,1\n")
        session = LocalFolder(folder, processed)
        assert not session.processed("stock.1.csv")
        session.move("stock.csv", "stock.1.csv")
        assert session.processed("stock.1.csv")
        assert (processed / "stock.1.csv").read_text() == "sku,quantity\nA,1\n"
        assert not (folder / "stock.csv").exists()


class _Dripping(BaseHTTPRequestHandler):
    """A page whose body comes a byte every 0.1 s (each read well within a timeout)."""

    def do_GET(self) -> None:
        body = b'{"items": [' + b" " * 40 + b"]}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for byte in body:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.1)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.mark.alone
def test_a_body_sent_a_byte_at_a_time_is_cut_off_at_the_attempt_s_timeout() -> None:
    """Found by a supplier integrator's walkthrough: httpx's timeout bounds each read, and
    a page sent a byte a second held one attempt of a 3 s timeout for 77 s."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dripping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/inventory"
    settings = {"url": url, **FAST, "timeout_seconds": 0.5, "max_attempts": 1}
    try:
        with httpx.Client() as client:
            transport = transport_for("acme", {"poll": settings}, state=DictState(), client=client)
            assert transport is not None
            started = time.monotonic()
            with pytest.raises(FetchFailed) as failed:
                pull(transport)
            took = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    assert failed.value.reason.startswith("timeout")
    assert took < 2  # the whole body takes 4.3 s


def test_a_known_hosts_file_that_is_none_is_refused_without_quoting_it(tmp_path: Path) -> None:
    """asyncssh's refusal quoted the file's first line into feed health and the log: an
    admin could show auditors the first line of any file on the host (a security review)."""
    from connectors.transports.sftp import _known_hosts

    path = tmp_path / "not-known-hosts"
    path.write_text("TopSecretSftpPassw0rd\n")
    with pytest.raises(FetchFailed) as failed:
        _known_hosts(str(path))

    assert str(failed.value) == f"known_hosts_unreadable: {path}: not a known_hosts file"
    assert not failed.value.retriable
