"""`python -m connectors.simulator`: drop a feed file, or run a REST supplier until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from connectors.parsers import FORMATS
from connectors.simulator.catalogue import Catalogue
from connectors.simulator.files import drop
from connectors.simulator.rest_server import PAGINATIONS, RestSupplier


def main(arguments: Sequence[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(arguments)
    catalogue = Catalogue(options.items, seed=options.seed)
    if options.command == "drop":
        if not Path(options.folder).is_dir():
            parser.error(f"{options.folder}: no such folder")
        print(drop(options.folder, options.format, catalogue, options.name))
        return 0
    supplier = RestSupplier(
        catalogue, pagination=options.pagination, token=options.token, port=options.port
    )
    with supplier:
        print(f"{supplier.base_url}/inventory ({options.items} items); Ctrl-C stops", flush=True)
        stopped = threading.Event()
        try:
            while not stopped.wait(options.advance_every):
                changed = catalogue.advance(options.changed_fraction)
                print(f"version {catalogue.version}: {len(changed)} changed", flush=True)
        except KeyboardInterrupt:
            pass
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m connectors.simulator",
        description="A simulated supplier: drop a feed file, or serve a REST API until Ctrl-C.",
    )
    parser.add_argument("--items", type=int, default=1000, help="catalogue size (1000)")
    parser.add_argument("--seed", type=int, default=0, help="catalogue seed (0)")
    commands = parser.add_subparsers(dest="command", required=True)
    dropping = commands.add_parser("drop", help="write one feed file atomically into a folder")
    dropping.add_argument("folder")
    dropping.add_argument("--format", choices=FORMATS, default="csv")
    dropping.add_argument("--name", help="file name (default: stock-<time>-<random>.<ext>)")
    rest = commands.add_parser("rest", help="serve GET /inventory on 127.0.0.1")
    rest.add_argument("--port", type=int, default=0, help="0 picks a free port")
    rest.add_argument("--pagination", choices=PAGINATIONS, default="page")
    rest.add_argument("--token", help="require this bearer token")
    rest.add_argument("--advance-every", type=float, default=10.0, help="seconds (10)")
    rest.add_argument("--changed-fraction", type=float, default=0.01, help="per advance (0.01)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
