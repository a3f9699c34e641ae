"""When PostgreSQL goes away the service says so: 503, never a 500, and it is not ready."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import fresh_database, start_server, stop_server
from tests.e2e.test_reservation_lifecycle import (
    confirmed,
    ok,
    put_supplier,
    reserve,
    stocked_sku,
)


@pytest.mark.alone
def test_a_lost_database_gives_503_and_not_ready(postgres_server_url: str, tmp_path: Path) -> None:
    with fresh_database(postgres_server_url) as database_url:
        server = start_server(
            database_url, tmp_path, workers=1, extra_env={"LEDGER_CONNECT_TIMEOUT_SECONDS": "1"}
        )
        try:
            with server.client("test-admin") as admin:
                assert admin.put("/v1/suppliers/acme", json={"name": "Acme"}).status_code == 200
                healthy = admin.get("/readyz")
                name = conninfo_to_dict(database_url)["dbname"]
                with psycopg.connect(postgres_server_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

                answer = admin.put("/v1/suppliers/acme", json={"name": "Acme 2"})
                ready = admin.get("/readyz")
        finally:
            stop_server(server)

    # Either the store gives up (unavailable) or the command deadline passes (timeout):
    # both tell the client to retry, and neither takes longer than the deadline.
    assert healthy.status_code == 200
    checks = healthy.json()["checks"]
    assert checks["writer"] is True
    assert checks["database"] is True
    assert checks["writer_commands"] >= checks["writer_batches"] >= 1
    assert checks["writer_conflicts"] == checks["writer_exclusive"] == 0
    assert answer.status_code == 503
    assert answer.json()["error"] in {"unavailable", "timeout"}
    assert answer.elapsed.total_seconds() < 12
    assert ready.elapsed.total_seconds() < 3
    assert answer.headers["Retry-After"] == "1"
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] is False
    assert "http.unexpected_error" not in server.log()


def test_a_writer_on_one_batch_too_long_is_not_ready_until_it_gets_through(
    postgres_server_url: str, tmp_path: Path
) -> None:
    """A save that does not come back (here: waiting on the event table's lock, which
    another session holds) leaves the writer's thread alive and every command behind it
    waiting: readiness says so, and says ready again once the batch is through."""
    with fresh_database(postgres_server_url) as database_url:
        server = start_server(
            database_url, tmp_path, workers=1, extra_env={"LEDGER_WRITER_STUCK_SECONDS": "1"}
        )
        try:
            with server.client("test-admin") as admin:
                assert admin.put("/v1/suppliers/acme", json={"name": "Acme"}).status_code == 200
                with psycopg.connect(database_url) as holder:
                    holder.execute("LOCK TABLE inventoryledger_events IN EXCLUSIVE MODE")
                    with ThreadPoolExecutor(1) as pool:
                        saved = pool.submit(
                            admin.put, "/v1/suppliers/acme", json={"name": "Acme 2"}
                        )
                        time.sleep(1.6)
                        stuck = admin.get("/readyz")
                        holder.rollback()
                        answer = saved.result(timeout=10)
                ready = admin.get("/readyz")
        finally:
            stop_server(server)

    assert stuck.status_code == 503
    checks = stuck.json()["checks"]
    assert checks["writer"] is True
    assert checks["writer_stuck"] is True
    assert checks["writer_busy_seconds"] >= 1
    assert checks["database"] is True
    assert answer.status_code == 200
    assert ready.status_code == 200
    assert ready.json()["checks"]["writer_stuck"] is False


def test_a_command_past_its_deadline_says_whether_it_may_yet_be_applied(
    postgres_server_url: str, tmp_path: Path
) -> None:
    """A fulfil stuck in its save (the event table locked) outlives its request's deadline
    and is applied after its 503; a release queued behind it is dropped. Told to retry, an
    OMS that sent the fulfil without an Idempotency-Key recorded the shipment twice (an
    OMS walkthrough): the answers now tell the two apart."""
    with fresh_database(postgres_server_url) as database_url:
        server = start_server(
            database_url, tmp_path, workers=1, extra_env={"LEDGER_COMMAND_TIMEOUT_SECONDS": "1"}
        )
        try:
            with server.client("test-admin") as admin, server.client("test-oms") as oms:
                put_supplier(admin, "acme")
                sku = stocked_sku(admin, {"acme": 5})
                reservation_id = confirmed(oms, (sku, 2))
                path = f"/v1/reservations/{reservation_id}"
                line = {"lines": [{"sku": sku, "quantity": 1}]}
                with psycopg.connect(database_url) as holder:
                    holder.execute("LOCK TABLE inventoryledger_events IN EXCLUSIVE MODE")
                    with ThreadPoolExecutor(2) as pool:
                        fulfil = pool.submit(oms.post, f"{path}/fulfil", json=line)
                        time.sleep(0.3)  # the fulfil's batch is saving, and waits
                        release = pool.submit(oms.post, f"{path}/release")
                        stuck, dropped = fulfil.result(10), release.result(10)
                    holder.rollback()
                deadline = time.monotonic() + 10
                while ok(oms.get(path))["status"] != "partially_fulfilled":
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                after = ok(oms.get(path))
        finally:
            stop_server(server)

    assert (stuck.status_code, stuck.json()["error"]) == (503, "outcome_unknown")
    assert "may yet be applied" in stuck.json()["detail"]
    assert (dropped.status_code, dropped.json()["error"]) == (503, "timeout")
    assert "nothing of it was applied" in dropped.json()["detail"]
    assert stuck.headers["Retry-After"] == dropped.headers["Retry-After"] == "1"
    # The fulfil was applied after its 503; the release never was.
    assert after["status"] == "partially_fulfilled"
    assert [line["fulfilled"] for line in after["lines"]] == [1]


def test_the_sessions_ended_under_a_server_cost_it_one_answer_not_one_a_connection(
    postgres_server_url: str, tmp_path: Path
) -> None:
    """PostgreSQL ended every session of the ledger's (a restart, a failover): the first
    request to find its connection dead is a 503, and the pools' other dead connections
    are dropped with it, so the next requests are served. Each pooled connection failed a
    request in turn (10 of 14 orders sent one by one were 503s, `/readyz` went from ready
    to not for ~35 s: an operator's walkthrough)."""
    with fresh_database(postgres_server_url) as database_url:
        server = start_server(database_url, tmp_path, workers=1)
        try:
            with server.client("test-admin") as admin, server.client("test-oms") as oms:
                put_supplier(admin, "acme")
                sku = stocked_sku(admin, {"acme": 1000})
                # Many connections open in every pool: orders and reads at once.
                with ThreadPoolExecutor(16) as pool:
                    warm = list(pool.map(lambda n: reserve(oms, (sku, 1), key=f"w{n}"), range(64)))
                    list(pool.map(lambda _: admin.get(f"/v1/availability/{sku}"), range(64)))
                assert {answer.status_code for answer in warm} == {201}
                ended = end_sessions(postgres_server_url, database_url)
                time.sleep(0.5)
                orders = [reserve(oms, (sku, 1), key=f"after-{n}").status_code for n in range(14)]
                reads = [admin.get(f"/v1/availability/{sku}").status_code for _ in range(10)]
                ready = [admin.get("/readyz").status_code for _ in range(10)]
                # Again, with no traffic but the probes.
                with ThreadPoolExecutor(16) as pool:
                    list(pool.map(lambda _: admin.get(f"/v1/availability/{sku}"), range(64)))
                end_sessions(postgres_server_url, database_url)
                time.sleep(1.5)  # past the least time between two tests of the pools
                probed = [admin.get("/readyz").status_code for _ in range(10)]
                orders_after = [reserve(oms, (sku, 1), key=f"z{n}").status_code for n in range(5)]
        finally:
            stop_server(server)

    assert ended >= 4  # the pools' connections, the leases', the workers'
    # The first order may find a dead connection; none after it does (3 to 10 did).
    assert orders[1:] == [201] * 13
    assert orders[0] in {201, 503}
    assert reads == [200] * 10
    assert ready == [200] * 10
    assert probed[1:] == [200] * 9
    assert orders_after == [201] * 5
    assert "http.unexpected_error" not in server.log()


def end_sessions(server_url: str, database_url: str) -> int:
    """Ends every session on the database (as a restart of PostgreSQL would); how many."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (conninfo_to_dict(database_url)["dbname"],),
        ).fetchone()
    return 0 if row is None else int(row[0])
