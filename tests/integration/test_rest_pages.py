"""REST polling against a supplier whose pages each carry their own ETag, as HTTP has it.

Found by an integrator's walkthrough of quirky REST suppliers: only the first page was
asked conditionally and its 304 ended the poll, so a change on page 2 was never read; a
304 recorded no report, so a feed with ETags turned stale where the same feed without
them did not; validators saved under settings that could not read the pages kept them
unread once mended; an empty page, or an error object, ended a poll as complete; a
cursor of "" or a number failed the poll and dropped the page that carried it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from api.runtime import Runtime
from connectors.scheduler import Scheduler
from connectors.transports import Fetched, FetchFailed, Transport, transport_for
from connectors.worker import InboxWorker
from ledger.commands import PutMappings, PutSupplier
from ledger.mapping import MappingSpec
from ledger.stock import StockItem
from ledger.supplier import SupplierTerms
from tests.integration.ledger_setup import CAUSE
from tests.integration.test_transports import DictState


@dataclass
class Asked:
    query: dict[str, str]
    conditional: bool
    status: int


@dataclass
class PagedSupplier:
    """Pages by the value of one query parameter (`page`, `offset` or `cursor`, none for
    the first), each a JSON document with an ETag of its own content."""

    key: str = "page"
    pages: dict[str | None, dict[str, Any]] = field(default_factory=dict)
    asked: list[Asked] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, path: str, if_none_match: str | None) -> tuple[int, dict[str, str], bytes]:
        query = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
        with self.lock:
            document = self.pages.get(query.get(self.key))
            if document is None:
                self.asked.append(Asked(query, if_none_match is not None, 404))
                return 404, {}, b"{}"
            body = json.dumps(document).encode()
            etag = f'"{hash(body) & 0xFFFFFFFF:x}"'
            status = 304 if if_none_match == etag else 200
            self.asked.append(Asked(query, if_none_match is not None, status))
        return status, {"ETag": etag}, b"" if status == 304 else body


def serve(supplier: PagedSupplier) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = supplier.answer(self.path, self.headers.get("If-None-Match"))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if status != 304:
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/stock"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def paged() -> PagedSupplier:
    return PagedSupplier()


@pytest.fixture
def url(paged: PagedSupplier) -> Iterator[str]:
    yield from serve(paged)


def poller(url: str, state: DictState, pagination: str = "page", **options: Any) -> Transport:
    connector = {"poll": {"url": url, "pagination": pagination, "page_size": 2}, **options}
    transport = transport_for("quirky", connector, state=state, client=httpx.Client())
    assert transport is not None
    return transport


def pull(transport: Transport, fetched: list[Fetched] | None = None) -> list[Fetched]:
    """Each delivery, marked done once held, as the scheduler does; into `fetched`, so that
    a poll that fails part-way shows what it had yielded."""
    fetched = [] if fetched is None else fetched
    for delivery in transport.fetch():
        fetched.append(delivery)
        transport.done(delivery)
    return fetched


def items(pages: list[Fetched]) -> list[str]:
    return [item["sku"] for page in pages for item in json.loads(page.body)["items"]]


def three_pages(paged: PagedSupplier) -> None:
    paged.pages = {
        "1": {"page": 1, "total_pages": 3, "items": [{"sku": "A", "qty": 1}]},
        "2": {"page": 2, "total_pages": 3, "items": [{"sku": "B", "qty": 2}]},
        "3": {"page": 3, "total_pages": 3, "items": [{"sku": "C", "qty": 3}]},
    }


def statuses(paged: PagedSupplier) -> list[tuple[str | None, bool, int]]:
    return [(a.query.get(paged.key), a.conditional, a.status) for a in paged.asked]


# Conditional requests, page by page


def test_a_change_on_a_later_page_is_read_and_the_unchanged_pages_cost_a_304_each(
    paged: PagedSupplier, url: str
) -> None:
    three_pages(paged)
    state = DictState()
    assert items(pull(poller(url, state))) == ["A", "B", "C"]
    paged.pages["2"]["items"][0]["qty"] = 20
    paged.asked.clear()

    again = pull(poller(url, state))

    assert items(again) == ["B"]
    assert json.loads(again[0].body)["items"][0]["qty"] == 20
    assert statuses(paged) == [("1", True, 304), ("2", True, 200), ("3", True, 304)]
    paged.asked.clear()
    assert pull(poller(url, state)) == []  # the change is now what was last read
    assert statuses(paged) == [("1", True, 304), ("2", True, 304), ("3", True, 304)]


def test_validators_saved_under_other_reading_settings_are_not_sent(
    paged: PagedSupplier, url: str
) -> None:
    three_pages(paged)
    state = DictState()
    pull(poller(url, state, options={"records": "data.rows"}))  # a wrong path, say
    paged.asked.clear()

    mended = pull(poller(url, state))

    assert items(mended) == ["A", "B", "C"]
    assert statuses(paged) == [("1", False, 200), ("2", False, 200), ("3", False, 200)]
    paged.asked.clear()
    assert pull(poller(url, state, schedule={"interval_seconds": 5})) == []  # not reading


def test_validators_are_used_for_the_refresh_time_after_a_full_poll_then_all_is_read_again(
    paged: PagedSupplier, url: str
) -> None:
    three_pages(paged)
    state = DictState()
    now = [1000.0]

    def polled() -> list[Fetched]:
        transport = poller(url, state)
        transport.refresh_seconds = 60.0  # type: ignore[attr-defined]
        transport.now = lambda: now[0]  # type: ignore[attr-defined]
        paged.asked.clear()
        return pull(transport)

    assert len(polled()) == 3
    now[0] += 30
    paged.pages["2"]["items"][0]["qty"] = 20
    assert items(polled()) == ["B"]  # a partial poll: the full one stays at 1000
    now[0] += 29
    assert polled() == []
    now[0] += 1  # 60 s after the full poll: every page in full, unasked
    assert items(polled()) == ["A", "B", "C"]
    assert {conditional for _, conditional, _ in statuses(paged)} == {False}
    now[0] += 59
    assert polled() == []


def test_validators_saved_before_they_were_kept_per_page_are_not_used(
    paged: PagedSupplier, url: str
) -> None:
    three_pages(paged)
    state = DictState()
    state.set("poll.validators", {"url": url, "etag": '"x"', "last_modified": None})
    assert len(pull(poller(url, state))) == 3
    assert statuses(paged) == [("1", False, 200), ("2", False, 200), ("3", False, 200)]


# How a poll ends


def test_an_empty_page_before_the_last_is_followed_by_the_next(
    paged: PagedSupplier, url: str
) -> None:
    three_pages(paged)
    paged.pages["2"]["items"] = []
    state = DictState()
    assert items(pull(poller(url, state))) == ["A", "C"]
    assert state.get("poll.validators") is not None


def test_an_error_object_for_a_page_fails_the_poll_instead_of_ending_it(
    paged: PagedSupplier, url: str
) -> None:
    three_pages(paged)
    paged.pages["2"] = {"error": "internal", "items": []}
    state = DictState()
    transport = poller(url, state)
    taken: list[Fetched] = []
    with pytest.raises(FetchFailed) as failed:
        pull(transport, taken)
    assert failed.value.reason.startswith("malformed_page: page is missing")
    assert len(taken) == 2  # page 1, and the error's own page (no records)
    assert state.get("poll.validators") is None  # not complete: asked in full next time


def test_an_empty_offset_page_before_the_total_fails_the_poll() -> None:
    paged_offsets = PagedSupplier(key="offset")
    paged_offsets.pages = {
        "0": {"offset": 0, "total": 4, "items": [{"sku": "A"}, {"sku": "B"}]},
        "2": {"offset": 2, "total": 4, "items": []},
    }
    for served in serve(paged_offsets):
        with pytest.raises(FetchFailed) as failed:
            pull(poller(served, DictState(), "offset"))
    assert failed.value.reason == "malformed_page: an empty page at offset 2 of 4"


@pytest.mark.parametrize(
    ("last", "ends"),
    [("", True), (None, True), (7, False), ("abc", False)],
)
def test_a_cursor_ends_on_null_or_empty_and_may_be_a_number(last: Any, ends: bool) -> None:
    cursors = PagedSupplier(key="cursor")
    cursors.pages = {
        None: {"items": [{"sku": "A"}], "next_cursor": last},
        str(last): {"items": [{"sku": "B"}], "next_cursor": None},
    }
    for served in serve(cursors):
        pages = pull(poller(served, DictState(), "cursor"))
    assert items(pages) == (["A"] if ends else ["A", "B"])


def test_a_page_whose_next_cursor_cannot_be_read_is_kept_and_the_poll_fails() -> None:
    cursors = PagedSupplier(key="cursor")
    cursors.pages = {None: {"items": [{"sku": "A"}], "next_cursor": {"token": "x"}}}
    taken: list[Fetched] = []
    for served in serve(cursors):
        transport = poller(served, DictState(), "cursor")
        with pytest.raises(FetchFailed) as failed:
            pull(transport, taken)
    assert failed.value.reason.startswith("malformed_page: next_cursor is neither")
    assert items(taken) == ["A"]


# A feed answered 304 stays as fresh as one answered 200


def test_a_feed_answered_304_is_read_in_full_in_time_to_keep_its_levels_fresh(
    ledger: Runtime, paged: PagedSupplier, url: str
) -> None:
    """Undated records are observed when they arrive; a 304 records nothing, so with a
    staleness limit of 4 s the feed is read in full at least each second."""
    paged.pages = {"1": {"page": 1, "total_pages": 1, "items": [{"sku": "A", "qty": 5}]}}
    at = datetime.now(UTC)
    connector = {
        "poll": {"url": url, "pagination": "page"},
        "format": "json",
        "schedule": {"interval_seconds": 0.2, "jitter": 0},
    }
    terms = SupplierTerms("quirky", stale_after_seconds=4, connector=connector)
    ledger.writer.execute(PutSupplier(at=at, cause=CAUSE, supplier_id="quirky", terms=terms))
    outcome = ledger.writer.execute(
        PutMappings(at=at, cause=CAUSE, supplier_id="quirky", mappings=[MappingSpec("A", "Q-A", 1)])
    )
    for view in ("stock", "mappings"):
        ledger.views.wait_for(view, outcome.position, timeout=10)
    worker = InboxWorker(ledger.ingestor, ledger.store)
    scheduler = Scheduler(ledger.store, ledger.leases, worker, tick_seconds=0.05)

    def observed() -> datetime | None:
        item = ledger.app.repository.get(StockItem.id_for("Q-A"))
        position = item.positions.get("quirky")
        return None if position is None else position.observed_at

    first: datetime | None = None
    deadline = time.monotonic() + 15
    while True:
        scheduler.tick()
        while worker.work_once():
            pass
        first = first or observed()
        latest = observed()
        if first and latest and latest - first >= timedelta(seconds=2):
            break
        assert time.monotonic() < deadline, (first, latest, statuses(paged))
        time.sleep(0.1)
    assert ("1", True, 304) in statuses(paged)  # the validators were used meanwhile


def test_a_supplier_s_shorter_limit_sets_the_refresh_and_a_change_keeps_its_schedule(
    ledger: Runtime, url: str
) -> None:
    """Found by a review: a supplier with only `exclude_after_seconds` kept its validators
    for good, and went off sale; a changed limit rebuilt the schedule, closing an open
    breaker and fetching at once."""
    connector = {"poll": {"url": url, "pagination": "page"}, "format": "json"}

    def put(**limits: int) -> None:
        terms = SupplierTerms("quirky", connector=connector, **limits)
        done = ledger.writer.execute(
            PutSupplier(at=datetime.now(UTC), cause=CAUSE, supplier_id="quirky", terms=terms)
        )
        ledger.views.wait_for("stock", done.position, timeout=10)

    put(exclude_after_seconds=400)
    scheduler = Scheduler(ledger.store, ledger.leases)
    scheduler.refresh()
    schedule = scheduler.schedules["quirky"]
    assert schedule.refresh == 100.0
    assert schedule.transport.refresh_seconds == 100.0
    for _ in range(5):
        schedule.breaker.failed()
    assert schedule.breaker.state == "open"

    put(stale_after_seconds=40, exclude_after_seconds=400)
    scheduler.refresh()

    assert scheduler.schedules["quirky"] is schedule
    assert (schedule.refresh, schedule.transport.refresh_seconds) == (10.0, 10.0)
    assert schedule.breaker.state == "open"
