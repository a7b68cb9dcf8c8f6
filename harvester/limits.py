"""Limits as small policy objects: rate is not concurrency.

Concurrency (work in flight) is an :class:`anyio.CapacityLimiter`; rate (work
started per second) is the :class:`RateLimiter` token bucket below. Keeping them
apart is what lets a run use many connections yet stay inside a per-minute quota.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import anyio

__all__ = ["RateLimiter", "RetryPolicy"]


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


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying again.

    Retries only errors that say they are retryable (:class:`TransientError`: 429,
    5xx, resets, timeouts, truncated bodies) and plain ``OSError``; everything else
    (a 404, a 422, a corrupt file) fails at once. Attempts and total time are both
    bounded. The delay is exponential with full jitter, unless the error carries the
    server's own ``retry_after`` (Retry-After, X-RateLimit-Reset), which wins.

    Parameters
    ----------
    attempts : int
        Total attempts, the first included.
    base, cap : float
        First backoff and largest backoff, seconds.
    total : float
        Give up once this many seconds have passed since the first attempt.
    jitter : bool
        Spread delays uniformly over [delay/2, delay]; off in tests for exact sums.
    """

    attempts: int = 3
    base: float = 0.2
    cap: float = 30.0
    total: float = 300.0
    jitter: bool = True

    def retryable(self, exc: BaseException) -> bool:
        flag = getattr(exc, "retryable", None)
        if flag is not None:
            return bool(flag)
        return isinstance(exc, OSError)

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        told = getattr(exc, "retry_after", None)
        if told is not None:
            return max(0.0, float(told))
        d = float(min(self.cap, self.base * 2 ** (attempt - 1)))
        return d * random.uniform(0.5, 1.0) if self.jitter else d
