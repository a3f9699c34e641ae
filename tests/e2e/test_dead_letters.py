"""Dead letters over HTTP: listed by supplier, reason and status, paged, and retried in bulk."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Server, serving
from tests.e2e.test_feeds import finished, on_hand, supplier

UNMAPPED = "unmapped_supplier_sku"
NEGATIVE = "negative_quantity"


@pytest.fixture(scope="module")
def ledger(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(postgres_server_url, tmp_path_factory.mktemp("dead-letters"), 2) as s:
        yield s


def deliver(admin: httpx.Client, supplier_id: str, lines: dict[str, int]) -> str:
    """One CSV delivery of these supplier SKUs and quantities, observed a minute ago,
    applied; returns its id."""
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    rows = "".join(f"{supplier_sku},{quantity},{at}\n" for supplier_sku, quantity in lines.items())
    accepted = admin.post(
        f"/v1/suppliers/{supplier_id}/feeds",
        params={"format": "csv"},
        content=f"sku,quantity,observed_at\n{rows}".encode(),
    )
    assert accepted.status_code == 202, accepted.text
    delivery_id: str = accepted.json()["delivery_id"]
    assert finished(admin, supplier_id, delivery_id)["status"] == "applied"
    return delivery_id


def letters(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    answer = client.get("/v1/dead-letters", params=params)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["items"])


def named(items: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Letters as (supplier, supplier SKU, reason), in the order listed."""
    return [(i["supplier_id"], i["record"]["supplier_sku"], i["reason"]) for i in items]


def map_skus(admin: httpx.Client, supplier_id: str, skus: dict[str, str]) -> None:
    mappings = [{"supplier_sku": supplier_sku, "sku": sku} for supplier_sku, sku in skus.items()]
    answer = admin.put(f"/v1/suppliers/{supplier_id}/mappings", json={"mappings": mappings})
    assert answer.status_code == 200, answer.text


def refusing_suppliers(admin: httpx.Client) -> tuple[str, str]:
    """Two suppliers whose deliveries left letters of two reasons each, nothing mapped."""
    first, second = supplier(admin, {}), supplier(admin, {})
    deliver(admin, first, {"LATE-1": 7, "LATE-2": 9, "NEG-1": -3})
    deliver(admin, second, {"B-1": 4, "B-2": 6, "NEG-2": -1})
    return first, second


def test_letters_are_listed_by_supplier_and_by_reason(ledger: Server) -> None:
    with ledger.client("test-admin") as admin:
        first, second = refusing_suppliers(admin)
        mine = {first, second}
        by_first = letters(admin, supplier_id=first)
        unmapped_of_first = letters(admin, supplier_id=first, reason=UNMAPPED)
        by_prefix = letters(admin, supplier_id=first, reason="unmapped")
        negative = [i for i in letters(admin, reason=NEGATIVE) if i["supplier_id"] in mine]
        everyone_s_negative = letters(admin, reason=NEGATIVE, status="all")
        nobody_s = letters(admin, supplier_id=f"none-{uuid.uuid4().hex[:6]}")

    assert named(by_first) == [
        (first, "LATE-1", UNMAPPED),
        (first, "LATE-2", UNMAPPED),
        (first, "NEG-1", NEGATIVE),
    ]
    assert [i["status"] for i in by_first] == ["open"] * 3
    assert named(unmapped_of_first) == [(first, "LATE-1", UNMAPPED), (first, "LATE-2", UNMAPPED)]
    assert by_prefix == unmapped_of_first
    assert named(negative) == [(first, "NEG-1", NEGATIVE), (second, "NEG-2", NEGATIVE)]
    assert {i["reason"] for i in everyone_s_negative} == {NEGATIVE}
    assert nobody_s == []


def test_a_reason_filter_is_a_prefix_not_a_pattern(ledger: Server) -> None:
    with ledger.client("test-admin") as admin:
        first, _ = refusing_suppliers(admin)
        # "_" and "%" begin no reason; read as LIKE wildcards they match every letter.
        underscore = letters(admin, supplier_id=first, reason="_")
        percent = letters(admin, supplier_id=first, reason="%")
        inside = letters(admin, supplier_id=first, reason="n_gative")
    assert (underscore, percent, inside) == ([], [], [])


def walk(client: httpx.Client, limit: int, **scope: Any) -> list[int]:
    """Every letter's id, page by page from `after=0`, each page handing on its last id."""
    walked: list[int] = []
    after = 0
    while True:
        answer = client.get(
            "/v1/dead-letters", params={"status": "all", "limit": limit, "after": after, **scope}
        )
        assert answer.status_code == 200, answer.text
        page = answer.json()
        assert len(page["items"]) <= limit
        walked += [i["id"] for i in page["items"]]
        if page["next_after"] is None:
            return walked
        assert page["next_after"] == walked[-1]
        after = page["next_after"]


def test_paging_walks_every_letter_once_in_order(ledger: Server) -> None:
    with ledger.client("test-admin") as admin:
        crowded = supplier(admin, {})
        deliver(admin, crowded, {f"P-{n}": n - 2 for n in range(7)})  # 5 unmapped, 2 negative
        of_crowded = [i["id"] for i in letters(admin, supplier_id=crowded, status="all")]
        everyone_s = [i["id"] for i in letters(admin, status="all", limit=1000)]
        walks = {
            (scope, limit): walk(admin, limit, **({"supplier_id": crowded} if scope else {}))
            for scope in (True, False)
            for limit in (1, 2, 3, 7)
        }
        middle = of_crowded[3]
        rest = letters(admin, supplier_id=crowded, status="all", after=middle)

    assert len(of_crowded) == 7
    assert of_crowded == sorted(set(of_crowded))
    assert set(of_crowded) < set(everyone_s)
    assert everyone_s == sorted(set(everyone_s))
    for (scope, limit), walked in walks.items():
        assert walked == (of_crowded if scope else everyone_s), (scope, limit)
    assert [i["id"] for i in rest] == of_crowded[4:]


def test_a_bulk_retry_applies_only_the_letters_it_names_and_only_once(ledger: Server) -> None:
    skus = {
        name: f"DLB-{name}-{uuid.uuid4().hex[:6]}" for name in ("LATE-1", "LATE-2", "B-1", "B-2")
    }
    with ledger.client("test-admin") as admin:
        first, second = refusing_suppliers(admin)
        map_skus(admin, first, {name: skus[name] for name in ("LATE-1", "LATE-2")})
        map_skus(admin, second, {name: skus[name] for name in ("B-1", "B-2")})
        before = {s: letters(admin, supplier_id=s, status="all") for s in (first, second)}
        late = [i["id"] for i in before[first] if i["reason"] == UNMAPPED]
        resolved_before = letters(admin, supplier_id=first, status="resolved")

        retried = admin.post(
            "/v1/dead-letters/retry", json={"supplier_id": first, "reason": UNMAPPED}
        )
        assert retried.status_code == 200, retried.text
        position = retried.json()["position"]
        levels = {name: on_hand(ledger, sku, position) for name, sku in skus.items()}
        after = {s: letters(admin, supplier_id=s, status="all") for s in (first, second)}
        open_of_first = letters(admin, supplier_id=first, status="open")
        resolved_of_first = letters(admin, supplier_id=first, status="resolved")

        again = admin.post(
            "/v1/dead-letters/retry", json={"supplier_id": first, "reason": UNMAPPED}
        )
        after_again = {s: letters(admin, supplier_id=s, status="all") for s in (first, second)}
        levels_again = {name: on_hand(ledger, sku, position) for name, sku in skus.items()}

    assert resolved_before == []
    assert retried.json() == {
        "resolved": late,
        "still_refused": [],
        "not_retryable": [],
        "being_retried": [],
        "applied": 2,
        "unchanged": 0,
        "late": 0,
        "position": position,
        "next_after": None,
    }
    assert levels == {"LATE-1": 7, "LATE-2": 9, "B-1": 0, "B-2": 0}
    assert [i["id"] for i in resolved_of_first] == late
    assert named(open_of_first) == [(first, "NEG-1", NEGATIVE)]
    assert [(i["status"], i["attempts"]) for i in after[first]] == [
        ("resolved", 1),
        ("resolved", 1),
        ("open", 0),
    ]
    assert after[second] == before[second]
    assert again.status_code == 200, again.text
    assert again.json() == {
        "resolved": [],
        "still_refused": [],
        "not_retryable": [],
        "being_retried": [],
        "applied": 0,
        "unchanged": 0,
        "late": 0,
        "position": None,
        "next_after": None,
    }
    assert after_again == after
    assert levels_again == levels


def test_a_bulk_retry_takes_at_most_its_limit_and_keeps_what_is_still_refused(
    ledger: Server,
) -> None:
    with ledger.client("test-admin") as admin:
        _, second = refusing_suppliers(admin)
        skus = {name: f"DLL-{name}-{uuid.uuid4().hex[:6]}" for name in ("B-1", "B-2")}
        map_skus(admin, second, skus)
        [b1, b2, negative] = [i["id"] for i in letters(admin, supplier_id=second)]
        one = admin.post("/v1/dead-letters/retry", json={"supplier_id": second, "limit": 1})
        assert one.status_code == 200, one.text
        levels = {name: on_hand(ledger, sku, one.json()["position"]) for name, sku in skus.items()}
        refused = admin.post(
            "/v1/dead-letters/retry", json={"supplier_id": second, "reason": "negative"}
        )
        still_open = letters(admin, supplier_id=second)

    assert one.json()["resolved"] == [b1]
    assert levels == {"B-1": 4, "B-2": 0}
    assert refused.json()["resolved"] == []
    assert refused.json()["still_refused"] == [{"id": negative, "reason": NEGATIVE}]
    assert [(i["id"], i["attempts"]) for i in still_open] == [(b2, 0), (negative, 1)]


def test_the_letters_of_one_delivery_are_listed_and_retried_alone(ledger: Server) -> None:
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        monday = deliver(admin, supplier_id, {"MON-1": 3, "MON-2": 4})
        tuesday = deliver(admin, supplier_id, {"TUE-1": 5})
        skus = {name: f"DLD-{name}-{uuid.uuid4().hex[:6]}" for name in ("MON-1", "MON-2", "TUE-1")}
        map_skus(admin, supplier_id, skus)
        of_monday = letters(admin, delivery_id=monday)
        retried = admin.post("/v1/dead-letters/retry", json={"delivery_id": monday})
        assert retried.status_code == 200, retried.text
        left = letters(admin, supplier_id=supplier_id)

    assert [(i["delivery_id"], i["record"]["supplier_sku"]) for i in of_monday] == [
        (monday, "MON-1"),
        (monday, "MON-2"),
    ]
    assert retried.json()["resolved"] == [i["id"] for i in of_monday]
    assert [(i["delivery_id"], i["record"]["supplier_sku"]) for i in left] == [(tuesday, "TUE-1")]
    assert on_hand(ledger, skus["MON-2"], retried.json()["position"]) == 4


def test_a_delivery_id_two_suppliers_used_is_retried_only_with_its_supplier(
    ledger: Server,
) -> None:
    """An upload without an id is named by its content: two suppliers sending the same
    file share it."""
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    body = f"sku,quantity,observed_at\nSAME-1,2,{at}\n".encode()
    with ledger.client("test-admin") as admin:
        first, second = supplier(admin, {}), supplier(admin, {})
        ids = []
        for supplier_id in (first, second):
            accepted = admin.post(
                f"/v1/suppliers/{supplier_id}/feeds", params={"format": "csv"}, content=body
            )
            assert accepted.status_code == 202, accepted.text
            ids.append(accepted.json()["delivery_id"])
            assert finished(admin, supplier_id, ids[-1])["status"] == "applied"
        map_skus(admin, first, {"SAME-1": f"DLS-{uuid.uuid4().hex[:6]}"})
        ambiguous = admin.post("/v1/dead-letters/retry", json={"delivery_id": ids[0]})
        named_too = admin.post(
            "/v1/dead-letters/retry", json={"delivery_id": ids[0], "supplier_id": first}
        )
        left = letters(admin, delivery_id=ids[0])

    assert ids[0] == ids[1]
    assert (ambiguous.status_code, ambiguous.json()["error"]) == (409, "ambiguous_delivery")
    assert named_too.status_code == 200, named_too.text
    assert len(named_too.json()["resolved"]) == 1
    assert [(i["supplier_id"], i["reason"]) for i in left] == [(second, UNMAPPED)]


def test_only_an_admin_may_retry_in_bulk(ledger: Server) -> None:
    with ledger.client("test-audit") as auditor, httpx.Client(base_url=ledger.base_url) as anyone:
        forbidden = auditor.post("/v1/dead-letters/retry", json={})
        unknown = anyone.post("/v1/dead-letters/retry", json={})
    assert (forbidden.status_code, forbidden.json()["error"]) == (403, "forbidden")
    assert (unknown.status_code, unknown.json()["error"]) == (401, "unauthorized")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"limit": 0}, id="limit zero"),
        pytest.param({"limit": -1}, id="negative limit"),
        pytest.param({"limit": "many"}, id="limit not a number"),
        pytest.param({"limt": 5}, id="unknown field"),
        pytest.param({"supplier_id": "a\x00b"}, id="NUL in supplier_id"),
        pytest.param({"reason": "a\x00b"}, id="NUL in reason"),
        pytest.param({"delivery_id": "a\x00b"}, id="NUL in delivery_id"),
        pytest.param({"supplier_id": ["acme"]}, id="supplier_id not text"),
    ],
)
def test_a_bad_bulk_retry_body_is_refused_with_a_validation_error(
    ledger: Server, body: dict[str, Any]
) -> None:
    with ledger.client("test-admin") as admin:
        answer = admin.post("/v1/dead-letters/retry", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "validation_error"
    assert answer.json()["detail"][0]["loc"][0] == "body"


def test_a_letter_is_dismissed_by_an_admin_once_and_then_listed_as_dismissed(
    ledger: Server,
) -> None:
    with (
        ledger.client("test-admin") as admin,
        ledger.client("test-audit") as auditor,
    ):
        first, _ = refusing_suppliers(admin)
        [late_1, late_2, _negative] = [i["id"] for i in letters(admin, supplier_id=first)]
        forbidden = auditor.post(f"/v1/dead-letters/{late_1}/dismiss")
        dismissed = admin.post(f"/v1/dead-letters/{late_1}/dismiss")
        again = admin.post(f"/v1/dead-letters/{late_1}/dismiss")
        unknown = admin.post("/v1/dead-letters/999999999/dismiss")
        still_open = [i["id"] for i in letters(admin, supplier_id=first)]
        closed = letters(admin, supplier_id=first, status="dismissed")
        retried = admin.post(f"/v1/dead-letters/{late_1}/retry")

    assert (forbidden.status_code, forbidden.json()["error"]) == (403, "forbidden")
    assert (dismissed.status_code, dismissed.json()) == (
        200,
        {"dismissed": [late_1], "reopened": []},
    )
    assert (again.status_code, again.json()["error"]) == (404, "dead_letter_not_found")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "dead_letter_not_found")
    assert late_1 not in still_open
    assert late_2 in still_open
    assert [i["id"] for i in closed] == [late_1]
    assert (retried.status_code, retried.json()["error"]) == (404, "dead_letter_not_found")


def test_a_delivery_s_conflict_names_it_as_its_status_and_letters_do(ledger: Server) -> None:
    with ledger.client("test-admin") as admin:
        nobody = supplier(admin, {})
        delivery_id = deliver(admin, nobody, {"UNKNOWN-1": 3})
        deadline = time.monotonic() + 10
        while not (
            found := admin.get(
                "/v1/conflicts", params={"kind": "unmapped_sku", "supplier_id": nobody}
            ).json()["items"]
        ):
            assert time.monotonic() < deadline, "no conflict for the unmapped SKU"
            time.sleep(0.1)
        [conflict] = found
        named_by = conflict["detail"]["delivery_id"]
        status = admin.get(f"/v1/feeds/{named_by}", params={"supplier_id": nobody})
        its_letters = letters(admin, delivery_id=named_by)

    assert named_by == delivery_id
    # The part the ledger applied it in, as its events name it.
    assert conflict["detail"]["part"].startswith(f"{delivery_id}~")
    assert status.status_code == 200
    assert [letter["reason"] for letter in its_letters] == [UNMAPPED]


def test_a_delivery_id_with_a_slash_is_looked_up_where_its_answer_says(ledger: Server) -> None:
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    body = f"sku,quantity,observed_at\nSLASHED-1,3,{at}\n".encode()
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        reserved = [
            admin.post(
                f"/v1/suppliers/{supplier_id}/feeds",
                params={"format": "csv"},
                headers={"X-Ledger-Delivery": name},
                content=body,
            )
            for name in ("health", "..")
        ]
        accepted = admin.post(
            f"/v1/suppliers/{supplier_id}/feeds",
            params={"format": "csv"},
            headers={"X-Ledger-Delivery": "2026/12/06 #1?"},
            content=body,
        )
        assert accepted.status_code == 202, accepted.text
        assert finished(admin, supplier_id, "2026/12/06 %231%3F")["status"] == "applied"
        located = admin.get(accepted.headers["Location"])
        retried = admin.post("/v1/feeds/2026/12/06 %231%3F/retry")

    assert [(r.status_code, r.json()["error"]) for r in reserved] == [
        (422, "invalid_delivery_id"),
        (422, "invalid_delivery_id"),
    ]
    assert located.status_code == 200
    assert located.json()["delivery_id"] == "2026/12/06 #1?"
    # Found, and applied, so not queued again.
    assert (retried.status_code, retried.json()["error"]) == (409, "delivery_not_retriable")


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_stock_report_with_a_number_json_cannot_hold_keeps_its_letter_and_answers(
    ledger: Server, number: str
) -> None:
    """Found by a fuzzing walkthrough: the letter of such a record was refused by
    PostgreSQL (its raw record written as `NaN`), so the report answered 500 after its
    other records were applied, with no letter; and a feed delivery so refused was tried
    again for good, ahead of every other."""
    sku = f"NAN-{uuid.uuid4().hex[:6]}"
    at = (datetime.now(UTC) - timedelta(minutes=2)).isoformat()
    body = (
        '{"observations": ['
        f'{{"supplier_sku": "OK-1", "quantity": 7, "observed_at": "{at}"}},'
        f'{{"supplier_sku": "OK-1", "quantity": {number}, "observed_at": "{at}"}}]}}'
    )
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {"OK-1": sku})
        answer = admin.post(
            f"/v1/suppliers/{supplier_id}/stock",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        kept = letters(admin, supplier_id=supplier_id)

    assert answer.status_code == 200, answer.text
    assert answer.json()["applied"] == 1
    assert [r["index"] for r in answer.json()["rejected"]] == [1]
    assert on_hand(ledger, sku, answer.json()["position"]) == 7
    assert len(kept) == 1
    # Kept as its name (a number read as infinite is kept so: the request's JSON is read
    # as Python reads it).
    assert kept[0]["raw"]["quantity"] == {"1e400": "Infinity"}.get(number, number)


def held_by_a_retry(ledger: Server, letter_ids: list[int]) -> Any:
    """A transaction that holds these letters as a retry holds them while it applies
    them (connectors.deadletters.CLAIM): until it ends."""
    conn = psycopg.connect(ledger.database_url)
    locked = conn.execute(
        "SELECT id FROM connector_dead_letters WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
        (letter_ids,),
    ).fetchall()
    assert sorted(row[0] for row in locked) == sorted(letter_ids)
    return conn


def test_a_letter_a_retry_holds_is_neither_dismissed_nor_retried_again_meanwhile(
    ledger: Server,
) -> None:
    """A walkthrough dismissed a letter while a bulk retry ran: the retry applied it and
    marked it resolved over the dismissal. And two retries at once both applied every
    letter, each answering it resolved."""
    with ledger.client("test-admin") as admin:
        first, _ = refusing_suppliers(admin)
        map_skus(admin, first, {"LATE-1": f"DLH-{uuid.uuid4().hex[:6]}"})
        [held, free, _negative] = [i["id"] for i in letters(admin, supplier_id=first)]
        claim = held_by_a_retry(ledger, [held])
        try:
            dismissed = admin.post(f"/v1/dead-letters/{held}/dismiss")
            retried = admin.post(f"/v1/dead-letters/{held}/retry")
            bulk = admin.post("/v1/dead-letters/retry", json={"supplier_id": first})
            bulk_dismissed = admin.post(
                "/v1/dead-letters/dismiss", json={"supplier_id": first, "reason": UNMAPPED}
            )
        finally:
            claim.close()
        after = {i["id"]: i["status"] for i in letters(admin, supplier_id=first, status="all")}
        dismissed_after = admin.post(f"/v1/dead-letters/{held}/dismiss")

    for refused in (dismissed, retried):
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "dead_letter_being_retried"
        assert refused.json()["detail"]["ids"] == [held]
    assert bulk.status_code == 200, bulk.text
    assert held not in bulk.json()["resolved"]
    assert bulk.json()["being_retried"] == [held]
    assert bulk_dismissed.status_code == 200, bulk_dismissed.text
    assert bulk_dismissed.json()["being_retried"] == [held]
    assert free in bulk_dismissed.json()["dismissed"]
    assert after[held] == "open"
    assert (dismissed_after.status_code, dismissed_after.json()) == (
        200,
        {"dismissed": [held], "reopened": []},
    )


def test_two_bulk_retries_at_once_share_the_letters_out(ledger: Server) -> None:
    count = 1500
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        deliver(admin, supplier_id, {f"TWO-{n}": n + 1 for n in range(count)})
        map_skus(
            admin,
            supplier_id,
            {f"TWO-{n}": f"DL2-{n}-{uuid.uuid4().hex[:6]}" for n in range(count)},
        )
        ready = threading.Barrier(2)

        def bulk_retry() -> httpx.Response:
            with ledger.client("test-admin") as own:
                ready.wait()
                return own.post(
                    "/v1/dead-letters/retry", json={"supplier_id": supplier_id, "limit": count}
                )

        with ThreadPoolExecutor(2) as pool:
            answers = [a.result() for a in [pool.submit(bulk_retry), pool.submit(bulk_retry)]]
        left = letters(admin, supplier_id=supplier_id, status="all", limit=1000)
        left += letters(
            admin, supplier_id=supplier_id, status="all", limit=1000, after=left[-1]["id"]
        )

    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    [one, other] = [set(a.json()["resolved"]) for a in answers]
    assert one.isdisjoint(other)
    assert one | other == {i["id"] for i in left}
    assert {(i["status"], i["attempts"]) for i in left} == {("resolved", 1)}
    assert sum(a.json()["applied"] for a in answers) == count


def test_a_bulk_retry_goes_on_past_letters_that_stay_refused(ledger: Server) -> None:
    """Letters that no fix clears (negative quantities) came first and took every place a
    retry's `limit` gave, every time; they are passed with `after`, or dismissed in bulk."""
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        deliver(admin, supplier_id, {"NEG-A": -1, "NEG-B": -2})
        deliver(admin, supplier_id, {"LATER-1": 5})
        map_skus(admin, supplier_id, {"LATER-1": f"DLA-{uuid.uuid4().hex[:6]}"})
        [neg_a, neg_b, later] = [i["id"] for i in letters(admin, supplier_id=supplier_id)]
        first = admin.post("/v1/dead-letters/retry", json={"supplier_id": supplier_id, "limit": 2})
        going_on = admin.post(
            "/v1/dead-letters/retry",
            json={"supplier_id": supplier_id, "limit": 2, "after": first.json()["next_after"]},
        )
        unfiltered = admin.post("/v1/dead-letters/dismiss", json={"limit": 5})
        dismissed = admin.post(
            "/v1/dead-letters/dismiss", json={"supplier_id": supplier_id, "reason": NEGATIVE}
        )
        still_open = letters(admin, supplier_id=supplier_id)

    assert first.json()["resolved"] == []
    assert [r["id"] for r in first.json()["still_refused"]] == [neg_a, neg_b]
    assert first.json()["next_after"] == neg_b
    assert going_on.json()["resolved"] == [later]
    assert going_on.json()["next_after"] is None
    assert (unfiltered.status_code, unfiltered.json()["error"]) == (422, "filter_required")
    assert dismissed.json() == {
        "dismissed": [neg_a, neg_b],
        "reopened": [],
        "being_retried": [],
        "next_after": None,
    }
    assert still_open == []


def test_a_retried_letter_loses_a_tie_with_a_report_of_the_same_time(ledger: Server) -> None:
    """A supplier that stamps a whole file with one time (to the minute, in EDI) sends two
    files of the same time: the letter of the first, retried after the second applied,
    put the first file's level back (a walkthrough)."""
    at = (datetime.now(UTC) - timedelta(minutes=1)).replace(second=0, microsecond=0).isoformat()
    sku = f"DLT-{uuid.uuid4().hex[:6]}"
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        for quantity in (4, 6):
            if quantity == 6:
                map_skus(admin, supplier_id, {"TIE-1": sku})
            accepted = admin.post(
                f"/v1/suppliers/{supplier_id}/feeds",
                params={"format": "csv"},
                content=f"sku,quantity,observed_at\nTIE-1,{quantity},{at}\n".encode(),
            )
            assert accepted.status_code == 202, accepted.text
            assert (
                finished(admin, supplier_id, accepted.json()["delivery_id"])["status"] == "applied"
            )
        [letter] = letters(admin, supplier_id=supplier_id)
        retried = admin.post(f"/v1/dead-letters/{letter['id']}/retry")
        assert retried.status_code == 200, retried.text
        level = on_hand(ledger, sku, retried.json()["position"])

    assert level == 6
    assert retried.json()["resolved"] == [letter["id"]]
    assert (retried.json()["applied"], retried.json()["late"]) == (0, 1)


def deliver_at(admin: httpx.Client, supplier_id: str, rows: list[tuple[str, int, datetime]]) -> str:
    """One applied CSV delivery of (supplier SKU, quantity, observed at) rows; its id."""
    lines = "".join(f"{s},{quantity},{at.isoformat()}\n" for s, quantity, at in rows)
    accepted = admin.post(
        f"/v1/suppliers/{supplier_id}/feeds",
        params={"format": "csv"},
        content=f"sku,quantity,observed_at\n{lines}".encode(),
    )
    assert accepted.status_code == 202, accepted.text
    delivery_id: str = accepted.json()["delivery_id"]
    assert finished(admin, supplier_id, delivery_id)["status"] == "applied"
    return delivery_id


def test_a_newer_report_of_a_refused_record_supersedes_its_open_letter(ledger: Server) -> None:
    """A feed read again and again with a record nobody mapped keeps one open letter of
    it, the newest report's: the older ones are `superseded`, naming it, and only it is
    retried once the record is mapped. A report older than the open letter is superseded
    by it as it arrives (a walkthrough: it stayed open beside it, its retry `late`); one
    of another supplier SKU, or another supplier, is not touched."""
    start = datetime.now(UTC) - timedelta(minutes=10)
    sku = f"DLS-{uuid.uuid4().hex[:6]}"
    with ledger.client("test-admin") as admin:
        supplier_id, other = supplier(admin, {}), supplier(admin, {})
        polls = [
            deliver_at(
                admin,
                supplier_id,
                [("GONE", 10 + i, start + timedelta(minutes=i)), ("NEG", -i - 1, start)],
            )
            for i in range(3)
        ]
        other_s = deliver_at(admin, other, [("GONE", 4, start)])
        late = deliver_at(admin, supplier_id, [("GONE", 99, start - timedelta(minutes=1))])
        every = letters(admin, supplier_id=supplier_id, status="all")
        still_open = letters(admin, supplier_id=supplier_id)
        superseded = letters(admin, supplier_id=supplier_id, status="superseded")
        map_skus(admin, supplier_id, {"GONE": sku})
        retried = admin.post(
            "/v1/dead-letters/retry", json={"supplier_id": supplier_id, "reason": UNMAPPED}
        )
        assert retried.status_code == 200, retried.text
        level = on_hand(ledger, sku, retried.json()["position"])
        others = letters(admin, supplier_id=other)

    by_delivery = {(i["delivery_id"], i["record"]["supplier_sku"]): i["id"] for i in every}
    newest_gone, newest_negative = by_delivery[(polls[2], "GONE")], by_delivery[(polls[2], "NEG")]
    late_gone = by_delivery[(late, "GONE")]
    assert sorted(i["id"] for i in still_open) == sorted([newest_gone, newest_negative])
    # Each names the letter that superseded it: the next poll's, and the late report's
    # the newest.
    assert sorted((i["id"], i["superseded_by"]) for i in superseded) == sorted(
        [
            *(
                (by_delivery[(polls[n], name)], by_delivery[(polls[n + 1], name)])
                for n in (0, 1)
                for name in ("GONE", "NEG")
            ),
            (late_gone, newest_gone),
        ]
    )
    assert all(i["superseded_by"] is None for i in still_open)
    # Only the newest report is tried.
    assert retried.json()["resolved"] == [newest_gone]
    assert (retried.json()["applied"], retried.json()["late"]) == (1, 0)
    assert level == 12
    assert [(i["delivery_id"], i["status"]) for i in others] == [(other_s, "open")]


def test_a_letter_refused_for_its_time_supersedes_nothing_and_a_dismissal_reopens(
    ledger: Server,
) -> None:
    """An operator walkthrough: a record stamped hours ahead (a supplier clock running
    ahead), or in 2099, closed the good letter before it, which no retry could then apply.
    It closes nothing now; and dismissing a letter opens again those it superseded, the
    newest report left of the record."""
    start = datetime.now(UTC) - timedelta(minutes=10)
    sku = f"DLF-{uuid.uuid4().hex[:6]}"
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        good = deliver_at(
            admin, supplier_id, [("AHEAD", 5, start), ("BOGUS", 1, start), ("NEG", -1, start)]
        )
        ahead = deliver_at(
            admin,
            supplier_id,
            [
                ("AHEAD", 6, start + timedelta(hours=2)),
                ("BOGUS", 2, start + timedelta(minutes=1)),
                ("NEG", 3, start + timedelta(hours=2)),
            ],
        )
        every = {
            (i["delivery_id"], i["record"]["supplier_sku"]): i
            for i in letters(admin, supplier_id=supplier_id, status="all")
        }
        first_bogus, second_bogus = every[(good, "BOGUS")]["id"], every[(ahead, "BOGUS")]["id"]
        superseded = admin.post(f"/v1/dead-letters/{first_bogus}/retry")
        dismissed = admin.post(f"/v1/dead-letters/{second_bogus}/dismiss")
        after = {
            i["id"]: i["status"] for i in letters(admin, supplier_id=supplier_id, status="all")
        }
        map_skus(admin, supplier_id, {"AHEAD": sku, "BOGUS": f"{sku}-B"})
        retried = admin.post("/v1/dead-letters/retry", json={"supplier_id": supplier_id})
        assert retried.status_code == 200, retried.text
        levels = [on_hand(ledger, s, retried.json()["position"]) for s in (sku, f"{sku}-B")]

    assert every[(ahead, "AHEAD")]["reason"] == "observed_at_in_future"
    assert every[(good, "AHEAD")]["status"] == "open"  # not closed by the future one
    assert every[(good, "NEG")]["status"] == "open"  # nor a wrong one (a review)
    assert every[(good, "BOGUS")]["superseded_by"] == second_bogus
    assert superseded.status_code == 409, superseded.text
    assert superseded.json()["error"] == "dead_letter_superseded"
    assert superseded.json()["detail"]["superseded_by"] == second_bogus
    assert dismissed.json() == {"dismissed": [second_bogus], "reopened": [first_bogus]}
    assert (after[first_bogus], after[second_bogus]) == ("open", "dismissed")
    assert levels == [5, 1]  # the good report, and the one left once its successor went


def test_records_of_one_supplier_sku_at_one_time_refused_as_unmapped_are_retried_together(
    ledger: Server,
) -> None:
    """An operator walkthrough: two records of one supplier SKU at the same time, refused
    as unmapped, were retried one at a time once mapped, and the first retried was
    applied. They disagree, however they are picked, and stay open."""
    start = datetime.now(UTC) - timedelta(minutes=10)
    sku = f"DLP-{uuid.uuid4().hex[:6]}"
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        deliver_at(admin, supplier_id, [("PAIR", 5, start), ("PAIR", 6, start)])
        first, second = (i["id"] for i in letters(admin, supplier_id=supplier_id))
        map_skus(admin, supplier_id, {"PAIR": sku})
        alone = admin.post(f"/v1/dead-letters/{second}/retry")
        assert alone.status_code == 200, alone.text
        left = letters(admin, supplier_id=supplier_id)

    assert alone.json()["resolved"] == []
    assert alone.json()["still_refused"] == [
        {"id": first, "reason": "conflicting_duplicate"},
        {"id": second, "reason": "conflicting_duplicate"},
    ]
    assert [(i["id"], i["reason"]) for i in left] == [
        (first, "conflicting_duplicate"),
        (second, "conflicting_duplicate"),
    ]
    assert alone.json()["applied"] == 0  # neither applied, the first no more than the other


def test_reports_of_one_record_sent_at_once_leave_one_open_letter(ledger: Server) -> None:
    """An operator walkthrough: three stock reports at once with the same unmapped record,
    each under its own delivery id, left two or three open letters of it: none saw the
    others'. A supplier's letters are now recorded one delivery at a time."""
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})

        def report(n: int) -> int:
            observations = [
                {"supplier_sku": f"Q-{k}", "quantity": k + n, "observed_at": at} for k in range(5)
            ]
            body = {"delivery_id": f"at-once-{n}", "observations": observations}
            return admin.post(f"/v1/suppliers/{supplier_id}/stock", json=body).status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(report, range(4)))
        still_open = letters(admin, supplier_id=supplier_id)

    assert statuses == [200] * 4
    assert sorted(i["record"]["supplier_sku"] for i in still_open) == [f"Q-{k}" for k in range(5)]


def statuses(admin: httpx.Client, supplier_id: str) -> dict[str, str]:
    """The supplier's letters' statuses by delivery."""
    return {
        i["delivery_id"]: i["status"] for i in letters(admin, supplier_id=supplier_id, status="all")
    }


def test_a_wrong_report_never_closes_a_letter_that_would_apply_and_a_dismissed_one_no_more(
    ledger: Server,
) -> None:
    """A review: a newer letter of a negative quantity closed the older letter of the same
    record refused only as unmapped, which would apply once mapped; and a stock report sent
    again made its dismissed letter close again the letter its dismissal had opened."""
    start = datetime.now(UTC) - timedelta(minutes=10)

    def reported(
        admin: httpx.Client, supplier_id: str, delivery: str, quantity: int, at: datetime
    ) -> Any:
        body = {
            "delivery_id": delivery,
            "observations": [
                {"supplier_sku": "R-1", "quantity": quantity, "observed_at": at.isoformat()}
            ],
        }
        answer = admin.post(f"/v1/suppliers/{supplier_id}/stock", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()

    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        reported(admin, supplier_id, "r-1", 5, start)
        reported(admin, supplier_id, "r-2", -3, start + timedelta(minutes=1))
        after_wrong = {
            i["delivery_id"]: i["status"]
            for i in letters(admin, supplier_id=supplier_id, status="all")
        }
        reported(admin, supplier_id, "r-3", 6, start + timedelta(minutes=2))
        by = {i["delivery_id"]: i for i in letters(admin, supplier_id=supplier_id, status="all")}
        dismissed = admin.post(f"/v1/dead-letters/{by['r-3']['id']}/dismiss")
        reported(admin, supplier_id, "r-3", 6, start + timedelta(minutes=2))  # sent again
        after_again = {
            i["delivery_id"]: i["status"]
            for i in letters(admin, supplier_id=supplier_id, status="all")
        }

    assert after_wrong == {"r-1": "open", "r-2": "open"}
    assert (by["r-1"]["status"], by["r-2"]["status"]) == ("superseded", "superseded")
    assert dismissed.json()["reopened"] == [by["r-1"]["id"], by["r-2"]["id"]]
    assert after_again == {"r-1": "open", "r-2": "open", "r-3": "dismissed"}


def test_a_late_report_is_superseded_only_by_a_newer_letter_that_could_close_it(
    ledger: Server,
) -> None:
    """A late report's letter is closed on arrival by the newest open letter that would
    close it were they the other way round: a fixable one, not one refused for its time;
    a wrong one only by a wrong one."""
    start = datetime.now(UTC) - timedelta(minutes=10)
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        good = deliver_at(admin, supplier_id, [("LATE", 5, start), ("NEG", -1, start)])
        ahead = deliver_at(admin, supplier_id, [("LATE", 6, start + timedelta(hours=2))])
        late = deliver_at(
            admin,
            supplier_id,
            [("LATE", 4, start - timedelta(minutes=1)), ("NEG", 2, start - timedelta(minutes=1))],
        )
        every = {
            (i["delivery_id"], i["record"]["supplier_sku"]): i
            for i in letters(admin, supplier_id=supplier_id, status="all")
        }

    assert every[(ahead, "LATE")]["reason"] == "observed_at_in_future"
    assert every[(late, "LATE")]["status"] == "superseded"
    assert every[(late, "LATE")]["superseded_by"] == every[(good, "LATE")]["id"]
    # An unmapped record's letter is not closed by a newer letter of a negative quantity.
    assert every[(late, "NEG")]["reason"].startswith("unmapped")
    assert every[(late, "NEG")]["status"] == "open"
    assert [every[(d, "LATE")]["status"] for d in (good, ahead)] == ["open", "open"]


def test_a_delivery_s_outcome_counts_the_time_its_letters_took_and_ends_after_them(
    ledger: Server,
) -> None:
    """An operator walkthrough: a delivery whose letters took minutes showed as finished
    when its outcome was written, its `seconds` adding up to under one."""
    start = datetime.now(UTC) - timedelta(minutes=5)
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        refused = deliver_at(admin, supplier_id, [("NOBODY", 3, start)])
        refused_status = finished(admin, supplier_id, refused)
        [letter] = letters(admin, supplier_id=supplier_id)
        map_skus(admin, supplier_id, {"CLEAN": f"DLT-{uuid.uuid4().hex[:6]}"})
        clean = deliver_at(admin, supplier_id, [("CLEAN", 2, start)])
        clean_status = finished(admin, supplier_id, clean)

    assert refused_status["seconds"]["letters"] >= 0
    # After them, not as they began.
    finished_at = datetime.fromisoformat(refused_status["finished_at"])
    assert finished_at > datetime.fromisoformat(letter["created_at"])
    assert clean_status["applied"] == 1
    assert "letters" not in clean_status["seconds"]
