"""Each parser declares the options it reads: connector settings refuse any other."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

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
