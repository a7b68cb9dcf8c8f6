"""Benchmark: files per second written by ``FitsSink`` (single-band 50x50 cutouts).

For comparison it also times astropy's ``HDUList.writeto`` writing the same layout
(primary + IMAGE/MASK/VARIANCE, same headers) to the same kind of folder.

Run with::

    .venv/bin/python benchmarks/bench_fits_sink.py [--n 2000] [--size 50] [--repeat 3]

Prints files/second (best and median of ``--repeat`` runs, one thread) and the rate
per CPU second of the process (user + system), which is what "per core" means and is
less sensitive to other load on the disk. The rate is bound by the kernel's file
create/write/rename cost, so it varies with the file system and its load; use
``--dir /dev/shm`` to take the disk out. Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from harvester.cutout import CutoutBatch
from harvester.masks import mask_header_cards
from harvester.sinks.fits import FitsSink, safe_filename


def make_batch(n: int, size: int, seed: int = 0) -> CutoutBatch:
    rng = np.random.default_rng(seed)
    shape = (n, 1, size, size)
    image = rng.normal(0.0, 30.0, shape).astype(np.float32)
    image[rng.random(shape) < 0.05] = np.nan
    return CutoutBatch(
        index=np.arange(n, dtype=np.int64),
        ids=np.array([f"agn_{i:06d}" for i in range(n)]),
        ra=53.0875576037 + rng.uniform(-0.5, 0.5, n),
        dec=-27.5206611570 + rng.uniform(-0.5, 0.5, n),
        tract=np.full(n, 5063, dtype=np.int64),
        patch=rng.integers(0, 100, n).astype(np.int64),
        x0=rng.integers(0, 29000, n).astype(np.int64),
        y0=rng.integers(0, 29000, n).astype(np.int64),
        bands=("g",),
        image=image,
        variance=rng.uniform(1.0, 900.0, shape).astype(np.float32),
        mask=rng.integers(0, 1 << 13, shape).astype(np.int32),
        coverage=np.ones(n),
        crval=np.tile([53.0875576037, -27.5206611570], (n, 1)),
        crpix0=14999.0,
        scale_deg=0.2 / 3600,
        dataset_ids=np.array([["dsid-g"]] * n),
        files=np.array([["deep_coadd/5063/10/g/deep_coadd_5063_10_g_DP1.fits"]] * n),
    )


def run_sink(batch: CutoutBatch, root: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, size of one file in bytes)."""
    sink = FitsSink(root, run_info={"run_id": "bench"})
    sink.open()
    t0, c0 = time.perf_counter(), time.process_time()
    paths = sink.write(batch)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    sink.close()
    return dt, dc, (root / paths[0]).stat().st_size


def run_astropy(batch: CutoutBatch, root: Path, n: int) -> float:
    folder = root / "fits"
    folder.mkdir(parents=True, exist_ok=True)
    mask_cards = mask_header_cards()
    t0 = time.perf_counter()
    for c in list(batch)[:n]:
        primary = fits.PrimaryHDU()
        h = primary.header
        h["OBJECT"] = c.id
        h["RA"], h["DEC"], h["TRACT"], h["PATCH"] = c.ra, c.dec, c.tract, c.patch
        h["HIERARCH SOURCE G ID"] = str(batch.dataset_ids[c.i, 0])
        h["HIERARCH SOURCE G FILE"] = str(batch.files[c.i, 0])
        hdus = [primary]
        wcs = c.wcs_cards()
        planes = {"IMAGE": batch.image, "MASK": batch.mask, "VARIANCE": batch.variance}
        for name, cube in planes.items():
            assert cube is not None
            data = cube[c.i, 0]
            header = fits.Header(wcs)
            if name == "MASK":
                header.extend(mask_cards)
            hdus.append(fits.ImageHDU(data, header=header, name=name))
        tmp = folder / f".{c.id}.tmp"
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
        os.replace(tmp, folder / f"{safe_filename(c.id)}.fits")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--astropy-n", type=int, default=300, help="files for the astropy peer")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: tmp)")
    args = parser.parse_args()

    batch = make_batch(args.n, args.size)
    n_peer = min(args.astropy_n, args.n)
    sink_times, sink_cpu, peer_times, nbytes = [], [], [], 0
    for _ in range(args.repeat):
        root = Path(tempfile.mkdtemp(prefix="bench_fits_", dir=args.dir))
        try:
            dt, dc, nbytes = run_sink(batch, root / "sink")
            sink_times.append(dt)
            sink_cpu.append(dc)
            peer_times.append(run_astropy(batch, root / "peer", n_peer))
        finally:
            shutil.rmtree(root)
    sink_rate = args.n / min(sink_times)
    peer_rate = n_peer / min(peer_times)
    print(f"{args.n} single-band {args.size}x{args.size} cutouts, {nbytes} bytes per file")
    print(
        f"FitsSink.write          : {sink_rate:8.0f} files/s  (best of {args.repeat}; "
        f"median {args.n / statistics.median(sink_times):.0f}; "
        f"CPU-time rate {args.n / min(sink_cpu):.0f})"
    )
    print(f"astropy HDUList.writeto : {peer_rate:8.0f} files/s  ({n_peer} files)")
    print(f"speed-up                : {sink_rate / peer_rate:8.1f}x")


if __name__ == "__main__":
    main()
