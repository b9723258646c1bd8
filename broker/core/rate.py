"""The one token bucket: session opens (service/limits.py) and log lines (logs.py) use it.

Handed the time on each call, so it knows no clock (like the core's quarantine).
"""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up (at least one)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        """Refilled to `burst` by `now`: the caller may forget this bucket."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst
