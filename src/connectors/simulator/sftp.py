"""An SFTP server (asyncssh) over one folder, for suppliers whose feeds the ledger pulls.

It listens on 127.0.0.1 with a fresh Ed25519 host key and logs its one user in by
password, by public key, or either, as it is set up. It runs its own event loop in a
background thread, so synchronous code starts and stops it. Clients see the folder as
"/" and may read, write, rename and delete in it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Coroutine, Iterable
from hmac import compare_digest
from pathlib import Path
from typing import TypeVar

import asyncssh

T = TypeVar("T")

HOST = "127.0.0.1"
WAIT_SECONDS = 10.0


class SftpSupplier:
    """An SFTP server over `root`; `start()` it, or use it as a context manager."""

    def __init__(
        self,
        root: str | Path,
        *,
        username: str,
        password: str | None = None,
        authorized_keys: Iterable[str] = (),
        port: int = 0,
        bytes_per_second: float | None = None,
    ) -> None:
        """`authorized_keys`: public keys (OpenSSH format, "ssh-ed25519 AAAA…") the user
        may log in with; `password`: the password it may log in with; `bytes_per_second`:
        how fast a session serves what it reads (a slow line), unlimited by default."""
        self.bytes_per_second = bytes_per_second
        self.root = Path(root)
        self.username = username
        self.password = password
        self.authorized_keys = frozenset(_public(key) for key in authorized_keys)
        if password is None and not self.authorized_keys:
            raise ValueError("the user needs a password or an authorized key")
        self.host = HOST
        self._requested_port = port
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()

    @property
    def port(self) -> int:
        if self._acceptor is None:
            raise RuntimeError("the server is not running")
        return self._acceptor.get_port()

    @property
    def host_key(self) -> str:
        """The server's public host key, OpenSSH format ("ssh-ed25519 AAAA…")."""
        return self._host_key.export_public_key().decode().strip()

    @property
    def known_hosts(self) -> str:
        """A known_hosts line for this server, e.g. for `asyncssh.import_known_hosts`."""
        return f"[{self.host}]:{self.port} {self.host_key}"

    def start(self) -> SftpSupplier:
        if self._loop is not None:
            raise RuntimeError("the server is already running")
        if not self.root.is_dir():
            raise FileNotFoundError(f"no folder {self.root}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="simulator-sftp", daemon=True
        )
        self._thread.start()
        try:
            self._acceptor = self._run(self._listen())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every open session, then the event loop."""
        if self._loop is None:
            return
        if self._acceptor is not None:
            self._run(self._close(self._acceptor))
            self._acceptor = None
        self._stop_loop()

    def __enter__(self) -> SftpSupplier:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def _listen(self) -> asyncssh.SSHAcceptor:
        return await asyncssh.listen(
            self.host,
            self._requested_port,
            server_host_keys=[self._host_key],
            server_factory=functools.partial(
                _LoginServer,
                self._connections,
                self.username,
                self.password,
                self.authorized_keys,
            ),
            sftp_factory=functools.partial(
                _SlowLine, chroot=os.fsencode(self.root), bytes_per_second=self.bytes_per_second
            ),
            allow_scp=False,
        )

    async def _close(self, acceptor: asyncssh.SSHAcceptor) -> None:
        acceptor.close()
        for connection in list(self._connections):
            connection.close()
            await connection.wait_closed()
        await acceptor.wait_closed()

    def _run(self, coroutine: Coroutine[object, object, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(WAIT_SECONDS)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_SECONDS)
        loop.close()
        self._loop = self._thread = None


def client_key() -> tuple[str, str]:
    """A new Ed25519 key pair for a supplier's SFTP login: the private key (OpenSSH text,
    for a secret) and its public key (for `authorized_keys`)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key.export_private_key().decode(), key.export_public_key().decode().strip()


def _public(key: str) -> bytes:
    """A public key's wire form, whatever its comment."""
    return asyncssh.import_public_key(key).public_data


class _LoginServer(asyncssh.SSHServer):
    """One connection's login: the supplier's user name with its password or one of its
    authorized keys, nothing else."""

    def __init__(
        self,
        connections: set[asyncssh.SSHServerConnection],
        username: str,
        password: str | None,
        authorized_keys: frozenset[bytes],
    ) -> None:
        self._connections = connections
        self._username = username.encode()
        self._password = None if password is None else password.encode()
        self._authorized_keys = authorized_keys
        self._connection: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._connection = conn
        self._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._connection is not None:
            self._connections.discard(self._connection)

    def begin_auth(self, username: str) -> bool:
        return True  # every user must authenticate

    def password_auth_supported(self) -> bool:
        return self._password is not None

    def validate_password(self, username: str, password: str) -> bool:
        if self._password is None:
            return False
        user_matches = compare_digest(username.encode(), self._username)
        return compare_digest(password.encode(), self._password) and user_matches

    def public_key_auth_supported(self) -> bool:
        return bool(self._authorized_keys)

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        user_matches = compare_digest(username.encode(), self._username)
        return user_matches and key.public_data in self._authorized_keys


class _SlowLine(asyncssh.SFTPServer):
    """An SFTP session that serves reads no faster than `bytes_per_second` (one at a time:
    a client asks for many blocks at once)."""

    def __init__(
        self,
        chan: asyncssh.SSHServerChannel[bytes],
        chroot: bytes,
        bytes_per_second: float | None,
    ) -> None:
        super().__init__(chan, chroot=chroot)
        self._rate = bytes_per_second
        self._line = asyncio.Lock()

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        data = super().read(file_obj, offset, size)  # a local file's: read at once
        assert isinstance(data, bytes)
        if self._rate is not None:
            async with self._line:
                await asyncio.sleep(len(data) / self._rate)
        return data
