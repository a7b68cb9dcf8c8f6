"""Connection guards: a header-read timeout and a cap on connections per client.

aiohttp closes a keep-alive connection that has been idle ``keepalive_timeout``
seconds (its timer also runs from the connection's opening), but by default only
after an hour, and it has no header timeout: a client trickling a request head a
line a second (slowloris) holds its connection as long as it likes, and one
client can open any number of them. So every connection the service accepts goes
through a :class:`ConnectionGuard` (see :class:`GuardedSite`):

* a connection must deliver a complete request head within ``header_timeout``
  seconds of opening, and a kept-alive one within ``header_timeout`` of the first
  byte of its next request; else it gets ``408`` and is closed. While a request is
  being answered no timer runs (a slow cutout is not a slow client). The head is
  known complete when the application sees the request
  (:meth:`ConnectionGuard.request_started`, called by the outermost middleware);
* an idle keep-alive connection is closed after ``keepalive_timeout`` (aiohttp's
  own timer, given to the runner), and so is a kept-alive connection holding a
  partial head that stopped arriving;
* a client (IP address) may hold ``max_connections_per_client`` connections; one
  more is closed at once, unanswered and unread.

Each connection's aiohttp protocol is wrapped by a small protocol that forwards
every callback to it, so aiohttp parses and answers as usual.

Dependency rule: aiohttp and the standard library only.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import cast

from aiohttp import web

__all__ = ["ConnectionGuard", "GuardedSite"]

_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\n\r\n"
    b"Request Timeout\n"
)


class ConnectionGuard:
    """Connections of one application: counts per client, header timers, counters.

    Used on the event loop's thread only; the counters may be read from any thread.

    Attributes
    ----------
    accepted : int
        Connections let in.
    refused : int
        Connections closed at once, their client holding ``max_per_client``.
    header_timeouts : int
        Connections closed for not delivering a request head in time.
    """

    def __init__(self, header_timeout: float, max_per_client: int) -> None:
        self.header_timeout = header_timeout
        self.max_per_client = max_per_client
        self.accepted = 0
        self.refused = 0
        self.header_timeouts = 0
        self._open: Counter[str] = Counter()
        self._by_handler: dict[object, _GuardedProtocol] = {}

    def open_connections(self, client: str | None = None) -> int:
        """Connections open now: all, or those of one client IP address."""
        return self._open[client] if client is not None else sum(self._open.values())

    def protocol(self, inner: asyncio.Protocol) -> asyncio.Protocol:
        """Wrap the protocol of a new connection (a protocol factory's result)."""
        return _GuardedProtocol(self, inner)

    def request_started(self, handler: object) -> None:
        """The application got a request from the connection of this aiohttp
        handler (``request.protocol``): its head is complete."""
        conn = self._by_handler.get(handler)
        if conn is not None:
            conn.busy()

    def request_finished(self, handler: object) -> None:
        """The application is done with the connection's request."""
        conn = self._by_handler.get(handler)
        if conn is not None:
            conn.idle()

    def _admit(self, client: str) -> bool:
        if self._open[client] >= self.max_per_client:
            self.refused += 1
            return False
        self._open[client] += 1
        self.accepted += 1
        return True

    def _release(self, client: str) -> None:
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]


class _GuardedProtocol(asyncio.Protocol):
    """One connection: forwards to aiohttp's protocol, runs the header timer."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._client: str | None = None  # None: refused (or not yet made)
        self._timer: asyncio.TimerHandle | None = None
        #: "head" (waiting for a request head, the timer running), "busy" (a request
        #: being answered) or "idle" (between requests).
        self._state = "head"

    # -- the connection's life ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self._guard._admit(client):
            transport.close()
            return
        self._client = client
        self._guard._by_handler[self._inner] = self
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._client is None:
            return
        if self._state == "idle":  # the first byte of the next request
            self._state = "head"
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._client is not None else None

    def pause_writing(self) -> None:
        if self._client is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._client is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client is None:
            return
        self._cancel()
        self._guard._by_handler.pop(self._inner, None)
        self._guard._release(self._client)
        self._client = None
        self._inner.connection_lost(exc)

    # -- request state, told by the application -----------------------------------------

    def busy(self) -> None:
        self._state = "busy"
        self._cancel()

    def idle(self) -> None:
        self._state = "idle"

    # -- the header timer -----------------------------------------------------------------

    def _arm(self) -> None:
        self._cancel()
        self._timer = self._loop.call_later(self._guard.header_timeout, self._expire)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if self._state != "head" or transport is None or transport.is_closing():
            return
        self._guard.header_timeouts += 1
        transport.write(_TIMEOUT_ANSWER)
        transport.close()


class GuardedSite(web.BaseSite):
    """A TCP site (like :class:`aiohttp.web.TCPSite`) whose connections pass
    through a :class:`ConnectionGuard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        guard = self._guard

        def factory() -> asyncio.Protocol:
            return guard.protocol(server())

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog
        )
