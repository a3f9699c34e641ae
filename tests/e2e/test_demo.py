"""`make run` serves the demo: demo keys, three suppliers, stock to reserve."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import start_server, stop_server


def test_the_demo_serves_stock_from_three_suppliers_with_the_demo_keys(
    database_url: str, tmp_path: Path
) -> None:
    server = start_server(
        database_url, tmp_path, workers=1, extra_env={"LEDGER_API_KEYS": ""}, extra_args=("--demo",)
    )
    try:
        shop = {"Authorization": "Bearer demo-storefront-key"}
        blue = httpx.get(f"{server.base_url}/v1/availability/WIDGET-BLUE", headers=shop).json()
        gadget = httpx.get(f"{server.base_url}/v1/availability/GADGET-9", headers=shop).json()
        order = httpx.post(
            f"{server.base_url}/v1/reservations",
            headers={"Authorization": "Bearer demo-oms-key", "Idempotency-Key": "demo-1"},
            json={"order_id": "demo-1", "lines": [{"sku": "WIDGET-BLUE", "quantity": 130}]},
        )
    finally:
        stop_server(server)

    assert {s["supplier_id"] for s in blue["suppliers"]} == {"acme", "globex"}
    assert blue["status"] == "in_stock"
    assert {s["supplier_id"]: s["quantity"] for s in gadget["suppliers"]} == {
        "globex": 36,  # three cases of twelve
        "initech": 10,
    }
    assert order.status_code == 201
    allocations = order.json()["lines"][0]["allocations"]
    assert [(a["supplier_id"], a["quantity"]) for a in allocations] == [
        ("acme", 118),
        ("globex", 12),
    ]
    assert "demo-oms-key" in server.log()  # the banner shows the demo keys to the developer
