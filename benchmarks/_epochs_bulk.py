"""Benchmark (b) of issue 14: bulk local harvest of every epoch of many targets.

A synthetic field with more visits than the demo (``harvester synth DIR --epochs
--visits N --compress``, built once into a work folder), ``--targets`` random
positions on its written detectors, every ``visit_image`` and ``difference_image``
stamp of each (``--size`` px, image, mask and variance), harvested by the engine
(``formats = stack``: the stamps into the stack's shards, ``stack.h5`` with its
per-target index; and ``fits,stack``: the per-target native files too), each run
in a fresh process with the page cache warm.

The **limit**, in the same run: numpy slicing of the same boxes (the ones the
engine cut, read back from its ledger outside the timing) from the same visit
files, each file opened once with astropy and its three planes decompressed
whole (the files are tile-compressed, as DP1's), the boxes copied into one
preallocated array (a gather per image and plane for boxes on the detector, a
clipped copy for boxes over its edge), nothing written. The engine decodes only
the tiles its boxes touch when they touch few of them, so on a sparse field it
may beat this limit.

Images opened: the engine's report against the distinct images in its ledger.
Run with::

    .venv/bin/python benchmarks/bench_epochs.py --part b [--field DIR] [--visits 24]
        [--targets 20000] [--size 51] [--repeat 1]

Dependency rule: harvester's public API and astropy; run from bench_epochs.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(__file__).resolve().parent / "work"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--field", type=Path, default=WORK / "epochs-field", help="(b) field")
    parser.add_argument("--visits", type=int, default=24, help="(b) visits of the field")
    parser.add_argument("--formats", default="stack;fits,stack", help="(b) runs, ';'-separated")
    parser.add_argument("--concurrency", type=int, default=2, help="(b) fetch.concurrency")


def build_field(field: Path, visits: int) -> float:
    """The field, built once (seconds it took; 0 when it was there)."""
    if (field / "index.json").is_file():
        index = json.loads((field / "index.json").read_text())
        if len(index.get("visits", [])) == visits:
            return 0.0
    t0 = time.perf_counter()
    cmd = [
        str(Path(sys.executable).parent / "harvester"),
        "synth",
        str(field),
        "--epochs",
        "--visits",
        str(visits),
        "--compress",
        "--no-butler",
        "--jobs",
        str(os.cpu_count() or 1),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def field_targets(field: Path, n: int, seed: int) -> dict[str, Any]:
    """``n`` random positions on the field's written visit_image detectors."""
    from harvester.epochs import FootprintIndex
    from harvester.repo import load_repository

    repo = load_repository(field, check_files=False)
    refs = [r for r in repo.epochs if r.dataset_type == "visit_image"]
    corners = np.array([r.polygon for r in refs])
    index = FootprintIndex.from_refs(refs)
    rng = np.random.default_rng(seed)
    ra_out: list[np.ndarray] = []
    dec_out: list[np.ndarray] = []
    got = 0
    while got < n:
        ra = rng.uniform(corners[..., 0].min(), corners[..., 0].max(), 4 * n)
        dec = rng.uniform(corners[..., 1].min(), corners[..., 1].max(), 4 * n)
        on = np.unique(index.query(ra, dec).target)
        ra_out.append(ra[on])
        dec_out.append(dec[on])
        got += on.size
    ra_all, dec_all = np.concatenate(ra_out)[:n], np.concatenate(dec_out)[:n]
    return {"id": np.array([f"t{i:06d}" for i in range(n)]), "ra": ra_all, "dec": dec_all}


def _warm(field: Path) -> None:
    """Read every file once: the page cache holds the field for every side alike."""
    for path in sorted(field.rglob("*.fits")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    """One engine run, in this (fresh) process."""
    from harvester.config import load_config
    from harvester.engine import run

    targets = np.load(args.targets_file)
    t = {"id": targets["id"], "ra": targets["ra"], "dec": targets["dec"]}
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    config = load_config(
        None,
        repo=args.field,
        images="visit_image,difference_image",
        bands="g,r,i,z",
        size=str(args.size),
        formats=args.run_formats,
        concurrency=args.concurrency,
    ).replace(output=out)
    t0 = time.perf_counter()
    report = run(config, t)
    wall = time.perf_counter() - t0
    db = sqlite3.connect(out / "ledger.sqlite")
    images = db.execute("SELECT count(DISTINCT dataset_id) FROM target_epochs").fetchone()[0]
    db.close()
    stamps = (report.epochs or {}).get("ok", 0) + (report.epochs or {}).get("partial", 0)
    return {
        "wall_s": wall,
        "stamps": stamps,
        "pairs": report.processed,
        "images_opened": report.images_opened,
        "images_in_ledger": images,
        "stamps_per_s": stamps / wall,
        "targets": report.counts,
    }


def run_limit(args: argparse.Namespace) -> dict[str, Any]:
    """numpy slicing of the engine's boxes from the same files (see the module doc)."""
    from astropy.io import fits
    from numpy.lib.stride_tricks import sliding_window_view

    from harvester.repo import load_repository

    repo = load_repository(args.field, check_files=False)
    paths = {r.id: repo.root / r.path for r in repo.epochs}
    db = sqlite3.connect(Path(args.out_dir) / "ledger.sqlite")
    rows = db.execute(
        "SELECT dataset_id, x0, y0 FROM target_epochs WHERE status IN ('ok', 'partial') "
        "ORDER BY dataset_id"
    ).fetchall()
    db.close()
    by_image: dict[str, list[tuple[int, int]]] = {}
    for d, x, y in rows:
        by_image.setdefault(d, []).append((int(x), int(y)))
    s = args.size
    n = len(rows)
    out = {
        "IMAGE": np.empty((n, s, s), np.float32),
        "MASK": np.empty((n, s, s), np.int32),
        "VARIANCE": np.empty((n, s, s), np.float32),
    }
    for arr in out.values():
        arr.fill(0)  # pre-faulted: the limit pays no page faults
    t0 = time.perf_counter()
    at = 0
    for d, boxes in by_image.items():
        xy = np.array(boxes, dtype=np.int64)
        with fits.open(paths[d], memmap=False) as hdul:
            for name, arr in out.items():
                plane = hdul[name].data  # decompressed whole, as the engine may
                h, w = plane.shape
                x0, y0 = xy[:, 0], xy[:, 1]
                inside = (x0 >= 0) & (y0 >= 0) & (x0 + s <= w) & (y0 + s <= h)
                rows_in = np.flatnonzero(inside)
                if rows_in.size:
                    view = sliding_window_view(plane, (s, s))
                    arr[at + rows_in] = view[y0[rows_in], x0[rows_in]]
                for k in np.flatnonzero(~inside).tolist():
                    xa, xb = max(int(x0[k]), 0), min(int(x0[k]) + s, w)
                    ya, yb = max(int(y0[k]), 0), min(int(y0[k]) + s, h)
                    arr[at + k, ya - y0[k] : yb - y0[k], xa - x0[k] : xb - x0[k]] = plane[
                        ya:yb, xa:xb
                    ]
        at += len(boxes)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "stamps": n, "images": len(by_image), "stamps_per_s": n / wall}


def _spawn(kind: str, args: argparse.Namespace, **extra: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent / "bench_epochs.py"),
        "--child-b",
        kind,
        "--field",
        str(args.field),
        "--size",
        str(args.size),
        "--concurrency",
        str(args.concurrency),
        "--targets-file",
        str(args.targets_file),
        "--out-dir",
        str(args.out_dir),
    ]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", value]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    return run_engine(args) if kind == "engine" else run_limit(args)


def main_b(args: argparse.Namespace) -> dict[str, Any]:
    """Part (b): the field, the targets, the engine's runs and the limit's."""
    built = build_field(args.field, args.visits)
    work = args.field.parent
    args.targets_file = work / f".epochs-targets-{args.targets}.npz"
    t = field_targets(args.field, args.targets, args.seed)
    np.savez(args.targets_file, **t)
    _warm(args.field)
    load = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {}
    limits: list[dict[str, Any]] = []
    for formats in args.formats.split(";"):
        args.out_dir = work / f"epochs-out-{formats.replace(',', '-')}"
        for _ in range(args.repeat):
            runs.setdefault(formats, []).append(_spawn("engine", args, run_formats=formats))
            if formats == "stack":
                limits.append(_spawn("limit", args))
    limit = statistics.median(r["stamps_per_s"] for r in limits) if limits else float("nan")
    med = {f: statistics.median(r["stamps_per_s"] for r in rs) for f, rs in runs.items()}
    first = next(iter(runs.values()))[0]
    result = {
        "benchmark": "epochs (b): bulk local, every epoch of many targets",
        "field": str(args.field),
        "visits": args.visits,
        "field_build_s": built,
        "targets": args.targets,
        "stamp_side": args.size,
        "stamps": first["stamps"],
        "images": first["images_in_ledger"],
        "images_opened": {f: [r["images_opened"] for r in rs] for f, rs in runs.items()},
        "engine_runs": runs,
        "limit_runs": limits,
        "median_stamps_per_s": med,
        "limit_stamps_per_s": limit,
        "engine_over_limit": {f: v / limit for f, v in med.items()},
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
    }
    print(
        f"(b) {args.targets:,} targets x every epoch of a {args.visits}-visit field "
        f"({result['images']} visit/difference images, tile-compressed), {result['stamps']:,} "
        f"stamps of {args.size} px (image, mask, variance); field built in {built:.0f} s"
    )
    for f, v in med.items():
        opened = result["images_opened"][f]
        print(
            f"  engine, formats {f}: {v:,.0f} stamps/s ({v / limit:.0%} of the limit), "
            f"images opened {opened} of {result['images']} in the ledger"
        )
    print(
        f"  numpy limit (astropy decompression + slicing, nothing written): {limit:,.0f} stamps/s"
    )
    print(f"  load average {load[0]:.2f} -> {result['load_average_after'][0]:.2f}")
    return result
