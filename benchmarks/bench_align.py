"""Benchmark: aligned epochs (``--align tract``) and the per-target epoch outputs.

Draws ``--epochs`` synthetic 51-px epoch stamps of one target (a Gaussian source,
each epoch through its own rotated TAN-SIP WCS, noise, image + mask + variance),
then times, in the same run:

* ``align_epochs`` (bilinear, the default; and ``exact`` on a quarter of the epochs),
  milliseconds per epoch, all planes;
* the floor: ``reproject_interp`` of the image plane alone per epoch, bilinear,
  ``roundtrip_coords=False``, WCS objects built beforehand (the least any
  reproject-based alignment pays);
* a naive peer: three ``reproject_interp`` calls per epoch with reproject's defaults
  (image and variance bilinear with ``roundtrip_coords=True``, the mask nearest
  neighbour), WCS built per epoch, as one would write it first;
* the outputs: ``write_target_pixel_files``, ``write_filmstrip``,
  ``write_light_curve`` for the whole target.

Run with::

    .venv/bin/python benchmarks/bench_align.py [--epochs 200] [--repeat 3] [--quick]

Results go to ``benchmarks/results/align.json``; a short summary is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, Sip

from harvester.epochs import TargetEpochs, align_epochs
from harvester.sinks.epoch_pictures import write_filmstrip, write_light_curve
from harvester.sinks.tpf import write_target_pixel_files
from harvester.skymap import SkyMap

RESULTS = Path(__file__).resolve().parent / "results" / "align.json"
TARGET = (53.318792, -27.844306)
SIDE = 51
#: Epochs of a deep ECDFS target in DP1 (time-domain design notes).
DEEP_EPOCHS = 800


def _stamps(n: int, seed: int) -> TargetEpochs:
    rng = np.random.default_rng(seed)
    image = np.empty((n, SIDE, SIDE), dtype=np.float32)
    cards: list[Any] = []
    x0s, y0s = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    for i in range(n):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.wcs.crval = [53.30 + rng.uniform(-0.05, 0.05), -27.83 + rng.uniform(-0.05, 0.05)]
        w.wcs.crpix = [2036.0, 2000.0]
        t = rng.uniform(0, 2 * math.pi)
        s = 0.2 / 3600
        w.wcs.cd = s * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])
        a, b = np.zeros((4, 4)), np.zeros((4, 4))
        a[2, 0], b[0, 2], a[3, 0] = 4e-8, -3e-8, 2e-11
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
        w.wcs.set()
        px, py = w.all_world2pix([TARGET[0]], [TARGET[1]], 0)
        x0, y0 = math.floor(px[0] + 0.5) - SIDE // 2, math.floor(py[0] + 0.5) - SIDE // 2
        h = w.to_header(relax=True)
        h["CRPIX1"] -= x0
        h["CRPIX2"] -= y0
        cards.append({k: h[k] for k in h if k not in ("COMMENT", "HISTORY", "")})
        x0s[i], y0s[i] = x0, y0
        cx, cy = px[0] - x0, py[0] - y0
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 2.0**2)) * 1000 / (8 * math.pi)
        image[i] = blob + rng.normal(0, 5, (SIDE, SIDE))
    bands = np.array(["g", "r", "i", "z"])[np.arange(n) % 4]
    return TargetEpochs(
        id="bench",
        ra=TARGET[0],
        dec=TARGET[1],
        image=image,
        mask=np.zeros(image.shape, dtype=np.int32),
        variance=np.full(image.shape, 25.0, dtype=np.float32),
        wcs=cards,
        x0=x0s,
        y0=y0s,
        dataset_type=np.array(["visit_image"] * n),
        visit=np.arange(n, dtype=np.int64),
        detector=np.zeros(n, dtype=np.int32),
        band=bands,
        mjd_tai=60600.0 + np.arange(n, dtype=np.float64),
        exptime=np.full(n, 30.0),
        seeing=np.full(n, 0.94),
        coverage=np.ones(n),
        status=np.array(["ok"] * n),
        dataset_id=np.array([str(i) for i in range(n)]),
    )


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _header_wcs(cards: Any) -> WCS:
    h = fits.Header()
    for k, v in cards.items():
        h[k] = v
    return WCS(h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="50 epochs, one repeat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n, repeat = (50, 1) if args.quick else (args.epochs, args.repeat)
    from reproject import reproject_interp

    epochs = _stamps(n, 1)
    skymap = SkyMap()
    load0 = os.getloadavg()
    align_epochs(epochs.select(np.arange(2)), skymap)  # imports, caches
    bilinear = _median_seconds(lambda: align_epochs(epochs, skymap), repeat) / n
    quarter = epochs.select(np.arange(max(1, n // 4)))
    exact = _median_seconds(lambda: align_epochs(quarter, skymap, method="exact"), repeat) / len(
        quarter
    )
    out_wcs = _header_wcs(align_epochs(epochs.select(np.arange(1)), skymap).epochs.wcs[0])
    in_wcs = [_header_wcs(c) for c in epochs.wcs]

    def floor() -> None:
        for i in range(n):
            reproject_interp(
                (epochs.image[i], in_wcs[i]),
                out_wcs,
                shape_out=(SIDE, SIDE),
                roundtrip_coords=False,
                return_footprint=False,
            )

    def naive() -> None:
        assert epochs.variance is not None and epochs.mask is not None
        for i in range(n):
            w = _header_wcs(epochs.wcs[i])
            for plane, order in (
                (epochs.image[i], "bilinear"),
                (epochs.variance[i], "bilinear"),
                (epochs.mask[i].astype(float), "nearest-neighbor"),
            ):
                reproject_interp((plane, w), out_wcs, shape_out=(SIDE, SIDE), order=order)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        floor_s = _median_seconds(floor, repeat) / n
        naive_s = _median_seconds(naive, repeat) / n
    aligned = align_epochs(epochs, skymap)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tpf_s = _median_seconds(lambda: write_target_pixel_files(aligned, folder), repeat)
        strip_s = _median_seconds(lambda: write_filmstrip(aligned.epochs, folder / "f.png"), repeat)
        lc_s = _median_seconds(lambda: write_light_curve(aligned.epochs, folder / "l.png"), repeat)
    load1 = os.getloadavg()
    result = {
        "epochs": n,
        "side": SIDE,
        "repeat": repeat,
        "ms_per_epoch": {
            "align_bilinear": bilinear * 1e3,
            "align_exact": exact * 1e3,
            "floor_reproject_image_only": floor_s * 1e3,
            "naive_three_calls": naive_s * 1e3,
        },
        "ratios": {
            "align_over_floor": bilinear / floor_s,
            "naive_over_align": naive_s / bilinear,
            "exact_over_bilinear": exact / bilinear,
        },
        "seconds_per_target": {
            "tpf_files": tpf_s,
            "filmstrip": strip_s,
            "light_curve": lc_s,
            f"align_{DEEP_EPOCHS}_epochs": bilinear * DEEP_EPOCHS,
        },
        "load_average": [load0[0], load1[0]],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    ms = result["ms_per_epoch"]
    print(f"aligned epochs, {n} stamps of {SIDE} px (image, mask, variance), median of {repeat}")
    print(f"  align_epochs bilinear   {ms['align_bilinear']:6.2f} ms/epoch")
    print(f"  align_epochs exact      {ms['align_exact']:6.2f} ms/epoch  ({exact / bilinear:.1f}x)")
    print(
        f"  floor: reproject image  {ms['floor_reproject_image_only']:6.2f} ms/epoch  "
        f"(align is {bilinear / floor_s:.2f}x the floor)"
    )
    print(
        f"  naive: 3 reproject calls {ms['naive_three_calls']:5.2f} ms/epoch  "
        f"({naive_s / bilinear:.2f}x align)"
    )
    print(
        f"  per target ({n} epochs, {len(set(epochs.band.tolist()))} bands): TPFs {tpf_s:.2f} s, "
        f"filmstrip {strip_s:.2f} s, light curve {lc_s:.2f} s; "
        f"a {DEEP_EPOCHS}-epoch target aligns in {bilinear * DEEP_EPOCHS:.1f} s"
    )
    print(f"  load average {load0[0]:.2f} -> {load1[0]:.2f}; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
