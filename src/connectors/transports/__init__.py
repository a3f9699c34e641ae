"""Supplier transports: how a supplier's deliveries are fetched, apart from how they are parsed.

A transport fetches what is new since its last successful fetch, as `Fetched` bodies for
the inbox, and is told with `done()` once the inbox holds one durably; only then does it
mark it processed (save the feed's ETag, move the file away). A file fetched again before
it was moved away (a crash in between, a move that failed) is recognised by the inbox and
skipped: the scheduler names a file's delivery by its content, its name and its
modification time as listed (`connectors.scheduler.arrival_id`).

`transport_for` builds the one a supplier's `connector` settings ask for, under one of
these keys (each module's docstring lists its options; `retry` lists those they share):

- "poll":   a REST API polled page by page (`rest`),
- "folder": a watched drop folder (`folder`),
- "sftp":   files pulled over SFTP (`sftp`),
- "ftp":    files pulled over FTP (`ftp`).

Secrets are named by reference ("env:NAME" or "file:PATH", see `connectors.secrets`) and
read at each fetch. A `CircuitBreaker` per supplier guards whole fetches. One round of a
scheduler for one supplier, then:

    with contextlib.closing(breaker.guard(transport.fetch)) as deliveries:
        for fetched in deliveries:      # raises FetchFailed (CircuitOpen: not attempted)
            ...                         # enqueue in the inbox and commit, then:
            transport.done(fetched)

A transport serves one fetch at a time; it is not shared between threads.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from connectors import secrets
from connectors.transports.breaker import BreakerState, CircuitBreaker, CircuitOpen
from connectors.transports.retry import FetchFailed

__all__ = [
    "TRANSPORTS",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpen",
    "FetchFailed",
    "Fetched",
    "StateStore",
    "Transport",
    "content_id",
    "read_secret",
    "transport_for",
]

TRANSPORTS = ("poll", "folder", "sftp", "ftp")

S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class Fetched:
    """One delivery fetched from a supplier, ready for the inbox."""

    delivery_id: str  # the supplier's own id if it has one, else content_id(body)
    body: bytes
    format: str  # one of connectors.parsers.FORMATS
    name: str | None  # file name or page URL, for operators
    source: str  # "poll", "folder", "sftp" or "ftp"
    # A file's modification time as the folder listed it (seconds since the epoch): what
    # tells one upload of a file from the next. None for a poll page, or where the
    # server lists none.
    modified: float | None = None


class Transport(Protocol):
    def fetch(self) -> Iterator[Fetched]:
        """What is new since the last successful fetch; raises FetchFailed."""
        ...

    def done(self, fetched: Fetched) -> None:
        """Marks a fetched delivery processed, once the inbox has stored it durably."""
        ...

    @property
    def refused(self) -> dict[str, str]:
        """What the last fetch passed over and left where it is, and why (files that
        cannot be taken): by name."""
        ...

    # How long a REST poll's validators are used after a full poll (see `RestPoller`);
    # other transports keep none.
    refresh_seconds: float | None

    def close(self) -> None: ...


class StateStore(Protocol):
    """Durable state of one supplier's transport (e.g. the ETag of its last complete poll)."""

    def get(self, name: str) -> Any: ...

    def set(self, name: str, value: Any) -> None: ...


def content_id(body: bytes) -> str:
    """The delivery id of a body that comes without one: a prefix of its SHA-256."""
    return "sha256:" + hashlib.sha256(body).hexdigest()[:32]


def read_secret(reference: str, *, sent: bool = True) -> str:
    """The secret a reference names, read now; a fatal FetchFailed when it is unavailable.
    `sent`: it goes to the supplier's server (a token, a password; see secrets.resolve)."""
    try:
        return secrets.resolve(reference, sent=sent)
    except secrets.SecretUnavailable as error:
        raise FetchFailed(f"secret_unavailable: {error}", retriable=False) from error


def transport_for(
    supplier_id: str,
    connector: Mapping[str, Any],
    *,
    state: StateStore,
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
    strict: bool = False,
    refresh_seconds: float | None = None,
) -> Transport | None:
    """The transport a supplier's connector settings ask for, or None when they name none.
    `sleep` waits between retries (a scheduler's cuts them short when it stops).

    Raises ValueError("bad_option: …") for settings that name two transports or are
    invalid. `client` serves REST polling; without one, a client of the transport's own
    is built (and closed with it). `strict`: numbers must be JSON numbers, whole where a
    count (as settings are checked when saved); without it, settings saved before that
    check (`"port": 22.0`) still run. `refresh_seconds`: how long a REST poll's validators
    are used after a poll that fetched every page (see `RestPoller`).
    """
    # Imported here, not above: the transport modules import this module's contract.
    from connectors.transports.folder import FolderSettings, FolderTransport, local_folder
    from connectors.transports.ftp import FtpSettings, ftp_folder
    from connectors.transports.rest import PollSettings, RestPoller, default_client
    from connectors.transports.sftp import SftpSettings, sftp_folder

    named = [key for key in TRANSPORTS if connector.get(key) is not None]
    if not named:
        return None
    if len(named) > 1:
        raise ValueError(f"bad_option: a connector uses one transport, not {' and '.join(named)}")
    [kind] = named
    given = connector[kind]
    if isinstance(given, dict) and "format" not in given and connector.get("format") is not None:
        # What it fetches is read as the supplier's format: a poll that paginates as JSON
        # pages a CSV supplier was saved, then every page was refused, and a folder
        # supplier whose format was given once, as the supplier's, could not be saved
        # (two walkthroughs).
        given = {**given, "format": connector["format"]}
    if kind == "poll":
        poll = _settings(PollSettings, kind, given, strict)
        return RestPoller(
            supplier_id,
            poll,
            state=state,
            client=client or default_client(poll),
            owns_client=client is None,
            sleep=sleep,
            reading=_digest({k: v for k, v in connector.items() if k not in NOT_READING}),
            refresh_seconds=refresh_seconds,
        )
    if kind == "folder":
        folder = _settings(FolderSettings, kind, given, strict)
        return FolderTransport(
            supplier_id, folder, local_folder(folder), source="folder", sleep=sleep
        )
    if kind == "sftp":
        sftp = _settings(SftpSettings, kind, given, strict)
        return FolderTransport(supplier_id, sftp, sftp_folder(sftp), source="sftp", sleep=sleep)
    ftp = _settings(FtpSettings, kind, given, strict)
    return FolderTransport(supplier_id, ftp, ftp_folder(ftp), source="ftp", sleep=sleep)


def delivery_format(named: str | None, connector: Mapping[str, Any]) -> str | None:
    """The format a delivery (an upload, a file given to `ledger ingest`) is read in: the
    one it names, else its supplier's, in any case (`CSV` was refused as no format).

    The supplier's is its connector's `format`, else its transport's (a folder's files, a
    poll's pages), as the settings say it; None where neither does. A webhook's is its
    own (`webhook.format`)."""
    if named:
        return named.lower()
    given = connector.get("format")
    if isinstance(given, str):
        return given.lower()
    for kind in TRANSPORTS:
        own = connector.get(kind)
        its = own.get("format") if isinstance(own, dict) else None
        if isinstance(its, str):
            return its.lower()
    return None


# A connector's settings that say when it runs, not how what it fetches is read.
NOT_READING = frozenset({"schedule", "breaker"})


def _digest(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _settings(model: type[S], kind: str, given: Any, strict: bool) -> S:
    try:
        return model.model_validate(given, strict=strict)
    except ValidationError as error:
        problems = "; ".join(
            ".".join([kind, *(str(part) for part in problem["loc"])]) + f": {problem['msg']}"
            for problem in error.errors()
        )
        raise ValueError(f"bad_option: {problems}") from error
