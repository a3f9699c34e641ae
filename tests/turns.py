"""How `make test` takes turns: pytest-xdist runs two tests at a time (`-n 2 --dist
loadfile`: a file's tests on one worker), and a test marked `alone` runs with no other.
Those are the tests bounded in wall time, which a neighbour's load could push past their
bound, and one whose rebuild and commands open many connections. The hooks are the root
conftest's (it imports them)."""

from __future__ import annotations

import fcntl
from collections.abc import Generator
from contextlib import ExitStack
from pathlib import Path

import pytest

# The files whose module-scoped servers hold the most connections, as long as the file
# runs: one worker runs them one after another, as two of them side by side held up to 91
# of the server's 100 connections (and the read side's beside the reservation lifecycle's,
# 81). Two other e2e files keep a module server of one worker (identifiers, OpenAPI).
MODULE_SERVERS = frozenset(
    f"tests/e2e/{name}.py"
    for name in (
        "test_dashboard",
        "test_dead_letters",
        "test_delivery_ids",
        "test_feeds",
        "test_http_errors",
        "test_read_side",
        "test_reservation_lifecycle",
        "test_surrogates",
    )
)


def _lock(path: Path, operation: int, stack: ExitStack) -> None:
    handle = stack.enter_context(path.open("a"))
    fcntl.flock(handle, operation)  # released when the file closes


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    """Takes turns with the other pytest-xdist workers: a test marked `alone` runs with no
    other test beside it, from the first fixture it sets up to the last it tears down (the
    other worker's module servers, if any, stay up, idle but for their own timers); the
    others run side by side.

    Two locks shared by the run's workers: a waiting `alone` test holds the gate, so no
    other test starts after it asked (it is not starved), and waits for the room to
    empty; the others pass the gate and share the room."""
    if not hasattr(item.config, "workerinput"):  # not a pytest-xdist worker: one at a time
        yield
        return
    # The directory above a worker's own temporary one is the run's, the same for each.
    shared = item.config._tmp_path_factory.getbasetemp().parent  # type: ignore[attr-defined]
    with ExitStack() as stack:
        if item.get_closest_marker("alone"):
            _lock(shared / "tests-gate.lock", fcntl.LOCK_EX, stack)
            _lock(shared / "tests-room.lock", fcntl.LOCK_EX, stack)
        else:
            with ExitStack() as gate:
                _lock(shared / "tests-gate.lock", fcntl.LOCK_SH, gate)
                _lock(shared / "tests-room.lock", fcntl.LOCK_SH, stack)
        yield


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # without pytest-xdist: never called
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`--dist loadfile`, with the files of `MODULE_SERVERS` as one."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "module servers" if scope in MODULE_SERVERS else scope

    return Scheduling(config, log)  # type: ignore[arg-type]
