"""`/openapi.json` tells the truth: the answers a real server gives fit what it declares."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from connectors.webhooks import sign
from tests.conftest import Server, random_sku, serving

SECRET = "whsec-openapi-0123456789"
SKU = random_sku("OPENAPI")  # in the catalogue, with no stock
SUPPLIER = f"openapi-{uuid.uuid4().hex[:8]}"  # takes uploads and signed webhooks
GHOST = "ghost-supplier"  # never created
RAW_TYPES = {
    "application/octet-stream",
    "text/csv",
    "application/json",
    "application/xml",
    "application/edi-x12",
}


@pytest.fixture(scope="module")
def ledger(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"OPENAPI_WEBHOOK_SECRET": SECRET}
    with serving(postgres_server_url, tmp_path_factory.mktemp("openapi"), 1, env) as running:
        with running.client("test-admin") as admin:
            assert admin.put(f"/v1/skus/{SKU}", json={"safety_stock": 0}).status_code == 200
            connector = {"webhook": {"secret_ref": "env:OPENAPI_WEBHOOK_SECRET"}}
            terms = {"name": "OpenAPI", "connector": connector}
            assert admin.put(f"/v1/suppliers/{SUPPLIER}", json=terms).status_code == 200
        yield running


@pytest.fixture(scope="module")
def document(ledger: Server) -> dict[str, Any]:
    answer = httpx.get(f"{ledger.base_url}/openapi.json", timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


# A small JSON Schema checker, for the keywords the document uses (jsonschema is not
# installed); a keyword it does not know fails the test rather than pass unchecked.
ANNOTATIONS = {"title", "description", "examples", "default", "format"}
CHECKED = {"$ref", "type", "properties", "required", "items", "anyOf", "additionalProperties"} | {
    "enum"
}
TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = document
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def check(value: Any, schema: dict[str, Any], document: dict[str, Any], at: str = "body") -> None:
    """Asserts `value` is valid under `schema`."""
    schema = resolve(document, schema)
    unknown = set(schema) - ANNOTATIONS - CHECKED
    assert not unknown, f"{at}: the test cannot check {unknown}"
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(_is(value, name) for name in names), f"{at}: {value!r} is not {names}"
    if "enum" in schema:
        assert value in schema["enum"], f"{at}: {value!r} is not one of {schema['enum']}"
    if "anyOf" in schema:
        assert any(_holds(value, option, document) for option in schema["anyOf"]), (
            f"{at}: {value!r} fits none of {schema['anyOf']}"
        )
    if isinstance(value, dict):
        missing = set(schema.get("required", ())) - set(value)
        assert not missing, f"{at}: {sorted(missing)} missing from {value!r}"
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                check(item, properties[name], document, f"{at}.{name}")
            elif schema.get("additionalProperties") is False:
                raise AssertionError(f"{at}: {name!r} is not declared")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            check(item, schema["items"], document, f"{at}[{index}]")


def _is(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in {"integer", "number"}:
        return False
    return isinstance(value, TYPES[name])


def _holds(value: Any, schema: dict[str, Any], document: dict[str, Any]) -> bool:
    try:
        check(value, schema, document)
    except AssertionError:
        return False
    return True


def declared(document: dict[str, Any], method: str, path: str, status: int) -> dict[str, Any]:
    responses = document["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} declares no {status}"
    return dict(responses[str(status)])


# Refusals, real ones --------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A request the API refuses, the operation it is declared under and what it answers."""

    key: str | None
    method: str
    url: str
    path: str  # as the document names the operation
    status: int
    error: str
    detail: type  # a string, a list or an object
    send: dict[str, Any] = field(default_factory=dict)  # the request's content, headers...


def order(sku: str) -> dict[str, Any]:
    return {
        "json": {"order_id": "o-1", "lines": [{"sku": sku, "quantity": 1}]},
        "headers": {"Idempotency-Key": uuid.uuid4().hex},
    }


FEEDS = "/v1/suppliers/{supplier_id}/feeds"
WEBHOOK = "/v1/suppliers/{supplier_id}/webhook"
JSON = {"Content-Type": "application/json"}
REFUSALS = [
    pytest.param(
        Refusal(None, "get", f"/v1/availability/{SKU}", "/v1/availability/{sku}", 401,
                "unauthorized", str),
        id="no key",
    ),
    pytest.param(
        Refusal("not-a-key", "post", f"/v1/suppliers/{SUPPLIER}/feeds", FEEDS, 401,
                "unauthorized", str, {"content": b"x"}),
        id="an unknown key, refused before the upload is read",
    ),
    pytest.param(
        Refusal("test-shop", "put", f"/v1/skus/{SKU}", "/v1/skus/{sku}", 403, "forbidden", str,
                {"json": {"safety_stock": 1}}),
        id="a role that may not",
    ),
    pytest.param(
        Refusal("test-acme", "post", f"/v1/suppliers/{SUPPLIER}/feeds", FEEDS, 403, "forbidden",
                str, {"content": b"x"}),
        id="another supplier's upload",
    ),
    pytest.param(
        Refusal("test-admin", "get", f"/v1/suppliers/{GHOST}", "/v1/suppliers/{supplier_id}",
                404, "unknown_supplier", dict),
        id="an unknown supplier",
    ),
    pytest.param(
        Refusal(None, "post", f"/v1/suppliers/{GHOST}/webhook", WEBHOOK, 401,
                "webhook_not_configured", str, {"content": b"{}"}),
        id="a webhook to an unknown supplier",
    ),
    pytest.param(
        Refusal(None, "post", f"/v1/suppliers/{SUPPLIER}/webhook", WEBHOOK, 401,
                "missing_signature", str, {"content": b"{}"}),
        id="an unsigned webhook",
    ),
    pytest.param(
        Refusal("test-oms", "post", "/v1/reservations", "/v1/reservations", 409,
                "insufficient_stock", dict, order(SKU)),
        id="not enough stock",
    ),
    pytest.param(
        Refusal("test-oms", "post", "/v1/reservations", "/v1/reservations", 400,
                "malformed_json", str,
                {"content": b"{", "headers": {**JSON, "Idempotency-Key": "k-1"}}),
        id="malformed JSON",
    ),
    pytest.param(
        Refusal("test-audit", "get", f"/v1/skus/{SKU}/stock", "/v1/skus/{sku}/stock", 422,
                "validation_error", list),
        id="neither at nor position",
    ),
    pytest.param(
        Refusal("test-oms", "post", "/v1/reservations", "/v1/reservations", 422,
                "unknown_sku", dict, order(random_sku("NOPE"))),
        id="an order for an unknown SKU",
    ),
    pytest.param(
        Refusal("test-admin", "put", f"/v1/skus/{SKU}", "/v1/skus/{sku}", 422,
                "validation_error", list, {"json": {"safety_stock": "many"}}),
        id="a field of the wrong type",
    ),
    pytest.param(
        Refusal("test-admin", "post", f"/v1/suppliers/{SUPPLIER}/feeds", FEEDS, 422,
                "empty_feed", str, {"content": b""}),
        id="an empty upload",
    ),
    pytest.param(
        Refusal("test-admin", "put", f"/v1/skus/{SKU}", "/v1/skus/{sku}", 413,
                "payload_too_large", str, {"content": b" " * (1_048_576 + 1), "headers": JSON}),
        id="a body over the limit",
    ),
]  # fmt: skip


def test_a_remap_refused_for_an_open_order_fits_the_declared_409(
    ledger: Server, document: dict[str, Any]
) -> None:
    """A remap off a SKU with an order open (`orders_open_on_remap`) is declared: its
    `detail` names what is open."""
    old, new = random_sku("OPENAPI-OLD"), random_sku("OPENAPI-NEW")
    now = datetime.now(UTC).isoformat()
    mappings = f"/v1/suppliers/{SUPPLIER}/mappings"
    with ledger.client("test-admin") as admin, ledger.client("test-oms") as oms:
        moved_off = {"mappings": [{"supplier_sku": "OA-REMAP", "sku": old}]}
        assert admin.put(mappings, json=moved_off).status_code == 200
        report = {"observations": [{"supplier_sku": "OA-REMAP", "quantity": 5, "observed_at": now}]}
        assert admin.post(f"/v1/suppliers/{SUPPLIER}/stock", json=report).status_code == 200
        held = oms.post("/v1/reservations", **order(old))
        assert held.status_code == 201, held.text
        answer = admin.put(mappings, json={"mappings": [{"supplier_sku": "OA-REMAP", "sku": new}]})

    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == "orders_open_on_remap"
    schema = declared(document, "put", "/v1/suppliers/{supplier_id}/mappings", 409)
    check(answer.json(), schema["content"]["application/json"]["schema"], document)


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_refusal_fits_the_schema_the_document_declares_for_it(
    ledger: Server, document: dict[str, Any], refusal: Refusal
) -> None:
    with ledger.client(refusal.key, consistent=False) as client:
        answer = client.request(refusal.method, refusal.url, **refusal.send)
    assert answer.status_code == refusal.status, answer.text
    body = answer.json()
    assert body["error"] == refusal.error, body
    assert isinstance(body["detail"], refusal.detail), body

    response = declared(document, refusal.method, refusal.path, refusal.status)
    media_type = answer.headers["content-type"].partition(";")[0]
    assert media_type in response["content"], response
    schema = response["content"][media_type]["schema"]
    # The envelope, not a model that an envelope happens to fit (FastAPI's 422 does).
    assert {"error", "detail"} <= set(resolve(document, schema).get("required", ())), schema
    check(body, schema, document)


def test_the_document_declares_no_error_but_the_envelope(document: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) < 400 or (path, status) == ("/readyz", "503"):
                    continue
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (method, path, status)


def test_readiness_is_declared_ready_or_not_with_the_body_it_answers(
    document: dict[str, Any], ledger: Server
) -> None:
    """A newcomer's walkthrough: the 503 of `/readyz` was declared with an empty schema."""
    answer = httpx.get(f"{ledger.base_url}/readyz", timeout=10)
    responses = document["paths"]["/readyz"]["get"]["responses"]
    for status in ("200", "503"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert {"status", "checks"} <= set(resolve(document, schema).get("required", ()))
        check(answer.json(), schema, document)
    assert answer.json()["status"] == "ready"


def test_every_keyed_operation_declares_the_refusals_of_keys_limits_and_outages(
    document: dict[str, Any],
) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            # Any operation may fail on the service's side (api.errors.on_unexpected), or
            # be sent a header twice that is read once (api.middleware.ONCE).
            assert {"400", "500"} <= statuses, (method, path)
            if path.startswith("/v1/") and path != WEBHOOK:
                assert {"401", "403", "429", "503"} <= statuses, (method, path)
            if "requestBody" in operation:
                assert "413" in statuses, (method, path)


def test_every_keyed_operation_and_only_those_declare_the_bearer_key(
    document: dict[str, Any], ledger: Server
) -> None:
    scheme = document["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    keyed, open_ = [], []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            named = operation.get("security") == [{"apiKey": []}]
            (keyed if path.startswith("/v1/") and path != WEBHOOK else open_).append(
                (method, path, named)
            )
    assert keyed
    assert all(named for _, _, named in keyed), keyed
    assert not any(named for _, _, named in open_), open_
    # What the scheme says is what the API takes: the key as a bearer token.
    with ledger.client("test-admin") as admin:
        assert admin.get("/v1/feeds/health").status_code == 200
    assert httpx.get(f"{ledger.base_url}/v1/feeds/health").status_code == 401


# Bodies and media types -----------------------------------------------------------------------


def test_the_audit_log_is_declared_as_the_ndjson_it_answers(
    ledger: Server, document: dict[str, Any]
) -> None:
    with ledger.client("test-audit") as auditor:
        answer = auditor.get("/v1/audit/events", params={"limit": 5})
    assert answer.status_code == 200, answer.text
    assert [json.loads(line)["position"] for line in answer.text.splitlines()]
    ok = declared(document, "get", "/v1/audit/events", 200)
    assert set(ok["content"]) == {answer.headers["content-type"]} == {"application/x-ndjson"}


def test_the_availability_stream_is_declared_as_the_event_stream_it_answers(
    ledger: Server, document: dict[str, Any]
) -> None:
    with (
        ledger.client("test-shop") as shop,
        shop.stream("GET", "/v1/stream/availability", params={"sku": SKU}) as answer,
    ):
        media_type = answer.headers["content-type"].partition(";")[0]
    assert answer.status_code == 200
    ok = declared(document, "get", "/v1/stream/availability", 200)
    assert set(ok["content"]) == {media_type} == {"text/event-stream"}


def test_the_upload_and_the_webhook_declare_the_raw_body_they_read(
    ledger: Server, document: dict[str, Any]
) -> None:
    for path in (FEEDS, WEBHOOK):
        body = document["paths"][path]["post"].get("requestBody")
        assert body is not None, f"{path} declares no request body"
        assert body["required"] is True
        assert set(body["content"]) == RAW_TYPES, body

    csv = f"sku;quantity;observed_at\r\nA-1;3;{datetime.now(UTC).isoformat()}\r\n".encode()
    payload = b'{"observations": []}'
    at = int(time.time())
    signature = {"X-Ledger-Signature": sign(SECRET, at, payload), "X-Ledger-Timestamp": str(at)}
    with ledger.client("test-admin") as admin, httpx.Client(base_url=ledger.base_url) as anyone:
        uploaded = admin.post(
            f"/v1/suppliers/{SUPPLIER}/feeds",
            params={"format": "csv"},
            content=csv,
            headers={"Content-Type": "text/csv"},
        )
        pushed = anyone.post(
            f"/v1/suppliers/{SUPPLIER}/webhook",
            content=payload,
            headers={**signature, "Content-Type": "application/json"},
        )
    assert uploaded.status_code == pushed.status_code == 202, (uploaded.text, pushed.text)


def test_the_documentation_page_still_serves(ledger: Server) -> None:
    answer = httpx.get(f"{ledger.base_url}/docs", timeout=10)
    assert answer.status_code == 200
    assert "/openapi.json" in answer.text


def test_an_order_declares_the_idempotency_key_it_cannot_be_sent_without(
    ledger: Server, document: dict[str, Any]
) -> None:
    """It was declared optional, and a client generated from the document sent orders
    without it, each refused `400 missing_idempotency_key` (an OMS engineer's walkthrough)."""
    [key] = [
        parameter
        for parameter in document["paths"]["/v1/reservations"]["post"]["parameters"]
        if parameter["name"] == "Idempotency-Key"
    ]
    with ledger.client("test-oms") as oms:
        order = {"order_id": "o", "lines": [{"sku": "A-1", "quantity": 1}]}
        unkeyed = oms.post("/v1/reservations", json=order)

    assert (key["in"], key["required"]) == ("header", True)
    assert (unkeyed.status_code, unkeyed.json()["error"]) == (400, "missing_idempotency_key")
