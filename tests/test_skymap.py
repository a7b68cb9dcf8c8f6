"""Tests for :mod:`harvester.skymap` against the ``lsst_cells_v1`` specification.

Every expected value comes either from the specification
(``/work/shared/design/skymap.md``, quoted by section) or from ``_Ref`` below: a
small, deliberately naive scalar re-implementation of sections 2, 4, 6 and 7 written
from the specification alone. It uses plain ``math`` and one position at a time,
with astropy (``SkyCoord.directional_offset_by`` and ``astropy.wcs.WCS``) doing all
sphere and projection work; it shares no code with the module under test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS

from harvester.skymap import PatchBox, SkyMap, SkyMapConfig

# --------------------------------------------------------------------------------------
# Independent scalar reference (spec sections 2, 4, 6, 7)
# --------------------------------------------------------------------------------------

TWO_PI = 2.0 * math.pi


class _Ref:
    """Rings sky map per the spec, scalar, one position at a time."""

    def __init__(
        self,
        num_rings: int = 120,
        pixel_scale_arcsec: float = 0.2,
        overlap_deg: float = 1.0 / 60.0,
        patch_inner: int = 3000,
        patch_border: int = 200,
        ra_start_deg: float = 0.0,
    ) -> None:
        self.num_rings = num_rings
        self.scale_deg = pixel_scale_arcsec / 3600.0
        self.overlap_deg = overlap_deg
        self.patch_inner = patch_inner
        self.patch_border = patch_border
        self.ra_start = math.radians(ra_start_deg)
        # Section 2: ring height, tracts per ring (edge nearer the equator).
        self.delta = math.pi / (num_rings + 1)
        self.counts: list[int] = []
        for i in range(num_rings):
            start = -math.pi / 2 + (i + 0.5) * self.delta
            stop = -math.pi / 2 + (i + 1.5) * self.delta
            d = min(abs(start), abs(stop))
            self.counts.append(math.floor(TWO_PI * math.cos(d) / self.delta) + 1)
        self.num_tracts = sum(self.counts) + 2
        self.first_id: list[int] = []
        acc = 1
        for n in self.counts:
            self.first_id.append(acc)
            acc += n
        self.float_half, self.crpix0, self.npatch = self._tract_geometry()
        self.dim = self.npatch * patch_inner
        self._wcs_cache: dict[int, WCS] = {}
        self._all_tracts: dict[tuple[float, float], list[int]] = {}

    # Section 4, through astropy: offsets along four bearings, projected with a
    # CRPIX=(0, 0) WCS, Box2I EXPAND, then grown to a whole number of patches.
    def _tract_geometry(self) -> tuple[float, int, int]:
        radius = math.degrees(self.delta / 2) + self.overlap_deg
        w = self._make_wcs(0.0, 0.0, 0.0)
        centre = SkyCoord(0.0 * u.deg, 0.0 * u.deg, frame="icrs")
        xs, ys = [], []
        for pa in (0.0, 90.0, 180.0, 270.0):
            c = centre.directional_offset_by(pa * u.deg, radius * u.deg)
            x, y = w.all_world2pix([[c.ra.deg, c.dec.deg]], 0)[0]
            xs.append(float(x))
            ys.append(float(y))
        lo_f, hi_f = min(*xs, *ys), max(*xs, *ys)
        lo = math.ceil(lo_f - 0.5)
        hi = math.floor(hi_f + 0.5)
        dim = hi - lo + 1
        npatch = math.ceil(dim / self.patch_inner)
        extra = npatch * self.patch_inner - dim
        lo -= extra // 2
        return max(-lo_f, hi_f), -lo, npatch

    def _make_wcs(self, ra_deg: float, dec_deg: float, crpix0: float) -> WCS:
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [ra_deg, dec_deg]
        w.wcs.crpix = [crpix0 + 1.0, crpix0 + 1.0]  # FITS is 1-based
        s = self.scale_deg
        w.wcs.cd = [[-s, 0.0], [0.0, s]]
        w.wcs.radesys = "ICRS"
        w.wcs.set()
        return w

    # Section 2: id <-> (ring, j), centres.
    def ring_of_id(self, tract: int) -> tuple[int, int]:
        if tract == 0:
            return -1, 0
        if tract == self.num_tracts - 1:
            return self.num_rings, 0
        ring, rem = 0, tract - 1
        while rem >= self.counts[ring]:
            rem -= self.counts[ring]
            ring += 1
        return ring, rem

    def center_deg(self, tract: int) -> tuple[float, float]:
        ring, j = self.ring_of_id(tract)
        if ring == -1:
            return 0.0, -90.0
        if ring == self.num_rings:
            return 0.0, 90.0
        ra = (self.ra_start + TWO_PI * j / self.counts[ring]) % TWO_PI
        dec = -math.pi / 2 + (ring + 1) * self.delta
        return math.degrees(ra), math.degrees(dec)

    def wcs(self, tract: int) -> WCS:
        if tract not in self._wcs_cache:
            ra, dec = self.center_deg(tract)
            self._wcs_cache[tract] = self._make_wcs(ra, dec, self.crpix0)
        return self._wcs_cache[tract]

    # Section 6.
    def ring_of_dec(self, dec_deg: float) -> int:
        dec = math.radians(dec_deg)
        first = -math.pi / 2 + self.delta / 2
        if dec < first:
            return -1
        if dec > -first:
            return self.num_rings
        return min(math.floor((dec - first) / self.delta), self.num_rings)

    def tract_in_ring(self, ra_deg: float, ring: int) -> int:
        n = self.counts[ring]
        ra = math.radians(ra_deg) % TWO_PI
        j = math.floor(((ra - self.ra_start) % TWO_PI) / (TWO_PI / n) + 0.5)
        return 0 if j == n else j

    def find_tract(self, ra_deg: float, dec_deg: float) -> int:
        ring = self.ring_of_dec(dec_deg)
        if ring == -1:
            return 0
        if ring == self.num_rings:
            return self.num_tracts - 1
        return self.first_id[ring] + self.tract_in_ring(ra_deg, ring)

    def pixel(self, tract: int, ra_deg: float, dec_deg: float) -> tuple[float, float]:
        x, y = self.wcs(tract).all_world2pix([[ra_deg, dec_deg]], 0)[0]
        return float(x), float(y)

    def center_pixel(self, tract: int, ra_deg: float, dec_deg: float) -> tuple[int, int]:
        x, y = self.pixel(tract, ra_deg, dec_deg)
        return math.floor(x + 0.5), math.floor(y + 0.5)

    # Section 7.
    def locate(self, ra_deg: float, dec_deg: float) -> tuple[int, int, int, int, float, float]:
        tract = self.find_tract(ra_deg, dec_deg)
        x, y = self.pixel(tract, ra_deg, dec_deg)
        cx, cy = math.floor(x + 0.5), math.floor(y + 0.5)
        if not (0 <= cx < self.dim and 0 <= cy < self.dim):
            raise LookupError(f"({ra_deg}, {dec_deg}) outside its own tract {tract}")
        px, py = int(cx / self.patch_inner), int(cy / self.patch_inner)
        return tract, self.npatch * py + px, cx, cy, x, y

    # Section 6, findAllTracts, and the patch outer boxes containing the point.
    def contains(self, tract: int, ra_deg: float, dec_deg: float, angle_deg: float) -> bool:
        """Whether the point, ``angle_deg`` from the tract centre, is in the tract."""
        if angle_deg >= 89.0:  # far side of the tangent plane: not in this tract
            return False
        cx, cy = self.center_pixel(tract, ra_deg, dec_deg)
        return 0 <= cx < self.dim and 0 <= cy < self.dim

    def find_all_tracts(self, ra_deg: float, dec_deg: float) -> list[int]:
        key = (ra_deg, dec_deg)
        if key not in self._all_tracts:  # find_all_patches asks again for the same point
            self._all_tracts[key] = self._find_all_tracts(ra_deg, dec_deg)
        return list(self._all_tracts[key])

    def _find_all_tracts(self, ra_deg: float, dec_deg: float) -> list[int]:
        ring = self.ring_of_dec(dec_deg)
        cands: list[int] = []
        for r in (ring - 1, ring, ring + 1):
            if not 0 <= r < self.num_rings:
                continue
            j = self.tract_in_ring(ra_deg, r)
            n = self.counts[r]
            cands += [self.first_id[r] + (t % n) for t in (j - 1, j, j + 1)]
        cands += [0, self.num_tracts - 1]
        cands = list(dict.fromkeys(cands))
        # Angles from every candidate's centre to the point, in one astropy call.
        ra0, dec0 = zip(*(self.center_deg(t) for t in cands), strict=True)
        angles = SkyCoord(np.array(ra0) * u.deg, np.array(dec0) * u.deg).separation(
            SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
        )
        return [
            t
            for t, a in zip(cands, angles.deg, strict=True)
            if self.contains(t, ra_deg, dec_deg, float(a))
        ]

    def find_all_patches(self, ra_deg: float, dec_deg: float) -> list[tuple[int, int]]:
        out = []
        for tract in self.find_all_tracts(ra_deg, dec_deg):
            cx, cy = self.center_pixel(tract, ra_deg, dec_deg)
            for py in range(self.npatch):
                for px in range(self.npatch):
                    x0 = px * self.patch_inner - self.patch_border
                    y0 = py * self.patch_inner - self.patch_border
                    x1 = (px + 1) * self.patch_inner + self.patch_border
                    y1 = (py + 1) * self.patch_inner + self.patch_border
                    if x0 <= cx < x1 and y0 <= cy < y1:
                        out.append((tract, self.npatch * py + px))
        return out


REF = _Ref()
SKYMAP = SkyMap()

CUSTOM_KW: dict[str, Any] = {
    "num_rings": 120,
    "pixel_scale_arcsec": 20.0,
    "patch_inner": 100,
    "patch_border": 20,
}
CUSTOM_REF = _Ref(num_rings=120, pixel_scale_arcsec=20.0, patch_inner=100, patch_border=20)
# A second, odder geometry: fewer rings, a non-zero RA start, larger overlap.
ODD_KW: dict[str, Any] = {
    "num_rings": 31,
    "pixel_scale_arcsec": 30.0,
    "tract_overlap_deg": 0.5,
    "patch_inner": 250,
    "patch_border": 16,
    "ra_start_deg": 7.25,
}
ODD_REF = _Ref(
    num_rings=31,
    pixel_scale_arcsec=30.0,
    overlap_deg=0.5,
    patch_inner=250,
    patch_border=16,
    ra_start_deg=7.25,
)

REF_RA, REF_DEC = 53.318792, -27.844306
HALF_RING_DEG = 90.0 / 121.0  # Δ/2 in degrees


def _sphere(n: int, seed: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Uniform random positions on the sphere, plus a share near the poles."""
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    k = max(n // 20, 4)
    dec[:k] = rng.uniform(-90.0, -86.0, k)
    dec[k : 2 * k] = rng.uniform(86.0, 90.0, k)
    return ra, dec


def _separation_deg(
    ra1: npt.ArrayLike, dec1: npt.ArrayLike, ra2: npt.ArrayLike, dec2: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Angular separation (deg) via unit-vector chords; accurate at tiny angles."""
    r1, d1, r2, d2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    v1 = np.stack([np.cos(d1) * np.cos(r1), np.cos(d1) * np.sin(r1), np.sin(d1)])
    v2 = np.stack([np.cos(d2) * np.cos(r2), np.cos(d2) * np.sin(r2), np.sin(d2)])
    chord = np.linalg.norm(v1 - v2, axis=0)
    sep: npt.NDArray[np.float64] = np.degrees(2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0)))
    return sep


def _assert_matches_ref(skymap: SkyMap, ref: _Ref, ra: npt.ArrayLike, dec: npt.ArrayLike) -> None:
    ra = np.atleast_1d(np.asarray(ra, dtype=float))
    dec = np.atleast_1d(np.asarray(dec, dtype=float))
    got = skymap.locate(ra, dec)
    for i in range(ra.size):
        tract, patch, cx, cy, x, y = ref.locate(float(ra[i]), float(dec[i]))
        where = f"position {i}: ({ra[i]!r}, {dec[i]!r})"
        assert int(got.tract[i]) == tract, where
        assert int(got.patch[i]) == patch, where
        assert (int(got.center_x[i]), int(got.center_y[i])) == (cx, cy), where
        assert (int(got.patch_x[i]), int(got.patch_y[i])) == (
            patch % ref.npatch,
            patch // ref.npatch,
        ), where
        assert abs(float(got.x[i]) - x) < 1e-6, where
        assert abs(float(got.y[i]) - y) < 1e-6, where


# --------------------------------------------------------------------------------------
# The reference itself reproduces the spec's published numbers
# --------------------------------------------------------------------------------------


def test_reference_implementation_reproduces_spec_numbers() -> None:
    assert REF.num_tracts == 18938
    assert REF.counts[:3] == [10, 16, 22]
    assert REF.counts[-3:] == [22, 16, 10]
    assert REF.counts[59] == REF.counts[60] == 243
    assert REF.counts[41] == 217
    assert REF.float_half == pytest.approx(13689.2336, abs=1e-3)  # section 4, step 2
    assert (REF.crpix0, REF.npatch, REF.dim) == (14999, 10, 30000)
    tract, patch, *_ = REF.locate(REF_RA, REF_DEC)
    assert (tract, patch) == (5063, 33)
    assert REF.ring_of_id(5063) == (41, 32)


# --------------------------------------------------------------------------------------
# Section 9: the DP1 reference point
# --------------------------------------------------------------------------------------


def test_dp1_reference_point() -> None:
    p = SKYMAP.locate(REF_RA, REF_DEC)
    assert len(p) == 1
    assert int(p.tract[0]) == 5063
    assert int(p.patch[0]) == 33
    assert (int(p.patch_x[0]), int(p.patch_y[0])) == (3, 3)
    assert SKYMAP.patch_outer_box(33) == PatchBox(8800, 8800, 12200, 12200)
    assert SKYMAP.patch_outer_box(33).width == SKYMAP.patch_outer_box(33).height == 3400
    assert SKYMAP.patch_inner_box(33) == PatchBox(9000, 9000, 12000, 12000)
    ra, dec = SKYMAP.tract_center(5063)
    assert ra == pytest.approx(53.0875576037, abs=1e-9)
    assert dec == pytest.approx(-27.5206611570, abs=1e-9)
    assert SKYMAP.tract_ring(5063) == (41, 32)
    assert int(SKYMAP.ring_counts[41]) == 217
    assert int(SKYMAP.find_tract(REF_RA, REF_DEC)[0]) == 5063
    _assert_matches_ref(SKYMAP, REF, REF_RA, REF_DEC)


# --------------------------------------------------------------------------------------
# Section 2: rings, tract ids and centres
# --------------------------------------------------------------------------------------


def test_tract_count_and_ring_counts() -> None:
    assert SKYMAP.num_tracts == 18938
    counts = [int(c) for c in SKYMAP.ring_counts]
    assert len(counts) == 120
    assert counts[:3] == [10, 16, 22]
    assert counts[-3:] == [22, 16, 10]
    assert counts[59] == counts[60] == 243
    assert counts[41] == 217
    assert counts == REF.counts
    assert counts == counts[::-1]
    assert sum(counts) + 2 == 18938


def test_tract_id_order_and_reverse_mapping() -> None:
    assert SKYMAP.tract_ring(0) == (-1, 0)
    assert SKYMAP.tract_ring(1) == (0, 0)
    assert SKYMAP.tract_ring(10) == (0, 9)
    assert SKYMAP.tract_ring(11) == (1, 0)
    assert SKYMAP.tract_ring(18936) == (119, 9)
    assert SKYMAP.tract_ring(18937) == (120, 0)
    for tract in range(SKYMAP.num_tracts):
        assert SKYMAP.tract_ring(tract) == REF.ring_of_id(tract), tract
    for bad in (-1, 18938):
        with pytest.raises(ValueError):
            SKYMAP.tract_ring(bad)


def test_tract_centers() -> None:
    assert SKYMAP.tract_center(0) == (0.0, -90.0)
    assert SKYMAP.tract_center(18937) == (0.0, 90.0)
    tracts = [*range(0, 40), *range(2000, 18938, 97), *range(18900, 18938)]
    for tract in tracts:
        ra, dec = SKYMAP.tract_center(tract)
        rra, rdec = REF.center_deg(tract)
        assert 0.0 <= ra < 360.0
        assert ra == pytest.approx(rra, abs=1e-10), tract
        assert dec == pytest.approx(rdec, abs=1e-10), tract
    # Ring 0 tract j is at RA 360 j / 10 and Dec -90 + Δ.
    for j in range(10):
        ra, dec = SKYMAP.tract_center(1 + j)
        assert ra == pytest.approx(36.0 * j, abs=1e-10)
        assert dec == pytest.approx(-90.0 + 180.0 / 121.0, abs=1e-10)


# --------------------------------------------------------------------------------------
# Sections 3-5: tract WCS, tract box, patches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tract", [0, 1, 5063, 9400, 18936, 18937])
def test_tract_wcs(tract: int) -> None:
    w = SKYMAP.tract_wcs(tract)
    assert list(w.wcs.ctype) == ["RA---TAN", "DEC--TAN"]
    assert np.array_equal(w.wcs.crpix, [15000.0, 15000.0])
    s = 0.2 / 3600.0
    np.testing.assert_allclose(w.pixel_scale_matrix, [[-s, 0.0], [0.0, s]], rtol=0, atol=1e-18)
    np.testing.assert_allclose(w.wcs.crval, REF.center_deg(tract), rtol=0, atol=1e-10)
    # The tract centre is at 0-based pixel (14999, 14999).
    x, y = w.all_world2pix([REF.center_deg(tract)], 0)[0]
    assert x == pytest.approx(14999.0, abs=1e-6)
    assert y == pytest.approx(14999.0, abs=1e-6)


def test_tract_wcs_orientation() -> None:
    # RA increases towards -x, Dec towards +y (section 3).
    ra0, dec0 = SKYMAP.tract_center(5063)
    w = SKYMAP.tract_wcs(5063)
    (x1, y1), (x2, y2) = w.all_world2pix([[ra0 + 0.1, dec0], [ra0, dec0 + 0.1]], 0)
    assert x1 < 14999 - 100 and abs(y1 - 14999) < 100
    assert y2 > 14999 + 100 and abs(x2 - 14999) < 1e-6


def test_tract_geometry() -> None:
    assert SKYMAP.crpix0 == 14999.0
    assert SKYMAP.tract_dim == 30000
    assert SKYMAP.num_patches == 10


def test_patch_boxes() -> None:
    inner = [SKYMAP.patch_inner_box(p) for p in range(100)]
    # The inner boxes tile [0, 30000)^2 exactly.
    area = sum(b.width * b.height for b in inner)
    assert area == 30000 * 30000
    for p, b in enumerate(inner):
        px, py = p % 10, p // 10
        assert SKYMAP.patch_index(p) == (px, py)
        assert b == PatchBox(3000 * px, 3000 * py, 3000 * px + 3000, 3000 * py + 3000)
        o = SKYMAP.patch_outer_box(p)
        assert o == PatchBox(b.x0 - 200, b.y0 - 200, b.x1 + 200, b.y1 + 200)
        assert o.width == o.height == 3400
    assert SKYMAP.patch_outer_box(0) == PatchBox(-200, -200, 3200, 3200)
    assert SKYMAP.patch_outer_box(99) == PatchBox(26800, 26800, 30200, 30200)
    box = SKYMAP.patch_inner_box(0)
    assert box.contains(0, 0) and box.contains(2999, 2999)
    assert not box.contains(3000, 0) and not box.contains(-1, 5)
    for bad in (-1, 100):
        with pytest.raises(ValueError):
            SKYMAP.patch_inner_box(bad)


def test_patch_sky_polygon() -> None:
    tract, patch = 5063, 33
    poly = SKYMAP.patch_sky_polygon(tract, patch)
    assert poly.shape == (4, 2)
    w = REF.wcs(tract)
    corners = [(8799.5, 8799.5), (12199.5, 8799.5), (12199.5, 12199.5), (8799.5, 12199.5)]
    expected = w.all_pix2world(corners, 0)
    sep = _separation_deg(poly[:, 0], poly[:, 1], expected[:, 0], expected[:, 1])
    assert np.all(sep < 1e-9)


# --------------------------------------------------------------------------------------
# RA wrap and polar caps
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dec", [-89.0, -60.0, -27.5206611570, 0.0, 0.5, 45.0, 89.0])
def test_ra_wrap(dec: float) -> None:
    a = SKYMAP.locate([359.9999, -0.0001, 0.0001, 360.0, 0.0, -360.0, 720.0], [dec] * 7)
    # 359.9999 and -0.0001 are the same position.
    assert a.tract[0] == a.tract[1]
    assert a.patch[0] == a.patch[1]
    assert (a.center_x[0], a.center_y[0]) == (a.center_x[1], a.center_y[1])
    assert abs(a.x[0] - a.x[1]) < 1e-6 and abs(a.y[0] - a.y[1]) < 1e-6
    # 360, 0, -360 and 720 are all the same position.
    for k in (4, 5, 6):
        assert a.tract[3] == a.tract[k]
        assert a.patch[3] == a.patch[k]
        assert abs(a.x[3] - a.x[k]) < 1e-6 and abs(a.y[3] - a.y[k]) < 1e-6
    # All of them are in the ring's first tract (or the cap) since RA 0 is a centre.
    ring = REF.ring_of_dec(dec)
    home = REF.first_id[ring] if 0 <= ring < 120 else REF.find_tract(0.0, dec)
    assert set(a.tract.tolist()) == {home}
    # 0.0001 and -0.0001 lie on either side of the tract centre in x.
    if 0 <= ring < 120:
        assert a.x[2] < a.x[3] < a.x[1]
    _assert_matches_ref(SKYMAP, REF, [359.9999, -0.0001, 0.0001, 360.0, 0.0], [dec] * 5)


def test_ra_wrap_float_edge() -> None:
    # A negative RA so small that it wraps to exactly 2 pi must land in tract 0 of
    # its ring, not past the end of the ring.
    p = SKYMAP.locate([-1e-20, 360.0 - 1e-13, 1e-20], [10.0, 10.0, 10.0])
    first = REF.first_id[REF.ring_of_dec(10.0)]
    assert p.tract.tolist() == [first, first, first]


@pytest.mark.parametrize("ra", [0.0, 33.3, 123.456, 271.0, 359.999])
def test_polar_caps(ra: float) -> None:
    south = SKYMAP.locate([ra, ra], [-89.9, -90.0])
    north = SKYMAP.locate([ra, ra], [89.9, 90.0])
    assert south.tract.tolist() == [0, 0]
    assert north.tract.tolist() == [18937, 18937]
    _assert_matches_ref(SKYMAP, REF, [ra, ra, ra, ra], [-89.9, -90.0, 89.9, 90.0])
    # The pole itself is the tract centre pixel.
    for p in (south, north):
        assert abs(p.x[1] - 14999.0) < 1e-6 and abs(p.y[1] - 14999.0) < 1e-6
        assert (int(p.center_x[1]), int(p.center_y[1])) == (14999, 14999)
        assert int(p.patch[1]) == 44


def test_cap_tract_orientation() -> None:
    """Cap tracts are plain FITS TAN WCSs at CRVAL (0, ±90) (section 3).

    With no LONPOLE card, FITS paper II (and AST's FitsChan, used by afw
    ``makeSkyWcs``) default LONPOLE to 0 when CRVAL2 >= theta0 = 90 (north cap)
    and to 180 otherwise (south cap). Worked by hand, a point at Dec ±89.9 is
    R = tan(0.1°) / (0.2"/px) = 1800.0018 px from the centre pixel (14999, 14999):
    south cap: (x, y) = c + R (-sin RA,  cos RA)
    north cap: (x, y) = c + R ( sin RA,  cos RA)
    """
    r = math.degrees(math.tan(math.radians(0.1))) / (0.2 / 3600.0)
    assert r == pytest.approx(1800.0018, abs=1e-4)
    cases = [
        # (ra, dec, tract, patch, center_x, center_y)
        (0.0, -89.9, 0, 54, 14999, 16799),
        (90.0, -89.9, 0, 44, 13199, 14999),
        (0.0, 89.9, 18937, 54, 14999, 16799),
        (90.0, 89.9, 18937, 45, 16799, 14999),
        (180.0, 89.9, 18937, 44, 14999, 13199),
    ]
    for ra, dec, tract, patch, cx, cy in cases:
        p = SKYMAP.locate(ra, dec)
        got = (int(p.tract[0]), int(p.patch[0]), int(p.center_x[0]), int(p.center_y[0]))
        assert got == (tract, patch, cx, cy), (ra, dec)
        # The module's own tract WCS must agree with its own pixel lookup.
        x, y = SKYMAP.tract_wcs(tract).all_world2pix([[ra, dec]], 0)[0]
        assert abs(x - p.x[0]) < 1e-6 and abs(y - p.y[0]) < 1e-6, (ra, dec)


@pytest.mark.parametrize("ra", [0.0, 17.9, 18.0, 18.1, 200.0, 359.99])
def test_cap_boundaries(ra: float) -> None:
    edge = -90.0 + HALF_RING_DEG  # -89.2562 (section 2)
    eps = 1e-9
    s = SKYMAP.locate([ra, ra], [edge - eps, edge + eps])
    n = SKYMAP.locate([ra, ra], [-edge + eps, -edge - eps])
    assert int(s.tract[0]) == 0
    assert 1 <= int(s.tract[1]) <= 10  # ring 0
    assert int(n.tract[0]) == 18937
    assert 18927 <= int(n.tract[1]) <= 18936  # ring 119
    assert int(s.tract[1]) == REF.find_tract(ra, edge + eps)
    assert int(n.tract[1]) == REF.find_tract(ra, -edge - eps)
    _assert_matches_ref(
        SKYMAP, REF, [ra] * 6, [edge - eps, edge, edge + eps, -edge - eps, -edge, -edge + eps]
    )


# --------------------------------------------------------------------------------------
# Section 6: exact boundaries
# --------------------------------------------------------------------------------------


def test_ring_boundaries() -> None:
    eps = 1e-9
    ras, decs = [], []
    for k in range(121):  # boundary k: between ring k-1 (or cap) and ring k (or cap)
        edge = -90.0 + (k + 0.5) * 180.0 / 121.0
        for ra in (0.0, 47.123, 180.0, 359.5):
            below = REF.find_tract(ra, edge - eps)
            above = REF.find_tract(ra, edge + eps)
            assert REF.ring_of_dec(edge - eps) == k - 1
            assert REF.ring_of_dec(edge + eps) == k
            got = SKYMAP.find_tract([ra, ra, ra], [edge - eps, edge, edge + eps])
            assert int(got[0]) == below, (k, ra)
            assert int(got[2]) == above, (k, ra)
            assert int(got[1]) in (below, above), (k, ra)
            assert int(got[1]) == REF.find_tract(ra, edge), (k, ra)
            ras += [ra, ra, ra]
            decs += [edge - eps, edge, edge + eps]
    _assert_matches_ref(SKYMAP, REF, ras, decs)


@pytest.mark.parametrize("ring", [0, 1, 2, 20, 41, 59, 60, 100, 117, 118, 119])
def test_tract_ra_boundaries(ring: int) -> None:
    n = REF.counts[ring]
    dec_center = -90.0 + (ring + 1) * 180.0 / 121.0
    eps = 1e-9
    ras, decs = [], []
    for j in range(n):
        mid = 360.0 * (j + 0.5) / n
        lo_id = REF.first_id[ring] + j
        hi_id = REF.first_id[ring] + (j + 1) % n
        for dec in (dec_center, dec_center - 0.7, dec_center + 0.7):
            got = SKYMAP.find_tract([mid - eps, mid, mid + eps], [dec] * 3)
            assert int(got[0]) == lo_id, (j, dec)
            assert int(got[2]) == hi_id, (j, dec)
            assert int(got[1]) in (lo_id, hi_id)
            assert int(got[1]) == REF.find_tract(mid, dec), (j, dec)
            ras += [mid - eps, mid, mid + eps]
            decs += [dec] * 3
    _assert_matches_ref(SKYMAP, REF, ras, decs)


def test_midpoint_rounds_half_up() -> None:
    # Ring 0 has 10 tracts; RA 18 deg is exactly half way between tracts 0 and 1
    # (18/36 = 0.5 is exact in binary), so floor(0.5 + 0.5) picks tract 1.
    dec = -90.0 + 180.0 / 121.0
    assert REF.find_tract(18.0, dec) == 2
    assert int(SKYMAP.find_tract(18.0, dec)[0]) == 2
    # 342 deg is half way between tract 9 and tract 0 (wrap).
    assert REF.find_tract(342.0, dec) == 1
    assert int(SKYMAP.find_tract(342.0, dec)[0]) == 1


# --------------------------------------------------------------------------------------
# Section 7 and pixel transforms over the whole sky
# --------------------------------------------------------------------------------------


def test_random_positions_match_reference() -> None:
    ra, dec = _sphere(3000, seed=20250820)
    _assert_matches_ref(SKYMAP, REF, ra, dec)


def test_find_tract_matches_locate() -> None:
    ra, dec = _sphere(20000, seed=3)
    assert np.array_equal(SKYMAP.find_tract(ra, dec), SKYMAP.locate(ra, dec).tract)


def test_sky_pixel_sky_round_trip() -> None:
    ra, dec = _sphere(20000, seed=11)
    p = SKYMAP.locate(ra, dec)
    x, y = SKYMAP.sky_to_pixel(p.tract, ra, dec)
    assert np.array_equal(x, p.x) and np.array_equal(y, p.y)
    ra2, dec2 = SKYMAP.pixel_to_sky(p.tract, p.x, p.y)
    assert np.all((ra2 >= 0.0) & (ra2 < 360.0))
    sep = _separation_deg(ra, dec, ra2, dec2)
    assert sep.max() < 1e-9


def test_pixels_agree_with_astropy_tract_wcs() -> None:
    ra, dec = _sphere(400, seed=5)
    p = SKYMAP.locate(ra, dec)
    for i in range(ra.size):
        w = SKYMAP.tract_wcs(int(p.tract[i]))
        x, y = w.all_world2pix([[ra[i], dec[i]]], 0)[0]
        assert abs(x - p.x[i]) < 1e-6 and abs(y - p.y[i]) < 1e-6, i
    # Neighbouring tracts too, including points well off the tract centre.
    for i in range(0, ra.size, 10):
        for t in SKYMAP.find_all_tracts(float(ra[i]), float(dec[i])):
            w = SKYMAP.tract_wcs(t)
            xs, ys = SKYMAP.sky_to_pixel([t], [ra[i]], [dec[i]])
            x, y = w.all_world2pix([[ra[i], dec[i]]], 0)[0]
            assert abs(x - xs[0]) < 1e-6 and abs(y - ys[0]) < 1e-6


def test_pixel_to_sky_agrees_with_astropy() -> None:
    rng = np.random.default_rng(8)
    for tract in (0, 1, 5063, 9400, 18937):
        x = rng.uniform(-500.0, 30500.0, 50)
        y = rng.uniform(-500.0, 30500.0, 50)
        ra, dec = SKYMAP.pixel_to_sky(np.full(50, tract), x, y)
        exp = REF.wcs(tract).all_pix2world(np.stack([x, y], axis=1), 0)
        assert _separation_deg(ra, dec, exp[:, 0], exp[:, 1]).max() < 1e-9


def test_center_pixel_in_patch_inner_box() -> None:
    ra, dec = _sphere(100_000, seed=42)
    p = SKYMAP.locate(ra, dec)
    assert np.array_equal(p.center_x, np.floor(p.x + 0.5).astype(np.int64))
    assert np.array_equal(p.center_y, np.floor(p.y + 0.5).astype(np.int64))
    assert np.all((p.center_x >= 0) & (p.center_x < 30000))
    assert np.all((p.center_y >= 0) & (p.center_y < 30000))
    assert np.array_equal(p.patch, 10 * p.patch_y + p.patch_x)
    x0, y0 = 3000 * p.patch_x, 3000 * p.patch_y
    assert np.all((p.center_x >= x0) & (p.center_x < x0 + 3000))
    assert np.all((p.center_y >= y0) & (p.center_y < y0 + 3000))
    assert np.all((p.tract >= 0) & (p.tract < 18938))


def test_scalar_and_array_inputs() -> None:
    p = SKYMAP.locate(REF_RA, REF_DEC)
    q = SKYMAP.locate([REF_RA, 10.0], [REF_DEC, 10.0])
    assert len(p) == 1 and len(q) == 2
    assert p.tract[0] == q.tract[0] and p.x[0] == q.x[0]
    assert SKYMAP.locate([], []).tract.shape == (0,)


# --------------------------------------------------------------------------------------
# findAllTracts / findAllPatches
# --------------------------------------------------------------------------------------


def _overlap_positions() -> list[tuple[float, float]]:
    pts = [(REF_RA, REF_DEC), (0.0, -90.0), (0.0, 90.0), (10.0, -89.0), (200.0, 89.5)]
    # Tract corners and edges, where several tracts overlap.
    for ring in (0, 1, 41, 59, 60, 119):
        n = REF.counts[ring]
        dec_edge = -90.0 + (ring + 1.5) * 180.0 / 121.0
        for j in (0, n // 3, n - 1):
            mid = 360.0 * (j + 0.5) / n
            pts += [(mid, dec_edge), (mid + 0.01, dec_edge - 0.01), (mid, dec_edge - 0.74)]
    ra, dec = _sphere(100, seed=77)
    pts += list(zip(ra.tolist(), dec.tolist(), strict=True))
    return pts


def test_find_all_tracts_and_patches() -> None:
    multi = 0
    for ra, dec in _overlap_positions():
        home = SKYMAP.locate(ra, dec)
        tract, patch = int(home.tract[0]), int(home.patch[0])
        tracts = SKYMAP.find_all_tracts(ra, dec)
        patches = SKYMAP.find_all_patches(ra, dec)
        assert tract in tracts, (ra, dec)
        assert (tract, patch) in patches, (ra, dec)
        assert len(set(tracts)) == len(tracts)
        assert len(set(patches)) == len(patches)
        # Every returned tract box really contains the point (astropy WCS).
        for t in tracts:
            x, y = SKYMAP.tract_wcs(t).all_world2pix([[ra, dec]], 0)[0]
            ix, iy = math.floor(x + 0.5), math.floor(y + 0.5)
            assert 0 <= ix < 30000 and 0 <= iy < 30000, (ra, dec, t)
        # Every returned patch outer box really contains the point.
        for t, pch in patches:
            assert t in tracts
            x, y = SKYMAP.tract_wcs(t).all_world2pix([[ra, dec]], 0)[0]
            ix, iy = math.floor(x + 0.5), math.floor(y + 0.5)
            assert SKYMAP.patch_outer_box(pch).contains(ix, iy), (ra, dec, t, pch)
        # And nothing is missing compared with the spec's algorithm.
        assert sorted(tracts) == sorted(REF.find_all_tracts(ra, dec)), (ra, dec)
        assert sorted(patches) == sorted(REF.find_all_patches(ra, dec)), (ra, dec)
        multi += len(tracts) > 1
    assert multi >= 10  # the corner positions do exercise overlaps


# --------------------------------------------------------------------------------------
# Section 8: pixel scale and cutout sides
# --------------------------------------------------------------------------------------


def _afw_pixel_scale_arcsec(w: WCS, x0: float, y0: float) -> float:
    """afw ``getPixelScale``: sqrt(|ΔX × ΔY|) of unit-vector chord differences."""
    sky = w.all_pix2world([[x0, y0], [x0 + 1.0, y0], [x0, y0 + 1.0]], 0)
    ra, dec = np.radians(sky[:, 0]), np.radians(sky[:, 1])
    v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
    area = np.linalg.norm(np.cross(v[1] - v[0], v[2] - v[0]))
    return math.degrees(math.sqrt(area)) * 3600.0


def test_effective_pixel_scale() -> None:
    s = SKYMAP.effective_pixel_scale_arcsec
    assert 0.2 - 1e-9 < s < 0.2
    for tract in (0, 5063, 9400):
        ref = _afw_pixel_scale_arcsec(REF.wcs(tract), 14999.0, 14999.0)
        assert abs(s - ref) < 1e-9


def test_cutout_side() -> None:
    assert SKYMAP.cutout_side(60, "arcsec") == 300
    assert SKYMAP.cutout_side(1, "arcmin") == 300
    assert SKYMAP.cutout_side(60.0, "arcsec") == 300
    assert SKYMAP.cutout_side(50, None) == 50
    assert SKYMAP.cutout_side(50.9, None) == 50
    assert SKYMAP.cutout_side(10, "arcsec") == 50
    assert SKYMAP.cutout_side(1 / 60, "deg") == 300
    with pytest.raises(ValueError):
        SKYMAP.cutout_side(0.5, None)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------

_BAD = [
    (float("nan"), 10.0, "nan"),
    (10.0, float("nan"), "nan"),
    (float("inf"), 10.0, "inf"),
    (10.0, float("-inf"), "-inf"),
    (10.0, 90.5, "90.5"),
    (10.0, -91.25, "-91.25"),
    (10.0, 1e6, "1000000.0"),
]


@pytest.mark.parametrize(("ra", "dec", "text"), _BAD)
def test_bad_coordinates_raise(ra: float, dec: float, text: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: SKYMAP.locate(ra, dec),
        lambda: SKYMAP.locate([1.0, ra, 2.0], [1.0, dec, 2.0]),
        lambda: SKYMAP.find_tract(ra, dec),
        lambda: SKYMAP.sky_to_pixel([5063], [ra], [dec]),
        lambda: SKYMAP.find_all_tracts(ra, dec),
        lambda: SKYMAP.find_all_patches(ra, dec),
    ]
    for call in calls:
        with pytest.raises(ValueError) as exc:
            call()
        assert text in str(exc.value)


def test_dec_exactly_90_is_valid() -> None:
    p = SKYMAP.locate([0.0, 0.0], [90.0, -90.0])
    assert p.tract.tolist() == [18937, 0]


@pytest.mark.parametrize(
    ("ra", "dec"),
    [("abc", 10.0), (10.0, "north"), (["1.0", "x"], [1.0, 2.0]), ({"a": 1}, 2.0)],
)
def test_non_numeric_raise(ra: Any, dec: Any) -> None:
    # Any: the point is values of the wrong type (str, list of str, dict).
    with pytest.raises(ValueError):
        SKYMAP.locate(ra, dec)
    with pytest.raises(ValueError):
        SKYMAP.find_tract(ra, dec)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        SKYMAP.locate([1.0, 2.0], [1.0, 2.0, 3.0])


# --------------------------------------------------------------------------------------
# Custom geometries
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "ref"), [(CUSTOM_KW, CUSTOM_REF), (ODD_KW, ODD_REF)])
def test_custom_geometry(kw: dict[str, Any], ref: _Ref) -> None:
    m = SkyMap(config=SkyMapConfig(**kw))
    assert [int(c) for c in m.ring_counts] == ref.counts
    assert m.num_tracts == ref.num_tracts
    assert m.crpix0 == float(ref.crpix0)
    assert m.num_patches == ref.npatch
    assert m.tract_dim == ref.dim
    w = m.tract_wcs(3)
    assert np.array_equal(w.wcs.crpix, [ref.crpix0 + 1.0] * 2)
    np.testing.assert_allclose(w.wcs.crval, ref.center_deg(3), rtol=0, atol=1e-10)
    for t in (0, 1, ref.num_tracts // 2, ref.num_tracts - 1):
        assert m.tract_ring(t) == ref.ring_of_id(t)
        tra, tdec = m.tract_center(t)
        rra, rdec = ref.center_deg(t)
        assert _separation_deg(tra, tdec, rra, rdec) < 1e-10
    ra, dec = _sphere(1500, seed=99)
    _assert_matches_ref(m, ref, ra, dec)
    p = m.locate(ra, dec)
    ra2, dec2 = m.pixel_to_sky(p.tract, p.x, p.y)
    assert _separation_deg(ra, dec, ra2, dec2).max() < 1e-9
    size = ref.patch_inner
    assert np.all((p.center_x >= size * p.patch_x) & (p.center_x < size * (p.patch_x + 1)))
    assert np.all((p.center_y >= size * p.patch_y) & (p.center_y < size * (p.patch_y + 1)))
    b = m.patch_outer_box(0)
    assert (b.x0, b.width) == (-ref.patch_border, size + 2 * ref.patch_border)


def test_custom_geometry_values() -> None:
    # Worked by hand from section 4 for 20"/px and 100 px patches:
    # half = 13689.23 / 100 = 136.89 -> [-137, 137], 275 px, 3 patches, extra 25,
    # min -= 12 -> -149.
    m = SkyMap(config=SkyMapConfig(**CUSTOM_KW))
    assert (m.crpix0, m.num_patches, m.tract_dim) == (149.0, 3, 300)
    assert (CUSTOM_REF.crpix0, CUSTOM_REF.npatch) == (149, 3)
