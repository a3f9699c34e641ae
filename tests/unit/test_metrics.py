"""The directory `ledger serve`'s workers count in (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from api.metrics import DIRECTORY, prepare_directory


def test_a_server_counts_in_a_directory_of_its_own_removed_when_it_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(DIRECTORY, raising=False)
    with prepare_directory() as path:
        assert os.environ[DIRECTORY] == str(path)
        assert path.is_dir()
        (path / "counter_1.db").write_bytes(b"x")
    assert DIRECTORY not in os.environ
    assert not path.exists()


def test_the_operator_s_directory_is_emptied_of_an_earlier_run_s_counts_and_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"old counts")
    (given / "notes.txt").write_text("not ours")
    monkeypatch.setenv(DIRECTORY, str(given))
    with prepare_directory() as path:
        assert path == given
        assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]
    assert os.environ[DIRECTORY] == str(given)
    assert given.is_dir()
