"""The reservation lifecycle over real HTTP: suppliers, stock, holds, commitments, returns."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, random_sku, scrape, serving

POSITION = "X-Ledger-Position"

# Fields of GET /v1/availability/{sku} that clients are written against (DESIGN.md).
AVAILABILITY_FIELDS = {
    "sku",
    "on_hand",
    "sellable",
    "held",
    "committed",
    "available",
    "status",
    "suppliers",
    "position",
}
SUPPLIER_LEVEL_FIELDS = {"supplier_id", "quantity", "observed_at", "age_seconds", "stale"}
NUMBERS = ("on_hand", "sellable", "held", "committed", "available")


# Servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `ledger serve --workers 2` for the module; each test works on SKUs of its own."""
    with serving(postgres_server_url, tmp_path_factory.mktemp("ledger"), 2) as running:
        yield running


@pytest.fixture(scope="module")
def ledger_without_sweeper(
    postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serving(
        postgres_server_url,
        tmp_path_factory.mktemp("no-sweeper"),
        1,
        extra_env={"LEDGER_RUN_SWEEPER": "false"},
    ) as running:
        yield running


def _client(server: Server, key: str) -> Iterator[httpx.Client]:
    with server.client(key) as client:
        yield client


@pytest.fixture(scope="module")
def admin(ledger: Server) -> Iterator[httpx.Client]:
    yield from _client(ledger, "test-admin")


@pytest.fixture(scope="module")
def oms(ledger: Server) -> Iterator[httpx.Client]:
    yield from _client(ledger, "test-oms")


@pytest.fixture(scope="module")
def shop(ledger: Server) -> Iterator[httpx.Client]:
    yield from _client(ledger, "test-shop")


@pytest.fixture(scope="module")
def acme(ledger: Server, admin: httpx.Client) -> Iterator[httpx.Client]:
    """The supplier key bound to supplier "acme", which exists."""
    put_supplier(admin, "acme", priority=50)
    yield from _client(ledger, "test-acme")


# Helpers --------------------------------------------------------------------------------------


def iso(moment: datetime | None = None, *, seconds: float = 0) -> str:
    return ((moment or datetime.now(UTC)) + timedelta(seconds=seconds)).isoformat()


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, (response.status_code, response.text)
    return response.json()


def put_supplier(admin: httpx.Client, supplier_id: str, **terms: Any) -> None:
    ok(admin.put(f"/v1/suppliers/{supplier_id}", json={"name": supplier_id, **terms}))


def new_supplier(admin: httpx.Client, **terms: Any) -> str:
    supplier_id = random_sku("sup")
    put_supplier(admin, supplier_id, **terms)
    return supplier_id


def map_sku(admin: httpx.Client, supplier_id: str, sku: str, units: int = 1) -> str:
    """Maps a supplier SKU of this supplier to `sku` and returns the supplier SKU."""
    supplier_sku = f"{supplier_id}:{sku}"
    mapping = {"supplier_sku": supplier_sku, "sku": sku, "units_per_supplier_unit": units}
    ok(admin.put(f"/v1/suppliers/{supplier_id}/mappings", json={"mappings": [mapping]}))
    return supplier_sku


def report(
    client: httpx.Client,
    supplier_id: str,
    observations: list[dict[str, Any]],
    delivery_id: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"observations": observations}
    if delivery_id is not None:
        body["delivery_id"] = delivery_id
    result: dict[str, Any] = ok(client.post(f"/v1/suppliers/{supplier_id}/stock", json=body))
    return result


def stocked_sku(admin: httpx.Client, levels: dict[str, int]) -> str:
    """A new SKU, mapped at each supplier, with each supplier reporting its level now."""
    sku = random_sku()
    for supplier_id, quantity in levels.items():
        supplier_sku = map_sku(admin, supplier_id, sku)
        outcome = report(
            admin,
            supplier_id,
            [{"supplier_sku": supplier_sku, "quantity": quantity, "observed_at": iso()}],
        )
        assert outcome["applied"] == 1, outcome
    return sku


def reserve(
    oms: httpx.Client,
    *lines: tuple[str, int],
    key: str | None = None,
    ttl_seconds: int | None = None,
    order_id: str = "order-1",
) -> httpx.Response:
    body: dict[str, Any] = {
        "order_id": order_id,
        "lines": [{"sku": sku, "quantity": quantity} for sku, quantity in lines],
    }
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    return oms.post(
        "/v1/reservations", json=body, headers={"Idempotency-Key": key or uuid.uuid4().hex}
    )


def held(oms: httpx.Client, *lines: tuple[str, int], ttl_seconds: int | None = None) -> str:
    """Reserves the lines and returns the reservation id."""
    reservation_id: str = ok(reserve(oms, *lines, ttl_seconds=ttl_seconds), 201)["reservation_id"]
    return reservation_id


def confirmed(oms: httpx.Client, *lines: tuple[str, int]) -> str:
    reservation_id = held(oms, *lines)
    assert ok(oms.post(f"/v1/reservations/{reservation_id}/confirm"))["status"] == "confirmed"
    return reservation_id


def availability(client: httpx.Client, sku: str) -> dict[str, Any]:
    result: dict[str, Any] = ok(client.get(f"/v1/availability/{sku}"))
    return result


def numbers(client: httpx.Client, sku: str) -> dict[str, int]:
    levels = availability(client, sku)
    return {name: levels[name] for name in NUMBERS}


def allocations(reservation: dict[str, Any], sku: str) -> dict[str, int]:
    (line,) = [line for line in reservation["lines"] if line["sku"] == sku]
    return {a["supplier_id"]: a["quantity"] for a in line["allocations"]}


def wait_for(condition: Any, timeout: float, interval: float = 0.1) -> Any:
    """Polls `condition` until it returns something truthy, or fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"not true after {timeout} s: {condition}"
        time.sleep(interval)


def log_events(server: Server, event: str) -> list[dict[str, Any]]:
    found = []
    for line in server.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


# Suppliers, mappings and stock reports ------------------------------------------------------


def test_stock_reported_by_supplier_sku_is_converted_to_base_units_and_less_the_buffer(
    admin: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin, priority=1, lead_time_days=2, buffer=4)
    sku = random_sku()
    cases = map_sku(admin, supplier, sku, units=6)

    outcome = report(
        admin, supplier, [{"supplier_sku": cases, "quantity": 5, "observed_at": iso()}]
    )

    assert (outcome["applied"], outcome["unchanged"], outcome["late"]) == (1, 0, 0)
    assert outcome["rejected"] == []
    levels = availability(shop, sku)
    assert {name: levels[name] for name in NUMBERS} == {
        "on_hand": 30,
        "sellable": 26,
        "held": 0,
        "committed": 0,
        "available": 26,
    }
    assert [(s["supplier_id"], s["quantity"]) for s in levels["suppliers"]] == [(supplier, 30)]


def test_a_mapping_names_its_own_unit_and_a_report_in_it_counts_the_mapping_s_factor(
    admin: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin, connector={"units": {"CS": 12}})
    big, small = random_sku(), random_sku()
    mappings = [
        {"supplier_sku": "BIG", "sku": big, "units_per_supplier_unit": 24, "unit": " cs"},
        {"supplier_sku": "SMALL", "sku": small, "units_per_supplier_unit": 2},
    ]
    ok(admin.put(f"/v1/suppliers/{supplier}/mappings", json={"mappings": mappings}))
    listed = ok(admin.get(f"/v1/suppliers/{supplier}/mappings"))["mappings"]
    assert [(m["supplier_sku"], m["units_per_supplier_unit"], m["unit"]) for m in listed] == [
        ("BIG", 24, "CS"),
        ("SMALL", 2, None),
    ]
    for unit in ("EA", "", "two words", "C" * 17):
        base = {"supplier_sku": "BIG", "sku": big, "units_per_supplier_unit": 24, "unit": unit}
        refused = admin.put(f"/v1/suppliers/{supplier}/mappings", json={"mappings": [base]})
        assert (refused.status_code, refused.json()["error"]) == (422, "validation_error"), unit

    outcome = report(
        admin,
        supplier,
        [
            {"supplier_sku": "BIG", "quantity": 2, "unit": "CS", "observed_at": iso()},
            {"supplier_sku": "SMALL", "quantity": 2, "unit": "CS", "observed_at": iso()},
            {"supplier_sku": "SMALL", "quantity": 9, "unit": "TRAY", "observed_at": iso()},
        ],
    )

    assert [(r["index"], r["reason"]) for r in outcome["rejected"]] == [(2, "unknown_unit: 'TRAY'")]
    assert availability(shop, big)["on_hand"] == 48  # two of this item's cases of 24
    assert availability(shop, small)["on_hand"] == 24  # two of the table's cases of 12


def test_a_report_over_the_api_is_held_to_the_ceiling_in_base_units_by_its_mapping_s_unit(
    admin: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin, connector={"units": {"CS": 100}, "max_quantity": 1000})
    big, small = random_sku(), random_sku()
    mappings = [
        {"supplier_sku": "BIG", "sku": big, "units_per_supplier_unit": 200, "unit": "CS"},
        {"supplier_sku": "SMALL", "sku": small, "units_per_supplier_unit": 2, "unit": "CS"},
    ]
    ok(admin.put(f"/v1/suppliers/{supplier}/mappings", json={"mappings": mappings}))

    outcome = report(
        admin,
        supplier,
        [
            {"supplier_sku": "BIG", "quantity": 8, "unit": "CS", "observed_at": iso()},
            {"supplier_sku": "SMALL", "quantity": 20, "unit": "CS", "observed_at": iso()},
        ],
    )

    assert [(r["index"], r["reason"]) for r in outcome["rejected"]] == [
        (0, "quantity_out_of_range")  # 1,600 pieces, though 800 by the table
    ]
    assert availability(shop, small)["on_hand"] == 40  # though 2,000 by the table


def test_a_report_over_the_api_counts_in_the_unit_it_names_and_says_what_is_expected(
    admin: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin, connector={"units": {"CS": 12}})
    mapped, own, loose = random_sku(), random_sku(), random_sku()
    dozen = map_sku(admin, supplier, mapped, units=6)  # a supplier unit of 6 pieces
    for sku in (own, loose):
        ok(admin.put(f"/v1/skus/{sku}", json={"safety_stock": 0}))
    incoming = [{"quantity": 3, "expected_on": "2027-01-10"}, {"quantity": 1}]

    outcome = report(
        admin,
        supplier,
        [
            {"supplier_sku": dozen, "quantity": 2, "unit": "CS", "observed_at": iso()},
            {"sku": own, "quantity": 2, "unit": "cs", "incoming": incoming, "observed_at": iso()},
            {"sku": loose, "quantity": 2, "unit": "PALLET", "observed_at": iso()},
            {"sku": loose, "quantity": 2, "incoming": [{"quantity": "x"}], "observed_at": iso()},
        ],
    )

    assert (outcome["applied"], outcome["unchanged"], outcome["late"]) == (2, 0, 0)
    assert [(r["index"], r["reason"]) for r in outcome["rejected"]] == [
        (2, "unknown_unit: 'PALLET'"),
        (3, "invalid_record: incoming.0.quantity: Input should be a valid integer"),
    ]
    assert availability(shop, mapped)["on_hand"] == 24  # the case's 12, not the mapping's 6
    levels = availability(shop, own)
    assert levels["on_hand"] == 24
    assert levels["suppliers"][0]["incoming"] == [
        {"quantity": 36, "expected_on": "2027-01-10"},
        {"quantity": 12, "expected_on": None},
    ]
    assert availability(shop, loose)["on_hand"] == 0

    # A report that says nothing of incoming stock leaves the schedule; [] clears it.
    report(admin, supplier, [{"sku": own, "quantity": 2, "unit": "CS", "observed_at": iso()}])
    assert len(availability(shop, own)["suppliers"][0]["incoming"]) == 2
    report(admin, supplier, [{"sku": own, "quantity": 2, "incoming": [], "observed_at": iso()}])
    cleared = availability(shop, own)
    assert cleared["suppliers"][0]["incoming"] == []
    assert cleared["on_hand"] == 2


def test_a_report_over_the_api_is_held_to_the_supplier_s_feed_rules(
    admin: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(
        admin, connector={"units": {"CS": 12}, "max_quantity": 1000, "max_age_seconds": 3600}
    )
    sku = random_sku()
    ok(admin.put(f"/v1/skus/{sku}", json={"safety_stock": 0}))
    old = (datetime.now(UTC) - timedelta(hours=2)).isoformat()

    outcome = report(
        admin,
        supplier,
        [
            {"sku": sku, "quantity": 1001, "observed_at": iso()},
            {"sku": sku, "quantity": 100, "unit": "CS", "observed_at": iso()},
            {"sku": sku, "quantity": 5, "observed_at": old},
            {"sku": sku, "quantity": 1, "incoming": [{"quantity": 2000}], "observed_at": iso()},
            {"sku": sku, "quantity": 1000, "observed_at": iso()},
        ],
    )

    assert [(r["index"], r["reason"]) for r in outcome["rejected"]] == [
        (0, "quantity_out_of_range"),  # past its max_quantity
        (1, "quantity_out_of_range"),  # 1,200 in pieces
        (2, "too_old"),  # older than its max_age_seconds
        (3, "quantity_out_of_range"),  # what it expects, too
    ]
    assert outcome["applied"] == 1
    assert availability(shop, sku)["on_hand"] == 1000
    # A supplier that pushes its stock shows in feed health like one whose feeds are pulled.
    rows = admin.get("/v1/feeds/health").json()["suppliers"]
    [shown] = [row for row in rows if row["supplier_id"] == supplier]
    assert (shown["deliveries"], shown["last_rows"], shown["last_applied"]) == (1, 5, 1)
    assert (shown["last_rejected"], shown["consecutive_failures"]) == (4, 0)
    assert shown["last_success_at"] is not None


def test_a_supplier_key_reports_its_own_stock_by_internal_sku(
    admin: httpx.Client, acme: httpx.Client, shop: httpx.Client
) -> None:
    other = new_supplier(admin)
    sku = stocked_sku(admin, {other: 3})
    map_sku(admin, "acme", sku)  # acme supplies it: it may name it by our SKU

    outcome = report(acme, "acme", [{"sku": sku, "quantity": 9, "observed_at": iso()}])

    assert outcome["applied"] == 1
    levels = availability(shop, sku)
    assert levels["on_hand"] == 12
    assert {s["supplier_id"]: s["quantity"] for s in levels["suppliers"]} == {other: 3, "acme": 9}


def test_a_report_counts_what_it_applied_left_unchanged_ignored_as_late_and_rejected(
    admin: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin)
    same, older, newer = random_sku(), random_sku(), random_sku()
    for sku in (same, older, newer):
        map_sku(admin, supplier, sku)
    then = datetime.now(UTC) - timedelta(minutes=10)
    report(
        admin,
        supplier,
        [{"sku": sku, "quantity": 10, "observed_at": iso(then)} for sku in (same, older, newer)],
    )

    outcome = report(
        admin,
        supplier,
        [
            {"sku": same, "quantity": 10, "observed_at": iso(then)},
            {"sku": older, "quantity": 99, "observed_at": iso(then, seconds=-60)},
            {"sku": newer, "quantity": 4, "observed_at": iso()},
            {"supplier_sku": "never-mapped", "quantity": 1, "observed_at": iso()},
        ],
    )

    assert (outcome["applied"], outcome["unchanged"], outcome["late"]) == (1, 1, 1)
    assert outcome["rejected"] == [{"index": 3, "reason": "unmapped_supplier_sku"}]
    assert availability(shop, older)["on_hand"] == 10
    assert availability(shop, newer)["on_hand"] == 4


def test_the_same_delivery_twice_changes_nothing_and_answers_the_same_counts(
    admin: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin)
    sku = random_sku()
    map_sku(admin, supplier, sku)
    delivery = [{"sku": sku, "quantity": 10, "observed_at": iso(seconds=-30)}]
    first = report(admin, supplier, delivery, delivery_id="batch-1")
    report(admin, supplier, [{"sku": sku, "quantity": 7, "observed_at": iso()}], "batch-2")

    again = report(admin, supplier, delivery, delivery_id="batch-1")

    counts = ("delivery_id", "rows", "applied", "unchanged", "late", "rejected")
    assert {name: again[name] for name in counts} == {name: first[name] for name in counts}
    assert (again["applied"], again["late"]) == (1, 0)
    assert availability(shop, sku)["on_hand"] == 7


def test_a_delivery_without_an_id_is_recognised_by_its_content(admin: httpx.Client) -> None:
    supplier = new_supplier(admin)
    sku = random_sku()
    map_sku(admin, supplier, sku)
    delivery = [{"sku": sku, "quantity": 10, "observed_at": iso()}]

    first = report(admin, supplier, delivery)
    again = report(admin, supplier, delivery)

    assert first["delivery_id"] == again["delivery_id"]
    assert (again["applied"], again["unchanged"]) == (1, 0)


def test_a_supplier_report_below_what_is_held_is_accepted_and_available_stays_at_zero(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin)
    sku = stocked_sku(admin, {supplier: 10})
    held(oms, (sku, 8))

    outcome = report(admin, supplier, [{"sku": sku, "quantity": 3, "observed_at": iso()}])

    assert outcome["applied"] == 1
    assert outcome["rejected"] == []
    levels = availability(shop, sku)
    assert {name: levels[name] for name in NUMBERS} == {
        "on_hand": 3,
        "sellable": 3,
        "held": 8,
        "committed": 0,
        "available": 0,
    }
    assert levels["status"] == "out_of_stock"
    assert reserve(oms, (sku, 1)).status_code == 409


# Availability -----------------------------------------------------------------------------------


def test_availability_has_every_field_of_the_design_and_a_position_after_the_last_write(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin, stale_after_seconds=3600)
    sku = stocked_sku(admin, {supplier: 20})
    written = int(reserve(oms, (sku, 2)).headers[POSITION])

    levels = availability(shop, sku)

    assert levels.keys() >= AVAILABILITY_FIELDS
    assert levels["sku"] == sku
    assert levels["status"] == "in_stock"
    assert levels["position"] >= written
    (level,) = levels["suppliers"]
    assert level.keys() >= SUPPLIER_LEVEL_FIELDS
    assert (level["supplier_id"], level["quantity"], level["stale"]) == (supplier, 20, False)
    assert 0 <= level["age_seconds"] < 60
    assert datetime.fromisoformat(level["observed_at"]) <= datetime.now(UTC)


def test_availability_status_follows_what_is_left_and_how_old_the_reports_are(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    fresh = new_supplier(admin)
    sku = stocked_sku(admin, {fresh: 8})
    assert availability(shop, sku)["status"] == "in_stock"
    held(oms, (sku, 4))
    assert availability(shop, sku)["status"] == "limited"
    held(oms, (sku, 4))
    assert availability(shop, sku)["status"] == "out_of_stock"

    slow = new_supplier(admin, stale_after_seconds=60, exclude_after_seconds=300)
    aging, gone = random_sku(), random_sku()
    for sku_of_slow in (aging, gone):
        map_sku(admin, slow, sku_of_slow)
    report(
        admin,
        slow,
        [
            {"sku": aging, "quantity": 50, "observed_at": iso(seconds=-120)},
            {"sku": gone, "quantity": 50, "observed_at": iso(seconds=-600)},
        ],
    )
    updating = availability(shop, aging)
    assert (updating["status"], updating["sellable"]) == ("updating", 50)
    assert updating["suppliers"][0]["stale"] is True
    assert updating["suppliers"][0]["age_seconds"] >= 120
    excluded = availability(shop, gone)
    assert (excluded["on_hand"], excluded["sellable"], excluded["available"]) == (50, 0, 0)


def test_batch_availability_answers_known_skus_and_lists_unknown_ones_apart(
    admin: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin)
    first, second = stocked_sku(admin, {supplier: 4}), stocked_sku(admin, {supplier: 6})
    missing = random_sku("missing")

    answer = ok(shop.get("/v1/availability", params={"sku": [first, missing, second]}))

    assert [(item["sku"], item["available"]) for item in answer["items"]] == [
        (first, 4),
        (second, 6),
    ]
    assert answer["unknown"] == [missing]
    for item in answer["items"]:
        assert item.keys() >= AVAILABILITY_FIELDS


# Reservations ---------------------------------------------------------------------------------


def test_a_reservation_is_allocated_by_priority_then_lead_time_and_split_when_one_is_short(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    first_choice = new_supplier(admin, priority=1, lead_time_days=9)
    quick = new_supplier(admin, priority=2, lead_time_days=1)
    slow = new_supplier(admin, priority=2, lead_time_days=5)
    sku = stocked_sku(admin, {slow: 10, quick: 10, first_choice: 3})
    before = datetime.now(UTC)

    response = reserve(oms, (sku, 5), ttl_seconds=600, order_id="order-split")

    reservation = ok(response, 201)
    assert int(response.headers[POSITION]) > 0
    assert "Idempotent-Replayed" not in response.headers
    assert reservation["order_id"] == "order-split"
    assert reservation["status"] == "held"
    assert allocations(reservation, sku) == {first_choice: 3, quick: 2}
    expires_at = datetime.fromisoformat(reservation["expires_at"])
    assert (
        before + timedelta(seconds=600) <= expires_at <= datetime.now(UTC) + timedelta(seconds=601)
    )
    assert availability(shop, sku)["held"] == 5
    assert ok(oms.get(f"/v1/reservations/{reservation['reservation_id']}")) == reservation


def test_the_freshest_report_breaks_a_tie_of_priority_and_lead_time(
    admin: httpx.Client, oms: httpx.Client
) -> None:
    old, recent = new_supplier(admin), new_supplier(admin)
    sku = random_sku()
    for supplier, age in ((old, 600), (recent, 5)):
        map_sku(admin, supplier, sku)
        report(admin, supplier, [{"sku": sku, "quantity": 10, "observed_at": iso(seconds=-age)}])

    reservation = ok(reserve(oms, (sku, 4)), 201)

    assert allocations(reservation, sku) == {recent: 4}


def test_replaying_the_same_key_and_body_returns_the_same_reservation_and_holds_once(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    sku = stocked_sku(admin, {new_supplier(admin): 3})
    key = uuid.uuid4().hex

    first = reserve(oms, (sku, 3), key=key)
    again = reserve(oms, (sku, 3), key=key)

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["reservation_id"] == first.json()["reservation_id"]
    assert again.json()["lines"] == first.json()["lines"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert availability(shop, sku)["held"] == 3


def test_a_replay_after_the_reservation_moved_on_is_answered_as_the_order_first_was(
    admin: httpx.Client, oms: httpx.Client
) -> None:
    """The OMS sends an order again under its key after confirming it (its first answer
    was lost, say): the same answer as the first, not the reservation as it is now,
    which GET tells."""
    sku = stocked_sku(admin, {new_supplier(admin): 5})
    key = uuid.uuid4().hex
    first = ok(reserve(oms, (sku, 2), key=key), 201)
    confirmed = ok(oms.post(f"/v1/reservations/{first['reservation_id']}/confirm"))
    assert confirmed["status"] == "confirmed"

    again = reserve(oms, (sku, 2), key=key)

    assert again.status_code == 201
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first
    assert ok(oms.get(f"/v1/reservations/{first['reservation_id']}"))["status"] == "confirmed"


def test_the_same_key_with_another_body_is_refused_and_holds_nothing_more(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    sku = stocked_sku(admin, {new_supplier(admin): 10})
    key = uuid.uuid4().hex
    original = ok(reserve(oms, (sku, 3), key=key), 201)

    response = reserve(oms, (sku, 4), key=key)

    assert response.status_code == 409
    assert response.json()["error"] == "idempotency_key_mismatch"
    assert response.json()["detail"]["reservation_id"] == original["reservation_id"]
    assert availability(shop, sku)["held"] == 3


def test_an_idempotency_key_belongs_to_one_oms_client(
    ledger: Server, admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    sku = stocked_sku(admin, {new_supplier(admin): 10})
    key = uuid.uuid4().hex
    mine = ok(reserve(oms, (sku, 2), key=key), 201)

    with ledger.client("test-oms-2") as other_oms:
        theirs = ok(reserve(other_oms, (sku, 2), key=key), 201)

    assert theirs["reservation_id"] != mine["reservation_id"]
    assert availability(shop, sku)["held"] == 4


def test_an_oms_client_neither_sees_nor_changes_another_client_s_reservations(
    ledger: Server, admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    # Any OMS key read, confirmed, released, fulfilled and returned any other's orders,
    # whose ids follow from the client's name and its Idempotency-Key (a security review).
    sku = stocked_sku(admin, {new_supplier(admin): 10})
    order = f"order-{uuid.uuid4().hex[:8]}"
    mine = ok(reserve(oms, (sku, 2), order_id=order), 201)["reservation_id"]
    path = f"/v1/reservations/{mine}"

    with ledger.client("test-oms-2") as other, ledger.client("test-audit") as auditor:
        refused = [
            other.get(path),
            other.post(f"{path}/confirm"),
            other.post(f"{path}/release"),
            other.post(f"{path}/fulfil", json={"lines": [{"sku": sku, "quantity": 1}]}),
            other.post(
                f"{path}/return", json={"lines": [{"sku": sku, "quantity": 1}], "restock": True}
            ),
        ]
        by_order = ok(other.get("/v1/reservations", params={"order_id": order}))
        listed = ok(other.get("/v1/reservations", params={"status": "held", "limit": 1000}))
        audited = ok(auditor.get(path))
        theirs = ok(reserve(other, (sku, 1), order_id=order), 201)["reservation_id"]
        their_order = ok(other.get("/v1/reservations", params={"order_id": order}))

    assert [(r.status_code, r.json()["error"]) for r in refused] == [
        (404, "reservation_not_found")
    ] * 5
    assert by_order["items"] == []
    assert mine not in [item["reservation_id"] for item in listed["items"]]
    assert audited["status"] == "held"
    assert [item["reservation_id"] for item in their_order["items"]] == [theirs]
    # Still held, as its client left it; its client and an admin act on it.
    assert ok(oms.get(path))["status"] == "held"
    assert availability(shop, sku)["held"] == 3
    assert [
        item["reservation_id"]
        for item in ok(oms.get("/v1/reservations", params={"order_id": order}))["items"]
    ] == [mine]
    assert ok(admin.post(f"{path}/confirm"))["status"] == "confirmed"
    assert ok(oms.post(f"{path}/release"))["status"] == "released"


def test_an_order_one_line_of_which_cannot_be_covered_is_refused_and_holds_nothing(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin)
    plenty, scarce, also = (stocked_sku(admin, {supplier: n}) for n in (10, 2, 5))
    held(oms, (scarce, 1))
    before = {sku: numbers(shop, sku) for sku in (plenty, scarce, also)}

    response = reserve(oms, (plenty, 3), (scarce, 2), (also, 1), (scarce, 1))

    assert response.status_code == 409
    body = response.json()
    assert body["error"] == "insufficient_stock"
    assert body["detail"]["lines"] == [{"sku": scarce, "requested": 3, "available": 1}]
    assert {sku: numbers(shop, sku) for sku in (plenty, scarce, also)} == before


def test_lines_for_the_same_sku_are_summed_before_the_check(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    sku = stocked_sku(admin, {new_supplier(admin): 10})

    refused = reserve(oms, (sku, 6), (sku, 6))
    granted = ok(reserve(oms, (sku, 6), (sku, 4)), 201)

    assert refused.status_code == 409
    assert refused.json()["detail"]["lines"] == [{"sku": sku, "requested": 12, "available": 10}]
    assert [(line["sku"], line["quantity"]) for line in granted["lines"]] == [(sku, 10)]
    assert availability(shop, sku)["available"] == 0


def test_confirm_then_fulfil_in_parts_moves_stock_from_held_to_committed_to_shipped(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin)
    sku = stocked_sku(admin, {supplier: 20})
    reservation_id = held(oms, (sku, 5))
    path = f"/v1/reservations/{reservation_id}"

    confirmed_answer = oms.post(f"{path}/confirm")
    assert ok(confirmed_answer)["status"] == "confirmed"
    assert ok(confirmed_answer)["confirmed_at"] is not None
    assert numbers(shop, sku) == {
        "on_hand": 20,
        "sellable": 20,
        "held": 0,
        "committed": 5,
        "available": 15,
    }
    assert ok(oms.post(f"{path}/confirm"))["status"] == "confirmed"
    assert numbers(shop, sku)["committed"] == 5

    part = ok(oms.post(f"{path}/fulfil", json={"lines": [{"sku": sku, "quantity": 2}]}))
    assert part["status"] == "partially_fulfilled"
    assert part["lines"][0]["fulfilled"] == 2
    assert numbers(shop, sku) == {
        "on_hand": 20,
        "sellable": 18,
        "held": 0,
        "committed": 3,
        "available": 15,
    }

    rest = {"lines": [{"sku": sku, "quantity": 3, "supplier_id": supplier}]}
    done = ok(oms.post(f"{path}/fulfil", json=rest))
    assert done["status"] == "fulfilled"
    assert done["lines"][0]["fulfilled"] == 5
    assert numbers(shop, sku) == {
        "on_hand": 20,
        "sellable": 15,
        "held": 0,
        "committed": 0,
        "available": 15,
    }
    assert ok(oms.get(path))["status"] == "fulfilled"


def test_a_retried_fulfilment_with_the_same_key_ships_once(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    sku = stocked_sku(admin, {new_supplier(admin): 10})
    path = f"/v1/reservations/{confirmed(oms, (sku, 4))}"
    shipment = {"lines": [{"sku": sku, "quantity": 1}]}
    headers = {"Idempotency-Key": uuid.uuid4().hex}

    ok(oms.post(f"{path}/fulfil", json=shipment, headers=headers))
    again = ok(oms.post(f"{path}/fulfil", json=shipment, headers=headers))

    assert again["lines"][0]["fulfilled"] == 1
    assert numbers(shop, sku)["committed"] == 3


def test_returned_units_are_sellable_again_only_when_restocked(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    sku = stocked_sku(admin, {new_supplier(admin): 20})
    path = f"/v1/reservations/{confirmed(oms, (sku, 5))}"
    ok(oms.post(f"{path}/fulfil", json={"lines": [{"sku": sku, "quantity": 5}]}))
    assert availability(shop, sku)["available"] == 15

    kept = oms.post(
        f"{path}/return", json={"lines": [{"sku": sku, "quantity": 2}], "restock": False}
    )
    assert ok(kept)["lines"][0]["returned"] == 2
    assert availability(shop, sku)["available"] == 15

    back = oms.post(
        f"{path}/return", json={"lines": [{"sku": sku, "quantity": 2}], "restock": True}
    )
    assert ok(back)["lines"][0]["returned"] == 4
    assert availability(shop, sku)["available"] == 17
    assert ok(oms.get(path))["status"] == "fulfilled"


def test_release_gives_held_stock_back_and_is_idempotent(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    sku = stocked_sku(admin, {new_supplier(admin): 10})
    reservation_id = held(oms, (sku, 6))
    assert availability(shop, sku)["available"] == 4

    released = ok(oms.post(f"/v1/reservations/{reservation_id}/release", json={"reason": "gone"}))
    again = ok(oms.post(f"/v1/reservations/{reservation_id}/release"))

    assert (released["status"], again["status"]) == ("released", "released")
    assert numbers(shop, sku)["held"] == 0
    assert availability(shop, sku)["available"] == 10
    assert ok(oms.get(f"/v1/reservations/{reservation_id}"))["status"] == "released"


def test_releasing_a_confirmed_reservation_frees_its_commitment(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    sku = stocked_sku(admin, {new_supplier(admin): 10})
    path = f"/v1/reservations/{confirmed(oms, (sku, 6))}"
    ok(oms.post(f"{path}/fulfil", json={"lines": [{"sku": sku, "quantity": 2}]}))

    assert ok(oms.post(f"{path}/release"))["status"] == "released"

    assert numbers(shop, sku) == {
        "on_hand": 10,
        "sellable": 8,
        "held": 0,
        "committed": 0,
        "available": 8,
    }


def test_a_supplier_reporting_net_of_our_orders_is_not_counted_twice(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    net = new_supplier(admin, reports_net_of_our_orders=True)
    gross = new_supplier(admin)
    net_sku, gross_sku = stocked_sku(admin, {net: 10}), stocked_sku(admin, {gross: 10})
    confirmed(oms, (net_sku, 4))
    confirmed(oms, (gross_sku, 4))
    assert availability(shop, net_sku)["available"] == 6
    assert availability(shop, gross_sku)["available"] == 6

    # Each supplier now reports 6: the net one has left our 4 out, the other has not shipped yet.
    after_confirmation = iso(seconds=2)
    report(admin, net, [{"sku": net_sku, "quantity": 6, "observed_at": after_confirmation}])
    report(admin, gross, [{"sku": gross_sku, "quantity": 6, "observed_at": after_confirmation}])

    assert availability(shop, net_sku)["available"] == 6
    assert numbers(shop, gross_sku)["committed"] == 4
    assert availability(shop, gross_sku)["available"] == 2


def test_a_report_after_a_shipment_replaces_it_and_an_older_report_does_not(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    supplier = new_supplier(admin)
    sku = random_sku()
    map_sku(admin, supplier, sku)
    report(admin, supplier, [{"sku": sku, "quantity": 20, "observed_at": iso(seconds=-120)}])
    path = f"/v1/reservations/{confirmed(oms, (sku, 5))}"
    ok(oms.post(f"{path}/fulfil", json={"lines": [{"sku": sku, "quantity": 5}]}))
    assert availability(shop, sku)["sellable"] == 15

    # Newer than the last report, older than the shipment: the 5 shipped still count.
    report(admin, supplier, [{"sku": sku, "quantity": 20, "observed_at": iso(seconds=-60)}])
    assert availability(shop, sku)["sellable"] == 15

    # After the shipment: the supplier's 15 already leaves the 5 shipped out.
    report(admin, supplier, [{"sku": sku, "quantity": 15, "observed_at": iso(seconds=2)}])
    assert numbers(shop, sku) == {
        "on_hand": 15,
        "sellable": 15,
        "held": 0,
        "committed": 0,
        "available": 15,
    }


def test_safety_stock_is_kept_back_from_what_may_be_sold(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    sku = stocked_sku(admin, {new_supplier(admin): 10})

    ok(admin.put(f"/v1/skus/{sku}", json={"safety_stock": 4}))

    levels = availability(shop, sku)
    assert (levels["on_hand"], levels["sellable"], levels["available"]) == (10, 6, 6)
    assert reserve(oms, (sku, 7)).json()["detail"]["lines"][0]["available"] == 6
    assert reserve(oms, (sku, 6)).status_code == 201


# Expiry -----------------------------------------------------------------------------------------


def test_a_hold_past_its_ttl_stops_counting_before_any_sweeper_writes_it(
    ledger_without_sweeper: Server,
) -> None:
    with (
        ledger_without_sweeper.client("test-admin") as admin,
        ledger_without_sweeper.client("test-oms") as oms,
    ):
        sku = stocked_sku(admin, {new_supplier(admin): 5})
        reservation = ok(reserve(oms, (sku, 2), ttl_seconds=1), 201)
        assert availability(admin, sku)["held"] == 2
        expires_at = datetime.fromisoformat(reservation["expires_at"])

        time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.05)

        assert numbers(admin, sku)["held"] == 0
        assert availability(admin, sku)["available"] == 5
        path = f"/v1/reservations/{reservation['reservation_id']}"
        assert ok(oms.get(path))["status"] == "expired"
        refused = oms.post(f"{path}/confirm")
        assert refused.status_code == 409
        assert refused.json()["error"] == "reservation_expired"


def test_the_sweeper_writes_an_expired_hold_as_expired_within_seconds(
    ledger: Server, admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    sku = stocked_sku(admin, {new_supplier(admin): 5})
    sweeps_before = len(log_events(ledger, "sweeper.expired"))
    response = reserve(oms, (sku, 2), ttl_seconds=1)
    reservation = ok(response, 201)
    placed_at = int(response.headers[POSITION])
    path = f"/v1/reservations/{reservation['reservation_id']}"
    assert ok(oms.get(path))["status"] == "held"

    wait_for(lambda: ok(oms.get(path))["status"] == "expired", timeout=5)
    # The Expired event is a write: the log moves past the hold, and the sweeper says so.
    wait_for(lambda: availability(shop, sku)["position"] > placed_at, timeout=5)
    wait_for(lambda: len(log_events(ledger, "sweeper.expired")) > sweeps_before, timeout=5)

    assert numbers(shop, sku)["held"] == 0
    assert availability(shop, sku)["available"] == 5


def test_a_fulfil_or_return_sent_again_with_its_key_says_it_was_a_replay(
    admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    """As an order's replay does (an OMS walkthrough: only the position header's absence
    told a replayed fulfil from one applied)."""
    sku = stocked_sku(admin, {new_supplier(admin): 10})
    path = f"/v1/reservations/{confirmed(oms, (sku, 4))}"
    line = {"lines": [{"sku": sku, "quantity": 1}]}
    keyed = {"Idempotency-Key": uuid.uuid4().hex}
    shipped = oms.post(f"{path}/fulfil", json=line, headers=keyed)
    again = oms.post(f"{path}/fulfil", json=line, headers=keyed)
    unkeyed = oms.post(f"{path}/fulfil", json=line)
    back = {**line, "restock": True}
    returned = oms.post(f"{path}/return", json=back, headers=keyed)
    returned_again = oms.post(f"{path}/return", json=back, headers=keyed)

    for first in (shipped, unkeyed, returned):
        assert first.status_code == 200, first.text
        assert "Idempotent-Replayed" not in first.headers
        assert POSITION in first.headers
    for replay in (again, returned_again):
        assert replay.status_code == 200, replay.text
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert POSITION not in replay.headers
    assert [line["fulfilled"] for line in ok(oms.get(path))["lines"]] == [2]
    assert numbers(shop, sku)["sellable"] == 9  # 10, 2 shipped, 1 back


def test_a_replay_saved_in_one_batch_with_a_write_to_its_reservation_still_says_so(
    admin: httpx.Client, oms: httpx.Client
) -> None:
    """A walkthrough: a fulfil sent again with its key, decided in the batch of another
    fulfil of the same reservation, was answered with that batch's position and without
    `Idempotent-Replayed`, as if it had shipped again."""
    sku = stocked_sku(admin, {new_supplier(admin): 40})
    path = f"/v1/reservations/{confirmed(oms, (sku, 30))}"
    line = {"lines": [{"sku": sku, "quantity": 1}]}
    kept = {"Idempotency-Key": uuid.uuid4().hex}
    ok(oms.post(f"{path}/fulfil", json=line, headers=kept))
    keys = [kept if n % 2 else {"Idempotency-Key": uuid.uuid4().hex} for n in range(24)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(
            pool.map(lambda key: oms.post(f"{path}/fulfil", json=line, headers=key), keys)
        )

    for key, answer in zip(keys, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert ("Idempotent-Replayed" in answer.headers) == (key is kept), answer.headers
    assert [line["fulfilled"] for line in ok(oms.get(path))["lines"]] == [13]


def test_an_oms_keeps_a_hold_longer_while_its_checkout_waits(
    ledger: Server, admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    """A checkout waiting on its payment keeps its hold: it had to confirm (a commitment
    the order might never need) or lose the units when the hold ran out."""
    sku = stocked_sku(admin, {new_supplier(admin): 5})
    response = reserve(oms, (sku, 2), ttl_seconds=2)
    placed = ok(response, 201)
    path = f"/v1/reservations/{placed['reservation_id']}"

    extended = ok(oms.post(f"{path}/extend", json={"ttl_seconds": 600}))
    shorter = ok(oms.post(f"{path}/extend", json={"ttl_seconds": 60}))
    time.sleep(3)  # past the first expiry; the sweeper runs every second
    after = ok(oms.get(path))
    kept = numbers(shop, sku)
    with ledger.client("test-audit") as auditor:
        history = ok(auditor.get(f"/v1/skus/{sku}/history"))["items"]
        held_now = ok(auditor.get("/v1/reservations", params={"status": "held", "limit": 1000}))
    with ledger.client("test-oms-2") as other:
        theirs = other.post(f"{path}/extend", json={"ttl_seconds": 600})
    too_long = oms.post(f"{path}/extend", json={"ttl_seconds": 10**9})
    no_ttl = oms.post(f"{path}/extend", json={})
    ok(oms.post(f"{path}/confirm"))
    committed = oms.post(f"{path}/extend", json={"ttl_seconds": 600})

    was = datetime.fromisoformat(placed["expires_at"])
    now = datetime.fromisoformat(extended["expires_at"])
    assert timedelta(seconds=590) < now - was < timedelta(seconds=602)
    assert shorter["expires_at"] == extended["expires_at"]  # never shortened
    assert (after["status"], after["expires_at"]) == ("held", extended["expires_at"])
    assert (kept["held"], kept["available"]) == (2, 3)
    assert placed["reservation_id"] in [r["reservation_id"] for r in held_now["items"]]
    assert [e["type"].rsplit(".", 1)[1] for e in history][-2:] == ["Held", "HoldExtended"]
    assert history[-1]["reason"] == "oms.extend"
    assert (theirs.status_code, theirs.json()["error"]) == (404, "reservation_not_found")
    assert (too_long.status_code, too_long.json()["error"]) == (422, "ttl_too_long")
    assert (no_ttl.status_code, no_ttl.json()["error"]) == (422, "validation_error")
    assert (committed.status_code, committed.json()["error"]) == (409, "invalid_state")


def test_an_oms_cancels_part_of_an_order_and_the_rest_stands(
    ledger: Server, admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    """A customer drops an item, a pick comes up short: the OMS cancels those units and
    the rest of the order stands (before, it could only release the whole order)."""
    first, second = new_supplier(admin, priority=1), new_supplier(admin, priority=2)
    shirt = stocked_sku(admin, {first: 3, second: 5})
    socks = stocked_sku(admin, {first: 4})
    reservation_id = held(oms, (shirt, 5), (socks, 2))
    path = f"/v1/reservations/{reservation_id}"
    lines = {"lines": [{"sku": shirt, "quantity": 2, "supplier_id": second}], "reason": "dropped"}

    from_hold = oms.post(f"{path}/cancel", json=lines, headers={"Idempotency-Key": "c-1"})
    again = oms.post(f"{path}/cancel", json=lines, headers={"Idempotency-Key": "c-1"})
    shirt_held = numbers(shop, shirt)
    ok(oms.post(f"{path}/confirm"))
    short_pick = ok(oms.post(f"{path}/cancel", json={"lines": [{"sku": socks, "quantity": 1}]}))
    socks_committed = numbers(shop, socks)
    stranger = oms.post(
        f"{path}/cancel", json={"lines": [{"sku": socks, "quantity": 1, "supplier_id": second}]}
    )
    too_many = oms.post(f"{path}/cancel", json={"lines": [{"sku": shirt, "quantity": 4}]})
    with ledger.client("test-oms-2") as other:
        theirs = other.post(f"{path}/cancel", json={"lines": [{"sku": socks, "quantity": 1}]})
    with ledger.client("test-audit") as auditor:
        listed = ok(auditor.get("/v1/reservations", params={"status": "confirmed", "limit": 1000}))
        history = ok(auditor.get(f"/v1/skus/{shirt}/history"))["items"]
    ok(oms.post(f"{path}/fulfil", json={"lines": [{"sku": shirt, "quantity": 3}]}))
    closed = ok(oms.post(f"{path}/cancel", json={"lines": [{"sku": socks, "quantity": 1}]}))

    assert from_hold.status_code == 200, from_hold.text
    shirt_line = from_hold.json()["lines"][0]
    assert (from_hold.json()["status"], shirt_line["cancelled"]) == ("held", 2)
    assert [(a["supplier_id"], a["cancelled"]) for a in shirt_line["allocations"]] == [
        (first, 0),
        (second, 2),
    ]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["lines"] == from_hold.json()["lines"]
    assert (shirt_held["held"], shirt_held["available"]) == (3, 5)
    assert (short_pick["status"], short_pick["lines"][1]["cancelled"]) == ("confirmed", 1)
    assert (socks_committed["committed"], socks_committed["available"]) == (1, 3)
    assert (stranger.status_code, stranger.json()["error"]) == (422, "supplier_not_on_line")
    assert (too_many.status_code, too_many.json()["error"]) == (409, "exceeds_open_quantity")
    assert (theirs.status_code, theirs.json()["error"]) == (404, "reservation_not_found")
    [in_view] = [r for r in listed["items"] if r["reservation_id"] == reservation_id]
    assert [line["cancelled"] for line in in_view["lines"]] == [2, 1]
    assert [e["type"].rsplit(".", 1)[1] for e in history][-2:] == ["HoldReleased", "HoldConfirmed"]
    assert history[-2]["reason"] == "oms.cancel"
    # The last unit open cancelled, with the shirts shipped: the order is done.
    assert closed["status"] == "fulfilled"
    assert numbers(shop, socks)["available"] == 4


def test_a_reservation_s_history_says_what_was_done_to_it_and_why(
    ledger: Server, admin: httpx.Client, oms: httpx.Client
) -> None:
    """A walkthrough: a cancel's reason was only in the reservation's events, which an
    auditor could reach only by paging the whole log. A return names the supplier that
    shipped the units (it could not: the restock counted on the first allocated)."""
    first, second = new_supplier(admin, priority=1), new_supplier(admin, priority=2)
    shirt = stocked_sku(admin, {first: 2, second: 2})
    reservation_id = confirmed(oms, (shirt, 4))
    path = f"/v1/reservations/{reservation_id}"
    ok(
        oms.post(
            f"{path}/cancel", json={"lines": [{"sku": shirt, "quantity": 1}], "reason": "dropped"}
        )
    )
    ok(oms.post(f"{path}/fulfil", json={"lines": [{"sku": shirt, "quantity": 3}]}))
    back = ok(
        oms.post(
            f"{path}/return",
            json={"lines": [{"sku": shirt, "quantity": 1, "supplier_id": second}], "restock": True},
        )
    )

    with ledger.client("test-audit") as auditor:
        read = ok(auditor.get(f"{path}/history"))
        paged = ok(auditor.get(f"{path}/history", params={"after_version": 2, "limit": 2}))
        unknown = auditor.get(f"/v1/reservations/{uuid.uuid4()}/history")
    with ledger.client("test-oms-2") as other:
        theirs = other.get(f"{path}/history")
    own = oms.get(f"{path}/history")

    types = [e["type"].rsplit(".", 1)[1] for e in read["items"]]
    assert types == ["Placed", "Confirmed", "LinesCancelled", "Fulfilled", "Returned"]
    cancelled = read["items"][2]
    assert cancelled["payload"]["note"] == "dropped"
    assert cancelled["payload"]["movements"] == [
        {"sku": shirt, "supplier_id": first, "quantity": 1}
    ]
    assert cancelled["reason"] == "oms.cancel"
    assert [e["version"] for e in paged["items"]] == [3, 4]
    assert paged["next_after_version"] == 4
    assert (unknown.status_code, unknown.json()["error"]) == (404, "reservation_not_found")
    assert (theirs.status_code, theirs.json()["error"]) == (404, "reservation_not_found")
    assert own.status_code == 200
    assert [(a["supplier_id"], a["returned"]) for a in back["lines"][0]["allocations"]] == [
        (first, 0),
        (second, 1),
    ]


# Requests ---------------------------------------------------------------------------------------


def test_the_request_id_sent_is_echoed_back_and_a_fresh_one_is_made_otherwise(
    shop: httpx.Client,
) -> None:
    sent = f"e2e-{uuid.uuid4().hex}"

    answered = shop.get("/healthz", headers={"X-Request-ID": sent})
    refused = shop.get(f"/v1/availability/{random_sku()}", headers={"X-Request-ID": sent})
    unnamed = shop.get("/healthz")
    unusable = shop.get("/healthz", headers={"X-Request-ID": "has spaces; and more"})

    assert answered.headers["X-Request-ID"] == sent
    assert refused.status_code == 404
    assert refused.headers["X-Request-ID"] == sent
    made = {unnamed.headers["X-Request-ID"], unusable.headers["X-Request-ID"]}
    assert len(made) == 2
    assert all(len(request_id) == 32 for request_id in made)


# Metrics ----------------------------------------------------------------------------------------


def test_a_single_worker_server_counts_its_commands_for_metrics(
    ledger_without_sweeper: Server,
) -> None:
    """One worker counts in the serving process itself: the multiprocess directory must be
    set before prometheus-client is first imported there, or nothing would show."""
    placed = ("ledger_commands_total", (("command", "Reserve"), ("outcome", "ok")))
    with (
        ledger_without_sweeper.client("test-admin") as admin,
        ledger_without_sweeper.client("test-oms") as oms,
    ):
        sku = stocked_sku(admin, {new_supplier(admin): 5})
        before = scrape(ledger_without_sweeper).get(placed, 0)
        ok(reserve(oms, (sku, 1)), 201)
        ok(reserve(oms, (sku, 1)), 201)
        after = scrape(ledger_without_sweeper)
    assert after[placed] - before == 2


def test_an_auditor_reads_reservations_but_a_storefront_does_not(
    ledger: Server, admin: httpx.Client, oms: httpx.Client, shop: httpx.Client
) -> None:
    """An auditor follows a reservation named in a SKU's history (it used to get 403)."""
    supplier_id = new_supplier(admin)
    sku = stocked_sku(admin, {supplier_id: 5})
    order_id = f"audited-{uuid.uuid4().hex[:8]}"
    reservation_id = ok(reserve(oms, (sku, 2), order_id=order_id), 201)["reservation_id"]
    with ledger.client("test-audit") as auditor:
        one = ok(auditor.get(f"/v1/reservations/{reservation_id}"))
        listed = ok(auditor.get("/v1/reservations", params={"order_id": order_id}))
        written = auditor.post(f"/v1/reservations/{reservation_id}/release")
    assert (one["reservation_id"], one["status"]) == (reservation_id, "held")
    assert [r["reservation_id"] for r in listed["items"]] == [reservation_id]
    assert written.status_code == 403  # reads only
    assert shop.get(f"/v1/reservations/{reservation_id}").status_code == 403


def test_a_supplier_s_key_reports_its_own_skus_not_ours(
    admin: httpx.Client, acme: httpx.Client, shop: httpx.Client
) -> None:
    """Found by a security review: acme's key, naming our `sku`, set acme's level for a
    SKU acme has no mapping for (999 units, all sellable); it may name only SKUs it maps
    one of its own to (above)."""
    other = new_supplier(admin)
    sku = stocked_sku(admin, {other: 5})  # acme maps nothing to it
    sent = {"observations": [{"sku": sku, "quantity": 999, "observed_at": iso()}]}
    by_acme = ok(acme.post("/v1/suppliers/acme/stock", json=sent))
    assert (by_acme["applied"], by_acme["rejected"]) == (
        0,
        [{"index": 0, "reason": "sku_not_allowed: a SKU this supplier maps none of its SKUs to"}],
    )
    assert availability(shop, sku)["on_hand"] == 5
    # An admin may still report by our SKU.
    assert ok(admin.post(f"/v1/suppliers/{other}/stock", json=sent))["applied"] == 1


@pytest.mark.parametrize(("action", "extra"), [("fulfil", {}), ("return", {"restock": True})])
def test_fulfilling_or_returning_a_sku_the_catalogue_lacks_is_an_unknown_sku(
    admin: httpx.Client, oms: httpx.Client, action: str, extra: dict[str, Any]
) -> None:
    """Found by an API fuzzing walkthrough: it was `409 exceeds_open_quantity`, where an
    order naming it is `422 unknown_sku`. A SKU the catalogue holds but the reservation
    does not is still the reservation's conflict."""
    supplier_id = new_supplier(admin)
    sku, other = (stocked_sku(admin, {supplier_id: 10}) for _ in range(2))
    reservation_id = confirmed(oms, (sku, 2))
    if action == "return":
        ok(
            oms.post(
                f"/v1/reservations/{reservation_id}/fulfil",
                json={"lines": [{"sku": sku, "quantity": 2}]},
            )
        )
    path = f"/v1/reservations/{reservation_id}/{action}"

    unknown = oms.post(path, json={"lines": [{"sku": "NO-SUCH-SKU", "quantity": 1}], **extra})
    not_on_it = oms.post(path, json={"lines": [{"sku": other, "quantity": 1}], **extra})

    assert (unknown.status_code, unknown.json()["error"]) == (422, "unknown_sku")
    assert (not_on_it.status_code, not_on_it.json()["error"]) == (409, "exceeds_open_quantity")


def test_an_order_s_listing_says_when_it_was_cut_at_the_first_hundred(
    admin: httpx.Client, oms: httpx.Client
) -> None:
    """An OMS walkthrough: an order of 105 reservations listed 100, with nothing to say
    that more were left out."""
    sku = stocked_sku(admin, {new_supplier(admin): 1000})
    order_id = f"big-{uuid.uuid4().hex[:8]}"
    made = [
        ok(reserve(oms, (sku, 1), order_id=order_id), 201)["reservation_id"] for _ in range(101)
    ]

    listed = ok(oms.get("/v1/reservations", params={"order_id": order_id}))
    cancelled_one = ok(oms.post(f"/v1/reservations/{made[0]}/release"))
    held_ones = ok(oms.get("/v1/reservations", params={"order_id": order_id, "status": "held"}))

    assert (len(listed["items"]), listed["truncated"], listed["next_after"]) == (100, True, None)
    assert [r["reservation_id"] for r in listed["items"]] == made[:100]  # the first made
    assert cancelled_one["status"] == "released"
    assert (len(held_ones["items"]), held_ones["truncated"]) == (100, False)


def test_an_oms_pages_through_its_reservations_by_status(
    postgres_server_url: str, tmp_path: Path
) -> None:
    """Found by a walkthrough: reservations were listed only by order, so an OMS could not
    reconcile its open holds and commitments."""
    extra = {"LEDGER_RUN_SWEEPER": "false"}  # the short hold runs out unrecorded
    with (
        serving(postgres_server_url, tmp_path, 1, extra_env=extra) as server,
        server.client("test-admin") as admin,
        server.client("test-oms") as oms,
    ):
        sku = stocked_sku(admin, {new_supplier(admin): 100})
        holds = [held(oms, (sku, 1)) for _ in range(5)]
        short = held(oms, (sku, 1), ttl_seconds=1)
        commitments = [confirmed(oms, (sku, 1)) for _ in range(2)]
        runs_out = datetime.fromisoformat(
            ok(oms.get(f"/v1/reservations/{short}"))["expires_at"].replace("Z", "+00:00")
        )
        time.sleep(max(0.0, (runs_out - datetime.now(UTC)).total_seconds()) + 0.2)
        pages: list[dict[str, Any]] = []
        while not pages or pages[-1]["next_after"] is not None:
            cursor = {"after": pages[-1]["next_after"]} if pages else {}
            pages.append(
                ok(oms.get("/v1/reservations", params={"status": "held", "limit": 2, **cursor}))
            )
        expired = ok(oms.get("/v1/reservations", params={"status": "expired"}))
        confirmed_now = ok(oms.get("/v1/reservations", params={"status": "confirmed"}))
        everything = ok(oms.get("/v1/reservations", params={"limit": 1000}))
        of_order = ok(
            oms.get("/v1/reservations", params={"order_id": "order-1", "status": "confirmed"})
        )
        unknown = oms.get("/v1/reservations", params={"status": "open"})
        paged_order = oms.get("/v1/reservations", params={"order_id": "order-1", "limit": 5})

    listed = [item["reservation_id"] for page in pages for item in page["items"]]
    assert [len(page["items"]) for page in pages] == [2, 2, 1]
    assert listed == sorted(holds)
    assert {item["status"] for page in pages for item in page["items"]} == {"held"}
    assert [(i["reservation_id"], i["status"]) for i in expired["items"]] == [(short, "expired")]
    assert sorted(i["reservation_id"] for i in confirmed_now["items"]) == sorted(commitments)
    assert len(everything["items"]) == 8
    assert everything["next_after"] is None
    assert sorted(i["reservation_id"] for i in of_order["items"]) == sorted(commitments)
    assert (unknown.status_code, unknown.json()["error"]) == (422, "validation_error")
    assert (paged_order.status_code, paged_order.json()["error"]) == (422, "validation_error")
