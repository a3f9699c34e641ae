"""Feed files dropped into a folder the way a watcher must see them: whole or not at all."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from connectors.parsers import Format
from connectors.simulator.catalogue import Item
from connectors.simulator.writers import EXTENSIONS, write


def drop(folder: str | Path, fmt: Format, items: Iterable[Item], name: str | None = None) -> Path:
    """Write the items as a feed in `fmt` to `folder/name`, atomically; returns its path.

    The file is written under a hidden temporary name in the same folder (".name.….part")
    and renamed once complete, so a watcher sees either no file or the whole of it. The
    default name is `stock-<UTC time>-<random>.<ext>`.
    """
    folder = Path(folder)
    if fmt not in EXTENSIONS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(EXTENSIONS)}")
    if name is None:
        name = f"stock-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}{EXTENSIONS[fmt]}"
    if Path(name).name != name or name.startswith("."):
        raise ValueError(f"name must be a plain file name, not {name!r}")
    final = folder / name
    temporary = folder / f".{name}.{uuid.uuid4().hex}.part"
    try:
        with temporary.open("xb") as target:
            write(fmt, items, target)
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    return final
