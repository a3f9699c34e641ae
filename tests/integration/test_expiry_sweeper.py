"""Holds past their time are written as expired, by one sweeper across processes."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from api.runtime import Runtime
from api.sweeper import Sweeper
from ledger.reservation import Reservation, ReservationStatus
from ledger.writer import OutcomeUnknown
from tests.conftest import random_sku
from tests.integration.ledger_setup import now, reserve, stock_sku


def test_the_sweeper_expires_only_holds_past_their_time(runtime: Runtime) -> None:
    sku = random_sku()
    stock_sku(runtime.writer, sku, 10)
    short = runtime.writer.execute(reserve([(sku, 2)], ttl=1)).value.reservation
    placed = runtime.writer.execute(reserve([(sku, 3)], ttl=600))
    long = placed.value.reservation
    runtime.views.wait_for("reservations", placed.position, timeout=10)
    sweeper = Sweeper(runtime.writer, runtime.views, runtime.database_url, interval_seconds=60)
    try:
        assert sweeper.sweep(now()) == 0
        expired = sweeper.sweep(short.expires_at + timedelta(milliseconds=1))
    finally:
        sweeper.lease.release()

    assert expired == 1
    assert runtime.queries.reservation(short.id).status == ReservationStatus.EXPIRED
    assert runtime.queries.reservation(long.id).status == ReservationStatus.HELD
    events = runtime.app.events.get(short.id)
    assert [type(event) for event in events][-1] is Reservation.Expired
    assert runtime.queries.stock_levels(sku, short.expires_at).held == 3


def test_a_hold_stops_counting_at_its_expiry_before_the_sweeper_runs(runtime: Runtime) -> None:
    sku = random_sku()
    stock_sku(runtime.writer, sku, 10)
    hold = runtime.writer.execute(reserve([(sku, 4)], ttl=1)).value.reservation
    assert runtime.queries.stock_levels(sku, now()).available == 6
    assert runtime.queries.stock_levels(sku, hold.expires_at).available == 10
    assert runtime.queries.reservation(hold.id).status_at(hold.expires_at) == "expired"


def test_only_one_of_two_sweepers_holds_the_lease(runtime: Runtime) -> None:
    first = Sweeper(runtime.writer, runtime.views, runtime.database_url, interval_seconds=60)
    second = Sweeper(runtime.writer, runtime.views, runtime.database_url, interval_seconds=60)
    try:
        assert first.lease.held()
        assert not second.lease.held()
        first.lease.release()
        deadline = time.monotonic() + 5
        while not second.lease.held():
            assert time.monotonic() < deadline, "the standby never took over"
            time.sleep(0.05)
    finally:
        first.lease.release()
        second.lease.release()


@pytest.mark.parametrize(
    ("failure", "told"),
    [
        (OutcomeUnknown("the command may yet be applied"), "sweeper.timed_out"),
        (
            psycopg.OperationalError("terminating connection due to administrator command"),
            "sweeper.database_unavailable",
        ),
    ],
    ids=["past-the-deadline", "connection-lost"],
)
def test_a_sweep_past_the_writer_s_deadline_is_told_as_such_and_the_next_goes_on(
    runtime: Runtime, caplog: pytest.LogCaptureFixture, failure: Exception, told: str
) -> None:
    """A walkthrough: a sweep whose command outlived its deadline (the event table locked)
    was logged as `sweeper.failed`, an error with a traceback; so was one whose database
    connection was ended (an OMS walkthrough, at each `pg_terminate_backend`)."""
    sku = random_sku("SWEPT")
    stock_sku(runtime.writer, sku, 5)
    held = runtime.writer.execute(reserve([(sku, 2)], ttl=1)).value.reservation
    runtime.views.wait_for("reservations", runtime.app.recorder.max_notification_id() or 0, 10)
    time.sleep(1.1)  # its hold is due
    execute = runtime.writer.execute
    calls = []

    def late_once(command: Any, **options: Any) -> Any:
        calls.append(command)
        if len(calls) == 1:
            raise failure
        return execute(command, **options)

    sweeper = Sweeper(runtime.writer, runtime.views, runtime.database_url, interval_seconds=0.1)
    runtime.writer.execute = late_once  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.WARNING, logger="api.sweeper"):
            sweeper.start()
            deadline = time.monotonic() + 10
            while runtime.app.repository.get(held.id).status != ReservationStatus.EXPIRED:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        sweeper.stop()
        runtime.writer.execute = execute  # type: ignore[method-assign]

    events = [r.msg.get("event") for r in caplog.records if isinstance(r.msg, dict)]
    assert told in events
    assert "sweeper.failed" not in events
