"""`make run` serves the demo: demo keys, and five simulated suppliers feeding it live."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import start_server, stop_server

# REST, webhook, CSV in a folder, EDI over SFTP, XML over FTP
SUPPLIERS = {"acme", "globex", "initech", "umbrella", "hooli"}


def test_the_demo_is_fed_live_by_a_supplier_of_each_kind(database_url: str, tmp_path: Path) -> None:
    server = start_server(
        database_url,
        tmp_path,
        workers=1,
        extra_env={"LEDGER_API_KEYS": "", "LEDGER_DATA_DIR": str(tmp_path / "var")},
        extra_args=("--demo",),
    )
    try:
        audit = {"Authorization": "Bearer demo-auditor-key"}
        deadline = time.monotonic() + 60
        fed: dict[str, Any] = {}
        while set(fed) != SUPPLIERS:
            assert time.monotonic() < deadline, f"only {sorted(fed)} delivered"
            health = httpx.get(f"{server.base_url}/v1/feeds/health", headers=audit).json()
            fed = {s["supplier_id"]: s for s in health["suppliers"] if s["deliveries"]}
            time.sleep(0.5)
        shop = {"Authorization": "Bearer demo-storefront-key"}
        blue = httpx.get(f"{server.base_url}/v1/availability/WIDGET-BLUE", headers=shop).json()
        order = httpx.post(
            f"{server.base_url}/v1/reservations",
            headers={"Authorization": "Bearer demo-oms-key", "Idempotency-Key": "demo-1"},
            json={"order_id": "demo-1", "lines": [{"sku": "WIDGET-BLUE", "quantity": 3}]},
        )
        letters = httpx.get(f"{server.base_url}/v1/dead-letters", headers=audit).json()
    finally:
        stop_server(server)

    assert all(s["consecutive_failures"] == 0 for s in fed.values())
    assert {s["supplier_id"] for s in blue["suppliers"]} & SUPPLIERS
    assert blue["available"] > 0
    assert order.status_code == 201
    allocations = order.json()["lines"][0]["allocations"]
    assert sum(a["quantity"] for a in allocations) == 3
    # One item of each catalogue is deliberately unmapped.
    assert {item["reason"] for item in letters["items"]} == {"unmapped_supplier_sku"}
    log = server.log()
    assert "demo-oms-key" in log  # the banner shows the demo keys to the developer
    # The suppliers wait for the service to answer before their first delivery, and the
    # FTP supplier says once, at most, that it starts (not at every poll).
    assert "demo.delivery_failed" not in log
    assert log.count("starting FTP server") <= 1


def test_make_run_serves_on_the_port_and_address_it_is_given() -> None:
    """`make run PORT=… HOST=…` passes both to `ledger serve --demo` (a newcomer's
    walkthrough: its port was fixed at 8000, taken on their machine)."""
    root = Path(__file__).resolve().parents[2]
    # HOST and PORT as a shell or a platform may export them: only make's own arguments
    # count (a review: with ?=, the machine's name and a database's port were taken).
    exported = {**os.environ, "HOST": "elsewhere", "PORT": "5432"}

    def planned(*given: str) -> list[str]:
        lines = subprocess.run(
            ["make", "-s", "-n", "-C", str(root), "run", *given],
            capture_output=True,
            text=True,
            check=True,
            env=exported,
        ).stdout.splitlines()
        command = shlex.split(lines[-1])
        assert command[0].endswith("/ledger")
        return command[1:]

    assert planned("PORT=18123", "HOST=0.0.0.0") == [
        *("serve", "--demo", "--host", "0.0.0.0", "--port", "18123")
    ]
    assert planned() == ["serve", "--demo", "--host", "127.0.0.1", "--port", "8000"]
