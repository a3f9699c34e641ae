"""The layering DESIGN.md fixes: the domain imports no infrastructure."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
FORBIDDEN_IN_DOMAIN = {
    "psycopg",
    "psycopg_pool",
    "httpx",
    "fastapi",
    "starlette",
    "structlog",
    "uvicorn",
    "api",
    "projections",
    "connectors",
    "eventsourcing.postgres",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_domain_imports_no_infrastructure_and_nothing_above_it() -> None:
    offenders = {
        f"{path.relative_to(SRC)}: {name}"
        for path in (SRC / "ledger").rglob("*.py")
        for name in imported_modules(path)
        if any(name == bad or name.startswith(f"{bad}.") for bad in FORBIDDEN_IN_DOMAIN)
    }
    assert not offenders
