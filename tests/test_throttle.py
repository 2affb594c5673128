"""Throttling replies: which ones slow the run, and how far the rate limiter goes down."""

from __future__ import annotations

import pytest

from mergekit.dispatch import THROTTLE_COOLDOWN, RateLimiter, is_throttle
from mergekit.transports.base import Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "outcome, slows",
    [
        (Outcome.transient(450, "4.7.1 Error: too much mail from 127.0.0.1"), True),  # Postfix anvil
        (Outcome.transient(421, "4.7.0 closing"), True),
        (Outcome.transient(429, "Too Many Requests", retry_after=3), True),
        (Outcome.transient(451, "4.7.1 rate limit exceeded"), True),
        (Outcome.transient(421, "4.7.0 mx Error: too many connections from 127.0.0.1"), False),  # pool
        (Outcome.transient(452, "4.2.2 mailbox full"), False),
        (Outcome.transient(451, "4.3.0 temporary local problem"), False),
        (Outcome.transient(None, "connection lost before the data was sent"), False),
        (Outcome.permanent(554, "5.7.1 rate limited for ever"), False),
    ],
)
def test_which_replies_slow_the_run(outcome: Outcome, slows: bool) -> None:
    assert is_throttle(outcome) is slows


def test_unlimited_run_is_cut_from_what_the_server_accepted() -> None:
    clock = Clock()
    limiter = RateLimiter(None, clock=clock)
    for _ in range(10):  # 20 messages a second for 5 s
        limiter.accepted(10)
        clock.now += 0.5
    limiter.throttle(None, "450 4.7.1 Error: too much mail")
    assert limiter.per_second == pytest.approx(16.0)
    limiter.throttle(None, "450 4.7.1 Error: too much mail")  # the same event: no second cut
    assert limiter.per_second == pytest.approx(16.0)
    clock.now += THROTTLE_COOLDOWN
    limiter.throttle(None, "450 4.7.1 Error: too much mail")
    assert limiter.per_second == pytest.approx(12.8) and limiter.cuts == 2


def test_no_measure_no_rate_no_cut() -> None:
    limiter = RateLimiter(None, clock=Clock())
    limiter.throttle(None, "450 4.7.1 slow down")
    assert limiter.per_second is None and limiter.cuts == 0
