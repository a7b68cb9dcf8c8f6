"""Limits as small policy objects: rate is not concurrency.

Concurrency (work in flight) is an :class:`anyio.CapacityLimiter`; rate (work
started per second) is the :class:`RateLimiter` token bucket below. Keeping them
apart is what lets a run use many connections yet stay inside a per-minute quota.

For remote sources there are two more: :class:`HostLimits` (one capacity limiter
per host, so one slow host cannot take every connection) and
:class:`AdaptiveRateLimiter` (a token bucket whose rate backs off when a service
says it is overloaded, 503, and creeps back up while it answers: AIMD).

A client takes its rate limiters and its share of the per-host connections from
a :class:`ClientLimits`: the default makes the one-process limiters above; a
distributed run passes one whose limiters are held across the whole cluster
(``harvester.dask``), through the same :class:`RateGate` protocol.
"""

from __future__ import annotations

import errno
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import anyio

from .errors import HarvesterError, OutageError

__all__ = [
    "TRANSIENT_ERRNOS",
    "AdaptiveRateLimiter",
    "CircuitBreaker",
    "ClientLimits",
    "HostLimits",
    "Isolated",
    "RateGate",
    "RateLimiter",
    "RetryPolicy",
    "isolate",
    "retryable",
]

#: ``OSError`` numbers that may go away if the same call is made again: a busy or
#: overloaded system (out of descriptors, memory, buffers), an interrupted or
#: timed-out call, a network file system's stale handle or I/O hiccup. A missing
#: file, a refused permission or a corrupt file (astropy raises a bare ``OSError``
#: for a FITS file without an END card) is not retried.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.ENOBUFS,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.EIO,
    }
)


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


def retryable(exc: BaseException) -> bool:
    """Whether trying the call that raised ``exc`` again may succeed.

    An error's own ``retryable`` flag decides (every
    :class:`~harvester.errors.HarvesterError` has one); an ``OSError`` is
    retryable when its ``errno`` is in :data:`TRANSIENT_ERRNOS`; nothing else is.
    """
    flag = getattr(exc, "retryable", None)
    if flag is not None:
        return bool(flag)
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying again.

    Retries only errors that say they are retryable (:class:`TransientError`: 429,
    5xx, resets, timeouts, truncated bodies) and ``OSError`` whose ``errno`` is in
    :data:`TRANSIENT_ERRNOS`; everything else (a 404, a 422, a missing or corrupt
    file) fails at once. Attempts and total time are both
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
        """Whether trying ``exc``'s call again may succeed (:func:`retryable`)."""
        return retryable(exc)

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


class CircuitBreaker:
    """Notices that a host has stopped answering, so a run can stop, not retry forever.

    Per host, it counts the requests in a row that got no answer at all (refused,
    reset, timed out). After ``failures`` of them the breaker is open: requests to
    the host wait in :meth:`admit`, and one at a time goes through as a probe (at
    most one per ``probe_interval`` seconds), so an outage is not hammered with
    every retry of every batch. An answer to the probe (even a 5xx) closes the
    breaker and lets the waiting requests go. Once the streak has lasted
    ``seconds``, the host is down for the rest of the run: :meth:`admit` and
    :meth:`check` raise :class:`~harvester.errors.OutageError`. Both a count and a
    time, because many requests in flight fail together in a fraction of a second
    when a server restarts, and a short blip should cost waiting, not the run.

    Parameters
    ----------
    failures : int
        Requests in a row without an answer that open the breaker; 0 turns it off.
    seconds : float
        How long a streak lasts before the host is down.
    probe_interval : float
        Least time between two probes of an open breaker.
    clock : callable
        Monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        failures: int = 20,
        seconds: float = 15.0,
        probe_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = int(failures)
        self.seconds = float(seconds)
        self.probe_interval = float(probe_interval)
        self._clock = clock
        self._streak: dict[str, tuple[int, float, str]] = {}  # host: (count, since, last)
        self._down: dict[str, str] = {}
        self._probing: set[str] = set()
        self._next_probe: dict[str, float] = {}
        self._changed: dict[str, anyio.Event] = {}
        #: Requests that were held back while a breaker was open.
        self.held = 0

    def check(self, host: str) -> None:
        """Raise :class:`~harvester.errors.OutageError` if ``host`` is down."""
        why = self._down.get(host)
        if why is not None:
            raise OutageError(why)

    def is_open(self, host: str) -> bool:
        """Whether requests to ``host`` are held back (one probe at a time)."""
        streak = self._streak.get(host)
        return self.failures > 0 and streak is not None and streak[0] >= self.failures

    async def admit(self, host: str) -> None:
        """Wait until a request to ``host`` may be sent; then report its outcome
        with :meth:`answered`, :meth:`failed` or :meth:`release`.

        Raises
        ------
        OutageError
            The host is down.
        """
        held = False
        while True:
            self.check(host)
            if not self.is_open(host):
                return
            now = self._clock()
            if host not in self._probing and now >= self._next_probe.get(host, 0.0):
                self._probing.add(host)
                return
            if not held:
                held = True
                self.held += 1
            event = self._changed.setdefault(host, anyio.Event())
            with anyio.move_on_after(self.probe_interval):
                await event.wait()

    def _notify(self, host: str) -> None:
        self._probing.discard(host)
        event = self._changed.pop(host, None)
        if event is not None:
            event.set()

    def answered(self, host: str) -> None:
        """A request to ``host`` got an answer: its streak ends."""
        self._streak.pop(host, None)
        self._notify(host)

    def release(self, host: str) -> None:
        """A request admitted by :meth:`admit` ended without telling (cancelled)."""
        self._notify(host)

    def failed(self, host: str, error: str) -> None:
        """A request to ``host`` got no answer (``error`` says how)."""
        if self.failures <= 0 or host in self._down:
            self._notify(host)
            return
        now = self._clock()
        count, since, _ = self._streak.get(host, (0, now, error))
        count += 1
        self._streak[host] = (count, since, error)
        self._next_probe[host] = now + self.probe_interval
        if count >= self.failures and now - since >= self.seconds:
            self._down[host] = (
                f"{host} is down: {count} requests in a row got no answer over "
                f"{now - since:.1f} s (last: {error}); no more requests were sent to it"
            )
        self._notify(host)

    def down(self) -> dict[str, str]:
        """Hosts found down, with why."""
        return dict(self._down)

    def __repr__(self) -> str:
        return f"CircuitBreaker(failures={self.failures}, seconds={self.seconds})"


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

    async def penalize(self, seconds: float) -> None:
        """The service said 429 (a quota): nothing here, since the request's retry
        waits the server's ``Retry-After`` itself and the :class:`_Quota` of the
        client holds the others back; a cluster's limiter pauses every worker."""

    def __repr__(self) -> str:
        return f"AdaptiveRateLimiter(ceiling={self.ceiling}, rate={self.rate})"


class RateGate(Protocol):
    """A rate limiter a client's requests go through, one per service.

    :class:`AdaptiveRateLimiter` in one process; in a distributed run, a limiter
    whose tokens come from one bucket shared by every worker.
    """

    async def acquire(self) -> None:
        """Wait until a request may start."""

    def on_success(self) -> None:
        """An answer without overload."""

    def on_overload(self) -> None:
        """The service answered 503."""

    async def penalize(self, seconds: float) -> None:
        """The service answered 429: start no request for ``seconds``."""


class ClientLimits:
    """How a client's limits are made: in one process, the configured ones.

    A distributed run subclasses it (``harvester.dask``): rates held across the
    cluster, and each worker a share of the requests in flight per host.
    """

    #: Whether a service's ``X-RateLimit-*`` headers may let requests skip the even
    #: pacing of its quota (``service.quota_burst``): true where this client is the
    #: only one spending the quota; a cluster's workers cannot see each other's.
    quota_headers_suffice: bool = True

    def rate(self, service: str, per_second: float) -> RateGate:
        """The limiter of ``service`` (``per_second``: its quota; 0 = none)."""
        return AdaptiveRateLimiter(ceiling=per_second)

    def per_host(self, configured: int) -> int:
        """Requests in flight per host for this client, of ``configured`` in all."""
        return configured

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---- retry and isolation ---------------------------------------------------------------

S = TypeVar("S")
R = TypeVar("R")


@dataclass
class _Budget:
    """What a unit of work and every part it is split into share: one deadline and
    one pool of retries (a part's first attempt is isolation, not a retry)."""

    retries: int
    deadline: float


@dataclass
class Isolated(Generic[S, R]):
    """What :func:`isolate` made of a unit of work.

    ``results``: what the parts that succeeded returned, and in
    ``result_attempts`` the tries each took (its own and those of every unit it
    was split from). ``failures``: ``(part, error, attempts)`` for each part that
    failed, attempts counted the same way. ``attempts``: tries of the whole unit
    before it succeeded, failed or was split.
    """

    results: list[R] = field(default_factory=list)
    result_attempts: list[int] = field(default_factory=list)
    failures: list[tuple[S, BaseException, int]] = field(default_factory=list)
    attempts: int = 0


async def isolate(
    call: Callable[[S], Awaitable[R]],
    work: S,
    policy: RetryPolicy,
    split: Callable[[S], Sequence[S]],
    clock: Callable[[], float] = time.monotonic,
) -> Isolated[S, R]:
    """Run ``call(work)`` under ``policy``; split ``work`` to isolate what fails.

    One mechanism for every source:

    * a retryable error (:meth:`RetryPolicy.retryable`) is retried after the
      policy's delay while the unit's shared budget lasts (``policy.attempts - 1``
      retries in all and ``policy.total`` seconds, for the unit and all its parts),
      then the part fails whole: an outage costs at most the policy's attempts per
      unit of work, never attempts times targets;
    * any other :class:`~harvester.errors.HarvesterError` or ``OSError`` (a bad
      box, a corrupt or missing image) splits the part with ``split`` (which
      returns ``[]`` for a part that cannot be split), and the halves run
      concurrently, each with one free first attempt; an unsplittable part fails;
    * :class:`~harvester.errors.OutageError` and every other exception propagate:
      an outage stops the run, anything else is a bug, not a target's failure.

    Parameters
    ----------
    call : async callable
        Does one part of the work.
    work : S
        The unit of work.
    policy : RetryPolicy
    split : callable
        Parts of a part (e.g. its two halves), or an empty sequence.
    clock : callable
        Monotonic clock for the deadline.
    """
    budget = _Budget(retries=max(0, policy.attempts - 1), deadline=clock() + policy.total)
    out: Isolated[S, R] = Isolated()
    out.attempts = await _attempt(call, work, policy, split, clock, budget, 0, out)
    return out


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception a group stands for: an outage first, else the first one."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack[:0] = list(e.exceptions)
        else:
            leaves.append(e)
    return next((e for e in leaves if isinstance(e, OutageError)), leaves[0])


async def _attempt(
    call: Callable[[S], Awaitable[R]],
    work: S,
    policy: RetryPolicy,
    split: Callable[[S], Sequence[S]],
    clock: Callable[[], float],
    budget: _Budget,
    before: int,
    out: Isolated[S, R],
) -> int:
    """Try one part until it succeeds, fails or is split; return its own attempts."""
    tries = 0
    while True:
        tries += 1
        try:
            result = await call(work)
            out.results.append(result)
            out.result_attempts.append(before + tries)
            return tries
        except OutageError:
            raise
        except (HarvesterError, OSError) as exc:
            error: BaseException = exc
            if policy.retryable(exc):
                wait = policy.delay(tries, exc)
                if budget.retries > 0 and clock() + wait <= budget.deadline:
                    budget.retries -= 1
                    await anyio.sleep(wait)
                    continue
                out.failures.append((work, error, before + tries))
                return tries
        parts = split(work)
        if not parts:
            out.failures.append((work, error, before + tries))
            return tries
        try:
            async with anyio.create_task_group() as tg:
                for part in parts:
                    tg.start_soon(
                        _attempt, call, part, policy, split, clock, budget, before + tries, out
                    )
        except BaseExceptionGroup as group:
            # A part's outage or bug, as itself rather than wrapped once per split.
            raise _leaf(group) from None
        return tries
