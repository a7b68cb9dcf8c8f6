"""One harvest: its plan, ledger and sinks, and the stages that drive them.

The stages (a producer of batch specs, ``concurrency`` workers) are tasks in a
task group that :class:`harvester.engine.Harvester` owns; this module holds what
one run does in them: read a batch under the retry policy, write its outputs, then
its ledger rows, and at the end build ``stack.h5`` and the grid pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import numpy.typing as npt

from .config import RunConfig
from .cutout import COVERAGE_STATUSES, CutoutBatch
from .errors import ConfigError, HarvesterError
from .ledger import Ledger
from .limits import RateLimiter
from .plan import BatchSpec, Plan, make_plan
from .sources.base import Source
from .targets import Targets, TargetSource

if TYPE_CHECKING:
    from .engine import Harvester


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


#: Largest batch in bytes of pixels; keeps a batch of 300 px cutouts from eating RAM.
#: Each batch costs a few thread and event-loop hand-offs: 16 MiB against 8 MiB took
#: the 10^5 50 px stack run from about 0.70 to 0.62 s (A/B, same process).
MAX_BATCH_BYTES = 16 * 2**20

__all__ = ["MAX_BATCH_BYTES", "BatchResult", "HarvestRun", "Report"]


@dataclass
class BatchResult:
    """A batch after fetch: the cutouts, or what failed, with attempts and times."""

    spec: BatchSpec
    batch: CutoutBatch | None
    attempts: int
    started: float
    finished: float
    failures: list[tuple[int, str, int]] = field(default_factory=list)  # (idx, error, attempts)


class HarvestRun:
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
        # Statuses of this run's target list: skipped ones as the ledger had them,
        # then this run's outcomes, tallied as batches are written.
        self.counts: Counter[str] = Counter()
        self.prior_attempts: dict[str, int] = {}

    @classmethod
    def prepare(
        cls, h: Harvester, source: TargetSource | Targets | None, recycle: bool = False
    ) -> HarvestRun:
        """Load targets, open the ledger and sinks, plan what is left to do.

        With ``recycle`` the batches are not handed to the caller; their arrays go
        back to a :class:`~harvester.sources.base.BufferPool` once written.
        """
        config = h.config
        targets = h.load(source)
        ledger = None
        skipped = 0
        lock = None
        earlier: Counter[str] = Counter()
        prior: dict[str, int] = {}
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
            ledger.begin_run(now)
            if targets.bad:
                _record_invalid(ledger, targets)
            done = ledger.done()
            prior = ledger.attempts(done)
            if done:
                is_done = np.isin(targets.id, np.fromiter(done, dtype=object, count=len(done)))
                todo = np.flatnonzero(~is_done)
                skipped = len(targets) - len(todo)
                plan_targets = targets.take(todo) if skipped else targets
                earlier = Counter(done[i] for i in targets.id[is_done].tolist())
            else:
                plan_targets = targets
        else:
            plan_targets = targets
        side = config.size.pixels(h.repo.skymap)
        plan = make_plan(plan_targets, h.repo, config.bands, side, config.planes)
        if recycle:
            from .sources.base import BufferPool

            # Batches in flight at most: one per worker, and a spare.
            plan.buffers = BufferPool(keep=config.fetch.concurrency + 1)
        _release_free_memory()
        run = cls(h, targets, plan, skipped)
        run.ledger = ledger
        run.lock = lock
        run.counts = earlier + Counter(invalid=len(targets.bad))
        run.prior_attempts = prior
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

            # Rows per cutout shape, so shards are sized for the run, not per batch.
            sides, counts = np.unique(self.plan.side, return_counts=True)
            rows = {(int(s), int(s)): int(c) for s, c in zip(sides, counts, strict=True)}
            self.stack = StackSink(
                out, run_id, self.plan.targets.id, rows, writers=self.config.fetch.concurrency
            )
            self.stack.open()

    # ---- the stages -------------------------------------------------------------

    async def execute(self, source: Source, out: Any) -> None:
        fetch = self.config.fetch
        specs_send, specs_recv = anyio.create_memory_object_stream[BatchSpec](2 * fetch.concurrency)
        rate = RateLimiter(fetch.rate)
        self._done, self._total = 0, len(self.plan)
        if self.h.progress is not None:
            self.h.progress(0, self._total)
        async with out, anyio.create_task_group() as tg:
            tg.start_soon(self._produce, specs_send, rate)
            async with specs_recv:
                for _ in range(fetch.concurrency):
                    tg.start_soon(self._work, source, specs_recv.clone(), out.clone())

    async def _work(self, source: Source, recv: Any, out: Any) -> None:
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
                if self.h.progress is not None:
                    self.h.progress(self._done, self._total)
                if batch is None:
                    continue
                if self.plan.buffers is not None:
                    # Written, and nobody else sees it (Harvester.run): reuse its arrays.
                    self.plan.buffers.give(batch.image, batch.variance, batch.mask)
                else:
                    await out.send(batch)

    async def _produce(self, send: Any, rate: RateLimiter) -> None:
        async with send:
            for spec in self.plan.batches(self.config.fetch.batch_size, MAX_BATCH_BYTES):
                await rate.acquire()
                await send.send(spec)

    async def _read(self, source: Source, spec: BatchSpec) -> BatchResult:
        """Read a batch under the retry policy; isolate failing targets one by one."""
        policy = self.h.retry
        started = time.time()
        give_up = time.monotonic() + policy.total
        attempts = 0
        while True:
            attempts += 1
            try:
                batch = await source.read(self.plan, spec)
                return BatchResult(spec, batch, attempts, started, time.time())
            except (OSError, HarvesterError, ValueError) as exc:
                error: Exception = exc
                if attempts >= policy.attempts or not policy.retryable(exc):
                    break
                delay = policy.delay(attempts, exc)
                if time.monotonic() + delay > give_up:
                    break
                await anyio.sleep(delay)
        if len(spec) == 1:
            return BatchResult(
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
        return BatchResult(
            spec, _concat(good) if good else None, attempts, started, time.time(), failures
        )

    def _write(self, result: BatchResult) -> CutoutBatch | None:
        """Write a batch's outputs, then its ledger rows (runs in a worker thread)."""
        batch = result.batch
        spec = result.spec
        t = self.plan.targets
        ledger = self.ledger
        part: str | None = None
        part_first = part_rows = 0
        tally: Counter[str] = Counter()
        finished = result.finished
        good: dict[str, Any] = {}
        bad: dict[str, Any] = {}
        if batch is not None and len(batch):
            if self.fits is not None:
                good["output"] = self.fits.write(batch)
            if self.stack is not None:
                part, part_first, part_rows = self.stack.write(batch)
                good["stack_row"] = range(part_rows)
            finished = time.time()
            codes = batch.status_codes
            counts = np.bincount(codes, minlength=len(COVERAGE_STATUSES)).tolist()
            tally.update({name: k for name, k in zip(COVERAGE_STATUSES, counts, strict=True) if k})
            coverage = batch.coverage
            good.update(
                id=t.id[batch.index].tolist(),
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
            )
            self._add_prior_attempts(good, result.attempts)
        if result.failures:
            idx = np.array([i for i, _, _ in result.failures], dtype=np.int64)
            errors = [e for _, e, _ in result.failures]
            tally["failed"] += len(idx)
            with self._count_lock:
                self.failures += list(zip(t.id[idx].tolist(), errors, strict=True))
            bad.update(
                id=t.id[idx].tolist(),
                idx=idx.tolist(),
                status="failed",
                error=errors,
                attempts=[a for _, _, a in result.failures],
            )
            self._add_prior_attempts(bad, 0)
        if ledger is not None:
            bid = ledger.new_batch()
            groups = [(cols, len(cols["id"])) for cols in (good, bad) if cols]
            where = (spec.tract, spec.patch, spec.side)
            times = (result.started, finished, result.attempts)
            shard = (part, part_rows, part_first) if part is not None else (None, None, None)
            ledger.record(
                (bid, ledger.run_id, *where, *times, *shard),
                *[({**cols, "batch": bid}, n) for cols, n in groups],
            )
        with self._count_lock:
            self.processed += len(batch) if batch is not None else 0
            self.counts.update(tally)
        return batch

    def _add_prior_attempts(self, columns: dict[str, Any], this_run: int) -> None:
        """Make ``attempts`` cumulative for ids an earlier run already tried.

        ``this_run``: the attempts of this run when ``columns`` has none per id.
        """
        if not self.prior_attempts or "id" not in columns:
            return
        prior = [self.prior_attempts.get(i, 0) for i in columns["id"]]
        if not any(prior):
            return
        mine = columns.get("attempts", this_run)
        mine = mine if isinstance(mine, list) else [mine] * len(prior)
        columns["attempts"] = [a + b for a, b in zip(mine, prior, strict=True)]

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
                    self.stack.close()
                    moves = self.stack.merge(self.ledger.stack_ranges())
                    if moves:
                        self.ledger.move_shards(moves)
                    path = self.stack.finalize(self.ledger.stack_ranges())
                    if path is not None and "stack" in self.config.formats:
                        outputs["stack"] = str(path)
                    if path is not None and "grid" in self.config.formats:
                        pages = _grid(self.config, path, out, self.targets)
                        if pages:
                            outputs["grid"] = f"{pages[0]}" + (
                                f" (+{len(pages) - 1} pages)" if len(pages) > 1 else ""
                            )
                counts = dict(self.counts)
                counts.setdefault("invalid", 0)
                seconds = time.perf_counter() - t0
                self.ledger.end_run({"counts": counts, "seconds": seconds})
            else:
                counts = dict(self.counts)
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
        table = g["table"]
        order = np.argsort(table["index"], kind="stable")[: config.grid.max_stamps]
        ids = [v.decode("utf-8") for v in table["id"][order]]
        status = [v.decode("ascii") for v in table["status"][order]]
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


def _record_invalid(ledger: Ledger, targets: Targets) -> None:
    """The target list's invalid rows, as one ledger batch."""
    now = time.time()
    bid = ledger.new_batch()
    bad = targets.bad
    columns: dict[str, Any] = {
        # Keyed by row: an invalid row's id may be empty or the duplicate of a good one.
        "id": [f"{b.id or ''}#row{b.row}" for b in bad],
        "row": [b.row for b in bad],
        "status": "invalid",
        "error": [str(b) for b in bad],
        "attempts": 0,
        "batch": bid,
    }
    row = (bid, ledger.run_id, None, None, None, now, now, 0, None, None, None)
    ledger.record(row, (columns, len(bad)))


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
