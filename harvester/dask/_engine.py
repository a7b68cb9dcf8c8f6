"""The driver of a Dask run: the cluster, the window of shards, the ledger.

:class:`DaskEngine` is what :class:`~harvester.engine.Harvester` uses instead of
running the stages itself when ``run.engine = "dask"`` or it was given a client:

1. it connects to ``dask.scheduler`` (or ``dask.scheduler_file``), uses the
   client it was given, or starts a ``LocalCluster`` that stops with it;
2. it registers :class:`~._limits.RatePlugin` on the scheduler (the quota
   buckets) and, once, a :class:`~._worker.HarvestPlugin` (each worker's source),
   with the configuration's paths made absolute;
3. it cuts the prepared run into shards lazily (:func:`harvester._shard.
   make_shards`) and keeps ``window`` shards per worker thread in flight:
   ``as_completed`` and ``add``, so the driver holds the plan and a window of
   shards, never all of them; keys are ``shard-<run>-<n>``;
4. as each shard comes back its rows go into the ledger (a thread) and the
   progress hook hears of it; a shard whose workers kept dying
   (``KilledWorker``) has its targets recorded ``failed`` with the reason; after
   an outage (a shard's report says the run stopped) the shards not yet sent are
   recorded ``failed`` without a request, as in one process;
5. on cancellation (Ctrl-C, a cancelled cell, an error) the shards in flight are
   cancelled before it returns, and a cluster it started is closed.

The run's ``finish`` (``stack.h5``, grid pages, the ledger's summary) stays the
caller's, as in one process.

Dependency rule: ``distributed``, :mod:`harvester._shard`, ``_pipeline``,
``config``, :mod:`._limits` and :mod:`._worker`.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio
import distributed
from distributed.scheduler import KilledWorker

from .._pipeline import HarvestRun
from .._shard import ShardResult, ShardWork, absorb, make_shards
from ..config import DaskConfig, FetchConfig, RunConfig
from ..errors import ConfigError
from ._limits import RatePlugin
from ._worker import HarvestPlugin, harvest_shard

__all__ = ["ClusterNote", "DaskEngine", "DaskStats"]

#: Dask's client API is typed in part only; it is used through ``Any`` here.
_dd: Any = distributed


@runtime_checkable
class ClusterNote(Protocol):
    """A progress hook that also shows where the cluster is (the CLI's bar)."""

    def cluster(self, text: str) -> None: ...


@dataclasses.dataclass
class DaskStats:
    """What the driver saw: shards done, failed, and their time on the workers."""

    shards: int = 0
    killed: int = 0
    worker_seconds: float = 0.0
    opens: int = 0
    workers: dict[str, int] = dataclasses.field(default_factory=dict)


class DaskEngine:
    """Runs prepared harvests in shards on a Dask cluster; an async context manager.

    Parameters
    ----------
    config : RunConfig
        The run's configuration (``config.dask``: the cluster and the shards).
    client : distributed.Client, optional
        An asynchronous client of a running cluster; it stays open afterwards.
    """

    def __init__(self, config: RunConfig, client: Any = None) -> None:
        if config.output is None:
            raise ConfigError(
                "run.engine = 'dask' needs an output folder (run.output): shards write "
                "their files there and the driver its ledger"
            )
        self.config = config
        self.settings: DaskConfig = config.dask
        self.client: Any = client
        self._own = client is None
        self._stack = AsyncExitStack()
        self.slots = 1
        self.workers = 1
        self.dashboard: str | None = None
        self.stats = DaskStats()
        #: The worker plugin's name: one per engine, so runs on one cluster never mix.
        self.plugin = f"harvester-{secrets.token_hex(4)}"

    async def __aenter__(self) -> DaskEngine:
        try:
            if self.client is None:
                self.client = await self._connect()
            client: Any = self.client
            if client.asynchronous is False:
                raise ConfigError("Harvester(client=...) needs Client(..., asynchronous=True)")
            await client.register_plugin(RatePlugin())
            info = await client.scheduler.identity(n_workers=-1)
            threads = [int(w["nthreads"]) for w in info["workers"].values()]
            if not threads:
                raise ConfigError(f"the Dask cluster at {client.scheduler.address} has no workers")
            self.workers, self.slots = len(threads), sum(threads)
            running = "dashboard" in (info.get("services") or {})
            self.dashboard = client.dashboard_link if running else None
            # Now, not per run: each worker imports harvester and opens the source
            # (seconds, in a fresh process) before the first shard is timed.
            plugin = HarvestPlugin(self.plugin, self.worker_config(), self.workers)
            await client.register_plugin(plugin)
            self._stack.push_async_callback(self._unregister)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self._stack.aclose()

    async def _connect(self) -> Any:
        s = self.settings
        stack = self._stack
        if s.scheduler or s.scheduler_file:
            address = s.scheduler or None
            where = s.scheduler or s.scheduler_file
            try:
                client = await _dd.Client(
                    address,
                    scheduler_file=s.scheduler_file or None,
                    asynchronous=True,
                    timeout=30,
                )
            except (OSError, TimeoutError, ValueError) as exc:
                raise ConfigError(f"dask: cannot reach the scheduler {where}: {exc}") from exc
            stack.push_async_callback(client.close)
            return client
        cluster = await _dd.LocalCluster(
            n_workers=s.workers,
            threads_per_worker=s.threads_per_worker,
            processes=s.processes,
            dashboard_address=s.dashboard or None,
            asynchronous=True,
        )
        stack.push_async_callback(cluster.close)
        client = await _dd.Client(cluster, asynchronous=True)
        stack.push_async_callback(client.close)
        return client

    # ---- one run ----------------------------------------------------------------------

    def worker_config(self) -> RunConfig:
        """The configuration the workers get: paths absolute, ``fetch.rate`` split."""
        c = self.config
        out = c.output.resolve() if c.output is not None else None
        rate = c.fetch.rate / self.slots if c.fetch.rate > 0 else 0.0
        fetch = FetchConfig(**{**dataclasses.asdict(c.fetch), "rate": rate})
        return c.replace(repo=Path(c.repo).resolve(), output=out, fetch=fetch)

    async def _unregister(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.client.unregister_worker_plugin(self.plugin)

    async def run(self, run: HarvestRun) -> DaskStats:
        """Run ``run``'s plan in shards; its ledger is written as they come back."""
        if self.client is None:
            raise RuntimeError("use `async with DaskEngine(...)` first")
        self.stats = DaskStats()
        await self._shards(self.client, run, self.plugin)
        return self.stats

    async def _shards(self, client: Any, run: HarvestRun, plugin: str) -> None:
        total, done = len(run.plan), 0
        progress = run.ctx.progress
        hook: object = progress  # a ProgressHook; maybe a ClusterNote too
        if isinstance(hook, ClusterNote):
            where = f", dashboard {self.dashboard}" if self.dashboard else ""
            hook.cluster(f"{self.workers} Dask workers, {self.slots} shards at once{where}")
        if progress is not None:
            progress(0, total)
        works: Iterator[ShardWork] = make_shards(run, self.settings.shard_size)
        # Shards sent and not yet settled, by key: at most the window.
        flying: dict[str, tuple[ShardWork, Any]] = {}
        window = self.settings.window * self.slots

        def submit(work: ShardWork) -> Any:
            future = client.submit(harvest_shard, plugin, work.spec, key=work.spec.key, pure=False)
            flying[work.spec.key] = (work, future)
            return future

        futures = [submit(w) for w in itertools.islice(works, window)]
        pending = _dd.as_completed(futures)
        try:
            async for future in pending:
                work, _ = flying[future.key]
                await self._settle(run, work, future)
                del flying[future.key]
                done += len(work.spec)
                if progress is not None:
                    progress(done, total)
                if run.stopped is not None:
                    break  # an outage: nothing more is sent
                nxt = next(works, None)
                if nxt is not None:
                    pending.add(submit(nxt))
            if run.stopped is not None:
                async for future in pending:  # the shards already out finish
                    work, _ = flying[future.key]
                    await self._settle(run, work, future)
                    del flying[future.key]
                await anyio.to_thread.run_sync(_fail_rest, run, works, run.stopped)
                if progress is not None:
                    progress(total, total)
        finally:
            if flying:
                with anyio.CancelScope(shield=True):
                    await client.cancel([f for _, f in flying.values()])

    async def _settle(self, run: HarvestRun, work: ShardWork, future: Any) -> None:
        """Commit a finished shard, or record its targets failed if its workers died."""
        try:
            result: ShardResult = await future
        except KilledWorker as exc:
            self.stats.killed += 1
            reason = (
                f"KilledWorker: the workers running shard {work.spec.key} died "
                f"{exc.allowed_failures + 1} times ({exc})"
            )
            await anyio.to_thread.run_sync(_fail, run, work, reason)
            return
        self.stats.shards += 1
        self.stats.worker_seconds += result.seconds
        self.stats.opens += result.opens
        self.stats.workers[result.worker] = self.stats.workers.get(result.worker, 0) + 1
        await anyio.to_thread.run_sync(absorb, run, result)


def _fail(run: HarvestRun, work: ShardWork, reason: str) -> None:
    for spec in work.batches:
        run.fail(spec, reason, 1)


def _fail_rest(run: HarvestRun, works: Iterator[ShardWork], reason: str) -> None:
    for work in works:
        _fail(run, work, reason)


def describe(engine: DaskEngine) -> dict[str, Any]:
    """The engine's cluster and shard counts, for reports and benchmarks."""
    return {
        "workers": engine.workers,
        "slots": engine.slots,
        "dashboard": engine.dashboard,
        **dataclasses.asdict(engine.stats),
    }
