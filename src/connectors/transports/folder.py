"""Feed files picked up from a folder: a local drop folder, and, over the same logic, the
folders that `sftp` and `ftp` pull from.

A fetch yields every waiting file, oldest first (by modification time, then name): a
regular file whose name matches `pattern`, except hidden files and partial uploads
("*.part", "*.filepart"; `connectors.simulator.drop` writes ".<name>.<hex>.part" and
renames it when complete). The delivery id is the content's hash; with the file's name and
modification time, it names the file's arrival in the inbox (see
`connectors.scheduler.arrival_id`). `done()` moves the file
into the processed folder (creating it; when a file of that name is already there, the
content hash is added to the name: "stock.csv" -> "stock.<16 hex>.csv"), or deletes it;
so a later file of the same name is new again. A file rewritten since it was fetched is
left where it is, to be fetched anew.

Options of `connector["folder"]` (and those of `retry`):

- `path` (required): the folder suppliers drop files into.
- `format` (required): the files' format, one of `connectors.parsers.FORMATS`.
- `pattern` (default "*"): a glob the file names must match, case-sensitive ("*.csv").
- `done_action` (default "move"): "move" into the processed folder, or "delete".
- `processed_path` (default "processed"): the processed folder, relative to `path`
  unless absolute; on the same file system as `path`.
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import structlog
from pydantic import Field

from connectors.parsers import Format
from connectors.transports import Fetched, content_id
from connectors.transports.retry import Failure, FetchFailed, RetrySettings, classified

log = structlog.get_logger(__name__)

T = TypeVar("T")

PARTIAL_SUFFIXES = (".part", ".filepart")  # uploads still being written (ours, WinSCP's)


class FileSettings(RetrySettings):
    """The options of every transport that picks files up from a folder."""

    path: str = Field(min_length=1)
    format: Format
    pattern: str = "*"
    done_action: Literal["move", "delete"] = "move"
    processed_path: str = "processed"


class FolderSettings(FileSettings):
    """`connector["folder"]`: a local drop folder."""


@dataclass(frozen=True)
class Entry:
    """A file as a folder lists it; a rewritten file lists differently."""

    name: str
    size: int | None
    modified: float | None


class FolderSession(Protocol):
    """An open session on the folder of feed files and its processed folder."""

    def files(self) -> list[Entry]:
        """The regular files in the folder."""
        ...

    def read(self, name: str) -> bytes | None:
        """The file's content; None when it is gone."""
        ...

    def stat(self, name: str) -> Entry | None:
        """The file as the folder lists it now; None when it is gone."""
        ...

    def processed(self, name: str) -> bool:
        """Whether the processed folder holds a file of that name."""
        ...

    def move(self, name: str, target: str) -> None:
        """Moves the file into the processed folder (created if needed) as `target`,
        replacing a file of that name."""
        ...

    def delete(self, name: str) -> None: ...

    def close(self) -> None:
        """Ends the session; never raises."""
        ...


def waiting(name: str, pattern: str) -> bool:
    """Whether a file of that name is a complete feed file the transport should take."""
    hidden_or_partial = name.startswith(".") or name.endswith(PARTIAL_SUFFIXES)
    return not hidden_or_partial and fnmatchcase(name, pattern)


def remote_path(folder: str, name: str) -> str:
    """A path on a remote server: `name` inside `folder` ("." being the login's own)."""
    return name if folder in ("", ".") else posixpath.join(folder, name)


def processed_name(name: str, delivery_id: str) -> str:
    """The name a file takes in the processed folder when its own name is taken there."""
    digest = delivery_id.rpartition(":")[2][:16]
    stem, dot, extension = name.rpartition(".")
    return f"{stem}.{digest}.{extension}" if dot and stem else f"{name}.{digest}"


class FolderTransport:
    """Files picked up from a folder that `open_folder` opens a session on."""

    def __init__(
        self,
        supplier_id: str,
        settings: FileSettings,
        open_folder: Callable[[], FolderSession],
        *,
        source: str,
    ) -> None:
        self.settings = settings
        self.source = source
        self._open_folder = open_folder
        self._policy = settings.policy()
        self._log = log.bind(supplier=supplier_id, source=source)
        self._session: FolderSession | None = None
        self._fetching = False
        self._fetched: dict[str, tuple[Entry, str]] = {}  # name -> as listed, delivery id

    def fetch(self) -> Iterator[Fetched]:
        self._fetching = True
        try:
            entries = self._call(lambda folder: folder.files())
            pattern = self.settings.pattern
            for entry in sorted(entries, key=lambda e: (e.modified or 0.0, e.name)):
                if not waiting(entry.name, pattern):
                    continue
                body = self._read(entry.name)
                if body is None:
                    continue  # taken away since it was listed
                fetched = Fetched(
                    content_id(body),
                    body,
                    self.settings.format,
                    entry.name,
                    self.source,
                    modified=entry.modified,
                )
                self._fetched[entry.name] = (entry, fetched.delivery_id)
                yield fetched
        finally:
            self._fetching = False
            self._disconnect()

    def done(self, fetched: Fetched) -> None:
        """Moves (or deletes) the file, unless it changed since it was fetched; a file
        this transport did not fetch is left alone (a later fetch brings it back)."""
        name = fetched.name or ""
        entry, delivery_id = self._fetched.get(name, (None, None))
        if entry is None or delivery_id != fetched.delivery_id:
            self._log.warning("transport.done_unknown", name=name, delivery=fetched.delivery_id)
            return
        try:
            now = self._call(lambda folder: folder.stat(name))
            if now == entry and self.settings.done_action == "delete":
                self._call(lambda folder: folder.delete(name))
            elif now == entry:
                taken = self._call(lambda folder: folder.processed(name))
                target = processed_name(name, delivery_id) if taken else name
                self._call(lambda folder: folder.move(name, target))
            elif now is not None:
                self._log.warning("transport.file_changed_since_fetched", name=name)
            del self._fetched[name]
        finally:
            if not self._fetching:
                self._disconnect()

    def close(self) -> None:
        self._disconnect()

    def _read(self, name: str) -> bytes | None:
        return self._call(lambda folder: folder.read(name))

    def _call(self, operation: Callable[[FolderSession], T]) -> T:
        """Runs one operation under the retry policy, on a fresh session after a failure."""

        def attempt() -> T:
            if self._session is None:
                self._session = self._open_folder()
            try:
                return operation(self._session)
            except FetchFailed as failure:
                if failure.retriable:
                    self._disconnect()
                raise

        return self._policy.run(attempt)

    def _disconnect(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()


LOCAL_FAILURES = (
    Failure(FileNotFoundError, "not_found", retriable=False),
    Failure(PermissionError, "permission_denied", retriable=False),
    Failure(OSError, "io_error", retriable=True),
)


def local_folder(settings: FileSettings) -> Callable[[], FolderSession]:
    """Opens sessions on a local folder."""
    folder = Path(settings.path)
    return functools.partial(LocalFolder, folder, folder / settings.processed_path)


class LocalFolder:
    """A local folder; a session costs nothing."""

    def __init__(self, folder: Path, processed: Path) -> None:
        self.folder = folder
        self.processed_folder = processed

    def files(self) -> list[Entry]:
        with classified(LOCAL_FAILURES), os.scandir(self.folder) as listing:
            return [
                _entry(item.name, item.stat(follow_symlinks=False))
                for item in listing
                if item.is_file(follow_symlinks=False)
            ]

    def read(self, name: str) -> bytes | None:
        with classified(LOCAL_FAILURES):
            try:
                return (self.folder / name).read_bytes()
            except FileNotFoundError:
                return None

    def stat(self, name: str) -> Entry | None:
        with classified(LOCAL_FAILURES):
            try:
                return _entry(name, (self.folder / name).stat(follow_symlinks=False))
            except FileNotFoundError:
                return None

    def processed(self, name: str) -> bool:
        with classified(LOCAL_FAILURES):
            return (self.processed_folder / name).exists()

    def move(self, name: str, target: str) -> None:
        with classified(LOCAL_FAILURES):
            self.processed_folder.mkdir(parents=True, exist_ok=True)
            os.replace(self.folder / name, self.processed_folder / target)

    def delete(self, name: str) -> None:
        with classified(LOCAL_FAILURES):
            (self.folder / name).unlink()

    def close(self) -> None:
        """Nothing to close."""


def _entry(name: str, status: os.stat_result) -> Entry:
    return Entry(name, status.st_size, status.st_mtime)
