"""FTP pull: feed files taken from a folder on a supplier's FTP server.

The folder logic is `folder.FolderTransport`'s; this module is the session, with the
standard library's ftplib in passive binary mode. A session lasts one fetch (its `done()`
calls included, when they come while the fetch is read); a `done()` after it opens one of
its own. The folder is listed with MLSD (RFC 3659); a server without it is listed with
NLST, each file's size asked with SIZE. Plain FTP sends the password and the files in
clear: use FTPS (`tls`) wherever the supplier offers it, plain FTP only where it offers
nothing better.

Options of `connector["ftp"]` (those of "folder" but `path`, and those of `retry`):

- `host` (required) and `port` (default 21).
- `username` (required) and `password_ref` (required): where the password lives
  ("env:NAME" or "file:PATH").
- `tls` (default false): explicit FTPS (AUTH TLS, then PROT P): the login and every
  transfer encrypted, the server's certificate verified against `ca_file` (PEM
  certificates to trust) or, without one, the system's trusted authorities, and its name
  or address checked against `host`. A certificate that fails is fatal, not retried.
  Each data connection resumes the control connection's TLS session, which servers that
  require it (vsftpd's default, `require_ssl_reuse`) insist on and others accept.
- `path` (default "."): the remote folder ("." is the login's own).
- `format`, `pattern`, `done_action`, `processed_path`: as for "folder"; `processed_path`
  (default "processed") is relative to `path` unless absolute.
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import posixpath
import socket
import ssl
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import Field, model_validator

from connectors.transports import read_secret
from connectors.transports.folder import (
    Entry,
    FileSettings,
    FolderSession,
    remote_path,
    too_large,
)
from connectors.transports.retry import Failure, FetchFailed, classified

FTP_FAILURES = (
    # Before OSError, which both are.
    Failure(ssl.SSLCertVerificationError, "tls_certificate_not_verified", retriable=False),
    Failure(ssl.SSLError, "tls_error", retriable=True),
    Failure(ftplib.error_perm, "ftp_refused", retriable=False),  # 5xx: login, missing, denied
    Failure(ftplib.error_temp, "ftp_unavailable", retriable=True),  # 4xx: busy, try later
    Failure((ftplib.error_reply, ftplib.error_proto), "ftp_protocol_error", retriable=True),
    Failure(TimeoutError, "timeout", retriable=True),
    Failure((EOFError, OSError), "connection_error", retriable=True),
)

NOT_IMPLEMENTED = ("500", "501", "502", "504")  # replies of a server without a command
NO_SUCH_FILE = "550"


class FtpSettings(FileSettings):
    """`connector["ftp"]`: files pulled from an FTP server."""

    host: str = Field(min_length=1)
    port: int = Field(21, ge=1, le=65535)
    username: str = Field(min_length=1)
    password_ref: str
    tls: bool = False
    ca_file: str | None = None
    path: str = "."

    @model_validator(mode="after")
    def _ca_for_tls(self) -> FtpSettings:
        if self.ca_file is not None and not self.tls:
            raise ValueError("ca_file is for FTPS: set tls too")
        return self


def ftp_folder(settings: FtpSettings) -> Callable[[], FolderSession]:
    """Opens sessions on the remote folder, reading the password at each."""

    def open_folder() -> FtpFolder:
        return FtpFolder(settings, read_secret(settings.password_ref))

    return open_folder


class FtpFolder:
    """One FTP session on the remote folder."""

    def __init__(self, settings: FtpSettings, password: str) -> None:
        self._max_bytes = settings.max_file_bytes
        self._folder = settings.path
        self._processed = remote_path(settings.path, settings.processed_path)
        self._ftp = (
            _ResumingFtpTls(context=_trusting(settings.ca_file), timeout=settings.timeout_seconds)
            if settings.tls
            else ftplib.FTP(timeout=settings.timeout_seconds)  # noqa: S321 (what it serves)
        )
        with classified(FTP_FAILURES):
            try:
                self._ftp.connect(settings.host, settings.port)
                self._ftp.login(settings.username, password)  # FTPS: AUTH TLS first
                if isinstance(self._ftp, ftplib.FTP_TLS):
                    self._ftp.prot_p()  # the transfers too
                self._ftp.set_pasv(True)
                self._ftp.voidcmd("TYPE I")
            except BaseException:
                self.close()
                raise

    def files(self) -> list[Entry]:
        with classified(FTP_FAILURES):
            try:
                listing = list(self._ftp.mlsd(self._folder, facts=["type", "size", "modify"]))
            except ftplib.error_perm as error:
                if not str(error).startswith(NOT_IMPLEMENTED):
                    raise
                return self._files_without_mlsd()
        return [
            Entry(name, _size(facts.get("size")), _modified(facts.get("modify")))
            for name, facts in listing
            if facts.get("type") == "file"
        ]

    def read(self, name: str) -> bytes | None:
        received = io.BytesIO()
        limit = self._max_bytes

        def take(chunk: bytes) -> None:
            received.write(chunk)
            if received.tell() > limit:
                raise too_large(limit)

        with classified(FTP_FAILURES):
            try:
                self._ftp.retrbinary(f"RETR {remote_path(self._folder, name)}", take)
            except ftplib.error_perm as error:
                if str(error).startswith(NO_SUCH_FILE):
                    return None
                raise
        return received.getvalue()

    def stat(self, name: str) -> Entry | None:
        # As the folder lists it, so that it compares with what `files` gave.
        return next((entry for entry in self.files() if entry.name == name), None)

    def processed(self, name: str) -> bool:
        with classified(FTP_FAILURES):
            try:
                names = self._ftp.nlst(self._processed)
            except ftplib.error_perm as error:
                if str(error).startswith(NO_SUCH_FILE):
                    return False
                raise
        return name in {posixpath.basename(listed) for listed in names}

    def move(self, name: str, target: str) -> None:
        taken = self.processed(target)
        with classified(FTP_FAILURES):
            if not taken:
                # Each level of it (FTP's MKD makes one: "done/2026-12" failed to move
                # every file, 550, where SFTP and a local folder made both; a walkthrough).
                for level in _levels(self._processed):
                    with contextlib.suppress(ftplib.error_perm):  # it exists already
                        self._ftp.mkd(level)
            else:
                self._ftp.delete(remote_path(self._processed, target))  # moved here before
            self._ftp.rename(remote_path(self._folder, name), remote_path(self._processed, target))

    def delete(self, name: str) -> None:
        with classified(FTP_FAILURES):
            self._ftp.delete(remote_path(self._folder, name))

    def close(self) -> None:
        try:
            self._ftp.quit()
        except (ftplib.Error, OSError, EOFError, AttributeError):
            self._ftp.close()  # never connected, or the connection is gone

    def _files_without_mlsd(self) -> list[Entry]:
        entries = []
        listing = self._ftp.nlst(self._folder)
        self._ftp.voidcmd("TYPE I")  # NLST switched to ASCII, where servers refuse SIZE
        for listed in listing:
            name = posixpath.basename(listed)
            try:
                size = self._ftp.size(remote_path(self._folder, name))
            except ftplib.error_perm:
                continue  # a folder, or no longer there
            entries.append(Entry(name, size, None))
        return entries


class _ResumingFtpTls(ftplib.FTP_TLS):
    """FTP_TLS whose data connections resume the control connection's TLS session: the
    standard library's opens each with a new one, which vsftpd (by default) and other
    servers refuse with 522. Its own `ntransfercmd`, with the session handed on."""

    def ntransfercmd(
        self, cmd: str, rest: int | str | None = None
    ) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)  # noqa: S321 - then TLS
        if self._prot_p:  # type: ignore[attr-defined]
            conn = self.context.wrap_socket(
                conn,
                server_hostname=self.host,
                session=self.sock.session,  # type: ignore[union-attr]
            )
        return conn, size


def _trusting(ca_file: str | None) -> ssl.SSLContext:
    """A client context verifying the server's certificate and name."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise FetchFailed(f"tls_ca_unreadable: {ca_file}: {error}", retriable=False) from error


def _size(written: str | None) -> int | None:
    return int(written) if written and written.isdigit() else None


def _modified(written: str | None) -> float | None:
    """An MLSD time ("YYYYMMDDHHMMSS[.fff]", UTC) as a Unix time."""
    if not written:
        return None
    whole, _, fraction = written.partition(".")
    try:
        moment = datetime.strptime(whole, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return moment.timestamp() + (float(f"0.{fraction}") if fraction.isdigit() else 0.0)


def _levels(path: str) -> list[str]:
    """The folders of a remote path, outermost first: "a/b/c" -> "a", "a/b", "a/b/c" ("a/../b"
    is "b": no stray "a" made)."""
    parts = [part for part in posixpath.normpath(path).split("/") if part not in ("", ".")]
    root = "/" if path.startswith("/") else ""
    return [root + "/".join(parts[: n + 1]) for n in range(len(parts))]
