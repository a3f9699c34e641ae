"""Naive times in the supplier's zone, around the hours its clocks change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from connectors.normalise import FeedRules, observed_utc
from ledger.supplier import SupplierTerms

BERLIN = FeedRules.of(SupplierTerms("berlin", timezone="Europe/Berlin"))
# 2026-10-25: at 03:00 CEST clocks go back to 02:00 CET, so 02:00-02:59 is shown twice.
FIRST_0230 = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
SECOND_0230 = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)  # 02:30 CET, an hour later


def test_a_time_shown_twice_is_the_later_one_not_after_the_report_came() -> None:
    written = datetime(2026, 10, 25, 2, 30)  # naive, as the supplier wrote it
    rules = BERLIN

    assert rules.in_utc(written, FIRST_0230 + timedelta(minutes=1)) == FIRST_0230
    assert rules.in_utc(written, SECOND_0230 + timedelta(minutes=1)) == SECOND_0230
    assert rules.in_utc(written, SECOND_0230 + timedelta(hours=5)) == SECOND_0230
    assert rules.in_utc(written) == FIRST_0230  # no arrival known: the first, as before


def test_times_shown_once_read_as_before() -> None:
    summer, winter = datetime(2026, 7, 1, 12, 0), datetime(2026, 1, 15, 12, 0)
    arrived = datetime(2026, 12, 31, tzinfo=UTC)
    assert BERLIN.in_utc(summer, arrived) == datetime(2026, 7, 1, 10, 0, tzinfo=UTC)
    assert BERLIN.in_utc(winter, arrived) == datetime(2026, 1, 15, 11, 0, tzinfo=UTC)
    # 02:30 on the spring day does not exist: read with the offset before the change
    gap = datetime(2026, 3, 29, 2, 30)
    assert BERLIN.in_utc(gap, arrived) == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    aware = datetime(2026, 10, 25, 2, 30, tzinfo=UTC)
    assert BERLIN.in_utc(aware, arrived) == aware


def test_a_feed_sent_live_through_the_hour_keeps_its_reports_in_order() -> None:
    """Each report arrives a minute after it was observed: read as meant, the second
    hour's reports are newer than the first hour's, not an hour older."""
    rules = BERLIN
    instants = [FIRST_0230 + timedelta(minutes=20 * step) for step in range(6)]
    read = []
    for instant in instants:
        local = instant.astimezone(rules.zone).replace(tzinfo=None)
        arrived = instant + timedelta(minutes=1)
        at = observed_utc(local, rules, arrived, arrived)
        assert isinstance(at, datetime)
        read.append(at)
    assert read == instants
