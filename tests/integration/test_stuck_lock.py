"""A session that stopped mid-save, holding the event table's lock, is ended by the next
save that waits for it too long; then saves go on.

Found by an operator's walkthrough: a connectors worker frozen (SIGSTOP) between a
delivery part's two round trips kept the lock, and every write of every `serve` failed
after its lock timeout, for as long as the worker stayed frozen (watched for 81 s).
PostgreSQL saw the session as busy, so no timeout of its own ended it.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from eventsourcing.persistence import OperationalError

import api.recorder
from api.runtime import Runtime, open_runtime
from api.settings import Settings
from tests.conftest import make_settings, random_sku
from tests.integration.ledger_setup import reserve, stock_sku


@pytest.fixture
def quick(database_url: str) -> Settings:
    return make_settings(database_url, lock_timeout_seconds=1)


def test_a_save_that_waits_on_a_stuck_holder_of_the_lock_ends_its_session(
    quick: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api.recorder, "STUCK_LOCK_SECONDS", 2.0)
    runtime: Runtime = open_runtime(quick, sweep=False, project=False, connect=False)
    try:
        sku = random_sku("STUCK")
        stock_sku(runtime.writer, sku, 10)
        with psycopg.connect(quick.database_url.get_secret_value()) as stuck:  # type: ignore[union-attr]
            stuck.execute("LOCK TABLE inventoryledger_events IN EXCLUSIVE MODE")
            stuck_pid = stuck.info.backend_pid
            # Held for less than STUCK_LOCK_SECONDS: a save times out and leaves it be.
            with pytest.raises(OperationalError, match="lock timeout"):
                runtime.writer.execute(reserve([(sku, 1)]))
            assert stuck.execute("SELECT 1").fetchone() == (1,)
            time.sleep(2.0)
            # Held for longer: the next save that times out ends the holder's session,
            # and a save after it goes through.
            with pytest.raises(OperationalError, match="lock timeout"):
                runtime.writer.execute(reserve([(sku, 1)]))
            with psycopg.connect(quick.database_url.get_secret_value()) as look:  # type: ignore[union-attr]
                alive = look.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (stuck_pid,)
                ).fetchone()
            assert alive == (0,)
            granted = runtime.writer.execute(reserve([(sku, 1)]))
            assert granted.value.reservation.status == "held"
            with pytest.raises(psycopg.OperationalError):
                stuck.execute("SELECT 1")
    finally:
        runtime.close()
