"""The worker side: each worker's open source, and the shard task.

:class:`HarvestPlugin` is registered once per run; ``setup`` runs on each worker's
event loop (now, and on workers that join later) and opens the run's repository
and source there, as :class:`~harvester.engine.Harvester` does in one process:
the HTTP session, the limiters (:class:`~._limits.ClusterLimits`: quotas from the
scheduler's buckets, a share of the connections per host) and the image handle
cache. Every shard the worker runs shares them; ``teardown`` closes them.

:func:`harvest_shard` is the task: it runs one shard with :func:`harvester._shard.
run_shard` on the worker's event loop (an ``async`` task; reads, writes and
planning in threads). It lives in the installed package, not in ``__main__``,
so workers import it instead of unpickling a copy: every worker needs the same
harvester installed.

The plugin also tunes glibc's allocator in the worker process
(:func:`harvester._os.tune_worker_malloc`): Dask's own setting made every
temporary array a fresh ``mmap``.

Dependency rule: ``distributed``, :mod:`harvester._os`, :mod:`harvester._shard`, ``_pipeline``,
``sources.open`` and :mod:`._limits`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from .._os import tune_worker_malloc
from .._pipeline import RunContext
from .._shard import ShardResult, ShardSpec, run_shard
from ..config import RunConfig
from ..errors import HarvesterError
from ..sources.base import BufferPool, Source
from ..sources.open import open_repository_and_source, retry_policy
from ._limits import ClusterLimits, scheduler_calls

__all__ = ["HarvestPlugin", "WorkerState", "harvest_shard"]


@dataclass
class WorkerState:
    """What one worker holds for a run."""

    context: RunContext
    source: Source
    limits: ClusterLimits
    buffers: BufferPool


class HarvestPlugin(WorkerPlugin):
    """Opens the run's source on each worker (see the module docstring).

    Parameters
    ----------
    name : str
        The plugin's name (one per run: ``harvester-<token>``).
    config : RunConfig
        The run's configuration, paths absolute (the workers' current folder may
        not be the driver's).
    workers : int
        Workers the connections per host are split among.
    """

    def __init__(self, name: str, config: RunConfig, workers: int) -> None:
        self.name = name
        self.config = config
        self.workers = workers
        # Per worker address: LocalCluster(processes=False) may hand several
        # workers of one process the same plugin object.
        self._states: dict[str, WorkerState] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_states": {}}  # an open source never travels

    async def setup(self, worker: Any) -> None:
        tune_worker_malloc()  # see there: Dask's allocator setting costs a fault per page
        reserve, penalize = scheduler_calls(worker)
        limits = ClusterLimits(self.config.service.url, self.workers, reserve, penalize)
        repo, source = await open_repository_and_source(self.config, None, limits)
        context = RunContext(config=self.config, repo=repo, retry=retry_policy(self.config))
        # One pool for the worker's shards: batches in flight, per shard at once.
        slots = int(getattr(worker.state, "nthreads", 1) or 1)
        buffers = BufferPool(keep=(self.config.fetch.concurrency + 1) * slots)
        self._states[worker.address] = WorkerState(context, source, limits, buffers)

    async def teardown(self, worker: Any) -> None:
        state = self._states.pop(worker.address, None)
        if state is not None:
            await state.source.aclose()

    def state(self, address: str) -> WorkerState:
        found = self._states.get(address)
        if found is None:
            raise HarvesterError(
                f"worker {address}: the run's source is not open there (its plugin "
                f"{self.name} failed to set up: see the worker's log)"
            )
        return found


async def harvest_shard(plugin: str, spec: ShardSpec) -> ShardResult:
    """The shard task: run ``spec`` with this worker's source; its rows and tallies."""
    worker = get_worker()
    found = worker.plugins.get(plugin)
    if not isinstance(found, HarvestPlugin):
        raise HarvesterError(f"worker {worker.address}: no harvester plugin {plugin!r}")
    state = found.state(worker.address)
    result = await run_shard(state.context, state.source, spec, state.buffers)
    return dataclasses.replace(result, worker=worker.address)
