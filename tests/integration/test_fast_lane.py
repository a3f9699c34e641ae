"""The fast lanes (api.fastlane) answer exactly as FastAPI's routes would.

Every order or read is sent over HTTP to two servers on one ledger: one with the lanes,
one without. Their answers must match; the reservation lane must answer itself the orders
the route would send to the writer, the read lane the reads the route would answer from
the in-process copy of the stock view, and each must hand every other request on to the
app behind it.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.types import Receive, Scope, Send

from api import fastlane
from api.app import create_app
from api.deps import oms_write, read
from api.fastlane import PATH, ReadLane, ReserveLane
from api.routers import availability, reservations
from api.runtime import Runtime, open_runtime
from api.settings import Settings
from api.transport import JoiningHttpToolsProtocol
from projections.entries import Snapshot
from tests.conftest import make_settings
from tests.integration.ledger_setup import stock_sku
from tests.integration.served_http import counting, served

OMS = {"Authorization": "Bearer test-oms"}
SHOP = {"Authorization": "Bearer test-shop"}
# Fields that differ between two orders taken alike.
OWN = ("reservation_id", "created_at", "expires_at")
ORDER = b'{"order_id": "o", "lines": [{"sku": "S", "quantity": 1}]}'


class Lanes:
    """Clients of the two servers, and how many requests the lane handed on."""

    def __init__(
        self, lane: FastAPI, lane_url: str, route_url: str, kind: type = ReserveLane
    ) -> None:
        self.app = lane
        self.lane = httpx.Client(base_url=lane_url)
        self.route = httpx.Client(base_url=route_url)
        self.handed_on = 0
        layer = lane.middleware_stack
        while not isinstance(layer, kind):
            layer = layer.app  # type: ignore[union-attr]
        behind = layer.app

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            self.handed_on += 1
            await behind(scope, receive, send)

        layer.app = counted

    def both(self, body: bytes, **headers: str | None) -> dict[str, Any]:
        """Posts the order to both apps (each with its own Idempotency-Key suffix if one
        is given; a header given as None is not sent) and compares the answers; the
        lane's body is returned."""
        given = {"Content-Type": "application/json", **OMS, **headers}
        sent = {name: value for name, value in given.items() if value is not None}
        answers = []
        for client, suffix in ((self.lane, "-lane"), (self.route, "-route")):
            mine = dict(sent)
            if "Idempotency-Key" in mine and mine["Idempotency-Key"].startswith("own:"):
                mine["Idempotency-Key"] = mine["Idempotency-Key"][4:] + suffix
            answers.append(client.post("/v1/reservations", content=body, headers=mine))
        return _same(*answers)

    def read_both(self, path: str, **headers: str) -> httpx.Response:
        """GETs the path from both apps (shop key unless told) and compares the answers;
        the lane's is returned."""
        sent = {**SHOP, **headers}
        lane, route = (client.get(path, headers=sent) for client in (self.lane, self.route))
        assert lane.status_code == route.status_code, (lane.text, route.text)
        for header in ("content-type", "x-ledger-position", "www-authenticate"):
            assert lane.headers.get(header) == route.headers.get(header), header
        assert "x-request-id" in lane.headers
        assert _timeless(lane.json()) == _timeless(route.json())
        return lane


def _timeless(body: Any) -> Any:
    """An answer without the ages of supplier reports, which move with the clock."""
    if isinstance(body, dict):
        return {k: _timeless(v) for k, v in body.items() if k != "age_seconds"}
    if isinstance(body, list):
        return [_timeless(item) for item in body]
    return body


@pytest.fixture
def lanes(settings: Settings, runtime: Runtime) -> Iterator[Lanes]:
    lane = create_app(settings, runtime)
    with served(lane) as lane_url, served(create_app(settings, runtime, fast_lane=False)) as url:
        clients = Lanes(lane, lane_url, url)
        with clients.lane, clients.route:
            yield clients


def _same(lane: httpx.Response, route: httpx.Response) -> dict[str, Any]:
    """The answers' status, headers and body, compared; the lane's body is returned."""
    assert lane.status_code == route.status_code, (lane.text, route.text)
    for header in ("content-type", "idempotent-replayed", "retry-after", "www-authenticate"):
        assert lane.headers.get(header) == route.headers.get(header), header
    assert ("x-ledger-position" in lane.headers) == ("x-ledger-position" in route.headers)
    assert "x-request-id" in lane.headers
    mine, theirs = lane.json(), route.json()
    if lane.status_code == 201:
        for name in OWN:
            assert mine.pop(name)
            assert theirs.pop(name)
    if isinstance(mine.get("detail"), dict):  # an error about a reservation of its own
        assert mine["detail"].pop("reservation_id", 1)
        assert theirs["detail"].pop("reservation_id", 1)
    assert mine == theirs
    return dict(lane.json())


def order(sku: str, quantity: int = 1) -> bytes:
    lines = f'[{{"sku": "{sku}", "quantity": {quantity}}}]'
    return f'{{"order_id": "order-{uuid.uuid4().hex[:8]}", "lines": {lines}}}'.encode()


def test_orders_the_route_would_take_are_answered_by_the_lane_alike(
    lanes: Lanes, runtime: Runtime
) -> None:
    sku = f"LANE-{uuid.uuid4().hex[:8]}"
    stock_sku(runtime.writer, sku, 10)
    body = order(sku, 2)

    taken = lanes.both(body, **{"Idempotency-Key": "own:first"})
    assert taken["status"] == "held"
    assert taken["lines"][0]["allocations"] == [
        {"supplier_id": "acme", "quantity": 2, "fulfilled": 0, "returned": 0, "cancelled": 0}
    ]
    lanes.both(body, **{"Idempotency-Key": "own:first"})  # replayed by both
    # The same key for another order: refused by the ledger, answered by the app's handler.
    reused = lanes.both(order(sku, 1), **{"Idempotency-Key": "own:first"})
    assert reused["error"] == "idempotency_key_mismatch"
    # More than is left (10 - 2 - 2).
    short = lanes.both(order(sku, 7), **{"Idempotency-Key": "own:second"})
    assert short["error"] == "insufficient_stock"
    unknown = lanes.both(order("NO-SUCH-SKU"), **{"Idempotency-Key": "own:third"})
    assert unknown["error"] == "unknown_sku"

    assert lanes.handed_on == 0
    assert runtime.queries.stock_levels(sku, datetime.now(UTC)).held == 4


@pytest.mark.parametrize(
    ("headers", "body", "error"),
    [
        ({"Idempotency-Key": "k"}, b'{"order_id": "o", "lines": [', "malformed_json"),
        ({"Idempotency-Key": "k"}, b"", "validation_error"),
        # No Content-Type: FastAPI does not read the body as JSON.
        ({"Idempotency-Key": "k", "Content-Type": None}, ORDER, "validation_error"),
        # Nested too deep for Python's parser: the route's 400, not a 500.
        # Nested deeper than Python's parser goes: malformed, as the route says too.
        ({"Idempotency-Key": "k"}, b"[" * 5000, "malformed_json"),
        # A repeated key: only the route judges it (here it takes the order, for a SKU
        # the ledger does not know).
        (
            {"Idempotency-Key": "own:k"},
            b'{"order_id": [1], "order_id": "o", "lines": [{"sku": "S", "quantity": 1}]}',
            "unknown_sku",
        ),
        ({"Idempotency-Key": "k"}, b"[1, 2]", "validation_error"),
        ({}, ORDER, "missing_idempotency_key"),
        ({"Idempotency-Key": "has space"}, ORDER, "invalid_idempotency_key"),
        ({"Authorization": "Bearer nobody", "Idempotency-Key": "k"}, ORDER, "unauthorized"),
        ({"Authorization": "Basic test-oms", "Idempotency-Key": "k"}, ORDER, "unauthorized"),
        ({"Authorization": "Bearer test-shop", "Idempotency-Key": "k"}, ORDER, "forbidden"),
        ({"Idempotency-Key": "k", "Content-Type": "text/plain"}, ORDER, "validation_error"),
        (
            {"Idempotency-Key": "k"},
            b'{"order_id": "o", "lines": [{"sku": "S", "quantity": "1"}]}',
            "validation_error",
        ),
        ({"Idempotency-Key": "k"}, b'{"order_id": "o", "lines": [], "x": 1}', "validation_error"),
        (
            {"Idempotency-Key": "k"},
            b'{"order_id": "o", "lines": [{"sku": "S", "quantity": 1}], "ttl_seconds": 99999999}',
            "ttl_too_long",
        ),
    ],
)
def test_orders_the_route_would_refuse_are_handed_on_to_it(
    lanes: Lanes, headers: dict[str, str | None], body: bytes, error: str
) -> None:
    # The servers run in this process: a collection during the deep parse (a body nested
    # too deep) ran finalizers of earlier tests' garbage a thousand frames down, where
    # their warnings, and pytest's hook for what they raised, ran out of stack (a
    # failure of the test, once, in CI). Collected before, and not during.
    gc.collect()
    gc.disable()
    try:
        answer = lanes.both(body, **headers)
    finally:
        gc.enable()
    assert answer["error"] == error
    # A request with no known key is refused before either, as its body is not read.
    assert lanes.handed_on == (0 if error == "unauthorized" else 1)


def test_too_many_lines_are_handed_on(lanes: Lanes, settings: Settings) -> None:
    lines = ", ".join(
        f'{{"sku": "S{i}", "quantity": 1}}' for i in range(settings.max_reservation_lines + 1)
    )
    answer = lanes.both(
        f'{{"order_id": "o", "lines": [{lines}]}}'.encode(), **{"Idempotency-Key": "k"}
    )
    assert answer["error"] == "too_many_lines"
    assert lanes.handed_on == 1


def test_other_requests_pass_the_lane(lanes: Lanes) -> None:
    answers = [
        lanes.lane.get("/v1/reservations", params={"order_id": "o"}, headers=OMS),
        lanes.lane.post("/v1/reservations/", content=ORDER, headers=OMS),
        lanes.lane.put("/v1/reservations", content=ORDER, headers=OMS),
    ]
    assert [a.status_code for a in answers] == [
        200,
        404,
        405,
    ]  # the app's answers: no route, no method
    assert lanes.handed_on == 3


def test_with_dependencies_overridden_every_order_goes_to_the_route(
    lanes: Lanes, runtime: Runtime
) -> None:
    sku = f"LANE-{uuid.uuid4().hex[:8]}"
    stock_sku(runtime.writer, sku, 10)
    lanes.app.dependency_overrides[oms_write] = oms_write
    assert lanes.both(order(sku), **{"Idempotency-Key": "own:k"})["status"] == "held"
    assert lanes.handed_on == 1


def unexpected(answer: httpx.Response) -> None:
    """The app's answer to an error it did not expect: a 500 in the error envelope, naming
    the request's id, which its header carries too."""
    assert answer.status_code == 500, answer.text
    assert answer.json() == {
        "error": "internal_error",
        "detail": {"request_id": answer.headers["x-request-id"]},
    }


def test_an_unexpected_failure_is_answered_by_the_lane_as_by_the_app(
    lanes: Lanes, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starlette's server-error middleware is behind the lane (api.app.Service): the lane
    answers an unexpected error with the app's own catch-all, as that middleware does."""

    async def broken(command: object) -> object:
        raise RuntimeError("the writer broke")

    monkeypatch.setattr(runtime.writer, "execute_async", broken)
    body = order(f"LANE-{uuid.uuid4().hex[:8]}")
    for client in (lanes.lane, lanes.route):
        headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
        unexpected(client.post("/v1/reservations", content=body, headers={**headers, **OMS}))
    assert lanes.handed_on == 0


def test_an_unexpected_failure_while_the_lane_reads_an_order_gets_the_apps_answer(
    lanes: Lanes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> object:
        raise RuntimeError("the command could not be built")

    monkeypatch.setattr(fastlane, "reserve_command", broken)
    headers = {"Content-Type": "application/json", "Idempotency-Key": "k", **OMS}
    body = order(f"LANE-{uuid.uuid4().hex[:8]}")
    unexpected(lanes.lane.post("/v1/reservations", content=body, headers=headers))
    assert lanes.handed_on == 0


def test_the_route_depends_on_what_the_lane_checks_and_nothing_else() -> None:
    """The lane does what the route's dependencies do (key, role, time, request id); a
    dependency added to the route, its router or the app would be skipped by it."""
    app = create_app(make_settings("postgresql://unused/unused"))
    (route,) = [
        r
        for r in reservations.router.routes
        if isinstance(r, APIRoute) and r.path == PATH and "POST" in r.methods
    ]
    assert route.endpoint is reservations.reserve
    assert [d.call for d in route.dependant.dependencies] == [oms_write]
    assert route.dependencies == []
    assert reservations.router.dependencies == []
    assert app.router.dependencies == []


# Reads ------------------------------------------------------------------------


@pytest.fixture
def read_lanes(settings: Settings) -> Iterator[tuple[Lanes, Runtime]]:
    """Both servers on one runtime with the in-process copy of the stock view, as served
    (never stale, however long a refresh takes on a loaded machine: the tests say when the
    copy holds a SKU, and one that went stale between two requests would miss)."""
    settings = settings.model_copy(update={"read_cache_max_lag_seconds": 60.0})
    runtime = open_runtime(settings, sweep=False, read_cache=True)
    try:
        lane = create_app(settings, runtime)
        with (
            served(lane) as lane_url,
            served(create_app(settings, runtime, fast_lane=False)) as url,
        ):
            clients = Lanes(lane, lane_url, url, ReadLane)
            with clients.lane, clients.route:
                yield clients, runtime
    finally:
        runtime.close()


def stocked(runtime: Runtime, sku: str, quantity: int, supplier_id: str = "acme") -> int:
    """`stock_sku`, and the log position it reached."""
    stock_sku(runtime.writer, sku, quantity, supplier_id)
    return runtime.app.recorder.max_notification_id() or 0


def held_sku(runtime: Runtime, quantity: int) -> tuple[str, int]:
    """A new SKU with `quantity` in stock, once the copy holds it; and the log position."""
    sku = f"LANE-{uuid.uuid4().hex[:8]}"
    position = stocked(runtime, sku, quantity)
    held_by_copy(runtime, sku, position)
    return sku, position


def held_by_copy(runtime: Runtime, sku: str, wanted: int) -> None:
    """Waits until the copy answers for the SKU at the position (a read offers it)."""
    cache = runtime.views.cache
    assert cache is not None
    deadline = time.monotonic() + 10
    while cache.lookup([sku], wanted) is None:
        assert time.monotonic() < deadline, "the copy never held the SKU"
        runtime.views.availability_after([sku], datetime.now(UTC), wanted, 5)
        time.sleep(0.05)


def test_reads_the_copy_holds_are_answered_by_the_lane_alike(
    read_lanes: tuple[Lanes, Runtime],
) -> None:
    lanes, runtime = read_lanes
    sku, _ = held_sku(runtime, 10)
    other, position = held_sku(runtime, 5)

    answer = lanes.read_both(f"/v1/availability/{sku}")
    assert answer.json()["sellable"] == 10
    assert int(answer.headers["x-ledger-position"]) >= position
    lanes.read_both(f"/v1/availability/{sku}?min_position={position}")
    lanes.read_both(f"/v1/availability/{sku}?min_position=007")
    lanes.read_both(f"/v1/availability/{sku}", Authorization="Bearer test-oms")
    listed = lanes.read_both(f"/v1/availability?sku={other}&sku={sku}&sku={other}")
    assert [item["sku"] for item in listed.json()["items"]] == [other, sku]
    assert [item["on_hand"] for item in listed.json()["items"]] == [5, 10]
    lanes.read_both(f"/v1/availability?min_position={position}&sku={sku}")
    lanes.read_both(f"/v1/availability?sku={sku}", Authorization="Bearer test-audit")
    assert lanes.handed_on == 0

    # A reservation moves the SKU: the lane answers the new numbers once the copy has them.
    reserved = lanes.lane.post(
        "/v1/reservations",
        content=order(sku, 3),
        headers={**OMS, "Content-Type": "application/json", "Idempotency-Key": "r"},
    )
    assert reserved.status_code == 201
    after = int(reserved.headers["x-ledger-position"])
    held_by_copy(runtime, sku, after)
    handed_on = lanes.handed_on
    moved = lanes.read_both(f"/v1/availability/{sku}?min_position={after}")
    assert (moved.json()["held"], moved.json()["available"]) == (3, 7)
    assert lanes.handed_on == handed_on


def test_reads_the_copy_cannot_answer_go_to_the_route(
    read_lanes: tuple[Lanes, Runtime],
) -> None:
    lanes, runtime = read_lanes
    sku, position = held_sku(runtime, 10)
    cases = [
        # Not in the copy: the route reads the view (and answers 404 for an unknown SKU).
        (f"/v1/availability/NO-SUCH-{uuid.uuid4().hex[:8]}", {}, 404),
        # Keys the route refuses, with its own status and headers.
        (f"/v1/availability/{sku}", {"Authorization": "Bearer nobody"}, 401),
        (f"/v1/availability/{sku}", {"Authorization": "Basic test-shop"}, 401),
        (f"/v1/availability/{sku}", {"Authorization": "Bearer test-acme"}, 403),
        # Positions only the route reads, or refuses.
        (f"/v1/availability/{sku}?min_position=-1", {}, 422),
        (f"/v1/availability/{sku}?min_position=x", {}, 422),
        (f"/v1/availability/{sku}", {"X-Min-Position": str(position)}, 200),
        (f"/v1/availability/{sku}?other=1", {}, 200),
        # SKUs the route's path parameter refuses.
        ("/v1/availability/%01", {}, 422),
        (f"/v1/availability/{'S' * 129}", {}, 422),
        # Lists the copy cannot answer whole, or the route judges.
        (f"/v1/availability?sku={sku}&sku=NO-SUCH-SKU", {}, 200),
        ("/v1/availability", {}, 422),
        # SKUs no SKU can be (PostgreSQL's text cannot even hold a NUL).
        (f"/v1/availability?sku={sku}&sku=%00", {}, 422),
        (f"/v1/availability?sku={sku}&sku={'S' * 129}", {}, 422),
        (f"/v1/availability?sku={sku}&sku=", {}, 422),
        ("/v1/availability?" + "&".join([f"sku={sku}"] * 101), {}, 422),
        (f"/v1/availability?sku={sku}&min_position=-1", {}, 422),
        (f"/v1/availability?sku={sku}&other=1", {}, 200),
        (f"/v1/availability?sku={sku}", {"X-Min-Position": str(position)}, 200),
        (f"/v1/availability?sku={sku}", {"Authorization": "Bearer test-acme"}, 403),
    ]
    for path, headers, status in cases:
        before = lanes.handed_on
        assert lanes.read_both(path, **headers).status_code == status, path
        # A request with no known key is refused before either (api.middleware).
        assert lanes.handed_on == before + (status != 401), path
    # A position given twice is refused before either (api.middleware.LIST_PARAMETERS).
    for path in (
        f"/v1/availability/{sku}?min_position=1&min_position=2",
        f"/v1/availability?sku={sku}&min_position=1&min_position=2",
    ):
        before = lanes.handed_on
        assert lanes.read_both(path).status_code == 422, path
        assert lanes.handed_on == before, path


def test_a_position_the_copy_has_not_reached_is_waited_for_by_the_route(
    read_lanes: tuple[Lanes, Runtime],
) -> None:
    lanes, runtime = read_lanes
    sku, _ = held_sku(runtime, 10)
    cache = runtime.views.cache
    assert cache is not None
    cache.stop()  # the copy stays where it is; the view moves on
    later = stocked(runtime, sku, 4, "beta")
    assert cache.position < later
    answer = lanes.lane.get(f"/v1/availability/{sku}?min_position={later}", headers=SHOP)
    assert answer.status_code == 200
    assert answer.json()["on_hand"] == 14
    assert lanes.handed_on == 1


def test_a_read_the_copy_does_not_answer_in_time_reads_the_view_itself(
    read_lanes: tuple[Lanes, Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    lanes, runtime = read_lanes
    cache = runtime.views.cache
    assert cache is not None
    sku, _ = held_sku(runtime, 6)
    never: Future[Snapshot | None] = Future()  # a read for readers that never ends
    monkeypatch.setattr(cache, "fetch", lambda skus, at: never)
    monkeypatch.setattr(cache, "fetch_wait_seconds", 0.2)
    unknown = f"LANE-{uuid.uuid4().hex[:8]}"  # the copy misses the list for it
    started = time.monotonic()
    answer = lanes.lane.get(f"/v1/availability?sku={sku}&sku={unknown}", headers=SHOP)
    assert answer.status_code == 200
    assert [item["on_hand"] for item in answer.json()["items"]] == [6]
    assert answer.json()["unknown"] == [unknown]
    assert time.monotonic() - started >= 0.2


def test_an_unexpected_failure_of_a_read_is_answered_by_the_lane_as_by_the_app(
    read_lanes: tuple[Lanes, Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    lanes, runtime = read_lanes
    sku, _ = held_sku(runtime, 3)

    def broken(*args: object) -> object:
        raise RuntimeError("the view broke")

    # Both answer through the route module's writer of the answer.
    monkeypatch.setattr(availability, "availability_fields", broken)
    for client in (lanes.lane, lanes.route):
        unexpected(client.get(f"/v1/availability/{sku}", headers=SHOP))
    assert lanes.handed_on == 0


def test_a_read_the_lane_answers_or_passes_on_is_counted_once(
    read_lanes: tuple[Lanes, Runtime],
) -> None:
    """A hit in the lane, and a miss it passes on to the route (which looks again), each
    count once in ledger_read_copy_lookups_total."""
    lanes, runtime = read_lanes
    cache = runtime.views.cache
    assert cache is not None
    sku, _ = held_sku(runtime, 3)
    before, reads = cache.lookups(), cache.fetch_reads
    assert lanes.lane.get(f"/v1/availability/{sku}", headers=SHOP).status_code == 200
    unknown = f"LANE-{uuid.uuid4().hex[:8]}"
    assert lanes.lane.get(f"/v1/availability/{unknown}", headers=SHOP).status_code == 404
    after = cache.lookups()
    moved = {result: after[result] - before[result] for result in after}
    assert moved == {"hit": 1, "absent": 1, "behind": 0, "stale": 0}
    assert cache.fetch_reads == reads + 1, "the miss was read for by the copy"


def test_the_read_route_depends_on_what_the_lane_checks_and_nothing_else() -> None:
    """The lane does what the read route's dependency does (key, role, time, position);
    a dependency added to the route, its router or the app would be skipped by it."""
    create_app(make_settings("postgresql://unused/unused"))
    (route,) = [
        r
        for r in availability.router.routes
        if isinstance(r, APIRoute) and r.path == "/v1/availability/{sku}"
    ]
    (listed,) = [
        r
        for r in availability.router.routes
        if isinstance(r, APIRoute) and r.path == "/v1/availability"
    ]
    assert route.methods == listed.methods == {"GET"}
    assert route.endpoint is availability.one
    assert listed.endpoint is availability.many
    for each in (route, listed):
        assert [d.call for d in each.dependant.dependencies] == [read]
        assert each.dependencies == []
    assert availability.router.dependencies == []


def test_each_answer_of_the_whole_app_leaves_in_one_write(
    settings: Settings, runtime: Runtime
) -> None:
    """Orders, reads and refusals, through every middleware and both lanes (api.transport)."""
    stock_sku(runtime.writer, "ONE-WRITE", 50)
    runtime.views.wait_for("stock", runtime.app.recorder.max_notification_id() or 0, 10)
    writes: list[int] = []
    with (
        served(create_app(settings, runtime), counting(JoiningHttpToolsProtocol, writes)) as url,
        httpx.Client(base_url=url) as client,
    ):
        for n in range(5):
            order = {"order_id": f"o-{n}", "lines": [{"sku": "ONE-WRITE", "quantity": 1}]}
            key = {**OMS, "Idempotency-Key": f"one-write-{n}"}
            assert client.post(PATH, json=order, headers=key).status_code == 201
            assert client.get("/v1/availability/ONE-WRITE", headers=SHOP).status_code == 200
            assert client.get("/v1/availability/NOPE", headers=SHOP).status_code == 404
            assert client.get("/healthz").status_code == 200
    assert len(writes) == 20  # uvicorn's own protocol: 40 (checked)
