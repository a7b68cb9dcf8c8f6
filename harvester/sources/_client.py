"""The HTTP transport of remote sources: auth, limits, error mapping.

:class:`ServiceClient` makes every request of a remote run:

* the bearer token only for URLs equal to or under a discovered service prefix
  (as ``lsst.rsp``'s ``_RSPAuth``), and never for signed storage or SODA result
  URLs (``auth=False``); redirects are never followed implicitly;
* one capacity limiter per host; an AIMD token bucket per service (quotas, and
  back-off on 503); the server's ``X-RateLimit-Remaining``/``Reset`` respected
  before a request is sent, so a quota window is not overrun by requests in flight;
* a :class:`~harvester.limits.CircuitBreaker` per host: after
  ``service.outage_failures`` requests in a row without an answer, requests wait
  while one probe at a time tries the host; once the streak has lasted
  ``service.outage_seconds``, no more requests go to it and each raises
  :class:`~harvester.errors.OutageError`, which stops the run;
* answers mapped onto the error hierarchy: no answer, a reset, a timeout, a
  truncated body, 429 and 5xx are :class:`~harvester.errors.TransientError`
  (with the server's ``Retry-After`` or ``X-RateLimit-Reset``); a refused signed
  URL (400/403 from storage) is :class:`ExpiredUrl`; other 4xx are
  :class:`RefusedError` (a :class:`~harvester.errors.UsageError`). Messages name
  the method and the URL without its query string; the token is in none of them.

Dependency rule: aiohttp, anyio, :mod:`harvester.config`, ``errors`` and ``limits``.
"""

from __future__ import annotations

import contextlib
import email.utils
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import anyio

from ..config import ServiceConfig
from ..errors import TransientError, UsageError
from ..limits import AdaptiveRateLimiter, CircuitBreaker, ClientLimits, HostLimits, RateGate

__all__ = [
    "ClientStats",
    "ExpiredUrl",
    "NoAnswerError",
    "RefusedError",
    "Response",
    "ServiceClient",
    "first_line",
    "retry_after",
    "safe_url",
]


class ExpiredUrl(TransientError):
    """Storage refused a signed URL (400/403): fetch a fresh one and try again."""


class NoAnswerError(TransientError):
    """A request that got no answer at all: refused, reset, timed out."""


class RefusedError(UsageError):
    """A 4xx answer that retrying will not change; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def safe_url(url: str) -> str:
    """A URL for messages: no query string (signatures), no fragment."""
    return url.split("?", 1)[0].split("#", 1)[0]


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or HTTP-date) or ``X-RateLimit-Reset``."""
    now = time.time() if now is None else now
    value = headers.get("Retry-After")
    if value:
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - now)
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        try:
            return max(0.0, float(reset) - now)
        except ValueError:
            return None
    return None


def first_line(body: bytes, limit: int = 200) -> str:
    text = body[:2000].decode("utf-8", errors="replace").strip()
    if "QUERY_STATUS" in text:  # a VOTable error document: its INFO text
        m = re.search(r'name="QUERY_STATUS"[^>]*>([^<]*)<', text)
        if m:
            text = m.group(1).strip()
    line = text.splitlines()[0] if text else ""
    return line[:limit]


# ---- the client ------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """An answer, body read in full (or not at all for an abandoned probe).

    ``to_headers``: seconds from sending the request to its answer's headers;
    ``body_seconds``: seconds then spent reading the body.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str
    to_headers: float = 0.0
    body_seconds: float = 0.0


@dataclass
class ClientStats:
    """Requests made, by service and by status (``error`` for no answer)."""

    requests: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_received: int = 0
    token_sent: dict[str, int] = field(default_factory=dict)
    #: Requests sent at once on the server's word (X-RateLimit-Remaining), by service.
    vouched: dict[str, int] = field(default_factory=dict)

    def count(self, service: str, status: str) -> None:
        self.requests[service] = self.requests.get(service, 0) + 1
        by = self.statuses.setdefault(service, {})
        by[status] = by.get(status, 0) + 1


def _at_ceiling(gate: RateGate) -> bool:
    """Whether ``gate`` runs at its configured rate (not slowed by a 503), so the
    server's quota headers may stand in for it; a cluster's gate never does."""
    return isinstance(gate, AdaptiveRateLimiter) and gate.rate >= gate.ceiling


class _Quota:
    """What the server's ``X-RateLimit-*`` headers say is left of a quota window.

    ``X-RateLimit-Reset`` is in whole seconds (rounded up), so a window may end up
    to a second before it says. With the window's length known (``per_minute``, the
    configured quota, and ``X-RateLimit-Limit`` give it) and the answer to the
    request that opened the window seen (``X-RateLimit-Used: 1``), the window is
    taken to end that long after this answer arrived, if that is within the second
    the header allows: never before the true end, since the server counted the
    request before answering it.
    """

    def __init__(self, per_minute: float = 0.0) -> None:
        self.per_minute = per_minute
        self.remaining: int | None = None
        self.reset = 0.0
        self.limit = 0
        self.opened: float | None = None  # by then (client clock) the window had begun
        self.inflight = 0
        self._answered = anyio.Event()
        #: Whether the server sends X-RateLimit headers (None: no answer yet).
        self.headed: bool | None = None

    def end(self) -> float:
        """When the current window ends, as well as the client can tell."""
        if self.opened is None or self.per_minute <= 0 or self.limit <= 0:
            return self.reset
        guess = self.opened + 60.0 * self.limit / self.per_minute
        return guess if self.reset - 1.0 < guess < self.reset else self.reset

    async def wait(self, clock: Callable[[], float], burst: bool = False) -> bool:
        """Wait until the window allows one more request, and count it in flight.

        Returns whether the server's headers vouch for it (the window has room for
        it beside every request in flight). With ``burst`` (and a quota), while
        nothing is known of the current window one request at a time goes out to
        learn it, and the rest wait for its answer rather than go out blind; a
        server that sends no headers is paced by the caller's even gate instead.
        """
        burst = burst and self.per_minute > 0
        while True:
            if self.remaining is None:
                if not burst or self.inflight == 0 or self.headed is False:
                    known = False
                    break
                await self._answered.wait()
                continue
            if self.remaining - self.inflight > 0:
                known = True
                break
            now, end = clock(), self.end()
            if now >= end:
                self.remaining = None  # a new window: learn it again
                continue
            await anyio.sleep(min(end - now, 60.0) + 0.01)
        self.inflight += 1
        return known

    def done(self, headers: Mapping[str, str] | None, answered: float) -> None:
        """A request of this service is over (``headers``: its answer's, if any)."""
        self.inflight -= 1
        if headers is not None:
            self.headed = self.headed or "X-RateLimit-Remaining" in headers
            self.update(headers, answered)
        self._answered.set()
        self._answered = anyio.Event()

    def update(self, headers: Mapping[str, str], answered: float | None = None) -> None:
        try:
            remaining = int(headers["X-RateLimit-Remaining"])
            reset = float(headers["X-RateLimit-Reset"])
        except (KeyError, ValueError):
            return
        if reset > self.reset:
            self.reset, self.remaining, self.opened = reset, remaining, None
        elif reset == self.reset and self.remaining is not None:
            self.remaining = min(self.remaining, remaining)
        with contextlib.suppress(KeyError, ValueError):
            self.limit = int(headers["X-RateLimit-Limit"])
            if reset == self.reset and int(headers["X-RateLimit-Used"]) == 1:
                self.opened = answered


class ServiceClient:
    """Every HTTP request of a remote run: auth, limits, error mapping; see module doc.

    Parameters
    ----------
    settings : ServiceConfig
    token : str or None
        The resolved token (never stored anywhere else, never in a message).
    limits : ClientLimits, optional
        Where the rate limiters and the per-host share come from (a distributed
        run's are held across the cluster); default: this process's own.
    """

    def __init__(
        self, settings: ServiceConfig, token: str | None, limits: ClientLimits | None = None
    ) -> None:
        self.settings = settings
        self._token = token
        self.prefixes: tuple[str, ...] = ()
        self.limits = limits or ClientLimits()
        self.burst = settings.quota_burst and self.limits.quota_headers_suffice
        self.per_host = self.limits.per_host(settings.connections_per_host)
        self.hosts = HostLimits(self.per_host)
        self.breaker = CircuitBreaker(settings.outage_failures, settings.outage_seconds)
        self.rates: dict[str, RateGate] = {}
        self._quotas: dict[str, _Quota] = {}
        self.stats = ClientStats()
        self.clock: Callable[[], float] = time.time
        self._auth_failure: str | None = None
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"ServiceClient({self.settings.url!r}, token={'set' if self._token else 'none'})"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            s = self.settings
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=s.timeout_connect, sock_read=s.timeout_read
                ),
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=self.per_host),
                headers={"User-Agent": "harvester"},
            )
            # aiohttp silently resends an idempotent request once when a reused
            # connection drops; every retry here is the engine's, counted in the
            # ledger, so turn that off (as aiohttp's own test client does).
            if hasattr(self._session, "_retry_connection"):
                self._session._retry_connection = False
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def rate(self, service: str) -> RateGate:
        found = self.rates.get(service)
        if found is None:
            per_minute = {
                "cutout": self.settings.cutout_per_minute,
                "sia": self.settings.sia_per_minute,
            }.get(service, 0.0)
            found = self.rates[service] = self.limits.rate(service, per_minute / 60.0)
        return found

    def may_send_token(self, url: str) -> bool:
        """True for URLs equal to or under a discovered service prefix."""
        bare = safe_url(url)
        return any(bare == p or bare.startswith(p + "/") for p in self.prefixes)

    async def request(
        self,
        method: str,
        url: str,
        *,
        service: str,
        params: Sequence[tuple[str, str]] | None = None,
        data: Sequence[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: bool = True,
        probe: bool = False,
    ) -> Response:
        """Make one request; return 2xx/3xx answers, raise for the others.

        ``auth=False`` never sends the token (signed URLs); ``auth=True`` sends it
        only to service URLs. ``probe`` abandons a 200 body unread.

        Raises
        ------
        TransientError
            No answer, a truncated body, 429, 5xx (:class:`ExpiredUrl` for a
            refused signed URL, ``service="storage"`` or ``"results"``).
        UsageError
            Any other 4xx.
        """
        if self._auth_failure is not None:
            raise RefusedError(self._auth_failure, 401)
        where = f"{method} {safe_url(url)}"
        quota = self._quotas.get(service)
        if quota is None:
            per_minute = {
                "cutout": self.settings.cutout_per_minute,
                "sia": self.settings.sia_per_minute,
            }.get(service, 0.0)
            quota = self._quotas[service] = _Quota(per_minute)
        # With the server's word that its window has room (and no overload
        # slowing this service), a request need not wait its even share of the
        # quota: a fixed window's allowance is the server's to give.
        vouched = await quota.wait(self.clock, self.burst)
        response: Response | None = None
        try:
            gate = self.rate(service)
            if not (vouched and _at_ceiling(gate)):
                await gate.acquire()
            else:
                self.stats.vouched[service] = self.stats.vouched.get(service, 0) + 1
            send = dict(headers or {})
            if auth and self._token and self.may_send_token(url):
                send["Authorization"] = f"Bearer {self._token}"
                self.stats.token_sent[service] = self.stats.token_sent.get(service, 0) + 1
            host = urlsplit(url).netloc
            async with self.hosts.limiter(host):
                # Checked once a connection slot is free: requests queued behind an
                # outage are not sent once it is known.
                await self.breaker.admit(host)
                try:
                    response = await self._send(method, url, service, params, data, send, probe)
                except NoAnswerError as exc:
                    self.breaker.failed(host, str(exc))
                    raise
                except BaseException:
                    self.breaker.release(host)
                    raise
                self.breaker.answered(host)
        finally:
            quota.done(None if response is None else response.headers, self.clock())
        if response.status == 429:
            # A quota overrun: the service's limiter holds back its other requests
            # (in a cluster, every worker's) until the server's window ends.
            await self.rate(service).penalize(retry_after(response.headers) or 1.0)
        self._check(where, service, response)
        return response

    async def _send(
        self,
        method: str,
        url: str,
        service: str,
        params: Sequence[tuple[str, str]] | None,
        data: Sequence[tuple[str, str]] | None,
        headers: dict[str, str],
        probe: bool,
    ) -> Response:
        where = f"{method} {safe_url(url)}"
        t0 = time.perf_counter()
        try:
            async with self.session.request(
                method,
                url,
                params=params,
                data=data,
                headers=headers,
                allow_redirects=False,
            ) as resp:
                t1 = time.perf_counter()
                if probe and resp.status == 200:
                    resp.close()  # do not download a whole file to learn "no ranges"
                    body = b""
                else:
                    body = await resp.read()
                status, got = resp.status, resp.headers
                t2 = time.perf_counter()
        except aiohttp.ClientPayloadError as exc:
            self.stats.count(service, "error")
            raise TransientError(f"{where}: truncated body ({type(exc).__name__})") from exc
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            self.stats.count(service, "error")
            kind = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise NoAnswerError(f"{where}: {kind}") from exc
        self.stats.count(service, str(status))
        self.stats.bytes_received += len(body)
        length = got.get("Content-Length")
        encoded = got.get("Content-Encoding", "identity").lower() != "identity"
        abandoned = probe and status == 200
        if not (encoded or abandoned) and length and length.isdigit() and int(length) != len(body):
            raise TransientError(f"{where}: truncated body ({len(body)} of {length} bytes)")
        return Response(status, got, body, url, t1 - t0, t2 - t1)

    def _check(self, where: str, service: str, r: Response) -> None:
        rate = self.rate(service)
        s = r.status
        if s < 400:
            rate.on_success()
            return
        text = first_line(r.body)
        if s == 429:
            raise TransientError(
                f"{where}: 429 Too Many Requests (quota)", retry_after=retry_after(r.headers)
            )
        if s >= 500:
            if s == 503:
                rate.on_overload()
            wait = retry_after(r.headers) if "Retry-After" in r.headers else None
            raise TransientError(f"{where}: {s} {text}".rstrip(), retry_after=wait)
        if service in ("storage", "results") and s in (400, 403):
            raise ExpiredUrl(f"{where}: {s} (signed URL refused or expired)")
        if s == 401:
            self._auth_failure = (
                f"{where}: 401 Unauthorized: the token is missing, expired or invalid "
                "(set [service] token or ACCESS_TOKEN)"
            )
            raise RefusedError(self._auth_failure, s)
        if s == 403:
            raise RefusedError(
                f"{where}: 403 Forbidden: the token lacks a needed scope (read:image)", s
            )
        raise RefusedError(f"{where}: {s} {text}".rstrip(), s)
