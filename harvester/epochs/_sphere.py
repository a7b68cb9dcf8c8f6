"""Geometry on the sphere for :mod:`._index`: growing polygons, their RA/Dec bounds,
the grid of cells, and the projective maps from the sky to a detector's pixels.

Dependency rule: numpy only.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = [
    "BOUNDARY",
    "CORE",
    "INSIDE",
    "OUTSIDE",
    "Grid",
    "classify",
    "fit_homographies",
    "grow",
    "local_planes",
    "normalize",
    "pixel_scales",
    "unit",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: States of a (footprint, cell) entry.
INSIDE, OUTSIDE, BOUNDARY, CORE = 0, 1, 2, 3


def unit(ra_deg: FloatArray, dec_deg: FloatArray) -> FloatArray:
    a = np.radians(ra_deg)
    d = np.radians(dec_deg)
    cd = np.cos(d)
    return np.stack([cd * np.cos(a), cd * np.sin(a), np.sin(d)], axis=-1)


def normalize(v: FloatArray) -> FloatArray:
    out: FloatArray = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return out


def grow(v: FloatArray, margin_deg: FloatArray) -> FloatArray:
    """Corners (F, 4, 3) of convex quadrilaterals ``v`` with every edge moved outward
    by ``margin_deg`` (F,) degrees; great-circle edges stay great circles."""
    if not np.any(margin_deg):
        return v.copy()
    nxt = np.roll(v, -1, axis=1)
    n = normalize(np.cross(v, nxt))
    centre = normalize(v.sum(axis=1))
    sign = np.sign(np.einsum("fkd,fd->fk", n, centre))[..., None]
    n = n * np.where(sign == 0, 1.0, sign)  # inward
    mid = normalize(v + nxt)
    m = np.radians(margin_deg)[:, None, None]
    grown_n = n * np.cos(m) + mid * np.sin(m)
    # Corner k is where grown edges k-1 and k meet, on the side of the old corner.
    corner = normalize(np.cross(np.roll(grown_n, 1, axis=1), grown_n))
    flip = np.einsum("fkd,fkd->fk", corner, v) < 0
    corner[flip] *= -1.0
    return corner


def local_planes(v: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per footprint: the centre c and east/north axes e1, e2 of its gnomonic plane."""
    c = normalize(v.sum(axis=1))
    pole = np.zeros_like(c)
    pole[:, 2] = 1.0
    near_pole = np.abs(c[:, 2]) > 0.99
    pole[near_pole] = [1.0, 0.0, 0.0]
    e1 = normalize(np.cross(pole, c))
    e2 = np.cross(c, e1)
    return c, e1, e2


def fit_homographies(
    v: FloatArray,
    plane: tuple[FloatArray, FloatArray, FloatArray],
    width: IntArray,
    height: IntArray,
) -> FloatArray:
    """3x3 maps (F, 3, 3) from each footprint's gnomonic (u, v) to pixels (x, y),
    through the four corner correspondences."""
    c, e1, e2 = plane
    w = np.einsum("fkd,fd->fk", v, c)
    u = np.einsum("fkd,fd->fk", v, e1) / w
    t = np.einsum("fkd,fd->fk", v, e2) / w
    x = np.stack(
        [np.full(width.shape, -0.5), width - 0.5, width - 0.5, np.full(width.shape, -0.5)], 1
    )
    y = np.stack(
        [np.full(height.shape, -0.5), np.full(height.shape, -0.5), height - 0.5, height - 0.5], 1
    )
    n = v.shape[0]
    a = np.zeros((n, 8, 8))
    b = np.zeros((n, 8))
    for k in range(4):
        a[:, 2 * k, 0:3] = np.stack([u[:, k], t[:, k], np.ones(n)], 1)
        a[:, 2 * k, 6:8] = np.stack([-u[:, k] * x[:, k], -t[:, k] * x[:, k]], 1)
        a[:, 2 * k + 1, 3:6] = np.stack([u[:, k], t[:, k], np.ones(n)], 1)
        a[:, 2 * k + 1, 6:8] = np.stack([-u[:, k] * y[:, k], -t[:, k] * y[:, k]], 1)
        b[:, 2 * k] = x[:, k]
        b[:, 2 * k + 1] = y[:, k]
    h = np.linalg.solve(a, b[..., None])[..., 0] if n else np.zeros((0, 8))
    out: FloatArray = np.concatenate([h, np.ones((n, 1))], axis=1).reshape(n, 3, 3)
    return out


def pixel_scales(v: FloatArray, width: IntArray, height: IntArray) -> FloatArray:
    """Degrees per pixel of each footprint, from its edge lengths."""
    nxt = np.roll(v, -1, axis=1)
    length = np.degrees(
        np.arctan2(np.linalg.norm(np.cross(v, nxt), axis=-1), np.einsum("fkd,fkd->fk", v, nxt))
    )
    scale: FloatArray = (length[:, 0] + length[:, 2]) / (2 * width) * 0.5 + (
        length[:, 1] + length[:, 3]
    ) / (2 * height) * 0.5
    return scale


class Grid:
    """Cells on the sphere: Dec rows of ``cell`` degrees, each cut into RA cells about
    ``cell`` wide at the row's edge nearer the equator."""

    def __init__(self, cell: float) -> None:
        self.cell = cell
        self.rows = math.ceil(180.0 / cell)
        lo = -90.0 + np.arange(self.rows) * cell
        hi = np.minimum(lo + cell, 90.0)
        near_eq = np.where((lo < 0) & (hi > 0), 0.0, np.minimum(np.abs(lo), np.abs(hi)))
        self.per_row = np.maximum(1, np.ceil(360.0 * np.cos(np.radians(near_eq)) / cell)).astype(
            np.int64
        )
        self.offset = np.concatenate([[0], np.cumsum(self.per_row)[:-1]]).astype(np.int64)

    def row_of(self, dec: FloatArray) -> IntArray:
        out: IntArray = np.clip(np.floor((dec + 90.0) / self.cell), 0, self.rows - 1).astype(
            np.int64
        )
        return out

    def cell_of(self, ra: FloatArray, dec: FloatArray) -> IntArray:
        row = self.row_of(dec)
        n = self.per_row[row]
        col = np.minimum(np.floor(np.mod(ra, 360.0) / 360.0 * n).astype(np.int64), n - 1)
        out: IntArray = self.offset[row] + col
        return out

    def cell_corners(self, cell: IntArray) -> tuple[FloatArray, FloatArray]:
        """Unit vectors (E, 4, 3) of each cell's corners, and its RA width (degrees)."""
        row = np.searchsorted(self.offset, cell, side="right") - 1
        n = self.per_row[row]
        width = 360.0 / n
        ra0 = (cell - self.offset[row]) * width
        lo = -90.0 + row * self.cell
        hi = np.minimum(lo + self.cell, 90.0)
        ra = np.stack([ra0, ra0 + width, ra0 + width, ra0], 1)
        dec = np.stack([lo, lo, hi, hi], 1)
        return unit(ra, dec), width

    def cover(self, v: FloatArray) -> tuple[IntArray, IntArray]:
        """(footprint, cell) for every cell each polygon's bounding box touches."""
        dec_lo, dec_hi, ra_lo, ra_hi, full = _bounds(v)
        r0, r1 = self.row_of(dec_lo), self.row_of(dec_hi)
        fps: list[IntArray] = []
        cells: list[IntArray] = []
        for k in range(int((r1 - r0).max()) + 1 if v.shape[0] else 0):
            f = np.flatnonzero(r0 + k <= r1)
            row = r0[f] + k
            n = self.per_row[row]
            c0 = np.floor(ra_lo[f] / 360.0 * n).astype(np.int64)
            c1 = np.floor(ra_hi[f] / 360.0 * n).astype(np.int64)
            whole = full[f] | (c1 - c0 + 1 >= n)
            cnt = np.where(whole, n, c1 - c0 + 1)
            c0 = np.where(whole, 0, c0)
            f_rep = np.repeat(f, cnt)
            within = np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(
                np.cumsum(cnt) - cnt, cnt
            )
            col = np.mod(np.repeat(c0, cnt) + within, np.repeat(n, cnt))
            fps.append(f_rep)
            cells.append(self.offset[np.repeat(row, cnt)] + col)
        if not fps:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(fps), np.concatenate(cells)


def classify(corners: FloatArray, width: FloatArray, normals: FloatArray) -> npt.NDArray[np.int8]:
    """Each cell (E) wholly inside its polygon, wholly outside it, or on its boundary
    (only those need the per-target test).

    A cell is judged by its four ``corners`` against the polygon's unit inward edge
    ``normals`` (E, 4, 3), with a margin for the poleward bulge of its parallels (a
    chord of ``w`` radians departs from its parallel by at most ``w**2 / 8``). Cells
    wider than a degree (near the poles) are always tested.
    """
    dots = np.einsum("ekd,ejd->ekj", corners, normals)  # corner k, edge j
    margin = (np.radians(width) ** 2 / 8.0 + 1e-12)[:, None, None]
    narrow = width <= 1.0
    state = np.full(width.size, BOUNDARY, dtype=np.int8)
    state[(dots >= margin).all(axis=(1, 2)) & narrow] = INSIDE
    state[(dots < -margin).all(axis=1).any(axis=1) & narrow] = OUTSIDE
    return state


def _bounds(
    v: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, BoolArray]:
    """RA/Dec bounding boxes of convex polygons (F, K, 3) with great-circle edges.

    Dec: the vertices and any edge's poleward extreme. RA: the vertices' span around
    the centre's RA (an arc not through a pole is monotonic in RA); ``full`` where a
    polygon holds a pole (then its Dec range reaches it).
    """
    z = v[..., 2]
    dec = np.degrees(np.arcsin(np.clip(z, -1, 1)))
    lo, hi = dec.min(axis=1), dec.max(axis=1)
    nxt = np.roll(v, -1, axis=1)
    n = np.cross(v, nxt)
    nn = np.linalg.norm(n, axis=-1, keepdims=True)
    nhat = n / np.where(nn > 0, nn, 1.0)
    zaxis = np.array([0.0, 0.0, 1.0])
    top = zaxis - nhat[..., 2:3] * nhat
    tn = np.linalg.norm(top, axis=-1, keepdims=True)
    top = top / np.where(tn > 0, tn, 1.0)
    for sign in (1.0, -1.0):
        p = sign * top
        on_arc = (np.einsum("fkd,fkd->fk", np.cross(v, p), n) >= 0) & (
            np.einsum("fkd,fkd->fk", np.cross(p, nxt), n) >= 0
        )
        ext = np.degrees(np.arcsin(np.clip(p[..., 2], -1, 1)))
        if sign > 0:
            hi = np.maximum(hi, np.where(on_arc, ext, -np.inf).max(axis=1))
        else:
            lo = np.minimum(lo, np.where(on_arc, ext, np.inf).min(axis=1))
    # Poles inside: the inward test for the pole vectors.
    inward = n * np.sign(np.einsum("fkd,fd->fk", n, normalize(v.sum(axis=1))))[..., None]
    north = (inward[..., 2] >= 0).all(axis=1)
    south = (inward[..., 2] <= 0).all(axis=1)
    hi = np.where(north, 90.0, hi)
    lo = np.where(south, -90.0, lo)
    centre = normalize(v.sum(axis=1))
    ra_c = np.degrees(np.arctan2(centre[:, 1], centre[:, 0]))
    ra = np.degrees(np.arctan2(v[..., 1], v[..., 0]))
    rel = np.mod(ra - ra_c[:, None] + 180.0, 360.0) - 180.0
    ra_lo = ra_c + rel.min(axis=1)
    ra_hi = ra_c + rel.max(axis=1)
    # Shift into [0, 360) at the low end; the high end may pass 360 (wrapping cells).
    shift = np.floor(ra_lo / 360.0) * 360.0
    return lo, hi, ra_lo - shift, ra_hi - shift, north | south
