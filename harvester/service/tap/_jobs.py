"""Async TAP jobs: the store, and the task group that runs them.

:class:`JobRunner` owns every running job: :meth:`JobRunner.serve` is one task
for the server's lifetime (started and cancelled by the application's life
cycle) holding a task group; a job sent to :meth:`JobRunner.submit` becomes a
task of that group, and the group also sweeps jobs past their destruction time.
Cancelling the runner cancels the jobs, which cancel their queries in the
database. No task outlives the server.

A job runs in the engine's worker threads (translation, then the database)
under ``asyncio.timeout(executionDuration)``; ABORT and DELETE cancel the job's
task, and a cancelled job cancels its query through the connection.

Dependency rule: asyncio, :mod:`._engine`, :mod:`._uws`, :mod:`._votable`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from ._adql import AdqlError
from ._engine import TapEngine
from ._params import UsageFault, check_query, maxrec_value
from ._query import CancelToken
from ._uws import ACTIVE, FINISHED, Job
from ._votable import result_document

__all__ = ["JobRunner", "JobStoreFull"]

log = logging.getLogger("harvester.service.tap")


class JobStoreFull(Exception):
    """Every job slot holds an active job."""


class JobRunner:
    """The jobs of one server and the tasks that run them."""

    def __init__(self, engine: TapEngine, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._inbox: asyncio.Queue[Job] = asyncio.Queue()

    # ---- the store -----------------------------------------------------------------

    def create(self, owner: str, params: dict[str, str]) -> Job:
        """A new PENDING job (the oldest finished job goes if the store is full).

        Raises
        ------
        JobStoreFull
        """
        if len(self.jobs) >= self.settings.tap_max_jobs:
            done = sorted(
                (j for j in self.jobs.values() if j.phase not in ACTIVE), key=lambda j: j.creation
            )
            if not done:
                raise JobStoreFull(f"{len(self.jobs)} jobs are running or queued")
            self.delete(done[0].id)
        now = self.clock()
        job = Job(
            id=secrets.token_hex(8),
            owner=owner,
            params=params,
            creation=now,
            execution_duration=int(self.settings.tap_execution_duration),
            destruction=now + self.settings.tap_retention,
        )
        self.jobs[job.id] = job
        return job

    def get(self, job_id: str, owner: str) -> Job | None:
        job = self.jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def owned(self, owner: str) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.owner == owner), key=lambda j: j.creation)

    def run(self, job: Job) -> None:
        """PENDING -> QUEUED now, EXECUTING when a worker takes it."""
        if job.phase != "PENDING":
            return
        job.set_phase("QUEUED", self.clock())
        self._inbox.put_nowait(job)

    def abort(self, job: Job) -> None:
        if job.phase in FINISHED:
            return
        task = self._tasks.get(job.id)
        if task is not None:
            task.cancel()
        job.error = "aborted"
        job.set_phase("ABORTED", self.clock())

    def delete(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self.abort(job)

    # ---- running ---------------------------------------------------------------------

    async def serve(self) -> None:
        """Run submitted jobs and sweep expired ones until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._sweep())
            while True:
                job = await self._inbox.get()
                if job.phase == "QUEUED":
                    self._tasks[job.id] = group.create_task(self._execute(job))

    async def _sweep(self, every: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every)
            now = self.clock()
            for job in [j for j in self.jobs.values() if j.destruction <= now]:
                self.delete(job.id)

    async def _execute(self, job: Job) -> None:
        try:
            await self._execute_job(job)
        finally:
            self._tasks.pop(job.id, None)

    async def _execute_job(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        cancel = CancelToken()
        params = job.params
        settings = self.settings
        try:
            check_query(params)
            maxrec = maxrec_value(params.get("MAXREC"), settings.tap_hardlimit, settings.tap_maxrec)
        except UsageFault as exc:
            self._fail(job, f"UsageFault: {exc}")
            return
        duration = float(job.execution_duration)
        job.set_phase("EXECUTING", self.clock())
        work = loop.run_in_executor(
            self.engine.executor, self.engine.run, params.get("QUERY", ""), maxrec, duration, cancel
        )
        try:
            async with asyncio.timeout(duration):
                result = await asyncio.shield(work)
        except AdqlError as exc:
            self._fail(job, str(exc))
        except TimeoutError:
            await _stop(work, cancel)
            self._fail(job, f"query exceeded the execution duration of {duration:g} s")
        except asyncio.CancelledError:
            await _stop(work, cancel)
            raise
        except Exception as exc:
            # A bug: the server answers it as it answers a failing handler (500),
            # the job records it instead of taking every other job down with it.
            log.exception("TAP job %s failed", job.id)
            self._fail(job, f"internal error: {type(exc).__name__}: {exc}")
        else:
            body = result_document(result.fields, result.rows, result.overflow)
            job.result, job.rows = body, len(result.rows)
            job.set_phase("COMPLETED", self.clock())

    def _fail(self, job: Job, message: str) -> None:
        job.error = message
        job.set_phase("ERROR", self.clock())


async def _stop(work: asyncio.Future[Any], cancel: CancelToken) -> None:
    """Cancel a worker's query and wait for its thread to give up.

    Sent again every half second: a cancel that reaches the database between
    two statements (or before the query starts) is lost.
    """
    while not work.done():
        cancel.cancel()
        await asyncio.wait({work}, timeout=0.5)
    if not work.cancelled():
        work.exception()  # retrieved: the job records why it stopped, not this
