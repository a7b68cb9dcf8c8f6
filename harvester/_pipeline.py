"""One harvest: its plan, ledger and sinks, and the stages that drive them.

:class:`HarvestRun` is built from a small frozen :class:`RunContext` (the
configuration, the repository, the retry policy, a progress hook and a source
factory), not from the :class:`~harvester.engine.Harvester` facade, so that the
same pipeline can run wherever a context can be sent. Its stages (a producer of
batch specs, ``concurrency`` workers) run in the caller's task group: a worker
reads a batch under the retry-and-isolation policy
(:func:`harvester.limits.isolate`), writes its outputs, then its ledger rows. At
the end the run builds ``stack.h5`` and the grid pages.

A service outage (:class:`~harvester.errors.OutageError`) stops the run from
starting work: every batch not yet read is recorded as ``failed`` with the
outage's message, without a request, and the report says why the run stopped.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import numpy as np
import numpy.typing as npt
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._epoch_outputs import check_epoch_outputs, finish_epochs
from ._epoch_plan import EpochPlan
from ._epoch_run import EpochRunState, prepare_epochs, read_epochs, write_unit
from ._os import release_free_memory
from ._resume import Resumed, resume
from .config import RunConfig
from .cutout import COVERAGE_STATUSES, CutoutBatch
from .epochs import EpochBatch, EpochSpec, concat_epoch_batches
from .errors import OutageError
from .ledger import BatchRecord, Recorder, Results
from .limits import RateLimiter, RetryPolicy, isolate
from .plan import BatchSpec, Plan, make_plan
from .repo import Repository
from .report import Report
from .sources.base import BufferPool, Source
from .targets import Targets

if TYPE_CHECKING:
    from .sinks.fits import FitsSink
    from .sinks.stack import StackSink

from .sinks.epoch_stack import EpochStackSink

#: A unit of work: a batch of coadd cutouts, or one single-epoch image's stamps.
Spec = BatchSpec | EpochSpec

__all__ = [
    "MAX_BATCH_BYTES",
    "BatchResult",
    "HarvestRun",
    "ProgressHook",
    "RunContext",
    "SourceFactory",
]

#: Largest batch in bytes of pixels; keeps a batch of 300 px cutouts from eating RAM.
#: Each batch costs a few thread and event-loop hand-offs: 16 MiB against 8 MiB took
#: the 10^5 50 px stack run from about 0.70 to 0.62 s (A/B, same process).
MAX_BATCH_BYTES = 16 * 2**20

_T = TypeVar("_T")

#: Called with (targets done, targets to do) as the run goes.
ProgressHook = Callable[[int, int], None]
#: Opens a source for a run that is not handed one (e.g. on another machine).
SourceFactory = Callable[[], Awaitable[Source]]


@dataclass(frozen=True)
class RunContext:
    """What a run needs from its owner: small, frozen, and free of the facade."""

    config: RunConfig
    repo: Repository
    retry: RetryPolicy
    progress: ProgressHook | None = None
    open_source: SourceFactory | None = None


@dataclass
class BatchResult:
    """A batch after its read: the cutouts, and the targets that failed.

    ``attempts``: tries of the whole batch; ``good_attempts``: tries of each of
    ``batch``'s cutouts when the batch was split and they differ; ``failures``
    holds ``(targets' plan indices, error, attempts)`` groups.
    """

    spec: Spec
    batch: CutoutBatch | EpochBatch | None
    attempts: int
    started: float
    finished: float
    failures: list[tuple[npt.NDArray[np.int64], str, int]] = field(default_factory=list)
    good_attempts: list[int] | None = None


class HarvestRun:
    """One harvest: its plan, ledger and sinks, and the stages that drive them.

    Build it with :meth:`prepare`; run it with :meth:`execute`; end it with
    :meth:`finish`, which returns the :class:`~harvester.report.Report`.
    """

    def __init__(
        self, ctx: RunContext, targets: Targets, plan: Plan | EpochPlan, resumed: Resumed
    ) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.targets = targets
        self.plan = plan
        self.resumed = resumed
        #: A single-epoch run's bookkeeping (its plan is an EpochPlan), or None.
        self.epochs: EpochRunState | None = None
        self.ledger = resumed.ledger
        #: Where batches are recorded: the ledger, or a shard's collector.
        self.recorder: Recorder | None = resumed.ledger
        #: Positions of the plan's targets in the target list, which the ledger and
        #: outputs name (a resumed run's plan, a shard's); None: the plan's own.
        self.positions: npt.NDArray[np.int64] | None = resumed.positions
        self.fits: FitsSink | None = None
        self.stack: StackSink | None = None
        self.processed = 0
        self.failures: list[tuple[str, str]] = []
        #: Why the run stopped starting work (a service outage), or None.
        self.stopped: str | None = None
        self._count_lock = threading.Lock()
        self._done = self._total = 0
        # Statuses of this run's target list: skipped ones as the ledger had them,
        # then this run's outcomes, tallied as batches are written.
        self.counts: Counter[str] = resumed.earlier + Counter(invalid=len(targets.bad))

    @classmethod
    def prepare(cls, ctx: RunContext, targets: Targets, recycle: bool = False) -> HarvestRun:
        """Open the ledger and sinks, plan what is left to do (blocking: use a thread).

        With ``recycle`` the batches are not handed to the caller; their arrays go
        back to a :class:`~harvester.sources.base.BufferPool` once written.
        """
        config = ctx.config
        resumed = resume(config, targets)
        try:
            plan: Plan | EpochPlan
            if config.single_epoch:
                check_epoch_outputs(config)
                plan = prepare_epochs(ctx.repo, config, resumed)
            else:
                side = config.size.pixels(ctx.repo.skymap)
                plan = make_plan(
                    resumed.todo, ctx.repo, config.bands, side, config.planes, config.images
                )
            if recycle:
                # Batches in flight at most: one per worker, and a spare.
                plan.buffers = BufferPool(keep=config.fetch.concurrency + 1)
            release_free_memory()
            run = cls(ctx, targets, plan, resumed)
            if isinstance(plan, EpochPlan):
                run.epochs = EpochRunState.of(plan)
            if resumed.ledger is not None and config.output is not None:
                run.open_sinks(config.output, resumed.ledger.run_id or 0)
        except BaseException:
            resumed.close()
            raise
        return run

    def open_sinks(
        self,
        out: Path,
        run_id: int,
        *,
        sweep: bool = True,
        part_tag: str = "",
        id_width: tuple[bool, int] | None = None,
    ) -> None:
        """Open the FITS and stack sinks of ``config.formats`` in ``out`` (blocking).

        ``sweep``: first drop temporary files a killed run left (never final names);
        a shard of a distributed run does not, as other shards are writing theirs.
        ``part_tag`` and ``id_width`` go to :class:`~harvester.sinks.stack.StackSink`.
        """
        for folder in (out, out / "fits", out / "stack_parts") if sweep else ():
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                tmp.unlink(missing_ok=True)
        formats = set(self.config.formats)
        if isinstance(self.plan, EpochPlan):
            # The per-target files are made at the end, from the stack's shards.
            assert self.epochs is not None
            self.stack = self.epochs.open_stack(
                self.ctx.repo, self.config, out, run_id, part_tag, id_width
            )
            return
        if "fits" in formats:
            from .sinks.fits import FitsSink

            self.fits = FitsSink(
                out, run_info={"HRUN": str(run_id)}, skymap=self.plan.skymap.config.name
            )
            self.fits.open()
        if formats & {"stack", "grid"}:
            from .sinks.stack import StackSink

            # Rows per cutout shape, so shards are sized for the run, not per batch.
            sides, counts = np.unique(self.plan.side, return_counts=True)
            rows = {(int(s), int(s)): int(c) for s, c in zip(sides, counts, strict=True)}
            self.stack = StackSink(
                out,
                run_id,
                self.plan.targets.id,
                rows,
                writers=self.config.fetch.concurrency,
                tag=part_tag,
                id_width=id_width,
            )
            self.stack.open()

    # ---- the stages -------------------------------------------------------------

    async def execute(
        self, out: MemoryObjectSendStream[CutoutBatch], source: Source | None = None
    ) -> None:
        """Run the stages; send each written batch to ``out`` (unless recycled).

        ``source``: the source to read from; without one, the context's
        ``open_source`` opens one for this run and closes it at the end.
        """
        fetch = self.config.fetch
        specs_send, specs_recv = anyio.create_memory_object_stream[Spec](2 * fetch.concurrency)
        rate = RateLimiter(fetch.rate)
        self._done, self._total = 0, len(self.plan)
        if self.ctx.progress is not None:
            self.ctx.progress(0, self._total)
        async with AsyncExitStack() as stack:
            if source is None:
                if self.ctx.open_source is None:
                    raise ValueError("RunContext.open_source is needed when no source is given")
                source = await self.ctx.open_source()
                stack.push_async_callback(source.aclose)
            async with out, anyio.create_task_group() as tg:
                tg.start_soon(self._produce, specs_send, rate)
                async with specs_recv:
                    for _ in range(fetch.concurrency):
                        tg.start_soon(self._work, source, specs_recv.clone(), out.clone())

    async def _work(
        self,
        source: Source,
        recv: MemoryObjectReceiveStream[Spec],
        out: MemoryObjectSendStream[CutoutBatch],
    ) -> None:
        """Read a batch, write it (outputs, then ledger rows), hand it on; repeat.

        The worker that read a batch writes it: its arrays are still in the CPU's
        cache, and no hand-off through the event loop sits between the two (against
        separate writer tasks: 0.80 -> 0.63 s per 10^5 50 px cutouts). The sinks
        and the ledger are safe to call from several threads.
        """
        async with recv, out:
            async for spec in recv:
                result = await self._read(source, spec)
                batch = await anyio.to_thread.run_sync(self._write, result)
                self._done += len(result.spec)
                if self.ctx.progress is not None:
                    self.ctx.progress(self._done, self._total)
                if batch is None:
                    continue
                if self.plan.buffers is not None:
                    # Written, and nobody else sees it (Harvester.run): reuse its arrays.
                    self.plan.buffers.give(batch.image, batch.variance, batch.mask)
                else:
                    assert isinstance(batch, CutoutBatch)  # epoch runs recycle (run())
                    await out.send(batch)

    async def _produce(self, send: MemoryObjectSendStream[Spec], rate: RateLimiter) -> None:
        async with send:
            for spec in self.plan.batches(self.config.fetch.batch_size, MAX_BATCH_BYTES):
                if self.stopped is None:  # after an outage nothing is read: no rate
                    await rate.acquire()
                await send.send(spec)

    async def _read(self, source: Source, spec: Spec) -> BatchResult:
        """Read a batch under the run's retry and isolation policy."""
        started = time.time()
        if self.stopped is not None:
            return BatchResult(spec, None, 0, started, started, [(spec.index, self.stopped, 0)])

        async def read(part: Spec) -> CutoutBatch | EpochBatch:
            if isinstance(part, EpochSpec):
                assert isinstance(self.plan, EpochPlan)
                return await read_epochs(source, self.plan, part)
            assert isinstance(self.plan, Plan)
            return await source.read(self.plan, part)

        try:
            done = await isolate(read, spec, self.ctx.retry, _halves)
        except OutageError as exc:
            self.stopped = self.stopped or _describe(exc)
            return BatchResult(spec, None, 1, started, time.time(), [(spec.index, self.stopped, 1)])
        failures = [(part.index, _describe(err), n) for part, err, n in done.failures]
        batch = _concat(done.results) if done.results else None
        result = BatchResult(spec, batch, done.attempts, started, time.time(), failures)
        if any(n != done.attempts for n in done.result_attempts):
            sizes = [len(b) for b in done.results]
            result.good_attempts = _repeat(done.result_attempts, sizes)
        return result

    def _write(self, result: BatchResult) -> CutoutBatch | EpochBatch | None:
        """Write a batch's outputs, then its ledger rows (runs in a worker thread)."""
        if isinstance(result.spec, EpochSpec):
            return self._write_epochs(result, result.spec)
        batch = result.batch
        assert batch is None or isinstance(batch, CutoutBatch)
        assert isinstance(self.plan, Plan) and isinstance(result.spec, BatchSpec)
        t = self.plan.targets
        part: str | None = None
        part_first = part_rows = 0
        tally: Counter[str] = Counter()
        finished = result.finished
        groups: list[Results] = []
        if batch is not None and len(batch):
            if self.positions is not None:  # resumed, or a shard: positions in the list
                batch.index = self.positions[batch.index]
            outputs = self.fits.write(batch) if self.fits is not None else None
            if self.stack is not None:
                part, part_first, part_rows = self.stack.write(batch)
            finished = time.time()
            codes = batch.status_codes
            counts = np.bincount(codes, minlength=len(COVERAGE_STATUSES)).tolist()
            tally.update({name: k for name, k in zip(COVERAGE_STATUSES, counts, strict=True) if k})
            coverage = batch.coverage
            ids = batch.ids.tolist()
            groups.append(
                Results(
                    id=ids,
                    idx=batch.index.tolist(),
                    # One value for the whole batch when it is one (the usual case):
                    # the ledger then stores it without a per-row copy.
                    status=(
                        batch.status.tolist()
                        if max(counts) < len(batch)
                        else COVERAGE_STATUSES[int(codes[0])]
                    ),
                    coverage=(
                        float(coverage[0]) if (coverage == coverage[0]).all() else coverage.tolist()
                    ),
                    output=outputs,
                    stack_row=range(part_rows) if part is not None else None,
                    attempts=self._cumulative(ids, result.good_attempts or result.attempts),
                )
            )
        if result.failures:
            idx = np.concatenate([i for i, _, _ in result.failures])
            sizes = [len(i) for i, _, _ in result.failures]
            errors = [
                e for (_, e, _), n in zip(result.failures, sizes, strict=True) for _ in range(n)
            ]
            tries = [
                a for (_, _, a), n in zip(result.failures, sizes, strict=True) for _ in range(n)
            ]
            ids = t.id[idx].tolist()
            if self.positions is not None:
                idx = self.positions[idx]
            tally["failed"] += len(idx)
            with self._count_lock:
                self.failures += list(zip(ids, errors, strict=True))
            groups.append(
                Results(
                    id=ids,
                    idx=idx.tolist(),
                    status="failed",
                    error=errors,
                    attempts=self._cumulative(ids, tries),
                )
            )
        if self.recorder is not None:
            spec = result.spec
            self.recorder.record(
                BatchRecord(
                    batch=self.recorder.new_batch(),
                    run=self.recorder.run_id,
                    tract=spec.tract,
                    patch=spec.patch,
                    side=spec.side,
                    started=result.started,
                    finished=finished,
                    attempts=result.attempts,
                    stack_part=part,
                    stack_rows=part_rows if part is not None else None,
                    stack_offset=part_first if part is not None else None,
                ),
                *groups,
                images=[(r.band, r.id, r.path) for r in self.plan.batch_images(spec)],
            )
        with self._count_lock:
            self.processed += len(batch) if batch is not None else 0
            self.counts.update(tally)
        return batch

    def _write_epochs(self, result: BatchResult, spec: EpochSpec) -> EpochBatch | None:
        """Write a unit's stamps, then its ledger rows (see :func:`write_unit`)."""
        assert self.epochs is not None
        done = write_unit(self.epochs, self.recorder, self.stack, self.positions, spec, result)
        with self._count_lock:
            self.failures += done.failures
            self.processed += done.pairs
        assert result.batch is None or isinstance(result.batch, EpochBatch)
        return result.batch

    def fail(self, spec: Spec, error: str, attempts: int) -> None:
        """Record a batch's targets as ``failed`` with ``error``, unread (blocking)."""
        now = time.time()
        self._write(BatchResult(spec, None, attempts, now, now, [(spec.index, error, attempts)]))

    def _cumulative(self, ids: list[str], this_run: int | list[int]) -> int | list[int] | None:
        """``attempts`` over all runs for ``ids``; None when it is the batch's own.

        ``this_run``: this run's attempts, one for all ids or one per id.
        """
        prior_of = self.resumed.prior_attempts
        prior = [prior_of.get(i, 0) for i in ids] if prior_of else []
        if not any(prior):
            return None if isinstance(this_run, int) else this_run
        mine = this_run if isinstance(this_run, list) else [this_run] * len(prior)
        return [a + b for a, b in zip(mine, prior, strict=True)]

    # ---- the end ----------------------------------------------------------------

    def finish(self, t0: float, opens: int) -> Report:
        """Close the sinks, build stack.h5 and the grid, close the ledger; the report.

        The time reported runs from the start of the harvest to the end of this,
        since finishing the outputs is part of the work.
        """
        outputs: dict[str, str] = {}
        out = self.config.output
        ledger = self.ledger
        epochs = None
        try:
            if ledger is not None and out is not None:
                outputs["ledger"] = str(out / "ledger.sqlite")
                if self.epochs is not None:
                    epochs = finish_epochs(
                        ledger,
                        self.stack if isinstance(self.stack, EpochStackSink) else None,
                        self.config,
                        self.ctx.repo,
                        self.plan.targets,
                        self.epochs.pending(),
                        ledger.run_id or 0,
                        self.epochs.headers,
                    )
                    outputs.update(epochs.outputs)
                    self.failures += epochs.failures
                    self.counts = epochs.targets + Counter(invalid=len(self.targets.bad))
                    self.stack = None
                if self.fits is not None:
                    self.fits.close()
                    outputs["fits"] = str(out / "fits") + "/"
                if self.stack is not None:
                    outputs.update(self._finish_stack(out))
            counts = dict(self.counts)
            counts.setdefault("invalid", 0)
            if ledger is not None:
                summary: dict[str, Any] = {"counts": counts, "seconds": time.perf_counter() - t0}
                if epochs is not None:
                    summary["stamps"] = dict(epochs.stamps)
                if self.stopped is not None:
                    summary["stopped"] = self.stopped
                ledger.end_run(summary)
        finally:
            self.resumed.close()
        return Report(
            targets=len(self.targets) + len(self.targets.bad),
            counts=counts,
            processed=self.processed,
            skipped=self.plan.done if isinstance(self.plan, EpochPlan) else self.resumed.skipped,
            seconds=time.perf_counter() - t0,
            images_opened=opens,
            output=out,
            outputs=outputs,
            failures=self.failures,
            stopped=self.stopped,
            epochs=None if epochs is None else dict(epochs.stamps),
            unit="targets" if epochs is None else "stamps",
        )

    def _finish_stack(self, out: Path) -> dict[str, str]:
        """Close the shards, merge them if many, write stack.h5 and the grid pages."""
        assert self.stack is not None and self.ledger is not None
        outputs: dict[str, str] = {}
        self.stack.close()
        moves = self.stack.merge(self.ledger.stack_ranges())
        if moves:
            self.ledger.move_shards(moves)
        path = self.stack.finalize(self.ledger.stack_ranges())
        if path is not None and "stack" in self.config.formats:
            outputs["stack"] = str(path)
        if path is not None and "grid" in self.config.formats:
            from .sinks.grid import render_stack_grid

            pages = render_stack_grid(self.config.grid, path, out, title=out.name)
            if pages:
                more = f" (+{len(pages) - 1} pages)" if len(pages) > 1 else ""
                outputs["grid"] = f"{pages[0]}{more}"
        return outputs


def _halves(spec: Spec) -> Sequence[Spec]:
    """A batch's two halves, or nothing for a single target."""
    if isinstance(spec, EpochSpec):
        return spec.halves()
    n = len(spec)
    if n < 2:
        return ()
    cut = n // 2
    return (
        BatchSpec(spec.tract, spec.patch, spec.side, spec.index[:cut]),
        BatchSpec(spec.tract, spec.patch, spec.side, spec.index[cut:]),
    )


def _repeat(values: list[_T], sizes: list[int]) -> list[_T]:
    """Each value repeated its size's times, in order (one per target)."""
    return [v for v, n in zip(values, sizes, strict=True) for _ in range(n)]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _concat(batches: Sequence[CutoutBatch | EpochBatch]) -> CutoutBatch | EpochBatch:
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    if isinstance(first, EpochBatch):
        return concat_epoch_batches([b for b in batches if isinstance(b, EpochBatch)])
    assert isinstance(first, CutoutBatch)

    def cat(name: str) -> Any:
        values = [getattr(b, name) for b in batches]
        return None if values[0] is None else np.concatenate(values)

    return CutoutBatch(
        index=cat("index"),
        ids=cat("ids"),
        ra=cat("ra"),
        dec=cat("dec"),
        tract=cat("tract"),
        patch=cat("patch"),
        x0=cat("x0"),
        y0=cat("y0"),
        bands=first.bands,
        image=cat("image"),
        variance=cat("variance"),
        mask=cat("mask"),
        coverage=cat("coverage"),
        crval=cat("crval"),
        crpix0=first.crpix0,
        scale_deg=first.scale_deg,
        dataset_ids=cat("dataset_ids"),
        files=cat("files"),
        types=first.types,
    )
