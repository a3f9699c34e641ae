"""Misbehaviour a simulated supplier can be told to show, one request at a time."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Literal

FaultKind = Literal["status", "delay", "malformed"]


@dataclass(frozen=True)
class Fault:
    """What to do to one request: answer `status` (with `retry_after` seconds for a 429),
    wait `seconds` before answering as usual, or answer 200 with a truncated JSON body."""

    kind: FaultKind
    status: int = 200
    retry_after: int | None = None
    seconds: float = 0.0


class Faults:
    """Faults waiting for the next requests, taken in the order they were set; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: deque[Fault] = deque()

    def fail_next(self, count: int = 1, status: int = 503) -> None:
        """The next `count` requests fail with `status`, a 5xx."""
        if not 500 <= status <= 599:
            raise ValueError(f"status must be a 5xx, not {status}")
        self._add(count, Fault("status", status))

    def throttle_next(self, count: int = 1, retry_after: int = 1) -> None:
        """The next `count` requests get 429 with `Retry-After: retry_after` (seconds)."""
        if retry_after < 0:
            raise ValueError("retry_after must not be negative")
        self._add(count, Fault("status", 429, retry_after=retry_after))

    def delay_next(self, seconds: float, count: int = 1) -> None:
        """The next `count` requests wait `seconds` before they are answered as usual."""
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        self._add(count, Fault("delay", seconds=seconds))

    def malform_next(self, count: int = 1) -> None:
        """The next `count` requests get 200 with a JSON body cut short."""
        self._add(count, Fault("malformed"))

    def clear(self) -> None:
        """Forget every fault not yet shown."""
        with self._lock:
            self._pending.clear()

    def take(self) -> Fault | None:
        """The fault for the request arriving now, if one is waiting."""
        with self._lock:
            return self._pending.popleft() if self._pending else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def _add(self, count: int, fault: Fault) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._pending.extend([fault] * count)
