"""Console logs: a traceback is rendered without each frame's locals."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest
import structlog

from api.logs import configure_logging
from tests.conftest import make_settings


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    """Console logs for one test, written to what it yields; JSON again after it, as for
    every other test (tests/conftest.py)."""
    configure_logging(make_settings("postgresql://unused/unused", log_format="console"))
    written = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(written)
    yield written
    configure_logging(make_settings("postgresql://unused/unused", log_format="json"))


def test_a_console_traceback_leaves_out_the_frames_locals(console: io.StringIO) -> None:
    def failing() -> None:
        held_in_a_local = "LOCAL-" + str(6 * 7)
        raise RuntimeError(f"broke after {len(held_in_a_local)} characters")

    try:
        failing()
    except RuntimeError:
        structlog.get_logger("test").exception("request.failed")
    written = re.sub(r"\x1b\[[0-9;]*m", "", console.getvalue())  # no colours
    assert "request.failed" in written
    assert "Logging error" not in written
    assert "broke after 8 characters" in written
    assert "in failing" in written  # the frame is there
    assert "LOCAL-42" not in written  # its locals are not


def test_the_demo_servers_chatter_is_left_out_at_info(console: io.StringIO) -> None:
    """The demo's FTP server logged every connection and command at INFO, about five
    lines a second, and the banner with the demo's keys scrolled away at once (a
    newcomer's walkthrough); its warnings still show."""
    logging.getLogger("pyftpdlib").info("127.0.0.1:40000-[acme] USER 'acme' logged in.")
    logging.getLogger("pyftpdlib").warning("a warning of its own")

    assert "logged in" not in console.getvalue()
    assert "a warning of its own" in console.getvalue()
