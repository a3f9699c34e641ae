"""Token buckets per key: a burst at once, then the rate; a wait said in seconds."""

from __future__ import annotations

import pytest

from api.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_may_make_its_burst_at_once_then_one_request_per_interval() -> None:
    clock = Clock()
    limiter = RateLimiter(2, burst=3, clock=clock)
    assert [limiter.take("shop") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("shop") == pytest.approx(0.5)  # one token comes every 0.5 s
    clock.now += 0.5
    assert limiter.take("shop") == 0
    assert limiter.take("shop") == pytest.approx(0.5)
    clock.now += 60  # a quiet spell fills the bucket to its burst, no more
    assert [limiter.take("shop") for _ in range(4)][-1] == pytest.approx(0.5)


def test_keys_have_buckets_of_their_own_and_the_burst_defaults_to_a_second_s_worth() -> None:
    clock = Clock()
    limiter = RateLimiter(2.5, clock=clock)
    assert limiter.burst == 3
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0
