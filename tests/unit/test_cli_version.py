"""`ledger --version`: an operator asked which code (and which data version) runs."""

from __future__ import annotations

from importlib.metadata import version

from typer.testing import CliRunner

from api.cli import cli
from projections.data_version import DATA_VERSION


def test_the_version_names_the_package_and_the_data_version_it_writes() -> None:
    answer = CliRunner().invoke(cli, ["--version"])

    assert answer.exit_code == 0, answer.output
    assert answer.output.strip() == (
        f"stockledger {version('stockledger')} (data version {DATA_VERSION})"
    )
