"""Limits held across a Dask cluster: a GCRA token bucket on the scheduler.

A service's quota (``service.cutout_per_minute``, ``sia_per_minute``) is one
budget for the whole cluster, whatever the number of workers. The scheduler holds
it: :class:`RatePlugin` adds two handlers to the scheduler,

* ``harvester_rate_reserve(bucket, rate, n)``: reserve ``n`` tokens of ``bucket``
  at ``rate`` per second; returns the delay (seconds, relative, so the clocks of
  the machines need not agree) until the first, the others following at
  ``1 / rate`` intervals. :class:`Gcra` (the generic cell rate algorithm) keeps one
  number per bucket, the theoretical arrival time of the next token;
* ``harvester_rate_penalize(bucket, seconds)``: a 429 or ``Retry-After`` seen by
  any worker pushes that time forward, so no worker starts a request before then.

A worker takes tokens in batches (:class:`ClusterRate`): one RPC per at most
:data:`BATCH_SECONDS` of the rate (at most :data:`MAX_BATCH` tokens), so a quota of
1,000/s costs about 60 RPCs a second and one of 35/min one per request. A token
not used within one interval of its time is dropped, not spent late: a burst of
stale tokens could overrun the quota. No leases, so nothing leaks when a worker
dies. Requests in flight per host are split statically (:class:`ClusterLimits`):
each worker gets ``connections_per_host // workers``.

Dependency rule: ``distributed`` (only as the scheduler and the worker's RPC),
``anyio``, :mod:`harvester.limits`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from distributed.diagnostics.plugin import SchedulerPlugin

from ..limits import AdaptiveRateLimiter, ClientLimits, RateGate

__all__ = [
    "BATCH_SECONDS",
    "MAX_BATCH",
    "ClusterLimits",
    "ClusterRate",
    "Gcra",
    "RatePlugin",
]

#: A worker reserves at most this many seconds of a rate per RPC ...
BATCH_SECONDS = 0.05
#: ... and at most this many tokens (the prototype's 16: 100 RPCs for 1,600 requests).
MAX_BATCH = 16

#: Reserve: (bucket, rate per second, tokens) -> seconds until the first token.
Reserve = Callable[[str, float, int], Awaitable[float]]
#: Penalize: (bucket, seconds) -> None.
Penalize = Callable[[str, float], Awaitable[None]]


class Gcra:
    """Token buckets of the generic cell rate algorithm, by name (no burst).

    ``reserve(name, rate, n)`` hands out the next ``n`` emission times of a bucket
    spaced ``1 / rate`` apart, as a delay from now until the first.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self.reservations = 0

    def reserve(self, name: str, rate: float, n: int) -> float:
        if rate <= 0 or not math.isfinite(rate) or n < 1:
            raise ValueError(f"bucket {name!r}: rate {rate!r} and tokens {n!r} must be > 0")
        now = self._clock()
        tat = max(self._tat.get(name, now), now)
        self._tat[name] = tat + n / rate
        self.reservations += 1
        return tat - now

    def penalize(self, name: str, seconds: float) -> None:
        """No token of ``name`` before ``seconds`` from now."""
        now = self._clock()
        self._tat[name] = max(self._tat.get(name, now), now + max(0.0, seconds))

    def __repr__(self) -> str:
        return f"Gcra(buckets={len(self._tat)}, reservations={self.reservations})"


class RatePlugin(SchedulerPlugin):
    """Puts the :class:`Gcra` handlers on the scheduler (see the module docstring).

    Idempotent: a run on a cluster that has it already keeps the buckets as they
    are, so two runs against one service share its quota.
    """

    name = "harvester-rate"
    idempotent = True

    def __init__(self) -> None:
        self.gcra = Gcra()

    async def start(self, scheduler: Any) -> None:
        scheduler.handlers["harvester_rate_reserve"] = self._reserve
        scheduler.handlers["harvester_rate_penalize"] = self._penalize

    def _reserve(self, bucket: str, rate: float, n: int) -> float:
        return self.gcra.reserve(bucket, rate, n)

    def _penalize(self, bucket: str, seconds: float) -> None:
        self.gcra.penalize(bucket, seconds)


class ClusterRate:
    """A :class:`~harvester.limits.RateGate` whose tokens come from the scheduler.

    503s still back off per worker (an :class:`~harvester.limits.
    AdaptiveRateLimiter` without a ceiling, as in one process); the quota is the
    cluster's bucket.
    """

    def __init__(
        self,
        bucket: str,
        per_second: float,
        reserve: Reserve,
        penalize: Penalize,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bucket = bucket
        self.per_second = per_second
        self.batch = max(1, min(MAX_BATCH, int(per_second * BATCH_SECONDS)))
        self._reserve = reserve
        self._penalize = penalize
        self._clock = clock
        self._slots: deque[float] = deque()
        self._lock = anyio.Lock()
        self._overload = AdaptiveRateLimiter(clock=clock)
        self.rpcs = 0
        self.dropped = 0

    async def acquire(self) -> None:
        await self._overload.acquire()
        interval = 1.0 / self.per_second
        async with self._lock:
            while True:
                if not self._slots:
                    delay = await self._reserve(self.bucket, self.per_second, self.batch)
                    self.rpcs += 1
                    start = self._clock() + delay
                    self._slots.extend(start + i * interval for i in range(self.batch))
                at = self._slots.popleft()
                if at >= self._clock() - interval:
                    break
                self.dropped += 1  # stale: spent late it would be a burst
        wait = at - self._clock()
        if wait > 0:
            await anyio.sleep(wait)

    def on_success(self) -> None:
        self._overload.on_success()

    def on_overload(self) -> None:
        self._overload.on_overload()

    async def penalize(self, seconds: float) -> None:
        self._slots.clear()
        await self._penalize(self.bucket, seconds)

    def __repr__(self) -> str:
        return f"ClusterRate({self.bucket!r}, {self.per_second}/s, batch={self.batch})"


class ClusterLimits(ClientLimits):
    """A worker's client limits: quotas from the scheduler's buckets, and its share
    of the requests in flight per host (``configured // workers``, at least 1).

    ``scope`` names the buckets (the service URL), so runs against one service
    share its quota and runs against two do not.
    """

    quota_headers_suffice = False

    def __init__(self, scope: str, workers: int, reserve: Reserve, penalize: Penalize) -> None:
        self.scope = scope
        self.workers = max(1, workers)
        self._reserve = reserve
        self._penalize = penalize
        self.gates: dict[str, ClusterRate] = {}

    def rate(self, service: str, per_second: float) -> RateGate:
        if per_second <= 0:
            return AdaptiveRateLimiter()
        gate = ClusterRate(f"{self.scope}#{service}", per_second, self._reserve, self._penalize)
        self.gates[service] = gate
        return gate

    def per_host(self, configured: int) -> int:
        return max(1, configured // self.workers)

    def __repr__(self) -> str:
        return f"ClusterLimits({self.scope!r}, workers={self.workers})"


def scheduler_calls(worker: Any) -> tuple[Reserve, Penalize]:
    """The bucket RPCs, through ``worker``'s connection to the scheduler."""

    async def reserve(bucket: str, rate: float, n: int) -> float:
        return float(await worker.scheduler.harvester_rate_reserve(bucket=bucket, rate=rate, n=n))

    async def penalize(bucket: str, seconds: float) -> None:
        await worker.scheduler.harvester_rate_penalize(bucket=bucket, seconds=seconds)

    return reserve, penalize
