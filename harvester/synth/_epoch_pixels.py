"""The pixels of single-epoch images and templates, and the tasks that write them.

See :mod:`._epochs` for what the images hold; this module does the work one
detector (or one patch) at a time, in a worker process.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..epochs._refs import EpochRef
from ..masks import MASK_PLANES
from ..repo import DatasetRef
from ..wcsheader import window_cards
from ._build import SynthSpec, _file_id, _patch_catalog
from ._camera import DetectorWcs
from ._epoch_files import (
    detector_wcs_cards,
    epoch_primary,
    plane_headers,
    template_primary,
    write_exposure,
)
from ._epoch_spec import RUN, EpochSpec, epoch_ident, epoch_path, template_conditions, template_path
from ._model import BANDS, GAIN, SATURATION_NJY, Band, bad_pixel_mask, mask_bits
from ._schedule import Visit
from ._variability import agn_flux, agn_reference_flux
from ._visit_render import BETA, DetectorSources, detector_sources, render_sources, skymap_of

__all__ = ["epoch_task", "template_task"]


@lru_cache(maxsize=1)
def _noise_pool(seed: int, size: int) -> npt.NDArray[np.float32]:
    """``size`` seeded unit normals; images take windows of them."""
    return np.random.default_rng([seed, 0x90015E]).standard_normal(size, dtype=np.float32)


def _pool_size(spec: EpochSpec) -> int:
    """Twice the largest image of the build (a detector or a patch), plus one."""
    outer = spec.skymap.patch_inner + 2 * spec.skymap.patch_border
    return 2 * max(spec.camera.width * spec.camera.height, outer * outer) + 1


def _noise(spec: EpochSpec, shape: tuple[int, int], *key: int) -> npt.NDArray[np.float32]:
    """A window of the build's noise pool, chosen by ``key``."""
    n = shape[0] * shape[1]
    size = _pool_size(spec)
    pool = _noise_pool(spec.seed, size)
    start = int(np.random.default_rng([spec.seed, *key]).integers(0, size - n + 1))
    return pool[start : start + n].reshape(shape)


def _mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps), the same on every platform."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


def _tile_noise(
    spec: EpochSpec, key: tuple[int, ...], x0: int, y0: int, shape: tuple[int, int], tile: int
) -> npt.NDArray[np.float32]:
    """Noise on a window of a tract, one pool window per aligned tile (so that
    overlapping patches agree, as the deep coadds' :func:`._model.noise_field`)."""
    h, w = shape
    size = _pool_size(spec)
    pool = _noise_pool(spec.seed, size)
    out = np.empty(shape, dtype=np.float32)
    gx0, gy0 = x0 // tile, y0 // tile
    for ty in range(h // tile):
        for tx in range(w // tile):
            # A cheap integer hash of the tile picks its window (a Generator per
            # tile costs more than the copy).
            k = _mix(spec.seed, *key, gx0 + tx, gy0 + ty) % (size - tile * tile)
            out[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile] = pool[
                k : k + tile * tile
            ].reshape(tile, tile)
    return out


@lru_cache(maxsize=16)
def _defects(seed: int, detector: int, shape: tuple[int, int]) -> npt.NDArray[np.int64]:
    """Flat indices of a detector's BAD pixels: a few partial columns, small clusters."""
    h, w = shape
    rng = np.random.default_rng([seed, detector, 0xBAD])
    bad = np.zeros(shape, dtype=bool)
    per_mpix = h * w / 1e6
    for _ in range(int(rng.poisson(0.25 * per_mpix)) + 1):
        col = int(rng.integers(0, w))
        length = int(rng.integers(h // 8, h // 2 + 1))
        start = int(rng.integers(0, h - length + 1))
        bad[start : start + length, col] = True
    for _ in range(int(rng.poisson(1.0 * per_mpix))):
        cy, cx = int(rng.integers(0, max(h - 4, 1))), int(rng.integers(0, max(w - 4, 1)))
        bad[cy : cy + 4, cx : cx + 4] = True
    return np.flatnonzero(bad)


def epoch_task(root: Path, spec: EpochSpec, v: Visit, detector: int) -> list[EpochRef]:
    """Write (or keep) one detector's visit and difference images."""
    cam = spec.camera
    name = cam.detector_name(detector)
    wcs = cam.wcs(v.ra, v.dec, v.rotation, detector)
    corners = cam.corners(wcs)
    targets = []
    for dtype in ("visit_image", "difference_image"):
        rel = epoch_path(dtype, v, cam.name, name)
        ident = epoch_ident(dtype, spec, v.visit, detector)
        targets.append((dtype, rel, ident))
    refs = [_epoch_ref(spec, v, detector, corners, *t, root) for t in targets]
    if all(_file_id(root / t[1]) == (t[2], spec.compress) for t in targets):
        return refs
    visit_img, diff_img = _render_detector(spec, v, detector, wcs)
    headers = plane_headers(detector_wcs_cards(wcs.header_cards()))
    seed = 1 + (spec.seed * 7 + v.visit * 13 + detector) % 9999
    sigma2 = v.sky_sigma**2
    for (dtype, rel, ident), planes in zip(targets, (visit_img, diff_img), strict=True):
        primary = epoch_primary(
            dataset_type=dtype,
            ident=ident,
            run=RUN,
            instrument=cam.name,
            visit=v.visit,
            detector=detector,
            detector_name=name,
            band=v.band,
            physical_filter=v.physical_filter,
            day_obs=v.day_obs,
            mjd_tai=v.mjd_tai,
            exptime=v.exptime,
            boresight=(v.ra, v.dec),
            rotation=v.rotation,
            seeing=v.seeing,
            psf_beta=BETA,
            seed=spec.seed,
            compress=spec.compress,
        )
        write_exposure(
            root / rel,
            primary,
            planes,
            headers,
            compress=spec.compress,
            steps=(v.sky_sigma / 16.0, sigma2 / 1000.0),
            tile=spec.tile,
            dither_seed=seed,
        )
    return [_epoch_ref(spec, v, detector, corners, *t, root) for t in targets]


def _epoch_ref(
    spec: EpochSpec,
    v: Visit,
    detector: int,
    corners: tuple[tuple[float, float], ...],
    dtype: str,
    rel: str,
    ident: str,
    root: Path,
) -> EpochRef:
    path = root / rel
    return EpochRef(
        id=ident,
        dataset_type=dtype,
        instrument=spec.camera.name,
        visit=v.visit,
        detector=detector,
        band=v.band,
        physical_filter=v.physical_filter,
        day_obs=v.day_obs,
        mjd_tai=v.mjd_tai,
        exptime=v.exptime,
        seeing=v.seeing,
        width=spec.camera.width,
        height=spec.camera.height,
        polygon=corners,
        path=rel,
        size=path.stat().st_size if path.is_file() else 0,
        compressed=spec.compress,
    )


Planes = tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.float32]]


class _Buffers:
    """Whole-detector arrays reused from one detector to the next in a worker.

    Fresh multi-megabyte arrays cost a page fault per 4 KiB (and more on a VM that
    hands freed memory back to its host): ten planes of 16 Mpx each were a third of
    a detector's time. A task writes its files before the next one renders.
    """

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, tuple[int, int]], npt.NDArray[np.generic]] = {}

    def get(self, name: str, shape: tuple[int, int], dtype: type) -> npt.NDArray[Any]:
        key = (name, shape)
        arr = self._arrays.get(key)
        if arr is None or arr.dtype != dtype:
            if len(self._arrays) > 24:  # another detector size: start over
                self._arrays.clear()
            arr = self._arrays[key] = np.empty(shape, dtype=dtype)
        return arr


_BUFFERS = _Buffers()


def _render_detector(
    spec: EpochSpec, v: Visit, detector: int, wcs: DetectorWcs
) -> tuple[Planes, Planes]:
    """(visit image, difference image) planes of one detector (reused buffers)."""
    cam = spec.camera
    shape = (cam.height, cam.width)
    buf = _BUFFERS.get
    band = BANDS[v.band]
    skymap = skymap_of(spec.skymap)
    agn = tuple(zip(spec.agn.ra, spec.agn.dec, strict=True))
    static, nuclei = detector_sources(
        skymap, spec.seed, spec.agn.ids, agn, wcs, cam.width, cam.height
    )
    scale = cam.pixel_scale_arcsec
    model = buf("model", shape, np.float32)
    model.fill(0.0)
    min_flux = 0.2 * v.sky_sigma
    render_sources(static, band, static.cat.flux_njy(band), v.seeing, shape, scale, min_flux, model)
    f_t = np.array([float(agn_flux(i, v.band, v.mjd_tai, spec.seed)) for i in nuclei.ids])
    f_0 = np.array([agn_reference_flux(i, v.band, spec.seed) for i in nuclei.ids])
    render_sources(nuclei, band, f_t, v.seeing, shape, scale, 0.0, model)
    # The visit: model + noise of the sky and of the sources (VARIANCE says which).
    variance = buf("variance", shape, np.float32)
    np.maximum(model, np.float32(0.0), out=variance)
    variance *= np.float32(1.0 / GAIN)
    variance += np.float32(v.sky_sigma**2)
    noise = buf("noise", shape, np.float32)
    np.sqrt(variance, out=noise)
    noise *= _noise(spec, shape, v.visit, detector, 1)
    image = buf("image", shape, np.float32)
    np.add(model, noise, out=image)
    sat = np.flatnonzero(model > SATURATION_NJY)
    image.ravel()[sat] = np.float32(SATURATION_NJY)
    bad = _defects(spec.seed, detector, shape)
    flag = buf("flag", shape, np.bool_)
    mask = _bits(
        np.greater(model, 3 * v.sky_sigma, out=flag), "DETECTED", buf("mask", shape, np.int32)
    )
    mask.ravel()[bad] |= 1 << MASK_PLANES["BAD"]
    mask.ravel()[sat] |= (1 << MASK_PLANES["SAT"]) | (1 << MASK_PLANES["INTRP"])
    # The difference: f(t) - f0 through the PSF, the visit's noise and the template's.
    t_sigma = template_conditions(spec, v.band)[1]
    diff = buf("diff", shape, np.float32)
    np.multiply(_noise(spec, shape, v.visit, detector, 2), np.float32(t_sigma), out=diff)
    diff += noise
    delta = buf("delta", shape, np.float32)
    delta.fill(0.0)
    render_sources(nuclei, band, f_t - f_0, v.seeing, shape, scale, 0.0, delta)
    diff += delta
    diff_var = buf("diff_var", shape, np.float32)
    np.add(variance, np.float32(t_sigma**2), out=diff_var)
    diff_mask = _bits(
        np.greater(delta, 3 * v.sky_sigma, out=flag), "DETECTED", buf("diff_mask", shape, np.int32)
    )
    negative = _bits(
        np.less(delta, -3 * v.sky_sigma, out=flag), "DETECTED_NEGATIVE", buf("tmp", shape, np.int32)
    )
    diff_mask |= negative
    diff_mask.ravel()[bad] |= 1 << MASK_PLANES["BAD"]
    diff_mask.ravel()[sat] |= 1 << MASK_PLANES["SAT"]
    return (image, mask, variance), (diff, diff_mask, diff_var)


def _bits(
    flags: npt.NDArray[np.bool_], plane: str, out: npt.NDArray[np.int32]
) -> npt.NDArray[np.int32]:
    """``out`` set to ``plane``'s bit where ``flags``, 0 elsewhere."""
    np.multiply(flags, np.int32(1 << MASK_PLANES[plane]), out=out, casting="unsafe")
    return out


def template_task(root: Path, spec: EpochSpec, tract: int, patch: int) -> list[DatasetRef]:
    """Write (or keep) one patch's ``template_coadd`` files, all bands."""
    skymap = skymap_of(spec.skymap)
    outer = skymap.patch_outer_box(patch)
    shape = (outer.height, outer.width)
    tile = math.gcd(spec.skymap.patch_inner, spec.skymap.patch_border) or spec.skymap.patch_inner
    polygon = tuple((float(r), float(d)) for r, d in skymap.patch_sky_polygon(tract, patch))
    coadd = SynthSpec(
        patches=((tract, patch),),
        bands=spec.bands,
        seed=spec.seed,
        agn=spec.agn,
        skymap=spec.skymap,
    )
    sources: DetectorSources | None = None
    seed_t = spec.seed + 7919  # defects of another draw than the deep coadd's
    refs = []
    for band_name in spec.bands:
        rel = template_path(tract, patch, band_name, spec.skymap.name)
        ident = epoch_ident("template_coadd", spec, tract, patch, band_name)
        path = root / rel
        fwhm, sky = template_conditions(spec, band_name)
        if _file_id(path) != (ident, spec.compress):
            if sources is None:
                cat = _patch_catalog(skymap, coadd, tract, patch)
                # The patch as a "detector" on the tract grid: no rotation, no Jacobian.
                eye = np.broadcast_to(np.eye(2), (len(cat), 2, 2))
                sources = DetectorSources(cat, cat.x - outer.x0, cat.y - outer.y0, eye)
            band: Band = replace(BANDS[band_name], fwhm_arcsec=fwhm, sky_sigma_njy=sky)
            buf = _BUFFERS.get
            model = buf("t_model", shape, np.float32)
            model.fill(0.0)
            scale = spec.skymap.pixel_scale_arcsec
            flux = sources.cat.flux_njy(band)
            render_sources(sources, band, flux, fwhm, shape, scale, 0.2 * sky, model)
            variance = buf("t_variance", shape, np.float32)
            np.maximum(model, np.float32(0.0), out=variance)
            variance *= np.float32(1.0 / GAIN)
            variance += np.float32(sky**2)
            image = buf("t_image", shape, np.float32)
            np.sqrt(variance, out=image)
            image *= _tile_noise(spec, (tract, band.index, 3), outer.x0, outer.y0, shape, tile)
            image += model
            bad = bad_pixel_mask(seed_t, tract, outer.x0, outer.y0, shape, tile)
            mask = mask_bits(model, bad, band)
            image[model > SATURATION_NJY] = np.float32(SATURATION_NJY)
            primary = template_primary(
                ident=ident,
                run=RUN,
                tract=tract,
                patch=patch,
                band=band_name,
                skymap=spec.skymap.name,
                seeing=fwhm,
                psf_beta=BETA,
                seed=spec.seed,
                compress=spec.compress,
            )
            write_exposure(
                path,
                primary,
                (image, mask, variance),
                plane_headers(window_cards(skymap.tract_wcs_numbers(tract), outer.x0, outer.y0)),
                compress=spec.compress,
                steps=(sky / 16.0, sky**2 / 1000.0),
                tile=spec.tile,
                dither_seed=1 + (seed_t + tract * 101 + patch) % 9999,
            )
        refs.append(
            DatasetRef(
                id=ident,
                dataset_type="template_coadd",
                tract=tract,
                patch=patch,
                band=band_name,
                path=rel,
                size=path.stat().st_size,
                compressed=spec.compress,
                polygon=polygon,
            )
        )
    return refs
