"""A lease whose holder stopped without dying is taken over; a busy holder keeps it.

Found by an operator's walkthrough: a `ledger projections run` worker frozen with SIGSTOP
kept its session, and its leases, for as long as it stayed frozen; the standby worker
never took over, and every view stopped. Its kernel still answers keepalives, so only
the session's silence tells: a holding session beats every HEARTBEAT_SECONDS, and a
standby ends one silent for SILENT_SECONDS (both shortened here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import projections.leases
from projections.leases import LeaseSession

SRC = Path(__file__).resolve().parents[2] / "src"

HOLDER = """
import sys, time
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
import projections.leases as leases
leases.HEARTBEAT_SECONDS = 0.3
session = leases.LeaseSession(sys.argv[1])
print("held" if session.hold("frozen-holder", session) else "refused", flush=True)
time.sleep(3600)  # busy elsewhere: it never asks for the lease again
"""


@pytest.mark.alone
def test_a_standby_takes_the_lease_of_a_frozen_holder_but_not_of_a_busy_one(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(projections.leases, "SILENT_SECONDS", 2.0)
    monkeypatch.setattr(projections.leases, "LOOK_EVERY_SECONDS", 0.2)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, database_url],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        stdout=subprocess.PIPE,
        text=True,
    )
    standby = LeaseSession(database_url)
    mine = object()
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        # Busy, not frozen: its heartbeat keeps it, however long the standby tries.
        until = time.monotonic() + 4.0
        while time.monotonic() < until:
            assert not standby.hold("frozen-holder", mine)
            time.sleep(0.1)

        os.kill(holder.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        while not standby.hold("frozen-holder", mine):
            assert time.monotonic() - frozen < 15, "the frozen holder kept its lease"
            time.sleep(0.1)
        # Once silent for SILENT_SECONDS, counted from its last beat: up to one
        # HEARTBEAT_SECONDS before it was frozen (it failed, at 1.94 s, under load).
        assert time.monotonic() - frozen >= 2.0 - 0.3
    finally:
        standby.close()
        holder.kill()
        holder.wait()
