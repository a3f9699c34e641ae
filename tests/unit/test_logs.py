"""Console logs: a traceback is rendered without each frame's locals."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import structlog

from api.logs import configure_logging
from tests.conftest import make_settings


@pytest.fixture
def console(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Console logs for one test, written where it reads them; JSON again after it, as
    for every other test (tests/conftest.py)."""
    configure_logging(make_settings("postgresql://unused", log_format="console"))
    yield capsys
    configure_logging(make_settings("postgresql://unused", log_format="json"))


def test_a_console_traceback_leaves_out_the_frames_locals(
    console: pytest.CaptureFixture[str],
) -> None:
    def failing() -> None:
        held_in_a_local = "LOCAL-" + str(6 * 7)
        raise RuntimeError(f"broke after {len(held_in_a_local)} characters")

    try:
        failing()
    except RuntimeError:
        structlog.get_logger("test").exception("request.failed")
    written = re.sub(r"\x1b\[[0-9;]*m", "", console.readouterr().err)  # no colours
    assert "request.failed" in written
    assert "broke after 8 characters" in written
    assert "failing" in written  # the frame is there
    assert "LOCAL-42" not in written  # its locals are not
