"""Run the data service on loopback for tests and benchmarks.

Two ways, both on ``127.0.0.1`` with a free port:

* :func:`serve` — an async context manager for async code (the server runs on the
  caller's event loop)::

      async with serve(repo, ServiceSettings(tokens={"tok": {"read:image"}})) as server:
          ...  # server.base_url, server.app["received"]

* :func:`serve_in_thread` — a plain context manager that runs the server in a
  background thread with its own event loop, for synchronous clients (pyvo,
  requests)::

      with serve_in_thread(repo, settings) as server:
          requests.get(server.base_url + "/repertoire/discovery")

An outage on the data routes, for a client's outage test::

    server.faults.down = True  # the same object as server.state.faults
    ...  # every SIA, DataLink, SODA, storage and results request is reset
    assert server.faults.refused_while_down > 0
    server.faults.down = False

:class:`FakeClock` is a settable wall clock to pass as ``ServiceSettings.clock`` to
test expiry and quota windows without sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..repo import Repository
from ._app import create_app
from ._connections import ConnectionGuard
from ._faults import FaultInjector
from ._server import start_runner
from ._settings import ServiceSettings
from ._state import STATE, RequestRecord, ServiceState

__all__ = ["FakeClock", "ServerHandle", "serve", "serve_in_thread"]

_HOST = "127.0.0.1"


class FakeClock:
    """A wall clock that moves only when told to (epoch seconds)."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds

    def __repr__(self) -> str:
        return f"FakeClock({self.now!r})"


@dataclass(frozen=True)
class ServerHandle:
    """A running server: the URL it listens on, its application and how to stop it.

    ``base_url`` is the loopback address even when ``ServiceSettings.base_url``
    sets another public URL (which the server then writes into its answers).

    ``stop()`` works for :func:`serve_in_thread` (leaving the ``with`` block stops
    it too); in :func:`serve` use ``await aclose()`` or leave the ``async with``.
    """

    base_url: str
    app: web.Application
    _stop: Callable[[], None] | None = field(default=None, repr=False)
    _aclose: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    @property
    def state(self) -> ServiceState:
        return self.app[STATE]

    @property
    def faults(self) -> FaultInjector:
        """The fault injector, with the outage switch: ``server.faults.down = True``
        (the same object as ``server.state.faults``)."""
        return self.app[STATE].faults

    @property
    def connections(self) -> ConnectionGuard:
        """The connection guard: ``accepted``, ``refused``, ``header_timeouts``."""
        return self.app[STATE].connections

    @property
    def received(self) -> deque[RequestRecord]:
        """Records of the requests received (never header or parameter values)."""
        return self.app[STATE].received

    @property
    def stats(self) -> Counter[tuple[str, int]]:
        """``Counter`` of ``(route kind, status)``."""
        return self.app[STATE].stats

    def stop(self) -> None:
        """Stop a threaded server (idempotent)."""
        if self._stop is None:
            raise RuntimeError("stop() is for serve_in_thread; use `await aclose()`")
        self._stop()

    async def aclose(self) -> None:
        """Stop a server started with :func:`serve` (idempotent)."""
        if self._aclose is None:
            raise RuntimeError("aclose() is for serve; use stop()")
        await self._aclose()


async def _start(app: web.Application, port: int) -> tuple[web.AppRunner, str]:
    runner = await start_runner(app, _HOST, port, access_log=None, shutdown_timeout=2.0)
    bound = runner.addresses[0]
    url = f"http://{_HOST}:{bound[1]}"
    app[STATE].bound_url = url
    return runner, url


@asynccontextmanager
async def serve(
    repo: Repository, settings: ServiceSettings | None = None, port: int = 0
) -> AsyncIterator[ServerHandle]:
    """Run the service on the current event loop, on loopback.

    Parameters
    ----------
    repo : Repository
    settings : ServiceSettings, optional
    port : int
        0 picks a free port.
    """
    app = create_app(repo, settings)
    runner, url = await _start(app, port)
    closed = False

    async def aclose() -> None:
        nonlocal closed
        if not closed:
            closed = True
            await runner.cleanup()

    try:
        yield ServerHandle(url, app, _aclose=aclose)
    finally:
        await aclose()


@contextmanager
def serve_in_thread(
    repo: Repository,
    settings: ServiceSettings | None = None,
    port: int = 0,
    timeout: float = 30.0,
) -> Iterator[ServerHandle]:
    """Run the service in a background thread with its own event loop, on loopback.

    For synchronous clients (pyvo, requests). The application is built in the
    calling thread, so configuration errors raise here.
    """
    app = create_app(repo, settings)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            runner, url = loop.run_until_complete(_start(app, port))
        except BaseException as exc:  # reported to the caller below
            box["error"] = exc
            started.set()
            loop.close()
            return
        box["url"] = url
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name="harvester-serve", daemon=True)
    thread.start()
    started.wait(timeout)
    if "error" in box:
        raise box["error"]
    if "url" not in box:
        raise TimeoutError(f"the server did not start within {timeout} s")
    lock = threading.Lock()

    def stop() -> None:
        with lock:
            if thread.is_alive():
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)

    try:
        yield ServerHandle(box["url"], app, _stop=stop)
    finally:
        stop()
