"""The read side over HTTP: views with read-your-writes, conflicts, audit, and the CLI."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Server, free_port, random_sku, serving


@pytest.fixture(scope="module")
def ledger(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    extra = {"LEDGER_READ_WAIT_MAX_SECONDS": "1"}
    path = tmp_path_factory.mktemp("read-side")
    with serving(postgres_server_url, path, 2, extra_env=extra) as running:
        yield running


def iso(seconds: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def supplier(admin: httpx.Client, **terms: Any) -> str:
    supplier_id = f"s-{uuid.uuid4().hex[:8]}"
    answer = admin.put(f"/v1/suppliers/{supplier_id}", json={"name": supplier_id, **terms})
    assert answer.status_code == 200, answer.text
    return supplier_id


def sku_with_stock(admin: httpx.Client, supplier_id: str, quantity: int) -> str:
    sku = random_sku()
    assert admin.put(f"/v1/skus/{sku}", json={"safety_stock": 0}).status_code == 200
    report(admin, supplier_id, [{"sku": sku, "quantity": quantity, "observed_at": iso()}])
    return sku


def report(admin: httpx.Client, supplier_id: str, observations: list[dict[str, Any]]) -> Any:
    answer = admin.post(f"/v1/suppliers/{supplier_id}/stock", json={"observations": observations})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_an_availability_read_with_the_write_position_sees_the_write(ledger: Server) -> None:
    with (
        ledger.client("test-admin") as admin,
        ledger.client("test-oms") as oms,
        ledger.client("test-shop", consistent=False) as shop,
    ):
        sku = sku_with_stock(admin, supplier(admin), 10)
        placed = oms.post(
            "/v1/reservations",
            headers={"Idempotency-Key": uuid.uuid4().hex},
            json={"order_id": "ryw", "lines": [{"sku": sku, "quantity": 4}]},
        )
        position = int(placed.headers["X-Ledger-Position"])
        by_query = shop.get(f"/v1/availability/{sku}", params={"min_position": position})
        by_header = shop.get(f"/v1/availability/{sku}", headers={"X-Min-Position": str(position)})

    for answer in (by_query, by_header):
        assert answer.status_code == 200
        assert answer.json()["held"] == 4
        assert answer.json()["position"] >= position
        assert int(answer.headers["X-Ledger-Position"]) >= position


def test_a_read_without_a_position_follows_the_write_and_names_the_position_it_shows(
    ledger: Server,
) -> None:
    """Plain reads come from each API process's copy of the view: every answer must be the
    view at the position it names, and the copy must catch up with the write quickly."""
    with (
        ledger.client("test-admin") as admin,
        ledger.client("test-oms") as oms,
        ledger.client("test-shop", consistent=False) as shop,
    ):
        sku = sku_with_stock(admin, supplier(admin), 10)
        admin.get(f"/v1/availability/{sku}").raise_for_status()  # the view has the stock
        seen = 0
        deadline = time.monotonic() + 5
        while seen < 4 and time.monotonic() < deadline:  # both workers' copies have it
            seen = seen + 1 if shop.get(f"/v1/availability/{sku}").json()["available"] else 0
        placed = oms.post(
            "/v1/reservations",
            headers={"Idempotency-Key": uuid.uuid4().hex},
            json={"order_id": "copy", "lines": [{"sku": sku, "quantity": 4}]},
        )
        written = int(placed.headers["X-Ledger-Position"])
        answers = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            answer = shop.get(f"/v1/availability/{sku}").json()
            answers.append((answer["position"], answer["held"]))
            if len([1 for position, _ in answers if position >= written]) >= 4:
                break
            time.sleep(0.01)

    assert seen == 4, "plain reads caught up with the stock report"
    assert answers[-1] == (answers[-1][0], 4), "the reads caught up with the reservation"
    for position, held in answers:
        assert held == (4 if position >= written else 0), (position, held, written)


@pytest.mark.alone
def test_a_read_for_a_position_past_the_log_s_end_says_so_at_once(ledger: Server) -> None:
    """No write has reached such a position: the read does not hold a thread for the
    wait's bound (5 s) for it, and says where the log ends."""
    with (
        ledger.client("test-shop", consistent=False) as shop,
        ledger.client("test-audit") as audit,
    ):
        started = time.monotonic()
        answer = shop.get("/v1/availability/ANY", params={"min_position": 10**12})
        took = time.monotonic() - started
        listed = audit.get("/v1/conflicts", params={"min_position": 10**12})
    assert answer.status_code == 503
    assert answer.json()["error"] == "position_not_reached"
    detail = answer.json()["detail"]
    assert detail["min_position"] == 10**12
    assert 0 < detail["log_position"] < 10**12
    assert "Retry-After" not in answer.headers
    assert took < 1.0
    assert listed.status_code == 503
    assert listed.json()["detail"]["log_position"] >= detail["log_position"]


def test_reservations_are_listed_by_order_from_the_view(ledger: Server) -> None:
    with ledger.client("test-admin") as admin, ledger.client("test-oms") as oms:
        sku = sku_with_stock(admin, supplier(admin), 10)
        order = f"order-{uuid.uuid4().hex[:6]}"
        ids = {
            oms.post(
                "/v1/reservations",
                headers={"Idempotency-Key": uuid.uuid4().hex},
                json={"order_id": order, "lines": [{"sku": sku, "quantity": 1}]},
            ).json()["reservation_id"]
            for _ in range(2)
        }
        listed = oms.get("/v1/reservations", params={"order_id": order})
    assert listed.status_code == 200
    assert {item["reservation_id"] for item in listed.json()["items"]} == ids


def conflicts(client: httpx.Client, **filters: Any) -> list[dict[str, Any]]:
    answer = client.get("/v1/conflicts", params={"limit": 1000, **filters})
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def test_every_kind_of_conflict_is_produced_and_listed_with_its_cause(ledger: Server) -> None:
    with (
        ledger.client("test-admin") as admin,
        ledger.client("test-oms") as oms,
        ledger.client("test-audit") as audit,
    ):
        short = supplier(admin)
        sku = sku_with_stock(admin, short, 10)
        oms.post(
            "/v1/reservations",
            headers={"Idempotency-Key": uuid.uuid4().hex},
            json={"order_id": "x", "lines": [{"sku": sku, "quantity": 8}]},
        )
        report(admin, short, [{"sku": sku, "quantity": 3, "observed_at": iso(1)}])  # exposure 5

        jumpy = supplier(admin)
        jump_sku = sku_with_stock(admin, jumpy, 1000)
        report(admin, jumpy, [{"sku": jump_sku, "quantity": 10, "observed_at": iso(1)}])
        report(admin, jumpy, [{"sku": jump_sku, "quantity": 7, "observed_at": iso(-3600)}])

        mapped = supplier(admin)
        report(
            admin, mapped, [{"supplier_sku": "NOBODY-KNOWS", "quantity": 1, "observed_at": iso()}]
        )

        drowsy = supplier(admin, stale_after_seconds=1)
        sku_with_stock(admin, drowsy, 5)
        deadline = time.monotonic() + 20
        while not conflicts(audit, kind="supplier_stale", supplier_id=drowsy):
            assert time.monotonic() < deadline, "the sweeper never noticed the stale supplier"
            time.sleep(0.2)

        found = {
            "oversell_exposure": conflicts(audit, kind="oversell_exposure", sku=sku),
            "anomalous_jump": conflicts(audit, kind="anomalous_jump", sku=jump_sku),
            "late_report": conflicts(audit, kind="late_report", sku=jump_sku),
            "unmapped_sku": conflicts(audit, kind="unmapped_sku", supplier_id=mapped),
            "supplier_stale": conflicts(audit, kind="supplier_stale", supplier_id=drowsy),
        }

    assert {kind: len(items) for kind, items in found.items()} == dict.fromkeys(found, 1)
    assert found["oversell_exposure"][0]["detail"]["exposure"] == 5
    assert found["anomalous_jump"][0]["detail"]["change"] == -990
    assert found["unmapped_sku"][0]["detail"]["supplier_skus"] == ["NOBODY-KNOWS"]
    cause = found["oversell_exposure"][0]["caused_by"]
    assert cause["type"] == "stockledger:StockItem.Observed"
    assert cause["actor"] == "admin"


def test_paging_through_conflicts_one_at_a_time_lists_each_once_even_two_of_one_event(
    ledger: Server,
) -> None:
    with (
        ledger.client("test-admin") as admin,
        ledger.client("test-oms") as oms,
        ledger.client("test-audit") as audit,
    ):
        falling = supplier(admin)
        sku = sku_with_stock(admin, falling, 1000)
        held = oms.post(
            "/v1/reservations",
            headers={"Idempotency-Key": uuid.uuid4().hex},
            json={"order_id": "x", "lines": [{"sku": sku, "quantity": 800}]},
        )
        assert held.status_code == 201, held.text
        # One report: a jump of -990 and 790 units exposed, two conflicts of one event.
        report(admin, falling, [{"sku": sku, "quantity": 10, "observed_at": iso(1)}])
        both = conflicts(audit, sku=sku)
        assert sorted(c["kind"] for c in both) == ["anomalous_jump", "oversell_exposure"]
        assert len({c["caused_by"]["position"] for c in both}) == 1

        walked: list[str] = []
        after, pages = 0, 0
        while True:
            answer = audit.get("/v1/conflicts", params={"sku": sku, "limit": 1, "after": after})
            assert answer.status_code == 200, answer.text
            page = answer.json()
            walked += [c["conflict_id"] for c in page["items"]]
            pages += 1
            if page["next_after"] is None:
                break
            after = page["next_after"]
            assert pages < 5

    assert sorted(walked) == sorted(c["conflict_id"] for c in both)


def test_acknowledging_a_conflict_is_an_event_and_moves_it_out_of_the_open_list(
    ledger: Server,
) -> None:
    with ledger.client("test-admin") as admin, ledger.client("test-audit") as audit:
        noisy = supplier(admin)
        report(admin, noisy, [{"supplier_sku": "GHOST", "quantity": 1, "observed_at": iso()}])
        [conflict] = conflicts(audit, supplier_id=noisy, state="open")
        acknowledged = admin.post(
            f"/v1/conflicts/{conflict['conflict_id']}/acknowledge", json={"note": "mapping asked"}
        )
        assert acknowledged.status_code == 200
        assert conflicts(audit, supplier_id=noisy, state="open") == []
        [done] = conflicts(audit, supplier_id=noisy, state="acknowledged")
        position = acknowledged.json()["position"]
        log = audit.get("/v1/audit/events", params={"after": position - 1, "limit": 1})
        missing = admin.post(f"/v1/conflicts/{uuid.uuid4()}/acknowledge")
        forbidden = audit.post(f"/v1/conflicts/{conflict['conflict_id']}/acknowledge")

    assert (done["acknowledged_by"], done["note"]) == ("admin", "mapping asked")
    event = json.loads(log.text.splitlines()[0])
    assert event["type"] == "stockledger:ConflictAcknowledgement.Acknowledged"
    assert event["originator_id"] == conflict["conflict_id"]
    assert missing.status_code == 404
    assert forbidden.status_code == 403


def test_a_delivery_repeating_an_open_unmapped_sku_conflict_counts_as_its_repeat(
    ledger: Server,
) -> None:
    """An operator walkthrough: a feed read again and again with a record nobody mapped
    raised an unmapped_sku conflict at each delivery, 166 from 165. The open one counts
    the repeats; a new supplier SKU, or a repeat after it was acknowledged, raises anew."""
    with ledger.client("test-admin") as admin, ledger.client("test-audit") as audit:
        noisy = supplier(admin)

        def ghost(*names: str) -> Any:
            return report(
                admin,
                noisy,
                [{"supplier_sku": name, "quantity": 1, "observed_at": iso()} for name in names],
            )

        first = ghost("GHOST")
        ghost("GHOST")
        last = ghost("GHOST")
        [counted] = conflicts(audit, supplier_id=noisy, kind="unmapped_sku")
        ghost("GHOST", "SPECTRE")
        after_a_new_one = conflicts(audit, supplier_id=noisy, kind="unmapped_sku")
        newest = max(after_a_new_one, key=lambda c: c["caused_by"]["position"])
        acknowledged = admin.post(f"/v1/conflicts/{newest['conflict_id']}/acknowledge")
        assert acknowledged.status_code == 200, acknowledged.text
        ghost("SPECTRE")
        after_acknowledged = conflicts(audit, supplier_id=noisy, kind="unmapped_sku", state="open")
        # Then once more with the latest (the one just raised) acknowledged and an older one
        # open: the older one does not take it (only the latest, open, takes repeats).
        latest = max(after_acknowledged, key=lambda c: c["caused_by"]["position"])
        assert admin.post(f"/v1/conflicts/{latest['conflict_id']}/acknowledge").status_code == 200
        ghost("GHOST")
        live = conflicts(audit, supplier_id=noisy, kind="unmapped_sku")
        # A rebuild reads the same from the log.
        rebuilt = ledger_command(ledger.database_url, "projections", "rebuild", "conflicts")
        assert rebuilt.returncode == 0, rebuilt.stderr
        after_rebuild = conflicts(audit, supplier_id=noisy, kind="unmapped_sku")

    assert counted["detail"]["delivery_id"] == first["delivery_id"]
    assert counted["detail"]["repeats"] == 2
    assert counted["detail"]["last_delivery_id"] == last["delivery_id"]
    assert counted["detail"]["last_position"] == last["position"]
    assert len(after_a_new_one) == 2
    assert newest["detail"]["supplier_skus"] == ["GHOST", "SPECTRE"]
    assert "repeats" not in newest["detail"]
    # The first is still open (it names only GHOST); the one naming SPECTRE was
    # acknowledged, so SPECTRE again raised a new one.
    assert sorted(
        (c["conflict_id"] == counted["conflict_id"], c["detail"]["supplier_skus"])
        for c in after_acknowledged
    ) == [(False, ["SPECTRE"]), (True, ["GHOST"])]
    assert newest["conflict_id"] not in {c["conflict_id"] for c in after_acknowledged}
    assert len(live) == 4  # GHOST again raised a fourth
    assert [
        c["detail"].get("repeats") for c in live if c["conflict_id"] == counted["conflict_id"]
    ] == [2]
    assert after_rebuild == live


def test_the_history_of_a_sku_lists_every_event_with_actor_reason_and_request(
    ledger: Server,
) -> None:
    with ledger.client("test-admin") as admin, ledger.client("test-audit") as audit:
        source = supplier(admin)
        sku = sku_with_stock(admin, source, 10)
        admin.post(
            f"/v1/suppliers/{source}/stock",
            headers={"X-Request-ID": "req-audit-1"},
            json={"observations": [{"sku": sku, "quantity": 12, "observed_at": iso(1)}]},
        )
        first = audit.get(f"/v1/skus/{sku}/history", params={"limit": 2}).json()
        rest = audit.get(
            f"/v1/skus/{sku}/history", params={"after_version": first["next_after_version"]}
        ).json()
        unknown = audit.get("/v1/skus/NOT-A-SKU/history")
        # Whatever the cursor: it was answered as a history read to its end.
        unknown_paged = audit.get("/v1/skus/NOT-A-SKU/history", params={"after_version": 5})
        past_the_end = audit.get(f"/v1/skus/{sku}/history", params={"after_version": 3})
        shop = ledger.client("test-shop").get(f"/v1/skus/{sku}/history")

    events = first["items"] + rest["items"]
    assert [e["type"].rsplit(".", 1)[1] for e in events] == ["Registered", "Observed", "Observed"]
    assert [e["version"] for e in events] == [1, 2, 3]
    assert events[2]["payload"]["quantity"] == 12
    assert events[2]["payload"]["previous_quantity"] == 10
    assert (events[2]["actor"], events[2]["reason"], events[2]["correlation_id"]) == (
        "admin",
        "supplier.stock.reported",
        "req-audit-1",
    )
    assert events[1]["position"] < events[2]["position"]
    assert rest["next_after_version"] is None
    assert unknown.status_code == 404
    assert (unknown_paged.status_code, unknown_paged.json()["error"]) == (404, "unknown_sku")
    assert (past_the_end.status_code, past_the_end.json()["items"]) == (200, [])
    assert shop.status_code == 403


def test_the_stock_of_a_sku_at_a_time_and_at_a_position(ledger: Server) -> None:
    with ledger.client("test-admin") as admin, ledger.client("test-audit") as audit:
        source = supplier(admin)
        sku = sku_with_stock(admin, source, 10)
        between = iso()
        time.sleep(0.05)
        later = report(admin, source, [{"sku": sku, "quantity": 4, "observed_at": iso()}])
        then = audit.get(f"/v1/skus/{sku}/stock", params={"at": between}).json()
        now = audit.get(f"/v1/skus/{sku}/stock", params={"position": later["position"]}).json()
        both = audit.get(f"/v1/skus/{sku}/stock", params={"at": between, "position": 1})
        naive = audit.get(f"/v1/skus/{sku}/stock", params={"at": "2026-01-01T00:00:00"})
        # Where the log has not been yet: refused, not answered with the latest state.
        ahead = audit.get(f"/v1/skus/{sku}/stock", params={"position": 10**12})
        future = audit.get(f"/v1/skus/{sku}/stock", params={"at": "2099-01-01T00:00:00Z"})

    assert (then["on_hand"], then["available"], then["version"]) == (10, 10, 2)
    assert (ahead.status_code, ahead.json()["error"]) == (422, "not_yet_recorded")
    assert ahead.json()["detail"]["log_position"] >= later["position"]
    assert (future.status_code, future.json()["error"]) == (422, "not_yet_recorded")
    assert (now["on_hand"], now["available"], now["version"]) == (4, 4, 3)
    assert now["suppliers"][0]["supplier_id"] == source
    assert both.status_code == 422
    assert naive.status_code == 422


def test_every_answer_lists_a_sku_s_suppliers_by_id_whichever_reported_first(
    ledger: Server,
) -> None:
    """The stock view's rows came in no order, and the stock at a moment listed them as
    they first reported: two answers of one SKU listed its suppliers differently."""
    with ledger.client("test-admin") as admin, ledger.client("test-audit") as audit:
        first, second, third = (supplier(admin) for _ in range(3))
        later_ids = sorted([first, second, third], reverse=True)
        sku = sku_with_stock(admin, later_ids[0], 1)
        for quantity, supplier_id in enumerate(later_ids[1:], start=2):
            last = report(
                admin, supplier_id, [{"sku": sku, "quantity": quantity, "observed_at": iso()}]
            )
        wanted = {"min_position": last["position"]}
        read = audit.get(f"/v1/availability/{sku}", params=wanted).json()
        listed = audit.get("/v1/availability", params={"sku": [sku], **wanted}).json()
        moment = audit.get(f"/v1/skus/{sku}/stock", params={"position": last["position"]}).json()

    by_id = sorted(later_ids)
    assert [s["supplier_id"] for s in read["suppliers"]] == by_id
    assert [s["supplier_id"] for s in listed["items"][0]["suppliers"]] == by_id
    assert [(s["supplier_id"], s["quantity"]) for s in moment["suppliers"]] == [
        (supplier_id, later_ids.index(supplier_id) + 1) for supplier_id in by_id
    ]


def test_the_stock_at_a_moment_names_the_supplier_terms_its_numbers_were_made_with(
    ledger: Server,
) -> None:
    """An auditor's walkthrough: sellable moved from 94 to 89 between two positions with
    no event of the SKU's: the supplier's buffer had changed, which the answer did not say."""
    with ledger.client("test-admin") as admin, ledger.client("test-audit") as audit:
        source = supplier(admin, priority=3)
        sku = sku_with_stock(admin, source, 10)
        changed = admin.put(f"/v1/suppliers/{source}", json={"buffer": 4})
        assert changed.status_code == 200, changed.text
        moved = changed.headers["X-Ledger-Position"]
        before = audit.get(f"/v1/skus/{sku}/stock", params={"position": int(moved) - 1}).json()
        after = audit.get(f"/v1/skus/{sku}/stock", params={"position": moved}).json()

    assert before["version"] == after["version"]  # no event of the SKU's between them
    assert (before["sellable"], after["sellable"]) == (10, 6)
    [then], [now] = before["suppliers"], after["suppliers"]
    assert then["terms"] == {
        "priority": 3,
        "buffer": 0,
        "stale_after_seconds": None,
        "exclude_after_seconds": None,
        "reports_net_of_our_orders": False,
    }
    assert now["terms"] == {**then["terms"], "buffer": 4}


def test_the_holds_listed_at_a_time_are_those_its_held_total_counts(ledger: Server) -> None:
    """Found by a walkthrough: at the second a hold ran out, `held` no longer counted it
    but `holds` still listed it."""
    with (
        ledger.client("test-admin") as admin,
        ledger.client("test-oms") as oms,
        ledger.client("test-audit") as audit,
    ):
        sku = sku_with_stock(admin, supplier(admin), 10)
        placed = oms.post(
            "/v1/reservations",
            headers={"Idempotency-Key": uuid.uuid4().hex},
            json={"order_id": "ends", "lines": [{"sku": sku, "quantity": 3}], "ttl_seconds": 1},
        )
        assert placed.status_code == 201, placed.text
        expires_at = datetime.fromisoformat(placed.json()["expires_at"].replace("Z", "+00:00"))
        time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.5)
        before = audit.get(
            f"/v1/skus/{sku}/stock", params={"at": (expires_at - timedelta(seconds=1)).isoformat()}
        ).json()
        then = audit.get(f"/v1/skus/{sku}/stock", params={"at": expires_at.isoformat()}).json()

    def listed(answer: dict[str, Any]) -> int:
        return sum(hold["quantity"] for s in answer["suppliers"] for hold in s["holds"])

    assert (before["held"], listed(before)) == (3, 3)
    assert (then["held"], listed(then)) == (0, 0)


def test_a_storefront_pages_through_the_catalogue(ledger: Server) -> None:
    """Found by a walkthrough: nothing listed the catalogue's SKUs; availability is read
    by name."""
    prefix = f"CAT-{uuid.uuid4().hex[:8]}-"
    skus = [f"{prefix}{n}" for n in range(5)]
    with (
        ledger.client("test-admin") as admin,
        ledger.client("test-shop") as shop,
        ledger.client("test-acme") as supplier_key,
    ):
        for n, sku in enumerate(skus):
            assert admin.put(f"/v1/skus/{sku}", json={"safety_stock": n}).status_code == 200
        pages: list[dict[str, Any]] = []
        after = prefix
        while after is not None and after.startswith(prefix):
            answer = shop.get("/v1/skus", params={"after": after, "limit": 2})
            assert answer.status_code == 200, answer.text
            pages.append(answer.json())
            after = pages[-1]["next_after"]
        refused = supplier_key.get("/v1/skus")

    listed = [(i["sku"], i["safety_stock"]) for p in pages for i in p["items"]]
    assert [item for item in listed if item[0].startswith(prefix)] == [
        (sku, n) for n, sku in enumerate(skus)
    ]
    assert all(len(page["items"]) <= 2 for page in pages)
    assert refused.status_code == 403


def test_the_global_log_is_ndjson_from_a_position(ledger: Server) -> None:
    with ledger.client("test-admin") as admin, ledger.client("test-audit") as audit:
        sku_with_stock(admin, supplier(admin), 1)
        answer = audit.get("/v1/audit/events", params={"after": 2, "limit": 5})
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert answer.headers["content-type"].startswith("application/x-ndjson")
    assert [line["position"] for line in lines] == [3, 4, 5, 6, 7]
    assert all(
        {"type", "time", "actor", "reason", "correlation_id", "payload"} <= set(line)
        for line in lines
    )


def ledger_command(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_API_KEYS": "",
        "LEDGER_LOG_LEVEL": "WARNING",
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "api", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.alone  # its rebuild and commands open many connections
def test_the_cli_shows_status_rebuilds_and_exports(
    postgres_server_url: str, tmp_path: Path
) -> None:
    with serving(postgres_server_url, tmp_path, 1) as server:
        database_url = server.database_url
        with server.client("test-admin") as admin:
            sku = sku_with_stock(admin, supplier(admin), 7)
        status = ledger_command(database_url, "projections", "status")
        rebuilt = ledger_command(database_url, "projections", "rebuild", "stock")
        exported = ledger_command(
            database_url, "audit", "export", "--output", str(tmp_path / "log.ndjson")
        )
        piped = ledger_command(database_url, "audit", "export", "--output", "-")
        last = max(json.loads(line)["position"] for line in piped.stdout.splitlines())
        stock = ledger_command(database_url, "audit", "stock", sku, "--position", str(last))
        ahead = ledger_command(database_url, "audit", "stock", sku, "--position", "100000")
        with server.client("test-shop") as shop:
            after = shop.get(f"/v1/availability/{sku}")

    assert status.returncode == 0, status.stderr
    for name in ("stock", "reservations", "mappings", "conflicts"):
        assert name in status.stdout
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert exported.returncode == 0, exported.stderr
    assert "events written to" in exported.stdout
    assert "stock: generation 2 is live" in rebuilt.stdout
    assert after.json()["on_hand"] == 7  # the rebuilt view serves
    lines = (tmp_path / "log.ndjson").read_text().splitlines()
    assert len(lines) == len({json.loads(line)["position"] for line in lines}) >= 4
    # `-` is stdout: the same lines, the count said on stderr.
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.splitlines() == lines
    assert "events written to -" in piped.stderr
    assert json.loads(stock.stdout)["on_hand"] == 7
    assert ahead.returncode == 1  # not recorded yet
    assert "error: the log ends at position" in ahead.stderr


# Availability streams (server-sent events) ------------------------------------------------


class EventStream:
    """`GET /v1/stream/availability` read on a thread of its own, event by event."""

    def __init__(self, server: Server, params: dict[str, Any], headers: dict[str, str]) -> None:
        self.events: queue.Queue[tuple[str, int, dict[str, Any]] | None] = queue.Queue()
        self.status: int | None = None
        self._client = httpx.Client(base_url=server.base_url, timeout=httpx.Timeout(30, read=None))
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(params, headers), daemon=True)
        self._thread.start()
        assert self._opened.wait(10)

    def _read(self, params: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            with self._client.stream(
                "GET", "/v1/stream/availability", params=params, headers=headers
            ) as response:
                self.status = response.status_code
                self._opened.set()
                kind, ident, data = "message", 0, ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("id: "):
                        ident = int(line.removeprefix("id: "))
                    elif line.startswith("data: "):
                        data = line.removeprefix("data: ")
                    elif line == "" and data:
                        self.events.put((kind, ident, json.loads(data)))
                        kind, data = "message", ""
        except (httpx.HTTPError, ValueError):
            pass
        finally:
            self._opened.set()
            self.events.put(None)

    def next(self, timeout: float = 15) -> tuple[str, int, dict[str, Any]]:
        event = self.events.get(timeout=timeout)
        assert event is not None, "the stream ended"
        return event

    def until(self, wanted: Any, timeout: float = 15) -> tuple[str, int, dict[str, Any]]:
        """The first event `wanted` accepts; the others seen on the way are kept in `skipped`."""
        deadline = time.monotonic() + timeout
        self.skipped: list[tuple[str, int, dict[str, Any]]] = []
        while True:
            event = self.next(max(0.1, deadline - time.monotonic()))
            if wanted(event):
                return event
            self.skipped.append(event)

    def close(self) -> None:
        # The reader stays blocked until the server next writes (a keep-alive within 15 s,
        # or the server stopping); it is a daemon thread and holds nothing else.
        self._client.close()
        self._thread.join(0.2)


def stream(server: Server, key: str = "test-shop", **params: Any) -> EventStream:
    headers = {"Authorization": f"Bearer {key}"}
    if "last_event_id" in params:
        headers["Last-Event-ID"] = str(params.pop("last_event_id"))
    opened = EventStream(server, params, headers)
    assert opened.status == 200
    return opened


def hold(oms: httpx.Client, sku: str, quantity: int) -> int:
    answer = oms.post(
        "/v1/reservations",
        json={
            "order_id": f"o-{uuid.uuid4().hex[:8]}",
            "lines": [{"sku": sku, "quantity": quantity}],
        },
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    assert answer.status_code == 201, answer.text
    return int(answer.headers["X-Ledger-Position"])


def test_a_stream_of_named_skus_starts_with_their_availability_and_follows_each_change(
    ledger: Server,
) -> None:
    with ledger.client("test-admin") as admin, ledger.client("test-oms") as oms:
        supplier_id = supplier(admin)
        watched = sku_with_stock(admin, supplier_id, 10)
        other = sku_with_stock(admin, supplier_id, 5)
        live = stream(ledger, sku=[watched])
        try:
            # It starts with the SKU as the view has it (the report may not be in yet).
            kind, first, current = live.until(lambda e: e[2]["available"] == 10)
            assert (kind, current["sku"]) == ("availability", watched)
            assert all(e[2]["sku"] == watched for e in live.skipped)
            assert current["position"] == first
            with ledger.client("test-shop") as shop:
                read = shop.get(f"/v1/availability/{watched}", params={"min_position": first})
            assert {**read.json(), "suppliers": None} == {
                **current,
                "position": read.json()["position"],
                "suppliers": None,
            }

            held_at = hold(oms, watched, 3)
            hold(oms, other, 1)
            kind, _, changed = live.until(lambda e: e[2]["held"] == 3)
            assert (kind, changed["sku"], changed["available"]) == ("availability", watched, 7)
            assert changed["position"] >= held_at
            again_at = hold(oms, watched, 1)
            _, _, changed = live.until(lambda e: e[2]["held"] == 4)
            assert changed["position"] >= again_at
            # Only the SKU it names, and each change once it is in the view, in order.
            seen = [e[2]["sku"] for e in live.skipped]
            assert set(seen) <= {watched}
        finally:
            live.close()


def test_a_hold_that_runs_out_shows_on_the_stream_once_the_sweeper_records_it(
    ledger: Server,
) -> None:
    """The units of a hold that expired are free again on the stream too, not only to a
    read: the sweeper records the expiry on the SKU (`StockItem.HoldsExpired`), and the
    SKU's history says so."""
    with ledger.client("test-admin") as admin, ledger.client("test-oms") as oms:
        sku = sku_with_stock(admin, supplier(admin), 10)
        live = stream(ledger, sku=[sku])
        try:
            live.until(lambda e: e[2]["available"] == 10)
            answer = oms.post(
                "/v1/reservations",
                json={
                    "order_id": f"o-{uuid.uuid4().hex[:8]}",
                    "lines": [{"sku": sku, "quantity": 4}],
                    "ttl_seconds": 1,
                },
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            assert answer.status_code == 201, answer.text
            live.until(lambda e: e[2]["held"] == 4)
            # Within its second and the sweeper's next pass (0.2 s here), and no write
            # to the SKU meanwhile: only the expiry moves it.
            _, _, freed = live.until(lambda e: e[2]["held"] == 0, timeout=10)
            assert freed["available"] == 10
        finally:
            live.close()
        with ledger.client("test-audit") as auditor:
            history = auditor.get(f"/v1/skus/{sku}/history").json()
        last = history["items"][-1]
        assert last["type"] == "stockledger:StockItem.HoldsExpired", history
        assert last["actor"] == "sweeper"
        assert [hold["allocations"][0]["quantity"] for hold in last["payload"]["holds"]] == [4]


def test_a_stream_that_reconnects_from_its_last_event_gets_what_changed_meanwhile(
    ledger: Server,
) -> None:
    with ledger.client("test-admin") as admin, ledger.client("test-oms") as oms:
        sku = sku_with_stock(admin, supplier(admin), 10)
        first = stream(ledger, sku=[sku])
        _, last_seen, _ = first.until(lambda e: e[2]["available"] == 10)
        first.close()

        held_at = hold(oms, sku, 2)  # while nobody listens

        # Streams of everything: one opened afresh would start with nothing, and never
        # show this change; one resumed shows what changed since (by either worker).
        for resumed in (
            stream(ledger, last_event_id=last_seen, after=10**12),  # the header wins
            stream(ledger, after=last_seen),
        ):
            try:
                kind, _, changed = resumed.until(lambda e, sku=sku: e[2]["sku"] == sku, timeout=15)
                assert (kind, changed["held"], changed["available"]) == ("availability", 2, 8)
                assert changed["position"] >= held_at
            finally:
                resumed.close()


def test_a_stream_asked_to_start_at_a_write_starts_with_what_it_wrote(ledger: Server) -> None:
    with ledger.client("test-admin") as admin, ledger.client("test-oms") as oms:
        sku = sku_with_stock(admin, supplier(admin), 10)
        held_at = hold(oms, sku, 3)
        live = stream(ledger, sku=[sku], min_position=held_at)
        try:
            kind, _, first = live.next(15)
        finally:
            live.close()

    assert (kind, first["sku"], first["held"], first["available"]) == ("availability", sku, 3, 7)
    assert first["position"] >= held_at


def test_a_stream_of_everything_shows_skus_created_after_it_opened(ledger: Server) -> None:
    everything = stream(ledger)
    try:
        with ledger.client("test-admin") as admin:
            sku = sku_with_stock(admin, supplier(admin), 6)
        _, _, created = everything.until(lambda e: e[2]["sku"] == sku and e[2]["on_hand"] == 6)
        assert created["available"] == 6
    finally:
        everything.close()


@pytest.mark.parametrize(
    ("key", "params", "headers", "status", "code"),
    [
        (None, {}, {}, 401, None),
        (None, {"min_position": str(10**15)}, {}, 401, None),
        ("test-acme", {}, {}, 403, None),
        ("test-shop", {}, {"Last-Event-ID": "twelve"}, 422, "invalid_last_event_id"),
        ("test-shop", {"after": "-1"}, {}, 422, None),
        # Past a PostgreSQL bigint, as on every other route (it was a `reset`).
        ("test-shop", {"after": str(2**63)}, {}, 422, None),
        # A position the log never reached: at once, as a read (it was ignored).
        ("test-shop", {"min_position": str(10**15)}, {}, 503, "position_not_reached"),
        ("test-shop", {}, {"X-Min-Position": str(10**15)}, 503, "position_not_reached"),
        ("test-shop", {"sku": ["A\x01B"]}, {}, 422, "invalid_sku"),
        ("test-shop", {"sku": [f"S{n}" for n in range(101)]}, {}, 422, None),
    ],
)
def test_a_stream_asked_for_wrongly_is_refused_with_its_reason(
    ledger: Server,
    key: str | None,
    params: dict[str, Any],
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    if key is not None:
        headers = {**headers, "Authorization": f"Bearer {key}"}
    answer = httpx.get(
        f"{ledger.base_url}/v1/stream/availability", params=params, headers=headers, timeout=10
    )
    assert answer.status_code == status, answer.text
    if code is not None:
        assert answer.json()["error"] == code


def test_serve_told_not_to_migrate_refuses_a_database_nobody_migrated_and_leaves_it_be(
    database_url: str,
) -> None:
    env = {
        **os.environ,
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_API_KEYS": "a:admin:secret-secret-secret",
        "LEDGER_MIGRATE_ON_START": "false",
    }
    refused = subprocess.run(
        [sys.executable, "-m", "api", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    with psycopg.connect(database_url) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        [count] = tables.fetchone() or (None,)

    assert refused.returncode == 2, refused.stderr
    assert "not migrated" in refused.stderr
    assert "ledger migrate" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert count == 0


def test_a_command_leaves_migrating_to_others_when_told_to(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def tables() -> list[str]:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE 'inventoryledger%'"
            ).fetchall()
        return sorted(row[0] for row in rows)

    monkeypatch.setenv("LEDGER_MIGRATE_ON_START", "false")
    untouched = ledger_command(database_url, "projections", "status")
    left_alone = tables()
    monkeypatch.setenv("LEDGER_MIGRATE_ON_START", "true")
    migrated = ledger_command(database_url, "projections", "status")

    assert untouched.returncode == 2  # nobody migrated this database, and it did not either
    assert "not migrated" in untouched.stderr
    assert "ledger migrate" in untouched.stderr
    assert "Traceback" not in untouched.stderr
    assert left_alone == []
    assert migrated.returncode == 0, migrated.stderr
    assert "inventoryledger_events" in tables()
