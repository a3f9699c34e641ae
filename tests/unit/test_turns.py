"""How `make test` takes turns (tests/turns.py): two tests at a time, and a test marked
`alone` with no other beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.turns import MODULE_SERVERS, pytest_xdist_make_scheduler

ROOT = Path(__file__).resolve().parents[2]

# Each test notes when it ran. The first tests of the two files wait for each other, so
# they pass only if they run at the same time.
HEADER = """
import os, time
from pathlib import Path
import pytest

from tests.turns import MODULE_SERVERS, pytest_xdist_make_scheduler

LOG = Path(os.environ["TURNS_LOG"])

def ran(name, meet=None):
    began = time.time()
    if meet:
        (LOG.parent / name).touch()
        deadline = time.monotonic() + 20
        while not (LOG.parent / meet).exists():
            assert time.monotonic() < deadline, f"{name} never ran beside {meet}"
            time.sleep(0.05)
    time.sleep(0.3)
    with LOG.open("a") as log:
        log.write(f"{name} {began} {time.time()}\\n")
"""


def module(names: list[str], meet: tuple[str, str]) -> str:
    tests = [
        ("@pytest.mark.alone\n" if name.startswith("alone") else "")
        + f"def test_{name}():\n"
        + (f"    ran({name!r}, {meet[1]!r})\n" if name == meet[0] else f"    ran({name!r})\n")
        for name in names
    ]
    return HEADER + "\n\n" + "\n\n".join(tests)


def test_an_alone_test_runs_by_itself_and_the_others_two_at_a_time(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = pytester.path / "turns" / "log"
    log.parent.mkdir()
    monkeypatch.setenv("TURNS_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest("from tests.turns import pytest_runtest_protocol  # noqa: F401\n")
    pytester.makepyfile(
        test_first=module(["a1", "alone_a", "a2", "a3"], ("a1", "b1")),
        test_second=module(["b1", "b2", "alone_b", "b3"], ("b1", "a1")),
    )

    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist", "loadfile", "-p", "no:cacheprovider", timeout=120
    )

    result.assert_outcomes(passed=8)
    spans = {
        name: (float(began), float(ended))
        for name, began, ended in (line.split() for line in log.read_text().splitlines())
    }
    assert len(spans) == 8
    for alone in ("alone_a", "alone_b"):
        began, ended = spans[alone]
        beside = [
            other
            for other, (other_began, other_ended) in spans.items()
            if other != alone and other_began < ended and began < other_ended
        ]
        assert beside == [], f"{alone} ran beside {beside}"


def test_the_files_with_module_servers_share_one_scope_and_the_others_have_one_each(
    pytester: pytest.Pytester,
) -> None:
    config = pytester.parseconfig("--tx", "2*popen", "--dist", "loadfile")
    scheduling = pytest_xdist_make_scheduler(config, None)
    scope = scheduling._split_scope  # type: ignore[attr-defined]

    assert all((ROOT / name).is_file() for name in MODULE_SERVERS)  # none renamed away
    merged = {scope(f"{name}::test_x[1]") for name in MODULE_SERVERS}
    assert len(merged) == 1
    assert scope("tests/unit/test_writer.py::test_a") == "tests/unit/test_writer.py"
    assert scope("tests/unit/test_writer.py::test_a") not in merged
    other_mode = pytester.parseconfig("--tx", "2*popen", "--dist", "load")
    assert pytest_xdist_make_scheduler(other_mode, None) is None
