"""The ``lsst_cells_v1`` rings sky map, vectorised over positions.

This module reimplements the geometry of ``lsst.skymap.RingsSkyMap`` with the cell
tract builder (see ``docs``/README "Sky map"), in numpy, so that millions of
positions resolve to tract, patch and pixel in one pass without the LSST stack.

The rules followed, and where they come from in the LSST code:

* rings of height ``pi / (numRings + 1)``, polar caps as tracts ``0`` and ``last``;
  tracts per ring ``floor(2 pi cos(d) / dRing) + 1`` with ``d`` the ring edge nearer
  the equator (``ringsSkyMap.py``);
* ``findTract``: ring by Dec, tract in ring by RA rounded half up (not a nearest
  centre search);
* a pure TAN WCS per tract with CD = ``[[-s, 0], [0, s]]`` and the tract centre at
  0-based pixel ``-bboxMin`` (``wcsFactory.py``, ``copyAtShiftedPixelOrigin``);
* the tract box from the four bearings at ``radius + overlap``, Box2I EXPAND
  rounding, grown symmetrically to a whole number of patches (``tractInfo.py``);
* ``findPatch``: Point2I rounding ``floor(v + 0.5)`` and the patch chosen by its
  inner box; outer boxes are the inner ones grown by the border, never clipped.

Dependency rule: numpy and astropy only; no I/O, no other harvester module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt
from astropy.wcs import WCS

__all__ = [
    "LSST_CELLS_V1",
    "PatchBox",
    "Placement",
    "SkyMap",
    "SkyMapConfig",
    "TractWcs",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_DEG = math.pi / 180.0


@dataclass(frozen=True)
class SkyMapConfig:
    """Geometry of a rings sky map built with the cell tract builder.

    Parameters
    ----------
    name : str
        Sky map name written into provenance (``lsst_cells_v1``).
    num_rings : int
        Number of Dec rings between the polar caps.
    pixel_scale_arcsec : float
        Nominal pixel scale of every tract WCS.
    tract_overlap_deg : float
        Extra radius added to every tract, so that neighbouring tracts overlap.
    patch_inner : int
        Side of a patch's inner box in pixels (cells per patch x cell size).
    patch_border : int
        Border added to every side of the inner box to make the outer box.
    ra_start_deg : float
        RA of tract 0 of every ring.
    """

    name: str = "lsst_cells_v1"
    num_rings: int = 120
    pixel_scale_arcsec: float = 0.2
    tract_overlap_deg: float = 1.0 / 60.0
    patch_inner: int = 3000
    patch_border: int = 200
    ra_start_deg: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "num_rings": self.num_rings >= 1,
            "pixel_scale_arcsec": 0 < self.pixel_scale_arcsec < 3600,
            "tract_overlap_deg": 0 <= self.tract_overlap_deg < 10,
            "patch_inner": self.patch_inner >= 1,
            "patch_border": self.patch_border >= 0,
            "ra_start_deg": math.isfinite(self.ra_start_deg),
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"sky map config: bad {key} = {getattr(self, key)!r}")


LSST_CELLS_V1 = SkyMapConfig()


@dataclass(frozen=True)
class TractWcs:
    """The numbers that define a tract's TAN WCS (0-based pixel convention)."""

    crval_ra: float
    crval_dec: float
    crpix0: float
    scale_deg: float


@dataclass(frozen=True)
class PatchBox:
    """An integer pixel box ``[x0, x1) x [y0, y1)`` in a tract's PARENT grid."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def contains(self, x: int, y: int) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1


@dataclass(frozen=True)
class Placement:
    """Where positions fall on the sky map: one entry per input position.

    Attributes
    ----------
    tract, patch, patch_x, patch_y : ndarray of int64
        Tract id, sequential patch id ``patch_y * npatch + patch_x`` and its index.
    x, y : ndarray of float64
        0-based pixel position in the tract's PARENT grid.
    center_x, center_y : ndarray of int64
        Integer centre pixel, ``floor(v + 0.5)`` (lsst.geom Point2I rule).
    """

    tract: IntArray
    patch: IntArray
    patch_x: IntArray
    patch_y: IntArray
    x: FloatArray
    y: FloatArray
    center_x: IntArray
    center_y: IntArray

    def __len__(self) -> int:
        return int(self.tract.shape[0])


@dataclass(frozen=True)
class SkyMap:
    """A rings sky map: tract layout, tract WCS, patches, and position lookup.

    All lookups take RA and Dec in degrees (ICRS) as scalars or arrays and are
    vectorised; invalid positions raise :class:`ValueError` naming the value.
    """

    config: SkyMapConfig = field(default_factory=SkyMapConfig)

    # ---- ring layout -------------------------------------------------------------

    @cached_property
    def ring_size(self) -> float:
        """Ring height in radians."""
        return math.pi / (self.config.num_rings + 1)

    @cached_property
    def ring_counts(self) -> IntArray:
        """Number of tracts in each ring, south to north."""
        counts = []
        for i in range(self.config.num_rings):
            start = self.ring_size * (i + 0.5) - 0.5 * math.pi
            stop = start + self.ring_size
            dec = min(abs(start), abs(stop))
            counts.append(int(2 * math.pi * math.cos(dec) / self.ring_size) + 1)
        return np.asarray(counts, dtype=np.int64)

    @cached_property
    def ring_offsets(self) -> IntArray:
        """Tract id of the first tract of each ring."""
        return (1 + np.concatenate([[0], np.cumsum(self.ring_counts)[:-1]])).astype(np.int64)

    @property
    def num_tracts(self) -> int:
        return int(self.ring_counts.sum()) + 2

    def _centers(self, tract: IntArray) -> tuple[FloatArray, FloatArray]:
        """Centres (RA, Dec) in radians of an array of tract ids."""
        tract = np.asarray(tract, dtype=np.int64)
        ring = np.searchsorted(self.ring_offsets, tract, side="right") - 1
        ring = np.clip(ring, 0, self.config.num_rings - 1)
        n = self.ring_counts[ring]
        j = tract - self.ring_offsets[ring]
        ra = np.mod(self.config.ra_start_deg * _DEG + 2 * math.pi * j / n, 2 * math.pi)
        dec = self.ring_size * (ring + 1) - 0.5 * math.pi
        south, north = tract == 0, tract == self.num_tracts - 1
        ra = np.where(south | north, 0.0, ra)
        dec = np.where(south, -0.5 * math.pi, np.where(north, 0.5 * math.pi, dec))
        return ra.astype(np.float64), dec.astype(np.float64)

    def tract_centers(self, tract: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Centres (RA, Dec) in degrees of an array of tract ids."""
        ra, dec = self._centers(np.asarray(tract, dtype=np.int64))
        return np.degrees(ra), np.degrees(dec)

    def tract_center(self, tract: int) -> tuple[float, float]:
        """Centre of a tract as (RA, Dec) in degrees."""
        self._check_tract(tract)
        ra, dec = self._centers(np.array([tract]))
        return float(np.degrees(ra[0])), float(np.degrees(dec[0]))

    def tract_ring(self, tract: int) -> tuple[int, int]:
        """Ring number and tract-in-ring index; caps are rings -1 and ``num_rings``."""
        self._check_tract(tract)
        if tract == 0:
            return -1, 0
        if tract == self.num_tracts - 1:
            return self.config.num_rings, 0
        ring = int(np.searchsorted(self.ring_offsets, tract, side="right") - 1)
        return ring, tract - int(self.ring_offsets[ring])

    def _check_tract(self, tract: int) -> None:
        if not 0 <= int(tract) < self.num_tracts:
            raise ValueError(f"tract {tract} is not in 0..{self.num_tracts - 1}")

    # ---- tract pixel geometry (identical for every tract) ------------------------

    @property
    def pixel_scale_deg(self) -> float:
        return self.config.pixel_scale_arcsec / 3600.0

    @cached_property
    def _tract_geometry(self) -> tuple[int, int]:
        """(bbox min before the shift, number of patches per side)."""
        theta = self.ring_size / 2 + self.config.tract_overlap_deg * _DEG
        # A great circle through the tangent point is a straight line in the gnomonic
        # projection, at distance tan(theta): the four bearings give a square box.
        half = math.tan(theta) / _DEG / self.pixel_scale_deg
        lo = math.ceil(-half - 0.5)
        hi = math.floor(half + 0.5)
        dim = hi - lo + 1
        npatch = -(-dim // self.config.patch_inner)
        extra = npatch * self.config.patch_inner - dim
        return lo - extra // 2, npatch

    @property
    def num_patches(self) -> int:
        """Patches per tract side (the tract has ``num_patches**2`` patches)."""
        return self._tract_geometry[1]

    @property
    def tract_dim(self) -> int:
        """Side of every tract's pixel box ``[0, tract_dim)``."""
        return self.num_patches * self.config.patch_inner

    @property
    def crpix0(self) -> float:
        """0-based pixel of the tract centre (FITS CRPIX is this plus one)."""
        return float(-self._tract_geometry[0])

    def tract_wcs_numbers(self, tract: int) -> TractWcs:
        """CRVAL (degrees), 0-based CRPIX and scale of a tract's WCS, as plain numbers."""
        ra, dec = self.tract_center(tract)
        return TractWcs(ra, dec, self.crpix0, self.pixel_scale_deg)

    def tract_wcs(self, tract: int) -> WCS:
        """The tract's TAN WCS (PARENT pixel grid) as an :class:`astropy.wcs.WCS`."""
        ra, dec = self.tract_center(tract)
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [ra, dec]
        w.wcs.crpix = [self.crpix0 + 1, self.crpix0 + 1]
        s = self.pixel_scale_deg
        w.wcs.cd = np.array([[-s, 0.0], [0.0, s]])
        w.wcs.radesys = "ICRS"
        w.wcs.cunit = ["deg", "deg"]
        w.wcs.set()
        return w

    @cached_property
    def effective_pixel_scale_arcsec(self) -> float:
        """The pixel scale as ``SkyWcs.getPixelScale()`` reports it at CRPIX.

        afw measures it from the 3-vector chord differences of +1 pixel steps, which
        comes out a hair below the nominal scale. The tutorial's cutout side
        ``int(size / scale)`` depends on that (60 arcsec gives 300, not 299), so the
        same measure is used here. The value is the same for every tract (the tract
        geometry is identical), so it is measured once on the equator.
        """
        x = np.array([0.0, 1.0, 0.0]) + self.crpix0
        y = np.array([0.0, 0.0, 1.0]) + self.crpix0
        ra, dec = _tan_pixel_to_sky(x, y, 0.0, 0.0, self.crpix0, self.pixel_scale_deg)
        v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
        area = float(np.linalg.norm(np.cross(v[1] - v[0], v[2] - v[0])))
        return math.degrees(math.sqrt(area)) * 3600.0

    # ---- patches -----------------------------------------------------------------

    def patch_index(self, patch: int) -> tuple[int, int]:
        """Sequential patch id to its (x, y) index."""
        n = self.num_patches
        if not 0 <= int(patch) < n * n:
            raise ValueError(f"patch {patch} is not in 0..{n * n - 1}")
        return int(patch) % n, int(patch) // n

    def patch_inner_box(self, patch: int) -> PatchBox:
        px, py = self.patch_index(patch)
        size = self.config.patch_inner
        return PatchBox(px * size, py * size, (px + 1) * size, (py + 1) * size)

    def patch_outer_box(self, patch: int) -> PatchBox:
        """The inner box grown by the border, not clipped (the coadd PARENT box)."""
        b = self.patch_inner_box(patch)
        g = self.config.patch_border
        return PatchBox(b.x0 - g, b.y0 - g, b.x1 + g, b.y1 + g)

    def patch_sky_polygon(self, tract: int, patch: int) -> FloatArray:
        """Corners (RA, Dec) in degrees of the patch's outer box, shape (4, 2).

        The corners are those of the box as a float box (pixel edges at -0.5), in
        the order lower-left, lower-right, upper-right, upper-left.
        """
        b = self.patch_outer_box(patch)
        x = np.array([b.x0, b.x1, b.x1, b.x0], dtype=float) - 0.5
        y = np.array([b.y0, b.y0, b.y1, b.y1], dtype=float) - 0.5
        ra, dec = self.pixel_to_sky(np.full(4, tract), x, y)
        return np.stack([ra, dec], axis=1)

    # ---- sky <-> pixel -----------------------------------------------------------

    def sky_to_pixel(
        self, tract: npt.ArrayLike, ra: npt.ArrayLike, dec: npt.ArrayLike
    ) -> tuple[FloatArray, FloatArray]:
        """0-based PARENT pixel of each position in the given tract(s).

        Positions on the far hemisphere of their tract centre give NaN.
        """
        ra_r, dec_r = _validated_radians(ra, dec)
        cra, cdec = self._centers(np.asarray(tract, dtype=np.int64))
        return _tan_sky_to_pixel(ra_r, dec_r, cra, cdec, self.crpix0, self.pixel_scale_deg)

    def pixel_to_sky(
        self, tract: npt.ArrayLike, x: npt.ArrayLike, y: npt.ArrayLike
    ) -> tuple[FloatArray, FloatArray]:
        """(RA, Dec) in degrees of 0-based PARENT pixels in the given tract(s)."""
        cra, cdec = self._centers(np.asarray(tract, dtype=np.int64))
        ra, dec = _tan_pixel_to_sky(
            np.asarray(x, dtype=float),
            np.asarray(y, dtype=float),
            cra,
            cdec,
            self.crpix0,
            self.pixel_scale_deg,
        )
        return np.mod(np.degrees(ra), 360.0), np.degrees(dec)

    # ---- lookups -----------------------------------------------------------------

    def find_tract(self, ra: npt.ArrayLike, dec: npt.ArrayLike) -> IntArray:
        """The tract of each position, by the RingsSkyMap ``findTract`` rule."""
        ra_r, dec_r = _validated_radians(ra, dec)
        return self._find_tract_radians(ra_r, dec_r)

    def _ring_of(self, dec_r: FloatArray) -> IntArray:
        first = self.ring_size * 0.5 - 0.5 * math.pi
        ring = np.floor((dec_r - first) / self.ring_size).astype(np.int64)
        ring[dec_r < first] = -1
        ring[(dec_r > -first) | (ring > self.config.num_rings)] = self.config.num_rings
        return ring

    def _tract_in_ring(self, ra_r: FloatArray, ring: IntArray) -> IntArray:
        """Nearest tract index in ``ring`` (which must be a real ring) by RA."""
        n = self.ring_counts[ring]
        wrapped = np.mod(ra_r - self.config.ra_start_deg * _DEG, 2 * math.pi)
        j = np.floor(wrapped / (2 * math.pi / n) + 0.5).astype(np.int64)
        return np.where(j >= n, 0, j)

    def _find_tract_radians(self, ra_r: FloatArray, dec_r: FloatArray) -> IntArray:
        ring = self._ring_of(dec_r)
        south = ring < 0
        north = ring >= self.config.num_rings
        inside = ~(south | north)
        tract = np.where(south, 0, self.num_tracts - 1).astype(np.int64)
        r = ring[inside]
        tract[inside] = self.ring_offsets[r] + self._tract_in_ring(ra_r[inside], r)
        return tract

    def locate(self, ra: npt.ArrayLike, dec: npt.ArrayLike) -> Placement:
        """Tract, patch and pixel of each position (``findTract`` then ``findPatch``).

        Raises
        ------
        ValueError
            If a coordinate is NaN, infinite or has ``|dec| > 90``; the message
            names the first offending value and its index.
        """
        ra_r, dec_r = _validated_radians(ra, dec)
        tract = self._find_tract_radians(ra_r, dec_r)
        cra, cdec = self._centers(tract)
        x, y = _tan_sky_to_pixel(ra_r, dec_r, cra, cdec, self.crpix0, self.pixel_scale_deg)
        cx = np.floor(x + 0.5).astype(np.int64)
        cy = np.floor(y + 0.5).astype(np.int64)
        size = self.config.patch_inner
        # A position always lies well inside its own tract (the tract box is larger than
        # the ring cell); the clip only guards against a far-fetched custom geometry.
        px = np.clip(cx // size, 0, self.num_patches - 1)
        py = np.clip(cy // size, 0, self.num_patches - 1)
        return Placement(
            tract=tract,
            patch=py * self.num_patches + px,
            patch_x=px,
            patch_y=py,
            x=x,
            y=y,
            center_x=cx,
            center_y=cy,
        )

    def find_all_tracts(self, ra: float, dec: float) -> list[int]:
        """Every tract whose box contains the position (``findAllTracts``).

        Checks the nearest tract and its two neighbours in the position's ring and
        the rings on either side, then both polar caps, in that order.
        """
        ra_r, dec_r = _validated_radians(ra, dec)
        ring = int(self._ring_of(dec_r)[0])
        candidates: list[int] = []
        for r in (ring - 1, ring, ring + 1):
            if not 0 <= r < self.config.num_rings:
                continue
            n = int(self.ring_counts[r])
            j = int(self._tract_in_ring(ra_r, np.array([r]))[0])
            candidates += [int(self.ring_offsets[r]) + (t % n) for t in (j - 1, j, j + 1)]
        candidates += [0, self.num_tracts - 1]
        unique = list(dict.fromkeys(candidates))
        cra, cdec = self._centers(np.asarray(unique))
        x, y = _tan_sky_to_pixel(
            np.repeat(ra_r, len(unique)),
            np.repeat(dec_r, len(unique)),
            cra,
            cdec,
            self.crpix0,
            self.pixel_scale_deg,
        )
        with np.errstate(invalid="ignore"):
            ix, iy = np.floor(x + 0.5), np.floor(y + 0.5)
            ok = (ix >= 0) & (ix < self.tract_dim) & (iy >= 0) & (iy < self.tract_dim)
        return [t for t, good in zip(unique, ok, strict=True) if good]

    def find_all_patches(self, ra: float, dec: float) -> list[tuple[int, int]]:
        """Every (tract, patch) whose outer box contains the position."""
        out: list[tuple[int, int]] = []
        size, border = self.config.patch_inner, self.config.patch_border
        for tract in self.find_all_tracts(ra, dec):
            x, y = self.sky_to_pixel([tract], [ra], [dec])
            ix, iy = math.floor(x[0] + 0.5), math.floor(y[0] + 0.5)
            xs = _patch_range(ix, size, border, self.num_patches)
            ys = _patch_range(iy, size, border, self.num_patches)
            out += [(tract, py * self.num_patches + px) for py in ys for px in xs]
        return out

    def cutout_side(self, size: float, unit: str | None) -> int:
        """Cutout side in pixels by the tutorial's rule.

        ``int(size / pixel_scale)`` for an angular size (``unit`` an astropy angle
        unit), or ``int(size)`` pixels when ``unit`` is None.
        """
        if unit is None:
            side = int(size)
        else:
            from astropy import units as u

            arcsec = (size * u.Unit(unit)).to_value(u.arcsec)
            side = int(arcsec / self.effective_pixel_scale_arcsec)
        if side < 1:
            raise ValueError(f"cutout size {size}{unit or ''} is less than one pixel")
        return side


def _patch_range(p: int, size: int, border: int, npatch: int) -> range:
    """Indices of the patches whose outer box [i*size - border, (i+1)*size + border)
    contains integer pixel ``p``."""
    lo = max(0, (p - size - border) // size + 1)
    hi = min(npatch - 1, (p + border) // size)
    return range(lo, hi + 1)


def _validated_radians(ra: npt.ArrayLike, dec: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Degrees to radians, RA wrapped to [0, 2 pi); reject NaN, inf, |dec| > 90."""
    try:
        ra_a = np.atleast_1d(np.asarray(ra, dtype=np.float64))
        dec_a = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"coordinates must be numbers (degrees): {exc}") from exc
    if ra_a.shape != dec_a.shape:
        raise ValueError(f"ra and dec differ in shape: {ra_a.shape} vs {dec_a.shape}")
    for name, arr in (("ra", ra_a), ("dec", dec_a)):
        bad = ~np.isfinite(arr)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name} must be finite, got {float(arr[i])} at index {i}")
    bad = np.abs(dec_a) > 90.0
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"dec must be within [-90, 90] degrees, got {float(dec_a[i])} at index {i}"
        )
    return np.mod(ra_a * _DEG, 2 * math.pi), dec_a * _DEG


def _tan_sky_to_pixel(
    ra: FloatArray,
    dec: FloatArray,
    ra0: FloatArray,
    dec0: FloatArray,
    crpix0: float,
    scale_deg: float,
) -> tuple[FloatArray, FloatArray]:
    """Gnomonic projection about (ra0, dec0) to 0-based pixels, CD = [[-s,0],[0,s]]."""
    dra = ra - ra0
    cos_dec, sin_dec = np.cos(dec), np.sin(dec)
    cos_dec0, sin_dec0 = np.cos(dec0), np.sin(dec0)
    cos_dra = np.cos(dra)
    cos_c = sin_dec0 * sin_dec + cos_dec0 * cos_dec * cos_dra
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = cos_dec * np.sin(dra) / cos_c
        eta = (cos_dec0 * sin_dec - sin_dec0 * cos_dec * cos_dra) / cos_c
        far = cos_c <= 0
        flip = _lonpole_sign(dec0)
        xi = np.where(far, np.nan, xi * flip)
        eta = np.where(far, np.nan, eta * flip)
    k = 1.0 / (_DEG * scale_deg)
    return crpix0 - xi * k, crpix0 + eta * k


def _tan_pixel_to_sky(
    x: FloatArray,
    y: FloatArray,
    ra0: FloatArray | float,
    dec0: FloatArray | float,
    crpix0: float,
    scale_deg: float,
) -> tuple[FloatArray, FloatArray]:
    """Inverse of :func:`_tan_sky_to_pixel`; returns radians (RA not wrapped)."""
    k = _DEG * scale_deg
    flip = _lonpole_sign(dec0)
    xi = -(x - crpix0) * k * flip
    eta = (y - crpix0) * k * flip
    cos_dec0, sin_dec0 = np.cos(dec0), np.sin(dec0)
    den = cos_dec0 - eta * sin_dec0
    dec = np.arctan2(sin_dec0 + eta * cos_dec0, np.hypot(xi, den))
    ra = ra0 + np.arctan2(xi, den)
    return ra, dec


def _lonpole_sign(dec0: FloatArray | float) -> FloatArray:
    """-1 where the projection centre is the north pole, else +1.

    The tract WCS has no LONPOLE card, so the FITS default applies: 180 deg, except
    0 deg when the centre's Dec is >= 90 (the north cap tract). LONPOLE 0 turns the
    native frame half a turn, which negates both projection-plane axes.
    """
    return np.where(np.asarray(dec0) >= 0.5 * math.pi, -1.0, 1.0)
