"""Benchmarks of issue 14 (time-domain cutouts).

(a) DMS-REQ-0375 on the twin: all epochs of one target, 51 px, through ``harvester
    serve`` with 50 ms latency, against the 10 s requirement and against one SODA
    request per epoch at the quota (``_epochs_dms.py``). The peers (pyvo as the
    tutorials do it; aiohttp, concurrent, at the quota) and harvester's engine
    (``_epochs_dms.engine_all_epochs``, ``--source http`` and ``--source soda``).
(b) Bulk local: many targets x all epochs, stamps/s against numpy slicing of the
    same visit files in the same run (goal: at least half of it), each image opened
    once: ``--part b``, see ``benchmarks/_epochs_bulk.py``.
(c) Which images cover which targets: :class:`harvester.epochs.FootprintIndex`
    against lsst-sphgeom, in the same run: 10^6 targets x 10^4 detector footprints
    (rotated 4072 x 4000 pixel boxes at 0.2"/px over about 100 deg^2, RA 50-61.3,
    Dec -33 to -23, as the design notes measured), wall time, CPU time and peak
    memory of each method in its own process, pairs checked equal.

The sphgeom method is the notes' best use of it: each footprint's
``HtmPixelization(9).envelope`` (ranges of HTM9 trixels), each target's HTM9 index
(``index()``, a scalar call per target: sphgeom has no vectorised one), the
candidates joined by a sorted search, then the vectorised
``ConvexPolygon.contains(x, y, z)`` per footprint.

Run with::

    .venv/bin/python benchmarks/bench_epochs.py [--targets 1000000] [--footprints 10000]
                                                [--size 51] [--repeat 3] [--quick]
                                                [--part a|c|all] [--latency-ms 50]
                                                [--quota 35] [--quota-windows 2]
                                                [--deep-epochs 800]
    .venv/bin/python benchmarks/bench_epochs.py --part b [--targets 20000] [--visits 24]
                                                [--field DIR] [--repeat 1] [--quick]

Results go to ``benchmarks/results/epochs.json`` ((c)), ``epochs_a.json`` ((a),
which needs ``data/ecdfs`` with its epochs: ``harvester synth data/ecdfs --epochs``)
and ``epochs_bulk.json`` ((b), which builds its field first: not part of ``all``); a
summary is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _epochs_bulk  # this folder's module: the script's folder is on sys.path
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "epochs.json"
SCALE = 0.2 / 3600.0
WIDTH, HEIGHT = 4072, 4000


# ---- the workload (the same in every process: seeded) ----------------------------------


def footprints(n: int, seed: int) -> np.ndarray:
    """(n, 4, 2) corners of rotated detector boxes over RA 50-61.3, Dec -33 to -23."""
    rng = np.random.default_rng([seed, 1])
    ra_c = rng.uniform(50.0, 61.3, n)
    dec_c = rng.uniform(-33.0, -23.0, n)
    theta = rng.uniform(0.0, 2 * math.pi, n)
    out = np.empty((n, 4, 2))
    for k, (x, y) in enumerate(
        ((-0.5, -0.5), (WIDTH - 0.5, -0.5), (WIDTH - 0.5, HEIGHT - 0.5), (-0.5, HEIGHT - 0.5))
    ):
        u = (x - (WIDTH - 1) / 2) * SCALE
        v = (y - (HEIGHT - 1) / 2) * SCALE
        xi = np.radians(-(np.cos(theta) * u - np.sin(theta) * v))
        eta = np.radians(np.sin(theta) * u + np.cos(theta) * v)
        d0 = np.radians(dec_c)
        den = np.cos(d0) - eta * np.sin(d0)
        out[:, k, 1] = np.degrees(np.arctan2(np.sin(d0) + eta * np.cos(d0), np.hypot(xi, den)))
        out[:, k, 0] = (ra_c + np.degrees(np.arctan2(xi, den))) % 360.0
    return out


def targets(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 2])
    ra = rng.uniform(50.0, 61.3, n)
    s0, s1 = np.sin(np.radians(-33.0)), np.sin(np.radians(-23.0))
    dec = np.degrees(np.arcsin(rng.uniform(s0, s1, n)))
    return ra, dec


def _digest(target: np.ndarray, image: np.ndarray) -> str:
    """Order-free digest of the pair set."""
    key = np.sort(image.astype(np.int64) * (1 << 32) + target.astype(np.int64))
    return hashlib.sha256(key.tobytes()).hexdigest()[:16]


# ---- the methods (each run in a child process) -----------------------------------------


def run_harvester(args: argparse.Namespace) -> dict[str, Any]:
    from harvester.epochs import FootprintIndex

    corners = footprints(args.footprints, args.seed)
    ra, dec = targets(args.targets, args.seed)
    t0 = time.perf_counter()
    c0 = time.process_time()
    index = FootprintIndex(corners, np.full(len(corners), WIDTH), np.full(len(corners), HEIGHT))
    build = time.perf_counter() - t0
    pairs = index.query(ra, dec, size=args.size)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    grown = index.grown_corners(args.size // 2) if args.size else None
    if grown is not None:
        np.save(args.grown, grown)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "build_s": build,
        "pairs": len(pairs),
        "digest": _digest(pairs.target, pairs.image),
        "partial": int((pairs.coverage < 1).sum()),
        "targets_covered": int(np.unique(pairs.target).size),
    }


def run_sphgeom(args: argparse.Namespace) -> dict[str, Any]:
    import lsst.sphgeom as sg

    corners = footprints(args.footprints, args.seed)
    ra, dec = targets(args.targets, args.seed)
    if args.size:
        # The same grown polygons as the index (the child that ran it saved them).
        grown = np.load(args.grown)
    t0 = time.perf_counter()
    c0 = time.process_time()
    if args.size:
        polys = [sg.ConvexPolygon([sg.UnitVector3d(*map(float, v)) for v in g]) for g in grown]
    else:
        polys = [
            sg.ConvexPolygon([sg.UnitVector3d(sg.LonLat.fromDegrees(*map(float, c))) for c in p])
            for p in corners
        ]
    lon, lat = np.radians(ra), np.radians(dec)
    x, y, z = np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)
    pix = sg.HtmPixelization(9)
    index_t0 = time.perf_counter()
    htm = np.fromiter(
        (pix.index(sg.UnitVector3d(a, b, c)) for a, b, c in zip(x, y, z, strict=True)),
        dtype=np.int64,
        count=len(x),
    )
    index_s = time.perf_counter() - index_t0
    order = np.argsort(htm, kind="stable")
    htm_sorted = htm[order]
    found_t: list[np.ndarray] = []
    found_f: list[np.ndarray] = []
    for f, poly in enumerate(polys):
        cand = []
        for lo, hi in pix.envelope(poly):
            a = np.searchsorted(htm_sorted, lo, side="left")
            b = np.searchsorted(htm_sorted, hi, side="left")
            if b > a:
                cand.append(order[a:b])
        if not cand:
            continue
        c = np.concatenate(cand)
        inside = np.asarray(poly.contains(x[c], y[c], z[c]), dtype=bool)
        found_t.append(c[inside])
        found_f.append(np.full(int(inside.sum()), f))
    t = np.concatenate(found_t)
    f = np.concatenate(found_f)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "cpu_s": time.process_time() - c0,
        "htm_index_loop_s": index_s,
        "pairs": int(t.size),
        "digest": _digest(t, f),
        "targets_covered": int(np.unique(t).size),
    }


def _child(method: str, args: argparse.Namespace) -> dict[str, Any]:
    result = {"harvester": run_harvester, "sphgeom": run_sphgeom}[method](args)
    # Peak resident memory of this process, workload arrays included.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _spawn(method: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--targets",
        str(args.targets),
        "--footprints",
        str(args.footprints),
        "--size",
        str(args.size),
        "--seed",
        str(args.seed),
        "--grown",
        str(args.grown),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=1_000_000)
    parser.add_argument("--footprints", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=51, help="stamp side (0: bare polygons)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--quick", action="store_true", help="10^5 targets, 1 run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=("harvester", "sphgeom"), help=argparse.SUPPRESS)
    parser.add_argument("--grown", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("a", "b", "c", "all"), default="all")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="(a) injected latency")
    parser.add_argument("--quota", type=int, default=35, help="(a) cutouts per minute")
    parser.add_argument(
        "--quota-windows", type=float, default=2.0, help="(a) minutes of cutouts at the quota"
    )
    parser.add_argument("--deep-epochs", type=int, default=800, help="(a) a deep DP1 target")
    _epochs_bulk.add_arguments(parser)
    for hidden in ("--child-b", "--targets-file", "--out-dir", "--run-formats"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return 0
    if args.child_b:
        print(json.dumps(_epochs_bulk.child(args.child_b, args)))
        return 0
    if args.part == "b":
        if args.targets == 1_000_000:  # (c)'s default: (b) takes fewer
            args.targets = 2_000 if args.quick else 20_000
        if args.out == RESULTS:
            args.out = RESULTS.with_name("epochs_bulk.json")
        args.repeat = 1 if args.quick else min(args.repeat, 2)
        bulk = _epochs_bulk.main_b(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(bulk, indent=2, default=str) + "\n")
        print(f"results written to {args.out}")
        return 0
    if args.quick:
        args.targets, args.repeat = 100_000, 1
        args.quota_windows = min(args.quota_windows, 1.0)
    if args.part in ("a", "all"):
        from _epochs_dms import run_part_a, summary_a

        part_a = run_part_a(args)
        out_a = args.out.with_name("epochs_a.json")
        out_a.parent.mkdir(parents=True, exist_ok=True)
        out_a.write_text(json.dumps(part_a, indent=2) + "\n")
        print("\n".join(summary_a(part_a)))
        print(f"results written to {out_a}")
        if args.part == "a":
            return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.grown is None:
        args.grown = args.out.parent / ".epochs_grown.npy"
    load = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {"harvester": [], "sphgeom": []}
    for _ in range(args.repeat):
        # The index first: with --size > 0 it leaves its grown polygons for sphgeom.
        for method in ("harvester", "sphgeom"):
            runs[method].append(_spawn(method, args))
    args.grown.unlink(missing_ok=True)
    same = {r["digest"] for rs in runs.values() for r in rs}
    med = {m: statistics.median(r["wall_s"] for r in rs) for m, rs in runs.items()}
    result = {
        "benchmark": "epochs (c): footprint index vs lsst-sphgeom",
        "targets": args.targets,
        "footprints": args.footprints,
        "stamp_side": args.size,
        "repeat": args.repeat,
        "pairs_equal": len(same) == 1,
        "runs": runs,
        "median_wall_s": med,
        "sphgeom_over_harvester": med["sphgeom"] / med["harvester"],
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "environment": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    h, s = runs["harvester"], runs["sphgeom"]
    print(
        f"(c) {args.targets:,} targets x {args.footprints:,} footprints, stamps of "
        f"{args.size} px, {args.repeat} run(s) each, one process per run"
    )
    print(
        f"  harvester FootprintIndex: median {med['harvester']:.2f} s wall, "
        f"{statistics.median(r['cpu_s'] for r in h):.2f} s CPU, peak RSS "
        f"{max(r['peak_rss_mb'] for r in h):.0f} MB, {h[0]['pairs']:,} pairs "
        f"({h[0]['partial']:,} partial)"
    )
    print(
        f"  lsst-sphgeom HTM9 + contains: median {med['sphgeom']:.2f} s wall (of which the "
        f"scalar index() loop {statistics.median(r['htm_index_loop_s'] for r in s):.2f} s), "
        f"peak RSS {max(r['peak_rss_mb'] for r in s):.0f} MB, {s[0]['pairs']:,} pairs"
    )
    print(
        f"  sphgeom / harvester: {result['sphgeom_over_harvester']:.2f}x; pairs "
        f"{'equal' if result['pairs_equal'] else 'DIFFER'}; load average "
        f"{load[0]:.2f} -> {result['load_average_after'][0]:.2f}"
    )
    print("(b): --part b (it builds its field first).")
    print(f"results written to {args.out}")
    return 0 if result["pairs_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
