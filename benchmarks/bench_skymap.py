"""Benchmark: resolve 10^6 all-sky positions to tract/patch/pixel with ``SkyMap.locate``.

For comparison it also times astropy's ``WCS.all_world2pix`` on the same number of
positions inside one tract (a peer: one tract WCS, no tract/patch lookup at all).

Run with::

    .venv/bin/python benchmarks/bench_skymap.py [--n 1000000] [--repeat 5]

Results go to ``benchmarks/results/skymap.json``; a short summary is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import astropy
import numpy as np

from harvester.skymap import SkyMap

TARGET_SECONDS = 2.0
RESULTS = Path(__file__).resolve().parent / "results" / "skymap.json"
PEER_TRACT = 5063  # the DP1 ECDFS tract


def _all_sky(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    return ra, dec


def _in_tract(skymap: SkyMap, tract: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random positions within ~0.7 deg of a tract centre (inside its box)."""
    rng = np.random.default_rng(seed)
    ra0, dec0 = skymap.tract_center(tract)
    dec = dec0 + rng.uniform(-0.7, 0.7, n)
    ra = ra0 + rng.uniform(-0.7, 0.7, n) / np.cos(np.radians(dec0))
    return ra, dec


def _time(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="positions per run")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    skymap = SkyMap()
    # Warm the cached ring layout and tract centres so they are not timed.
    skymap.locate([0.0], [0.0])

    ra, dec = _all_sky(args.n, args.seed)
    placement = skymap.locate(ra, dec)  # warm-up run, also a sanity check
    assert len(placement) == args.n
    locate_times = _time(lambda: skymap.locate(ra, dec), args.repeat)

    wcs = skymap.tract_wcs(PEER_TRACT)
    pra, pdec = _in_tract(skymap, PEER_TRACT, args.n, args.seed + 1)
    world = np.stack([pra, pdec], axis=1)
    wcs.all_world2pix(world[:1000], 0)  # warm-up
    peer_times = _time(lambda: wcs.all_world2pix(world, 0), args.repeat)

    locate_median = statistics.median(locate_times)
    locate_best = min(locate_times)
    peer_median = statistics.median(peer_times)
    peer_best = min(peer_times)
    result = {
        "benchmark": "skymap.locate",
        "n_positions": args.n,
        "repeat": args.repeat,
        "seed": args.seed,
        "target_seconds": TARGET_SECONDS,
        "locate": {
            "times_s": locate_times,
            "median_s": locate_median,
            "best_s": locate_best,
            "positions_per_s_median": args.n / locate_median,
            "median_over_target": locate_median / TARGET_SECONDS,
            "best_over_target": locate_best / TARGET_SECONDS,
            "n_tracts_hit": int(np.unique(placement.tract).size),
        },
        "peer_astropy_all_world2pix_one_tract": {
            "tract": PEER_TRACT,
            "times_s": peer_times,
            "median_s": peer_median,
            "best_s": peer_best,
            "positions_per_s_median": args.n / peer_median,
        },
        "locate_over_peer_median": locate_median / peer_median,
        "environment": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "astropy": astropy.__version__,
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"SkyMap.locate, {args.n:,} all-sky positions, {args.repeat} runs")
    print(
        f"  median {locate_median:.3f} s, best {locate_best:.3f} s "
        f"({args.n / locate_median / 1e6:.2f} M positions/s)"
    )
    print(
        f"  vs {TARGET_SECONDS:.1f} s target: median at {locate_median / TARGET_SECONDS:.1%}, "
        f"best at {locate_best / TARGET_SECONDS:.1%} "
        f"({'within' if locate_median <= TARGET_SECONDS else 'OVER'} target)"
    )
    print(f"astropy WCS.all_world2pix, {args.n:,} positions in tract {PEER_TRACT}")
    print(f"  median {peer_median:.3f} s, best {peer_best:.3f} s")
    print(f"  locate / astropy (median): {locate_median / peer_median:.2f}x")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
