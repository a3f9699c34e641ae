"""How the scheduler names a fetched delivery's arrival in the inbox."""

from __future__ import annotations

from datetime import UTC, datetime

from connectors.scheduler import arrival_id
from connectors.transports import Fetched

NOW = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
LATER = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


def listed(name: str | None, modified: float | None, body: bytes = b"sku,quantity\n") -> Fetched:
    return Fetched("sha256:" + "ab" * 16, body, "csv", name, "folder", modified=modified)


def test_a_file_listed_again_as_it_was_has_the_same_id_whenever_it_is_fetched() -> None:
    assert arrival_id(listed("stock.csv", 1_764_900_000.25), NOW) == arrival_id(
        listed("stock.csv", 1_764_900_000.25), LATER
    )


def test_a_file_dropped_again_or_under_another_name_is_another_arrival() -> None:
    first = arrival_id(listed("stock.csv", 1_764_900_000.25), NOW)
    assert arrival_id(listed("stock.csv", 1_764_986_400.25), NOW) != first
    assert arrival_id(listed("stock-2.csv", 1_764_900_000.25), NOW) != first
    assert first.startswith("sha256:" + "ab" * 16 + "@20251205T020000.250000~")


def test_without_a_modification_time_each_fetch_is_an_arrival() -> None:
    assert arrival_id(listed("stock.csv", None), NOW).endswith("@20261205T090000.000000")
    assert arrival_id(listed("stock.csv", None), NOW) != arrival_id(
        listed("stock.csv", None), LATER
    )
    # A time no calendar holds, as a broken server may list, is not an identity either.
    assert arrival_id(listed("stock.csv", 1e20), NOW).endswith("@20261205T090000.000000")
