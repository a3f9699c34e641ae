"""Secrets by reference (connectors.secrets.resolve): what cannot be read as a secret is a
secret not configured, at once, never a hang or an unexpected error."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from connectors.secrets import MAX_SECRET_BYTES, SecretUnavailable, resolve
from connectors.transports import FetchFailed, read_secret


def test_a_secret_file_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("token-é\n")

    assert resolve(f"file:{path}") == "token-é"


def test_a_secret_file_of_the_largest_size_is_read_and_a_larger_one_refused(
    tmp_path: Path,
) -> None:
    largest, larger = tmp_path / "largest", tmp_path / "larger"
    largest.write_bytes(b"s" * MAX_SECRET_BYTES)
    larger.write_bytes(b"s" * (MAX_SECRET_BYTES + 1))

    assert len(resolve(f"file:{largest}")) == MAX_SECRET_BYTES
    with pytest.raises(SecretUnavailable, match="larger than"):
        resolve(f"file:{larger}")


def test_a_secret_file_that_is_not_utf8_is_a_secret_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"whsec-\xff\xfe")

    with pytest.raises(SecretUnavailable, match="not UTF-8"):
        resolve(f"file:{path}")


def test_a_fifo_is_refused_at_once_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    outcome: list[BaseException | str] = []

    def read() -> None:
        try:
            outcome.append(resolve(f"file:{path}"))
        except BaseException as error:  # handed to the test's thread
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # let it go: a writer ends its wait
        with path.open("w"):
            pass
        pytest.fail("reading the secret waited on the FIFO")
    assert isinstance(outcome[0], SecretUnavailable)
    assert "not a regular file" in str(outcome[0])


@pytest.mark.parametrize("name", ["/dev/zero", "/dev/null", "/"])
def test_a_device_or_a_directory_is_not_a_secret_file(name: str) -> None:
    with pytest.raises(SecretUnavailable):
        resolve(f"file:{name}")


def test_a_missing_secret_file_is_a_secret_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SecretUnavailable, match="cannot read"):
        resolve(f"file:{tmp_path / 'absent'}")


def test_an_environment_secret_whose_bytes_are_not_utf8_is_a_secret_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # How Python reads such bytes from the environment: as lone surrogates.
    monkeypatch.setenv("LEDGER_TEST_SECRET", b"whsec-\xff".decode("utf-8", "surrogateescape"))

    with pytest.raises(SecretUnavailable, match="not UTF-8"):
        resolve("env:LEDGER_TEST_SECRET")


def test_a_poll_token_that_cannot_be_read_fails_the_fetch_for_good_saying_why(
    tmp_path: Path,
) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"\xff")

    with pytest.raises(FetchFailed) as failed:
        read_secret(f"file:{path}")

    assert not failed.value.retriable
    assert str(failed.value).startswith("secret_unavailable: cannot read")


def test_a_secret_with_a_windows_line_ending_is_read_and_one_of_several_lines_refused(
    tmp_path: Path,
) -> None:
    """Found by a security review: "SUPERSECRETTOKEN\\r" went into an Authorization header,
    and httpx's refusal quoted it into the log and feed health; /etc/shadow, named as a
    token file, was quoted whole."""
    windows, lines = tmp_path / "windows", tmp_path / "lines"
    windows.write_bytes(b"SUPERSECRETTOKEN\r\n")
    lines.write_text("root:$6$hash:1:0:99999:7:::\ndaemon:*:1:0:99999:7:::\n")

    assert resolve(f"file:{windows}", sent=True) == "SUPERSECRETTOKEN"
    with pytest.raises(SecretUnavailable) as refused:
        resolve(f"file:{lines}", sent=True)
    assert "control characters" in str(refused.value)
    assert "$6$hash" not in str(refused.value)


def test_the_service_s_own_settings_are_no_supplier_s_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An admin key could have sent the database URL to any server, as a poll's token."""
    monkeypatch.setenv("LEDGER_DATABASE_URL", "postgresql://user:password@db/ledger")
    monkeypatch.setenv("ACME_TOKEN", "acme-token")
    with pytest.raises(SecretUnavailable, match="the service's own setting"):
        resolve("env:LEDGER_DATABASE_URL", sent=True)
    assert resolve("env:ACME_TOKEN", sent=True) == "acme-token"
    with pytest.raises(FetchFailed, match="the service's own setting"):
        read_secret("env:LEDGER_DATABASE_URL")  # a poll's token, an FTP password


@pytest.mark.parametrize("content", ["", "\n", "\r\n", "  \n"])
def test_an_empty_secret_file_is_no_secret(tmp_path: Path, content: str) -> None:
    """A webhook whose secret file held only a line ending took requests signed with the
    empty key, from anyone (a security review); an empty variable was refused already."""
    path = tmp_path / "secret"
    path.write_text(content)

    with pytest.raises(SecretUnavailable, match="is empty"):
        resolve(f"file:{path}")


def test_a_blank_environment_secret_is_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLANK_SECRET", "  ")
    with pytest.raises(SecretUnavailable, match="is not set"):
        resolve("env:BLANK_SECRET")
