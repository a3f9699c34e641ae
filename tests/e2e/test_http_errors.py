"""Every client mistake gets its status and the error envelope, never a 500."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import TEST_KEYS, Server, random_sku, serving

SMALL_BODY_LIMIT = 1024


# Servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `ledger serve --workers 2` for the module; its log is checked by the last test."""
    with serving(postgres_server_url, tmp_path_factory.mktemp("ledger"), 2) as running:
        yield running


@pytest.fixture  # for its tests only: a module's servers hold connections to its end
def small_body_ledger(
    postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serving(
        postgres_server_url,
        tmp_path_factory.mktemp("small-body"),
        1,
        extra_env={"LEDGER_MAX_BODY_BYTES": str(SMALL_BODY_LIMIT)},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def anonymous(ledger: Server) -> Iterator[httpx.Client]:
    with ledger.client() as client:
        yield client


@pytest.fixture(scope="module")
def admin(ledger: Server) -> Iterator[httpx.Client]:
    with ledger.client("test-admin") as client:
        yield client


@pytest.fixture(scope="module")
def oms(ledger: Server) -> Iterator[httpx.Client]:
    with ledger.client("test-oms") as client:
        yield client


@pytest.fixture(scope="module")
def shop(ledger: Server) -> Iterator[httpx.Client]:
    with ledger.client("test-shop") as client:
        yield client


@pytest.fixture(scope="module")
def acme(ledger: Server, admin: httpx.Client) -> Iterator[httpx.Client]:
    """The supplier key bound to supplier "acme", which exists."""
    assert admin.put("/v1/suppliers/acme", json={"name": "Acme"}).status_code == 200
    with ledger.client("test-acme") as client:
        yield client


@pytest.fixture(scope="module")
def sku(admin: httpx.Client) -> str:
    """A SKU with plenty of units at one supplier, for the tests that need a valid order."""
    supplier = new_supplier(admin)
    sku = random_sku()
    observation = {"sku": sku, "quantity": 1000, "observed_at": iso()}
    assert admin.put(f"/v1/skus/{sku}", json={"safety_stock": 0}).status_code == 200
    report = admin.post(f"/v1/suppliers/{supplier}/stock", json={"observations": [observation]})
    assert report.json()["applied"] == 1, report.text
    return sku


# Helpers --------------------------------------------------------------------------------------


def iso(*, seconds: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def refused(response: httpx.Response, status: int, error: str | None = None) -> Any:
    """Asserts the status and the error envelope, and returns the envelope's detail."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    if error is not None:
        assert body["error"] == error, body
    return body["detail"]


def new_supplier(admin: httpx.Client) -> str:
    supplier_id = random_sku("sup")
    response = admin.put(f"/v1/suppliers/{supplier_id}", json={"name": supplier_id})
    assert response.status_code == 200, response.text
    return supplier_id


def order(sku: str, quantity: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"order_id": "order-1", "lines": [{"sku": sku, "quantity": quantity}], **extra}


def post_order(oms: httpx.Client, body: Any) -> httpx.Response:
    """Posts `body` as JSON, whatever it is (`None` is sent as `null`)."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
    return oms.post("/v1/reservations", content=json.dumps(body), headers=headers)


def new_reservation(oms: httpx.Client, sku: str, quantity: int = 1) -> str:
    response = post_order(oms, order(sku, quantity))
    assert response.status_code == 201, response.text
    reservation_id: str = response.json()["reservation_id"]
    return reservation_id


# Bodies -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b'{"order_id": "o", "lines": [', b"not json at all", b'{"order_id": "o",}', b"\xff\xfe"],
)
def test_a_body_that_is_not_json_is_malformed(oms: httpx.Client, raw: bytes) -> None:
    response = oms.post(
        "/v1/reservations",
        content=raw,
        headers={"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex},
    )

    refused(response, 400, "malformed_json")


def test_a_body_that_is_not_text_in_a_json_encoding_is_malformed(
    oms: httpx.Client, admin: httpx.Client
) -> None:
    latin_1 = '{"order_id": "caf\u00e9", "lines": []}'.encode("latin-1")
    headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}

    said = refused(
        oms.post("/v1/reservations", content=latin_1, headers=headers), 400, "malformed_json"
    )
    assert "not text in a JSON encoding" in said
    said = refused(
        admin.put(
            f"/v1/suppliers/{random_sku('sup')}", content=b'{"name": "\xff"}', headers=headers
        ),
        400,
        "malformed_json",
    )
    assert "not text in a JSON encoding" in said


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), ("not-a-key", 401), ("test-shop", 403), ("test-acme", 403)]
)
@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        ("POST", "/v1/reservations", b"garbage"),
        ("PUT", "/v1/suppliers/sup-x", b"garbage"),
        ("PUT", "/v1/skus/A-1", b"\xff\xfe"),
        ("POST", "/v1/reservations", b'{"n": ' + b"9" * 5000 + b"}"),
        ("GET", "/v1/reservations?limit=abc", b""),
        ("POST", "/v1/suppliers/sup-x/feeds?format=csv", b"sku,quantity\nA,1\n"),
        # Another supplier's routes, with a fault a supplier's key was told of first.
        ("POST", "/v1/suppliers/sup-x/stock", b"garbage"),
        ("POST", "/v1/suppliers/sup-x/feeds?format=", b"sku,quantity\nA,1\n"),
    ],
    ids=["reserve", "supplier", "not-utf8", "digits", "query", "upload", "stock", "format"],
)
def test_a_caller_that_may_not_is_told_so_before_its_request_s_faults(
    ledger: Server, key: str | None, status: int, method: str, path: str, raw: bytes
) -> None:
    """FastAPI reads a body, and a key-checking dependency's parameters, before the key is
    checked: a caller with no key or a storefront's was told `400 malformed_json` of its
    order (a walkthrough); it is told it may not."""
    with ledger.client() as client:
        headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        response = client.request(method, path, content=raw, headers=headers)

    refused(response, status, "unauthorized" if status == 401 else "forbidden")
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("key", "path", "loc"),
    [
        ("test-oms", "/v1/reservations?order_id=W1&limit=5", ["query", "limit"]),
        (
            "test-oms",
            "/v1/reservations?order_id=W1&after=6f1c1d52-0000-4000-8000-000000000001",
            ["query", "after"],
        ),
        ("test-audit", "/v1/skus/A-1/stock", ["query", "at"]),
        (
            "test-audit",
            "/v1/skus/A-1/stock?at=2026-01-01T00:00:00Z&position=3",
            ["query", "position"],
        ),
    ],
)
def test_a_route_s_own_invalid_fields_are_listed_as_fastapi_lists_them(
    ledger: Server, key: str, path: str, loc: list[str]
) -> None:
    """Two routes answered `validation_error` with a string `detail`, where the README and
    `ErrorOut` promise a list of `{loc, msg, type}` for invalid fields (a walkthrough)."""
    with ledger.client(key) as client:
        detail = refused(client.get(path), 422, "validation_error")

    assert isinstance(detail, list), detail
    assert len(detail) == 1, detail
    assert set(detail[0]) == {"loc", "msg", "type"}
    assert detail[0]["loc"] == loc


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/reservations/"), ("GET", "/v1/availability/A-1/"), ("GET", "/healthz/")],
)
def test_a_path_with_a_trailing_slash_is_no_route(ledger: Server, method: str, path: str) -> None:
    """It was a bare `307` to the path without it, as an absolute `http://` URL (wrong
    behind a TLS proxy), and no error envelope (an OMS engineer's walkthrough)."""
    with ledger.client("test-admin") as client:
        answer = client.request(
            method, path, json={"order_id": "o", "lines": [{"sku": "A-1", "quantity": 1}]}
        )

    refused(answer, 404, "not_found")
    assert "location" not in answer.headers


@pytest.mark.parametrize("key", [None, "test-acme", "test-audit"])
def test_a_read_s_key_is_checked_before_its_position(ledger: Server, key: str | None) -> None:
    """`min_position=abc` is a reader's mistake, told only to a reader: a supplier's key
    hears `403` from the read's own key check (`api.auth.refusal_before`)."""
    with ledger.client() as client:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        answer = client.get("/v1/availability/A", params={"min_position": "abc"}, headers=headers)

    if key is None:
        refused(answer, 401, "unauthorized")
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    elif key == "test-acme":
        refused(answer, 403, "forbidden")
    else:
        refused(answer, 422, "validation_error")


@pytest.mark.parametrize(
    ("raw", "says"),
    [(b"[" * 100_000, "nested too deeply"), (b'{"n": ' + b"9" * 5000 + b"}", "digits")],
    ids=["nested-too-deeply", "too-many-digits"],
)
def test_a_body_python_cannot_read_as_json_is_malformed_and_says_why(
    oms: httpx.Client, raw: bytes, says: str
) -> None:
    response = oms.post(
        "/v1/reservations",
        content=raw,
        headers={"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex},
    )

    refused(response, 400, "malformed_json")
    assert says in response.json()["detail"]


@pytest.mark.parametrize(
    "content_type",
    [None, "application/x-www-form-urlencoded", "text/plain"],
    ids=["none", "form-as-curl-d-sends", "text"],
)
def test_a_json_body_sent_as_another_media_type_is_a_validation_error_naming_the_header(
    oms: httpx.Client, admin: httpx.Client, sku: str, content_type: str | None
) -> None:
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    if content_type is not None:
        headers["Content-Type"] = content_type
    supplier = f"/v1/suppliers/{random_sku('sup')}"

    for response in (
        oms.post("/v1/reservations", content=json.dumps(order(sku)), headers=headers),
        admin.put(supplier, content=b'{"name": "x"}', headers=headers),
        admin.post("/v1/dead-letters/retry", content=b"{}", headers=headers),
    ):
        assert refused(response, 422, "validation_error") == [
            {
                "loc": ["header", "content-type"],
                "msg": "send Content-Type: application/json",
                "type": "unsupported_media_type",
            }
        ]
    assert admin.get(supplier).status_code == 404


def test_a_bulk_retry_without_a_body_retries_as_an_empty_one_does(admin: httpx.Client) -> None:
    bare = admin.post("/v1/dead-letters/retry")
    empty = admin.post("/v1/dead-letters/retry", json={})

    for response in (bare, empty):
        assert response.status_code == 200, response.text
        assert set(response.json()) == {
            "resolved",
            "still_refused",
            "not_retryable",
            "being_retried",
            "applied",
            "unchanged",
            "late",
            "position",
            "next_after",
        }


def test_a_feed_file_is_taken_as_its_raw_body_whatever_its_media_type(
    acme: httpx.Client,
) -> None:
    feed = b"supplier_sku,quantity,observed_at\nA-1,5,2026-01-01T00:00:00Z\n"
    for headers in ({}, {"Content-Type": "text/csv"}, {"Content-Type": "application/json"}):
        response = acme.post(
            "/v1/suppliers/acme/feeds",
            params={"format": "csv"},
            content=feed,
            headers={**headers, "X-Ledger-Delivery": uuid.uuid4().hex},
        )
        assert response.status_code == 202, response.text


def test_an_unknown_field_is_a_validation_error_that_names_it(oms: httpx.Client, sku: str) -> None:
    detail = refused(post_order(oms, order(sku, colour="red")), 422, "validation_error")

    assert any(item["loc"][-1] == "colour" for item in detail), detail


@pytest.mark.parametrize("quantity", [0, -1, 1.5, "many", None, 10**9 + 1, 10**30])
def test_a_reservation_quantity_that_is_not_a_positive_integer_is_refused(
    oms: httpx.Client, sku: str, quantity: Any
) -> None:
    detail = refused(post_order(oms, order(sku, quantity)), 422, "validation_error")

    assert any("quantity" in item["loc"] for item in detail), detail


@pytest.mark.parametrize(
    "body",
    [
        [],
        "order",
        None,
        {"order_id": "o", "lines": []},
        {"lines": [{"sku": "x", "quantity": 1}]},
        {"order_id": "", "lines": [{"sku": "x", "quantity": 1}]},
        {"order_id": "o", "lines": [{"sku": "", "quantity": 1}]},
        {"order_id": "o", "lines": [{"sku": "x", "quantity": 1}], "ttl_seconds": 0},
    ],
    ids=["list", "string", "null", "no-lines", "no-order", "empty-order", "empty-sku", "ttl-0"],
)
def test_a_reservation_body_of_the_wrong_shape_is_a_validation_error(
    oms: httpx.Client, body: Any
) -> None:
    refused(post_order(oms, body), 422, "validation_error")


def test_a_ttl_beyond_the_maximum_is_refused(oms: httpx.Client, sku: str) -> None:
    refused(post_order(oms, order(sku, ttl_seconds=10**8)), 422, "ttl_too_long")


def test_an_order_without_an_idempotency_key_is_refused(oms: httpx.Client, sku: str) -> None:
    refused(oms.post("/v1/reservations", json=order(sku)), 400, "missing_idempotency_key")


@pytest.mark.parametrize("key", ["has space", "x" * 256, "caf\u00e9"])
def test_an_idempotency_key_that_is_not_printable_ascii_is_refused(
    oms: httpx.Client, sku: str, key: str
) -> None:
    response = oms.post(
        "/v1/reservations", json=order(sku), headers={b"Idempotency-Key": key.encode()}
    )

    refused(response, 400, "invalid_idempotency_key")


def test_an_unknown_sku_in_an_order_is_refused_and_named(
    oms: httpx.Client, shop: httpx.Client, sku: str
) -> None:
    missing = random_sku("missing")
    held_before = shop.get(f"/v1/availability/{sku}").json()["held"]
    body = {
        "order_id": "o",
        "lines": [{"sku": sku, "quantity": 1}, {"sku": missing, "quantity": 1}],
    }

    detail = refused(post_order(oms, body), 422, "unknown_sku")

    assert detail["skus"] == [missing]
    assert shop.get(f"/v1/availability/{sku}").json()["held"] == held_before


# Unknown things ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reservation_id", [str(uuid.uuid4()), "not-a-uuid", "123"], ids=["uuid", "text", "number"]
)
@pytest.mark.parametrize("action", ["", "/confirm", "/release"])
def test_an_unknown_reservation_is_not_found(
    oms: httpx.Client, reservation_id: str, action: str
) -> None:
    path = f"/v1/reservations/{reservation_id}{action}"
    response = oms.post(path) if action else oms.get(path)

    refused(response, 404, "reservation_not_found")


@pytest.mark.parametrize(("action", "extra"), [("fulfil", {}), ("return", {"restock": True})])
def test_fulfilling_or_returning_an_unknown_reservation_is_not_found(
    oms: httpx.Client, sku: str, action: str, extra: dict[str, Any]
) -> None:
    body = {"lines": [{"sku": sku, "quantity": 1}], **extra}

    response = oms.post(f"/v1/reservations/{uuid.uuid4()}/{action}", json=body)

    refused(response, 404, "reservation_not_found")


def test_availability_of_an_unknown_sku_is_not_found(shop: httpx.Client) -> None:
    missing = random_sku("missing")

    response = shop.get(f"/v1/availability/{missing}")
    detail = refused(response, 404, "unknown_sku")

    assert detail["sku"] == missing
    # The position it is unknown at, as a found SKU's answer gives it.
    assert detail["position"] == int(response.headers["X-Ledger-Position"]) >= 0


def test_batch_availability_without_any_sku_is_a_validation_error(shop: httpx.Client) -> None:
    refused(shop.get("/v1/availability"), 422, "validation_error")


def test_batch_availability_of_more_than_a_hundred_skus_is_a_validation_error(
    shop: httpx.Client,
) -> None:
    skus = [random_sku() for _ in range(101)]

    refused(shop.get("/v1/availability", params={"sku": skus}), 422, "validation_error")


@pytest.mark.parametrize("position", [2**63, 10**23], ids=["bigint-plus-one", "far-beyond"])
@pytest.mark.alone
def test_a_position_past_any_the_log_can_reach_is_a_validation_error_at_once(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client, sku: str, position: int
) -> None:
    """Log positions are bigints: waiting for one beyond only ended in a 503 to retry."""
    reads: list[tuple[httpx.Client, str, dict[str, str]]] = [
        (shop, f"/v1/availability/{sku}", {}),
        (shop, "/v1/availability", {"sku": sku}),
        (oms, "/v1/reservations", {"order_id": "o"}),
        (oms, f"/v1/reservations/{uuid.uuid4()}", {}),
        (admin, f"/v1/suppliers/{new_supplier(admin)}/mappings", {}),
        (admin, "/v1/conflicts", {}),
    ]
    started = time.monotonic()
    for client, path, params in reads:
        by_query = client.get(path, params={**params, "min_position": str(position)})
        by_header = client.get(path, params=params, headers={"X-Min-Position": str(position)})
        for response, where in ((by_query, "query"), (by_header, "header")):
            detail = refused(response, 422, "validation_error")
            assert [item["loc"][0] for item in detail] == [where], (path, detail)

    assert time.monotonic() - started < 5


def test_a_sku_path_over_128_characters_is_a_validation_error(shop: httpx.Client) -> None:
    refused(shop.get(f"/v1/availability/{'x' * 129}"), 422, "validation_error")


def test_an_unknown_supplier_is_not_found_for_stock_mappings_or_terms(admin: httpx.Client) -> None:
    observation = {"sku": "x", "quantity": 1, "observed_at": iso()}
    missing = random_sku("nosup")

    stock = admin.post(f"/v1/suppliers/{missing}/stock", json={"observations": [observation]})
    mappings = admin.put(
        f"/v1/suppliers/{missing}/mappings", json={"mappings": [{"supplier_sku": "a", "sku": "b"}]}
    )
    terms = admin.get(f"/v1/suppliers/{missing}")
    listed = admin.get(f"/v1/suppliers/{missing}/mappings")

    refused(stock, 404, "unknown_supplier")
    refused(mappings, 404, "unknown_supplier")
    refused(terms, 404, "unknown_supplier")
    refused(listed, 404, "unknown_supplier")


def test_a_known_supplier_without_mappings_lists_none(admin: httpx.Client) -> None:
    response = admin.get(f"/v1/suppliers/{new_supplier(admin)}/mappings")

    assert response.status_code == 200, response.text
    assert response.json() == {"mappings": [], "next_after": None}


def test_a_supplier_id_outside_the_allowed_characters_is_a_validation_error(
    admin: httpx.Client,
) -> None:
    refused(admin.put("/v1/suppliers/bad%20id", json={"name": "x"}), 422, "validation_error")


# Every text a client can send in a path, a query or a header that reaches PostgreSQL,
# which refuses a NUL in text (that was a 500), and another control character.
CONTROL_TEXT = [
    ("GET", "/v1/feeds/{text}", {}),
    ("GET", "/v1/feeds/d-1", {"supplier_id": "{text}"}),
    ("GET", "/v1/dead-letters", {"supplier_id": "{text}"}),
    ("GET", "/v1/dead-letters", {"reason": "{text}"}),
    ("GET", "/v1/conflicts", {"sku": "{text}"}),
    ("GET", "/v1/conflicts", {"supplier_id": "{text}"}),
    ("GET", "/v1/reservations", {"order_id": "{text}"}),
    ("GET", "/v1/suppliers/acme/mappings", {"after": "{text}"}),
    ("POST", "/v1/suppliers/acme/feeds", {"name": "{text}"}),
    ("POST", "/v1/suppliers/acme/feeds", {"format": "{text}"}),
]


@pytest.mark.parametrize("text", ["a\x00b", "a\x01b"], ids=["nul", "control"])
@pytest.mark.parametrize(
    ("method", "path", "params"),
    CONTROL_TEXT,
    ids=[f"{m} {p} {list(q)}" for m, p, q in CONTROL_TEXT],
)
def test_control_characters_in_a_path_or_query_are_a_validation_error(
    admin: httpx.Client,
    acme: httpx.Client,
    method: str,
    path: str,
    params: dict[str, str],
    text: str,
) -> None:
    url = path.replace("{text}", quote(text, safe=""))
    query = {name: value.replace("{text}", text) for name, value in params.items()}
    answer = admin.request(method, url, params=query, content=b"sku,quantity\nA,1\n")
    refused(answer, 422, "validation_error")


def test_a_query_parameter_given_twice_is_refused_unless_the_route_reads_a_list(
    oms: httpx.Client, shop: httpx.Client, admin: httpx.Client, sku: str
) -> None:
    """Found by a walkthrough: `status=held&status=expired` was read as `expired`, silently.
    One that no route reads is ignored, as it is once (a scraper's, a probe's)."""
    twice = oms.get("/v1/reservations?status=held&status=expired")
    encoded = admin.get("/v1/dead-letters?status=open&st%61tus=all")
    unread = admin.get("/v1/dead-letters?%00x=1&%00x=2&collect[]=a&collect[]=b")
    skus = shop.get(f"/v1/availability?sku={sku}&sku={sku}-none")
    positions = shop.get(f"/v1/availability/{sku}?min_position=0&min_position=1")

    assert "'status'" in refused(twice, 422, "repeated_parameter")
    assert "'status'" in refused(encoded, 422, "repeated_parameter")
    assert unread.status_code == 200, unread.text  # no route reads them: ignored
    assert skus.status_code == 200, skus.text
    assert "'min_position'" in refused(positions, 422, "repeated_parameter")


def test_a_stock_report_with_a_control_character_in_its_delivery_id_is_refused(
    acme: httpx.Client,
) -> None:
    observation = {"sku": "x", "quantity": 1, "observed_at": iso()}
    body = {"delivery_id": "d\x00", "observations": [observation]}
    refused(acme.post("/v1/suppliers/acme/stock", json=body), 422, "validation_error")


def test_a_feed_delivery_id_header_with_a_control_character_is_refused(
    acme: httpx.Client,
) -> None:
    answer = acme.post(
        "/v1/suppliers/acme/feeds",
        content=b"sku,quantity\nA,1\n",
        headers={"X-Ledger-Delivery": "d\te"},  # HTTP lets a tab through; the ledger not
    )
    refused(answer, 422, "validation_error")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "priority": -1},
        {"name": "x", "timezone": "Mars/Olympus"},
        {"name": "x", "stale_after_seconds": 600, "exclude_after_seconds": 60},
        {"name": "x", "reports_net_of_our_orders": "sometimes"},
        {"name": "", "priority": 1},  # none is the supplier's id, or the name it has
        # PostgreSQL refuses a NUL in JSON: kept, it stopped the stock view for every SKU.
        {"name": "x", "connector": {"options": {"timestamp_format": "a\x00b"}}},
        {"name": "x", "connector": {"units": {"C\x00S": 12}}},
        {
            "name": "x",
            "connector": {
                "options": {
                    "columns": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
                }
            },
        },
        # Nor NaN or Infinity (JSON bodies may carry them): the same stopped view.
        {"name": "x", "connector": {"options": {"delimiter": float("nan")}}},
        {"name": "x", "connector": {"breaker": {"cooldown_seconds": float("inf")}}},
    ],
    ids=[
        "negative-priority",
        "unknown-zone",
        "exclude-before-stale",
        "not-a-bool",
        "empty-name",
        "nul-in-connector",
        "nul-in-connector-key",
        "connector-nested-too-deep",
        "nan-in-connector",
        "infinity-in-connector",
    ],
)
def test_invalid_supplier_terms_are_a_validation_error(
    admin: httpx.Client, body: dict[str, Any]
) -> None:
    # Written by json.dumps, which writes NaN and Infinity as JSON bodies may carry them.
    answer = admin.put(
        f"/v1/suppliers/{random_sku('sup')}",
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    refused(answer, 422, "validation_error")


@pytest.mark.parametrize("limit", ["stale_after_seconds", "exclude_after_seconds"])
def test_a_staleness_limit_longer_than_the_ledger_can_count_is_a_validation_error(
    admin: httpx.Client, limit: str
) -> None:
    # Past timedelta's range (about 2.7 million years) every read of the supplier's SKUs broke.
    body = {"name": "x", limit: 10**15}

    # Written by json.dumps, which writes NaN and Infinity as JSON bodies may carry them.
    answer = admin.put(
        f"/v1/suppliers/{random_sku('sup')}",
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    refused(answer, 422, "validation_error")


@pytest.mark.parametrize(
    "mappings",
    [
        [{"supplier_sku": "a", "sku": "b", "units_per_supplier_unit": 0}],
        [{"supplier_sku": "a", "sku": "b"}, {"supplier_sku": "a", "sku": "c"}],
        [{"supplier_sku": "a", "sku": "b", "upc": "abc"}],
        [],
    ],
    ids=["zero-units", "twice", "bad-upc", "none"],
)
def test_invalid_mappings_are_a_validation_error(
    admin: httpx.Client, mappings: list[dict[str, Any]]
) -> None:
    supplier = new_supplier(admin)

    response = admin.put(f"/v1/suppliers/{supplier}/mappings", json={"mappings": mappings})

    refused(response, 422, "validation_error")


def test_an_unknown_route_is_not_found_in_the_envelope(oms: httpx.Client) -> None:
    refused(oms.get("/v1/nothing-here"), 404, "not_found")
    refused(oms.get("/v2/reservations"), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", f"/v1/reservations/{uuid.uuid4()}", "GET"),
        ("PUT", "/v1/reservations", "POST"),
        ("GET", f"/v1/reservations/{uuid.uuid4()}/confirm", "POST"),
        ("POST", "/v1/availability/some-sku", "GET"),
    ],
    ids=["delete-reservation", "put-reservations", "get-confirm", "post-availability"],
)
def test_a_wrong_method_is_not_allowed_in_the_envelope(
    oms: httpx.Client, method: str, path: str, allowed: str
) -> None:
    response = oms.request(method, path)

    refused(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == allowed


# Keys and roles ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-a-key", "Bearer", "Basic dGVzdDp0ZXN0", "not-a-key"],
    ids=["none", "unknown-key", "no-token", "basic", "no-scheme"],
)
def test_a_request_without_a_valid_key_is_unauthorized_with_a_bearer_challenge(
    anonymous: httpx.Client, sku: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}

    for response in (
        anonymous.get(f"/v1/availability/{sku}", headers=headers),
        anonymous.post(
            "/v1/reservations",
            json=order(sku),
            headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
        ),
    ):
        refused(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_a_key_of_another_role_is_forbidden(
    shop: httpx.Client, oms: httpx.Client, acme: httpx.Client, sku: str
) -> None:
    refused(post_order(shop, order(sku)), 403, "forbidden")
    refused(oms.put(f"/v1/suppliers/{random_sku('sup')}", json={"name": "x"}), 403, "forbidden")
    refused(oms.put(f"/v1/skus/{random_sku()}", json={"safety_stock": 1}), 403, "forbidden")
    refused(shop.post("/v1/suppliers/acme/stock", json={"observations": [{}]}), 403, "forbidden")
    refused(acme.get(f"/v1/availability/{sku}"), 403, "forbidden")
    refused(acme.get(f"/v1/reservations/{uuid.uuid4()}"), 403, "forbidden")


def test_a_refused_role_is_named_with_its_article(
    ledger: Server, shop: httpx.Client, oms: httpx.Client, acme: httpx.Client, sku: str
) -> None:
    with ledger.client("test-audit") as auditor:
        by_auditor = auditor.put(f"/v1/skus/{random_sku()}", json={"safety_stock": 1})

    assert refused(by_auditor, 403, "forbidden") == "an auditor key cannot do this"
    by_oms = oms.put(f"/v1/skus/{random_sku()}", json={"safety_stock": 1})
    assert refused(by_oms, 403, "forbidden") == "an oms key cannot do this"
    by_shop = post_order(shop, order(sku))
    assert refused(by_shop, 403, "forbidden") == "a storefront key cannot do this"
    by_supplier = acme.get(f"/v1/availability/{sku}")
    assert refused(by_supplier, 403, "forbidden") == "a supplier key cannot do this"


def test_a_supplier_key_cannot_report_for_another_supplier(
    admin: httpx.Client, acme: httpx.Client, shop: httpx.Client, sku: str
) -> None:
    other = new_supplier(admin)
    before = shop.get(f"/v1/availability/{sku}").json()["on_hand"]
    observation = {"sku": sku, "quantity": 500, "observed_at": iso()}

    response = acme.post(f"/v1/suppliers/{other}/stock", json={"observations": [observation]})

    refused(response, 403, "forbidden")
    assert shop.get(f"/v1/availability/{sku}").json()["on_hand"] == before


# Stock reports ----------------------------------------------------------------------------------


def test_bad_records_of_a_report_are_rejected_one_by_one_and_the_good_ones_applied(
    admin: httpx.Client, acme: httpx.Client, shop: httpx.Client
) -> None:
    good, also_good = random_sku(), random_sku()
    mappings = [
        {"supplier_sku": "ACME-1", "sku": good},
        {"supplier_sku": "ACME-2", "sku": also_good},
    ]
    assert admin.put("/v1/suppliers/acme/mappings", json={"mappings": mappings}).status_code == 200
    observations: list[Any] = [
        {"supplier_sku": "ACME-1", "quantity": 7, "observed_at": iso()},
        {"supplier_sku": "ACME-2", "quantity": -3, "observed_at": iso()},
        {"supplier_sku": "NOT-MAPPED", "quantity": 4, "observed_at": iso()},
        {"supplier_sku": "ACME-2", "quantity": 4},
        {"supplier_sku": "ACME-2", "sku": also_good, "quantity": 4, "observed_at": iso()},
        {"sku": random_sku("missing"), "quantity": 4, "observed_at": iso()},
        {"supplier_sku": "ACME-2", "quantity": 4, "observed_at": iso(seconds=3600)},
        {"supplier_sku": "ACME-2", "quantity": 4, "observed_at": "yesterday"},
        {"supplier_sku": "ACME-2", "quantity": 10**13, "observed_at": iso()},
        {"sku": also_good, "quantity": 5, "observed_at": iso()},
    ]

    response = acme.post("/v1/suppliers/acme/stock", json={"observations": observations})

    assert response.status_code == 200, response.text
    outcome = response.json()
    assert (outcome["rows"], outcome["applied"]) == (10, 2)
    reasons = {item["index"]: item["reason"] for item in outcome["rejected"]}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert reasons[1] == "negative_quantity"
    assert reasons[2] == "unmapped_supplier_sku"
    assert "observed_at" in reasons[3]
    assert "exactly one of supplier_sku and sku" in reasons[4]
    # A supplier's key names only our SKUs it maps to: an unknown one says no more.
    assert reasons[5] == "sku_not_allowed: a SKU this supplier maps none of its SKUs to"
    assert reasons[6] == "observed_at_in_future"
    assert "observed_at" in reasons[7]
    assert reasons[8] == "quantity_out_of_range"
    assert shop.get(f"/v1/availability/{good}").json()["on_hand"] == 7
    assert shop.get(f"/v1/availability/{also_good}").json()["on_hand"] == 5


def test_a_refused_record_nested_deep_or_holding_a_nul_is_kept_and_the_rest_applied(
    admin: httpx.Client, acme: httpx.Client, shop: httpx.Client
) -> None:
    """A refused record is kept with the delivery: one nested 500 deep made keeping it a
    500 for the whole report; it is kept cut short now (and a NUL, which PostgreSQL
    refuses in text, as U+FFFD)."""
    good = random_sku()
    mapping = {"mappings": [{"supplier_sku": "ACME-DEEP", "sku": good}]}
    assert admin.put("/v1/suppliers/acme/mappings", json=mapping).status_code == 200
    deep: list[Any] = []
    for _ in range(500):
        deep = [deep]
    observations = [
        {"supplier_sku": "ACME-DEEP", "quantity": 9, "observed_at": iso()},
        {"supplier_sku": "ACME-DEEP", "quantity": 1, "observed_at": iso(), "extra": deep},
        {"supplier_sku": "ACME\x00DEEP", "quantity": 1, "observed_at": iso(), "n\x00": 1},
    ]

    response = acme.post("/v1/suppliers/acme/stock", json={"observations": observations})

    assert response.status_code == 200, response.text
    outcome = response.json()
    assert (outcome["rows"], outcome["applied"]) == (3, 1)
    assert sorted(item["index"] for item in outcome["rejected"]) == [1, 2]
    assert shop.get(f"/v1/availability/{good}").json()["on_hand"] == 9


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (f"/v1/reservations/{uuid.uuid4()}/release", {"reason": "gone\x00"}),
        (f"/v1/conflicts/{uuid.uuid4()}/acknowledge", {"note": "seen\x00"}),
    ],
    ids=["release-reason", "acknowledgement-note"],
)
def test_free_text_holding_a_nul_is_a_validation_error(
    admin: httpx.Client, path: str, body: dict[str, str]
) -> None:
    """Kept as text in a view, where PostgreSQL refuses a NUL: the view would stop at it."""
    refused(admin.post(path, json=body), 422, "validation_error")


@pytest.mark.parametrize(
    "observed_at",
    ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00"],
    ids=["before-year-1-in-utc", "after-year-9999-in-utc", "naive-before-year-1-in-tokyo"],
)
def test_an_observation_time_beyond_the_calendar_in_utc_is_rejected_with_the_others_applied(
    admin: httpx.Client, shop: httpx.Client, observed_at: str
) -> None:
    supplier = random_sku("sup")
    put = admin.put(f"/v1/suppliers/{supplier}", json={"name": "t", "timezone": "Asia/Tokyo"})
    assert put.status_code == 200, put.text
    good, bad = random_sku(), random_sku()
    for sku in (good, bad):
        assert admin.put(f"/v1/skus/{sku}", json={"safety_stock": 0}).status_code == 200
    observations = [
        {"sku": bad, "quantity": 1, "observed_at": observed_at},
        {"sku": good, "quantity": 2, "observed_at": iso()},
    ]

    response = admin.post(f"/v1/suppliers/{supplier}/stock", json={"observations": observations})

    assert response.status_code == 200, response.text
    assert [item["index"] for item in response.json()["rejected"]] == [0]
    assert response.json()["applied"] == 1
    assert shop.get(f"/v1/availability/{good}").json()["on_hand"] == 2


def test_a_report_without_observations_is_a_validation_error(admin: httpx.Client) -> None:
    supplier = new_supplier(admin)

    empty = admin.post(f"/v1/suppliers/{supplier}/stock", json={"observations": []})
    missing = admin.post(f"/v1/suppliers/{supplier}/stock", json={"delivery_id": "d"})

    refused(empty, 422, "validation_error")
    refused(missing, 422, "validation_error")


def test_a_delivery_id_reused_with_other_content_is_a_conflict(
    admin: httpx.Client, shop: httpx.Client, sku: str
) -> None:
    supplier = new_supplier(admin)
    first = {
        "delivery_id": "d-1",
        "observations": [{"sku": sku, "quantity": 3, "observed_at": iso()}],
    }
    assert admin.post(f"/v1/suppliers/{supplier}/stock", json=first).status_code == 200
    on_hand = shop.get(f"/v1/availability/{sku}").json()["on_hand"]
    other = {
        "delivery_id": "d-1",
        "observations": [{"sku": sku, "quantity": 9, "observed_at": iso()}],
    }

    response = admin.post(f"/v1/suppliers/{supplier}/stock", json=other)

    refused(response, 409, "delivery_id_conflict")
    assert shop.get(f"/v1/availability/{sku}").json()["on_hand"] == on_hand


# Lifecycle mistakes -------------------------------------------------------------------------


def test_a_confirm_refuses_a_body_with_fields_and_takes_none_or_an_empty_one(
    oms: httpx.Client, sku: str
) -> None:
    """Found by a walkthrough: a confirm read no body, so one naming the lines to confirm
    committed the whole hold, and a malformed one passed. Neither commits anything now."""
    path = f"/v1/reservations/{new_reservation(oms, sku, 2)}"
    lines = {"lines": [{"sku": sku, "quantity": 1}]}

    with_lines = oms.post(f"{path}/confirm", json=lines)
    malformed = oms.post(
        f"{path}/confirm", content=b'{"lines": [', headers={"Content-Type": "application/json"}
    )
    status_between = oms.get(path).json()["status"]
    empty = oms.post(f"{path}/confirm", json={})
    bare = oms.post(f"{path}/confirm")

    [error] = refused(with_lines, 422, "validation_error")
    assert (error["loc"], error["type"]) == (["body", "lines"], "extra_forbidden")
    refused(malformed, 400, "malformed_json")
    assert status_between == "held"
    assert (empty.status_code, empty.json()["status"]) == (200, "confirmed")
    assert (bare.status_code, bare.json()["status"]) == (200, "confirmed")


def test_confirming_a_released_reservation_is_an_invalid_state(oms: httpx.Client, sku: str) -> None:
    reservation_id = new_reservation(oms, sku)
    assert oms.post(f"/v1/reservations/{reservation_id}/release").status_code == 200

    detail = refused(oms.post(f"/v1/reservations/{reservation_id}/confirm"), 409, "invalid_state")

    assert detail["status"] == "released"


def test_fulfilling_a_reservation_that_is_only_held_is_an_invalid_state(
    oms: httpx.Client, sku: str
) -> None:
    reservation_id = new_reservation(oms, sku)

    response = oms.post(
        f"/v1/reservations/{reservation_id}/fulfil", json={"lines": [{"sku": sku, "quantity": 1}]}
    )

    refused(response, 409, "invalid_state")


def test_releasing_a_fulfilled_reservation_is_an_invalid_state(oms: httpx.Client, sku: str) -> None:
    reservation_id = new_reservation(oms, sku)
    path = f"/v1/reservations/{reservation_id}"
    assert oms.post(f"{path}/confirm").status_code == 200
    shipment = {"lines": [{"sku": sku, "quantity": 1}]}
    assert oms.post(f"{path}/fulfil", json=shipment).status_code == 200

    refused(oms.post(f"{path}/release"), 409, "invalid_state")


@pytest.mark.parametrize(
    ("line", "remaining", "said"),
    [
        ({"quantity": 3}, 2, "is more than the 2 the reservation has open"),
        ({"quantity": 1, "other_sku": True}, 0, "is not on this reservation"),
    ],
    ids=["more-than-open", "sku-not-in-order"],
)
def test_fulfilling_more_than_is_open_is_a_conflict(
    admin: httpx.Client,
    oms: httpx.Client,
    sku: str,
    line: dict[str, Any],
    remaining: int,
    said: str,
) -> None:
    path = f"/v1/reservations/{new_reservation(oms, sku, 2)}"
    assert oms.post(f"{path}/confirm").status_code == 200
    other = random_sku()  # in the catalogue, not on the order (one it lacks is 422)
    assert admin.put(f"/v1/skus/{other}", json={"safety_stock": 0}).status_code == 200
    shipped = {"sku": other if line.pop("other_sku", False) else sku, **line}

    response = oms.post(f"{path}/fulfil", json={"lines": [shipped]})
    detail = refused(response, 409, "exceeds_open_quantity")

    assert detail["requested"] == shipped["quantity"]
    # What is left where the request looked (the named supplier's, if it named one).
    assert detail["remaining"] == remaining
    assert said in detail["message"]
    assert detail.get("supplier_id") == shipped.get("supplier_id")
    assert oms.get(path).json()["lines"][0]["fulfilled"] == 0


def test_fulfilling_from_a_supplier_the_line_was_not_allocated_to_is_unprocessable(
    oms: httpx.Client, sku: str
) -> None:
    """It can never ship from there: a 422 naming the line's suppliers (found by a
    walkthrough: it was `409 exceeds_open_quantity`, "nothing open from it"). Asking a
    supplier of the line for more than it has open is still the reservation's conflict."""
    path = f"/v1/reservations/{new_reservation(oms, sku, 2)}"
    assert oms.post(f"{path}/confirm").status_code == 200
    [allocated] = oms.get(path).json()["lines"][0]["allocations"]
    supplier_id = allocated["supplier_id"]

    stranger = oms.post(
        f"{path}/fulfil",
        json={"lines": [{"sku": sku, "quantity": 1, "supplier_id": "someone-else"}]},
    )
    one = {"lines": [{"sku": sku, "quantity": 1, "supplier_id": supplier_id}]}
    assert oms.post(f"{path}/fulfil", json=one).status_code == 200
    beyond = oms.post(
        f"{path}/fulfil",
        json={"lines": [{"sku": sku, "quantity": 2, "supplier_id": supplier_id}]},
    )

    detail = refused(stranger, 422, "supplier_not_on_line")
    assert (detail["sku"], detail["supplier_id"]) == (sku, "someone-else")
    assert detail["allocated_to"] == [supplier_id]
    assert "someone-else" in detail["message"]
    assert refused(beyond, 409, "exceeds_open_quantity")["remaining"] == 1
    assert oms.get(path).json()["lines"][0]["fulfilled"] == 1


def test_returning_more_than_was_shipped_is_a_conflict(oms: httpx.Client, sku: str) -> None:
    path = f"/v1/reservations/{new_reservation(oms, sku, 2)}"
    assert oms.post(f"{path}/confirm").status_code == 200
    assert oms.post(f"{path}/fulfil", json={"lines": [{"sku": sku, "quantity": 1}]}).is_success

    response = oms.post(
        f"{path}/return", json={"lines": [{"sku": sku, "quantity": 2}], "restock": True}
    )

    refused(response, 409, "exceeds_open_quantity")


def test_a_return_must_say_whether_to_restock(oms: httpx.Client, sku: str) -> None:
    path = f"/v1/reservations/{new_reservation(oms, sku)}"

    response = oms.post(f"{path}/return", json={"lines": [{"sku": sku, "quantity": 1}]})

    refused(response, 422, "validation_error")


@pytest.mark.parametrize(
    "restock",
    ["yes", "true", "false", 1, 0, "1", None],
    ids=["yes", "true-as-text", "false-as-text", "one", "zero", "one-as-text", "null"],
)
def test_a_return_says_whether_to_restock_with_true_or_false_only(
    oms: httpx.Client, sku: str, restock: Any
) -> None:
    path = f"/v1/reservations/{new_reservation(oms, sku)}"
    body = {"lines": [{"sku": sku, "quantity": 1}], "restock": restock}

    detail = refused(oms.post(f"{path}/return", json=body), 422, "validation_error")

    assert [item["loc"] for item in detail] == [["body", "restock"]], detail


# Body size ------------------------------------------------------------------------------------


UPLOADS_IN_FLIGHT = 256 * 1024


@pytest.fixture  # for its tests only: a module's servers hold connections to its end
def bounded_uploads_ledger(
    postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serving(
        postgres_server_url,
        tmp_path_factory.mktemp("bounded-uploads"),
        1,
        extra_env={
            "LEDGER_MAX_UPLOAD_BYTES_IN_FLIGHT": str(UPLOADS_IN_FLIGHT),
            "LEDGER_MAX_WEBHOOK_BYTES_IN_FLIGHT": str(UPLOADS_IN_FLIGHT),
            "LEDGER_WEBHOOK_BODY_SECONDS": "5",
        },
    ) as running:
        yield running


def test_uploads_past_the_bytes_a_server_holds_at_once_are_refused_to_be_sent_again(
    bounded_uploads_ledger: Server,
) -> None:
    # Each upload is held whole, at several times its size: uploads at once from one
    # supplier's key ran the host out of memory (a security review).
    ledger = bounded_uploads_ledger
    half = b"sku,quantity\n" + b"A-1,1\n" * (UPLOADS_IN_FLIGHT // 12)
    sending, answered = threading.Event(), threading.Event()

    def slowly() -> Iterator[bytes]:
        yield half
        sending.set()
        answered.wait(30)  # held open until the second upload is answered
        yield b"A-2,2\n"

    with ledger.client("test-admin") as admin:
        supplier = f"up-{uuid.uuid4().hex[:6]}"
        assert admin.put(f"/v1/suppliers/{supplier}", json={"name": supplier}).status_code in (
            200,
            201,
        )
        path = f"/v1/suppliers/{supplier}/feeds"
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                admin.post,
                path,
                params={"format": "csv"},
                content=slowly(),
                headers={"X-Ledger-Delivery": "held-open"},
            )
            assert sending.wait(30)
            time.sleep(0.5)  # the first upload's bytes reach the server
            busy = admin.post(
                path, params={"format": "csv"}, content=half, headers={"X-Ledger-Delivery": "busy"}
            )
            small = admin.post(path, params={"format": "csv"}, content=b"sku,quantity\nA-3,3\n")
            answered.set()
            held = first.result(30)
        again = admin.post(
            path, params={"format": "csv"}, content=half, headers={"X-Ledger-Delivery": "busy"}
        )

    refused(busy, 503, "uploads_busy")
    assert busy.headers["Retry-After"] == "5"
    # A small upload beside it fits; and one upload alone always passes.
    assert small.status_code == 202, small.text
    assert held.status_code == 202, held.text
    assert again.status_code == 202, again.text


def test_webhook_bodies_past_those_a_server_holds_at_once_are_refused_to_be_sent_again(
    bounded_uploads_ledger: Server,
) -> None:
    # Webhook bodies are read before anything is known of their sender; uncounted, bodies
    # sent at once to webhook paths were held without a bound. They have a bound of their
    # own: counted with the uploads, anyone could lock every supplier's uploads out.
    ledger = bounded_uploads_ledger
    half = b"{" + b" " * (UPLOADS_IN_FLIGHT // 2 + 10) + b"}"
    sending, answered = threading.Event(), threading.Event()

    def slowly() -> Iterator[bytes]:
        yield half[:-1]
        sending.set()
        answered.wait(30)  # held open until the others are answered
        yield half[-1:]

    path = f"/v1/suppliers/nobody-{uuid.uuid4().hex[:6]}/webhook"
    with ledger.client("test-admin") as admin, httpx.Client(base_url=ledger.base_url) as anyone:
        supplier = f"up-{uuid.uuid4().hex[:6]}"
        admin.put(f"/v1/suppliers/{supplier}", json={"name": supplier}).raise_for_status()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(anyone.post, path, content=slowly())
            assert sending.wait(30)
            time.sleep(0.5)  # the first webhook's bytes reach the server
            busy = anyone.post(path, content=half)
            upload = admin.post(
                f"/v1/suppliers/{supplier}/feeds",
                params={"format": "csv"},
                content=b"sku,quantity\n" + b"A-1,1\n" * (UPLOADS_IN_FLIGHT // 12),
            )
            answered.set()
            held = first.result(30)
        again = anyone.post(path, content=half)

    refused(busy, 503, "webhooks_busy")
    assert busy.headers["Retry-After"] == "5"
    assert upload.status_code == 202, upload.text  # the uploads' bound is their own
    # Read whole and handed to the route, which knows no such supplier.
    refused(held, 401, "webhook_not_configured")
    refused(again, 401, "webhook_not_configured")


@pytest.mark.alone
def test_a_webhook_whose_body_does_not_arrive_in_time_is_refused(
    bounded_uploads_ledger: Server,
) -> None:
    # Slow bodies held the webhooks' bound (above), and suppliers' webhooks waited, for as
    # long as their sender liked.
    url = httpx.URL(bounded_uploads_ledger.base_url)
    half = UPLOADS_IN_FLIGHT // 2 + 10
    head = (
        f"POST /v1/suppliers/slow/webhook HTTP/1.1\r\nHost: {url.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {half + 100}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(head + b" " * half)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    waited = time.monotonic() - started

    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"error":"body_timeout"' in answer
    assert 4.5 < waited < 15  # LEDGER_WEBHOOK_BODY_SECONDS


def _padded_order(size: int) -> bytes:
    body = json.dumps({"order_id": "o" * size, "lines": [{"sku": "x", "quantity": 1}]})
    return body.encode()


def test_a_body_over_the_limit_is_refused_whether_it_declares_its_length_or_not(
    small_body_ledger: Server,
) -> None:
    too_big = _padded_order(SMALL_BODY_LIMIT)
    assert len(too_big) > SMALL_BODY_LIMIT

    def in_chunks() -> Iterator[bytes]:
        for start in range(0, len(too_big), 256):
            yield too_big[start : start + 256]

    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": uuid.uuid4().hex,
        "X-Request-ID": "too-big-1",
    }
    with small_body_ledger.client("test-oms") as oms:
        declared = oms.post("/v1/reservations", content=too_big, headers=headers)
        chunked = oms.post("/v1/reservations", content=in_chunks(), headers=headers)
        small = oms.post("/v1/reservations", content=_padded_order(10), headers=headers)

    assert "Content-Length" in declared.request.headers
    assert chunked.request.headers.get("Transfer-Encoding") == "chunked"
    refused(declared, 413, "payload_too_large")
    refused(chunked, 413, "payload_too_large")
    # Written as every other error body is (it had spaces after its separators).
    assert declared.content.startswith(b'{"error":"payload_too_large","detail":"')
    assert chunked.headers["X-Request-ID"] == "too-big-1"
    # Under the limit the body reaches the handler, which knows no SKU "x".
    refused(small, 422, "unknown_sku")
    assert "http.unexpected_error" not in small_body_ledger.log()


def test_an_order_whose_body_never_arrives_whole_is_not_taken(
    ledger: Server, oms: httpx.Client, sku: str
) -> None:
    """A client that declares a longer body than it sends, then hangs up: the order it
    did send is valid JSON, but nothing is done with it (the same key later is news)."""
    key = uuid.uuid4().hex
    body = json.dumps({"order_id": key, "lines": [{"sku": sku, "quantity": 1}]}).encode()
    url = httpx.URL(ledger.base_url)
    head = (
        f"POST /v1/reservations HTTP/1.1\r\nHost: {url.host}\r\n"
        f"Authorization: Bearer test-oms\r\nIdempotency-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.host, url.port)) as sock:
        sock.sendall(head + body)
        time.sleep(0.3)  # the server has read what was sent
    time.sleep(0.3)  # and heard the client go

    taken = oms.post("/v1/reservations", json=json.loads(body), headers={"Idempotency-Key": key})
    assert taken.status_code == 201, taken.text
    assert "Idempotent-Replayed" not in taken.headers


# The log ------------------------------------------------------------------------------------------


def test_a_key_over_its_rate_is_refused_with_when_to_try_again_and_nothing_is_applied(
    postgres_server_url: str, tmp_path: Path
) -> None:
    limits = {"LEDGER_RATE_LIMIT_PER_SECOND": "1", "LEDGER_RATE_LIMIT_BURST": "3"}
    with serving(postgres_server_url, tmp_path, 1, extra_env=limits) as limited:
        with limited.client("test-admin") as admin:
            assert admin.put("/v1/suppliers/acme", json={"name": "Acme"}).status_code == 200
            assert admin.put("/v1/skus/RL-1", json={"safety_stock": 0}).status_code == 200
            mapping = {"supplier_sku": "A-RL-1", "sku": "RL-1", "units_per_supplier_unit": 1}
            mapped = admin.put("/v1/suppliers/acme/mappings", json={"mappings": [mapping]})
            assert mapped.status_code == 200  # so acme's key may name RL-1
        with limited.client("test-acme", consistent=False) as supplier:
            reports = [
                supplier.post(
                    "/v1/suppliers/acme/stock",
                    json={"observations": [{"sku": "RL-1", "quantity": n, "observed_at": at}]},
                )
                for n, at in enumerate(
                    (datetime.now(UTC) - timedelta(seconds=10 - n)).isoformat() for n in range(5)
                )
            ]
        with limited.client("test-oms", consistent=False) as oms:
            after = {"min_position": reports[2].headers["X-Ledger-Position"]}
            reads = [oms.get("/v1/availability/RL-1", params=after) for _ in range(6)]

        assert [r.status_code for r in reports] == [200, 200, 200, 429, 429]
        refused = reports[3]
        assert refused.json()["error"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1
        assert [r.status_code for r in reads] == [200] * 6  # an OMS key is not limited
        # The refused reports changed nothing: the level is the last one let through.
        assert reads[-1].json()["on_hand"] == 2

        time.sleep(int(refused.headers["Retry-After"]))
        with limited.client("test-shop", consistent=False) as shop:
            assert shop.get("/v1/availability/RL-1").status_code == 200
        with limited.client("test-acme", consistent=False) as supplier:
            again = supplier.post(
                "/v1/suppliers/acme/stock",
                json={
                    "observations": [
                        {"sku": "RL-1", "quantity": 7, "observed_at": datetime.now(UTC).isoformat()}
                    ]
                },
            )
        assert again.status_code == 200, again.text


def test_the_log_shows_no_unexpected_error_and_no_key_secret(ledger: Server) -> None:
    """Runs last: the module's requests above all went to this server."""
    log = ledger.log()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]

    assert sum(event.get("event") == "http.request" for event in events) > 100
    unexpected = [e["path"] for e in events if e.get("event") == "http.unexpected_error"]
    assert unexpected == [], f"500s were answered on {unexpected}"
    assert [e for e in events if e.get("level") in ("error", "critical")] == []
    for entry in TEST_KEYS.split(","):
        secret = entry.split(":")[2]
        assert secret not in log, f"the log contains the secret of {entry.split(':')[0]}"


def test_a_feed_s_large_limit_is_only_for_keys_that_may_upload_it(
    small_body_ledger: Server,
) -> None:
    """Found by a security review: any known key (a storefront's, semi-public) could send
    a feed-sized body (512 MiB) to any `/feeds` path, read whole before the route's 403."""
    body = b"sku,quantity\n" + b"A,1\n" * 600  # over the usual limit here, 1 KiB
    assert len(body) > SMALL_BODY_LIMIT
    answers = {}
    for key in ("test-shop", "test-oms", "test-admin", "acme-feed"):
        with small_body_ledger.client(key) as client:
            answers[key] = client.post("/v1/suppliers/acme/feeds?format=csv", content=body)
    refused(answers["test-shop"], 413, "payload_too_large")
    refused(answers["test-oms"], 413, "payload_too_large")
    # Those that may upload to acme get as far as the route (acme is not registered here).
    for key in ("test-admin", "acme-feed"):
        assert answers[key].status_code != 413, answers[key].text


# Found by an API fuzzing walkthrough: each of these was written.


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/skus/%C2%9Fz", {"safety_stock": 0}),  # a C1 control
        ("/v1/skus/%FFq", {"safety_stock": 1}),  # not UTF-8: read as U+FFFD
        ("/v1/skus/%FEq", {"safety_stock": 2}),  # ... the same SKU as the one above
    ],
    ids=["c1-control", "not-utf8-ff", "not-utf8-fe"],
)
def test_an_identifier_with_a_c1_control_or_bytes_not_utf8_is_refused(
    admin: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    refused(admin.put(path, json=body), 422, "validation_error")
    mapped = admin.put(
        "/v1/suppliers/acme/mappings",
        json={"mappings": [{"supplier_sku": "C1", "sku": "x\u0085y"}]},
    )
    refused(mapped, 422, "validation_error")


def test_a_delivery_header_not_in_printable_ascii_is_refused(acme: httpx.Client) -> None:
    for raw in (b"d\xc2\x85x", "\U0001f600".encode()):  # as UTF-8, which HTTP reads as Latin-1
        answer = acme.post(
            "/v1/suppliers/acme/feeds",
            content=b"sku,quantity\nA,1\n",
            headers=[("X-Ledger-Delivery", raw)],
        )
        refused(answer, 422, "validation_error")


@pytest.mark.parametrize(
    "terms",
    [
        {"priority": True},
        {"priority": "1"},
        {"buffer": False},
        {"stale_after_seconds": "600"},
        {"reports_net_of_our_orders": "1"},
        {"reports_net_of_our_orders": 1},
    ],
)
def test_supplier_terms_take_numbers_as_numbers_and_booleans_as_booleans(
    admin: httpx.Client, terms: dict[str, Any]
) -> None:
    supplier_id = new_supplier(admin)
    before = admin.get(f"/v1/suppliers/{supplier_id}").json()

    refused(admin.put(f"/v1/suppliers/{supplier_id}", json=terms), 422, "validation_error")
    assert admin.get(f"/v1/suppliers/{supplier_id}").json() == before
    mapped = admin.put(
        f"/v1/suppliers/{supplier_id}/mappings",
        json={"mappings": [{"supplier_sku": "T", "sku": "T", "units_per_supplier_unit": True}]},
    )
    refused(mapped, 422, "validation_error")


def test_a_reservation_id_that_is_no_uuid_is_not_found_and_not_echoed(
    oms: httpx.Client,
) -> None:
    for sent in ("%00", "not-a-uuid%1B%5B31m"):
        answer = oms.get(f"/v1/reservations/{sent}")
        detail = refused(answer, 404, "reservation_not_found")
        assert "\x00" not in answer.text
        assert "\\u0000" not in answer.text
        assert "not-a-uuid" not in str(detail)


def test_a_request_with_two_authorization_headers_is_refused(ledger: Server, sku: str) -> None:
    """Which key acts? The first was used, silently (an OMS walkthrough)."""
    keys = [("Authorization", "Bearer test-shop"), ("Authorization", "Bearer test-admin")]
    with httpx.Client(base_url=ledger.base_url) as anyone:
        answer = anyone.get(f"/v1/availability/{sku}", headers=keys)
        written = anyone.put(f"/v1/skus/{sku}", json={"safety_stock": 7}, headers=keys)
    refused(answer, 400, "invalid_authorization")
    refused(written, 400, "invalid_authorization")


@pytest.mark.parametrize(
    ("method", "path", "header", "values"),
    [
        ("POST", "/v1/suppliers/acme/feeds?format=csv", "X-Ledger-Delivery", ("hA", "hB")),
        ("GET", "/v1/availability/{sku}", "X-Min-Position", ("1", "999999")),
        ("POST", "/v1/suppliers/acme/webhook", "X-Ledger-Signature", ("sha256=00", "sha256=11")),
        ("POST", "/v1/suppliers/acme/webhook", "X-Ledger-Timestamp", ("1", "2")),
        ("GET", "/v1/stream/availability?sku={sku}", "Last-Event-ID", ("1", "999999")),
    ],
)
def test_a_ledger_header_sent_twice_is_refused(
    ledger: Server, sku: str, method: str, path: str, header: str, values: tuple[str, str]
) -> None:
    """Which one counts? A second X-Ledger-Delivery was dropped (the upload kept under the
    first id), a second X-Min-Position not read, and of two webhook signatures the first
    decided (an operator walkthrough)."""
    sent = [("Authorization", "Bearer test-admin"), *((header, value) for value in values)]
    with httpx.Client(base_url=ledger.base_url) as client:
        answer = client.request(
            method, path.format(sku=sku), headers=sent, content=b"sku,quantity\nA,1\n"
        )
    assert header in str(refused(answer, 400, "repeated_header"))


def test_an_order_with_two_idempotency_keys_is_refused(oms: httpx.Client, sku: str) -> None:
    answer = oms.post(
        "/v1/reservations",
        json=order(sku),
        headers=[("Idempotency-Key", "dup-a"), ("Idempotency-Key", "dup-b")],
    )
    refused(answer, 400, "invalid_idempotency_key")
    placed = oms.post("/v1/reservations", json=order(sku), headers={"Idempotency-Key": "dup-b"})
    assert placed.status_code == 201
    assert "Idempotent-Replayed" not in placed.headers  # nothing was placed under either


@pytest.mark.parametrize("authorization", ["", "Authorization: Bearer nobody\r\n"])
def test_a_body_sent_with_no_known_key_is_refused_before_it_is_read(
    ledger: Server, authorization: str
) -> None:
    """A hundred bodies of 1 MiB each, sent with no key, were held at once (the process
    grew by 110 MB, a security review): a request with none is answered `401` at once,
    before its body has come."""
    url = httpx.URL(ledger.base_url)
    head = (
        f"POST /v1/reservations HTTP/1.1\r\nHost: {url.host}\r\n{authorization}"
        "Content-Type: application/json\r\nIdempotency-Key: k\r\n"
        f"Content-Length: {SMALL_BODY_LIMIT * 900}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.host, url.port), timeout=5) as sock:
        sock.sendall(head + b"{")  # and nothing more: the body never comes whole
        answer = b""
        while not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk

    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"www-authenticate: Bearer" in answer.lower().replace(b"bearer", b"Bearer")
    assert b'"error":"unauthorized"' in answer
