"""Secrets by reference: a supplier's settings name where a secret lives, never the secret.

`env:NAME` reads the environment variable NAME; `file:/path` reads a file (for mounted
secrets), without its trailing line ending. A secret sent to a supplier's server (a
poll's token, a password) is one line, and never one of the service's own settings
(LEDGER_*): one holding a control character is refused, never sent or quoted.
"""

from __future__ import annotations

import os
import stat

# Environment variables a reference may not name: the service's own settings.
OWN_PREFIX = "LEDGER_"

# The largest secret file read: a secret is a key or a token, and a reference to anything
# larger (a log, a device such as /dev/zero) is a mistake, read to no end.
MAX_SECRET_BYTES = 64 * 1024


class SecretUnavailable(LookupError):
    pass


def resolve(reference: str | None, *, sent: bool = False) -> str:
    """The secret a reference names, read now, as UTF-8 text.

    A secret that cannot be had is a SecretUnavailable, as one not configured is (a
    webhook is then refused as not configured; a poll's fetch fails, saying why): a file
    that is not a regular file (a FIFO would wait for a writer, a device such as /dev/zero
    would be read forever), larger than MAX_SECRET_BYTES, unreadable, or not UTF-8; an
    environment variable that is not set, or whose bytes are not UTF-8. `sent`: for a
    secret sent to a supplier's server, also one of the service's own settings, or one
    holding a control character.
    """
    if not reference:
        raise SecretUnavailable("no secret is configured")
    kind, _, name = reference.partition(":")
    if kind == "env" and name:
        if sent and name.upper().startswith(OWN_PREFIX):
            # The service's own settings (its database URL, its API keys) are no
            # supplier's secret, to be sent to a supplier's server.
            raise SecretUnavailable(f"environment variable {name} is the service's own setting")
        value = os.environ.get(name)
        if not value or not value.strip():
            raise SecretUnavailable(f"environment variable {name} is not set")
        # Python reads the environment's bytes that are not UTF-8 as lone surrogates,
        # which a signature's HMAC cannot encode.
        try:
            value.encode()
        except UnicodeEncodeError as error:
            raise SecretUnavailable(f"environment variable {name} is not UTF-8") from error
        return _one_line(value, f"environment variable {name}") if sent else value
    if kind == "file" and name:
        text = _read_file(name).rstrip("\r\n")
        if not text.strip():
            # An empty secret is none: a webhook whose secret file held only a line ending
            # took requests signed with the empty key, from anyone (a security review).
            raise SecretUnavailable(f"{name} is empty")
        return _one_line(text, name) if sent else text
    raise SecretUnavailable(f"a secret reference is env:NAME or file:PATH, not {reference!r}")


def _one_line(secret: str, where: str) -> str:
    """The secret, if it is one line of text: a key or a token holds no control character.
    One that did (a file saved with a Windows line ending, or a file that is no secret at
    all) went into an HTTP header, whose refusal quoted it into the log and feed health."""
    if any(ord(character) < 32 or ord(character) == 127 for character in secret):
        raise SecretUnavailable(f"{where} holds control characters: a secret is one line")
    return secret


def _read_file(name: str) -> str:
    """A regular file's text, at most MAX_SECRET_BYTES of UTF-8."""
    try:
        # Not blocking: opening a FIFO to read would wait for a writer. Whether it is a
        # regular file is asked of what was opened, which a rename cannot swap meanwhile.
        descriptor = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise SecretUnavailable(f"cannot read {name}: {error.strerror}") from error
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise SecretUnavailable(f"cannot read {name}: not a regular file")
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(MAX_SECRET_BYTES + 1)
    except OSError as error:
        raise SecretUnavailable(f"cannot read {name}: {error.strerror}") from error
    finally:
        os.close(descriptor)
    if len(data) > MAX_SECRET_BYTES:
        raise SecretUnavailable(f"cannot read {name}: larger than {MAX_SECRET_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as error:
        raise SecretUnavailable(f"cannot read {name}: not UTF-8") from error
