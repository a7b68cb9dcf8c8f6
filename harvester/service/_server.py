"""Run the service in the foreground (the ``harvester serve`` command), and start
an application's listener (also used by :mod:`.testing`).

Dependency rule: :mod:`._app`, :mod:`._connections`, :mod:`._settings` and
:mod:`._state` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..repo import Repository
from ._app import announce, create_app
from ._connections import GuardedSite
from ._settings import ServiceSettings
from ._state import STATE

__all__ = ["run_server", "start_runner"]


async def start_runner(app: web.Application, host: str, port: int, **kw: Any) -> web.AppRunner:
    """Set up ``app`` and listen on ``host:port``, through its connection guard.

    The application's ``keepalive_timeout`` setting goes to aiohttp's request
    handler; other keywords to :class:`aiohttp.web.AppRunner`. Call
    ``runner.cleanup()`` to stop.
    """
    state = app[STATE]
    runner = web.AppRunner(
        app, handle_signals=False, keepalive_timeout=state.settings.keepalive_timeout, **kw
    )
    await runner.setup()
    try:
        await GuardedSite(runner, host, port, state.connections).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def _serve_forever(
    repo: Repository,
    settings: ServiceSettings,
    host: str,
    port: int,
    ready: Callable[[str], None] | None,
) -> None:
    app = create_app(repo, settings)
    runner = await start_runner(app, host, port, shutdown_timeout=5.0)
    try:
        bound_host, bound_port = runner.addresses[0][:2]
        shown = "127.0.0.1" if bound_host in ("0.0.0.0", "::") else bound_host
        if ":" in shown:
            shown = f"[{shown}]"
        url = f"http://{shown}:{bound_port}"
        await announce(app, settings.base_url or url, bound_host not in ("0.0.0.0", "::"))
        if ready is not None:
            ready(settings.base_url or url)
        stop = asyncio.Event()
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                # SIGTERM (kill, systemd, docker stop) shuts down as Ctrl-C does, so the
                # TAP database and its folder go too, unless the caller handles it
                # already (harvester serve does); only in the main thread.
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run_server(
    repo: Repository,
    settings: ServiceSettings,
    host: str = "127.0.0.1",
    port: int = 8080,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``repo`` until interrupted (KeyboardInterrupt propagates).

    Parameters
    ----------
    repo : Repository
    settings : ServiceSettings
    host, port : str, int
        Where to listen; port 0 picks a free one.
    ready : callable, optional
        Called with the base URL once the server listens.
    """
    settings.check_startable()
    asyncio.run(_serve_forever(repo, settings, host, port, ready))
