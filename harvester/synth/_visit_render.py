"""The synthetic sky on one detector of one visit: the coadds' sources, the visit's PSF.

The static sky is the one the coadds show (:mod:`._model`): stars and galaxies drawn
per block of each tract's pixel grid, and the AGN with their hosts. A source belongs
to the tract whose ``findTract`` region holds it (its *home* tract), so where tracts
overlap each source is drawn once. The detectors a visit needs are seldom more than
a degree from the field, so the tracts their pixels fall in are found on a grid of
24 x 24 points over the detector (a home region narrower than that grid's step,
about 40 arcsec, would be missed: a sliver at most).

Each source is placed at its sky position through the detector's TAN-SIP WCS
(:class:`._camera.DetectorWcs`) and drawn at pixel centres:

* point sources (stars, AGN nuclei) as the visit's PSF, a Moffat profile with
  ``beta = 3`` and FWHM the visit's seeing (``PSF_FWHM`` in the header), circular in
  detector pixels, normalised to the source's flux over the whole plane;
* galaxies as in the coadds (a Sersic profile whose effective radius is broadened
  to ``hypot(r_eff, 0.6 FWHM)``, normalised to the flux over its stamp), with the
  FWHM the visit's and the shape carried from its home tract's pixel frame into the
  detector's by the local Jacobian of the two WCSs, so a galaxy keeps its
  orientation on the sky whatever the visit's rotation.

Stamp sizes follow the coadd renderer's rule. Dependency rule: numpy,
:mod:`harvester.skymap`, :mod:`._model`, :mod:`._camera`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from ..skymap import SkyMap, SkyMapConfig
from ._camera import DetectorWcs
from ._model import Band, Catalog, agn_catalog, block_catalog, stamp_half

__all__ = ["DetectorSources", "detector_sources", "moffat", "render_sources", "skymap_of"]

FloatArray = npt.NDArray[np.float64]
BETA = 3.0
_GRID = 24
_PAD = 80  # the largest stamp half-size: sources this far off the detector still reach it


def moffat(r2: FloatArray, fwhm_px: float) -> FloatArray:
    """The PSF (per pixel, integral 1) at squared radii ``r2`` (pixels^2)."""
    alpha = fwhm_px / (2 * math.sqrt(2 ** (1 / BETA) - 1))
    out: FloatArray = (BETA - 1) / (math.pi * alpha**2) * (1 + r2 / alpha**2) ** -BETA
    return out


@dataclass
class DetectorSources:
    """Sources of one detector in its pixels: the catalogue rows, their detector
    positions and the Jacobian d(home tract pixel) / d(detector pixel) of each."""

    cat: Catalog
    x: FloatArray
    y: FloatArray
    jac: FloatArray  # (n, 2, 2)
    ids: tuple[str, ...] = ()  # AGN ids of the rows (nuclei only)


@lru_cache(maxsize=8)
def skymap_of(config: SkyMapConfig) -> SkyMap:
    """One :class:`SkyMap` per geometry (building the ring tables is not free)."""
    return SkyMap(config)


@lru_cache(maxsize=128)
def _block(
    seed: int,
    config: SkyMapConfig,
    tract: int,
    bx: int,
    by: int,
    agn: tuple[tuple[float, float], ...],
) -> Catalog:
    """A block's stars and galaxies, with the same AGN exclusion zones as the coadds."""
    skymap = skymap_of(config)
    avoid = np.zeros((0, 2))
    if agn:
        ra = np.array([a[0] for a in agn])
        dec = np.array([a[1] for a in agn])
        x, y = skymap.sky_to_pixel(np.full(len(agn), tract), ra, dec)
        near = np.isfinite(x) & np.isfinite(y)
        avoid = np.stack([x[near], y[near]], axis=1)
    return block_catalog(seed, tract, bx, by, config.patch_inner, config.pixel_scale_arcsec, avoid)


def _jacobian(
    skymap: SkyMap, tract: npt.NDArray[np.int64], wcs: DetectorWcs, x: FloatArray, y: FloatArray
) -> FloatArray:
    """d(tract pixel) / d(detector pixel) at each (x, y), by central differences."""
    cols = []
    for dx, dy in ((0.5, 0.0), (0.0, 0.5)):
        ra1, dec1 = wcs.pixel_to_sky(x + dx, y + dy)
        ra0, dec0 = wcs.pixel_to_sky(x - dx, y - dy)
        x1, y1 = skymap.sky_to_pixel(tract, ra1, dec1)
        x0, y0 = skymap.sky_to_pixel(tract, ra0, dec0)
        cols.append(np.stack([x1 - x0, y1 - y0], axis=1))
    return np.stack(cols, axis=2)


def detector_sources(
    skymap: SkyMap,
    seed: int,
    agn_ids: tuple[str, ...],
    agn: tuple[tuple[float, float], ...],
    wcs: DetectorWcs,
    width: int,
    height: int,
) -> tuple[DetectorSources, DetectorSources]:
    """(static sources, AGN nuclei) that reach the detector's pixels.

    Static sources are the home-tract stars and galaxies plus the AGN hosts; the
    AGN nuclei come separately because their flux changes with time (their ``cat``
    rows hold the reference flux).
    """
    gx, gy = np.meshgrid(
        np.linspace(-_PAD, width + _PAD, _GRID), np.linspace(-_PAD, height + _PAD, _GRID)
    )
    gra, gdec = wcs.pixel_to_sky(gx.ravel(), gy.ravel())
    block = skymap.config.patch_inner
    parts: list[DetectorSources] = []
    for tract in np.unique(skymap.find_tract(gra, gdec)).tolist():
        tx, ty = skymap.sky_to_pixel(np.full(gra.size, tract), gra, gdec)
        blocks = [
            _block(seed, skymap.config, tract, bx, by, agn)
            for by in range(int(np.floor(ty.min() / block)), int(np.floor(ty.max() / block)) + 1)
            for bx in range(int(np.floor(tx.min() / block)), int(np.floor(tx.max() / block)) + 1)
        ]
        cat = Catalog.concat(blocks)
        parts.append(_place(skymap, tract, cat, wcs, width, height, home_only=True))
    nuclei = hosts = None
    if agn_ids:
        ra = np.array([a[0] for a in agn])
        dec = np.array([a[1] for a in agn])
        home = skymap.find_tract(ra, dec)
        pieces_n, pieces_h = [], []
        for tract in np.unique(home).tolist():
            sel = home == tract
            x, y = skymap.sky_to_pixel(np.full(int(sel.sum()), tract), ra[sel], dec[sel])
            both = agn_catalog(np.asarray(agn_ids)[sel], x, y, seed)
            n = int(sel.sum())
            pieces_n.append(
                _place(
                    skymap,
                    tract,
                    both.subset(np.arange(2 * n) < n),
                    wcs,
                    width,
                    height,
                    ids=tuple(np.asarray(agn_ids)[sel].tolist()),
                )
            )
            pieces_h.append(
                _place(skymap, tract, both.subset(np.arange(2 * n) >= n), wcs, width, height)
            )
        nuclei = _concat(pieces_n)
        hosts = _concat(pieces_h)
    if hosts is not None:
        parts.append(hosts)
    static = _concat(parts)
    if nuclei is None:
        nuclei = _concat([])
    return static, nuclei


def _place(
    skymap: SkyMap,
    tract: int,
    cat: Catalog,
    wcs: DetectorWcs,
    width: int,
    height: int,
    home_only: bool = False,
    ids: tuple[str, ...] = (),
) -> DetectorSources:
    """The catalogue rows (tract pixels) that land within reach of the detector."""
    ra, dec = skymap.pixel_to_sky(np.full(len(cat), tract), cat.x, cat.y)
    x, y = wcs.sky_to_pixel(ra, dec)
    keep = (x > -_PAD) & (x < width + _PAD) & (y > -_PAD) & (y < height + _PAD)
    if home_only and keep.any():
        keep[keep] &= skymap.find_tract(ra[keep], dec[keep]) == tract
    sub = cat.subset(keep)
    xs, ys = x[keep], y[keep]
    jac = _jacobian(skymap, np.full(xs.size, tract, dtype=np.int64), wcs, xs, ys)
    kept = tuple(i for i, k in zip(ids, keep.tolist(), strict=True) if k) if ids else ()
    return DetectorSources(sub, xs, ys, jac, kept)


def _concat(parts: list[DetectorSources]) -> DetectorSources:
    if not parts:
        z = np.zeros(0)
        empty = Catalog(z, z, z, np.zeros(0, np.int8), np.zeros((0, 6)), z, z, z, z)
        return DetectorSources(empty, z, z, np.zeros((0, 2, 2)))
    return DetectorSources(
        Catalog.concat([p.cat for p in parts]),
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.jac for p in parts]),
        tuple(i for p in parts for i in p.ids),
    )


def render_sources(
    src: DetectorSources,
    band: Band,
    flux: FloatArray,
    fwhm_arcsec: float,
    shape: tuple[int, int],
    scale_arcsec: float,
    min_flux: float,
    out: npt.NDArray[np.float32],
) -> None:
    """Add the sources (with fluxes ``flux``, nJy) to ``out`` (detector pixels).

    Stamps of one size are computed together (one array per batch), then added
    one by one, clipped to the detector.
    """
    h, w = shape
    cat = src.cat
    flux = np.asarray(flux, dtype=float)
    fwhm_px = fwhm_arcsec / scale_arcsec
    re_px = np.hypot(cat.r_eff_arcsec / scale_arcsec, 0.6 * fwhm_px)
    is_point = cat.kind != 1
    half = stamp_half(flux, fwhm_px, re_px, is_point, cat.sersic_n)
    cx = np.floor(src.x + 0.5).astype(np.int64)
    cy = np.floor(src.y + 0.5).astype(np.int64)
    visible = (cx + half >= 0) & (cx - half < w) & (cy + half >= 0) & (cy - half < h)
    visible &= np.abs(flux) > min_flux
    for point in (True, False):
        for hh in np.unique(half[visible & (is_point == point)]).tolist():
            rows = np.flatnonzero(visible & (is_point == point) & (half == hh))
            side = 2 * hh + 1
            for part in np.array_split(rows, max(1, rows.size * side * side // 2_000_000 + 1)):
                if part.size == 0:
                    continue
                # float32: galaxies are most of the work, and 1e-7 is plenty.
                offs = np.arange(-hh, hh + 1, dtype=np.float32)
                dx = (
                    offs[None, None, :] + (cx[part] - src.x[part]).astype(np.float32)[:, None, None]
                )
                dy = (
                    offs[None, :, None] + (cy[part] - src.y[part]).astype(np.float32)[:, None, None]
                )
                if point:
                    # Point sources are few; their PSF is evaluated in double precision.
                    r2 = dx.astype(float) ** 2 + dy.astype(float) ** 2
                    stamps = (moffat(r2, fwhm_px) * flux[part][:, None, None]).astype(np.float32)
                else:
                    stamps = _sersic(src, part, dx, dy, re_px[part], flux[part])
                _add_stamps(out, stamps, cy[part] - hh, cx[part] - hh)


def _sersic(
    src: DetectorSources,
    rows: npt.NDArray[np.int64],
    dx: npt.NDArray[np.float32],
    dy: npt.NDArray[np.float32],
    re_px: FloatArray,
    flux: FloatArray,
) -> npt.NDArray[np.float32]:
    """Galaxy stamps (n, s, s): the shape is defined in the home tract's pixels."""
    cat = src.cat
    f32 = np.float32
    j = src.jac[rows].astype(f32)[:, :, :, None, None]
    tx = j[:, 0, 0] * dx + j[:, 0, 1] * dy
    ty = j[:, 1, 0] * dx + j[:, 1, 1] * dy
    c = np.cos(cat.pa_rad[rows]).astype(f32)[:, None, None]
    s = np.sin(cat.pa_rad[rows]).astype(f32)[:, None, None]
    u = tx * c + ty * s
    v = (ty * c - tx * s) / cat.axis_ratio[rows].astype(f32)[:, None, None]
    r = np.sqrt(u * u + v * v) / re_px.astype(f32)[:, None, None]
    nn = cat.sersic_n[rows]
    bn = (2 * nn - 1 / 3 + 4 / (405 * nn)).astype(f32)[:, None, None]
    stamps = np.exp(-bn * (r ** (1 / nn).astype(f32)[:, None, None] - 1))
    total = stamps.sum(axis=(1, 2), dtype=np.float64)
    out: npt.NDArray[np.float32] = stamps * (flux / total).astype(f32)[:, None, None]
    return out


def _add_stamps(
    out: npt.NDArray[np.float32],
    stamps: npt.NDArray[np.float32],
    y0: npt.NDArray[np.int64],
    x0: npt.NDArray[np.int64],
) -> None:
    """out[y0:y0+s, x0:x0+s] += stamp, each clipped to ``out``."""
    h, w = out.shape
    side = stamps.shape[1]
    for k, (ry, rx) in enumerate(zip(y0.tolist(), x0.tolist(), strict=True)):
        ya, yb = max(ry, 0), min(ry + side, h)
        xa, xb = max(rx, 0), min(rx + side, w)
        if ya < yb and xa < xb:
            out[ya:yb, xa:xb] += stamps[k, ya - ry : yb - ry, xa - rx : xb - rx]
