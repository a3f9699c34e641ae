"""Feed parsers: pure, streaming functions from a supplier's bytes to records as written.

`parse(format, source, options)` checks the options at once (a ValueError starting
"bad_option:" names a wrong one) and returns an iterator that reads `source` only as
far as the records it has yielded. It yields a Record or a RecordError per record and
raises FeedError when the delivery is structurally broken; as parsing streams, that can
happen after some records were yielded, so a caller applies a delivery only once the
iterator has finished, and rejects all of it on a FeedError. The source stays open.
Each module's docstring lists the options of its format.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, get_args

from connectors.parsers.csv_feed import CsvSettings, parse_csv
from connectors.parsers.edi846 import EdiSettings, parse_edi846
from connectors.parsers.json_feed import JsonSettings, parse_json
from connectors.parsers.records import (
    FeedError,
    Incoming,
    Parsed,
    Record,
    RecordError,
    ValueFormat,
)
from connectors.parsers.xml_feed import XmlSettings, parse_xml

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "FORMATS",
    "OPTION_NAMES",
    "FeedError",
    "Format",
    "Incoming",
    "Parsed",
    "Record",
    "RecordError",
    "parse",
    "source_from_chunks",
]

Format = Literal["csv", "json", "xml", "edi846"]
FORMATS: tuple[Format, ...] = get_args(Format)
# Every option a parser reads, of any format (a supplier's options serve all of them).
OPTION_NAMES = (
    CsvSettings.OPTIONS
    | JsonSettings.OPTIONS
    | XmlSettings.OPTIONS
    | EdiSettings.OPTIONS
    | ValueFormat.OPTIONS
)

_PARSERS: dict[str, Callable[[BinaryIO, Mapping[str, Any]], Iterator[Parsed]]] = {
    "csv": parse_csv,
    "json": parse_json,
    "xml": parse_xml,
    "edi846": parse_edi846,
}


def parse(
    format: Format, source: BinaryIO, options: Mapping[str, Any] | None = None
) -> Iterator[Record | RecordError]:
    """The records of one delivery in `format`, read from `source` as they are needed."""
    if format not in _PARSERS:
        raise ValueError(f"bad_option: unknown format {format!r}; known: {', '.join(FORMATS)}")
    return _PARSERS[format](source, options or {})


def source_from_chunks(chunks: Iterable[bytes]) -> BinaryIO:
    """A binary file object over chunks of bytes arriving one by one (e.g. a streamed body).

    It cannot seek; `tell()` says how many bytes the reader has taken so far.
    """
    return io.BufferedReader(_ChunkReader(chunks))


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")
        self._delivered = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        """How many bytes have been read so far (the stream cannot seek)."""
        return self._delivered

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        with memoryview(buffer) as target:
            size = min(len(target), len(self._pending))
            target[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        self._delivered += size
        return size
