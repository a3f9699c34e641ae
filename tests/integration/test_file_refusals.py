"""Files that cannot be taken are passed over, and the files behind them are taken.

Found by an operator's walkthrough of file transports: a file whose name is not UTF-8
crashed every fetch of its drop folder (twice a second, health silent) and failed every
SFTP listing; a file over `max_file_bytes` was read whole at each fetch to learn so, and
failed it; an SFTP download had one deadline for the whole file, so a file that took
longer was never taken; each file that could not be moved aside held each fetch up for
the retry policy's waits. In each case the files behind it waited for good.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from api.runtime import Runtime
from connectors import health
from connectors.scheduler import Scheduler
from connectors.simulator import SftpSupplier
from connectors.transports import Fetched, FetchFailed, Transport, transport_for
from connectors.transports.folder import FolderSettings, FolderTransport, LocalFolder
from connectors.worker import InboxWorker
from ledger.commands import PutSupplier
from ledger.supplier import SupplierTerms
from tests.integration.ledger_setup import CAUSE
from tests.integration.test_transports import DictState

BAD_NAME = os.fsdecode(b"stock\xff.csv")  # a name in Latin-1, say, as the folder lists it
CSV = b"supplier_sku,quantity\nSIM-1,4\n"


class Counted(LocalFolder):
    """A local folder that counts its reads and moves."""

    reads: list[str] = []
    moves: list[str] = []
    movable = True

    def read(self, name: str) -> bytes | None:
        Counted.reads.append(name)
        return super().read(name)

    def move(self, name: str, target: str) -> None:
        Counted.moves.append(name)
        if not Counted.movable:
            raise FetchFailed("io_error: [Errno 18] Invalid cross-device link", retriable=True)
        super().move(name, target)


@pytest.fixture(autouse=True)
def counted() -> None:
    Counted.reads, Counted.moves, Counted.movable = [], [], True


def counted_folder(path: Path, **options: Any) -> FolderTransport:
    settings = FolderSettings.model_validate(
        {
            "path": str(path),
            "format": "csv",
            "settle_seconds": 0,
            "backoff_seconds": 0.2,
            "max_backoff_seconds": 0.2,
            **options,
        }
    )
    return FolderTransport(
        "acme",
        settings,
        lambda: Counted(path, path / "processed", settings.max_file_bytes),
        source="folder",
    )


def pull(transport: Transport) -> list[Fetched]:
    fetched = []
    for delivery in transport.fetch():
        fetched.append(delivery)
        transport.done(delivery)
    return fetched


def dropped(path: Path, body: bytes, seconds_ago: float = 0) -> Path:
    """A file written, last modified `seconds_ago` (the oldest files are taken first)."""
    path.write_bytes(body)
    at = time.time() - seconds_ago
    os.utime(path, (at, at))
    return path


def test_a_file_whose_name_is_not_utf8_is_passed_over_unread_and_the_others_are_taken(
    tmp_path: Path,
) -> None:
    dropped(tmp_path / BAD_NAME, CSV, 30)
    dropped(tmp_path / "after.csv", CSV)
    transport = counted_folder(tmp_path)

    assert [f.name for f in pull(transport)] == ["after.csv"]
    assert transport.refused == {"stock\\xff.csv": "unreadable_name: not UTF-8"}
    assert pull(transport) == []
    assert transport.refused == {"stock\\xff.csv": "unreadable_name: not UTF-8"}
    assert Counted.reads == ["after.csv"]

    (tmp_path / BAD_NAME).rename(tmp_path / "renamed.csv")  # what the operator does
    assert [f.name for f in pull(transport)] == ["renamed.csv"]
    assert transport.refused == {}


def test_a_file_listed_over_the_size_limit_is_passed_over_unread(tmp_path: Path) -> None:
    dropped(tmp_path / "huge.csv", CSV * 20, 30)
    dropped(tmp_path / "small.csv", CSV)
    transport = counted_folder(tmp_path, max_file_bytes=100)

    assert [f.name for f in pull(transport)] == ["small.csv"]
    assert transport.refused == {"huge.csv": "file_too_large: 600 bytes, over 100"}
    assert Counted.reads == ["small.csv"]
    (tmp_path / "huge.csv").write_bytes(CSV)  # cut down to size
    assert [f.name for f in pull(transport)] == ["huge.csv"]


@pytest.mark.alone
def test_a_file_not_moved_aside_is_tried_once_a_fetch_without_the_retry_waits(
    tmp_path: Path,
) -> None:
    Counted.movable = False
    (tmp_path / "stuck.csv").write_bytes(CSV)
    transport = counted_folder(tmp_path, max_attempts=3)
    [fetched] = transport.fetch()
    with pytest.raises(FetchFailed):
        transport.done(fetched)  # under the retry policy: three tries
    assert Counted.moves == ["stuck.csv"] * 3

    started = time.monotonic()
    assert pull(transport) == []
    assert time.monotonic() - started < 0.2  # no backing off between tries
    assert Counted.moves == ["stuck.csv"] * 4
    Counted.movable = True
    assert pull(transport) == []
    assert (tmp_path / "processed" / "stuck.csv").exists()


def sftp(server: SftpSupplier, folder: Path, **options: Any) -> Transport:
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(server.known_hosts + "\n")
    os.environ["TEST_REFUSALS_SFTP_PASSWORD"] = "pw"
    settings = {
        "host": server.host,
        "port": server.port,
        "username": "acme",
        "password_ref": "env:TEST_REFUSALS_SFTP_PASSWORD",
        "known_hosts": str(known_hosts),
        "format": "csv",
        "settle_seconds": 0,
        "max_attempts": 1,
        **options,
    }
    transport = transport_for("acme", {"sftp": settings}, state=DictState())
    assert transport is not None
    return transport


def test_an_sftp_file_whose_name_is_not_utf8_no_longer_fails_the_listing(
    tmp_path: Path,
) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / BAD_NAME).write_bytes(CSV)
    (remote / "good.csv").write_bytes(CSV)
    with SftpSupplier(remote, username="acme", password="pw") as server:
        transport = sftp(server, tmp_path)
        assert [f.name for f in pull(transport)] == ["good.csv"]
        assert transport.refused == {"stock\\xff.csv": "unreadable_name: not UTF-8"}
        transport.close()
    assert (remote / BAD_NAME).exists()


@pytest.mark.alone
def test_an_sftp_download_slower_than_the_timeout_is_taken_while_it_keeps_coming(
    tmp_path: Path,
) -> None:
    """384 KiB at 128 KiB/s under a 1.5 s timeout: 3 s in all, a block (128 KiB) a second."""
    remote = tmp_path / "remote"
    remote.mkdir()
    body = b"supplier_sku,quantity\n" + b"SIM-1,4\n" * (384 * 1024 // 8)
    (remote / "big.csv").write_bytes(body)
    rate = 128 * 1024
    with SftpSupplier(remote, username="acme", password="pw", bytes_per_second=rate) as server:
        transport = sftp(server, tmp_path, timeout_seconds=1.5)
        started = time.monotonic()
        [fetched] = pull(transport)
        took = time.monotonic() - started
        transport.close()
    assert fetched.body == body
    assert took >= 1.5  # the line was slower than one timeout


def dropper_scheduled(ledger: Runtime, folder: Path) -> tuple[Scheduler, InboxWorker]:
    """Supplier "dropper", fed by the drop folder `folder`, and a scheduler and worker."""
    connector = {"folder": {"path": str(folder), "format": "csv", "settle_seconds": 0}}
    terms = SupplierTerms("dropper", connector=connector)
    outcome = ledger.writer.execute(
        PutSupplier(at=datetime.now(UTC), cause=CAUSE, supplier_id="dropper", terms=terms)
    )
    ledger.views.wait_for("stock", outcome.position, timeout=10)
    worker = InboxWorker(ledger.ingestor, ledger.store)
    return Scheduler(ledger.store, ledger.leases, worker), worker


def test_a_fetch_that_passed_a_file_over_says_so_in_feed_health_once(
    ledger: Runtime, tmp_path: Path
) -> None:
    dropped(tmp_path / BAD_NAME, CSV, 30)
    scheduler, _ = dropper_scheduled(ledger, tmp_path)

    scheduler.tick()
    with ledger.store.connection() as conn:
        [row] = [r for r in health.report(conn) if r["supplier_id"] == "dropper"]
    assert row["last_error"] == "file_refused: stock\\xff.csv: unreadable_name: not UTF-8"
    assert row["consecutive_failures"] == 0
    assert scheduler.schedules["dropper"].due > scheduler.clock() + 30  # not every tick


def test_a_rejected_file_put_back_as_it_was_says_which_delivery_to_queue_again(
    ledger: Runtime, tmp_path: Path
) -> None:
    scheduler, worker = dropper_scheduled(ledger, tmp_path)
    german = dropped(tmp_path / "de.csv", b"Artikel,Bestand\nSIM-1,4\n", 30)
    assert scheduler.tick() == 1
    assert worker.work_once()
    with ledger.store.connection() as conn:
        [delivery] = conn.execute(
            "SELECT delivery_id, status FROM connector_inbox WHERE supplier_id = 'dropper'"
        ).fetchall()
    assert delivery["status"] == "rejected"

    (tmp_path / "processed" / "de.csv").rename(german)  # `mv` keeps the time
    scheduler.schedules["dropper"].due = 0
    assert scheduler.tick() == 0  # the same delivery: not applied again by itself

    with ledger.store.connection() as conn:
        [row] = [r for r in health.report(conn) if r["supplier_id"] == "dropper"]
    assert row["last_error"] == (
        f"delivered_before: de.csv is delivery {delivery['delivery_id']}, rejected;"
        f" queue it again with POST /v1/feeds/{delivery['delivery_id']}/retry"
    )


# Found by a walkthrough of the file transports (2026-12-07) ------------------------------


def test_a_file_listed_in_whole_seconds_waits_until_surely_left_alone(tmp_path: Path) -> None:
    # SFTP and FTP list whole seconds: a file last written at x.95 s lists as x, and was
    # taken 1.1 s after that write with `settle_seconds` 2 (its last rows lost).
    listed_at = float(int(time.time()) - 10)
    feed = dropped(tmp_path / "growing.csv", CSV)
    os.utime(feed, (listed_at, listed_at))
    settings = FolderSettings.model_validate(
        {"path": str(tmp_path), "format": "csv", "settle_seconds": 2}
    )
    now = [listed_at + 2.02]
    transport = FolderTransport(
        "acme",
        settings,
        lambda: LocalFolder(tmp_path, tmp_path / "processed", settings.max_file_bytes),
        source="sftp",
        clock=lambda: now[0],
    )

    early = pull(transport)
    now[0] = listed_at + 3.0
    taken = pull(transport)

    assert early == []
    assert [fetched.name for fetched in taken] == ["growing.csv"]


@pytest.mark.parametrize("processed", [".", "", "./", "sub/..", "{path}"])
def test_a_processed_folder_that_is_the_drop_folder_itself_is_refused(
    tmp_path: Path, processed: str
) -> None:
    # One file was moved within its folder under a new name at each fetch, a new
    # arrival each time: applied 11 times in 45 s.
    options = {"path": str(tmp_path), "format": "csv"}
    with pytest.raises(ValueError, match="processed_path must name a folder other than path"):
        FolderSettings.model_validate(
            {**options, "processed_path": processed.format(path=tmp_path)}
        )
    # Deleting takes no processed folder.
    deleting = {**options, "processed_path": ".", "done_action": "delete"}
    assert FolderSettings.model_validate(deleting).done_action == "delete"


def test_a_long_named_file_is_moved_aside_beside_one_of_its_name(tmp_path: Path) -> None:
    # The name with the content's digest added passed 255 bytes: `File name too long` at
    # every fetch, the file left in the drop folder for good.
    name = "ü" * 100 + "x" * 46 + ".csv"  # 250 bytes
    assert len(name.encode()) == 250
    transport = counted_folder(tmp_path)
    dropped(tmp_path / name, CSV)
    pull(transport)
    dropped(tmp_path / name, CSV + b"SIM-2,5\n")
    [second] = pull(transport)

    aside = {path.name for path in (tmp_path / "processed").iterdir()}
    digest = second.delivery_id.removeprefix("sha256:")[:16]
    [renamed] = aside - {name}
    assert not (tmp_path / name).exists()
    assert renamed.endswith(f".{digest}.csv")
    assert len(renamed.encode()) <= 255
    assert name.startswith(renamed.removesuffix(f".{digest}.csv"))
