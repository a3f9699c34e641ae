"""Lone UTF-16 surrogates (JSON's "\\ud800", which UTF-8 cannot encode) from clients and
suppliers: the text holding one is refused, never a 500, and never a delivery failed."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.webhooks import sign
from tests.conftest import Server, random_sku, serving

SECRET = "whsec-surrogates-0123456789"


@pytest.fixture(scope="module")
def ledger(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"TEST_WEBHOOK_SECRET": SECRET}
    with serving(postgres_server_url, tmp_path_factory.mktemp("surrogates"), 1, env) as running:
        yield running


@pytest.fixture(scope="module")
def admin(ledger: Server) -> Iterator[httpx.Client]:
    with ledger.client("test-admin") as client:
        yield client


def iso() -> str:
    return (datetime.now(UTC) - timedelta(seconds=30)).isoformat()


def as_json(body: Any) -> dict[str, Any]:
    """`body` written as JSON with lone surrogates as `\\ud800` escapes (the default,
    ASCII-only writing), as a client that sends one does."""
    return {"content": json.dumps(body), "headers": {"Content-Type": "application/json"}}


def new_supplier(admin: httpx.Client, mappings: dict[str, str], **connector: Any) -> str:
    supplier_id = random_sku("sup")
    connector.setdefault("webhook", {"secret_ref": "env:TEST_WEBHOOK_SECRET"})
    put = admin.put(f"/v1/suppliers/{supplier_id}", json={"name": "s", "connector": connector})
    assert put.status_code == 200, put.text
    if mappings:
        body = {"mappings": [{"supplier_sku": s, "sku": sku} for s, sku in mappings.items()]}
        assert admin.put(f"/v1/suppliers/{supplier_id}/mappings", json=body).status_code == 200
    return supplier_id


def on_hand(admin: httpx.Client, sku: str, position: int | None = None) -> int:
    params = {} if position is None else {"min_position": position}
    answer = admin.get(f"/v1/availability/{sku}", params=params)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["on_hand"])


def finished(admin: httpx.Client, supplier_id: str, delivery_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        status = admin.get(f"/v1/feeds/{delivery_id}", params={"supplier_id": supplier_id})
        assert status.status_code == 200, status.text
        if status.json()["status"] in {"applied", "rejected", "failed"}:
            return dict(status.json())
        assert time.monotonic() < deadline, status.json()
        time.sleep(0.1)


# Stock reports ------------------------------------------------------------------------------

BAD_OBSERVATIONS = {
    "unknown-field-value": {"note": "\ud800"},
    "unknown-field-name": {"\udc00note": 1},
    "unit": {"unit": "\ud800"},
    "quantity": {"quantity": "\ud800"},
    "incoming-expected-on": {"incoming": [{"quantity": 1, "expected_on": "\ud800"}]},
    "incoming-field-name": {"incoming": [{"quantity": 1, "\ud800": 1}]},
    "supplier-sku": {"supplier_sku": "SUR\ud800"},
}


@pytest.mark.parametrize("bad", BAD_OBSERVATIONS.values(), ids=BAD_OBSERVATIONS.keys())
def test_a_report_record_holding_a_lone_surrogate_is_refused_alone_and_the_rest_applied(
    admin: httpx.Client, bad: dict[str, Any]
) -> None:
    sku = random_sku()
    supplier_id = new_supplier(admin, {"SUR-OK": sku})
    good = {"supplier_sku": "SUR-OK", "quantity": 7, "observed_at": iso()}

    answer = admin.post(
        f"/v1/suppliers/{supplier_id}/stock",
        **as_json({"observations": [good, {**good, "quantity": 1, **bad}]}),
    )

    assert answer.status_code == 200, answer.text
    outcome = answer.json()
    assert (outcome["rows"], outcome["applied"]) == (2, 1)
    [refusal] = outcome["rejected"]
    assert refusal["index"] == 1
    assert refusal["reason"].startswith("invalid_record: "), refusal
    assert on_hand(admin, sku) == 7


# Connector settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "connector",
    [
        {"units": {"\udc00": 2}},
        {"options": {"delimiter": "\ud800"}},
        {"webhook": {"secret_ref": "env:\ud800"}},
    ],
    ids=["unit-name", "delimiter", "webhook-secret-ref"],
)
def test_connector_settings_holding_a_lone_surrogate_are_refused_with_a_reason(
    admin: httpx.Client, connector: dict[str, Any]
) -> None:
    answer = admin.put(
        f"/v1/suppliers/{random_sku('sup')}", **as_json({"name": "x", "connector": connector})
    )

    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "validation_error"
    assert "lone UTF-16 surrogate" in answer.text


# Feeds --------------------------------------------------------------------------------------


def feed_records(observed_at: str) -> list[dict[str, Any]]:
    """A good record, then one holding a lone surrogate in each field that is kept as text."""
    return [
        {"sku": "F-OK", "quantity": 4, "observed_at": observed_at},
        {"sku": "F\ud800", "quantity": 1, "observed_at": observed_at},
        {"upc": "0\udc0012345678", "quantity": 1, "observed_at": observed_at},
        {"sku": "F-OK", "quantity": 1, "unit": "C\ud800S", "observed_at": observed_at},
        # Not one of ours: it applies, and is kept as written, as far as it can be.
        {"sku": "F-OTHER", "quantity": 2, "observed_at": observed_at, "n\ud800": "\udfff"},
        # A surrogate pair is one character, which any text may hold.
        {"sku": "F-\ud83d\ude00", "quantity": 3, "observed_at": observed_at},
    ]


def assert_refused_alone(
    admin: httpx.Client, supplier_id: str, delivery_id: str, skus: dict[str, str]
) -> None:
    status = finished(admin, supplier_id, delivery_id)
    assert status["status"] == "applied", status
    assert (status["rows"], status["applied"], status["rejected"]) == (6, 3, 3), status
    position = status["position"]
    assert on_hand(admin, skus["F-OK"], position) == 4
    assert on_hand(admin, skus["F-OTHER"], position) == 2
    assert on_hand(admin, skus["F-\U0001f600"], position) == 3
    letters = admin.get("/v1/dead-letters", params={"supplier_id": supplier_id}).json()["items"]
    assert [(letter["position"], letter["reason"]) for letter in letters] == [
        (2, "lone_surrogate"),
        (3, "lone_surrogate"),
        (4, "lone_surrogate"),
    ]
    assert letters[0]["record"]["supplier_sku"] == "F\ufffd"


def feed_skus() -> dict[str, str]:
    return {name: random_sku() for name in ("F-OK", "F-OTHER", "F-\U0001f600")}


def test_a_json_feed_record_holding_a_lone_surrogate_is_refused_alone_as_a_dead_letter(
    admin: httpx.Client,
) -> None:
    skus = feed_skus()
    supplier_id = new_supplier(admin, skus, format="json")
    body = json.dumps(feed_records(iso())).encode()

    accepted = admin.post(f"/v1/suppliers/{supplier_id}/feeds", content=body)

    assert accepted.status_code == 202, accepted.text
    assert_refused_alone(admin, supplier_id, accepted.json()["delivery_id"], skus)


def test_a_webhook_record_holding_a_lone_surrogate_is_refused_alone_as_a_dead_letter(
    ledger: Server, admin: httpx.Client
) -> None:
    skus = feed_skus()
    supplier_id = new_supplier(admin, skus)
    body = json.dumps({"observations": feed_records(iso())}).encode()
    timestamp = int(time.time())
    headers = {
        "X-Ledger-Signature": sign(SECRET, timestamp, body),
        "X-Ledger-Timestamp": str(timestamp),
        "X-Ledger-Delivery": "surrogates-1",
    }

    with httpx.Client(base_url=ledger.base_url) as anyone:
        hooked = anyone.post(f"/v1/suppliers/{supplier_id}/webhook", content=body, headers=headers)

    assert hooked.status_code == 202, hooked.text
    assert_refused_alone(admin, supplier_id, "surrogates-1", skus)


def test_a_csv_feed_decoded_into_lone_surrogates_refuses_those_records_alone(
    admin: httpx.Client,
) -> None:
    """No UTF-8 bytes decode to a surrogate, but a supplier's `encoding` may (UTF-7 does)."""
    skus = feed_skus()
    supplier_id = new_supplier(admin, skus, format="csv", options={"encoding": "utf-7"})
    at = iso().replace("+00:00", "Z")  # a "+" begins UTF-7's base64
    rows = [
        f"F-OK,,4,,{at},",
        f"F+2AA-,,1,,{at},",  # F\ud800
        f"F-OK,0+3AA-12345678,1,,{at},",  # a UPC with \udc00
        f"F-OK,,1,C+2AA-S,{at},",
        f"F-OTHER,,2,,{at},+3/8-",  # \udfff in a column of no field of ours
        f"F-+2D3eAA-,,3,,{at},",  # F-\U0001f600, as a pair
    ]
    body = ("sku,upc,quantity,unit,observed_at,note\n" + "\n".join(rows) + "\n").encode()

    accepted = admin.post(f"/v1/suppliers/{supplier_id}/feeds", content=body)

    assert accepted.status_code == 202, accepted.text
    assert_refused_alone(admin, supplier_id, accepted.json()["delivery_id"], skus)


def test_a_utf8_csv_feed_with_surrogate_bytes_is_rejected_whole_not_retried(
    admin: httpx.Client,
) -> None:
    """A surrogate's bytes as UTF-8 would write it (CESU-8) are not UTF-8: COPY refuses
    them, and the file, read in Python then, is not in its encoding."""
    supplier_id = new_supplier(admin, {}, format="csv")
    body = f"sku,quantity,observed_at\nA,1,{iso()}\nB\ud800,2,{iso()}\n".encode(
        "utf-8", "surrogatepass"
    )
    assert b"B\xed\xa0\x80," in body

    accepted = admin.post(f"/v1/suppliers/{supplier_id}/feeds", content=body)

    status = finished(admin, supplier_id, accepted.json()["delivery_id"])
    assert status["status"] == "rejected", status
    assert status["error"].startswith("bad_encoding"), status


# Webhook secrets ----------------------------------------------------------------------------


def hook(ledger: Server, supplier_id: str) -> httpx.Response:
    body = b'{"observations": []}'
    timestamp = int(time.time())
    headers = {
        "X-Ledger-Signature": sign("anything", timestamp, body),
        "X-Ledger-Timestamp": str(timestamp),
    }
    with httpx.Client(base_url=ledger.base_url, timeout=10) as anyone:
        return anyone.post(f"/v1/suppliers/{supplier_id}/webhook", content=body, headers=headers)


@pytest.mark.parametrize("kind", ["not-utf8", "fifo", "device", "too-large", "directory"])
def test_a_webhook_secret_file_that_cannot_be_read_as_a_secret_is_a_secret_not_configured(
    ledger: Server, admin: httpx.Client, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "secret"
    if kind == "not-utf8":
        path.write_bytes(b"whsec-\xff\xfe")
    elif kind == "fifo":
        os.mkfifo(path)  # opened to read, it waits for a writer: forever
    elif kind == "device":
        path = Path("/dev/zero")  # read to its end: forever
    elif kind == "too-large":
        path.write_bytes(b"s" * (64 * 1024 + 1))
    else:
        path.mkdir()
    supplier_id = new_supplier(admin, {}, webhook={"secret_ref": f"file:{path}"})

    answer = hook(ledger, supplier_id)

    assert answer.status_code == 401, answer.text
    assert answer.json()["error"] == "webhook_not_configured"


def test_a_webhook_secret_file_is_read_without_its_trailing_newline(
    ledger: Server, admin: httpx.Client, tmp_path: Path
) -> None:
    path = tmp_path / "secret"
    path.write_text("whsec-from-a-file\n")
    supplier_id = new_supplier(admin, {}, webhook={"secret_ref": f"file:{path}"})
    body = b"[]"
    timestamp = int(time.time())
    headers = {
        "X-Ledger-Signature": sign("whsec-from-a-file", timestamp, body),
        "X-Ledger-Timestamp": str(timestamp),
    }

    with httpx.Client(base_url=ledger.base_url, timeout=10) as anyone:
        answer = anyone.post(f"/v1/suppliers/{supplier_id}/webhook", content=body, headers=headers)

    assert answer.status_code == 202, answer.text
    assert answer.json()["delivery_id"]
