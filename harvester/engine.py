"""The harvest task graph and the library API.

::

    targets ─► plan ─► [specs] ─► fetch ×concurrency ─► [batches] ─► write ─► caller
              (numpy)   bounded   worker threads,         bounded     sinks,
                                  a capacity limiter                  ledger

Every stage is a task of one task group owned by the :class:`Harvester` (an async
context manager); streams between stages are bounded, so memory does not grow with
the number of targets. Blocking work (reads, FITS and HDF5 writes, SQLite) runs in
worker threads under capacity limiters. Cancelling the consumer (Ctrl-C, a
cancelled notebook cell, leaving the ``async for``) cancels the stages; a thread
finishes the batch it is on, whose files are written atomically, and the ledger
only records batches whose outputs are in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import itertools
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np
import numpy.typing as npt
from anyio.abc import TaskGroup

from .config import RunConfig
from .cutout import Cutout, CutoutBatch
from .errors import ConfigError, HarvesterError
from .ledger import Ledger
from .limits import RateLimiter, RetryPolicy
from .plan import BatchSpec, Plan, make_plan
from .repo import Repository, load_repository
from .sources.base import Source
from .sources.local import LocalSource
from .targets import Targets, TargetSource, load_targets

__all__ = ["Harvester", "Report", "run"]

_CHUNK = 1 << 17
#: Largest batch in bytes of pixels; keeps a batch of 300 px cutouts from eating RAM.
MAX_BATCH_BYTES = 8 * 2**20

ProgressHook = Callable[[int, int], None]
_G = TypeVar("_G", bound=AsyncIterator[Any])


@dataclass
class Report:
    """What a run did. ``counts`` are ledger statuses of this run's target list."""

    targets: int
    counts: dict[str, int]
    processed: int
    skipped: int
    seconds: float
    images_opened: int
    output: Path | None
    outputs: dict[str, str] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def cutouts_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        order = ("ok", "partial", "no_coverage", "failed", "invalid")
        counts = ", ".join(f"{k} {self.counts[k]}" for k in order if self.counts.get(k))
        out = [
            f"targets     {self.targets} ({counts or 'none'})",
            f"this run    {self.processed} harvested, {self.skipped} already done (resume)",
            f"time        {self.seconds:.2f} s, {self.cutouts_per_second:,.0f} targets/s, "
            f"{self.images_opened} images opened",
        ]
        for name, where in self.outputs.items():
            out.append(f"{name:<11} {where}")
        for tid, err in self.failures[:5]:
            out.append(f"failed      {tid}: {err}")
        if len(self.failures) > 5:
            out.append(f"            ... {len(self.failures) - 5} more failures in the ledger")
        return out


@dataclass
class _Result:
    """A batch after fetch: the cutouts, or what failed, with attempts and times."""

    spec: BatchSpec
    batch: CutoutBatch | None
    attempts: int
    started: float
    finished: float
    failures: list[tuple[int, str, int]] = field(default_factory=list)  # (idx, error, attempts)


class Harvester:
    """Harvest cutouts for target lists; an async context manager owning the run.

    Examples
    --------
    >>> async with Harvester(config) as h:              # doctest: +SKIP
    ...     async for cutout in h.harvest("targets.csv"):
    ...         print(cutout.id, cutout.image.shape)
    ...     report = await h.run("more_targets.csv")

    Constructing stores the configuration only; the repository is opened on entry.
    """

    def __init__(self, config: RunConfig, *, progress: ProgressHook | None = None) -> None:
        self.config = config
        self.progress = progress
        self._repo: Repository | None = None
        self._source: Source | None = None
        # Local reads: OSError is worth a few quick retries, nothing else is. Remote
        # reads: transient HTTP failures (429, 5xx, resets...) with backoff, bounded.
        if config.source == "local":
            self.retry = RetryPolicy(
                attempts=1 + config.fetch.retries, base=0.05, cap=1.0, total=60.0
            )
        else:
            from .sources.remote import REMOTE_RETRY

            self.retry = REMOTE_RETRY
        self._tg: TaskGroup | None = None
        self._open: list[Any] = []

    async def __aenter__(self) -> Harvester:
        if self.config.source == "local":
            self._repo = await anyio.to_thread.run_sync(load_repository, self.config.repo)
            self._source = LocalSource(self._repo, concurrency=self.config.fetch.concurrency)
        else:
            # A data service: discovery, its repository (index or SIA), the source.
            from .sources.auto import open_remote

            self._repo, self._source = await open_remote(self.config)
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
            if self._source is not None:
                with anyio.CancelScope(shield=True):
                    await self._source.aclose()
            self._tg = None

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            raise RuntimeError("use `async with Harvester(config) as h:` first")
        return self._repo

    # ---- planning -------------------------------------------------------------

    def load(self, targets: TargetSource | Targets | None = None) -> Targets:
        """Load and validate targets (the config's target list when None)."""
        if isinstance(targets, Targets):
            return targets
        source = targets if targets is not None else self.config.targets
        if source is None:
            raise ConfigError("no targets: give a target list or set run.targets")
        if isinstance(source, str) and source.startswith("random:"):
            return random_targets(self.repo, source, self.config.seed)
        return load_targets(
            source,
            columns=self.config.columns,
            skymap=self.repo.skymap,
            on_error=self.config.on_error,
            max_size=self.config.max_size,
            bands_allowed=self.config.bands,
        )

    def plan(self, targets: TargetSource | Targets | None = None) -> Plan:
        """The plan for a target list: boxes, images, and :meth:`Plan.quote`."""
        t = self.load(targets)
        side = self.config.size.pixels(self.repo.skymap)
        return make_plan(t, self.repo, self.config.bands, side, self.config.planes)

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
        """Harvest everything into the configured outputs; return the report."""
        stats = _Stats()
        batches = self._track(self._batches(targets, stats))
        async for _ in batches:
            pass
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
        self, targets: TargetSource | Targets | None, stats: _Stats
    ) -> AsyncGenerator[CutoutBatch, None]:
        if self._tg is None or self._source is None:
            raise RuntimeError("use `async with Harvester(config) as h:` first")
        await self._close_stale(keep=self._open[-1] if self._open else None)
        source = self._source
        t0 = time.perf_counter()
        run = await anyio.to_thread.run_sync(_Run.prepare, self, targets)
        send, receive = anyio.create_memory_object_stream[CutoutBatch](1)
        scope = anyio.CancelScope()
        done = anyio.Event()

        async def pipeline() -> None:
            try:
                with scope:
                    await run.execute(source, send)
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
                stats.report = await anyio.to_thread.run_sync(
                    run.finish, t0, source.opens
                )


@dataclass
class _Stats:
    report: Report | None = None


class _Run:
    """One harvest: its plan, ledger and sinks, and the stages that drive them."""

    def __init__(self, h: Harvester, targets: Targets, plan: Plan, skipped: int) -> None:
        self.h = h
        self.config = h.config
        self.targets = targets
        self.plan = plan
        self.skipped = skipped
        self.ledger: Ledger | None = None
        self.fits: Any = None
        self.stack: Any = None
        self.processed = 0
        self.failures: list[tuple[str, str]] = []
        self.lock: Any = None
        self._count_lock = threading.Lock()
        self._done = self._total = 0

    @classmethod
    def prepare(cls, h: Harvester, source: TargetSource | Targets | None) -> _Run:
        config = h.config
        targets = h.load(source)
        ledger = None
        skipped = 0
        lock = None
        if config.output is not None:
            config.output.mkdir(parents=True, exist_ok=True)
            lock = _lock_output(config.output)
            ledger = Ledger(config.output / "ledger.sqlite")
            previous = ledger.settings()
            now = config.output_settings()
            if previous is not None and previous != now:
                key = next(k for k in now if previous.get(k) != now[k])
                ledger.close()
                lock.close()
                raise ConfigError(
                    f"{config.output} holds a run with {key} = {previous.get(key)!r}, this run "
                    f"has {now[key]!r}; use another output folder or --fresh"
                )
            run_id = ledger.begin_run(now)
            if targets.bad:
                ledger.record(_invalid_rows(targets, run_id))
            done = ledger.done_ids()
            if done:
                todo = np.flatnonzero(
                    ~np.isin(targets.id, np.fromiter(done, dtype=object, count=len(done)))
                )
                skipped = len(targets) - len(todo)
                plan_targets = targets.take(todo) if skipped else targets
            else:
                plan_targets = targets
        else:
            plan_targets = targets
        side = config.size.pixels(h.repo.skymap)
        plan = make_plan(plan_targets, h.repo, config.bands, side, config.planes)
        _release_free_memory()
        run = cls(h, targets, plan, skipped)
        run.ledger = ledger
        run.lock = lock
        if ledger is not None and config.output is not None:
            run._open_sinks(config.output, ledger.run_id or 0)
        return run

    def _open_sinks(self, out: Path, run_id: int) -> None:
        # A run killed with -9 can leave temporary files (never final names); drop them.
        for folder in (out, out / "fits", out / "stack_parts"):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                tmp.unlink(missing_ok=True)
        formats = set(self.config.formats)
        if "fits" in formats:
            from .sinks.fits import FitsSink

            self.fits = FitsSink(
                out, run_info={"HRUN": str(run_id)}, skymap=self.plan.skymap.config.name
            )
            self.fits.open()
        if formats & {"stack", "grid"}:
            from .sinks.stack import StackSink

            self.stack = StackSink(out, run_id)
            self.stack.open()

    # ---- the stages -------------------------------------------------------------

    async def execute(self, source: Source, out: Any) -> None:
        fetch = self.config.fetch
        specs_send, specs_recv = anyio.create_memory_object_stream[BatchSpec](2 * fetch.concurrency)
        res_send, res_recv = anyio.create_memory_object_stream[_Result](1)
        rate = RateLimiter(fetch.rate)
        self._done, self._total = 0, len(self.plan)
        if self.h.progress is not None:
            self.h.progress(0, self._total)
        async with out, anyio.create_task_group() as tg:
            tg.start_soon(self._produce, specs_send, rate)
            async with specs_recv, res_send, res_recv:
                for _ in range(fetch.concurrency):
                    tg.start_soon(self._fetch, source, specs_recv.clone(), res_send.clone())
                # As many writers as readers: writing FITS files is the slow side, and
                # the sinks and the ledger are safe to call from several threads.
                for _ in range(fetch.concurrency):
                    tg.start_soon(self._writer, res_recv.clone(), out.clone())

    async def _writer(self, recv: Any, out: Any) -> None:
        async with recv, out:
            async for result in recv:
                batch = await anyio.to_thread.run_sync(self._write, result)
                self._done += len(result.spec)
                if self.h.progress is not None:
                    self.h.progress(self._done, self._total)
                if batch is not None:
                    await out.send(batch)

    async def _produce(self, send: Any, rate: RateLimiter) -> None:
        async with send:
            for spec in self.plan.batches(self.config.fetch.batch_size, MAX_BATCH_BYTES):
                await rate.acquire()
                await send.send(spec)

    async def _fetch(self, source: Source, recv: Any, send: Any) -> None:
        async with recv, send:
            async for spec in recv:
                await send.send(await self._read(source, spec))

    async def _read(self, source: Source, spec: BatchSpec) -> _Result:
        """Read a batch under the retry policy; isolate failing targets one by one."""
        policy = self.h.retry
        started = time.time()
        give_up = time.monotonic() + policy.total
        attempts = 0
        while True:
            attempts += 1
            try:
                batch = await source.read(self.plan, spec)
                return _Result(spec, batch, attempts, started, time.time())
            except (OSError, HarvesterError, ValueError) as exc:
                error: Exception = exc
                if attempts >= policy.attempts or not policy.retryable(exc):
                    break
                delay = policy.delay(attempts, exc)
                if time.monotonic() + delay > give_up:
                    break
                await anyio.sleep(delay)
        if len(spec) == 1:
            return _Result(
                spec,
                None,
                attempts,
                started,
                time.time(),
                [(int(spec.index[0]), _describe(error), attempts)],
            )
        # Split: the good targets of a batch must not pay for one bad image or box.
        good: list[CutoutBatch] = []
        failures: list[tuple[int, str, int]] = []
        for i in spec.index:
            r = await self._read(
                source, BatchSpec(spec.tract, spec.patch, spec.side, np.array([i]))
            )
            if r.batch is not None:
                good.append(r.batch)
            # Every attempt counts: the batch's and the target's own.
            failures += [(k, e, a + attempts) for k, e, a in r.failures]
        return _Result(
            spec, _concat(good) if good else None, attempts, started, time.time(), failures
        )

    def _write(self, result: _Result) -> CutoutBatch | None:
        """Write a batch's outputs, then its ledger rows (runs in a worker thread)."""
        batch = result.batch
        t = self.plan.targets
        rows: list[tuple[Any, ...]] = []
        if batch is not None and len(batch):
            outputs: list[str] | None = None
            part: str | None = None
            part_rows: npt.NDArray[np.int64] | None = None
            if self.fits is not None:
                outputs = self.fits.write(batch)
            if self.stack is not None:
                part, part_rows = self.stack.write(batch)
            finished = time.time()
            rows += self._rows(
                batch.index,
                batch.status.tolist(),
                None,
                result.attempts,
                result.started,
                finished,
                batch.coverage.tolist(),
                outputs,
                part,
                None if part_rows is None else part_rows.tolist(),
            )
        if result.failures:
            idx = np.array([i for i, _, _ in result.failures], dtype=np.int64)
            errors = [e for _, e, _ in result.failures]
            with self._count_lock:
                self.failures += list(zip(t.id[idx].tolist(), errors, strict=True))
            rows += self._rows(
                idx,
                "failed",
                errors,
                [a for _, _, a in result.failures],
                result.started,
                result.finished,
                None,
                None,
                None,
                None,
            )
        if self.ledger is not None and rows:
            self.ledger.record(rows)
        with self._count_lock:
            self.processed += len(batch) if batch is not None else 0
        return batch

    def _rows(
        self,
        idx: npt.NDArray[np.int64],
        status: list[str] | str,
        error: list[str] | None,
        attempts: list[int] | int,
        started: float,
        finished: float,
        coverage: list[float] | None,
        outputs: list[str] | None,
        part: str | None,
        part_rows: list[int] | None,
    ) -> list[tuple[Any, ...]]:
        """Ledger rows for targets ``idx``, built column-wise (no per-target numpy)."""
        t, plan = self.plan.targets, self.plan
        n = len(idx)

        def col(value: Any) -> Any:
            return value if isinstance(value, list) else itertools.repeat(value, n)

        run_id = self.ledger.run_id if self.ledger else None
        return list(
            zip(
                t.id[idx].tolist(),
                idx.tolist(),
                t.row[idx].tolist(),
                t.ra[idx].tolist(),
                t.dec[idx].tolist(),
                plan.tract[idx].tolist(),
                plan.patch[idx].tolist(),
                plan.x0[idx].tolist(),
                plan.y0[idx].tolist(),
                plan.side[idx].tolist(),
                col(status),
                col(error),
                col(attempts),
                col(started),
                col(finished),
                col(finished - started),
                col(coverage),
                col(outputs),
                col(part),
                col(part_rows),
                col(run_id),
                strict=False,  # repeated scalars are endless; lists set the length
            )
        )

    # ---- the end ----------------------------------------------------------------

    def finish(self, t0: float, opens: int) -> Report:
        """Close the sinks, build stack.h5 and the grid, close the ledger; the report.

        The time reported runs from the start of the harvest to the end of this,
        since finishing the outputs is part of the work.
        """
        outputs: dict[str, str] = {}
        counts: dict[str, int] = {}
        out = self.config.output
        try:
            if self.ledger is not None and out is not None:
                outputs["ledger"] = str(out / "ledger.sqlite")
                if self.fits is not None:
                    self.fits.close()
                    outputs["fits"] = str(out / "fits") + "/"
                if self.stack is not None:
                    path = self.stack.finalize(self.ledger.stack_parts())
                    if path is not None and "stack" in self.config.formats:
                        outputs["stack"] = str(path)
                    if path is not None and "grid" in self.config.formats:
                        pages = _grid(self.config, path, out, self.targets)
                        if pages:
                            outputs["grid"] = f"{pages[0]}" + (
                                f" (+{len(pages) - 1} pages)" if len(pages) > 1 else ""
                            )
                counts = self.ledger.counts()
                counts.setdefault("invalid", 0)
                seconds = time.perf_counter() - t0
                self.ledger.end_run({"counts": counts, "seconds": seconds})
            else:
                counts = {"ok": self.processed}
        finally:
            if self.ledger is not None:
                self.ledger.close()
            if self.lock is not None:
                self.lock.close()
        seconds = time.perf_counter() - t0
        return Report(
            targets=len(self.targets) + len(self.targets.bad),
            counts=counts,
            processed=self.processed,
            skipped=self.skipped,
            seconds=seconds,
            images_opened=opens,
            output=out,
            outputs=outputs,
            failures=self.failures,
        )


def _grid(config: RunConfig, stack_path: Path, out: Path, targets: Targets) -> list[Path]:
    """Grid pages of the first ``max_stamps`` targets in target-list order."""
    import h5py

    from .sinks.grid import write_grid_pages

    if config.grid.max_stamps == 0:
        return []
    with h5py.File(stack_path, "r") as f:
        groups = [f] if "image" in f else [f[k] for k in sorted(f)]
        g = groups[0]
        order = np.argsort(g["index"][...], kind="stable")[: config.grid.max_stamps]
        ids = [str(v) for v in g["id"].asstr()[...][order]]
        status = [str(v) for v in g["status"].asstr()[...][order]]
        band_names = str(g.attrs["bands"])
        rows = _Rows(g["image"], order)
        title = f"{out.name}: {len(ids)} cutouts"
        return write_grid_pages(
            ids,
            rows,
            list(band_names),
            out,
            band=config.grid.band,
            rgb=config.grid.rgb,
            stretch=config.grid.stretch,
            per_page=config.grid.per_page,
            columns=config.grid.columns,
            title=title,
            prefix="grid",
            status=status,
        )


class _Rows:
    """Rows of an HDF5 dataset in a chosen order, read a slice (page) at a time."""

    def __init__(self, dataset: Any, order: npt.NDArray[np.int64]) -> None:
        self.dataset = dataset
        self.order = order
        self.shape = (len(order), *dataset.shape[1:])
        self.ndim = len(self.shape)
        self.dtype = dataset.dtype

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, key: slice) -> npt.NDArray[np.float32]:
        want = self.order[key]
        sort = np.argsort(want)
        data = (
            self.dataset[np.sort(want).tolist()]
            if len(want)
            else np.empty((0, *self.shape[1:]), dtype=self.dtype)
        )
        out = np.empty_like(data)
        out[sort] = data
        return out


def _release_free_memory() -> None:
    """Give the planning temporaries back to the OS (glibc keeps freed heap pages).

    Planning a million targets frees a few hundred MB of short-lived arrays; without
    this, glibc keeps them in its heaps and the run's resident size stays that much
    higher for its whole life. A no-op where the C library has no malloc_trim.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _lock_output(out: Path) -> Any:
    """Hold an exclusive lock on the output folder for the run (released on close).

    Two runs writing one ledger and one set of shards at once would corrupt the
    resume logic, so the second one is refused with a clear error.
    """
    handle = open(out / ".harvester.lock", "a")  # noqa: SIM115 (kept open for the run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(f"{out}: another harvester run is using this output folder") from None
    return handle


def _invalid_rows(targets: Targets, run_id: int) -> Iterator[tuple[Any, ...]]:
    now = time.time()
    for b in targets.bad:
        # Keyed by row: an invalid row's id may be empty or the duplicate of a good one.
        yield (
            f"{b.id or ''}#row{b.row}",
            None,
            b.row,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            "invalid",
            str(b),
            0,
            now,
            now,
            0.0,
            None,
            None,
            None,
            None,
            run_id,
        )


def _describe(exc: BaseException | None) -> str:
    return "unknown error" if exc is None else f"{type(exc).__name__}: {exc}"


def _concat(batches: list[CutoutBatch]) -> CutoutBatch:
    first = batches[0]

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
    )


def random_targets(repo: Repository, spec: str, seed: int) -> Targets:
    """``random:N``: N targets uniform over the repository's patch inner boxes."""
    try:
        n = int(spec.split(":", 1)[1])
        if n < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"bad value for run.targets: {spec!r} (random:N, N >= 1)") from None
    keys = sorted({(r.tract, r.patch) for r in repo})
    if not keys:
        raise ConfigError(f"{repo.root}: the repository is empty")
    sm = repo.skymap
    rng = np.random.default_rng(seed)
    ra, dec = np.empty(n), np.empty(n)
    size = sm.config.patch_inner
    tracts = np.array([k[0] for k in keys])
    patches = np.array([k[1] for k in keys])
    for a in range(0, n, _CHUNK):  # chunks keep temporaries small for millions of targets
        m = min(_CHUNK, n - a)
        which = rng.integers(0, len(keys), m)
        px, py = patches[which] % sm.num_patches, patches[which] // sm.num_patches
        x = px * size + rng.uniform(0, size, m) - 0.5
        y = py * size + rng.uniform(0, size, m) - 0.5
        ra[a : a + m], dec[a : a + m] = sm.pixel_to_sky(tracts[which], x, y)
    # A point near a tract's edge may belong to a neighbouring tract; keep it anyway,
    # it is a fair target (its home is whatever findTract says).
    digits = len(str(n - 1))
    return Targets(
        id=np.char.add("t", np.arange(n).astype(f"U{digits}")),
        ra=ra,
        dec=dec,
        size=np.zeros(n, dtype=np.int64),
        bands=[()] * n,
        row=np.arange(1, n + 1, dtype=np.int64),
        source=spec,
    )


def run(
    config: RunConfig,
    targets: TargetSource | Targets | None = None,
    progress: ProgressHook | None = None,
) -> Report:
    """Synchronous :meth:`Harvester.run` for scripts.

    Raises
    ------
    RuntimeError
        When called from a running event loop (a notebook): ``await`` the async API
        there instead; starting a second loop in a thread would block the first.
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
