"""Benchmark: cutouts per second of the harvest engine, against two references.

For every combination of cutout side (50, 300 px), planes (``image``; ``image,mask,
variance``) and output (``stack`` alone; ``fits`` alone), band z, on the same random
targets over the synthetic repository, it times:

* **engine** -- ``harvester.engine.run(config, targets)``: plan, memory-mapped reads,
  the sink, the SQLite ledger and (stack) the final ``stack.h5``, into a fresh output
  folder under ``benchmarks/work/`` that is deleted after each run;
* **limit** -- plain numpy: each file's HDUs memory-mapped once (``np.memmap`` at the
  data offset, big-endian dtype), then every target's box (the same ``x0, y0`` that
  ``make_plan`` computes, made local by subtracting the patch's outer-box origin)
  copied into a preallocated, pre-faulted ``(n, H, W)`` array per plane (float32;
  int32 for the mask, as the engine). Only the slicing + copy loop is timed: no
  output is written, so this is an upper bound for any reader;
* **astrocut** -- ``astrocut.FITSCutout`` (1.4) on the same targets' home files, on a
  sample (default 200 targets, it is slow): in memory (``FITSCutout(...)`` then
  ``.fits_cutouts``) beside the stack lines, and written as one FITS file per target
  (``astrocut.fits_cut(..., output_dir=...)``) beside the fits lines.

Every timed measurement is repeated (default 3) and the median and best are kept.
The page cache is warmed first (one full read of every z file), so all three read
from memory alike. Output files go to the page cache too (nothing is fsync'd).
The limit pre-faults its output arrays before timing; every run that writes files
(engine, the limit's write context, astrocut) is preceded by touching and freeing
as much memory as it will write (:func:`_prefault`), because this VM gives free
memory back to its host and a page's next use then costs a host page fault (the
``first_touch`` figures). The 50 px stack engine runs are also timed without it.

It also runs ``harvester run`` in fresh subprocesses for 10^4, 10^5 and 10^6 random
targets (50 px, image plane, stack output) and records each one's resident-set
high-water mark (``ru_maxrss`` from ``os.wait4``), plus the peak anonymous and
file-backed RSS sampled from ``/proc/<pid>/status`` (mapped image pages that were
touched count as file-backed RSS), and the throughput.

Run with::

    .venv/bin/python benchmarks/bench_harvest.py            # full, ~10-15 minutes
    .venv/bin/python benchmarks/bench_harvest.py --quick    # ~1 minute

Results go to ``benchmarks/results/harvest.json``; a table with PASS/FAIL against
the targets is printed. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from harvester._fits import PLANE_HDUS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "harvest.json"
WORK = HERE / "work"
REPO = ROOT / "data" / "ecdfs"
BAND = "z"
ONE = ("image",)
THREE = ("image", "mask", "variance")

# The targets this benchmark checks (see benchmarks/README.md).
STACK_MIN_PER_S = 20_000.0
STACK_MIN_OF_LIMIT = 0.60
MIN_OVER_ASTROCUT = 100.0
FITS_MIN_PER_S = 1_000.0
MEMORY_MAX_GROWTH_MB = 200.0


# ---------------------------------------------------------------------------
# Helpers


def _stats(times: list[float], n: int) -> dict[str, Any]:
    med, best = statistics.median(times), min(times)
    return {
        "n": n,
        "times_s": [round(t, 5) for t in times],
        "median_s": med,
        "best_s": best,
        "per_s_median": n / med if med > 0 else float("inf"),
        "per_s_best": n / best if best > 0 else float("inf"),
    }


def _environment() -> dict[str, Any]:
    import astrocut
    import astropy
    import h5py

    import harvester

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024

    def _git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = {}
    for name in ("dirty_ratio", "dirty_background_ratio"):
        with contextlib.suppress(OSError, ValueError):
            dirty[name] = int(Path(f"/proc/sys/vm/{name}").read_text())
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git("rev-parse", "HEAD"),
        "harvester_source_sha256": _source_digest(),
        "harvester_uncommitted_changes": bool(_git("status", "--porcelain", "--", "harvester")),
        "vm": dirty,
        "loadavg_at_start": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "memory_bytes": mem_total,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "astropy": astropy.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "astrocut": astrocut.__version__,
        "harvester": getattr(harvester, "__version__", "?"),
    }


def _source_digest() -> str:
    """Hash of harvester/**/*.py, to tell whether the code changed during the run."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((ROOT / "harvester").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _warm_cache(files: list[Path]) -> dict[str, Any]:
    """Read every file once, whole, so later reads come from the page cache."""
    t0 = time.perf_counter()
    total = 0
    buf = bytearray(16 * 2**20)
    view = memoryview(buf)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                k = f.readinto(view)
                if not k:
                    break
                total += k
    return {"files": len(files), "bytes": total, "seconds": time.perf_counter() - t0}


def _disk_write_rate(folder: Path, nbytes: int = 2**30) -> dict[str, float]:
    """Sequential write of ``nbytes`` with fsync: what the disk sustains once the
    kernel's dirty-page limit is reached (large outputs end up at this rate)."""
    path = folder / "disk-rate.tmp"
    block = np.random.default_rng(0).bytes(8 * 2**20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(nbytes // len(block)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
        dt = time.perf_counter() - t0
        path.unlink(missing_ok=True)
    return {"bytes": nbytes, "seconds": dt, "mb_per_s": nbytes / dt / 1e6}


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _touch(nbytes: int) -> float:
    """Write ``nbytes`` of fresh anonymous memory, free it; the seconds it took."""
    t0 = time.perf_counter()
    a = np.ones(max(nbytes, 4) // 4, dtype=np.float32)
    dt = time.perf_counter() - t0
    del a
    return dt


def _prefault(nbytes: int) -> None:
    """Have the hypervisor back ``nbytes`` of free guest memory before a timed run.

    This VM hands free guest memory back to its host (virtio-balloon free page
    reporting, about 2 s after it is freed); the next use of such a page costs a
    host page fault, 6-15 times the kernel's own cost here (see ``first_touch`` in
    the results). The limit pre-faults its output arrays before timing; a run
    that writes files gets new page-cache pages instead, so the same courtesy is
    this: touch and free that much memory right before the timed run, whose
    allocations then reuse it. On bare metal this changes nothing.
    """
    _touch(min(nbytes, 8 * 2**30))


def _output_bytes(n: int, side: int, planes: tuple[str, ...]) -> int:
    return int(n * len(planes) * side * side * 4 * 1.25) + 2**28


def _first_touch() -> dict[str, float]:
    """Seconds per GB to write fresh memory: just freed (warm) and freed 4 s ago."""
    gb = 2**30
    _touch(gb)
    warm = _touch(gb)
    time.sleep(4.0)
    cold = _touch(gb)
    return {"warm_s_per_gb": warm, "cold_s_per_gb": cold, "ratio": cold / warm}


# ---------------------------------------------------------------------------
# (engine) harvester.engine.run


def _config(out: Path, side: int, planes: tuple[str, ...], fmt: str) -> Any:
    from harvester.config import load_config

    return load_config(
        None,
        repo=str(REPO),
        output=str(out),
        bands=(BAND,),
        size=str(side),
        planes=planes,
        formats=(fmt,),
    )


def engine_once(
    targets: Any, side: int, planes: tuple[str, ...], fmt: str, tag: str, prefault: bool = True
) -> dict[str, Any]:
    from harvester.engine import run

    out = WORK / f"engine-{tag}"
    _rmtree(out)
    config = _config(out, side, planes, fmt)
    if prefault:
        _prefault(_output_bytes(len(targets), side, planes))
    else:
        time.sleep(4.0)  # let free memory go back to the host: the VM's worst case
    t0 = time.perf_counter()
    report = run(config, targets)
    wall = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    n_files = sum(1 for _ in (out / "fits").iterdir()) if fmt == "fits" else None
    _rmtree(out)
    return {
        "wall_s": wall,
        "report_s": report.seconds,
        "processed": report.processed,
        "counts": report.counts,
        "output_bytes": disk,
        "fits_files": n_files,
    }


def measure_engine(
    targets: Any, side: int, planes: tuple[str, ...], fmt: str, repeat: int, prefault: bool = True
) -> dict[str, Any]:
    runs = [
        engine_once(targets, side, planes, fmt, f"{side}-{len(planes)}-{fmt}", prefault)
        for _ in range(repeat)
    ]
    for r in runs:
        if r["processed"] != len(targets):
            raise RuntimeError(f"engine processed {r['processed']} of {len(targets)}: {r}")
    out = _stats([r["wall_s"] for r in runs], len(targets))
    # Report.seconds as the engine reports it (it leaves out _Run.finish, see README).
    out["report_s"] = [round(r["report_s"], 5) for r in runs]
    out["counts"] = runs[-1]["counts"]
    out["output_bytes"] = runs[-1]["output_bytes"]
    out["fits_files"] = runs[-1]["fits_files"]
    return out


def stage_breakdown(
    targets: Any, side: int, planes: tuple[str, ...], fmt: str, profile: bool = False
) -> dict[str, Any]:
    """Serial replay of one engine run in this thread, timing each stage.

    Uses the engine's own stages (``_Run.prepare``, the local source's batch read,
    ``_Run._write``, ``_Run.finish``) one batch at a time, so it shows where the time
    goes; with ``profile`` the whole replay runs under cProfile (the real run's work
    is in worker threads, which cProfile does not see).
    """
    from harvester.engine import MAX_BATCH_BYTES, RunContext, load_run_targets
    from harvester.engine import BatchResult as _Result
    from harvester.engine import HarvestRun as _Run
    from harvester.repo import load_repository
    from harvester.sources.local import LocalSource
    from harvester.sources.open import retry_policy

    out = WORK / f"stages-{side}-{len(planes)}-{fmt}"
    _rmtree(out)
    config = _config(out, side, planes, fmt)
    repo = load_repository(config.repo)
    source = LocalSource(repo)
    ctx = RunContext(config, repo, retry_policy(config))
    times = {"prepare": 0.0, "read": 0.0, "sink": 0.0, "ledger": 0.0, "finish": 0.0}
    prof = cProfile.Profile() if profile else None

    def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[key] += time.perf_counter() - t0

        return wrapper

    _prefault(_output_bytes(len(targets), side, planes))  # as for the engine runs
    t_all = time.perf_counter()
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    run = _Run.prepare(ctx, load_run_targets(config, repo, targets))
    times["prepare"] = time.perf_counter() - t0
    if run.stack is not None:
        run.stack.write = timed("sink", run.stack.write)
    if run.fits is not None:
        run.fits.write = timed("sink", run.fits.write)
    assert run.ledger is not None
    run.ledger.record = timed("ledger", run.ledger.record)
    batches = 0
    for spec in run.plan.batches(config.fetch.batch_size, MAX_BATCH_BYTES):
        t0 = time.perf_counter()
        started = time.time()
        batch = source.read_batch(run.plan, spec)  # what the engine's read stage runs
        result = _Result(spec, batch, 1, started, time.time())
        times["read"] += time.perf_counter() - t0
        run._write(result)
        batches += 1
    t0 = time.perf_counter()
    run.finish(time.perf_counter() - t_all, source.cache.opens)
    times["finish"] = time.perf_counter() - t0
    if prof:
        prof.disable()
    total = time.perf_counter() - t_all
    source.cache.close()
    _rmtree(out)
    other = total - sum(times.values())
    result_d: dict[str, Any] = {
        "n": len(targets),
        "batches": batches,
        "total_s": total,
        "stages_s": {**times, "other(write rows etc.)": other},
        "serial_per_s": len(targets) / total,
    }
    if prof:
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("tottime")
        rows = []
        for (file, line, func), (_cc, nc, tt, ct, _callers) in sorted(
            st.stats.items(),  # type: ignore[attr-defined]
            key=lambda kv: kv[1][2],
            reverse=True,
        )[:20]:
            rows.append(
                {
                    "function": f"{Path(file).name}:{line}({func})",
                    "calls": nc,
                    "tottime_s": round(tt, 4),
                    "cumtime_s": round(ct, 4),
                }
            )
        result_d["profile_top_tottime"] = rows
    return result_d


# ---------------------------------------------------------------------------
# (a) the limit: plain numpy memory-mapped slicing


class MemmapFiles:
    """Every z file's HDUs memory-mapped once: (tract, patch) -> plane -> array."""

    def __init__(self, repo: Any) -> None:
        from astropy.io import fits

        bitpix = {-32: ">f4", 32: ">i4", -64: ">f8", 16: ">i2", 64: ">i8", 8: "u1"}
        self.maps: dict[tuple[int, int], dict[str, np.memmap]] = {}
        for ref in repo:
            if ref.band != BAND:
                continue
            path = repo.path_of(ref)
            planes: dict[str, np.memmap] = {}
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                for plane, name in PLANE_HDUS.items():
                    i = hdul.index_of(name)
                    hdr = hdul[i].header
                    info = hdul.fileinfo(i)
                    planes[plane] = np.memmap(
                        path,
                        dtype=bitpix[int(hdr["BITPIX"])],
                        mode="r",
                        offset=int(info["datLoc"]),
                        shape=(int(hdr["NAXIS2"]), int(hdr["NAXIS1"])),
                    )
            self.maps[(ref.tract, ref.patch)] = planes


def limit_jobs(plan: Any, files: MemmapFiles) -> tuple[list[tuple[Any, list, list, list]], dict]:
    """Per home file: (planes, rows, ys, xs) in local pixels, sorted by y like the engine.

    Boxes are clipped to the home file (with these sizes no random target's box
    leaves its home patch's outer box, so nothing is clipped; counted anyway).
    """
    sm = plan.skymap
    size, border = sm.config.patch_inner, sm.config.patch_border
    n = len(plan)
    order = np.lexsort((plan.y0, plan.patch, plan.tract))
    jobs = []
    no_file = clipped = 0
    tp = np.stack([plan.tract[order], plan.patch[order]], axis=1)
    starts = np.flatnonzero(np.any(np.diff(tp, axis=0) != 0, axis=1)) + 1
    for grp in np.split(order, starts):
        if grp.size == 0:
            continue
        key = (int(plan.tract[grp[0]]), int(plan.patch[grp[0]]))
        maps = files.maps.get(key)
        if maps is None:
            no_file += grp.size
            continue
        px, py = key[1] % sm.num_patches, key[1] // sm.num_patches
        ox, oy = px * size - border, py * size - border
        xs = plan.x0[grp] - ox
        ys = plan.y0[grp] - oy
        side = int(plan.side[grp[0]])
        hh, ww = maps["image"].shape
        inside = (xs >= 0) & (ys >= 0) & (xs + side <= ww) & (ys + side <= hh)
        clipped += int((~inside).sum())
        keep = grp[inside]
        jobs.append((maps, keep.tolist(), ys[inside].tolist(), xs[inside].tolist()))
    return jobs, {"targets": n, "no_home_file": no_file, "clipped_skipped": clipped}


def limit_once(jobs: list, planes: tuple[str, ...], arrays: dict[str, np.ndarray], side: int):
    for maps, rows, ys, xs in jobs:
        for plane in planes:
            mm = maps[plane]
            out = arrays[plane]
            for r, y, x in zip(rows, ys, xs, strict=True):
                out[r] = mm[y : y + side, x : x + side]


def measure_limit(
    targets: Any, repo: Any, files: MemmapFiles, side: int, planes: tuple[str, ...], repeat: int
) -> dict[str, Any]:
    from harvester.plan import make_plan

    plan = make_plan(targets, repo, (BAND,), side, planes)
    jobs, info = limit_jobs(plan, files)
    n = len(targets)
    arrays = {}
    for plane in planes:
        a = np.empty((n, side, side), dtype=np.int32 if plane == "mask" else np.float32)
        a.fill(0)  # pre-fault: the timed loop pays for copies, not page faults
        arrays[plane] = a
    limit_once(jobs, planes, arrays, side)  # untimed warm-up pass
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        limit_once(jobs, planes, arrays, side)
        times.append(time.perf_counter() - t0)
    # Spot check against the engine's plan: one box equals a direct memmap slice.
    if jobs and jobs[0][1]:
        maps, rows, ys, xs = jobs[0]
        ref = np.asarray(maps["image"][ys[0] : ys[0] + side, xs[0] : xs[0] + side], np.float32)
        assert np.array_equal(arrays["image"][rows[0]], ref, equal_nan=True)
    # Context, not the check: (1) the same loop on maps opened inside the timing, as a
    # fresh script would (file open, header parse, page-table faults); (2) the copy
    # followed by writing the same bytes to files, one thread: a floor for any
    # harvester that must write its output, which the limit above does not do.
    cold, written = [], []
    sink = WORK / "limit-write"
    for _ in range(repeat):
        t0 = time.perf_counter()
        fresh = MemmapFiles(repo)
        fresh_jobs, _ = limit_jobs(plan, fresh)
        limit_once(fresh_jobs, planes, arrays, side)
        cold.append(time.perf_counter() - t0)
        del fresh, fresh_jobs
        _rmtree(sink)
        sink.mkdir(parents=True)
        _prefault(_output_bytes(n, side, planes))  # as for the engine
        t0 = time.perf_counter()
        limit_once(jobs, planes, arrays, side)
        for plane, a in arrays.items():
            flat = a.reshape(len(a), -1)
            step = max(1, 8 * 2**20 // max(flat[0].nbytes, 1))
            for k, start in enumerate(range(0, len(a), step)):
                with open(sink / f"{plane}-{k:06d}.raw", "wb") as f:
                    f.write(flat[start : start + step].data)
        written.append(time.perf_counter() - t0)
    _rmtree(sink)
    del arrays
    out = _stats(times, n)
    out.update(info)
    out["open_map_copy"] = _stats(cold, n)
    out["copy_then_write_files"] = _stats(written, n)
    return out


# ---------------------------------------------------------------------------
# (b) astrocut


def astrocut_sample(targets: Any, repo: Any, side: int, k: int) -> list[tuple[str, float, float]]:
    """(home file, ra, dec) of the first ``k`` targets that have a home z file."""
    from harvester.plan import make_plan

    plan = make_plan(targets.take(np.arange(min(len(targets), 4 * k))), repo, (BAND,), side)
    out = []
    for i in range(len(plan)):
        ref = repo.get(int(plan.tract[i]), int(plan.patch[i]), BAND)
        if ref is None:
            continue
        out.append((str(repo.path_of(ref)), float(targets.ra[i]), float(targets.dec[i])))
        if len(out) == k:
            break
    return out


def astrocut_once(sample: list, side: int, planes: tuple[str, ...], mode: str, tag: str) -> float:
    import astropy.units as u
    from astrocut import FITSCutout, fits_cut
    from astropy.coordinates import SkyCoord

    ext = [1] if planes == ONE else [1, 2, 3]  # IMAGE; IMAGE, MASK, VARIANCE
    out = WORK / f"astrocut-{tag}"
    _rmtree(out)
    out.mkdir(parents=True)
    _prefault(_output_bytes(len(sample), side, planes))  # as for the engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        for j, (path, ra, dec) in enumerate(sample):
            coord = SkyCoord(ra * u.deg, dec * u.deg)
            if mode == "memory":
                cut = FITSCutout([path], coord, cutout_size=side, extension=ext)
                hdul = cut.fits_cutouts[0]
                assert hdul[1].data.shape == (side, side)
            else:
                fits_cut(
                    [path], coord, cutout_size=side, extension=ext,
                    output_dir=str(out), cutout_prefix=f"t{j}",
                )  # fmt: skip
        dt = time.perf_counter() - t0
    if mode == "fits":
        assert sum(1 for _ in out.iterdir()) == len(sample)
    _rmtree(out)
    return dt


def measure_astrocut(
    sample: list, side: int, planes: tuple[str, ...], mode: str, repeat: int
) -> dict[str, Any]:
    tag = f"{side}-{len(planes)}-{mode}"
    astrocut_once(sample[:5], side, planes, mode, tag)  # imports, first-call costs
    times = [astrocut_once(sample, side, planes, mode, tag) for _ in range(repeat)]
    out = _stats(times, len(sample))
    out["mode"] = mode
    return out


# ---------------------------------------------------------------------------
# Memory: `harvester run` subprocesses


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])  # kB
    return out


#: A tiny launcher (``python -S``, a few MB) that forks and execs the command, reaps it
#: with ``wait4`` and writes that child's rusage as JSON to the file in argv[1]. Linux
#: keeps the pre-exec memory high-water mark in ``ru_maxrss``, so a child spawned
#: straight from this (large) benchmark process would report at least this process's
#: RSS; spawning from the launcher keeps each run's high-water mark its own.
_LAUNCHER = r"""
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"pid": pid, "exit": os.waitstatus_to_exitcode(status),
               "maxrss_kb": ru.ru_maxrss, "user_s": ru.ru_utime, "system_s": ru.ru_stime}, f)
"""


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def memory_run(n: int) -> dict[str, Any]:
    out = WORK / f"memory-{n}"
    _rmtree(out)
    exe = Path(sys.executable).with_name("harvester")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "harvester"]
    cmd += [
        "run", "--repo", str(REPO), "--targets", f"random:{n}", "--output", str(out),
        "--bands", BAND, "--size", "50", "--planes", "image", "--formats", "stack",
        "--quiet", "--fresh",
    ]  # fmt: skip
    usage_file = WORK / f"memory-{n}.rusage.json"
    usage_file.unlink(missing_ok=True)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    t0 = time.perf_counter()
    launcher = subprocess.Popen(
        [sys.executable, "-S", "-c", _LAUNCHER, str(usage_file), *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )

    def sample() -> None:
        while not stop.is_set():
            for child in _children(launcher.pid):
                for k, v in _proc_status(child).items():
                    peaks[k] = max(peaks.get(k, 0), v)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout_b, stderr_b = launcher.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    stdout = stdout_b.decode(errors="replace")
    stderr = stderr_b.decode(errors="replace")
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    _rmtree(out)
    if launcher.returncode != 0 or not usage_file.exists():
        raise RuntimeError(f"launcher failed ({launcher.returncode}): {stderr.strip()}")
    usage = json.loads(usage_file.read_text())
    usage_file.unlink()
    if usage["exit"] != 0:
        raise RuntimeError(f"harvester run failed ({usage['exit']}): {stderr.strip()}")
    m = re.search(r"time\s+([\d.]+) s, ([\d,]+) targets/s", stdout)
    return {
        "n": n,
        "command": " ".join(cmd),
        "maxrss_mb": usage["maxrss_kb"] / 1024,  # Linux: kB
        "peak_rss_sampled_mb": peaks.get("VmRSS", 0) / 1024,
        "peak_rss_anon_mb": peaks.get("RssAnon", 0) / 1024,
        "peak_rss_file_mb": peaks.get("RssFile", 0) / 1024,
        "wall_s": wall,
        "per_s_wall": n / wall,
        "engine_s": float(m.group(1)) if m else None,
        "per_s_engine": float(m.group(2).replace(",", "")) if m else None,
        "output_bytes": disk,
        "user_s": usage["user_s"],
        "system_s": usage["system_s"],
        "stdout": stdout.strip().splitlines(),
    }


# ---------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one repeat")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON path")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs (default 3)")
    parser.add_argument("--seed", type=int, default=20251121)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess runs")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="cProfile a serial replay of a combination: auto = those that miss a target",
    )
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    quick = args.quick
    repeat = args.repeat or (1 if quick else 3)
    n_stack50 = 10_000 if quick else 100_000
    n_300 = 500 if quick else 5_000
    n_fits = 500 if quick else 5_000
    n_astro = 20 if quick else 200
    memory_ns = (1_000, 10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)

    from harvester.engine import random_targets
    from harvester.repo import load_repository

    if not (REPO / "index.json").exists():
        print(f"{REPO} is missing: build it with `.venv/bin/harvester synth data/ecdfs`")
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    repo = load_repository(REPO)
    free = shutil.disk_usage(WORK).free
    print(f"free disk under {WORK}: {free / 1e9:.1f} GB")

    files = sorted({repo.path_of(r) for r in repo if r.band == BAND})
    warm = _warm_cache(files)
    print(
        f"page cache warmed: {warm['files']} {BAND} files, {warm['bytes'] / 1e9:.2f} GB "
        f"read in {warm['seconds']:.1f} s"
    )
    disk = _disk_write_rate(WORK)
    print(f"disk: sequential write with fsync {disk['mb_per_s']:,.0f} MB/s")
    touch = _first_touch()
    print(
        f"memory: writing 1 GB of just-freed memory {touch['warm_s_per_gb']:.2f} s, "
        f"of memory freed 4 s before {touch['cold_s_per_gb']:.2f} s (host page faults)"
    )
    maps = MemmapFiles(repo)
    all_targets = random_targets(repo, f"random:{n_stack50}", args.seed)

    combos = []
    for side in (50, 300):
        for planes in (ONE, THREE):
            for fmt in ("stack", "fits"):
                n = n_fits if fmt == "fits" else (n_stack50 if side == 50 else n_300)
                combos.append((side, planes, fmt, n))

    results: dict[str, Any] = {
        "benchmark": "harvest",
        "quick": quick,
        "repeat": repeat,
        "seed": args.seed,
        "band": BAND,
        "repository": str(REPO.relative_to(ROOT)),
        "warm_cache": warm,
        "disk_write_fsync": disk,
        "first_touch": touch,
        "environment": _environment(),
        "combinations": [],
    }
    astro_cache: dict[tuple[int, tuple[str, ...], str], dict] = {}
    for side, planes, fmt, n in combos:
        label = f"{fmt:<5} {side:>3}px {'+'.join(p[0] for p in planes):<5}"
        targets = all_targets.take(np.arange(n))
        print(f"{label}  n={n:,}: engine ...", end="", flush=True)
        eng = measure_engine(targets, side, planes, fmt, repeat)
        if (fmt, side, planes) == ("stack", 50, ONE):
            # Context: the same runs on memory the host took back (no _prefault).
            print(f" {eng['per_s_median']:,.0f}/s; not pre-faulted ...", end="", flush=True)
            eng["not_prefaulted"] = npf = measure_engine(targets, side, planes, fmt, repeat, False)
            print(f" {npf['per_s_median']:,.0f}/s; limit ...", end="", flush=True)
        else:
            print(f" {eng['per_s_median']:,.0f}/s; limit ...", end="", flush=True)
        lim = measure_limit(targets, repo, maps, side, planes, repeat)
        print(f" {lim['per_s_median']:,.0f}/s; astrocut ...", end="", flush=True)
        mode = "memory" if fmt == "stack" else "fits"
        key = (side, planes, mode)
        if key not in astro_cache:
            sample = astrocut_sample(all_targets, repo, side, n_astro)
            astro_cache[key] = measure_astrocut(sample, side, planes, mode, repeat)
        ast = astro_cache[key]
        print(f" {ast['per_s_median']:,.1f}/s")
        results["combinations"].append(
            {
                "loadavg_after": list(os.getloadavg()),
                "output": fmt,
                "side": side,
                "planes": list(planes),
                "n": n,
                "engine": eng,
                "limit_numpy_memmap": lim,
                "astrocut": ast,
                "engine_over_limit_median": eng["per_s_median"] / lim["per_s_median"],
                "engine_over_limit_best": eng["per_s_best"] / lim["per_s_best"],
                "engine_over_astrocut_median": eng["per_s_median"] / ast["per_s_median"],
                "engine_over_astrocut_best": eng["per_s_best"] / ast["per_s_best"],
            }
        )
        _write(args.out, results)

    # Where the time goes: a serial replay of every combination (one repeat).
    for c in results["combinations"]:
        targets = all_targets.take(np.arange(c["n"]))
        c["serial_stages"] = stage_breakdown(
            targets, c["side"], tuple(c["planes"]), c["output"], profile=False
        )

    # Memory: fresh `harvester run` subprocesses.
    mem: dict[str, Any] = {"runs": []}
    if not args.no_memory:
        for n in memory_ns:
            need = n * 50 * 50 * 4 * 1.3 + 1e9
            free = shutil.disk_usage(WORK).free
            if free < need:
                print(f"memory run {n:,}: skipped, {free / 1e9:.1f} GB free < {need / 1e9:.1f}")
                mem["runs"].append({"n": n, "skipped": f"disk: {free} bytes free"})
                continue
            print(f"memory run {n:,} targets ...", end="", flush=True)
            r = memory_run(n)
            print(f" maxrss {r['maxrss_mb']:.0f} MB, {r['per_s_wall']:,.0f}/s wall")
            mem["runs"].append(r)
        ok = [r for r in mem["runs"] if "maxrss_mb" in r]
        if len(ok) >= 2:
            mem["growth_mb"] = ok[-1]["maxrss_mb"] - ok[0]["maxrss_mb"]
            mem["growth_anon_mb"] = ok[-1]["peak_rss_anon_mb"] - ok[0]["peak_rss_anon_mb"]
            mem["growth_from_n"] = ok[0]["n"]
            mem["growth_to_n"] = ok[-1]["n"]
    results["memory"] = mem

    results["checks"] = checks = _checks(results)
    missed = {
        (c["side"], c["output"], c["n_planes"])
        for c in checks
        if c.get("pass") is False and "side" in c
    }
    for c in results["combinations"]:
        key = (c["side"], c["output"], len(c["planes"]))
        if args.profile == "always" or (args.profile == "auto" and key in missed):
            targets = all_targets.take(np.arange(c["n"]))
            c["serial_profile"] = stage_breakdown(
                targets, c["side"], tuple(c["planes"]), c["output"], profile=True
            )
    results["seconds_total"] = time.perf_counter() - t_start
    end_digest = _source_digest()
    results["harvester_source_sha256_at_end"] = end_digest
    results["harvester_changed_during_run"] = (
        end_digest != results["environment"]["harvester_source_sha256"]
    )
    results["loadavg_at_end"] = list(os.getloadavg())
    _write(args.out, results)
    _print_table(results)
    if results["harvester_changed_during_run"]:
        print("WARNING: harvester/ changed during the run; numbers mix two versions")
    print(f"results written to {args.out}")
    return 0


def _find(
    results: dict[str, Any], fmt: str, side: int, planes: tuple[str, ...]
) -> dict[str, Any] | None:
    for c in results["combinations"]:
        if c["output"] == fmt and c["side"] == side and tuple(c["planes"]) == planes:
            return c
    return None


def _checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def check(text: str, value: float, ok: bool, where: tuple[str, int, int] | None) -> None:
        row: dict[str, Any] = {"check": text, "value": value, "pass": ok}
        if where is not None:
            row["output"], row["side"], row["n_planes"] = where
        out.append(row)

    s = _find(results, "stack", 50, ONE)
    if s is not None:
        v, r = s["engine"]["per_s_median"], s["engine_over_limit_median"]
        a = s["engine_over_astrocut_median"]
        where = ("stack", 50, 1)
        check(f"stack 50px image >= {STACK_MIN_PER_S:,.0f}/s", v, v >= STACK_MIN_PER_S, where)
        text = f"stack 50px image >= {STACK_MIN_OF_LIMIT:.0%} of numpy limit"
        check(text, r, r >= STACK_MIN_OF_LIMIT, where)
        text = f"stack 50px image >= {MIN_OVER_ASTROCUT:.0f}x astrocut"
        check(text, a, a >= MIN_OVER_ASTROCUT, where)
    f = _find(results, "fits", 50, ONE)
    if f is not None:
        v = f["engine"]["per_s_median"]
        text = f"fits 50px image >= {FITS_MIN_PER_S:,.0f}/s"
        check(text, v, v >= FITS_MIN_PER_S, ("fits", 50, 1))
    mem = results.get("memory", {})
    if "growth_mb" in mem:
        g = mem["growth_mb"]
        text = (
            f"memory growth {mem['growth_from_n']:.0e} -> {mem['growth_to_n']:.0e} "
            f"< {MEMORY_MAX_GROWTH_MB:.0f} MB"
        )
        check(text, g, g < MEMORY_MAX_GROWTH_MB, None)
    return out


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _print_table(results: dict[str, Any]) -> None:
    env = results["environment"]
    print()
    print(
        f"harvest benchmark, band {results['band']}, {env['cpu_count']} CPUs "
        f"({env['cpu_model']}), python {env['python']}, numpy {env['numpy']}, "
        f"astropy {env['astropy']}, h5py {env['h5py']}, astrocut {env['astrocut']}"
    )
    print(
        f"cutouts/s, median of {results['repeat']} (best in brackets); page cache warm; "
        f"astrocut on a sample"
    )
    head = (
        f"{'output':<6} {'side':>4} {'planes':<6} {'n':>7} | {'engine':>17} | "
        f"{'numpy limit':>19} | {'eng/lim':>7} | {'astrocut':>13} {'(n)':>5} | "
        f"{'eng/astrocut':>12}"
    )
    print(head)
    print("-" * len(head))
    for c in results["combinations"]:
        e, lim, a = c["engine"], c["limit_numpy_memmap"], c["astrocut"]
        planes = "i" if len(c["planes"]) == 1 else "i+m+v"
        print(
            f"{c['output']:<6} {c['side']:>4} {planes:<6} {c['n']:>7,} | "
            f"{e['per_s_median']:>8,.0f} ({e['per_s_best']:>6,.0f}) | "
            f"{lim['per_s_median']:>9,.0f} ({lim['per_s_best']:>7,.0f}) | "
            f"{c['engine_over_limit_median']:>6.1%} | "
            f"{a['per_s_median']:>5.1f} ({a['per_s_best']:>5.1f}) {a['n']:>5} | "
            f"{c['engine_over_astrocut_median']:>11,.0f}x"
        )
    print()
    print("context for the limit (cutouts/s, median): the same loop with the maps opened in")
    print("the timing | the copy then writing the same bytes to files, one thread")
    for c in results["combinations"]:
        lim = c["limit_numpy_memmap"]
        if "open_map_copy" not in lim:
            continue
        planes = "i" if len(c["planes"]) == 1 else "i+m+v"
        cold, wr = lim["open_map_copy"]["per_s_median"], lim["copy_then_write_files"]
        print(
            f"  {c['output']:<5} {c['side']:>3}px {planes:<5} {cold:>9,.0f}/s "
            f"(engine {c['engine']['per_s_median'] / cold:.0%}) | {wr['per_s_median']:>9,.0f}/s "
            f"(engine {c['engine']['per_s_median'] / wr['per_s_median']:.0%})"
        )
    touch = results.get("first_touch")
    for c in results["combinations"]:
        npf = c["engine"].get("not_prefaulted")
        if npf and touch:
            lim = c["limit_numpy_memmap"]["per_s_median"]
            print()
            print(
                f"this VM: writing 1 GB of memory freed 4 s before takes "
                f"{touch['cold_s_per_gb']:.2f} s, of just-freed memory "
                f"{touch['warm_s_per_gb']:.2f} s; the engine runs above"
            )
            print(
                f"follow a pre-fault (see _prefault). Without it ({c['output']} {c['side']}px): "
                f"{npf['per_s_median']:,.0f}/s, {npf['per_s_median'] / lim:.0%} of the limit"
            )
    print()
    print("serial replay (one thread), seconds per stage:")
    for c in results["combinations"]:
        st = c.get("serial_stages")
        if not st:
            continue
        planes = "i" if len(c["planes"]) == 1 else "i+m+v"
        parts = ", ".join(f"{k} {v:.2f}" for k, v in st["stages_s"].items())
        print(
            f"  {c['output']:<5} {c['side']:>3}px {planes:<5} {st['serial_per_s']:>8,.0f}/s: "
            f"{parts}"
        )
    mem = results.get("memory", {})
    if mem.get("runs"):
        print()
        print("memory, `harvester run` subprocesses (50 px, image, stack):")
        print(
            f"  {'targets':>9} | {'maxrss MB':>9} | {'anon MB':>7} | {'file MB':>7} | "
            f"{'wall/s':>8} | {'engine/s':>8}"
        )
        for r in mem["runs"]:
            if "maxrss_mb" not in r:
                print(f"  {r['n']:>9,} | skipped: {r.get('skipped')}")
                continue
            print(
                f"  {r['n']:>9,} | {r['maxrss_mb']:>9.0f} | {r['peak_rss_anon_mb']:>7.0f} | "
                f"{r['peak_rss_file_mb']:>7.0f} | {r['per_s_wall']:>8,.0f} | "
                f"{r['per_s_engine'] or 0:>8,.0f}"
            )
        if "growth_mb" in mem:
            print(
                f"  growth {mem['growth_from_n']:,} -> {mem['growth_to_n']:,}: "
                f"{mem['growth_mb']:.0f} MB maxrss ({mem['growth_anon_mb']:.0f} MB anonymous)"
            )
    print()
    print("targets:")
    for c in results["checks"]:
        v = c["value"]
        shown = f"{v:.1%}" if "limit" in c["check"] else f"{v:,.1f}"
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['check']:<45} {shown}")
    for c in results["combinations"]:
        prof = c.get("serial_profile")
        if prof:
            planes = "+".join(p[0] for p in c["planes"])
            print()
            print(f"profile (serial replay, cProfile, by own time): {c['output']} "
                  f"{c['side']}px {planes}, {prof['total_s']:.2f} s")  # fmt: skip
            for row in prof["profile_top_tottime"][:12]:
                print(
                    f"  {row['tottime_s']:>8.3f} s own {row['cumtime_s']:>8.3f} s cum "
                    f"{row['calls']:>9,}  {row['function']}"
                )


if __name__ == "__main__":
    raise SystemExit(main())
