"""Benchmark: the Butler source against the tutorial's loop and the local source (issue 10 §6).

Everything on the demo repository ``data/ecdfs`` (8 patches of tract 5063, real
``lsst_cells_v1`` size) and the real Butler repository ``harvester synth`` builds
beside it (``data/ecdfs/butler``, a DirectButler on SQLite). One target list:
``random_targets(repo, "random:N")`` over the demo's patches, band ``r``, 50 x 50,
image + mask + variance (what the tutorial's ``handle.get(bbox)`` returns).

Sides, in one run:

* **loop** -- the tutorial's loop as a user without ``lsst.afw`` writes it, per
  target: ``butler.query_datasets("deep_coadd", where="band.name='r' AND
  patch.region OVERLAPS POINT(ra, dec)", bind=..., with_dimension_records=True,
  order_by=["patch.tract"])``, ``butler.getURI(refs[0])``, ``astropy.io.fits.open``
  of the file and ``.section`` reads of the box in IMAGE, MASK and VARIANCE (box
  from the file's own WCS, clipped to the file). On ``--loop`` targets.
* **butler** -- ``Harvester`` with ``run.source = "butler"`` on all N targets,
  writing the HDF5 stack and the ledger; the Butler calls it makes are timed
  (discovery: queries and URIs), to give the discovery cost per target.
* **local** -- the same with ``run.source = "local"`` (the repository index).

Then the same through a **RemoteButler**: ``harvester serve`` (in its own process,
public storage) holds the files, the real Butler server (``lsst-daf-butler[server]``
on uvicorn) serves a repository ingested with their URLs, and the client opens it
by the label ``dp1``; the loop reads pixels with astropy over fsspec (``.section``
on the HTTP URL), harvester with its range reads.

Targets checked (PASS/FAIL): butler >= 100x the loop; butler >= 50 % of local;
discovery < 50 us per target (amortised).

Run with::

    .venv/bin/python benchmarks/bench_butler.py            # ~2 minutes
    .venv/bin/python benchmarks/bench_butler.py --quick    # ~40 s

Results go to ``benchmarks/results/butler.json``. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_harvest import _environment, _prefault, _stats  # noqa: E402
from bench_remote import Server  # noqa: E402

ROOT = HERE.parent
RESULTS = HERE / "results" / "butler.json"
WORK = HERE / "work" / "butler"
REPO = ROOT / "data" / "ecdfs"
BAND = "r"
SIDE = 50
PLANES = ("image", "mask", "variance")
WHERE = "band.name='r' AND patch.region OVERLAPS POINT(ra, dec)"

# The targets of issue 10 §6.
MIN_OVER_LOOP = 100.0
MIN_OF_LOCAL = 0.50
MAX_DISCOVERY_US = 50.0


# ---------------------------------------------------------------------------
# The tutorial's loop


def _box(wcs: Any, ra: float, dec: float, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The 50 x 50 box around (ra, dec) in the file's own pixels, clipped to the file."""
    x, y = wcs.world_to_pixel_values(ra, dec)
    cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    x0, y0 = cx - SIDE // 2, cy - SIDE // 2
    return (
        slice(max(y0, 0), min(y0 + SIDE, shape[0])),
        slice(max(x0, 0), min(x0 + SIDE, shape[1])),
    )


def tutorial_loop(butler: Any, ra: np.ndarray, dec: np.ndarray, remote: bool) -> dict[str, Any]:
    """Per target: the spatial query, getURI, astropy .section reads of three planes."""
    from astropy.io import fits
    from astropy.wcs import WCS

    calls = {"query": 0.0, "uri": 0.0, "read": 0.0}
    kept = 0
    t0 = time.perf_counter()
    for r, d in zip(ra.tolist(), dec.tolist(), strict=True):
        t = time.perf_counter()
        refs = butler.query_datasets(
            "deep_coadd",
            where=WHERE,
            bind={"ra": r, "dec": d},
            with_dimension_records=True,
            order_by=["patch.tract"],
        )
        t1 = time.perf_counter()
        uri = butler.getURI(refs[0])
        t2 = time.perf_counter()
        opened = (
            fits.open(str(uri), use_fsspec=True, lazy_load_hdus=True)
            if remote
            else fits.open(uri.ospath, memmap=True, lazy_load_hdus=True)
        )
        with opened as hdul:
            header = hdul["IMAGE"].header
            shape = (header["NAXIS2"], header["NAXIS1"])
            ys, xs = _box(WCS(header), r, d, shape)
            for plane in PLANES:
                kept += hdul[plane.upper()].section[ys, xs].size
        t3 = time.perf_counter()
        calls["query"] += t1 - t
        calls["uri"] += t2 - t1
        calls["read"] += t3 - t2
    seconds = time.perf_counter() - t0
    n = len(ra)
    return {
        "n": n,
        "seconds": seconds,
        "per_s": n / seconds,
        "ms_per_target": {k: 1000 * v / n for k, v in calls.items()},
        "pixels_kept": kept,
    }


# ---------------------------------------------------------------------------
# harvester


@contextlib.contextmanager
def timed_discovery() -> Iterator[dict[str, float]]:
    """Seconds spent in the Butler's discovery calls (queries and URIs) while inside."""
    from harvester.butler._lookup import ButlerLookup

    spent = {"seconds": 0.0}
    real = ButlerLookup.find

    def find(self: Any, keys: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(self, keys)
        finally:
            spent["seconds"] += time.perf_counter() - t0

    ButlerLookup.find = find  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        ButlerLookup.find = real  # type: ignore[method-assign]


def harvest(source: str, targets: Any, butler: str, out: Path) -> dict[str, Any]:
    """One timed ``Harvester.run`` (stack and ledger written), from opening the source."""
    import anyio

    from harvester.config import ButlerConfig, load_config
    from harvester.engine import Harvester

    shutil.rmtree(out, ignore_errors=True)
    config = load_config(
        None,
        repo=str(REPO),
        output=str(out),
        bands=(BAND,),
        size=str(SIDE),
        planes=PLANES,
        formats=("stack",),
        source=source,
    ).replace(butler=ButlerConfig(repo=butler))

    async def main() -> dict[str, Any]:
        t0 = time.perf_counter()
        async with Harvester(config) as h:
            report = await h.run(targets)
            lines = getattr(h.repo, "lookup_lines", list)()
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "counts": report.counts, "butler": lines}

    _prefault(len(targets) * SIDE * SIDE * 12 + 2**28)
    with timed_discovery() as spent:
        result = anyio.run(main)
    result["discovery_s"] = spent["seconds"]
    return result


def measure(source: str, targets: Any, butler: str, repeat: int) -> dict[str, Any]:
    runs = [harvest(source, targets, butler, WORK / f"out-{source}") for _ in range(repeat)]
    times = [r["seconds"] for r in runs]
    out = _stats(times, len(targets))
    out["counts"] = runs[0]["counts"]
    out["butler_lines"] = runs[0]["butler"]
    disc = statistics.median(r["discovery_s"] for r in runs)
    out["discovery_s"] = disc
    out["discovery_us_per_target"] = 1e6 * disc / len(targets)
    return out


def check_pixels(targets: Any, out: Path, butler: Any) -> int:
    """The loop's pixels equal the harvest's for targets whose box lies in one file."""
    import h5py
    from astropy.io import fits
    from astropy.wcs import WCS

    with h5py.File(out / "stack.h5") as f:
        row = {v.decode(): i for i, v in enumerate(f["table"]["id"])}
        image = f["image"]
        same = 0
        for k in range(min(50, len(targets))):
            r, d = float(targets.ra[k]), float(targets.dec[k])
            refs = butler.query_datasets("deep_coadd", where=WHERE, bind={"ra": r, "dec": d})
            for ref in refs:
                with fits.open(butler.getURI(ref).ospath, memmap=True) as hdul:
                    h = hdul["IMAGE"].header
                    ys, xs = _box(WCS(h), r, d, (h["NAXIS2"], h["NAXIS1"]))
                    if ys.stop - ys.start != SIDE or xs.stop - xs.start != SIDE:
                        continue
                    mine = image[row[str(targets.id[k])], 0]
                    if not np.array_equal(hdul["IMAGE"].section[ys, xs], mine, equal_nan=True):
                        raise AssertionError(f"target {targets.id[k]}: pixels differ")
                    same += 1
                    break
    return same


# ---------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="targets of the harvests")
    parser.add_argument("--loop", type=int, default=300, help="targets of the local loop")
    parser.add_argument("--remote-loop", type=int, default=100, help="targets, remote loop")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="n 10000, loops 100/40, repeat 1")
    parser.add_argument("--no-remote", action="store_true", help="skip the RemoteButler part")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.loop, args.remote_loop, args.repeat = 10_000, 100, 40, 1

    from lsst.daf.butler import Butler

    from harvester.butler._build import COLLECTION
    from harvester.repo import load_repository
    from harvester.targets import random_targets

    repo = load_repository(REPO)
    local_butler = REPO / "butler"
    if not (local_butler / "butler.yaml").exists():
        raise SystemExit(f"no Butler at {local_butler}: harvester synth --butler-only {REPO}")
    targets = random_targets(repo, f"random:{args.n}", args.seed)
    WORK.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "environment": _environment(),
        "setup": {"n": args.n, "band": BAND, "side": SIDE, "planes": list(PLANES)},
    }

    print(f"local DirectButler ({local_butler}), {args.n:,} targets, {BAND}, {SIDE} px")
    butler = Butler.from_config(str(local_butler), collections=COLLECTION)
    loop = tutorial_loop(butler, targets.ra[: args.loop], targets.dec[: args.loop], remote=False)
    print(f"  loop    {loop['per_s']:9.1f}/s  ms per target {loop['ms_per_target']}")
    b = measure("butler", targets, str(local_butler), args.repeat)
    print(f"  butler  {b['per_s_median']:9.1f}/s  discovery {b['discovery_us_per_target']:.1f} us")
    loc = measure("local", targets, "", args.repeat)
    print(f"  local   {loc['per_s_median']:9.1f}/s")
    results["local_checked_pixels"] = check_pixels(targets, WORK / "out-butler", butler)
    butler.close()
    results["direct"] = {"loop": loop, "butler": b, "local": loc}

    if not args.no_remote:
        results["remote"] = remote_part(args, repo, targets)

    results["checks"] = checks(results)
    for c in results["checks"]:
        verdict = "PASS" if c["pass"] else "FAIL"
        print(f"{verdict}  {c['what']}: {c['value']:.3g} (target {c['target']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {args.out}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


def remote_part(args: argparse.Namespace, repo: Any, targets: Any) -> dict[str, Any]:
    """The loop and the Butler source through a RemoteButler (real server, loopback)."""
    from lsst.daf.butler import Butler

    from harvester.butler.testing import build_http_butler, butler_server, label_environment

    out: dict[str, Any] = {}
    with (
        Server(multi_range=True, public_store=True) as storage,
        tempfile.TemporaryDirectory(dir=WORK) as tmp,
    ):
        built = build_http_butler(repo, Path(tmp) / "butler_http", storage.url)
        t0 = time.perf_counter()
        with butler_server({"dp1": built.root}, log=Path(tmp) / "server.log") as server:
            out["server_start_s"] = time.perf_counter() - t0
            os.environ.update(label_environment({"dp1": server.repo_url("dp1")}))
            print(f"RemoteButler ({server.url}), storage {storage.url}")
            butler = Butler("dp1", collections="LSSTComCam/DP1")
            n = args.remote_loop
            loop = tutorial_loop(butler, targets.ra[:n], targets.dec[:n], remote=True)
            butler.close()
            print(f"  loop    {loop['per_s']:9.1f}/s  ms per target {loop['ms_per_target']}")
            b = measure("butler", targets, "dp1", args.repeat)
            print(
                f"  butler  {b['per_s_median']:9.1f}/s  "
                f"discovery {b['discovery_us_per_target']:.1f} us"
            )
            out |= {"loop": loop, "butler": b}
    return out


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    d = results["direct"]
    rows = [
        ("direct: butler / loop", d["butler"]["per_s_median"] / d["loop"]["per_s"], MIN_OVER_LOOP),
        (
            "direct: butler / local",
            d["butler"]["per_s_median"] / d["local"]["per_s_median"],
            MIN_OF_LOCAL,
        ),
    ]
    out = [{"what": w, "value": v, "target": f">= {t}", "pass": v >= t} for w, v, t in rows]
    disc = d["butler"]["discovery_us_per_target"]
    out.append(
        {
            "what": "direct: discovery us/target",
            "value": disc,
            "target": f"< {MAX_DISCOVERY_US}",
            "pass": disc < MAX_DISCOVERY_US,
        }
    )
    if "remote" in results:
        r = results["remote"]
        ratio = r["butler"]["per_s_median"] / r["loop"]["per_s"]
        out.append(
            {
                "what": "remote: butler / loop",
                "value": ratio,
                "target": f">= {MIN_OVER_LOOP}",
                "pass": ratio >= MIN_OVER_LOOP,
            }
        )
        disc = r["butler"]["discovery_us_per_target"]
        out.append(
            {
                "what": "remote: discovery us/target",
                "value": disc,
                "target": f"< {MAX_DISCOVERY_US}",
                "pass": disc < MAX_DISCOVERY_US,
            }
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
