"""An FTP server (pyftpdlib) over one folder, for suppliers whose feeds the ledger pulls.

It listens on 127.0.0.1 with a password login, passive mode on ephemeral ports, and
runs its own I/O loop in a background thread, so synchronous code starts and stops it.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    # On Python 3.11 pyftpdlib runs on the standard library's asyncore and asynchat,
    # deprecated there (it brings its own copies on 3.12+): nothing for us to act on.
    warnings.simplefilter("ignore", DeprecationWarning)
    from pyftpdlib.authorizers import DummyAuthorizer  # type: ignore[import-untyped]
    from pyftpdlib.handlers import FTPHandler  # type: ignore[import-untyped]
    from pyftpdlib.ioloop import IOLoop  # type: ignore[import-untyped]
    from pyftpdlib.servers import FTPServer  # type: ignore[import-untyped]

HOST = "127.0.0.1"
POLL_SECONDS = 0.05
WAIT_SECONDS = 10.0
AUTH_FAILED_SECONDS = 0.1  # pyftpdlib's 3 s slows brute force; a local simulator has none
PERMISSIONS = "elradfmw"  # list, read, write, rename, delete: what a supplier's drop box allows


class FtpSupplier:
    """An FTP server over `root`; `start()` it, or use it as a context manager."""

    def __init__(self, root: str | Path, *, username: str, password: str, port: int = 0) -> None:
        self.root = Path(root)
        self.username = username
        self.password = password
        self.host = HOST
        self._requested_port = port
        self._server: Any = None  # pyftpdlib is untyped
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not running")
        return int(self._server.address[1])

    def start(self) -> FtpSupplier:
        if self._server is not None:
            raise RuntimeError("the server is already running")
        if not self.root.is_dir():
            raise FileNotFoundError(f"no folder {self.root}")
        _leave_logging_to_the_application()
        authorizer = DummyAuthorizer()
        authorizer.add_user(self.username, self.password, str(self.root), perm=PERMISSIONS)
        # A handler class of its own, so two servers never share an authorizer.
        handler = type(
            "SupplierFtpHandler",
            (FTPHandler,),
            {
                "authorizer": authorizer,
                "banner": "Stockledger simulated supplier",
                "auth_failed_timeout": AUTH_FAILED_SECONDS,
            },
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

    def __enter__(self) -> FtpSupplier:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _serve(self) -> None:
        server = self._server
        try:
            while not self._stopping.is_set():
                server.serve_forever(timeout=POLL_SECONDS, blocking=False, handle_exit=False)
        finally:
            server.close_all()


def _leave_logging_to_the_application() -> None:
    """Keep pyftpdlib from configuring logging itself, which it does when none is set up."""
    logger = logging.getLogger("pyftpdlib")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
