"""What the integration tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api.runtime import Runtime, open_runtime
from api.settings import Settings


@pytest.fixture
def ledger(settings: Settings) -> Iterator[Runtime]:
    """The ledger on a fresh database with its projections running (the mappings and
    supplier views are read), and neither the sweeper nor the supplier connectors: the
    tests drive the inbox, the scheduler and the commands themselves."""
    opened = open_runtime(settings, sweep=False, connect=False)
    try:
        yield opened
    finally:
        opened.close()
