"""Each parser declares the options it reads: connector settings refuse any other."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from connectors.config import check_connector
from connectors.parsers import OPTION_NAMES
from connectors.parsers.csv_feed import CsvSettings
from connectors.parsers.edi846 import EdiSettings
from connectors.parsers.json_feed import JsonSettings
from connectors.parsers.records import ValueFormat
from connectors.parsers.xml_feed import XmlSettings


class Asked(Mapping[str, Any]):
    """No options, noting every name a parser asks for."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getitem__(self, name: str) -> Any:
        self.names.add(name)
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:
        self.names.add(name)
        return default

    def __contains__(self, name: object) -> bool:
        self.names.add(str(name))
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize(
    "settings", [CsvSettings, JsonSettings, XmlSettings, EdiSettings, ValueFormat]
)
def test_a_parser_reads_the_options_it_declares_and_no_other(settings: Any) -> None:
    asked = Asked()
    settings.from_options(asked)
    # Its own, and how numbers and times are written where it reads them.
    assert asked.names - ValueFormat.OPTIONS == settings.OPTIONS - ValueFormat.OPTIONS
    assert settings.OPTIONS <= asked.names <= OPTION_NAMES


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        pytest.param("%s", "cannot be read", id="epoch seconds strptime cannot read"),
        pytest.param("%Q", "cannot be read", id="no such directive"),
        pytest.param("%H:%M", "must name the year, month and day", id="no date"),
        pytest.param("%Y-%m %H:%M", "must name the year, month and day", id="no day"),
        pytest.param("%d.%m.%Y %H:%M %Z", "write the offset", id="zone names read as local"),
        # A directive twice: strptime's pattern cannot hold it (re.error), and it was a 500.
        pytest.param("%Y-%m-%d %Y", "cannot be read", id="a directive twice"),
        pytest.param("%d/%m/%Y %H:%M %d", "cannot be read", id="the day twice"),
    ],
)
def test_a_timestamp_format_that_cannot_read_a_date_back_is_refused_when_saved(
    pattern: str, why: str
) -> None:
    """Found by a walkthrough: `%s` was saved, then every row of every delivery was
    refused; `%H:%M` was saved, and `12:29` was applied as a level of 1 January 1900."""
    with pytest.raises(ValueError, match=why):
        check_connector({"format": "csv", "options": {"timestamp_format": pattern}})


@pytest.mark.parametrize(
    "pattern",
    [
        "%d.%m.%Y %H:%M",
        "%Y%m%d",
        "%m/%d/%y %I:%M %p",
        "%G-W%V-%u",
        "%Y-%m-%dT%H:%M:%S%z",  # with the offset: refused while the probe had none
    ],
)
def test_a_timestamp_format_that_names_the_date_is_taken(pattern: str) -> None:
    check_connector({"format": "csv", "options": {"timestamp_format": pattern}})
    assert ValueFormat.from_options({"timestamp_format": pattern}).timestamp_format == pattern
