"""Shares of a large CSV delivery, read and compared on several connections at once.

PostgreSQL reads (COPY, judging) and compares (RESOLVE) a delivery on one core a
connection. A large CSV delivery is therefore split here into shares of about equal
size, each the header and a run of whole lines, numbered on from the share before, so
that each can be loaded by `connectors.copy_csv` on a connection of its own as if it
were the delivery's own lines (see `Ingestor._compare`). The shares read one file object
under one lock, each from its own place. The changes the shares find are merged back
into the writer's order here.
"""

from __future__ import annotations

import codecs
import io
import itertools
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

from connectors.copy_csv import CHUNK, NotByCopy, _header
from connectors.parsers.csv_feed import CsvSettings


@dataclass(frozen=True)
class Share:
    """Part of a delivery to load on a connection of its own: the header and a run of whole
    lines, numbered from `first_position`."""

    body: BinaryIO
    first_position: int


def split(source: BinaryIO, settings: CsvSettings, shares: int) -> list[Share] | None:
    """The delivery in `shares` shares of about equal size, each ending at a line's end;
    None where it cannot be split so (too few lines, or a header `copy_csv` would refuse:
    reading it whole then says why). Leaves `source` where it was; the shares read it under
    one lock, each from its own place."""
    begin = source.tell()
    try:
        encoding = codecs.lookup(settings.encoding).name
        if encoding not in {"utf-8", "utf-8-sig"}:
            return None
        try:
            _header(source, strip_bom=encoding == "utf-8-sig")
        except NotByCopy:
            return None
        data = source.tell()
        end = source.seek(0, io.SEEK_END)
        bounds = [data]
        for share in range(1, shares):
            cut = _line_end(source, max(bounds[-1], data + (end - data) * share // shares), end)
            if cut is None or cut >= end:
                break
            bounds.append(cut)
        if len(bounds) < 2:
            return None
        bounds.append(end)
        source.seek(begin)
        head = source.read(data - begin)
        lock = threading.Lock()
        found: list[Share] = []
        first = 1
        for start, stop in itertools.pairwise(bounds):
            raw = _Lines(source, lock, head, start, stop)
            found.append(Share(io.BufferedReader(raw, CHUNK), first))
            if stop < end:  # the next share's rows are numbered on from this one's
                first += _count_lines(source, start, stop)
        return found
    finally:
        source.seek(begin)


def _line_end(source: BinaryIO, at: int, end: int) -> int | None:
    """Where the line that holds byte `at` ends (just past its newline); None if it has none."""
    source.seek(at)
    while at < end:
        chunk = source.read(min(CHUNK, end - at))
        if not chunk:
            return None
        newline = chunk.find(b"\n")
        if newline >= 0:
            return at + newline + 1
        at += len(chunk)
    return None


def _count_lines(source: BinaryIO, start: int, stop: int) -> int:
    """The newlines from `start` to `stop`: the rows of a share that ends at a line's end
    (COPY reads no row from a blank line: it refuses one, see the module's note)."""
    source.seek(start)
    count = 0
    while start < stop:
        chunk = source.read(min(CHUNK, stop - start))
        if not chunk:
            break
        count += chunk.count(b"\n")
        start += len(chunk)
    return count


class _Lines(io.RawIOBase):
    """`head`, then bytes `start` to `stop` of a source that other shares read too."""

    def __init__(
        self, source: BinaryIO, lock: threading.Lock, head: bytes, start: int, stop: int
    ) -> None:
        super().__init__()
        self._source, self._lock, self._head = source, lock, head
        self._at, self._stop = start, stop

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            taken = self._head[: len(view)]
            view[: len(taken)] = taken
            self._head = self._head[len(taken) :]
            return len(taken)
        wanted = min(len(view), self._stop - self._at)
        if wanted <= 0:
            return 0
        with self._lock:
            self._source.seek(self._at)
            data = self._source.read(wanted)
        view[: len(data)] = data
        self._at += len(data)
        return len(data)


def sku_order(row: Any) -> tuple[bool, str]:
    """The writer's order: by SKU, bytewise (as Python compares the code points of a str,
    which UTF-8 keeps in order), unresolved records last, as `ORDER BY n` in RESOLVE."""
    return (row["sku"] is None, row["sku"] or "")
