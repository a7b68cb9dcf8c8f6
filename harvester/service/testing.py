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

TAP (``harvester[tap]``, PostgreSQL and pg_sphere; :func:`tap_unavailable` says
why not when they are missing): one throwaway cluster per test session, one
fresh database per server::

    with tap_cluster() as cluster:                      # once, e.g. a session fixture
        with serve_tap_in_thread(repo, cluster) as tap:  # or: async with serve_tap(...)
            tap.tap_url      # http://127.0.0.1:<port>/api/tap
            tap.token        # a token with read:tap and read:image
            tap.base_url     # the server (discovery: {base_url}/repertoire/discovery)
            tap.server       # the ServerHandle (records, stats, faults)

``tests/conftest.py`` wraps these as the fixtures ``tap_cluster`` (skipping
loudly, with the reason, where TAP cannot run) and ``tap_server``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..repo import Repository
from ._app import announce, create_app
from ._connections import ConnectionGuard
from ._faults import FaultInjector
from ._server import start_runner
from ._settings import ServiceSettings
from ._state import STATE, RequestRecord, ServiceState

if TYPE_CHECKING:
    from .tap._postgres import PostgresCluster

__all__ = [
    "DEFAULT_TAP_TOKEN",
    "FakeClock",
    "ServerHandle",
    "TapServer",
    "serve",
    "serve_in_thread",
    "serve_tap",
    "serve_tap_in_thread",
    "tap_cluster",
    "tap_unavailable",
]

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
    try:
        await announce(app, url)
    except BaseException:
        await runner.cleanup()
        raise
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


# ---- TAP -------------------------------------------------------------------------

#: The token :func:`serve_tap` and :func:`serve_tap_in_thread` accept by default.
DEFAULT_TAP_TOKEN = "tap-token"


def tap_unavailable() -> str | None:
    """Why TAP cannot run here, or ``None`` if it can.

    Checks the ``tap`` extra (psycopg, queryparser), PostgreSQL with pg_sphere,
    and, as root, a ``postgres`` user for ``initdb``.
    """
    import os
    import pwd

    from .tap._engine import check_tap_modules
    from .tap._postgres import TapUnavailable, find_postgres

    try:
        check_tap_modules()
        find_postgres()
    except TapUnavailable as exc:
        return str(exc)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' user to run initdb as"
    return None


@contextmanager
def tap_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL + pg_sphere cluster, stopped and removed on exit.

    Start it from a thread that outlives its use (the test session's): the
    postmaster stops when the thread that started it ends.

    Raises
    ------
    harvester.service.tap.TapUnavailable
        If it cannot run here (see :func:`tap_unavailable`).
    """
    from .tap._postgres import PostgresCluster

    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass(frozen=True)
class TapServer:
    """A running server with TAP: where it is and a token that reaches it."""

    server: ServerHandle
    token: str

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def tap_url(self) -> str:
        """``<base>/api/tap``, as discovery lists it (``datasets.dp1.services.tap.url``)."""
        return f"{self.server.base_url}/api/tap"

    @property
    def dsn(self) -> str:
        """The server's own database (for checks that bypass TAP)."""
        dsn = self.server.state.settings.tap_dsn
        assert dsn is not None
        return dsn


def _tap_settings(
    cluster: PostgresCluster, settings: ServiceSettings | None, token: str
) -> ServiceSettings:
    base = settings or ServiceSettings()
    tokens = dict(base.tokens)
    tokens.setdefault(token, frozenset({"read:tap", "read:image"}))
    return base.replace(tap=True, tap_dsn=cluster.new_database(), tokens=tokens)


@contextmanager
def serve_tap_in_thread(
    repo: Repository,
    cluster: PostgresCluster,
    settings: ServiceSettings | None = None,
    token: str = DEFAULT_TAP_TOKEN,
) -> Iterator[TapServer]:
    """:func:`serve_in_thread` with TAP on a fresh database of ``cluster``.

    ``settings`` default to :class:`ServiceSettings`; ``token`` is added to its
    tokens with ``read:tap`` and ``read:image`` (unless it is there already).
    Returns once TAP is up (tables loaded, ObsCore published).
    """
    with serve_in_thread(repo, _tap_settings(cluster, settings, token)) as server:
        yield TapServer(server, token)


@asynccontextmanager
async def serve_tap(
    repo: Repository,
    cluster: PostgresCluster,
    settings: ServiceSettings | None = None,
    token: str = DEFAULT_TAP_TOKEN,
) -> AsyncIterator[TapServer]:
    """:func:`serve` with TAP on a fresh database of ``cluster`` (see
    :func:`serve_tap_in_thread`)."""
    loop = asyncio.get_running_loop()
    tap_settings = await loop.run_in_executor(None, _tap_settings, cluster, settings, token)
    async with serve(repo, tap_settings) as server:
        yield TapServer(server, token)
