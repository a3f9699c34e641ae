"""Every id and name the API accepts can be addressed again by a client that normalises
its URLs (as HTTP clients do: `/v1/suppliers/..` is sent as `/v1/`)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.conftest import Server, random_sku, serving

CSV = f"sku,quantity,observed_at\nN-1,3,{datetime.now(UTC).isoformat()}\n".encode()


@pytest.fixture(scope="module")
def ledger(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(postgres_server_url, tmp_path_factory.mktemp("identifiers"), 1) as running:
        yield running


@pytest.fixture(scope="module")
def admin(ledger: Server) -> Iterator[httpx.Client]:
    with ledger.client("test-admin") as client:
        yield client


@pytest.fixture(scope="module")
def supplier_id(admin: httpx.Client) -> str:
    supplier_id = f"sup-{uuid.uuid4().hex[:8]}"
    assert admin.put(f"/v1/suppliers/{supplier_id}", json={"name": "S"}).status_code == 200
    return supplier_id


def put_raw(server: Server, path: str, body: Any) -> tuple[int, Any]:
    """A PUT of `path` exactly as written: httpx, as browsers and curl do, resolves its
    dot steps first, which is how an id like `..` became unreachable."""
    url = httpx.URL(server.base_url)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=30)
    try:
        headers = {"Authorization": "Bearer test-admin", "Content-Type": "application/json"}
        connection.request("PUT", path, body=json.dumps(body), headers=headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def upload(admin: httpx.Client, supplier_id: str, delivery: str) -> httpx.Response:
    return admin.post(
        f"/v1/suppliers/{supplier_id}/feeds",
        params={"format": "csv"},
        headers={"X-Ledger-Delivery": delivery},
        content=CSV,
    )


def test_a_supplier_id_of_dots_is_refused_since_no_client_could_reach_it_again(
    ledger: Server, admin: httpx.Client
) -> None:
    refused = {
        sid: put_raw(ledger, f"/v1/suppliers/{sid}", {"name": "Dots"}) for sid in (".", "..")
    }
    # Three dots are no path step: sent and found as they are.
    created, _ = put_raw(ledger, "/v1/suppliers/...", {"name": "Dots"})

    for status, body in refused.values():
        assert (status, body.get("error")) == (422, "validation_error"), body
        assert [item["loc"] for item in body["detail"]] == [["path", "supplier_id"]]
    assert created == 200
    assert admin.get("/v1/suppliers/...").json()["name"] == "Dots"


def test_a_supplier_key_for_an_id_no_supplier_can_have_stops_the_server_starting() -> None:
    env = {
        **os.environ,
        # Never reached: the keys are read first.
        "LEDGER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "LEDGER_API_KEYS": "admin:admin:test-admin,feed:supplier:test-feed:..",
    }
    command = [sys.executable, "-m", "api", "serve", "--port", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode != 0
    assert "API key 'feed': '..' is not a supplier id" in done.stdout + done.stderr


@pytest.mark.parametrize("delivery", ["a/../c", "a/./b", "./a", "a/..", "2026/12/.."])
def test_a_delivery_id_with_a_dot_step_is_refused_since_its_location_could_not_be_followed(
    admin: httpx.Client, supplier_id: str, delivery: str
) -> None:
    uploaded = upload(admin, supplier_id, delivery)
    # Refused before the signature is checked, as the other names a delivery cannot take.
    webhook = admin.post(
        f"/v1/suppliers/{supplier_id}/webhook", headers={"X-Ledger-Delivery": delivery}
    )

    for answer in (uploaded, webhook):
        assert (answer.status_code, answer.json().get("error")) == (422, "invalid_delivery_id")
        assert "'.' or '..'" in answer.json()["detail"]


@pytest.mark.parametrize("delivery", ["a//b", "/a", "a/", "a/.../b", ".a/b."])
def test_a_delivery_id_with_steps_clients_send_as_they_are_is_found_at_its_location(
    admin: httpx.Client, supplier_id: str, delivery: str
) -> None:
    accepted = upload(admin, supplier_id, delivery)
    located = admin.get(accepted.headers["Location"])

    assert accepted.status_code == 202, accepted.text
    assert located.status_code == 200, located.text
    assert located.json()["delivery_id"] == delivery


@pytest.mark.parametrize("sku", ["A/B", "/A", "..", "."])
def test_a_mapping_to_a_sku_no_url_could_reach_is_refused(
    admin: httpx.Client, supplier_id: str, sku: str
) -> None:
    mappings = {"mappings": [{"supplier_sku": f"N-{uuid.uuid4().hex[:6]}", "sku": sku}]}
    answer = admin.put(f"/v1/suppliers/{supplier_id}/mappings", json=mappings)

    assert (answer.status_code, answer.json().get("error")) == (422, "validation_error")
    [problem] = answer.json()["detail"]
    assert problem["loc"] == ["body", "mappings", 0, "sku"]
    assert f"{sku!r} cannot name a SKU" in problem["msg"]
    assert admin.get("/v1/availability", params={"sku": sku}).json()["unknown"] == [sku]


def test_a_supplier_sku_with_a_slash_still_maps_since_no_url_names_it(
    admin: httpx.Client, supplier_id: str
) -> None:
    sku = random_sku()
    mappings = {
        "mappings": [{"supplier_sku": "N/1", "sku": sku}, {"supplier_sku": "..", "sku": sku}]
    }
    answer = admin.put(f"/v1/suppliers/{supplier_id}/mappings", json=mappings)

    assert answer.status_code == 200, answer.text
    assert admin.get(f"/v1/availability/{sku}").status_code == 200


@pytest.mark.parametrize("sku", [".", ".."])
def test_a_sku_of_dots_is_refused_where_the_catalogue_would_gain_it(
    ledger: Server, sku: str
) -> None:
    status, body = put_raw(ledger, f"/v1/skus/{sku}", {"safety_stock": 0})

    assert (status, body["error"]) == (422, "validation_error")
    assert f"{sku!r} cannot name a SKU" in body["detail"][0]["msg"]
