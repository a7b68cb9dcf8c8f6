"""Shards: a run's plan cut into whole image groups that run anywhere.

A distributed run (``harvester.dask``) is the single-machine pipeline run in
pieces. The driver prepares the run as always (:meth:`HarvestRun.prepare`: resume
from the ledger, the plan, the sinks), then cuts the plan's batches into shards
(:func:`shard_batches`): consecutive whole (tract, patch) groups of about
``shard_size`` targets, so each image is opened by one shard only (a group larger
than a shard by itself is cut at batch boundaries). A :class:`ShardSpec` carries
a shard's targets and their positions in the driver's plan, nothing else.

Where it runs, :func:`run_shard` builds a :class:`HarvestRun` for those targets
(the same plan -> read -> write stages), writing the same outputs into the same
folder: FITS files atomically, stack rows into shard files named per attempt.
Its ledger rows go into a :class:`~harvester.ledger.RowCollector` and come back
in the :class:`ShardResult`; the driver commits them to the one SQLite ledger
(:func:`absorb`). Stack rows count only once the ledger commits them, so a shard
that ran twice (its worker died) leaves no duplicate: the dead attempt's shard
files are named by no committed batch, and the stack's ``finalize`` deletes them.

Dependency rule: ``_pipeline``, ``_resume``, ``ledger``, ``plan``, ``targets``
and ``sources.base``; no engine, no Dask.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import anyio
import numpy as np
import numpy.typing as npt

from ._epoch_plan import EpochPlan, plan_of_pairs
from ._epoch_run import EpochRunState
from ._pipeline import MAX_BATCH_BYTES, HarvestRun, RunContext
from ._resume import Resumed
from .cutout import CutoutBatch
from .epochs import EpochSpec
from .ledger import BatchRows, RowCollector
from .plan import BatchSpec, Plan, make_plan
from .sinks.stack import ids_width
from .sources.base import BufferPool, Source
from .targets import Targets

__all__ = [
    "ShardResult",
    "ShardSpec",
    "ShardWork",
    "absorb",
    "make_shards",
    "run_shard",
    "shard_batches",
]


@dataclass(frozen=True)
class ShardSpec:
    """What a shard is sent: its targets, in the driver's plan order, and where
    each sits in that plan (``positions``, what the ledger's ``idx`` and the
    outputs record). ``prior_attempts``: attempts of earlier runs, of its ids only;
    ``id_width``: the whole run's stack ``id`` field (see ``StackSink``)."""

    key: str
    number: int
    run_id: int
    targets: Targets
    positions: npt.NDArray[np.int64]
    prior_attempts: dict[str, int] = field(default_factory=dict)
    id_width: tuple[bool, int] = (True, 1)
    #: A single-epoch run's shard: its (target, image) pairs, as positions in
    #: ``targets`` and in ``image_ids`` (dataset ids), which the worker plans as given.
    pairs: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None
    image_ids: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.targets) if self.pairs is None else len(self.pairs[0])


@dataclass(frozen=True)
class ShardWork:
    """A shard on the driver: its spec and its batches of the driver's plan (to
    record its targets as failed without it, should it never come back)."""

    spec: ShardSpec
    batches: tuple[BatchSpec | EpochSpec, ...]


@dataclass
class ShardResult:
    """What a shard sends back: its ledger rows and its tallies (small, picklable).

    ``opens``: images its worker's source opened while it ran; ``seconds``: its
    time on the worker, from receiving it to the last ledger row collected.
    """

    key: str
    batches: list[BatchRows]
    targets: int
    processed: int
    counts: dict[str, int]
    failures: list[tuple[str, str]]
    stopped: str | None
    opens: int
    seconds: float
    worker: str = ""
    #: A single-epoch shard's pairs recorded per target: (driver plan positions, counts).
    recorded: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None


def shard_batches(batches: Iterable[BatchSpec], shard_size: int) -> Iterator[list[BatchSpec]]:
    """Consecutive batches in shards of whole (tract, patch) groups.

    A group goes whole into the current shard if the shard has room for it, else
    it starts the next shard; a group larger than ``shard_size`` on its own is cut
    at batch boundaries into pieces of at most ``shard_size`` targets (a batch is
    never cut). Lazy: only the current shard and group are held.
    """
    shard: list[BatchSpec] = []
    n = 0
    for _, grouped in itertools.groupby(batches, key=lambda s: (s.tract, s.patch)):
        group = list(grouped)
        size = sum(len(b) for b in group)
        if shard and n + size > shard_size:
            yield shard
            shard, n = [], 0
        for b in group:
            if shard and n + len(b) > shard_size:  # only inside an oversized group
                yield shard
                shard, n = [], 0
            shard.append(b)
            n += len(b)
    if shard:
        yield shard


def make_shards(run: HarvestRun, shard_size: int, name: str = "") -> Iterator[ShardWork]:
    """The driver's run cut into shards, lazily, keyed ``shard-<run>-<n>`` (+``name``).

    The keys are deterministic for a run; a resumed run has a new run number, so
    its keys never meet a finished run's.
    """
    plan = run.plan
    if isinstance(plan, EpochPlan):
        yield from _epoch_shards(run, plan, shard_size, name)
        return
    run_id = run.ledger.run_id or 0 if run.ledger is not None else 0
    width = ids_width(plan.targets.id)
    prior = run.resumed.prior_attempts
    batches = plan.batches(run.config.fetch.batch_size, MAX_BATCH_BYTES)
    for number, group in enumerate(shard_batches(batches, shard_size)):
        positions = np.concatenate([b.index for b in group])
        targets = plan.targets.take(positions)
        if run.positions is not None:  # a resumed run: positions in the whole list
            positions = run.positions[positions]
        mine = {i: prior[i] for i in targets.id.tolist() if i in prior} if prior else {}
        spec = ShardSpec(
            key=f"shard-{run_id}-{number}{name}",
            number=number,
            run_id=run_id,
            targets=targets,
            positions=positions,
            prior_attempts=mine,
            id_width=width,
        )
        yield ShardWork(spec, tuple(group))


def shard_units(units: Iterable[EpochSpec], shard_size: int) -> Iterator[list[EpochSpec]]:
    """Consecutive units in shards of whole images of about ``shard_size`` pairs (an
    image with more pairs than that on its own is cut at unit boundaries)."""
    shard: list[EpochSpec] = []
    n = 0
    for _, grouped in itertools.groupby(units, key=lambda u: u.image):
        group = list(grouped)
        size = sum(len(u) for u in group)
        if shard and n + size > shard_size:
            yield shard
            shard, n = [], 0
        for u in group:
            if shard and n + len(u) > shard_size:
                yield shard
                shard, n = [], 0
            shard.append(u)
            n += len(u)
    if shard:
        yield shard


def _epoch_shards(
    run: HarvestRun, plan: EpochPlan, shard_size: int, name: str
) -> Iterator[ShardWork]:
    """A single-epoch run's shards: whole images, each shard sent its pairs."""
    run_id = run.ledger.run_id or 0 if run.ledger is not None else 0
    width = ids_width(plan.targets.id)
    units = plan.batches(run.config.fetch.batch_size, MAX_BATCH_BYTES)
    for number, group in enumerate(shard_units(units, shard_size)):
        pos = np.concatenate([u.index for u in group])
        per_pair = np.concatenate([np.full(len(u), u.image, dtype=np.int64) for u in group])
        images, img = np.unique(per_pair, return_inverse=True)
        uniq, local = np.unique(pos, return_inverse=True)
        positions = uniq if run.positions is None else run.positions[uniq]
        spec = ShardSpec(
            key=f"shard-{run_id}-{number}{name}",
            number=number,
            run_id=run_id,
            targets=plan.targets.take(uniq),
            positions=positions,
            id_width=width,
            pairs=(local.reshape(-1).astype(np.int64), img.reshape(-1).astype(np.int64)),
            image_ids=tuple(plan.refs[int(i)].id for i in images),
        )
        yield ShardWork(spec, tuple(group))


def _prepare(ctx: RunContext, spec: ShardSpec, buffers: BufferPool | None) -> HarvestRun:
    """A :class:`HarvestRun` of a shard's targets: no resume, rows collected."""
    config = ctx.config
    plan: Plan | EpochPlan
    if spec.pairs is not None:
        target, image = spec.pairs
        plan = plan_of_pairs(spec.targets, ctx.repo, config, target, spec.image_ids, image)
    else:
        side = config.size.pixels(ctx.repo.skymap)
        plan = make_plan(spec.targets, ctx.repo, config.bands, side, config.planes, config.images)
    plan.buffers = buffers or BufferPool(keep=config.fetch.concurrency + 1)
    resumed = Resumed(todo=spec.targets, prior_attempts=spec.prior_attempts)
    run = HarvestRun(ctx, spec.targets, plan, resumed)
    if isinstance(plan, EpochPlan):
        run.epochs = EpochRunState.of(plan)
    run.recorder = RowCollector(spec.run_id)
    run.positions = spec.positions
    if config.output is not None:
        # Per attempt: a shard run again (its worker died) never writes into the
        # files of the attempt before it, which may still be open somewhere.
        tag = f"s{spec.number:06d}.{secrets.token_hex(3)}."
        run.open_sinks(
            config.output, spec.run_id, sweep=False, part_tag=tag, id_width=spec.id_width
        )
    return run


def _close(run: HarvestRun) -> None:
    if run.fits is not None:
        run.fits.close()
    if run.stack is not None:
        run.stack.close()


async def run_shard(
    ctx: RunContext, source: Source, spec: ShardSpec, buffers: BufferPool | None = None
) -> ShardResult:
    """Run one shard through the pipeline with ``source``; its rows and tallies.

    Blocking work (planning, reads, writes) runs in worker threads, so the event
    loop it runs on (a Dask worker's) stays free for heartbeats. ``buffers``: batch
    arrays shared by the shards of one worker (fresh multi-megabyte arrays per
    shard cost a page fault per 4 KiB on first touch).
    """
    t0 = time.perf_counter()
    opens = source.opens
    run = await anyio.to_thread.run_sync(_prepare, ctx, spec, buffers)
    send, receive = anyio.create_memory_object_stream[CutoutBatch](1)
    try:
        async with receive:
            await run.execute(send, source)  # batches recycled: nothing is sent
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_close, run)
    assert isinstance(run.recorder, RowCollector)
    return ShardResult(
        key=spec.key,
        batches=run.recorder.batches,
        targets=len(spec),
        processed=run.processed,
        counts={k: v for k, v in run.counts.items() if v},
        failures=run.failures,
        stopped=run.stopped,
        opens=source.opens - opens,
        seconds=time.perf_counter() - t0,
        recorded=None if run.epochs is None else (spec.positions, run.epochs.recorded),
    )


def absorb(run: HarvestRun, result: ShardResult) -> None:
    """Commit a shard's rows to the driver's ledger and add its tallies (blocking).

    One transaction per batch, as the single-machine run commits them.
    """
    if run.ledger is None:
        raise RuntimeError("a distributed run needs an output folder (its ledger)")
    for rows in result.batches:
        run.ledger.replay(rows)
    if result.recorded is not None and run.epochs is not None:
        # Positions in the list are the plan's: an epoch run plans the whole list.
        np.add.at(run.epochs.recorded, *result.recorded)
    run.processed += result.processed
    run.counts.update(result.counts)
    run.failures += result.failures
    if result.stopped is not None and run.stopped is None:
        run.stopped = result.stopped
