"""Running uvicorn for `ledger serve`: as `uvicorn.run` does, with the port listened on as
soon as it is bound when several workers share it.

With several workers uvicorn binds the port in the parent process and each worker listens
on it once it has started, a second or more later. Another process could bind the same
port meanwhile (with SO_REUSEADDR, as servers do) and listen on it first. Each worker's
listen then failed inside uvloop, which kept it quiet (`create_server` returned a server
with no socket; asyncio raises EADDRINUSE), and `serve` ran on without listening and
without a word in its log. Listened on where it is bound, the port can be neither bound nor
listened on by another socket, and the workers' own listen only takes it up again; where
another socket listened on it first, `serve` stops with the error, as one worker does.
Connections made before the workers are up wait in the backlog instead of being refused.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

log = logging.getLogger("uvicorn.error")


class ListeningConfig(uvicorn.Config):
    """uvicorn's configuration, whose socket for several workers listens once bound."""

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        try:
            sock.listen(self.backlog)
        except OSError as error:  # another socket listened on the port just before
            log.error(error)
            sock.close()
            sys.exit(STARTUP_FAILURE)
        return sock


def bind(app: str, **settings: Any) -> tuple[ListeningConfig, socket.socket]:
    """uvicorn's configuration for an app given by its import string, without reloading
    (which `serve` does not offer), and its port, bound and listened on now: a port that
    is taken stops `serve` before it migrates or starts anything (with one worker, it
    migrated and started its sweeper, projections and connectors first: an operator's
    walkthrough). Connections made meanwhile wait in the backlog."""
    config = ListeningConfig(app, **settings)
    if config.reload:
        raise ValueError("serving.bind does not reload")
    return config, config.bind_socket()


def run(config: ListeningConfig, sock: socket.socket) -> None:
    """`uvicorn.run` on the socket `bind` gave."""
    if config.workers == 1:
        config.load_app()  # an app that cannot be imported stops it here, as uvicorn.run
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            Multiprocess(config, sockets=[sock]).run()
        else:
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if config.workers == 1 and not server.started:
        sys.exit(STARTUP_FAILURE)
