"""Secrets by reference: a supplier's settings name where a secret lives, never the secret.

`env:NAME` reads the environment variable NAME; `file:/path` reads a file (for mounted
secrets), without its trailing newline.
"""

from __future__ import annotations

import os
from pathlib import Path


class SecretUnavailable(LookupError):
    pass


def resolve(reference: str | None) -> str:
    if not reference:
        raise SecretUnavailable("no secret is configured")
    kind, _, name = reference.partition(":")
    if kind == "env" and name:
        value = os.environ.get(name)
        if value:
            return value
        raise SecretUnavailable(f"environment variable {name} is not set")
    if kind == "file" and name:
        try:
            return Path(name).read_text().rstrip("\n")
        except OSError as error:
            raise SecretUnavailable(f"cannot read {name}: {error.strerror}") from error
    raise SecretUnavailable(f"a secret reference is env:NAME or file:PATH, not {reference!r}")
