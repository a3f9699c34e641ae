"""Stock feeds as suppliers send them, streamed to a binary file object.

Each writer uses the field names that `connectors.parsers` recognises by default, so
`parse(format, file)` reads back exactly the items written. Times are ISO 8601 in UTC;
EDI 846 has its own writer in `edi846`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from functools import lru_cache
from json.encoder import encode_basestring_ascii as json_string
from typing import BinaryIO
from xml.sax.saxutils import escape

from connectors.parsers import Format
from connectors.simulator.catalogue import Item
from connectors.simulator.edi846 import write_edi846

COLUMNS = ("supplier_sku", "upc", "quantity", "unit", "observed_at")
BATCH = 1024  # items formatted per write to the target

Writer = Callable[[Iterable[Item], BinaryIO], None]


def write_csv(items: Iterable[Item], target: BinaryIO) -> None:
    """A comma-separated feed with a header row, UTF-8, CRLF line ends."""
    text = io.TextIOWrapper(target, encoding="utf-8", newline="")
    try:
        rows = csv.writer(text)
        rows.writerow(COLUMNS)
        rows.writerows(
            (i.supplier_sku, i.upc, i.quantity, i.unit, iso(i.observed_at)) for i in items
        )
        text.flush()
    finally:
        text.detach()  # the caller owns the target


def write_json(items: Iterable[Item], target: BinaryIO) -> None:
    """`{"items": [{supplier_sku, upc, quantity, unit, observed_at}, ...]}`, one item a line."""
    target.write(b'{"items": [')
    separator = "\n"
    for batch in _batches(items):
        objects = [json_item(item) for item in batch]
        target.write((separator + ",\n".join(objects)).encode())
        separator = ",\n"
    target.write(b"\n]}\n")


def write_xml(items: Iterable[Item], target: BinaryIO) -> None:
    """`<inventory><item><supplier_sku>…</supplier_sku>…</item>…</inventory>`, UTF-8."""
    target.write(b'<?xml version="1.0" encoding="UTF-8"?>\n<inventory>\n')
    for batch in _batches(items):
        elements = "".join(
            f"<item><supplier_sku>{escape(i.supplier_sku)}</supplier_sku><upc>{escape(i.upc)}"
            f"</upc><quantity>{i.quantity}</quantity><unit>{escape(i.unit)}</unit>"
            f"<observed_at>{iso(i.observed_at)}</observed_at></item>\n"
            for i in batch
        )
        target.write(elements.encode())
    target.write(b"</inventory>\n")


WRITERS: dict[Format, Writer] = {
    "csv": write_csv,
    "json": write_json,
    "xml": write_xml,
    "edi846": write_edi846,
}
EXTENSIONS: dict[Format, str] = {"csv": ".csv", "json": ".json", "xml": ".xml", "edi846": ".edi"}


def write(format: Format, items: Iterable[Item], target: BinaryIO) -> None:
    """The items as a feed in `format`, with that format's writer and its defaults."""
    if format not in WRITERS:
        raise ValueError(f"unknown format {format!r}; known: {', '.join(WRITERS)}")
    WRITERS[format](items, target)


def json_item(item: Item) -> str:
    """One item as a JSON object, the way the JSON feed and the REST supplier write it."""
    return (
        f'{{"supplier_sku": {json_string(item.supplier_sku)}, "upc": {json_string(item.upc)}, '
        f'"quantity": {item.quantity}, "unit": {json_string(item.unit)}, '
        f'"observed_at": "{iso(item.observed_at)}"}}'
    )


@lru_cache(maxsize=64)
def iso(moment: datetime) -> str:
    """A time in ISO 8601; cached, since a snapshot's items share one observed_at."""
    return moment.isoformat()


def _batches(items: Iterable[Item]) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
