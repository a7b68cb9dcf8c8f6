"""TAP in one server: the engine, the job runner, and their life cycle.

:func:`tap_lifecycle` is the application's cleanup context when TAP is on: it
starts the engine (on the event loop's own thread, since the throwaway
cluster's postmaster is bound to the thread that starts it; this blocks the
loop for the second or two before the server listens), runs the job runner for
the server's lifetime, and closes both on the way out. The server calls
:meth:`TapService.publish` once it listens, which loads ``ivoa.ObsCore`` for
its URL and marks TAP up.

Dependency rule: :mod:`._engine`, :mod:`._jobs`; the service's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from ...repo import Repository
from .._settings import ServiceSettings
from ._engine import TapEngine
from ._jobs import JobRunner

__all__ = ["TapService"]

log = logging.getLogger("harvester.service.tap")


class TapService:
    """The TAP part of a running server (``app[STATE].tap``)."""

    def __init__(
        self, settings: ServiceSettings, repo: Repository, clock: Callable[[], float]
    ) -> None:
        self.engine = TapEngine(settings, repo)
        self.clock = clock
        self._runner: JobRunner | None = None

    @property
    def ready(self) -> bool:
        """Up: tables loaded, ObsCore published, jobs accepted."""
        return self.engine.ready and self._runner is not None

    @property
    def jobs(self) -> JobRunner:
        if self._runner is None:
            raise RuntimeError("TAP is not running")
        return self._runner

    async def publish(self, base_url: str) -> None:
        """Load ObsCore for ``base_url``; TAP is up after this."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.engine.executor, self.engine.publish, base_url)
        log.info("TAP is up at %s/api/tap", base_url)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start the engine and the job runner; stop both on exit."""
        loop = asyncio.get_running_loop()
        self.engine.start_cluster()  # here: the postmaster follows this thread
        try:
            await loop.run_in_executor(self.engine.executor, self.engine.load)
        except BaseException:
            await loop.run_in_executor(None, self.engine.close)
            raise
        runner = JobRunner(self.engine, self.clock)
        task = asyncio.create_task(runner.serve(), name="harvester-tap-jobs")
        self._runner = runner
        try:
            yield
        finally:
            self._runner = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await loop.run_in_executor(None, self.engine.close)
