"""Limits as small policy objects: rate is not concurrency.

Concurrency (work in flight) is an :class:`anyio.CapacityLimiter`; rate (work
started per second) is the :class:`RateLimiter` token bucket below. Keeping them
apart is what lets a run use many connections yet stay inside a per-minute quota.
"""

from __future__ import annotations

import math
import time

import anyio

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token bucket: at most ``rate`` acquisitions per second, bursts up to ``burst``.

    ``rate <= 0`` means no limit. Waiters are served in arrival order (one lock), so
    nobody starves. ``clock`` can be replaced in tests.
    """

    def __init__(self, rate: float, burst: int = 1, clock: object = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self._clock = clock
        self._tokens = float(self.burst)
        self._last: float | None = None
        self._lock = anyio.Lock()
        self.waited = 0.0

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    async def acquire(self) -> None:
        if self.rate <= 0 or math.isinf(self.rate):
            return
        async with self._lock:
            now = self._now()
            if self._last is not None:
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0:
                wait = (1.0 - self._tokens) / self.rate
                self.waited += wait
                await anyio.sleep(wait)
                self._tokens = 1.0
                self._last = self._now()
            self._tokens -= 1.0

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate}, burst={self.burst})"
