"""One delivery id per supplier, whichever way a delivery came: an upload or webhook, a
stock report, or a file applied from the command line; and every refusal kept."""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from connectors import inbox
from tests.conftest import Server, serving
from tests.e2e.test_feeds import SECRET, finished, on_hand, signed, supplier
from tests.e2e.test_read_side import ledger_command


@pytest.fixture(scope="module")
def ledger(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"TEST_WEBHOOK_SECRET": SECRET}
    with serving(postgres_server_url, tmp_path_factory.mktemp("ids"), 2, extra_env=env) as s:
        yield s


def a_minute_ago() -> str:
    return (datetime.now(UTC) - timedelta(minutes=1)).isoformat()


def csv_of(lines: dict[str, int]) -> bytes:
    at = a_minute_ago()
    rows = "".join(f"{supplier_sku},{quantity},{at}\n" for supplier_sku, quantity in lines.items())
    return f"sku,quantity,observed_at\n{rows}".encode()


def upload(admin: httpx.Client, supplier_id: str, body: bytes, delivery: str) -> httpx.Response:
    return admin.post(
        f"/v1/suppliers/{supplier_id}/feeds",
        params={"format": "csv"},
        content=body,
        headers={"X-Ledger-Delivery": delivery},
    )


def ingest(
    ledger: Server, path: Path, supplier_id: str, *delivery: str
) -> subprocess.CompletedProcess[str]:
    """`ledger ingest PATH --supplier S [--delivery-id ID]`, as a process of its own."""
    extra = ["--delivery-id", *delivery] if delivery else []
    return ledger_command(
        ledger.database_url, "ingest", str(path), "--supplier", supplier_id, *extra
    )


def letters(client: httpx.Client, supplier_id: str) -> list[dict[str, Any]]:
    answer = client.get("/v1/dead-letters", params={"supplier_id": supplier_id, "status": "all"})
    assert answer.status_code == 200, answer.text
    return list(answer.json()["items"])


def deliveries(client: httpx.Client, supplier_id: str) -> int:
    """How many deliveries feed health counts for the supplier."""
    rows = client.get("/v1/feeds/health").json()["suppliers"]
    [mine] = [row for row in rows if row["supplier_id"] == supplier_id]
    return int(mine["deliveries"])


def test_a_file_ingested_twice_is_answered_as_the_same_delivery_and_looked_up_as_a_feed(
    ledger: Server, tmp_path: Path
) -> None:
    sku = f"ID-{uuid.uuid4().hex[:6]}"
    feed = tmp_path / "stock.csv"
    feed.write_bytes(csv_of({"A-1": 14, "NOPE": 3}))
    delivery = f"sha256:{hashlib.sha256(feed.read_bytes()).hexdigest()[:32]}"
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {"A-1": sku})
        first = ingest(ledger, feed, supplier_id)
        again = ingest(ledger, feed, supplier_id)
        status = admin.get(f"/v1/feeds/{delivery}", params={"supplier_id": supplier_id})
        counted = deliveries(admin, supplier_id)
        kept = letters(admin, supplier_id)
        clash = upload(admin, supplier_id, csv_of({"A-1": 99}), delivery)

    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert f"delivery {delivery!r} was already applied" in again.stdout
    # The first run's counts, not a second run's (which would find the change unchanged).
    assert "2 rows read: 1 changed, 0 unchanged, 0 late, 1 rejected" in again.stdout
    assert status.status_code == 200, status.text
    assert status.json()["source"] == "cli"
    assert status.json()["status"] == "applied"
    assert status.json()["taken_over"] is False
    assert (status.json()["rows"], status.json()["applied"], status.json()["rejected"]) == (2, 1, 1)
    assert counted == 1
    assert [(item["delivery_id"], item["position"]) for item in kept] == [(delivery, 2)]
    assert clash.status_code == 409
    assert clash.json()["error"] == "delivery_id_conflict"
    assert on_hand(ledger, sku, None) == 14


def test_a_file_under_an_uploaded_delivery_s_id_with_other_content_is_refused_and_applies_nothing(
    ledger: Server, tmp_path: Path
) -> None:
    sku = f"ID-{uuid.uuid4().hex[:6]}"
    delivery = f"dl-{uuid.uuid4().hex[:6]}"
    feed = tmp_path / "g.csv"
    feed.write_bytes(csv_of({"A-1": 9, "LATER-2": 4}))
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {"A-1": sku})
        accepted = upload(admin, supplier_id, csv_of({"A-1": 5, "LATER-1": 1}), delivery)
        applied = finished(admin, supplier_id, delivery)
        refused = ingest(ledger, feed, supplier_id, delivery)
        status = admin.get(f"/v1/feeds/{delivery}", params={"supplier_id": supplier_id}).json()
        kept = letters(admin, supplier_id)

    assert accepted.status_code == 202, accepted.text
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.startswith("error: "), refused.stderr
    assert "already received with other content" in refused.stderr
    assert on_hand(ledger, sku, applied["position"]) == 5
    assert (status["source"], status["applied"]) == ("upload", 1)
    assert [item["record"]["supplier_sku"] for item in kept] == ["LATER-1"]


def test_a_file_whose_inbox_delivery_has_not_been_applied_is_refused_saying_so(
    ledger: Server, tmp_path: Path
) -> None:
    sku = f"ID-{uuid.uuid4().hex[:6]}"
    feed = tmp_path / "stock.csv"
    feed.write_bytes(csv_of({"A-1": 8}))
    digest = hashlib.sha256(feed.read_bytes()).hexdigest()
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {"A-1": sku})
        # The same file, received by the inbox, which failed to apply it for good.
        with psycopg.connect(ledger.database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO connector_inbox (supplier_id, delivery_id, source, format,"
                " content_hash, body, status, error) VALUES"
                " (%s, 'stuck-1', 'upload', 'csv', %s, %s, 'failed', 'OperationalError: gone')",
                (supplier_id, digest, feed.read_bytes()),
            )
        refused = ingest(ledger, feed, supplier_id, "stuck-1")
        status = admin.get("/v1/feeds/stuck-1", params={"supplier_id": supplier_id}).json()

    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.startswith("error: "), refused.stderr
    assert "failed" in refused.stderr
    assert "/v1/feeds/stuck-1/retry" in refused.stderr
    assert (status["status"], status["source"]) == ("failed", "upload")
    assert on_hand(ledger, sku, None) == 0


def ingest_started(
    run: inbox.Connection, supplier_id: str, delivery: str, body: bytes
) -> inbox.Delivery:
    """What `ledger ingest` records as it begins to apply a file of `body` (cli.py): its
    delivery, claimed on `run`'s session."""
    taken = inbox.take_up(
        run,
        supplier_id=supplier_id,
        delivery_id=delivery,
        source="cli",
        format="csv",
        content_hash=hashlib.sha256(body).hexdigest(),
        name="stock.csv",
    )
    assert taken.delivery is not None
    return taken.delivery


def ingest_stopped(run: inbox.Connection, taken: inbox.Delivery) -> bool:
    """What `ledger ingest` records when it is stopped (cli.py `_finish_file`): failed, or
    queued for a worker where the inbox holds a copy; returns whether it was queued."""
    with run.transaction():
        inbox.finish(run, taken.id, "failed", None, "stopped", attempt=taken.attempts)
        queued = inbox.queue_kept(run, taken)
    inbox.release(run, taken)
    return queued


@pytest.mark.parametrize("run_left", ["killed", "stopped"])
def test_an_upload_of_a_file_whose_ingest_stopped_is_kept_and_applied(
    ledger: Server, run_left: str
) -> None:
    # It was answered 202 as a duplicate of the file's delivery, kept nothing, and was
    # never applied: the supplier, acknowledged, sent it no more (an operator's walkthrough).
    sku = f"ID-{uuid.uuid4().hex[:6]}"
    body = csv_of({"A-1": 17})
    delivery = f"file-{uuid.uuid4().hex[:6]}"
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {"A-1": sku})
        with psycopg.connect(ledger.database_url, autocommit=True, row_factory=dict_row) as run:
            taken = ingest_started(run, supplier_id, delivery, body)
            if run_left == "stopped":  # by Ctrl-C, or failed: no copy to queue again
                assert not ingest_stopped(run, taken)
        # (Killed: its claim gone with its session.)
        accepted = upload(admin, supplier_id, body, delivery)
        status = finished(admin, supplier_id, delivery)

    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["duplicate"] is True
    assert status["status"] == "applied", status
    assert (status["applied"], status["error"]) == (1, None)
    assert on_hand(ledger, sku, status["position"]) == 17


def test_an_upload_while_an_ingest_runs_is_applied_from_its_copy_when_the_run_then_stops(
    ledger: Server,
) -> None:
    # The run, stopped after the upload came, left the delivery failed with a copy that no
    # worker would claim, and a second run of the command was refused (a review).
    sku = f"ID-{uuid.uuid4().hex[:6]}"
    body = csv_of({"A-1": 31})
    delivery = f"file-{uuid.uuid4().hex[:6]}"
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {"A-1": sku})
        with psycopg.connect(ledger.database_url, autocommit=True, row_factory=dict_row) as run:
            taken = ingest_started(run, supplier_id, delivery, body)
            accepted = upload(admin, supplier_id, body, delivery)
            meanwhile = admin.get(f"/v1/feeds/{delivery}", params={"supplier_id": supplier_id})
            queued = ingest_stopped(run, taken)
        status = finished(admin, supplier_id, delivery)

    assert (accepted.status_code, accepted.json()["duplicate"]) == (202, True)
    assert meanwhile.json()["status"] == "processing"  # the run's, not a worker's
    assert queued
    assert (status["status"], status["applied"]) == ("applied", 1), status
    assert on_hand(ledger, sku, status["position"]) == 31


def report(
    client: httpx.Client, supplier_id: str, delivery: str, *observations: dict[str, Any]
) -> httpx.Response:
    return client.post(
        f"/v1/suppliers/{supplier_id}/stock",
        json={"delivery_id": delivery, "observations": list(observations)},
    )


def test_a_stock_report_under_an_inbox_delivery_s_id_is_refused_as_a_clash(
    ledger: Server,
) -> None:
    sku = f"ID-{uuid.uuid4().hex[:6]}"
    delivery = f"dl-{uuid.uuid4().hex[:6]}"
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {"A-1": sku})
        other = supplier(admin, {"A-1": f"ID-{uuid.uuid4().hex[:6]}"})
        upload(admin, supplier_id, csv_of({"A-1": 5}), delivery)
        applied = finished(admin, supplier_id, delivery)
        observation = {"supplier_sku": "A-1", "quantity": 30, "observed_at": a_minute_ago()}
        clash = report(admin, supplier_id, delivery, observation)
        elsewhere = report(admin, other, delivery, observation)

    assert clash.status_code == 409, clash.text
    assert clash.json()["error"] == "delivery_id_conflict"
    assert delivery in clash.json()["detail"]
    assert on_hand(ledger, sku, applied["position"]) == 5
    # A delivery id is a supplier's own: another supplier may use it.
    assert elsewhere.status_code == 200, elsewhere.text


def test_an_upload_or_webhook_under_a_stock_report_s_id_is_refused_as_a_clash(
    ledger: Server,
) -> None:
    sku = f"ID-{uuid.uuid4().hex[:6]}"
    delivery = f"sr-{uuid.uuid4().hex[:6]}"
    body = json.dumps(
        {
            "delivery_id": delivery,
            "observations": [{"supplier_sku": "A-1", "quantity": 2, "observed_at": a_minute_ago()}],
        }
    ).encode()
    with ledger.client("test-admin") as admin, httpx.Client(base_url=ledger.base_url) as anyone:
        supplier_id = supplier(admin, {"A-1": sku})
        observation = {"supplier_sku": "A-1", "quantity": 30, "observed_at": a_minute_ago()}
        reported = report(admin, supplier_id, delivery, observation)
        uploaded = upload(admin, supplier_id, csv_of({"A-1": 5}), delivery)
        hooked = anyone.post(
            f"/v1/suppliers/{supplier_id}/webhook", content=body, headers=signed(body, delivery)
        )
        listed = admin.get(f"/v1/feeds/{delivery}", params={"supplier_id": supplier_id})

    assert reported.status_code == 200, reported.text
    for refused in (uploaded, hooked):
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "delivery_id_conflict"
    assert listed.status_code == 404  # nothing of either was kept to apply
    assert on_hand(ledger, sku, reported.json()["position"]) == 30


def test_a_file_under_a_stock_report_s_id_is_refused(ledger: Server, tmp_path: Path) -> None:
    sku = f"ID-{uuid.uuid4().hex[:6]}"
    delivery = f"sr-{uuid.uuid4().hex[:6]}"
    feed = tmp_path / "stock.csv"
    feed.write_bytes(csv_of({"A-1": 5}))
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {"A-1": sku})
        observation = {"supplier_sku": "A-1", "quantity": 30, "observed_at": a_minute_ago()}
        reported = report(admin, supplier_id, delivery, observation)
        refused = ingest(ledger, feed, supplier_id, delivery)

    assert reported.status_code == 200, reported.text
    assert refused.returncode == 1, refused.stderr
    assert "already received with other content" in refused.stderr
    assert on_hand(ledger, sku, reported.json()["position"]) == 30


def test_a_stock_report_s_refused_records_become_letters_that_apply_once_mapped(
    ledger: Server,
) -> None:
    sku = f"ID-{uuid.uuid4().hex[:6]}"
    delivery = f"sr-{uuid.uuid4().hex[:6]}"
    at = a_minute_ago()
    unmapped = {"supplier_sku": "LATER-1", "quantity": 6, "unit": "EA", "observed_at": at}
    unreadable = {"supplier_sku": "BAD-1", "observed_at": at}
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        first = report(admin, supplier_id, delivery, unmapped, unreadable)
        replayed = report(admin, supplier_id, delivery, unmapped, unreadable)
        kept = letters(admin, supplier_id)
        admin.put(
            f"/v1/suppliers/{supplier_id}/mappings",
            json={"mappings": [{"supplier_sku": "LATER-1", "sku": sku}]},
        )
        retried = admin.post(
            "/v1/dead-letters/retry", json={"supplier_id": supplier_id, "delivery_id": delivery}
        )

    assert first.status_code == 200, first.text
    assert replayed.status_code == 200, replayed.text
    by_position = {item["position"]: item for item in kept}
    assert sorted(by_position) == [0, 1]  # once each, the replay adding none
    assert {item["delivery_id"] for item in kept} == {delivery}
    assert by_position[0]["reason"] == "unmapped_supplier_sku"
    assert by_position[0]["raw"] == unmapped
    assert by_position[1]["reason"].startswith("invalid_record")
    assert by_position[1]["raw"] == unreadable
    assert retried.status_code == 200, retried.text
    assert retried.json()["resolved"] == [by_position[0]["id"]]
    assert retried.json()["not_retryable"] == [by_position[1]["id"]]
    assert on_hand(ledger, sku, retried.json()["position"]) == 6


def test_a_file_rejected_whole_cannot_be_queued_again_as_none_of_it_is_kept(
    ledger: Server, tmp_path: Path
) -> None:
    feed = tmp_path / "broken.csv"
    feed.write_bytes(b"sku,observed_at\nA-1,2026-01-01T00:00:00Z\n")  # no quantity column
    delivery = f"broken-{uuid.uuid4().hex[:6]}"
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
        refused = ingest(ledger, feed, supplier_id, delivery)
        status = admin.get(f"/v1/feeds/{delivery}", params={"supplier_id": supplier_id})
        retried = admin.post(f"/v1/feeds/{delivery}/retry", params={"supplier_id": supplier_id})

    assert refused.returncode == 1, refused.stderr
    assert status.json()["status"] == "rejected"
    assert retried.status_code == 409, retried.text
    assert retried.json()["error"] == "delivery_not_retriable"
    assert "ingest the file again" in retried.json()["detail"]


@pytest.mark.parametrize("delivery", ["health", "a/../c", "./x"])
def test_a_file_s_delivery_id_that_could_not_be_looked_up_is_a_usage_error(
    ledger: Server, tmp_path: Path, delivery: str
) -> None:
    feed = tmp_path / "stock.csv"
    feed.write_bytes(csv_of({"A-1": 1}))
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {})
    refused = ingest(ledger, feed, supplier_id, delivery)

    assert refused.returncode == 2, refused.stderr
    assert "cannot name a delivery" in refused.stderr


def test_a_file_sent_again_in_the_right_format_after_the_wrong_one_is_read_again_in_it(
    ledger: Server,
) -> None:
    sku = f"FMT-{uuid.uuid4().hex[:6]}"
    body = json.dumps([{"sku": "A-1", "quantity": 8, "observed_at": a_minute_ago()}]).encode()
    with ledger.client("test-admin") as admin:
        supplier_id = supplier(admin, {"A-1": sku})

        def send(format: str) -> httpx.Response:
            return admin.post(
                f"/v1/suppliers/{supplier_id}/feeds", params={"format": format}, content=body
            )

        as_csv = send("csv")
        delivery = as_csv.json()["delivery_id"]
        read_as_csv = finished(admin, supplier_id, delivery)
        as_json = send("json")
        read_as_json = finished(admin, supplier_id, delivery)
        as_xml = send("xml")  # once applied, another format is a clash

    assert read_as_csv["status"] == "rejected", read_as_csv
    assert as_json.status_code == 202, as_json.text
    assert as_json.json()["delivery_id"] == delivery
    assert as_json.json()["duplicate"] is False
    assert (read_as_json["status"], read_as_json["format"]) == ("applied", "json"), read_as_json
    assert on_hand(ledger, sku, None) == 8
    assert as_xml.status_code == 409, as_xml.text
    assert "already received as json" in as_xml.json()["detail"]
