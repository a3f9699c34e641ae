"""Requests a second per API key: a token bucket per key, in each API process (`429`)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    """`rate` requests a second per key, up to `burst` at once after a quiet spell.

    Each API process keeps its own buckets: with N workers a key may make up to N times
    the rate in all (a client on one kept-alive connection talks to one of them)."""

    def __init__(
        self, rate: float, burst: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst or max(1, math.ceil(rate))
        self.clock = clock
        self._lock = threading.Lock()
        # key name -> (tokens left, when counted); the keys are the configured ones
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 if the key may make a request now (it is counted); else the seconds until
        it may."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
