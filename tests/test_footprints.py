"""The footprint index (:mod:`harvester.epochs`) against lsst-sphgeom and astropy.

Footprints are detector pixel boxes put on the sky by astropy TAN WCSs (rotated,
some across RA 0 and next to the south pole); which targets they hold is checked
pair for pair against ``lsst.sphgeom.ConvexPolygon.contains`` (the oracle), and the
coverage of each stamp against the box computed from astropy's own pixel position.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from astropy.wcs import WCS

from harvester.epochs import FootprintIndex, Pairs

sphgeom = pytest.importorskip(
    "lsst.sphgeom", reason="lsst-sphgeom is not installed: pip install 'harvester[butler]'"
)

FloatArray = npt.NDArray[np.float64]
SCALE = 0.2 / 3600.0


def _wcs(ra: float, dec: float, theta_deg: float, w: int, h: int) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(w + 1) / 2, (h + 1) / 2]
    t = math.radians(theta_deg)
    wcs.wcs.cd = np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]]) * SCALE
    wcs.wcs.set()
    return wcs


def _corners(wcs: WCS, w: int, h: int) -> FloatArray:
    x = np.array([-0.5, w - 0.5, w - 0.5, -0.5])
    y = np.array([-0.5, -0.5, h - 0.5, h - 0.5])
    ra, dec = wcs.all_pix2world(x, y, 0)
    out: FloatArray = np.stack([ra % 360.0, dec], axis=1)
    return out


def _field(
    rng: np.random.Generator, n: int, centres: list[tuple[float, float]], w: int, h: int
) -> tuple[list[WCS], FloatArray]:
    """n footprints of w x h pixels, rotated at random, about the given centres."""
    wcss = []
    for i in range(n):
        ra0, dec0 = centres[i % len(centres)]
        dra = rng.uniform(-0.15, 0.15) / max(math.cos(math.radians(dec0)), 0.05)
        ra = (ra0 + dra) % 360.0
        dec = float(np.clip(dec0 + rng.uniform(-0.15, 0.15), -89.95, 89.95))
        wcss.append(_wcs(ra, dec, rng.uniform(0, 360), w, h))
    return wcss, np.array([_corners(c, w, h) for c in wcss])


def _targets(
    rng: np.random.Generator, n: int, centres: list[tuple[float, float]]
) -> tuple[FloatArray, FloatArray]:
    ra = np.empty(n)
    dec = np.empty(n)
    for i in range(n):
        ra0, dec0 = centres[i % len(centres)]
        ra[i] = (ra0 + rng.uniform(-0.4, 0.4) / max(math.cos(math.radians(dec0)), 0.02)) % 360
        dec[i] = np.clip(dec0 + rng.uniform(-0.4, 0.4), -90, 90)
    return ra, dec


def _oracle(corners: npt.ArrayLike, ra: FloatArray, dec: FloatArray) -> set[tuple[int, int]]:
    """(target, footprint) pairs by sphgeom ConvexPolygon.contains (corners as
    (N, 4, 2) degrees or (N, 4, 3) unit vectors)."""
    arr = np.asarray(corners)
    lon, lat = np.radians(ra), np.radians(dec)
    x, y, z = np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)
    out: set[tuple[int, int]] = set()
    for f, poly in enumerate(arr):
        if poly.shape[-1] == 3:
            verts = [sphgeom.UnitVector3d(*map(float, v)) for v in poly]
        else:
            verts = [sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(*map(float, v))) for v in poly]
        inside = np.asarray(sphgeom.ConvexPolygon(verts).contains(x, y, z), dtype=bool)
        out |= {(int(t), f) for t in np.flatnonzero(inside)}
    return out


def _pairs(p: Pairs) -> set[tuple[int, int]]:
    return set(zip(p.target.tolist(), p.image.tolist(), strict=True))


CENTRES = [(53.0, -28.0), (0.05, 10.0), (359.9, -5.0), (120.0, -89.8), (200.0, 60.0)]


@pytest.fixture(scope="module")
def field() -> tuple[list[WCS], FloatArray, FloatArray, FloatArray]:
    rng = np.random.default_rng(11)
    wcss, corners = _field(rng, 250, CENTRES, 1200, 1000)
    ra, dec = _targets(rng, 20_000, CENTRES)
    return wcss, corners, ra, dec


def test_points_inside_equal_sphgeom_pair_for_pair(field: Any) -> None:
    _, corners, ra, dec = field
    index = FootprintIndex(corners, np.full(len(corners), 1200), np.full(len(corners), 1000))
    got = index.query(ra, dec)
    want = _oracle(corners, ra, dec)
    assert len(want) > 3000  # many targets in several footprints, wraps and a pole
    assert _pairs(got) == want
    # The order: grouped by image, each image once.
    images, starts = got.groups()
    assert (np.diff(images) > 0).all() and starts[-1] == len(got)


@pytest.mark.parametrize("cell", [0.02, 0.1, 1.5])
def test_grown_footprints_equal_sphgeom_on_their_corners(field: Any, cell: float) -> None:
    _, corners, ra, dec = field
    n = len(corners)
    index = FootprintIndex(corners, np.full(n, 1200), np.full(n, 1000), cell=cell)
    got = index.query(ra, dec, size=301)
    grown = index.grown_corners(150)
    assert _pairs(got) == _oracle(grown, ra, dec)
    assert len(got) > len(index.query(ra, dec))


def test_growth_moves_every_edge_out_by_the_half_size(field: Any) -> None:
    """Each grown corner lies 150 px (at the footprint's own scale) outside both of
    the edges that meet there: distances to great circles, computed here."""
    _, corners, _, _ = field
    n = len(corners)
    index = FootprintIndex(corners, np.full(n, 1200), np.full(n, 1000))
    grown = index.grown_corners(150)
    lon, lat = np.radians(corners[..., 0]), np.radians(corners[..., 1])
    v = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)
    normals = np.cross(v, np.roll(v, -1, axis=1))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    for k in range(4):
        for edge in (k, (k - 1) % 4):
            d = np.degrees(np.arcsin(np.abs(np.einsum("fd,fd->f", grown[:, k], normals[:, edge]))))
            np.testing.assert_allclose(d, 150 * SCALE, rtol=2e-3)


def test_coverage_is_the_stamp_fraction_on_the_detector(field: Any) -> None:
    """Coverage against the box around astropy's pixel position of each target."""
    wcss, corners, ra, dec = field
    n = len(corners)
    side = 51
    index = FootprintIndex(corners, np.full(n, 1200), np.full(n, 1000))
    got = index.query(ra, dec, size=side)
    exact = np.empty(len(got))
    for img in np.unique(got.image).tolist():
        sel = np.flatnonzero(got.image == img)
        x, y = wcss[img].all_world2pix(ra[got.target[sel]], dec[got.target[sel]], 0)
        x0 = np.floor(x + 0.5).astype(int) - side // 2
        y0 = np.floor(y + 0.5).astype(int) - side // 2
        ox = np.clip(np.minimum(x0 + side, 1200) - np.maximum(x0, 0), 0, None)
        oy = np.clip(np.minimum(y0 + side, 1000) - np.maximum(y0, 0), 0, None)
        exact[sel] = ox * oy / side**2
    partial = exact < 1
    assert partial.sum() > 300 and (exact == 1).sum() > 3000
    # A pure TAN footprint: the index's projective map is exact; only a position
    # within float noise of a half pixel could round the other way.
    assert np.mean(got.coverage == exact.astype(np.float32)) > 0.999
    np.testing.assert_allclose(got.coverage, exact, atol=1.5 / side)


def test_filters_select_what_the_butler_would(field: Any) -> None:
    """Time (half-open overlap, as Timespan OVERLAPS), band and dataset type."""
    _, corners, ra, dec = field
    n = len(corners)
    rng = np.random.default_rng(5)
    begin = 60600 + rng.uniform(0, 30, n)
    end = begin + 30 / 86400
    band = rng.choice(["g", "r", "i"], n)
    kind = rng.choice(["visit_image", "difference_image"], n)
    index = FootprintIndex(
        corners,
        np.full(n, 1200),
        np.full(n, 1000),
        t_begin=begin,
        t_end=end,
        band=band,
        dataset_type=kind,
    )
    everything = index.query(ra, dec)
    # The window ends exactly where footprint j ends (it is in), and begins inside
    # footprint k's exposure (it is in too).
    j = int(np.flatnonzero((begin > 60620) & (band == "g") & (kind == "visit_image"))[0])
    k = int(np.flatnonzero((begin < 60615) & (band == "i") & (kind == "visit_image"))[0])
    t0, t1 = float(begin[k] + 10 / 86400), float(end[j])
    got = index.query(ra, dec, time=(t0, t1), bands=["g", "i"], dataset_types=["visit_image"])
    keep = (begin < t1) & (end > t0) & np.isin(band, ["g", "i"]) & (kind == "visit_image")
    assert keep[j] and keep[k] and 0 < keep.sum() < n
    want = {(t, f) for t, f in _pairs(everything) if keep[f]}
    assert _pairs(got) == want and want
    # A window ending where a timespan begins does not overlap it.
    first = int(np.argmin(begin))
    only = index.query(ra, dec, time=(begin[first] - 1, begin[first]))
    assert first not in set(only.image.tolist())


def test_chunked_queries_give_the_same_pairs(field: Any) -> None:
    _, corners, ra, dec = field
    n = len(corners)
    index = FootprintIndex(corners, np.full(n, 1200), np.full(n, 1000))
    whole = index.query(ra, dec, size=25)
    small = index.query(ra, dec, size=25, chunk=97)
    np.testing.assert_array_equal(whole.target, small.target)
    np.testing.assert_array_equal(whole.image, small.image)
    np.testing.assert_array_equal(whole.coverage, small.coverage)


def test_units_hold_each_image_once_with_its_targets(field: Any) -> None:
    _, corners, ra, dec = field
    n = len(corners)
    pairs = FootprintIndex(corners, np.full(n, 1200), np.full(n, 1000)).query(ra, dec)
    units = list(pairs.units())
    assert len({u.image for u in units}) == len(units) == len(set(pairs.image.tolist()))
    assert {(t, u.image) for u in units for t in u.targets.tolist()} == _pairs(pairs)
    parts = list(pairs.units(max_targets=3))
    assert all(len(u.targets) <= 3 for u in parts)
    assert sum(len(u.targets) for u in parts) == len(pairs)
    counts = pairs.counts(len(ra))
    assert counts.sum() == len(pairs) and counts.shape == (len(ra),)


def test_bad_input_is_named() -> None:
    corners = np.array([[[0, 0], [0.1, 0], [0.1, 0.1], [0, 0.1]]], dtype=float)
    index = FootprintIndex(corners, [100], [100])
    with pytest.raises(ValueError, match="dec must be finite, got nan at index 1"):
        index.query([0.05, 0.05], [0.05, np.nan])
    with pytest.raises(ValueError, match="dec must be within"):
        index.query([0.05], [91.0])
    with pytest.raises(ValueError, match="size must be >= 0"):
        index.query([0.05], [0.05], size=-3)
    with pytest.raises(ValueError, match="no timespans"):
        index.query([0.05], [0.05], time=(0, 1))
    with pytest.raises(ValueError, match=r"corners must have shape \(N, 4, 2\)"):
        FootprintIndex(corners[:, :3], [100], [100])
    with pytest.raises(ValueError, match=r"width must have shape \(1,\)"):
        FootprintIndex(corners, [100, 100], [100])
    with pytest.raises(ValueError, match="positive"):
        FootprintIndex(corners, [0], [100])
    timed = FootprintIndex(corners, [100], [100], t_begin=[1.0], t_end=[2.0])
    with pytest.raises(ValueError, match="t0 <= t1"):
        timed.query([0.05], [0.05], time=(3.0, 1.0))


def test_empty_inputs() -> None:
    none = FootprintIndex(np.zeros((0, 4, 2)), [], [])
    assert len(none.query([1.0], [2.0])) == 0
    corners = np.array([[[0, 0], [0.1, 0], [0.1, 0.1], [0, 0.1]]], dtype=float)
    assert len(FootprintIndex(corners, [100], [100]).query([], [])) == 0
