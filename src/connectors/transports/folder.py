"""Feed files picked up from a folder: a local drop folder, and, over the same logic, the
folders that `sftp` and `ftp` pull from.

A fetch yields every waiting file, oldest first (by modification time, then name): a
regular file whose name matches `pattern`, except hidden files and partial uploads
("*.part", "*.filepart"; `connectors.simulator.drop` writes ".<name>.<hex>.part" and
renames it when complete), and files that may still be being written under their final
name (a copy, an SMB or SFTP client that writes in place): a file is taken once it was
last modified `settle_seconds` ago by this machine's clock, or, where its server's clock
runs ahead or lists no times, once it has listed the same (size and time) for that long
across fetches; and a file whose content is not as long as it listed is left for a later
fetch. A file left so is taken at a later fetch (the supplier's next interval). The
delivery id is the content's hash; with the file's name and modification time, it names
the file's arrival in the inbox (see `connectors.scheduler.arrival_id`). `done()` moves
the file into the processed folder (creating it; when a file of that name is already
there, the content hash is added to the name: "stock.csv" -> "stock.<16 hex>.csv"), or
deletes it; so a later file of the same name is new again. A file rewritten since it was
fetched is left where it is, to be fetched anew.

Options of `connector["folder"]` (and those of `retry`):

- `path` (required): the folder suppliers drop files into.
- `format` (required): the files' format, one of `connectors.parsers.FORMATS`.
- `pattern` (default "*"): a glob the file names must match, case-sensitive ("*.csv").
- `done_action` (default "move"): "move" into the processed folder, or "delete".
- `processed_path` (default "processed"): the processed folder, relative to `path`
  unless absolute; on the same file system as `path`.
- `settle_seconds` (default 2, at most 3600): how long a file must have been left alone
  before it is taken (0: as soon as it is listed, for suppliers that only ever rename
  complete files into place).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import structlog
from pydantic import Field, model_validator

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
    settle_seconds: float = Field(default=2.0, ge=0, le=3600)
    # A file past this is refused (`file_too_large`), never read whole: a supplier's
    # server could serve one without end. An inbox row holds at most 1 GB.
    max_file_bytes: int = Field(default=512 * 2**20, ge=1, le=2**30)

    @model_validator(mode="after")
    def _processed_elsewhere(self) -> FileSettings:
        # "." or "" moved each file within the folder under a new name, a new arrival at
        # the next fetch: one file applied 11 times in 45 s (a walkthrough).
        if self.done_action == "move":
            folder = posixpath.normpath(self.path)
            processed = posixpath.normpath(posixpath.join(self.path, self.processed_path))
            if processed == folder:
                raise ValueError("processed_path must name a folder other than path itself")
        return self


def too_large(limit: int) -> FetchFailed:
    return FetchFailed(f"file_too_large: over {limit} bytes", retriable=False)


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


# The longest file name most file systems (and SFTP and FTP servers on them) take, in bytes.
MAX_NAME_BYTES = 255


def processed_name(name: str, delivery_id: str) -> str:
    """The name a file takes in the processed folder when its own name is taken there;
    cut short, before the digest, where it would pass MAX_NAME_BYTES (a 250-byte name
    could never be moved aside: `File name too long` at every fetch, a walkthrough)."""
    digest = delivery_id.rpartition(":")[2][:16]
    stem, dot, extension = name.rpartition(".")
    if not (dot and stem) or len(extension.encode()) > MAX_NAME_BYTES // 2:
        stem, suffix = name, f".{digest}"
    else:
        suffix = f".{digest}.{extension}"
    room = MAX_NAME_BYTES - len(suffix.encode())
    return _cut(stem, room) + suffix


def _cut(text: str, size: int) -> str:
    """`text`, at most `size` bytes of it in UTF-8, whole characters only."""
    return text.encode()[:size].decode("utf-8", "ignore")


def _latest(modified: float) -> float:
    """The latest moment a listed modification time may stand for: SFTP and FTP list
    whole seconds, so a file written at x.95 s lists as x, and was taken up to a second
    before it had been left alone `settle_seconds` (its last rows lost, a walkthrough)."""
    return modified + 1 if modified == int(modified) else modified


class FolderTransport:
    """Files picked up from a folder that `open_folder` opens a session on."""

    def __init__(
        self,
        supplier_id: str,
        settings: FileSettings,
        open_folder: Callable[[], FolderSession],
        *,
        source: str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.source = source
        self._clock, self._monotonic = clock, monotonic
        # name -> the file as last listed, and since when it has listed so (monotonic)
        self._listed: dict[str, tuple[Entry, float]] = {}
        self._open_folder = open_folder
        self._policy = settings.policy(sleep)
        self._log = log.bind(supplier=supplier_id, source=source)
        self._session: FolderSession | None = None
        self._fetching = False
        self._fetched: dict[str, tuple[Entry, str]] = {}  # name -> as listed, delivery id
        # Files the inbox holds that could not be moved aside: name -> as listed then, the
        # delivery id, and why the last try failed
        self._stored: dict[str, tuple[Entry, str, str]] = {}
        # Files passed over, never to be taken as they list (see `refused`): name -> as
        # listed then, and why
        self._refused: dict[str, tuple[Entry, str]] = {}
        self.refresh_seconds: float | None = None  # no validators (see `Transport`)

    @property
    def refused(self) -> dict[str, str]:
        """The files passed over at the last fetch, and why, by name as shown (a name that
        is not UTF-8 with its bytes escaped): each is left where it is, and taken once it
        lists otherwise (rewritten smaller, renamed); the files behind it are taken."""
        return {_shown(name): why for name, (_, why) in self._refused.items()}

    def fetch(self) -> Iterator[Fetched]:
        self._fetching = True
        try:
            entries = self._call(lambda folder: folder.files())
            pattern = self.settings.pattern
            settled = self._settled([e for e in entries if waiting(e.name, pattern)])
            refused, self._refused = self._refused, {}
            for entry in sorted(settled, key=lambda e: (e.modified or 0.0, e.name)):
                passed = refused.get(entry.name)
                if passed is not None and passed[0] == entry:
                    self._refused[entry.name] = passed  # as it was: told already
                    continue
                problem = self._refusal(entry)
                if problem is not None:
                    self._refuse(entry, problem)
                    continue
                stored = self._stored.get(entry.name)
                # (Only where the server lists times: without them a rewrite of the same
                # length would list the same.)
                if stored is not None and stored[0] == entry and entry.modified is not None:
                    # The inbox holds it; only moving it aside failed (a read-only
                    # account, a blocked processed folder): try that again, unread, once
                    # a fetch (under the retry policy, 100 such files held each fetch up
                    # for ~13 minutes: a walkthrough).
                    try:
                        self._put_aside(entry.name, entry, stored[1], retry=False)
                    except FetchFailed as failure:
                        # The first failure was told (see `connectors.scheduler`); told
                        # again at every fetch, a read-only account filled the log.
                        if failure.reason != stored[2]:
                            self._log.warning(
                                "transport.still_not_put_aside",
                                name=entry.name,
                                reason=failure.reason,
                            )
                    else:
                        self._log.info("transport.put_aside_at_last", name=entry.name)
                    continue
                try:
                    body = self._read(entry.name)
                except FetchFailed as failure:
                    if not failure.reason.startswith("file_too_large"):
                        raise
                    self._refuse(entry, failure.reason)  # grew past the limit since listed
                    continue
                if body is None:
                    continue  # taken away since it was listed
                if entry.size is not None and len(body) != entry.size:
                    self._log.info("transport.file_still_changing", name=entry.name)
                    continue
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

    def _refusal(self, entry: Entry) -> str | None:
        """Why a file must be passed over without reading it, if it must: one bad file
        ended every fetch, and the files behind it waited for good (a walkthrough of file
        transports: a name that is not UTF-8, which the inbox cannot record, and a file
        over `max_file_bytes`, read whole at each fetch to learn so)."""
        try:
            entry.name.encode()
        except UnicodeEncodeError:
            return "unreadable_name: not UTF-8"
        limit = self.settings.max_file_bytes
        if entry.size is not None and entry.size > limit:
            return f"file_too_large: {entry.size} bytes, over {limit}"
        return None

    def _refuse(self, entry: Entry, problem: str) -> None:
        self._refused[entry.name] = (entry, problem)
        self._log.warning("transport.file_refused", name=_shown(entry.name), reason=problem)

    def _settled(self, entries: list[Entry]) -> list[Entry]:
        """The files left alone for `settle_seconds`: by their modification time, else by
        listing the same across fetches for that long. Remembers how the others list."""
        settle = self.settings.settle_seconds
        now, since = self._clock(), self._monotonic()
        listed, self._listed = self._listed, {}
        settled = []
        for entry in entries:
            first = listed.get(entry.name)
            unchanged_since = first[1] if first is not None and first[0] == entry else since
            if (
                settle <= 0
                or (entry.modified is not None and now - _latest(entry.modified) >= settle)
                or since - unchanged_since >= settle
            ):
                settled.append(entry)
            else:
                self._listed[entry.name] = (entry, unchanged_since)
        if len(settled) < len(entries):
            self._log.info("transport.files_settling", files=len(entries) - len(settled))
        return settled

    def done(self, fetched: Fetched) -> None:
        """Moves (or deletes) the file, unless it changed since it was fetched; a file
        this transport did not fetch is left alone (a later fetch brings it back)."""
        name = fetched.name or ""
        entry, delivery_id = self._fetched.get(name, (None, None))
        if entry is None or delivery_id is None or delivery_id != fetched.delivery_id:
            self._log.warning("transport.done_unknown", name=name, delivery=fetched.delivery_id)
            return
        del self._fetched[name]
        try:
            self._put_aside(name, entry, delivery_id)
        finally:
            if not self._fetching:
                self._disconnect()

    def _put_aside(self, name: str, entry: Entry, delivery_id: str, retry: bool = True) -> None:
        """Moves (or deletes) a file the inbox holds, unless it changed since it was listed.
        Where that fails, the file is remembered as listed, so that later fetches try again
        without downloading it anew; raises the failure. Without `retry`, each step is
        tried once."""
        self._stored.pop(name, None)
        call = self._call if retry else self._once
        try:
            now = call(lambda folder: folder.stat(name))
            if now == entry and self.settings.done_action == "delete":
                call(lambda folder: folder.delete(name))
            elif now == entry:
                taken = call(lambda folder: folder.processed(name))
                target = processed_name(name, delivery_id) if taken else name
                call(lambda folder: folder.move(name, target))
            elif now is not None:
                self._log.warning("transport.file_changed_since_fetched", name=name)
        except FetchFailed as failure:
            self._stored[name] = (entry, delivery_id, failure.reason)
            raise

    def close(self) -> None:
        self._disconnect()

    def _read(self, name: str) -> bytes | None:
        return self._call(lambda folder: folder.read(name))

    def _call(self, operation: Callable[[FolderSession], T]) -> T:
        """Runs one operation under the retry policy, on a fresh session after a failure."""
        return self._policy.run(functools.partial(self._once, operation))

    def _once(self, operation: Callable[[FolderSession], T]) -> T:
        """One attempt at one operation, the session dropped after a failure that may pass."""
        if self._session is None:
            self._session = self._open_folder()
        try:
            return operation(self._session)
        except FetchFailed as failure:
            if failure.retriable:
                self._disconnect()
            raise

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
    return functools.partial(
        LocalFolder, folder, folder / settings.processed_path, settings.max_file_bytes
    )


class LocalFolder:
    """A local folder; a session costs nothing."""

    def __init__(self, folder: Path, processed: Path, max_bytes: int = 2**30) -> None:
        self.folder = folder
        self.processed_folder = processed
        self.max_bytes = max_bytes

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
                # Not through a link: the listing takes regular files only, and a file
                # swapped for a link since would read whatever the link names.
                descriptor = os.open(self.folder / name, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                return None
            except OSError as error:
                if error.errno == errno.ELOOP:  # a link: not a file of the folder's
                    return None
                raise
            with os.fdopen(descriptor, "rb") as file:
                data = file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise too_large(self.max_bytes)
        return data

    def stat(self, name: str) -> Entry | None:
        with classified(LOCAL_FAILURES):
            try:
                return _entry(name, (self.folder / name).stat(follow_symlinks=False))
            except FileNotFoundError:
                return None

    def processed(self, name: str) -> bool:
        with classified(LOCAL_FAILURES), self._processed() as processed:
            try:
                os.stat(name, dir_fd=processed, follow_symlinks=False)
            except FileNotFoundError:
                return False
            return True

    def move(self, name: str, target: str) -> None:
        with classified(LOCAL_FAILURES), self._processed() as processed:
            os.replace(self.folder / name, target, dst_dir_fd=processed)

    @contextmanager
    def _processed(self) -> Iterator[int]:
        """The processed folder, open (each level made where missing). Inside the drop
        folder, never through a link: a supplier that can write there planted a link at
        `processed` and had its files moved into any folder the service can write to (a
        security walkthrough). Each level is opened from the one above (as a path, which
        needs no right to list it, and `..` as the kernel takes it), and where it stands is
        read from the open folder itself, not from how the paths are spelt (the drop folder
        named through a link, and the processed folder by its real path, let the planted
        link be followed: a walkthrough). Above the drop folder, or elsewhere, the folders
        are the admin's, taken as configured."""
        real_folder = os.path.realpath(self.folder)
        target = Path(os.getcwd()) / self.processed_folder  # `..` kept, for the kernel
        descriptor = os.open("/", os.O_PATH | os.O_DIRECTORY)
        walked = "/"
        try:
            for level in target.parts[1:]:
                where = _where(descriptor, walked)
                inside = where == real_folder or where.startswith(real_folder.rstrip("/") + "/")
                inner = _open_level(level, descriptor, follow=not inside)
                os.close(descriptor)
                descriptor, walked = inner, os.path.join(where, level)
        except BaseException:
            os.close(descriptor)
            raise
        try:
            yield descriptor
        finally:
            os.close(descriptor)

    def delete(self, name: str) -> None:
        with classified(LOCAL_FAILURES):
            (self.folder / name).unlink()

    def close(self) -> None:
        """Nothing to close."""


def _open_level(name: str, parent: int, *, follow: bool) -> int:
    """A folder inside `parent`, opened, made first where missing; unless `follow`, a link
    there is refused, as a file is."""
    flags = os.O_PATH | os.O_DIRECTORY | (0 if follow else os.O_NOFOLLOW)
    try:
        try:
            return os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):  # made meanwhile
                os.mkdir(name, dir_fd=parent)
            return os.open(name, flags, dir_fd=parent)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            reason = f"processed_not_a_folder: {_shown(name)} is a link or a file, not a folder"
            raise FetchFailed(reason, retriable=False) from error
        raise


def _where(descriptor: int, walked: str) -> str:
    """Where an open folder really is: as Linux's /proc says, else (no /proc mounted) the
    real path of the way it was walked to."""
    try:
        return os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        return os.path.realpath(walked)


def _shown(name: str) -> str:
    """A file's name for logs and health: one that is not UTF-8 with its bytes escaped."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _entry(name: str, status: os.stat_result) -> Entry:
    return Entry(name, status.st_size, status.st_mtime)
