"""The synthetic sky: bands, source catalogues and their rendering into pixels.

Everything is a deterministic function of ``(seed, tract, ...)`` and lives on the
tract's pixel grid, so neighbouring patches of one tract agree exactly where their
outer boxes overlap (as real coadd patches nearly do), which is what lets a cutout
that crosses a patch edge be assembled from the neighbour.

* Sources are drawn per *block* (a patch's inner box); a patch renders the sources
  of its own block and its eight neighbours.
* Noise is drawn per *noise tile*, an aligned square whose side divides both the
  patch inner size and the border, so every outer box is a whole number of tiles.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..masks import MASK_PLANES

__all__ = [
    "BANDS",
    "Band",
    "Catalog",
    "agn_catalog",
    "bad_pixel_mask",
    "block_catalog",
    "mask_bits",
    "noise_field",
    "render",
]

FloatArray = npt.NDArray[np.float64]

#: Zero point of the nJy flux scale: mag = -2.5 log10(flux / nJy) + 31.4 (AB).
ZERO_POINT = 31.4


@dataclass(frozen=True)
class Band:
    """Per-band observing conditions of the synthetic coadd."""

    name: str
    index: int
    wavelength_m: float  # effective wavelength, for SIA BAND queries
    fwhm_arcsec: float  # PSF FWHM
    sky_sigma_njy: float  # per-pixel sky noise (sets the depth)


#: The six LSST bands; sky noise chosen to give DP1-like 5-sigma point-source depths
#: of roughly u 24.0, g 26.0, r 25.9, i 25.5, z 24.9, y 24.0.
BANDS: dict[str, Band] = {
    b.name: b
    for b in (
        Band("u", 0, 3.671e-7, 1.05, 38.0),
        Band("g", 1, 4.827e-7, 0.95, 7.5),
        Band("r", 2, 6.223e-7, 0.85, 8.5),
        Band("i", 3, 7.546e-7, 0.80, 12.0),
        Band("z", 4, 8.691e-7, 0.78, 21.0),
        Band("y", 5, 9.712e-7, 0.75, 45.0),
    )
}

#: Colours relative to r, per source kind: (u-r, g-r, 0, r-i, r-z, r-y) offsets in mag.
_COLOURS = {
    "star": np.array([1.4, 0.5, 0.0, -0.2, -0.3, -0.35]),
    "galaxy": np.array([1.6, 0.7, 0.0, -0.35, -0.55, -0.65]),
    "agn": np.array([0.4, 0.2, 0.0, -0.15, -0.2, -0.25]),
}

SATURATION_NJY = 150_000.0  # per-pixel level above which a pixel is SAT
GAIN = 4.0  # nJy per "count": sets how much source Poisson noise adds to variance


@dataclass
class Catalog:
    """Sources on a tract grid; one row per source, columns as arrays."""

    x: FloatArray  # tract PARENT pixel
    y: FloatArray
    mag_r: FloatArray
    kind: npt.NDArray[np.int8]  # 0 star, 1 galaxy, 2 AGN point source
    colour_jitter: FloatArray  # (n, 6) added to the kind's colours
    sersic_n: FloatArray
    r_eff_arcsec: FloatArray
    axis_ratio: FloatArray
    pa_rad: FloatArray

    @classmethod
    def concat(cls, parts: list[Catalog]) -> Catalog:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, keep: npt.NDArray[np.bool_]) -> Catalog:
        return Catalog(*(getattr(self, f)[keep] for f in _FIELDS))

    def flux_njy(self, band: Band) -> FloatArray:
        kinds = np.array([_COLOURS["star"], _COLOURS["galaxy"], _COLOURS["agn"]])
        colour = kinds[self.kind, band.index] + self.colour_jitter[:, band.index]
        flux: FloatArray = 10.0 ** (-0.4 * (self.mag_r + colour - ZERO_POINT))
        return flux


_FIELDS = (
    "x",
    "y",
    "mag_r",
    "kind",
    "colour_jitter",
    "sersic_n",
    "r_eff_arcsec",
    "axis_ratio",
    "pa_rad",
)


def block_catalog(
    seed: int,
    tract: int,
    bx: int,
    by: int,
    block: int,
    scale_arcsec: float,
    avoid: FloatArray,
) -> Catalog:
    """Stars and galaxies of one block ``[bx*block, (bx+1)*block)`` (and y), seeded.

    ``avoid`` is an (n, 2) array of tract pixels (the AGN) near which no random
    source is placed, so that each AGN is the brightest thing at its position.
    """
    rng = np.random.default_rng([seed, tract, bx + 10_000, by + 10_000, 1])
    area_deg2 = (block * scale_arcsec / 3600.0) ** 2
    # ~90 000 galaxies and ~4 000 stars per square degree to r ~ 26.5 (high latitude).
    n_gal = int(rng.poisson(90_000 * area_deg2))
    n_star = int(rng.poisson(4_000 * area_deg2))
    n = n_gal + n_star
    x = bx * block + rng.uniform(0, block, n)
    y = by * block + rng.uniform(0, block, n)
    # Number counts dN/dm ~ 10^(0.33 m) for galaxies, flatter for stars.
    slope = np.where(np.arange(n) < n_gal, 0.33, 0.12)
    mag = np.maximum(26.5 + np.log10(rng.uniform(1e-9, 1, n)) / slope, 16.0)
    kind = np.where(np.arange(n) < n_gal, 1, 0).astype(np.int8)
    cat = Catalog(
        x=x,
        y=y,
        mag_r=mag,
        kind=kind,
        colour_jitter=rng.normal(0, 0.15, (n, 6)),
        sersic_n=rng.uniform(0.6, 4.0, n),
        r_eff_arcsec=np.clip(
            rng.lognormal(math.log(0.6), 0.5, n) * 10 ** (-0.1 * (mag - 22)), 0.15, 6.0
        ),
        axis_ratio=rng.uniform(0.3, 1.0, n),
        pa_rad=rng.uniform(0, math.pi, n),
    )
    keep = np.ones(n, dtype=bool)
    if len(avoid):
        # Clear 30 px (at 0.2"/px) plus four effective radii around each AGN, so that
        # no random source outshines it at its position.
        px_per_arcsec = 1.0 / scale_arcsec
        clear = 30.0 * 0.2 * px_per_arcsec + 4 * cat.r_eff_arcsec * px_per_arcsec
        d2 = (x[:, None] - avoid[None, :, 0]) ** 2 + (y[:, None] - avoid[None, :, 1]) ** 2
        keep = d2.min(axis=1) > clear**2
    return cat.subset(keep)


def agn_catalog(ids: npt.ArrayLike, x: FloatArray, y: FloatArray, seed: int) -> Catalog:
    """Each AGN as a point source plus a host galaxy, brightness seeded by its id."""
    ids = np.asarray(ids)
    n = len(ids)
    mags = np.empty(n)
    host = np.empty(n)
    for i, ident in enumerate(ids):
        # V < 22 AGN: point sources r ~ 19.5-21.5, hosts a little fainter.
        rng = np.random.default_rng([seed, zlib.crc32(str(ident).encode())])
        mags[i] = rng.uniform(19.5, 21.5)
        host[i] = mags[i] + rng.uniform(0.3, 1.2)
    zeros = np.zeros(n)
    point = Catalog(
        x,
        y,
        mags,
        np.full(n, 2, np.int8),
        np.zeros((n, 6)),
        zeros + 1,
        zeros + 0.01,
        zeros + 1,
        zeros,
    )
    galaxy = Catalog(
        x.copy(),
        y.copy(),
        host,
        np.ones(n, np.int8),
        np.zeros((n, 6)),
        zeros + 1.5,
        zeros + 1.2,
        zeros + 0.7,
        zeros + 0.5,
    )
    return Catalog.concat([point, galaxy])


def stamp_half(
    flux: FloatArray,
    fwhm_px: float,
    re_px: FloatArray,
    is_point: npt.NDArray[np.bool_],
    sersic_n: FloatArray,
) -> npt.NDArray[np.int64]:
    """Half-size of each source's rendering stamp (px): enough for the profile to
    fall well below the sky noise (wider for bright point sources)."""
    return np.where(
        is_point,
        np.clip(4 * fwhm_px * (1 + np.log10(np.maximum(flux, 1) / 1e3).clip(0)), 6, 80),
        np.clip(re_px * (2 + sersic_n), 6, 80),
    ).astype(np.int64)


def render(
    cat: Catalog,
    band: Band,
    x0: int,
    y0: int,
    shape: tuple[int, int],
    scale_arcsec: float,
) -> FloatArray:
    """Noiseless model image (nJy per pixel) of a catalogue on a window of the tract."""
    h, w = shape
    model = np.zeros(shape, dtype=np.float64)
    flux = cat.flux_njy(band)
    fwhm_px = band.fwhm_arcsec / scale_arcsec
    re_px = np.hypot(cat.r_eff_arcsec / scale_arcsec, 0.6 * fwhm_px)
    is_point = cat.kind != 1
    half = stamp_half(flux, fwhm_px, re_px, is_point, cat.sersic_n)
    cx = np.floor(cat.x + 0.5).astype(np.int64) - x0
    cy = np.floor(cat.y + 0.5).astype(np.int64) - y0
    visible = (cx + half >= 0) & (cx - half < w) & (cy + half >= 0) & (cy - half < h)
    visible &= flux > 0.2 * band.sky_sigma_njy
    beta = 3.0
    alpha = fwhm_px / (2 * math.sqrt(2 ** (1 / beta) - 1))
    for i in np.flatnonzero(visible):
        hh = int(half[i])
        ys = np.arange(cy[i] - hh, cy[i] + hh + 1)
        xs = np.arange(cx[i] - hh, cx[i] + hh + 1)
        dx = (xs + x0) - cat.x[i]
        dy = (ys + y0) - cat.y[i]
        if is_point[i]:
            r2 = dy[:, None] ** 2 + dx[None, :] ** 2
            stamp = (beta - 1) / (math.pi * alpha**2) * (1 + r2 / alpha**2) ** -beta
            stamp *= flux[i]
        else:
            c, s = math.cos(cat.pa_rad[i]), math.sin(cat.pa_rad[i])
            u = dx[None, :] * c + dy[:, None] * s
            v = (-dx[None, :] * s + dy[:, None] * c) / cat.axis_ratio[i]
            r = np.sqrt(u * u + v * v) / re_px[i]
            nn = cat.sersic_n[i]
            bn = 2 * nn - 1 / 3 + 4 / (405 * nn)
            stamp = np.exp(-bn * (r ** (1 / nn) - 1))
            stamp *= flux[i] / stamp.sum()
        _add_clipped(model, stamp, int(cy[i] - hh), int(cx[i] - hh))
    return model


def _add_clipped(model: FloatArray, stamp: FloatArray, ry: int, rx: int) -> None:
    """model[ry:ry+sh, rx:rx+sw] += stamp, clipped to the model's bounds."""
    h, w = model.shape
    sh, sw = stamp.shape
    ya, yb = max(ry, 0), min(ry + sh, h)
    xa, xb = max(rx, 0), min(rx + sw, w)
    if ya < yb and xa < xb:
        model[ya:yb, xa:xb] += stamp[ya - ry : yb - ry, xa - rx : xb - rx]


def noise_field(
    seed: int, tract: int, band: Band, x0: int, y0: int, shape: tuple[int, int], tile: int
) -> npt.NDArray[np.float32]:
    """Unit normal noise on a window, drawn per aligned tile so windows agree."""
    h, w = shape
    if x0 % tile or y0 % tile or h % tile or w % tile:
        raise ValueError(f"window ({x0}, {y0}, {shape}) is not aligned to noise tiles of {tile}")
    out = np.empty(shape, dtype=np.float32)
    for ty in range(h // tile):
        for tx in range(w // tile):
            gx, gy = (x0 // tile) + tx, (y0 // tile) + ty
            rng = np.random.default_rng([seed, tract, band.index, gx + 100_000, gy + 100_000, 2])
            out[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile] = rng.standard_normal(
                (tile, tile), dtype=np.float32
            )
    return out


def bad_pixel_mask(
    seed: int, tract: int, x0: int, y0: int, shape: tuple[int, int], tile: int
) -> npt.NDArray[np.bool_]:
    """A few bad columns and bad clusters per noise tile (about 1 tile in 12)."""
    h, w = shape
    bad = np.zeros(shape, dtype=bool)
    for ty in range(h // tile):
        for tx in range(w // tile):
            gx, gy = (x0 // tile) + tx, (y0 // tile) + ty
            rng = np.random.default_rng([seed, tract, gx + 100_000, gy + 100_000, 3])
            if rng.uniform() > 1 / 12:
                continue
            ox, oy = tx * tile, ty * tile
            col = int(rng.integers(0, tile))
            length = int(rng.integers(tile // 8, tile // 2 + 1))
            start = int(rng.integers(0, tile - length + 1))
            bad[oy + start : oy + start + length, ox + col] = True
            cx, cy = int(rng.integers(2, tile - 2)), int(rng.integers(2, tile - 2))
            bad[oy + cy - 2 : oy + cy + 2, ox + cx - 2 : ox + cx + 2] = True
    return bad


def mask_bits(model: FloatArray, bad: npt.NDArray[np.bool_], band: Band) -> npt.NDArray[np.int32]:
    """MASK plane from the model: BAD, SAT (+INTRP), DETECTED above 3 sigma of sky."""
    mask = np.zeros(model.shape, dtype=np.int32)
    mask[bad] |= 1 << MASK_PLANES["BAD"]
    sat = model > SATURATION_NJY
    mask[sat] |= (1 << MASK_PLANES["SAT"]) | (1 << MASK_PLANES["INTRP"])
    mask[model > 3 * band.sky_sigma_njy] |= 1 << MASK_PLANES["DETECTED"]
    return mask
