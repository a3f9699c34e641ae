"""SFTP pull: feed files taken from a folder on a supplier's SFTP server.

The folder logic is `folder.FolderTransport`'s; this module is the session, an asyncssh
client run synchronously on an event loop of its own, so it must be used from a thread
with no running event loop. A session lasts one fetch (its `done()` calls included, when
they come while the fetch is read); a `done()` after it opens one of its own. The login
is by the private key and/or the password the settings name, nothing else: no ssh-agent,
no keys or configuration from ~/.ssh.

Options of `connector["sftp"]` (those of "folder" but `path`, and those of `retry`):

- `host` (required) and `port` (default 22).
- `username` (required), and `private_key_ref` or `password_ref` (one at least): where
  the private key (OpenSSH or PEM text) or the password lives ("env:NAME" or
  "file:PATH"). An encrypted key also needs `private_key_passphrase_ref`. With both,
  the key is offered first and the password if the server refuses it.
- `known_hosts` (required, may be null): the path of a known_hosts file holding the
  server's host key. Null accepts any host key, which is for tests and demos only:
  production must pin the key, or a man in the middle can serve the feeds.
- `path` (default "."): the remote folder ("." is the login's own).
- `format`, `pattern`, `done_action`, `processed_path`: as for "folder"; `processed_path`
  (default "processed") is relative to `path` unless absolute.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import asyncssh
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

T = TypeVar("T")

# A download is read a block at a time, each block within `timeout_seconds` (asyncssh
# asks for it in parallel requests of 16 KiB): a line slower than a block a timeout (4 KiB/s
# at the default 30 s) fails the pull; a block costs a round trip.
BLOCK_BYTES = 128 * 1024

SFTP_FAILURES = (
    Failure(asyncssh.PermissionDenied, "auth_failed", retriable=False),
    Failure(asyncssh.HostKeyNotVerifiable, "host_key_not_verifiable", retriable=False),
    Failure(asyncssh.SFTPNoSuchFile, "not_found", retriable=False),
    Failure(asyncssh.SFTPPermissionDenied, "permission_denied", retriable=False),
    Failure(asyncssh.SFTPError, "sftp_error", retriable=True),
    Failure(asyncssh.Error, "ssh_error", retriable=True),  # a lost or closed connection
    Failure(TimeoutError, "timeout", retriable=True),
    Failure(OSError, "connection_error", retriable=True),
)


class SftpSettings(FileSettings):
    """`connector["sftp"]`: files pulled from an SFTP server."""

    host: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    username: str = Field(min_length=1)
    password_ref: str | None = None
    private_key_ref: str | None = None
    private_key_passphrase_ref: str | None = None
    known_hosts: str | None
    path: str = "."

    @model_validator(mode="after")
    def _a_login(self) -> SftpSettings:
        if self.password_ref is None and self.private_key_ref is None:
            raise ValueError("an SFTP login needs private_key_ref or password_ref")
        if self.private_key_passphrase_ref is not None and self.private_key_ref is None:
            raise ValueError("private_key_passphrase_ref without private_key_ref")
        return self


@dataclass(frozen=True)
class Login:
    """What a session logs in with: a private key, a password, or both."""

    password: str | None = None
    key: asyncssh.SSHKey | None = None


def sftp_folder(settings: SftpSettings) -> Callable[[], FolderSession]:
    """Opens sessions on the remote folder, reading the secrets at each (so a rotated key
    or password is used from the next session on)."""

    def open_folder() -> SftpFolder:
        known_hosts = _known_hosts(settings.known_hosts)
        return SftpFolder(settings, _login(settings), known_hosts)

    return open_folder


def _login(settings: SftpSettings) -> Login:
    password = None if settings.password_ref is None else read_secret(settings.password_ref)
    if settings.private_key_ref is None:
        return Login(password)
    passphrase = (
        None
        if settings.private_key_passphrase_ref is None
        else read_secret(settings.private_key_passphrase_ref, sent=False)
    )
    text = read_secret(settings.private_key_ref, sent=False)  # a key file: several lines
    try:
        key = asyncssh.import_private_key(text, passphrase)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as error:
        # Not the key text itself: the reason lands in feed health and the logs.
        raise FetchFailed(
            f"private_key_unreadable: {settings.private_key_ref}: {type(error).__name__}",
            retriable=False,
        ) from error
    return Login(password, key)


class SftpFolder:
    """One SFTP session on the remote folder."""

    def __init__(
        self,
        settings: SftpSettings,
        login: Login,
        known_hosts: asyncssh.SSHKnownHosts | None,
    ) -> None:
        self.settings = settings
        self._folder = settings.path
        self._processed = remote_path(settings.path, settings.processed_path)
        self._loop = asyncio.new_event_loop()
        try:
            self._connection = self._run(
                asyncssh.connect(
                    settings.host,
                    settings.port,
                    username=settings.username,
                    password=login.password,
                    known_hosts=known_hosts,
                    client_keys=None if login.key is None else [login.key],
                    agent_path=None,
                    config=None,
                    connect_timeout=settings.timeout_seconds,
                )
            )
        except BaseException:
            self._loop.close()
            raise
        try:
            # A name that is not UTF-8 is listed with its bytes escaped, for the transport
            # to pass over (see `FolderTransport._refusal`): it failed the whole listing.
            self._sftp = self._run(
                self._connection.start_sftp_client(path_errors="surrogateescape")
            )
        except BaseException:
            self.close()
            raise

    def files(self) -> list[Entry]:
        names = self._run(self._sftp.readdir(self._folder))
        return [
            Entry(os.fsdecode(name.filename), name.attrs.size, name.attrs.mtime)
            for name in names
            if name.attrs.type == asyncssh.FILEXFER_TYPE_REGULAR
        ]

    def read(self, name: str) -> bytes | None:
        """The file's content, read a block at a time, each within `timeout_seconds`: one
        deadline for the whole file failed every pull of a file that took longer, and the
        files behind it waited (a walkthrough: 329 KB at 32 KB/s under a 5 s timeout,
        downloaded for 5 s and dropped at each fetch)."""
        path = remote_path(self._folder, name)
        remote = self._run(_gone_as_none(self._sftp.open(path, "rb")))
        if remote is None:
            return None
        limit = self.settings.max_file_bytes
        blocks: list[bytes] = []
        size = 0
        try:
            while True:
                block = cast(bytes, self._run(remote.read(BLOCK_BYTES)))  # opened "rb"
                if not block:
                    return b"".join(blocks)
                size += len(block)
                if size > limit:
                    raise too_large(limit)
                blocks.append(block)
        finally:
            with contextlib.suppress(Exception):
                self._run(remote.close())

    def stat(self, name: str) -> Entry | None:
        attrs = self._run(_gone_as_none(self._sftp.lstat(remote_path(self._folder, name))))
        if attrs is None or attrs.type != asyncssh.FILEXFER_TYPE_REGULAR:
            return None
        return Entry(name, attrs.size, attrs.mtime)

    def processed(self, name: str) -> bool:
        return bool(self._run(self._sftp.exists(remote_path(self._processed, name))))

    def move(self, name: str, target: str) -> None:
        self._run(self._move(remote_path(self._folder, name), remote_path(self._processed, target)))

    def delete(self, name: str) -> None:
        self._run(self._sftp.remove(remote_path(self._folder, name)))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._connection.close()
            self._run(self._connection.wait_closed())
        self._loop.close()

    async def _move(self, source: str, target: str) -> None:
        await self._sftp.makedirs(self._processed, exist_ok=True)
        if await self._sftp.exists(target):
            await self._sftp.remove(target)  # the same content, moved here before
        await self._sftp.rename(source, target)

    def _run(self, operation: Awaitable[T], timeout: float | None = None) -> T:
        """Runs one operation on the session's loop, within the timeout (by default the
        settings')."""
        timeout = self.settings.timeout_seconds if timeout is None else timeout
        with classified(SFTP_FAILURES):
            return self._loop.run_until_complete(asyncio.wait_for(operation, timeout))


async def _gone_as_none(operation: Awaitable[T]) -> T | None:
    try:
        return await operation
    except asyncssh.SFTPNoSuchFile:
        return None


def _known_hosts(path: str | None) -> asyncssh.SSHKnownHosts | None:
    if path is None:
        return None
    try:
        return asyncssh.read_known_hosts(path)
    except OSError as error:
        raise FetchFailed(
            f"known_hosts_unreadable: {path}: {error.strerror}", retriable=False
        ) from error
    except ValueError as error:
        # Not its words: asyncssh quotes the line it could not read, and any file's first
        # line reached feed health and the log (a security review).
        raise FetchFailed(
            f"known_hosts_unreadable: {path}: not a known_hosts file", retriable=False
        ) from error
