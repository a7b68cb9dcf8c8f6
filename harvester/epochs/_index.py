"""Which single-epoch images cover which targets: a vectorised footprint index.

A single-epoch target needs every detector image whose pixels its stamp touches.
:class:`FootprintIndex` answers that for a million targets against ten thousand
detector footprints in a few seconds (``benchmarks/bench_epochs.py``):

1. **Grow** each footprint (a convex quadrilateral with great-circle edges: the
   detector's pixel box on the sky) by the stamp's half-size: every edge's great
   circle is tilted outward about the tangent at its midpoint by ``half * pixel
   scale``, and the new corners are where neighbouring grown edges meet. The pixel
   scale is measured per footprint from its edges and pixel size.
2. **Bucket** on a fixed grid of cells on the sphere (Dec rows of ``cell``
   degrees, each cut into about ``cell``-wide RA cells; fewer near the poles).
   Each grown footprint is listed in every cell of its RA/Dec bounding box (the Dec
   range includes the poleward bulge of great-circle edges); each target falls in
   one cell, and targets are sorted by cell, so a (footprint, cell) entry names a
   run of them.
3. **Classify** each entry by the cell's corners against the footprint's edges (with
   a margin for the bulge of the cell's parallels): cells wholly outside are
   dropped, cells wholly inside give pairs without a test, and only boundary cells
   test their targets.
4. **Test exactly**: a target ``p`` is inside when ``p . (v_k x v_k+1) >= 0`` for the
   four grown corners ``v``: the predicate ``lsst.sphgeom.ConvexPolygon.contains``
   uses (the tests' oracle, pair for pair), and the planar test of a gnomonic
   projection, where great circles are straight lines.
5. **Coverage** of each pair: the fraction of the stamp's pixels on the detector.
   The target's pixel comes from a projective map fitted to the four corners (exact
   for a TAN projection; the header TAN-SIP's sub-pixel distortion makes it an
   estimate good to a fraction of a pixel), the stamp is the box of ``size`` pixels
   centred on ``floor(x + 0.5)``. Pairs at detector edges and in chip gaps get
   coverage below 1; a pair let in only by the rounding of the centre pixel gets 0.
   Cells deep inside a footprint (by the half-size and 2 px) have coverage 1 without
   computing it. The engine computes the exact box from the header WCS when it opens
   the image.

Memory: the targets, the pairs found, and at most ``chunk`` candidates in flight
(about 100 MB); nothing grows with the number of candidates.

Pairs come back grouped by image (ascending; within an image in grid-cell order,
the same for any ``chunk``): one unit of work is one image and the targets in it
(:meth:`Pairs.units`), so each file is opened once for all of them.

Dependency rule: numpy only (as :mod:`harvester.service._geometry`), plus the
:class:`~harvester.epochs.EpochRef` records it can be built from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ._pairs import Pairs
from ._refs import EpochRef
from ._sphere import (
    BOUNDARY,
    CORE,
    INSIDE,
    OUTSIDE,
    Grid,
    classify,
    fit_homographies,
    grow,
    local_planes,
    normalize,
    pixel_scales,
    unit,
)

__all__ = ["CANDIDATES_PER_STEP", "FootprintIndex"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: Candidate pairs tested per step: bounds the working memory (about 100 MB) beyond
#: the targets and the pairs found.
CANDIDATES_PER_STEP = 1 << 20


def _checked_positions(ra: npt.ArrayLike, dec: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    r = np.atleast_1d(np.asarray(ra, dtype=float))
    d = np.atleast_1d(np.asarray(dec, dtype=float))
    if r.shape != d.shape or r.ndim != 1:
        raise ValueError(f"ra and dec must be 1-d and alike, got shapes {r.shape} and {d.shape}")
    for name, arr in (("ra", r), ("dec", d)):
        bad = ~np.isfinite(arr)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name} must be finite, got {arr[i]} at index {i}")
    bad = np.abs(d) > 90.0
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"dec must be within [-90, 90] degrees, got {d[i]} at index {i}")
    return r, d


class FootprintIndex:
    """Detector footprints that many positions can be looked up in at once.

    Parameters
    ----------
    corners : array (N, 4, 2)
        RA, Dec (degrees) of each detector's pixel-box corners, in the order
        (x0, y0), (x1, y0), (x1, y1), (x0, y1) of its pixel grid.
    width, height : array (N,) of int
        Each detector's pixel size.
    t_begin, t_end : array (N,), optional
        Exposure timespans, MJD TAI (half-open); needed for time filters.
    band, dataset_type : array (N,) of str, optional
        Needed for band and dataset-type filters.
    refs : sequence of EpochRef, optional
        The records the arrays came from (:meth:`from_refs`); carried into pairs
        and units.
    cell : float
        Grid cell side in degrees (0.05, the default, suits 0.2-degree detectors; the
        result does not depend on it, only the time and memory).

    Raises
    ------
    ValueError
        On arrays of the wrong shape, non-finite corners, or sizes that are not
        positive; the message names the parameter.
    """

    def __init__(
        self,
        corners: npt.ArrayLike,
        width: npt.ArrayLike,
        height: npt.ArrayLike,
        *,
        t_begin: npt.ArrayLike | None = None,
        t_end: npt.ArrayLike | None = None,
        band: npt.ArrayLike | None = None,
        dataset_type: npt.ArrayLike | None = None,
        refs: Sequence[EpochRef] | None = None,
        cell: float = 0.05,
    ) -> None:
        c = np.asarray(corners, dtype=float)
        if c.size == 0:
            c = c.reshape(0, 4, 2)
        if c.ndim != 3 or c.shape[1:] != (4, 2):
            raise ValueError(f"corners must have shape (N, 4, 2), not {c.shape}")
        if not np.isfinite(c).all() or (np.abs(c[..., 1]) > 90).any():
            raise ValueError("corners must be finite (ra, dec) with |dec| <= 90")
        n = c.shape[0]
        self.width: IntArray = self._column("width", width, n).astype(np.int64)
        self.height: IntArray = self._column("height", height, n).astype(np.int64)
        if (self.width <= 0).any() or (self.height <= 0).any():
            raise ValueError("width and height must be positive")
        if not 0 < cell <= 10:
            raise ValueError(f"cell must be in (0, 10] degrees, got {cell!r}")
        self.corners = c
        self.t_begin: FloatArray | None = None
        self.t_end: FloatArray | None = None
        if t_begin is not None and t_end is not None:
            self.t_begin = self._column("t_begin", t_begin, n).astype(np.float64)
            self.t_end = self._column("t_end", t_end, n).astype(np.float64)
        self.band: npt.NDArray[np.str_] | None = None
        if band is not None:
            self.band = self._column("band", band, n).astype(np.str_)
        self.dataset_type: npt.NDArray[np.str_] | None = None
        if dataset_type is not None:
            self.dataset_type = self._column("dataset_type", dataset_type, n).astype(np.str_)
        self.refs = tuple(refs) if refs is not None else None
        self.cell = float(cell)
        self._vertices = unit(c[..., 0], c[..., 1])  # (N, 4, 3)
        plane = local_planes(self._vertices)
        h = fit_homographies(self._vertices, plane, self.width, self.height)
        # x = (ax . p) / (aw . p), y = (ay . p) / (aw . p) for a unit vector p: the
        # gnomonic projection and the projective map folded into three 3-vectors.
        c, e1, e2 = plane
        maps = [
            h[:, i, 0, None] * e1 + h[:, i, 1, None] * e2 + h[:, i, 2, None] * c for i in range(3)
        ]
        self._maps = np.ascontiguousarray(np.stack(maps).transpose(0, 2, 1))  # (3 rows, 3 xyz, F)
        self._scale = pixel_scales(self._vertices, self.width, self.height)

    @staticmethod
    def _column(name: str, values: npt.ArrayLike, n: int) -> npt.NDArray[Any]:
        arr: npt.NDArray[Any] = np.asarray(values)
        if arr.size == 0 and n == 0:
            arr = arr.reshape(0)
        if arr.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), not {arr.shape}")
        return arr

    @classmethod
    def from_refs(cls, refs: Sequence[EpochRef], cell: float = 0.05) -> FootprintIndex:
        """An index over a repository's epoch images (``Repository.epochs``)."""
        return cls(
            [r.polygon for r in refs] if refs else np.zeros((0, 4, 2)),
            [r.width for r in refs],
            [r.height for r in refs],
            t_begin=[r.t_begin for r in refs],
            t_end=[r.t_end for r in refs],
            band=[r.band for r in refs],
            dataset_type=[r.dataset_type for r in refs],
            refs=refs,
            cell=cell,
        )

    def __len__(self) -> int:
        return int(self.corners.shape[0])

    # ---- selection ----------------------------------------------------------------

    def active(
        self,
        time: tuple[float, float] | None = None,
        bands: Sequence[str] | None = None,
        dataset_types: Sequence[str] | None = None,
    ) -> BoolArray:
        """Footprints that pass the filters: timespan overlapping ``time`` (MJD TAI,
        ``[t0, t1)``, as the Butler's ``OVERLAPS``), band and dataset type in the lists."""
        keep = np.ones(len(self), dtype=bool)
        if time is not None:
            if self.t_begin is None or self.t_end is None:
                raise ValueError("this index has no timespans (t_begin, t_end)")
            t0, t1 = (float(v) for v in time)
            if math.isnan(t0) or math.isnan(t1) or t0 > t1:
                raise ValueError(f"time must be an interval (t0 <= t1), got {time!r}")
            keep &= (self.t_begin < t1) & (self.t_end > t0)
        if bands is not None:
            if self.band is None:
                raise ValueError("this index has no bands")
            keep &= np.isin(self.band, list(bands))
        if dataset_types is not None:
            if self.dataset_type is None:
                raise ValueError("this index has no dataset types")
            keep &= np.isin(self.dataset_type, list(dataset_types))
        return keep

    def grown_corners(self, half_size: float, rows: IntArray | None = None) -> FloatArray:
        """Unit vectors (M, 4, 3) of the footprints' corners grown by ``half_size``
        pixels (all footprints, or ``rows``)."""
        idx = np.arange(len(self)) if rows is None else rows
        return grow(self._vertices[idx], half_size * self._scale[idx])

    # ---- the query ----------------------------------------------------------------

    def query(
        self,
        ra: npt.ArrayLike,
        dec: npt.ArrayLike,
        *,
        size: int | npt.ArrayLike = 0,
        time: tuple[float, float] | None = None,
        bands: Sequence[str] | None = None,
        dataset_types: Sequence[str] | None = None,
        chunk: int = CANDIDATES_PER_STEP,
    ) -> Pairs:
        """Every (target, image) pair whose stamp may touch the image.

        Parameters
        ----------
        ra, dec : array (M,)
            Target positions, degrees (ICRS).
        size : int or array (M,) of int
            Stamp side in pixels (per target or one for all); 0 tests the bare
            detector polygons (a point inside). Footprints are grown by
            ``max(size) // 2`` pixels.
        time, bands, dataset_types : optional
            Filters, as :meth:`active`.
        chunk : int
            Candidate pairs tested per step (memory bound; the result is the same).

        Returns
        -------
        Pairs
            Grouped by image, ascending.
        """
        r, d = _checked_positions(ra, dec)
        sizes = np.broadcast_to(np.asarray(size, dtype=np.int64), r.shape)
        if (sizes < 0).any():
            raise ValueError(f"size must be >= 0, got {int(sizes.min())}")
        rows = np.flatnonzero(self.active(time, bands, dataset_types))
        if rows.size == 0 or r.size == 0:
            return self._pairs(
                np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
            )
        grown = self.grown_corners(int(sizes.max()) // 2, rows)
        normals = normalize(np.cross(grown, np.roll(grown, -1, axis=1)))  # (F, 4, 3)
        centre = grown.sum(axis=1)
        normals *= np.where(np.einsum("fkd,fd->fk", normals, centre) < 0, -1.0, 1.0)[..., None]
        # Targets in grid-cell order; each (footprint, cell) entry names a run of them.
        grid = Grid(self.cell)
        tcell = grid.cell_of(r, d)
        tsort = np.argsort(tcell, kind="stable")
        tcell = tcell[tsort]
        points = np.ascontiguousarray(unit(r[tsort], d[tsort]).T)  # (3, M), cell order
        fp, cell = grid.cover(grown)
        first = np.searchsorted(tcell, cell, side="left")
        count = np.searchsorted(tcell, cell, side="right") - first
        # Cells well inside the detector (by the stamp's half-size and 2 px of
        # rounding and distortion) need no coverage computation: it is 1.
        core = self._core_normals(rows, half_sizes=int(sizes.max()) // 2 + 2)
        state = np.empty(cell.size, dtype=np.int8)
        step = chunk // 16 or 1  # (entry, corner, edge) arrays: bounded like the candidates
        for s in range(0, cell.size, step):
            part = slice(s, s + step)
            corners, width = grid.cell_corners(cell[part])
            st = classify(corners, width, normals[fp[part]])
            if core is not None:
                st[(st == INSIDE) & (classify(corners, width, core[fp[part]]) == INSIDE)] = CORE
            state[part] = st
        use = (count > 0) & (state != OUTSIDE)
        fp, first, count, state = fp[use], first[use], count[use], state[use]
        order = np.argsort(fp, kind="stable")  # group entries (and so pairs) by footprint
        fp, first, count, state = fp[order], first[order], count[order], state[order]
        soa_normals = np.ascontiguousarray(normals.transpose(1, 2, 0))  # (4, 3, F)
        out_pos: list[IntArray] = []
        out_fp: list[IntArray] = []
        out_core: list[BoolArray] = []
        ends = np.cumsum(count)
        start = 0
        while start < fp.size:
            # Entries [start, stop) give at most `chunk` candidates (at least one entry).
            base = int(ends[start - 1]) if start else 0
            stop = max(int(np.searchsorted(ends, base + chunk, side="right")), start + 1)
            pos, entry = _candidates(first[start:stop], count[start:stop])
            f = np.take(fp[start:stop], entry)
            st = np.take(state[start:stop], entry)
            test = st == BOUNDARY
            keep = np.ones(pos.size, dtype=bool)
            keep[test] = _inside(points, soa_normals, pos[test], f[test])
            # int32 while collecting: half the memory of the pairs in flight.
            out_pos.append(pos[keep].astype(np.int32))
            out_fp.append(f[keep].astype(np.int32))
            out_core.append(st[keep] == CORE)
            start = stop
        pos32 = np.concatenate(out_pos) if out_pos else np.zeros(0, np.int32)
        f32 = np.concatenate(out_fp) if out_fp else np.zeros(0, np.int32)
        in_core = np.concatenate(out_core) if out_core else np.zeros(0, bool)
        del out_pos, out_fp, out_core
        target = np.take(tsort, pos32)
        image = np.take(rows, f32)
        cov = np.ones(pos32.size, dtype=np.float32)
        edge = np.flatnonzero(~in_core)
        step = chunk // 4 or 1  # the pixel maps hold ~20 numbers per pair
        for s in range(0, edge.size, step):
            e = edge[s : s + step]
            cov[e] = self._coverage(points, sizes[target[e]], pos32[e], image[e])
        return self._pairs(target, image, cov)

    def _core_normals(self, rows: IntArray, half_sizes: int) -> FloatArray | None:
        """Unit inward edge normals of the footprints shrunk by ``half_sizes`` pixels,
        or None if that would leave nothing of the smallest one."""
        if 2 * half_sizes >= min(int(self.width[rows].min()), int(self.height[rows].min())):
            return None
        shrunk = grow(self._vertices[rows], -half_sizes * self._scale[rows])
        n = normalize(np.cross(shrunk, np.roll(shrunk, -1, axis=1)))
        inward = np.einsum("fkd,fd->fk", n, shrunk.sum(axis=1)) < 0
        n[inward] *= -1.0
        return n

    def _pairs(self, target: IntArray, image: IntArray, cov: npt.NDArray[np.float32]) -> Pairs:
        return Pairs(target.astype(np.int64), image.astype(np.int64), cov, self.refs)

    def pixels(self, points: FloatArray, image: IntArray) -> tuple[FloatArray, FloatArray]:
        """Estimated 0-based pixel (x, y) of unit vectors ``points`` (3, M) in ``image``
        (M,): the corner-fitted projective map; see the module docstring."""
        row = []
        for i in range(3):
            m = self._maps[i]
            row.append(
                points[0] * np.take(m[0], image)
                + points[1] * np.take(m[1], image)
                + points[2] * np.take(m[2], image)
            )
        return row[0] / row[2], row[1] / row[2]

    def _coverage(
        self, points: FloatArray, side: IntArray, pos: npt.NDArray[np.integer[Any]], image: IntArray
    ) -> npt.NDArray[np.float32]:
        """Fraction of each stamp (``side`` px, centred on ``floor(x + 0.5)``) on its
        detector, for the points at ``pos`` in ``image``."""
        x, y = self.pixels(points[:, pos], image)
        ox = _overlap(np.floor(x + 0.5).astype(np.int64) - side // 2, side, self.width[image])
        oy = _overlap(np.floor(y + 0.5).astype(np.int64) - side // 2, side, self.height[image])
        area = np.maximum(side, 1).astype(np.float64) ** 2
        # A bare point (size 0) counts as one pixel at its centre.
        out: npt.NDArray[np.float32] = np.where(side > 0, ox * oy / area, 1.0).astype(np.float32)
        return out


def _overlap(x0: IntArray, side: IntArray, n: IntArray) -> IntArray:
    """Pixels of ``[x0, x0 + side)`` inside ``[0, n)``."""
    out: IntArray = np.clip(np.minimum(x0 + side, n) - np.maximum(x0, 0), 0, None)
    return out


def _candidates(first: IntArray, count: IntArray) -> tuple[IntArray, IntArray]:
    """(position, entry) for every position of each entry's run ``first + [0, count)``."""
    total = int(count.sum())
    entry = np.repeat(np.arange(count.size, dtype=np.int64), count)
    offsets = np.cumsum(count) - count
    within = np.arange(total, dtype=np.int64) - np.take(offsets, entry)
    return np.take(first, entry) + within, entry


def _inside(points: FloatArray, normals: FloatArray, t: IntArray, f: IntArray) -> BoolArray:
    """Whether point ``t`` is inside polygon ``f`` (boundary included).

    ``points`` is (3, M) and ``normals`` (K, 3, F), component-major, so every
    gather is a 1-d ``take``; later edges are tested only where earlier ones passed.
    """
    px, py, pz = (np.take(points[j], t) for j in range(3))
    keep = np.ones(t.size, dtype=bool)
    live = np.arange(t.size)
    for k in range(normals.shape[0]):
        d = px * np.take(normals[k, 0], f)
        d += py * np.take(normals[k, 1], f)
        d += pz * np.take(normals[k, 2], f)
        ok = d >= 0.0
        keep[live[~ok]] = False
        live, px, py, pz, f = live[ok], px[ok], py[ok], pz[ok], f[ok]
    return keep
