"""Limits as small policy objects: rate is not concurrency.

Concurrency (work in flight) is an :class:`anyio.CapacityLimiter`; rate (work
started per second) is the :class:`RateLimiter` token bucket below. Keeping them
apart is what lets a run use many connections yet stay inside a per-minute quota.

For remote sources there are two more: :class:`HostLimits` (one capacity limiter
per host, so one slow host cannot take every connection) and
:class:`AdaptiveRateLimiter` (a token bucket whose rate backs off when a service
says it is overloaded, 503, and creeps back up while it answers: AIMD).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

__all__ = ["AdaptiveRateLimiter", "HostLimits", "RateLimiter", "RetryPolicy"]


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


class HostLimits:
    """One :class:`anyio.CapacityLimiter` per host: requests in flight per host.

    ``per_host <= 0`` means no limit (a limiter of a very large capacity).
    """

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host if per_host > 0 else 1_000_000
        self._limiters: dict[str, anyio.CapacityLimiter] = {}

    def limiter(self, host: str) -> anyio.CapacityLimiter:
        found = self._limiters.get(host)
        if found is None:
            found = self._limiters[host] = anyio.CapacityLimiter(self.per_host)
        return found

    def __repr__(self) -> str:
        return f"HostLimits(per_host={self.per_host})"


class AdaptiveRateLimiter:
    """A token bucket whose rate halves on overload and grows back additively.

    Parameters
    ----------
    ceiling : float
        The configured rate (acquisitions per second), e.g. a quota / 60; 0 means
        no configured limit: the limiter is open until the first overload.
    floor : float
        The rate never drops below this.
    increase : float
        Rate added back per second of answers without overload (at least a tenth
        of the rate before the last decrease).
    hold : float
        At most one decrease per ``hold`` seconds: a burst of 503s from requests
        already in flight counts as one overload (as TCP halves once per RTT).
    clock : callable
        Monotonic clock, replaceable in tests.

    Notes
    -----
    When there is no ceiling, the first overload starts from the rate observed
    over the last few seconds; once the rate has grown back to what it was
    before the last decrease, the limiter opens again.
    """

    def __init__(
        self,
        ceiling: float = 0.0,
        floor: float = 1.0,
        increase: float = 2.0,
        hold: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ceiling = max(0.0, float(ceiling))
        # A floor above a quota's rate would make backing off impossible.
        self.floor = min(float(floor), self.ceiling / 4) if self.ceiling > 0 else float(floor)
        self.increase = float(increase)
        self.hold = float(hold)
        self._clock = clock
        self._bucket = RateLimiter(self.ceiling, burst=1, clock=clock)
        self._rate = self.ceiling  # 0: no limit (the bucket is then bypassed)
        self._last_change = -math.inf
        self._last_grow = clock()
        self._opened_at = 0.0
        self._recent: list[float] = []
        self.decreases = 0

    @property
    def rate(self) -> float:
        """Current rate; 0 means unlimited."""
        return self._rate

    def _set(self, rate: float) -> None:
        self._rate = rate
        if rate > 0:  # the bucket's rate only ever changes between positive values
            self._bucket.rate = rate

    async def acquire(self) -> None:
        now = self._clock()
        self._recent.append(now)
        if len(self._recent) > 256:
            del self._recent[:128]
        if self._rate > 0:
            await self._bucket.acquire()

    def _observed(self, now: float) -> float:
        window = [t for t in self._recent if t > now - 5.0]
        if len(window) < 2:
            return self.floor
        return len(window) / max(now - window[0], 1e-3)

    def on_overload(self) -> None:
        """The service answered 503: halve the rate (at most once per ``hold``)."""
        now = self._clock()
        if now - self._last_change < self.hold:
            return
        current = self._rate if self._rate > 0 else self._observed(now)
        self._opened_at = current
        self._set(max(self.floor, current / 2))
        self._last_change = self._last_grow = now
        self.decreases += 1

    def on_success(self) -> None:
        """An answer without overload: grow the rate back towards the ceiling."""
        now = self._clock()
        elapsed = min(1.0, max(0.0, now - self._last_grow))
        self._last_grow = now
        rate = self._rate
        if rate <= 0 or (self.ceiling > 0 and rate >= self.ceiling):
            return
        # Additive increase, but never slower than a tenth of the rate before the
        # last decrease per second: one 503 costs seconds, not minutes.
        grown = rate + max(self.increase, self._opened_at / 10) * elapsed
        if self.ceiling > 0:
            self._set(min(self.ceiling, grown))
        elif grown >= self._opened_at:
            self._set(0.0)  # back to no limit
        else:
            self._set(grown)

    def __repr__(self) -> str:
        return f"AdaptiveRateLimiter(ceiling={self.ceiling}, rate={self.rate})"
