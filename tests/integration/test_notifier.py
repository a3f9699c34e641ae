"""The notifier that wakes projection runners: LISTEN on the store's channel."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from projections.notifier import CHANNEL, LogNotifier


@pytest.fixture
def notifier(database_url: str) -> Iterator[LogNotifier]:
    listening = LogNotifier(database_url).start()
    try:
        deadline = time.monotonic() + 10
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND query LIKE 'LISTEN%%'"
            ).fetchone():
                assert time.monotonic() < deadline, "the notifier never listened"
                time.sleep(0.01)
        yield listening
    finally:
        listening.stop()


def _woken(notifier: LogNotifier, conn: psycopg.Connection[object]) -> bool:
    seen = notifier.count
    conn.execute(f"NOTIFY {CHANNEL}")
    return notifier.wait(seen, 2.0) != seen


@pytest.mark.alone
def test_a_notification_wakes_a_waiting_runner_at_once(
    notifier: LogNotifier, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for _ in range(3):
            started = time.monotonic()
            assert _woken(notifier, conn)
            assert time.monotonic() - started < 0.5


def test_the_notifier_listens_again_after_its_connection_was_ended(
    notifier: LogNotifier, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        ended = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
        ).fetchall()
        assert ended == [(True,)]
        deadline = time.monotonic() + 10
        while not _woken(notifier, conn):
            assert time.monotonic() < deadline, "the notifier never listened again"


@pytest.mark.alone
def test_stopping_the_notifier_does_not_wait_out_its_listen(database_url: str) -> None:
    """A runtime's close stops it: it used to wait up to half a second for its LISTEN's
    wait to end, at every close (two and a half minutes of the test suite)."""
    notifier = LogNotifier(database_url).start()
    time.sleep(0.2)  # listening, or about to
    started = time.monotonic()
    notifier.stop()
    assert time.monotonic() - started < 0.2
    assert notifier._thread is not None
    assert not notifier._thread.is_alive()


def test_stopping_twice_or_unstarted_touches_no_file_opened_since(
    database_url: str, tmp_path: Path
) -> None:
    """A review: the wake pipe's numbers were closed, and written to, again by a second
    stop, by then another file's."""
    LogNotifier(database_url).stop()  # never started: nothing to stop
    notifier = LogNotifier(database_url).start()
    time.sleep(0.2)
    notifier.stop()
    with (tmp_path / "opened-since").open("w+b") as opened:
        notifier.stop()
        opened.write(b"mine")
        opened.seek(0)
        assert opened.read() == b"mine"
