"""Sky regions (the DALI shapes of SIA ``POS`` and SODA stencils) and their overlap
with the datasets' sky polygons, vectorised over datasets.

Everything works on unit vectors. A dataset polygon is convex with great-circle
edges; a query overlaps it when a vertex of one lies inside the other or an edge of
one crosses an edge of the other (for a ``RANGE`` box, whose Dec edges are small
circles, the crossings with those are solved exactly). Touching counts as overlap.
A cheap bounding-circle test first picks the candidates, so a query over a large
repository does exact work only near its region.

Query polygons follow ``lsst.sphgeom.ConvexPolygon``: the region is the convex hull
of the vertices, whatever their order.

Dependency rule: numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "Circle",
    "Polygon",
    "PolygonSet",
    "Range",
    "Region",
    "circle_boundary",
    "make_circle",
    "make_polygon",
    "make_range",
    "parse_numbers",
    "parse_pos",
    "unit_vectors",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_EPS = 1e-12
_DEG = math.pi / 180.0


def unit_vectors(ra: npt.ArrayLike, dec: npt.ArrayLike) -> FloatArray:
    """Unit vectors (..., 3) of positions in degrees."""
    a = np.radians(np.asarray(ra, dtype=float))
    d = np.radians(np.asarray(dec, dtype=float))
    cd = np.cos(d)
    return np.stack([cd * np.cos(a), cd * np.sin(a), np.sin(d)], axis=-1)


def _radec(v: FloatArray) -> tuple[FloatArray, FloatArray]:
    ra = np.degrees(np.arctan2(v[..., 1], v[..., 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(v[..., 2], -1.0, 1.0)))
    return ra, dec


def _normalize(v: FloatArray) -> FloatArray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    out: FloatArray = v / np.where(n > 0, n, 1.0)
    return out


def _angle(a: FloatArray, b: FloatArray) -> FloatArray:
    """Angle in radians between unit vectors (broadcast)."""
    cross = np.linalg.norm(np.cross(a, b), axis=-1)
    out: FloatArray = np.arctan2(cross, np.sum(a * b, axis=-1))
    return out


@dataclass(frozen=True)
class PolygonSet:
    """N convex spherical polygons with V vertices each (the datasets' regions).

    Attributes
    ----------
    vertices : ndarray (N, V, 3)
    edges : ndarray (N, V, 3)
        ``v[k] x v[k+1]``, as ordered.
    inward : ndarray (N, V, 3)
        ``edges`` signed so that the interior has a positive dot product.
    centers : ndarray (N, 3)
        Normalised vertex mean, the centre of each bounding circle.
    radii : ndarray (N,)
        Bounding-circle radius in radians.
    """

    vertices: FloatArray
    edges: FloatArray
    inward: FloatArray
    centers: FloatArray
    radii: FloatArray

    @classmethod
    def from_radec(cls, polygons: npt.ArrayLike) -> PolygonSet:
        """From an array (N, V, 2) of (RA, Dec) corners in degrees."""
        arr = np.asarray(polygons, dtype=float)
        if arr.ndim != 3 or arr.shape[2] != 2 or arr.shape[1] < 3:
            if arr.size == 0:
                arr = np.zeros((0, 4, 2))
            else:
                raise ValueError(f"polygons must have shape (N, V>=3, 2), not {arr.shape}")
        v = unit_vectors(arr[..., 0], arr[..., 1])
        edges = np.cross(v, np.roll(v, -1, axis=1))
        centers = _normalize(v.sum(axis=1))
        sign = np.sign(np.einsum("nkd,nd->n", edges, centers))
        sign[sign == 0] = 1.0
        inward = edges * sign[:, None, None]
        radii = _angle(v, centers[:, None, :]).max(axis=1) if len(v) else np.zeros(0)
        return cls(v, edges, inward, centers, radii)

    def __len__(self) -> int:
        return int(self.vertices.shape[0])

    def centers_radec(self) -> tuple[FloatArray, FloatArray]:
        return _radec(self.centers)

    def subset(self, index: npt.NDArray[np.intp]) -> PolygonSet:
        return PolygonSet(
            self.vertices[index],
            self.edges[index],
            self.inward[index],
            self.centers[index],
            self.radii[index],
        )

    def contains(self, points: FloatArray) -> BoolArray:
        """(N, M): whether polygon n contains point m (boundary included)."""
        dots = np.einsum("nkd,md->nkm", self.inward, points)
        out: BoolArray = (dots >= -_EPS).all(axis=1)
        return out


class Region(Protocol):
    """A sky region that can say which of a set of polygons it overlaps."""

    def overlaps(self, polygons: PolygonSet) -> BoolArray:
        """(N,) mask of the polygons this region overlaps."""
        ...


def _candidates(polygons: PolygonSet, center: FloatArray, radius: float) -> npt.NDArray[np.intp]:
    """Polygons whose bounding circle meets the circle (center, radius)."""
    if radius >= math.pi / 2:
        return np.arange(len(polygons))
    d = _angle(polygons.centers, center[None, :])
    return np.flatnonzero(d <= polygons.radii + radius + 1e-9)


@dataclass(frozen=True)
class Circle:
    """A DALI circle: centre (RA, Dec) and radius, degrees."""

    ra: float
    dec: float
    radius: float

    @property
    def center(self) -> FloatArray:
        return unit_vectors(self.ra, self.dec)

    def overlaps(self, polygons: PolygonSet) -> BoolArray:
        out = np.zeros(len(polygons), dtype=bool)
        c = self.center
        r = self.radius * _DEG
        idx = _candidates(polygons, c, r)
        if idx.size == 0:
            return out
        p = polygons.subset(idx)
        inside = p.contains(c[None, :])[:, 0]
        vertex_in = (_angle(p.vertices, c[None, None, :]) <= r + 1e-12).any(axis=1)
        # Closest point of each edge's great circle to the centre, if it is on the arc.
        e_hat = _normalize(p.edges)
        s = np.einsum("nkd,d->nk", e_hat, c)
        proj = c[None, None, :] - s[..., None] * e_hat
        v0, v1 = p.vertices, np.roll(p.vertices, -1, axis=1)
        on_arc = (np.einsum("nkd,nkd->nk", np.cross(v0, proj), p.edges) >= 0) & (
            np.einsum("nkd,nkd->nk", np.cross(proj, v1), p.edges) >= 0
        )
        edge_near = on_arc & (np.arcsin(np.clip(np.abs(s), 0.0, 1.0)) <= r + 1e-12)
        edge_near &= np.linalg.norm(proj, axis=-1) > _EPS
        out[idx] = inside | vertex_in | edge_near.any(axis=1)
        return out


@dataclass(frozen=True)
class Polygon:
    """A convex spherical polygon, vertices counter-clockwise seen from inside.

    Build it with :meth:`from_radec`, which orders and hulls the vertices.
    ``given`` keeps the vertices as the user gave them (SODA stencil cards).
    """

    vertices: FloatArray
    given: tuple[tuple[float, float], ...]

    @classmethod
    def from_radec(cls, points: list[tuple[float, float]]) -> Polygon:
        """The convex hull of (RA, Dec) vertices in degrees, ordered CCW.

        Raises
        ------
        ValueError
            Fewer than 3 distinct vertices, all on one great circle, or not
            within one hemisphere.
        """
        given = tuple(points)
        pts = list(points)
        if len(pts) > 3 and pts[0] == pts[-1]:
            pts = pts[:-1]
        v = unit_vectors([p[0] for p in pts], [p[1] for p in pts])
        keep = [0] + [i for i in range(1, len(v)) if np.linalg.norm(v[i] - v[i - 1]) > 1e-15]
        v = v[keep]
        if len(v) > 3 and np.linalg.norm(v[0] - v[-1]) <= 1e-15:
            v = v[:-1]
        if len(v) < 3:
            raise ValueError("a polygon needs at least 3 distinct vertices")
        c = v.sum(axis=0)
        if np.linalg.norm(c) < 1e-9:
            raise ValueError("polygon is degenerate or larger than a hemisphere")
        c = c / np.linalg.norm(c)
        v = _ccw_hull(v, c)
        return cls(v, given)

    @property
    def center(self) -> FloatArray:
        out: FloatArray = _normalize(self.vertices.sum(axis=0))
        return out

    @property
    def radius(self) -> float:
        """Bounding-circle radius in radians."""
        return float(_angle(self.vertices, self.center[None, :]).max())

    @property
    def inward(self) -> FloatArray:
        out: FloatArray = np.cross(self.vertices, np.roll(self.vertices, -1, axis=0))
        return out

    def overlaps(self, polygons: PolygonSet) -> BoolArray:
        out = np.zeros(len(polygons), dtype=bool)
        idx = _candidates(polygons, self.center, self.radius)
        if idx.size == 0:
            return out
        p = polygons.subset(idx)
        b = self.vertices
        b_edges = self.inward
        b_in_a = p.contains(b).any(axis=1)
        a_in_b = (np.einsum("nvd,md->nvm", p.vertices, b_edges) >= -_EPS).all(axis=2).any(axis=1)
        out[idx] = b_in_a | a_in_b | _arcs_cross(p.vertices, p.edges, b, b_edges)
        return out


def _arcs_cross(
    a: FloatArray, a_edges: FloatArray, b: FloatArray, b_edges: FloatArray
) -> BoolArray:
    """(N,): whether any edge of polygon n (N, V) crosses any edge of B (M)."""
    # Sides of B's vertices relative to A's edges, and of A's vertices to B's edges.
    sa = np.einsum("nkd,md->nkm", a_edges, b)
    sb = np.einsum("nvd,md->nvm", a, b_edges)
    b_straddles = sa * np.roll(sa, -1, axis=2) < 0  # B edge m crosses A edge k's circle
    a_straddles = sb * np.roll(sb, -1, axis=1) < 0  # A edge k crosses B edge m's circle
    t = np.cross(a_edges[:, :, None, :], b_edges[None, None, :, :])
    a_mid = a + np.roll(a, -1, axis=1)
    b_mid = b + np.roll(b, -1, axis=0)
    ta = np.einsum("nkmd,nkd->nkm", t, a_mid)
    tb = np.einsum("nkmd,md->nkm", t, b_mid)
    out: BoolArray = (b_straddles & a_straddles & (ta * tb > 0)).any(axis=(1, 2))
    return out


def _ccw_hull(v: FloatArray, c: FloatArray) -> FloatArray:
    """Convex hull of unit vectors around ``c``, counter-clockwise seen from inside."""
    if np.any(v @ c <= 1e-9):
        raise ValueError("polygon is not within one hemisphere")
    pole = np.array([0.0, 0.0, 1.0]) if abs(c[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u1 = np.cross(pole, c)
    u1 /= np.linalg.norm(u1)
    u2 = np.cross(c, u1)
    w = v @ c
    xy = np.stack([(v @ u1) / w, (v @ u2) / w], axis=1)
    order = _monotone_chain(xy)
    if len(order) < 3:
        raise ValueError("polygon vertices are all on one great circle")
    hull = v[order]
    # Counter-clockwise in the (u1, u2) plane seen from outside the sphere is
    # clockwise seen from inside; flip so that the interior is on the positive side.
    edges = np.cross(hull, np.roll(hull, -1, axis=0))
    if np.sum(edges @ c) < 0:
        hull = hull[::-1]
    return hull


def _monotone_chain(xy: FloatArray) -> list[int]:
    """Indices of the 2-D convex hull, counter-clockwise, collinear points dropped."""
    idx = sorted(range(len(xy)), key=lambda i: (xy[i, 0], xy[i, 1]))

    def cross(o: int, a: int, b: int) -> float:
        return float(
            (xy[a, 0] - xy[o, 0]) * (xy[b, 1] - xy[o, 1])
            - (xy[a, 1] - xy[o, 1]) * (xy[b, 0] - xy[o, 0])
        )

    lower: list[int] = []
    for i in idx:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], i) <= 1e-18:
            lower.pop()
        lower.append(i)
    upper: list[int] = []
    for i in reversed(idx):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], i) <= 1e-18:
            upper.pop()
        upper.append(i)
    return lower[:-1] + upper[:-1]


@dataclass(frozen=True)
class Range:
    """A DALI/SIA ``RANGE`` box: RA from ``ra1`` to ``ra2`` (wrapping past 360 when
    ``ra1 > ra2``, all RA when infinite), Dec from ``dec1`` to ``dec2``; degrees."""

    ra1: float
    ra2: float
    dec1: float
    dec2: float

    @property
    def full_ra(self) -> bool:
        return not (math.isfinite(self.ra1) and math.isfinite(self.ra2)) or (
            self.ra2 - self.ra1 >= 360.0
        )

    @property
    def dec_bounds(self) -> tuple[float, float]:
        return max(self.dec1, -90.0), min(self.dec2, 90.0)

    def _ra_in(self, ra: FloatArray) -> BoolArray:
        if self.full_ra:
            return np.ones(np.shape(ra), dtype=bool)
        a, b = self.ra1 % 360.0, self.ra2 % 360.0
        ra = np.mod(ra, 360.0)
        if a <= b:
            out: BoolArray = (ra >= a - 1e-10) & (ra <= b + 1e-10)
        else:
            out = (ra >= a - 1e-10) | (ra <= b + 1e-10)
        return out

    def overlaps(self, polygons: PolygonSet) -> BoolArray:
        out = np.zeros(len(polygons), dtype=bool)
        d1, d2 = self.dec_bounds
        if d1 > d2 or len(polygons) == 0:
            return out
        _, cdec = polygons.centers_radec()
        rad = np.degrees(polygons.radii)
        idx = np.flatnonzero((cdec + rad >= d1 - 1e-9) & (cdec - rad <= d2 + 1e-9))
        if idx.size == 0:
            return out
        p = polygons.subset(idx)
        ra, dec = _radec(p.vertices)
        hit = (self._ra_in(ra) & (dec >= d1 - 1e-10) & (dec <= d2 + 1e-10)).any(axis=1)
        # Box corners (and poles the box reaches) inside a polygon.
        corners: list[tuple[float, float]] = []
        if not self.full_ra:
            corners += [(self.ra1, d1), (self.ra2, d1), (self.ra2, d2), (self.ra1, d2)]
        if d2 >= 90.0:
            corners.append((0.0, 90.0))
        if d1 <= -90.0:
            corners.append((0.0, -90.0))
        if corners:
            cv = unit_vectors([c[0] for c in corners], [c[1] for c in corners])
            hit |= p.contains(cv).any(axis=1)
        # Polygon edges crossing the two meridian edges (each split in halves < 180 deg).
        if not self.full_ra:
            dm = 0.5 * (d1 + d2)
            segs = [
                (ra_, lo, hi) for ra_ in (self.ra1, self.ra2) for lo, hi in ((d1, dm), (dm, d2))
            ]
            sv = unit_vectors([[s[0], s[0]] for s in segs], [[s[1], s[2]] for s in segs])
            for s0, s1 in sv:
                if np.linalg.norm(s1 - s0) < 1e-15:
                    continue
                seg = np.stack([s0, s1])
                seg_edges = np.cross(seg, np.roll(seg, -1, axis=0))
                hit |= _arc_crosses_segment(p.vertices, p.edges, seg, seg_edges)
        # Polygon edges crossing the two parallels, inside the RA range.
        for d in (d1, d2):
            if -90.0 < d < 90.0:
                hit |= self._crosses_parallel(p.vertices, d)
        out[idx] = hit
        return out

    def _crosses_parallel(self, v: FloatArray, dec: float) -> BoolArray:
        p, q = v, np.roll(v, -1, axis=1)
        pq = np.clip(np.sum(p * q, axis=-1), -1.0, 1.0)
        w = _normalize(q - pq[..., None] * p)
        theta_max = _angle(p, q)
        big_r = np.hypot(p[..., 2], w[..., 2])
        z = math.sin(dec * _DEG)
        ok = big_r >= abs(z) - 1e-15
        alpha = np.arccos(np.clip(z / np.where(big_r > 0, big_r, 1.0), -1.0, 1.0))
        phi = np.arctan2(w[..., 2], p[..., 2])
        hit: BoolArray = np.zeros(p.shape[:2], dtype=bool)
        for theta in (phi + alpha, phi - alpha):
            th = np.mod(theta, 2 * math.pi)
            pt = np.cos(th)[..., None] * p + np.sin(th)[..., None] * w
            ra, _ = _radec(pt)
            hit = hit | np.asarray(ok & (th <= theta_max + 1e-12) & self._ra_in(ra), dtype=bool)
        out: BoolArray = np.asarray(hit.any(axis=1), dtype=bool)
        return out


def _arc_crosses_segment(
    a: FloatArray, a_edges: FloatArray, seg: FloatArray, seg_edges: FloatArray
) -> BoolArray:
    """(N,): whether any edge of polygon n crosses the arc seg[0] -> seg[1]."""
    # Treat the segment as a 2-vertex "polygon" whose second edge is the way back:
    # only its first edge is tested.
    sa = np.einsum("nkd,md->nkm", a_edges, seg)
    straddle_b = sa[:, :, 0] * sa[:, :, 1] < 0
    sb = np.einsum("nvd,d->nv", a, seg_edges[0])
    straddle_a = sb * np.roll(sb, -1, axis=1) < 0
    t = np.cross(a_edges, seg_edges[0][None, None, :])
    ta = np.einsum("nkd,nkd->nk", t, a + np.roll(a, -1, axis=1))
    tb = np.einsum("nkd,d->nk", t, seg[0] + seg[1])
    out: BoolArray = (straddle_a & straddle_b & (ta * tb > 0)).any(axis=1)
    return out


def circle_boundary(circle: Circle, samples: int = 64) -> tuple[FloatArray, FloatArray]:
    """(RA, Dec) of points on a circle's boundary, at equal position angles.

    The same sampling as ``dax_images_cutout`` (64 points, position angle from 0).
    """
    pa = np.arange(samples) / samples * 2.0 * math.pi
    r = circle.radius * _DEG
    ra0, dec0 = circle.ra * _DEG, circle.dec * _DEG
    # Destination point for a great-circle offset r at position angle pa (E of N).
    dec = np.arcsin(np.sin(dec0) * np.cos(r) + np.cos(dec0) * np.sin(r) * np.cos(pa))
    ra = ra0 + np.arctan2(
        np.sin(pa) * np.sin(r) * np.cos(dec0), np.cos(r) - np.sin(dec0) * np.sin(dec)
    )
    return np.degrees(ra) % 360.0, np.degrees(dec)


def parse_numbers(text: str, allow_inf: bool = False) -> list[float]:
    """Whitespace-separated numbers; NaN (and infinity unless allowed) rejected."""
    out = []
    for word in text.split():
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"{word!r} is not a number") from None
        if math.isnan(value) or (math.isinf(value) and not allow_inf):
            raise ValueError(f"{word!r} is not a finite number")
        out.append(value)
    return out


def _check_lat(*values: float) -> None:
    for value in values:
        if not -90.0 <= value <= 90.0:
            raise ValueError(f"latitude {value!r} is outside [-90, 90]")


def make_circle(values: list[float]) -> Circle:
    """A :class:`Circle` from ``ra dec radius``; raises ValueError."""
    if len(values) != 3:
        raise ValueError(f"a circle needs 3 numbers (ra dec radius), got {len(values)}")
    ra, dec, r = values
    _check_lat(dec)
    if not 0.0 < r <= 180.0:
        raise ValueError(f"circle radius {r!r} is not in (0, 180]")
    return Circle(ra % 360.0, dec, r)


def make_polygon(values: list[float], max_vertices: int) -> Polygon:
    """A :class:`Polygon` from ``ra1 dec1 ra2 dec2 ...``; raises ValueError."""
    if len(values) < 6 or len(values) % 2:
        raise ValueError(f"a polygon needs an even count of at least 6 numbers, got {len(values)}")
    if len(values) // 2 > max_vertices:
        raise ValueError(f"a polygon may have at most {max_vertices} vertices")
    pts = [(values[i] % 360.0, values[i + 1]) for i in range(0, len(values), 2)]
    _check_lat(*(p[1] for p in pts))
    return Polygon.from_radec(pts)


def make_range(values: list[float]) -> Range:
    """A :class:`Range` from ``ra1 ra2 dec1 dec2`` (infinities allowed)."""
    if len(values) != 4:
        raise ValueError(f"a range needs 4 numbers (ra1 ra2 dec1 dec2), got {len(values)}")
    ra1, ra2, dec1, dec2 = values
    if dec1 > dec2:
        raise ValueError(f"range latitudes {dec1!r} > {dec2!r}")
    for value in (dec1, dec2):
        if math.isfinite(value) and not -90.0 <= value <= 90.0:
            raise ValueError(f"latitude {value!r} is outside [-90, 90]")
    return Range(ra1, ra2, dec1, dec2)


def parse_pos(text: str, max_vertices: int) -> Circle | Range | Polygon:
    """An SIA ``POS`` value: ``CIRCLE ...``, ``RANGE ...`` or ``POLYGON ...``.

    Raises
    ------
    ValueError
        With a message for a ``UsageFault``.
    """
    shape, _, rest = text.strip().partition(" ")
    if shape == "CIRCLE":
        return make_circle(parse_numbers(rest))
    if shape == "RANGE":
        return make_range(parse_numbers(rest, allow_inf=True))
    if shape == "POLYGON":
        return make_polygon(parse_numbers(rest), max_vertices)
    raise ValueError(f"Unrecognized shape in POS string {text!r}")
