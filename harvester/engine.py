"""The harvest task graph and the library API.

::

    targets ─► plan ─► [specs] ─► worker ×concurrency ──────────► [batches] ─► caller
              (numpy)   bounded   read (threads, a capacity         bounded
                                  limiter), then write: sinks,
                                  then ledger (threads)

Every stage is a task of one task group owned by the :class:`Harvester` (an async
context manager); streams between stages are bounded, so memory does not grow with
the number of targets. Blocking work (reads, FITS and HDF5 writes, SQLite) runs in
worker threads under capacity limiters. Cancelling the consumer (Ctrl-C, a
cancelled notebook cell, leaving the ``async for``) cancels the stages; a thread
finishes the batch it is on, whose files are written atomically, and the ledger
only records batches whose outputs are in place.

With ``run.engine = "dask"`` (or a Dask ``client``), :meth:`Harvester.run` runs
the same stages in shards on a Dask cluster (:mod:`harvester.dask`); the plan,
the ledger, ``stack.h5`` and the grid pages stay here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from ._epoch_outputs import check_epoch_outputs
from ._epoch_plan import EpochPlan, make_epoch_plan
from ._epoch_run import EpochCatalogSource, check_epoch_source, done_pairs, find_epochs
from ._pipeline import MAX_BATCH_BYTES, BatchResult, HarvestRun, ProgressHook, RunContext
from ._tap_targets import load_query_targets, query_text
from .config import RunConfig
from .cutout import Cutout, CutoutBatch
from .errors import ConfigError, HarvesterError
from .plan import Plan, make_plan
from .repo import Repository
from .report import Report
from .sources.base import Source
from .sources.open import open_repository_and_source, open_source, retry_policy
from .targets import Targets, TargetSource, load_targets, random_targets

__all__ = [
    "MAX_BATCH_BYTES",
    "BatchResult",
    "HarvestRun",
    "Harvester",
    "Report",
    "RunContext",
    "load_run_targets",
    "random_targets",
    "run",
]

_G = TypeVar("_G", bound=AsyncIterator[Any])


def load_run_targets(
    config: RunConfig, repo: Repository, targets: TargetSource | Targets | None = None
) -> Targets:
    """Load and validate a run's targets (``config.targets`` when None); blocking.

    A target list may be a file, ``random:N``, or an ADQL query (``adql:...``,
    ``@file.adql``): that one is asked of the TAP service once and kept in the
    output folder (see :mod:`harvester._tap_targets`).

    Raises
    ------
    ConfigError
        Neither ``targets`` nor ``config.targets`` names a target list.
    TargetError
        The list is unusable (with ``on_error = "raise"``, a bad row too).
    """
    if isinstance(targets, Targets):
        return targets
    source = targets if targets is not None else config.targets
    if source is None:
        raise ConfigError("no targets: give a target list or set run.targets")
    if isinstance(source, str) and source.startswith("random:"):
        return random_targets(repo, source, config.seed)
    if isinstance(source, str) and (query := query_text(source)) is not None:
        return load_query_targets(config, repo, query)
    return load_targets(
        source,
        columns=config.columns,
        skymap=repo.skymap,
        on_error=config.on_error,
        max_size=config.max_size,
        bands_allowed=config.bands,
    )


class Harvester:
    """Harvest cutouts for target lists; an async context manager owning the run.

    Examples
    --------
    >>> async with Harvester(config) as h:              # doctest: +SKIP
    ...     async for cutout in h.harvest("targets.csv"):
    ...         print(cutout.id, cutout.image.shape)
    ...     report = await h.run("more_targets.csv")

    Constructing stores the configuration only; the repository is opened on entry.
    With ``run.source = "butler"``, ``butler`` is a Butler to use (the one a
    notebook holds) instead of opening ``butler.repo``::

        butler = Butler("dp1", collections="LSSTComCam/DP1")
        async with Harvester(config.replace(source="butler"), butler=butler) as h: ...

    ``client``, an asynchronous ``distributed.Client``, runs :meth:`run` in shards
    on its cluster (as ``run.engine = "dask"`` does with ``[dask]``'s cluster);
    the client is not closed here::

        async with Client(address, asynchronous=True) as client:
            async with Harvester(config, client=client) as h: ...
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        progress: ProgressHook | None = None,
        butler: Any = None,
        client: Any = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.butler = butler
        #: An asynchronous ``distributed.Client``: run on its cluster (engine "dask").
        self.client = client
        self._dask: Any = None
        self._repo: Repository | None = None
        self._source: Source | None = None
        self.retry = retry_policy(config)
        self._tg: TaskGroup | None = None
        self._open: list[Any] = []

    async def __aenter__(self) -> Harvester:
        if "template_coadd" in self.config.images and self.config.source != "local":
            raise ConfigError(
                f"run.images with template_coadd: the {self.config.source!r} source reads "
                "deep_coadd only so far; use run.source = 'local'"
            )
        self._repo, self._source = await open_repository_and_source(self.config, self.butler)
        try:
            if self.client is not None or self.config.engine == "dask":
                self._dask = await _open_dask(self.config, self.client)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._source.aclose()
            raise
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        try:
            with anyio.CancelScope(shield=True):
                await self._close_stale()
            assert self._tg is not None
            return await self._tg.__aexit__(*exc)
        except BaseExceptionGroup as group:
            # One failing stage is the usual case: show its error, not a group of one.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            with anyio.CancelScope(shield=True):
                if self._dask is not None:
                    await self._dask.__aexit__(None, None, None)
                    self._dask = None
                if self._source is not None:
                    await self._source.aclose()
            self._tg = None

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            raise RuntimeError("use `async with Harvester(config) as h:` first")
        return self._repo

    # ---- planning -------------------------------------------------------------

    @property
    def context(self) -> RunContext:
        """What a pipeline needs of this harvester: small, frozen, picklable parts."""
        return RunContext(
            config=self.config,
            repo=self.repo,
            retry=self.retry,
            progress=self.progress,
            open_source=functools.partial(open_source, self.config, self.butler),
        )

    def load(self, targets: TargetSource | Targets | None = None) -> Targets:
        """Load and validate targets (the config's target list when None).

        This blocks while it reads the list; from async code (a notebook) use
        :meth:`aload`.
        """
        return load_run_targets(self.config, self.repo, targets)

    async def aload(self, targets: TargetSource | Targets | None = None) -> Targets:
        """:meth:`load` in a worker thread, so the event loop keeps running."""
        return await anyio.to_thread.run_sync(self.load, targets)

    def plan(self, targets: TargetSource | Targets | None = None) -> Plan:
        """The plan for a target list: boxes, images, and :meth:`Plan.quote`.

        This blocks while it loads and plans; from async code use :meth:`aplan`.

        Raises
        ------
        ConfigError
            For a single-epoch run (``run.images``): use :meth:`epoch_plan`.
        """
        if self.config.single_epoch:
            raise ConfigError("a single-epoch run (run.images) is planned by epoch_plan()")
        t = self.load(targets)
        side = self.config.size.pixels(self.repo.skymap)
        config = self.config
        return make_plan(t, self.repo, config.bands, side, config.planes, config.images)

    def epoch_plan(self, targets: TargetSource | Targets | None = None) -> EpochPlan:
        """The plan of a single-epoch run: every (target, image) pair the footprint
        index finds for ``run.images``, ``run.bands`` and ``run.time``, grouped into
        units per image, and :meth:`EpochPlan.quote`. Without the pairs the output
        folder's ledger has done (blocking; the ledger is only read).

        Raises
        ------
        ConfigError
            For a source whose epochs come from a catalogue (a service, a Butler):
            use :meth:`aepoch_plan`.
        """
        if isinstance(self._source, EpochCatalogSource):
            raise ConfigError(
                f"the {self.config.source!r} source finds epochs through its catalogue: "
                "use `await h.aepoch_plan()`"
            )
        return self._epoch_plan(self.load(targets))

    async def aepoch_plan(self, targets: TargetSource | Targets | None = None) -> EpochPlan:
        """:meth:`epoch_plan` for every source: a remote one's catalogue is asked for
        the targets' epoch images first (its lines in the quote); planning runs in a
        worker thread."""
        t = await self.aload(targets)
        source: object = self._source
        self._repo = await find_epochs(source, self.repo, t, self.config)
        plan = await anyio.to_thread.run_sync(self._epoch_plan, t)
        if isinstance(source, EpochCatalogSource):
            plan.lookup = tuple(source.lookup_lines())
        return plan

    def _epoch_plan(self, t: Targets) -> EpochPlan:
        done: list[tuple[str, str]] = []
        ledger = None if self.config.output is None else self.config.output / "ledger.sqlite"
        if ledger is not None and ledger.is_file():
            done = done_pairs(ledger)
        return make_epoch_plan(t, self.repo, self.config, done)

    async def aplan(self, targets: TargetSource | Targets | None = None) -> Plan:
        """:meth:`plan` in a worker thread: ``quote = (await h.aplan(t)).quote()``."""
        return await anyio.to_thread.run_sync(self.plan, targets)

    # ---- running --------------------------------------------------------------

    def harvest(self, targets: TargetSource | Targets | None = None) -> AsyncIterator[Cutout]:
        """Yield every target's cutout as it is ready (outputs and ledger written first).

        Targets the ledger already has as done are skipped (resume). Order follows
        the work (by patch), not the target list; ``cutout.index`` gives the position.
        Leaving the loop early stops the harvest; its cleanup runs at the latest when
        the next harvest starts or the ``async with`` block ends.
        """
        return self._track(self._cutouts(targets))

    async def _cutouts(self, targets: TargetSource | Targets | None) -> AsyncIterator[Cutout]:
        # aclosing: `async for` does not close the inner generator when this one is
        # closed, and asyncio would then finalise it later, racing the next run.
        async with contextlib.aclosing(self._batches(targets, _Stats())) as batches:
            async for batch in batches:
                for cutout in batch:
                    yield cutout

    async def run(self, targets: TargetSource | Targets | None = None) -> Report:
        """Harvest everything into the configured outputs; return the report.

        Targets that fail are recorded (ledger and ``Report.failures``), not
        raised; a service outage stops the run early (``Report.stopped``).

        Raises
        ------
        ConfigError, TargetError
            The configuration or the target list is unusable.
        """
        stats = _Stats()
        batches = self._track(self._batches(targets, stats, recycle=True))
        async for _ in batches:
            pass  # with recycle, the stages keep the batches to themselves
        assert stats.report is not None
        return stats.report

    def _track(self, gen: _G) -> _G:
        # An async generator left by `break` is only finalised when collected; keep it,
        # so the next harvest (or __aexit__) can close it first, in order.
        self._open.append(gen)
        return gen

    async def _close_stale(self, keep: Any = None) -> None:
        while self._open and self._open[0] is not keep:
            await self._open.pop(0).aclose()

    async def _batches(
        self, targets: TargetSource | Targets | None, stats: _Stats, recycle: bool = False
    ) -> AsyncGenerator[CutoutBatch, None]:
        if self._tg is None or self._source is None:
            raise RuntimeError("use `async with Harvester(config) as h:` first")
        await self._close_stale(keep=self._open[-1] if self._open else None)
        if self._dask is not None and not recycle:
            raise ConfigError(
                "harvest() streams cutouts into this process; with the dask engine the "
                "workers write them: use run() and read the outputs"
            )
        source = self._source
        if self.config.single_epoch:
            _check_epoch_run(self.config, source, recycle, self._dask is not None)
        t0 = time.perf_counter()
        loaded = await self.aload(targets)
        if self.config.single_epoch:
            # A remote source's catalogue: the epoch images these targets need.
            self._repo = await find_epochs(source, self.repo, loaded, self.config)
        run = await anyio.to_thread.run_sync(HarvestRun.prepare, self.context, loaded, recycle)
        send, receive = anyio.create_memory_object_stream[CutoutBatch](1)
        scope = anyio.CancelScope()
        done = anyio.Event()

        opens: list[int] = []

        async def pipeline() -> None:
            try:
                with scope:
                    if self._dask is not None:
                        async with send:
                            opens.append((await self._dask.run(run)).opens)
                    else:
                        await run.execute(send, source)
            finally:
                done.set()

        self._tg.start_soon(pipeline)
        try:
            async with receive:
                async for batch in receive:
                    yield batch
        finally:
            # Leaving early (break, error, cancellation) stops the stages too.
            scope.cancel()
            with anyio.CancelScope(shield=True):
                await done.wait()
                opened = opens[0] if opens else source.opens
                stats.report = await anyio.to_thread.run_sync(run.finish, t0, opened)


def _check_epoch_run(config: RunConfig, source: Source, recycle: bool, dask: bool) -> None:
    """What a single-epoch run needs: run() (its per-target outputs are made at the
    end, from every epoch), an output folder, a source that reads epoch units."""
    if not recycle:
        raise ConfigError(
            "harvest() streams coadd cutouts; a single-epoch run (run.images) makes its "
            "per-target outputs from every epoch at the end: use run() and read the outputs"
        )
    if config.output is None:
        raise ConfigError("a single-epoch run (run.images) needs an output folder (run.output)")
    check_epoch_source(config, source, dask)
    check_epoch_outputs(config)


async def _open_dask(config: RunConfig, client: Any) -> Any:
    """The Dask engine, entered (imported only here: ``import harvester`` never
    imports Dask)."""
    from .dask import require_dask

    require_dask()
    from .dask._engine import DaskEngine

    engine = DaskEngine(config, client)
    return await engine.__aenter__()


@dataclass
class _Stats:
    report: Report | None = None


def run(
    config: RunConfig,
    targets: TargetSource | Targets | None = None,
    progress: ProgressHook | None = None,
) -> Report:
    """Synchronous :meth:`Harvester.run` for scripts.

    Raises
    ------
    HarvesterError
        When called from a running event loop (a notebook): ``await`` the async API
        there instead; starting a second loop in a thread would block the first.
    ConfigError, TargetError
        As :meth:`Harvester.run`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # no loop running: we may start one
    else:
        raise HarvesterError(
            "harvester.run() cannot be called from a running event loop (Jupyter); use "
            "`async with Harvester(config) as h: report = await h.run(targets)` instead"
        )

    async def main() -> Report:
        async with Harvester(config, progress=progress) as h:
            return await h.run(targets)

    return anyio.run(main)
