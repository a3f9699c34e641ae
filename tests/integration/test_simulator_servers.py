"""The supplier simulator's servers over real sockets: REST, webhooks received, SFTP and FTP."""

from __future__ import annotations

import asyncio
import ftplib
import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest

from connectors.parsers import Record, parse
from connectors.simulator import (
    PAGINATIONS,
    Catalogue,
    FtpSupplier,
    Item,
    Pagination,
    RestSupplier,
    SftpSupplier,
    drop,
    send_webhook,
    webhook_body,
)
from connectors.simulator.http_thread import HttpThread, Request, Response

T0 = datetime(2026, 1, 15, 14, 30, tzinfo=UTC)


def catalogue(size: int = 250) -> Catalogue:
    return Catalogue(size, seed=11, observed_at=T0)


@pytest.fixture
def supplier() -> Iterator[RestSupplier]:
    with RestSupplier(catalogue(), page_size=100) as running:
        yield running


@pytest.fixture
def client(supplier: RestSupplier) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=supplier.base_url, timeout=5) as http:
        yield http


def as_json(item: Item) -> dict[str, Any]:
    return {
        "supplier_sku": item.supplier_sku,
        "upc": item.upc,
        "quantity": item.quantity,
        "unit": item.unit,
        "observed_at": item.observed_at.isoformat(),
    }


def walk(http: httpx.Client, style: Pagination) -> list[dict[str, Any]]:
    """Every item, following the pagination the way a poller of that style would."""
    items: list[dict[str, Any]] = []
    params: dict[str, Any] | None = None  # httpx drops the query of a URL given params={}
    url: str | None = "/inventory"
    while url is not None:
        response = http.get(url, params=params)
        response.raise_for_status()
        body = response.json()
        items.extend(body if style == "link" else body["items"])
        if style == "page":
            more = body["page"] < body["total_pages"]
            url, params = (url if more else None), {"page": body["page"] + 1}
        elif style == "offset":
            offset = body["offset"] + len(body["items"])
            url, params = (url if offset < body["total"] else None), {"offset": offset}
        elif style == "cursor":
            cursor = body["next_cursor"]
            url, params = (url if cursor else None), {"cursor": cursor}
        else:
            url, params = response.links.get("next", {}).get("url"), None
    return items


# REST: pagination and conditional requests


@pytest.mark.parametrize("style", PAGINATIONS)
def test_each_pagination_style_walks_the_whole_catalogue_once(style: Pagination) -> None:
    c = catalogue()
    with RestSupplier(c, pagination=style, page_size=100) as server:
        with httpx.Client(base_url=server.base_url, timeout=5) as http:
            items = walk(http, style)
        assert items == [as_json(item) for item in c]
        assert len(server.requests) == 3


def test_the_pagination_style_can_change_while_the_server_runs(
    supplier: RestSupplier, client: httpx.Client
) -> None:
    supplier.pagination = "cursor"
    body = client.get("/inventory", params={"limit": 10}).json()
    assert len(body["items"]) == 10
    assert body["next_cursor"]
    following = client.get("/inventory", params={"cursor": body["next_cursor"]}).json()
    assert following["items"][0]["supplier_sku"] == "SIM-000011"


def test_a_page_is_never_larger_than_the_server_allows(
    supplier: RestSupplier, client: httpx.Client
) -> None:
    supplier.max_page_size = 50
    body = client.get("/inventory", params={"page_size": 100_000}).json()
    assert len(body["items"]) == 50
    assert body["page_size"] == 50
    assert body["total_pages"] == 5


@pytest.mark.parametrize(
    ("style", "params"),
    [
        ("page", {"page": "0"}),
        ("page", {"page_size": "many"}),
        ("offset", {"offset": "-1"}),
        ("cursor", {"cursor": "not-one-of-ours"}),
    ],
)
def test_a_malformed_page_request_is_a_400(style: Pagination, params: dict[str, str]) -> None:
    with RestSupplier(catalogue(), pagination=style) as server:
        response = httpx.get(f"{server.base_url}/inventory", params=params, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


def test_only_get_inventory_is_served(client: httpx.Client) -> None:
    assert client.get("/elsewhere").status_code == 404
    assert client.post("/inventory", content=b"{}").status_code == 405


def test_a_matching_etag_gets_304_until_the_catalogue_advances(
    supplier: RestSupplier, client: httpx.Client
) -> None:
    first = client.get("/inventory")
    etag = first.headers["ETag"]
    again = client.get("/inventory", params={"page": 2}, headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["ETag"] == etag
    supplier.catalogue.advance(0.1, T0 + timedelta(minutes=5))
    changed = client.get("/inventory", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["ETag"] != etag
    assert changed.headers["Last-Modified"] == "Thu, 15 Jan 2026 14:35:00 GMT"


def test_if_modified_since_gets_304_only_for_an_unchanged_catalogue(client: httpx.Client) -> None:
    last_modified = client.get("/inventory").headers["Last-Modified"]
    assert last_modified == format_datetime(T0, usegmt=True)
    unchanged = client.get("/inventory", headers={"If-Modified-Since": last_modified})
    assert unchanged.status_code == 304
    earlier = format_datetime(T0 - timedelta(seconds=1), usegmt=True)
    assert client.get("/inventory", headers={"If-Modified-Since": earlier}).status_code == 200
    either = {"If-Modified-Since": last_modified, "If-None-Match": '"another"'}
    assert client.get("/inventory", headers=either).status_code == 200


def test_a_bearer_token_is_required_once_set(supplier: RestSupplier, client: httpx.Client) -> None:
    supplier.token = "supplier-token"
    missing = client.get("/inventory")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.get("/inventory", headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401
    right = client.get("/inventory", headers={"Authorization": "Bearer supplier-token"})
    assert right.status_code == 200


# REST: faults and the request log


def statuses(http: httpx.Client, count: int) -> list[int]:
    return [http.get("/inventory").status_code for _ in range(count)]


def test_the_next_requests_fail_with_the_chosen_5xx(
    supplier: RestSupplier, client: httpx.Client
) -> None:
    supplier.faults.fail_next(2, status=502)
    assert statuses(client, 3) == [502, 502, 200]
    with pytest.raises(ValueError, match="5xx"):
        supplier.faults.fail_next(1, status=404)


def test_throttling_answers_429_with_retry_after_in_seconds(
    supplier: RestSupplier, client: httpx.Client
) -> None:
    supplier.faults.throttle_next(retry_after=7)
    throttled = client.get("/inventory")
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "7"
    assert client.get("/inventory").status_code == 200


@pytest.mark.alone
def test_a_delay_longer_than_the_client_timeout_times_the_client_out(
    supplier: RestSupplier,
) -> None:
    supplier.faults.delay_next(seconds=3)
    with httpx.Client(base_url=supplier.base_url, timeout=0.3) as impatient:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            impatient.get("/inventory")
        assert time.monotonic() - started < 2
        assert impatient.get("/inventory").status_code == 200


def test_a_malformed_body_is_a_200_that_is_not_json(
    supplier: RestSupplier, client: httpx.Client
) -> None:
    supplier.faults.malform_next()
    response = client.get("/inventory")
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert client.get("/inventory").json()["items"]


def test_faults_are_shown_in_the_order_they_were_set(
    supplier: RestSupplier, client: httpx.Client
) -> None:
    supplier.faults.fail_next(status=500)
    supplier.faults.throttle_next()
    supplier.faults.malform_next()
    assert len(supplier.faults) == 3
    assert statuses(client, 4) == [500, 429, 200, 200]
    supplier.faults.fail_next(5)
    supplier.faults.clear()
    assert statuses(client, 1) == [200]


def test_the_request_log_records_paths_queries_headers_and_statuses(
    supplier: RestSupplier, client: httpx.Client
) -> None:
    supplier.faults.fail_next()
    client.get("/inventory", params={"page": 2}, headers={"If-None-Match": '"x"'})
    client.get("/inventory", params={"page": 2}, headers={"If-None-Match": '"x"'})
    [failed, retried] = supplier.requests
    assert (failed.method, failed.path, failed.query) == ("GET", "/inventory", {"page": "2"})
    assert (failed.status, retried.status) == (503, 200)
    assert retried.headers["if-none-match"] == '"x"'
    supplier.clear_requests()
    assert supplier.requests == []


@pytest.mark.alone
def test_stop_returns_promptly_with_a_request_delayed_and_a_connection_idle() -> None:
    server = RestSupplier(catalogue()).start()
    idle = httpx.Client(base_url=server.base_url, timeout=30)
    idle.get("/inventory")  # leaves a kept-alive connection open
    server.faults.delay_next(seconds=60)
    outcome: list[BaseException | int] = []

    def wait_for_answer() -> None:
        try:
            outcome.append(httpx.get(f"{server.base_url}/inventory", timeout=30).status_code)
        except httpx.HTTPError as error:
            outcome.append(error)

    waiting = threading.Thread(target=wait_for_answer)
    waiting.start()
    while len(server.faults):
        time.sleep(0.01)
    started = time.monotonic()
    server.stop()
    waiting.join(5)
    idle.close()
    assert time.monotonic() - started < 3
    [answer] = outcome  # the waiting client heard at once: a 503, or its connection closed
    assert answer == 503 or isinstance(answer, httpx.HTTPError)


# Webhooks, received by a real server


def test_a_webhook_reaches_a_real_receiver_with_a_signature_it_can_check() -> None:
    received: list[Request] = []

    def receive(request: Request) -> Response:
        received.append(request)
        return Response(202, {}, b"")

    receiver = HttpThread(receive)
    receiver.start()
    try:
        body = webhook_body(catalogue().items(0, 5), "delivery-9")
        url = f"{receiver.base_url}/v1/suppliers/acme/webhook"
        response = send_webhook(url, "acme", "secret", body, "delivery-9")
    finally:
        receiver.stop()
    assert response.status_code == 202
    [request] = received
    assert request.path == "/v1/suppliers/acme/webhook"
    assert request.body == body
    stamp = request.headers["x-ledger-timestamp"]
    mac = hmac.new(b"secret", f"{stamp}.".encode() + request.body, hashlib.sha256)
    assert hmac.compare_digest(request.headers["x-ledger-signature"], f"sha256={mac.hexdigest()}")
    assert request.headers["x-ledger-delivery"] == "delivery-9"


# SFTP and FTP


def parsed_records(data: bytes) -> list[tuple[str | None, int | None]]:
    records = [r for r in parse("csv", io.BytesIO(data)) if isinstance(r, Record)]
    return [(r.supplier_sku, r.quantity) for r in records]


def expected_records(c: Catalogue) -> list[tuple[str | None, int | None]]:
    return [(item.supplier_sku, item.quantity) for item in c]


def sftp_fetch(server: SftpSupplier, password: str, path: str) -> tuple[list[str], bytes]:
    async def fetch() -> tuple[list[str], bytes]:
        known = asyncssh.import_known_hosts(server.known_hosts)
        async with (
            asyncssh.connect(
                server.host, server.port, username="acme", password=password, known_hosts=known
            ) as connection,
            connection.start_sftp_client() as sftp,
        ):
            names = sorted(await sftp.listdir("/"))
            async with sftp.open(path, "rb") as remote:
                return names, await remote.read()

    return asyncio.run(fetch())


def test_sftp_lists_and_serves_a_dropped_feed(tmp_path: Path) -> None:
    c = catalogue()
    path = drop(tmp_path, "csv", c, name="stock.csv")
    with SftpSupplier(tmp_path, username="acme", password="pw") as server:
        names, data = sftp_fetch(server, "pw", "/stock.csv")
    assert [name for name in names if not name.startswith(".")] == ["stock.csv"]
    assert data == path.read_bytes()
    assert parsed_records(data) == expected_records(c)


def test_sftp_refuses_a_wrong_password(tmp_path: Path) -> None:
    with (
        SftpSupplier(tmp_path, username="acme", password="pw") as server,
        pytest.raises(asyncssh.PermissionDenied),
    ):
        sftp_fetch(server, "guess", "/stock.csv")


def test_sftp_keeps_clients_inside_its_folder(tmp_path: Path) -> None:
    (tmp_path / "private.txt").write_text("not for suppliers")
    (tmp_path / "feeds").mkdir()
    with (
        SftpSupplier(tmp_path / "feeds", username="acme", password="pw") as server,
        pytest.raises(asyncssh.SFTPError),
    ):
        sftp_fetch(server, "pw", "/../private.txt")


def ftp_session(server: FtpSupplier, password: str) -> ftplib.FTP:
    session = ftplib.FTP()
    session.connect(server.host, server.port, timeout=5)
    try:
        session.login("acme", password)
    except ftplib.Error:
        session.close()
        raise
    return session


def test_ftp_lists_and_serves_a_dropped_feed(tmp_path: Path) -> None:
    c = catalogue()
    path = drop(tmp_path, "csv", c, name="stock.csv")
    with FtpSupplier(tmp_path, username="acme", password="pw") as server:
        session = ftp_session(server, "pw")
        names = session.nlst()
        received = io.BytesIO()
        session.retrbinary("RETR stock.csv", received.write)
        session.quit()
    assert names == ["stock.csv"]
    assert received.getvalue() == path.read_bytes()
    assert parsed_records(received.getvalue()) == expected_records(c)


def test_ftp_refuses_a_wrong_password(tmp_path: Path) -> None:
    with (
        FtpSupplier(tmp_path, username="acme", password="pw") as server,
        pytest.raises(ftplib.error_perm),
    ):
        ftp_session(server, "guess")


def test_two_ftp_servers_each_serve_their_own_folder(tmp_path: Path) -> None:
    for name in ("north", "south"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.csv").write_text("sku,qty\n")
    with (
        FtpSupplier(tmp_path / "north", username="acme", password="pw") as north,
        FtpSupplier(tmp_path / "south", username="acme", password="pw") as south,
    ):
        listings = []
        for server in (north, south):
            session = ftp_session(server, "pw")
            listings.append(session.nlst())
            session.quit()
    assert listings == [["north.csv"], ["south.csv"]]
