"""An FTP server (pyftpdlib) over one folder, for suppliers whose feeds the ledger pulls.

It listens on 127.0.0.1 with a password login, passive mode on ephemeral ports, and
runs its own I/O loop in a background thread, so synchronous code starts and stops it.
With `tls`, it is an FTPS server (explicit: AUTH TLS), requiring TLS for the login and
every transfer, with a fresh self-signed certificate for 127.0.0.1 (`certificate`, for
the client to trust). With `require_session_reuse` too, it refuses a data connection
whose TLS session is not the control connection's, resumed, as vsftpd does by default
(`require_ssl_reuse=YES`): the answer it gives then is vsftpd's own, 522. `permissions`
are the account's rights in pyftpdlib's letters: `READ_ONLY` for a supplier whose account
may take its files but not move them aside.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import tempfile
import threading
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

with warnings.catch_warnings():
    # On Python 3.11 pyftpdlib runs on the standard library's asyncore and asynchat,
    # deprecated there (it brings its own copies on 3.12+): nothing for us to act on.
    warnings.simplefilter("ignore", DeprecationWarning)
    from pyftpdlib.authorizers import DummyAuthorizer  # type: ignore[import-untyped]
    from pyftpdlib.handlers import (  # type: ignore[import-untyped]
        FTPHandler,
        TLS_DTPHandler,
        TLS_FTPHandler,
    )
    from pyftpdlib.ioloop import IOLoop  # type: ignore[import-untyped]
    from pyftpdlib.servers import FTPServer  # type: ignore[import-untyped]

HOST = "127.0.0.1"
POLL_SECONDS = 0.05
WAIT_SECONDS = 10.0
AUTH_FAILED_SECONDS = 0.1  # pyftpdlib's 3 s slows brute force; a local simulator has none
PERMISSIONS = "elradfmw"  # list, read, write, rename, delete: what a supplier's drop box allows
READ_ONLY = "elr"  # list and read: an account that may take files but never move them aside


class FtpSupplier:
    """An FTP server over `root`; `start()` it, or use it as a context manager."""

    def __init__(
        self,
        root: str | Path,
        *,
        username: str,
        password: str,
        tls: bool = False,
        require_session_reuse: bool = False,
        port: int = 0,
        permissions: str = PERMISSIONS,
    ) -> None:
        if require_session_reuse and not tls:
            raise ValueError("session reuse is a TLS requirement: set tls too")
        self.root = Path(root)
        self.username = username
        self.password = password
        self.tls = tls
        self.require_session_reuse = require_session_reuse
        self.permissions = permissions  # pyftpdlib's letters, e.g. READ_ONLY
        self.host = HOST
        self._tls_files: Path | None = None
        self._requested_port = port
        self._server: Any = None  # pyftpdlib is untyped
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not running")
        return int(self._server.address[1])

    @property
    def certificate(self) -> str:
        """The server's certificate (PEM), for a client to trust; FTPS servers only."""
        if self._tls_files is None:
            raise RuntimeError("the server is not running with TLS")
        return (self._tls_files / "certificate.pem").read_text()

    def start(self) -> FtpSupplier:
        if self._server is not None:
            raise RuntimeError("the server is already running")
        if not self.root.is_dir():
            raise FileNotFoundError(f"no folder {self.root}")
        _leave_logging_to_the_application()
        authorizer = DummyAuthorizer()
        authorizer.add_user(self.username, self.password, str(self.root), perm=self.permissions)
        # A handler class of its own, so two servers never share an authorizer.
        settings: dict[str, Any] = {
            "authorizer": authorizer,
            "banner": "Stockledger simulated supplier",
            "auth_failed_timeout": AUTH_FAILED_SECONDS,
        }
        if self.tls:
            self._tls_files = Path(tempfile.mkdtemp(prefix="simulator-ftps-"))
            _self_signed(self._tls_files, self.host)
            settings |= {
                "certfile": str(self._tls_files / "certificate.pem"),
                "keyfile": str(self._tls_files / "key.pem"),
                "tls_control_required": True,
                "tls_data_required": True,
            }
            if self.require_session_reuse:
                settings["dtp_handler"] = _SessionReusingDTPHandler
        handler = type(
            "SupplierFtpHandler", (TLS_FTPHandler if self.tls else FTPHandler,), settings
        )
        # An I/O loop of its own too: pyftpdlib's default is one per process.
        self._server = FTPServer((self.host, self._requested_port), handler, ioloop=IOLoop())
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="simulator-ftp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open session."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(WAIT_SECONDS)
        self._server = self._thread = None
        if self._tls_files is not None:
            shutil.rmtree(self._tls_files, ignore_errors=True)
            self._tls_files = None

    def __enter__(self) -> FtpSupplier:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _serve(self) -> None:
        # The server's own loop, polled until stopped: `serve_forever` would log that the
        # server starts at every poll (pyftpdlib 2.2 does, whatever its arguments), twenty
        # lines a second in the demo's log.
        server = self._server
        try:
            while not self._stopping.is_set():
                server.ioloop.loop(POLL_SECONDS, blocking=False)
        finally:
            server.close_all()


def _self_signed(folder: Path, host: str) -> None:
    """A key and a self-signed certificate for `host` (an IP address), a day long."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "certificate.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class _SessionReusingDTPHandler(TLS_DTPHandler):  # type: ignore[misc]
    """A data connection that must resume the control connection's TLS session."""

    def handle_ssl_established(self) -> None:
        # pyOpenSSL has no public SSL_session_reused; its binding of OpenSSL does.
        if not SSL._lib.SSL_session_reused(self.socket._ssl):  # type: ignore[attr-defined]
            self.cmd_channel.respond("522 SSL connection failed: session reuse required")
            self.close()
            return
        super().handle_ssl_established()


def _leave_logging_to_the_application() -> None:
    """Keep pyftpdlib from configuring logging itself, which it does when none is set up."""
    logger = logging.getLogger("pyftpdlib")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
