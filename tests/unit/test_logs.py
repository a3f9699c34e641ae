"""Console logs: a traceback is rendered without each frame's locals."""

from __future__ import annotations

import re

import pytest
import structlog

from api.logs import configure_logging
from api.settings import Settings


def test_a_console_traceback_leaves_out_the_frames_locals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(Settings(database_url="postgresql://localhost/x", log_format="console"))

    def failing() -> None:
        held_in_a_local = "LOCAL-" + str(6 * 7)
        raise RuntimeError(f"broke after {len(held_in_a_local)} characters")

    try:
        failing()
    except RuntimeError:
        structlog.get_logger("test").exception("request.failed")
    written = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().err)  # no colours
    assert "request.failed" in written
    assert "broke after 8 characters" in written
    assert "failing" in written  # the frame is there
    assert "LOCAL-42" not in written  # its locals are not
