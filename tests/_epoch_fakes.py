"""Epoch stamps drawn in the tests: a known source at a known sky position, seen
through each epoch's own rotated TAN-SIP WCS, cut as the engine cuts native stamps
(the box of ``side`` pixels centred on ``floor(x + 0.5)`` of the target's position).

Only astropy and numpy: the truths (where the source is, how much flux it has) are
set here and never computed by the code under test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.wcs import WCS, Sip

from harvester.epochs import TargetEpochs
from harvester.repo import Repository

FloatArray = npt.NDArray[np.float64]
#: An ECDFS position (the DP1 tutorials' point); tract 5063 of lsst_cells_v1.
TARGET = (53.318792, -27.844306)


def detector_wcs(
    rot_deg: float,
    scale_arcsec: float = 0.2,
    *,
    crval: tuple[float, float] = (53.30, -27.83),
    crpix: tuple[float, float] = (2000.0, 2100.0),
    sip: bool = True,
) -> WCS:
    """A detector's TAN(-SIP) WCS, rotated by ``rot_deg``; ``crval`` a little off the
    target so that the SIP terms are not zero there (up to ~0.5 px at the corners)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = list(crpix)
    s = scale_arcsec / 3600.0
    t = math.radians(rot_deg)
    w.wcs.cd = s * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])
    w.wcs.radesys = "ICRS"
    if sip:
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], b[1, 1] = 4e-8, -3e-8, 5e-8
        a[3, 0], b[0, 3] = 2e-11, -2e-11
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def stamp_cards(det: WCS, x0: int, y0: int) -> dict[str, Any]:
    """The detector WCS shifted to a stamp whose first pixel is detector (x0, y0)."""
    header = det.to_header(relax=True)
    header["CRPIX1"] -= x0
    header["CRPIX2"] -= y0
    return {k: header[k] for k in header if k not in ("COMMENT", "HISTORY", "")}


def gaussian(x: FloatArray, y: FloatArray, cx: float, cy: float, sigma: float) -> FloatArray:
    """A unit-flux circular Gaussian sampled at pixel centres."""
    out: FloatArray = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)) / (
        2 * math.pi * sigma**2
    )
    return out


@dataclass
class Epoch:
    """What one fake epoch is made of."""

    rot_deg: float
    flux: float
    sigma_px: float = 2.0
    scale_arcsec: float = 0.2
    sky_sigma: float = 0.0
    band: str = "g"
    mjd: float = 60650.0
    crval: tuple[float, float] = (53.30, -27.83)


def draw_epochs(
    epochs: Sequence[Epoch],
    side: int,
    *,
    source: tuple[float, float] = TARGET,
    target: tuple[float, float] = TARGET,
    seed: int = 1,
    target_id: str = "fake",
) -> TargetEpochs:
    """A :class:`TargetEpochs` (in time order) of Gaussian sources at ``source`` (sky),
    stamps centred on ``target``, each through its own detector WCS; sky noise of
    ``sky_sigma`` nJy per pixel (the variance plane says so; without noise it is 1)."""
    rng = np.random.default_rng(seed)
    epochs = sorted(epochs, key=lambda ep: ep.mjd)
    n = len(epochs)
    image = np.zeros((n, side, side), dtype=np.float32)
    variance = np.zeros_like(image)
    wcs: list[Mapping[str, Any]] = []
    x0s, y0s = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    for i, ep in enumerate(epochs):
        det = detector_wcs(ep.rot_deg, ep.scale_arcsec, crval=ep.crval)
        tx, ty = det.all_world2pix([target[0]], [target[1]], 0)
        x0 = math.floor(float(tx[0]) + 0.5) - side // 2
        y0 = math.floor(float(ty[0]) + 0.5) - side // 2
        sx, sy = det.all_world2pix([source[0]], [source[1]], 0)
        img = ep.flux * gaussian(xx, yy, float(sx[0]) - x0, float(sy[0]) - y0, ep.sigma_px)
        var = np.full((side, side), max(ep.sky_sigma, 1.0) ** 2)
        if ep.sky_sigma > 0:
            img = img + rng.normal(0.0, ep.sky_sigma, img.shape)
        image[i], variance[i] = img, var
        wcs.append(stamp_cards(det, x0, y0))
        x0s[i], y0s[i] = x0, y0
    return TargetEpochs(
        id=target_id,
        ra=target[0],
        dec=target[1],
        image=image,
        mask=np.zeros(image.shape, dtype=np.int32),
        variance=variance,
        wcs=wcs,
        x0=x0s,
        y0=y0s,
        dataset_type=np.array(["visit_image"] * n),
        visit=np.arange(n, dtype=np.int64) + 2024120100001,
        detector=np.full(n, 4, dtype=np.int32),
        band=np.array([ep.band for ep in epochs]),
        mjd_tai=np.array([ep.mjd for ep in epochs], dtype=np.float64),
        exptime=np.full(n, 30.0),
        seeing=np.array([ep.sigma_px * 2.3548 * ep.scale_arcsec for ep in epochs]),
        coverage=np.ones(n),
        status=np.array(["ok"] * n),
        dataset_id=np.array([f"id-{i}" for i in range(n)]),
    )


def epochs_from_files(
    repo: Repository,
    targets: Sequence[tuple[str, float, float]],
    side: int,
    dataset_types: Sequence[str] = ("visit_image",),
) -> list[TargetEpochs]:
    """Each target's native stamps, cut here from a repository's epoch files (each
    file opened once) as the README's data model says the engine cuts them: numpy
    slicing of the box of ``side`` centred on ``floor(x + 0.5)`` of the target's
    position through the header WCS (astropy), NaN and NO_DATA off the detector, the
    header WCS with CRPIX shifted by the box's origin."""
    from astropy.io import fits

    from harvester.masks import NO_DATA

    rows: list[list[dict[str, Any]]] = [[] for _ in targets]
    ra = np.array([t[1] for t in targets])
    dec = np.array([t[2] for t in targets])
    for ref in repo.epochs:
        if ref.dataset_type not in dataset_types:
            continue
        with fits.open(repo.root / ref.path) as hdul:
            det = WCS(hdul["IMAGE"].header)
            planes = [hdul[name].data for name in ("IMAGE", "VARIANCE", "MASK")]
        h, w = planes[0].shape
        px, py = det.all_world2pix(ra, dec, 0)
        for k in range(len(targets)):
            x0 = math.floor(float(px[k]) + 0.5) - side // 2
            y0 = math.floor(float(py[k]) + 0.5) - side // 2
            xa, xb, ya, yb = max(x0, 0), min(x0 + side, w), max(y0, 0), min(y0 + side, h)
            if xa >= xb or ya >= yb:
                continue
            cut: list[npt.NDArray[Any]] = [
                np.full((side, side), fill, dtype=dt) for fill, dt in _FILLS
            ]
            inner = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
            for out, plane in zip(cut, planes, strict=True):
                out[inner] = plane[ya:yb, xa:xb]
            cut[2] = np.where(np.isfinite(cut[0]), cut[2], cut[2] | NO_DATA).astype(np.int32)
            rows[k].append(
                {"ref": ref, "cut": cut, "wcs": stamp_cards(det, x0, y0), "x0": x0, "y0": y0}
            )
    return [_target_epochs(t, r, side) for t, r in zip(targets, rows, strict=True)]


#: Fill values and dtypes of IMAGE, VARIANCE and MASK off the detector.
_FILLS = ((np.nan, np.float32), (np.nan, np.float32), (0, np.int32))


def _target_epochs(
    target: tuple[str, float, float], rows: list[dict[str, Any]], side: int
) -> TargetEpochs:
    rows = sorted(rows, key=lambda r: (r["ref"].mjd_tai, r["ref"].dataset_type))
    refs = [r["ref"] for r in rows]
    image, variance, mask = (
        np.array([r["cut"][p] for r in rows]).reshape(-1, side, side) for p in range(3)
    )
    coverage = np.isfinite(image).reshape(len(rows), -1).mean(axis=1)
    return TargetEpochs(
        id=target[0],
        ra=target[1],
        dec=target[2],
        image=image,
        mask=mask,
        variance=variance,
        wcs=[r["wcs"] for r in rows],
        x0=np.array([r["x0"] for r in rows], dtype=np.int64),
        y0=np.array([r["y0"] for r in rows], dtype=np.int64),
        dataset_type=np.array([f.dataset_type for f in refs], dtype=np.str_),
        visit=np.array([f.visit for f in refs], dtype=np.int64),
        detector=np.array([f.detector for f in refs], dtype=np.int32),
        band=np.array([f.band for f in refs], dtype=np.str_),
        mjd_tai=np.array([f.mjd_tai for f in refs], dtype=np.float64),
        exptime=np.array([f.exptime for f in refs], dtype=np.float64),
        seeing=np.array([f.seeing for f in refs], dtype=np.float64),
        coverage=coverage.astype(np.float64),
        status=np.array(["ok" if c == 1 else "partial" for c in coverage], dtype=np.str_),
        dataset_id=np.array([f.id for f in refs], dtype=np.str_),
    )
