"""The records of the epoch-image catalogues (see :mod:`._epoch_catalogs`).

:class:`EpochSearch` (what to look for, and the circles one query each asks for),
:class:`EpochCatalog` (what was found: :class:`~harvester.epochs.EpochRef` records
and an :class:`EpochAccess` per image), the :class:`EpochFinder` protocol every
catalogue follows, :func:`finish_catalog` (the local run's filter, applied to what
a catalogue found), and the conversions the metadata needs: MJD UTC and TAI
(:func:`utc_of_tai`, :func:`tai_of_utc`), corners back in pixel order
(:func:`pixel_order`).

Dependency rule: numpy, astropy (lazily), :mod:`harvester.epochs` and
:mod:`._datalink` (the SODA descriptor).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..epochs import EPOCH_TYPES, EpochRef, FootprintIndex, Pairs
from ..epochs._sphere import Grid, normalize, unit
from ._datalink import SodaService

__all__ = [
    "EPOCH_LEVELS",
    "EpochAccess",
    "EpochCatalog",
    "EpochFinder",
    "EpochSearch",
    "SearchRegion",
    "finish_catalog",
    "pixel_order",
    "tai_of_utc",
    "utc_of_tai",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Corners = tuple[tuple[float, float], ...]

#: ObsCore ``calib_level`` of each epoch image type (``dp1.yaml``).
EPOCH_LEVELS = {"visit_image": 2, "difference_image": 3}


def utc_of_tai(mjd_tai: npt.ArrayLike) -> FloatArray:
    """MJD UTC of MJD TAI values (astropy's leap seconds), vectorised."""
    from astropy.time import Time

    arr = np.atleast_1d(np.asarray(mjd_tai, dtype=np.float64))
    if arr.size == 0:
        return arr
    out: FloatArray = np.asarray(Time(arr, format="mjd", scale="tai").utc.mjd, dtype=np.float64)
    return out


def tai_of_utc(mjd_utc: npt.ArrayLike) -> FloatArray:
    """MJD TAI of MJD UTC values (astropy's leap seconds), vectorised."""
    from astropy.time import Time

    arr = np.atleast_1d(np.asarray(mjd_utc, dtype=np.float64))
    if arr.size == 0:
        return arr
    out: FloatArray = np.asarray(Time(arr, format="mjd", scale="utc").tai.mjd, dtype=np.float64)
    return out


def pixel_order(corners: Sequence[tuple[float, float]], width: int, height: int) -> Corners:
    """A detector's four sky corners in :class:`~harvester.epochs.EpochRef` order.

    ``(x0, y0), (x1, y0), (x1, y1), (x0, y1)`` of the pixel box, from corners in any
    cyclic order (sphgeom's hull, which the Butler's regions and the RSP's
    ``s_region`` follow, reverses and rotates them). The orientation is that of an
    image with the usual sky parity (``det CD < 0``: ``(v0 x v1) . v2 < 0``, as DP1's
    and the synthetic images have it); the first edge is the one whose length goes
    with ``width`` (the aspect ratio decides); of the two corners that may then
    start, the one listed first is taken (no metadata tells (x0, y0) from (x1, y1):
    a half-turn moves the footprint index's coverage estimates by at most a pixel).

    Raises
    ------
    ValueError
        Not four corners.
    """
    pts = [(float(r), float(d)) for r, d in corners]
    if len(pts) != 4:
        raise ValueError(f"a detector polygon has 4 corners, not {len(pts)}: {pts!r}")
    v = unit(np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    order = [0, 1, 2, 3]
    if float(np.dot(np.cross(v[0], v[1]), v[2])) > 0:
        order = [0, 3, 2, 1]  # reversed, same first corner
    length = [
        float(np.arccos(np.clip(v[order[k]] @ v[order[(k + 1) % 4]], -1.0, 1.0))) for k in range(4)
    ]
    aspect = width / height
    # Which rotation puts a width edge first: compare both pairings' mismatch.
    keep = abs(math.log((length[0] + length[2]) / (length[1] + length[3]) / aspect))
    turn = abs(math.log((length[1] + length[3]) / (length[0] + length[2]) / aspect))
    start = 0 if keep <= turn else 1
    candidates = [order[start:] + order[:start], order[start + 2 :] + order[: start + 2]]
    best = min(candidates, key=lambda o: o[0])
    return tuple(pts[i] for i in best)


@dataclass(frozen=True)
class SearchRegion:
    """A circle one catalogue query asks for: a cell's targets, grown by the stamp."""

    ra: float
    dec: float
    radius: float  # degrees
    targets: IntArray = field(repr=False, compare=False)


@dataclass(frozen=True)
class EpochSearch:
    """What to look for: the targets' epochs of some types, bands and time window.

    Parameters
    ----------
    ra, dec : array (M,)
        Target positions, degrees.
    size : int
        Stamp side in pixels: an image the stamp touches counts (0: the point).
    bands : tuple of str, optional
        None: every band.
    time : (float, float), optional
        MJD **TAI**, ``[t0, t1)``, overlapping each exposure's span (the Butler's
        ``OVERLAPS``; ``FootprintIndex.active``); an end may be infinite (open).
        None: all times.
    dataset_types : tuple of str
        Of ``visit_image``, ``difference_image``.
    cell_deg : float
        Targets are grouped into cells of this side; one query per cell.
    pixel_scale_arcsec : float
        Converts ``size`` to degrees for the search circles (DP1: 0.2).
    """

    ra: FloatArray
    dec: FloatArray
    size: int = 0
    bands: tuple[str, ...] | None = None
    time: tuple[float, float] | None = None
    dataset_types: tuple[str, ...] = ("visit_image",)
    cell_deg: float = 1.0
    pixel_scale_arcsec: float = 0.2

    def __post_init__(self) -> None:
        ra = np.atleast_1d(np.asarray(self.ra, dtype=np.float64))
        dec = np.atleast_1d(np.asarray(self.dec, dtype=np.float64))
        if ra.shape != dec.shape or ra.ndim != 1:
            raise ValueError(f"ra and dec must be 1-d and alike, not {ra.shape}, {dec.shape}")
        if not (np.isfinite(ra).all() and np.isfinite(dec).all()) or (np.abs(dec) > 90).any():
            raise ValueError("ra and dec must be finite, with |dec| <= 90")
        object.__setattr__(self, "ra", ra)
        object.__setattr__(self, "dec", dec)
        bad = [t for t in self.dataset_types if t not in EPOCH_TYPES]
        if bad or not self.dataset_types:
            raise ValueError(
                f"dataset_types must be some of {', '.join(EPOCH_TYPES)}, not {bad or '()'}"
            )
        if self.size < 0:
            raise ValueError(f"size must be >= 0, not {self.size}")
        if self.time is not None:
            t0, t1 = (float(t) for t in self.time)
            if not t0 <= t1:
                raise ValueError(f"time must be an interval (t0 <= t1), not {self.time!r}")
            object.__setattr__(self, "time", (t0, t1))
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(self.bands))
        if not 0 < self.cell_deg <= 30:
            raise ValueError(f"cell_deg must be in (0, 30], not {self.cell_deg!r}")

    @property
    def margin_deg(self) -> float:
        """How far past a target an image may be and still hold part of its stamp
        (half the stamp's diagonal and two pixels, in degrees)."""
        return (self.size / math.sqrt(2.0) + 2.0) * self.pixel_scale_arcsec / 3600.0

    def regions(self) -> list[SearchRegion]:
        """One circle per occupied cell of ``cell_deg``: centred on its targets,
        reaching each of them plus :attr:`margin_deg`."""
        if self.ra.size == 0:
            return []
        grid = Grid(self.cell_deg)
        cells = grid.cell_of(self.ra, self.dec)
        rows = np.argsort(cells, kind="stable").astype(np.int64)
        cells = cells[rows]
        starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
        ends = np.r_[starts[1:], cells.size]
        return [self.circle(rows[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]

    def circle(self, rows: IntArray) -> SearchRegion:
        """The circle around these targets (rows of ``ra``/``dec``), grown by the margin."""
        points = unit(self.ra[rows], self.dec[rows])
        centre = normalize(points.sum(axis=0))
        reach = float(np.degrees(np.arccos(np.clip(points @ centre, -1.0, 1.0)).max()))
        ra = float(np.degrees(np.arctan2(centre[1], centre[0])) % 360.0)
        dec = float(np.degrees(np.arcsin(np.clip(centre[2], -1.0, 1.0))))
        # A circle needs a radius > 0 (DALI); a lone target gets the margin.
        return SearchRegion(ra, dec, max(reach + self.margin_deg, 1e-6), rows)

    def split(self, region: SearchRegion) -> list[SearchRegion]:
        """The region's targets in four smaller circles: halves by the median offset
        east of its centre, each halved by the median offset north. Empty when they
        cannot be split (one target, or all at one place)."""
        rows = region.targets
        points = unit(self.ra[rows], self.dec[rows])
        c = unit(np.array(region.ra), np.array(region.dec))
        pole = np.array([0.0, 0.0, 1.0]) if abs(c[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
        east = normalize(np.cross(pole, c))
        x, y = points @ east, points @ np.cross(c, east)
        parts: list[IntArray] = []
        west = x <= np.median(x)
        for side in (west, ~west):
            if not side.any():
                continue
            south = y <= np.median(y[side])
            parts += [rows[side & south], rows[side & ~south]]
        out = [self.circle(p) for p in parts if p.size]
        if len(out) < 2 or any(r.radius >= region.radius for r in out):
            return []
        return out

    def time_utc(self) -> tuple[float, float] | None:
        """The window in MJD UTC (what SIA's TIME and ObsCore's times use); an open
        end stays infinite."""
        if self.time is None:
            return None
        ends = np.array(self.time, dtype=np.float64)
        finite = np.isfinite(ends)
        ends[finite] = utc_of_tai(ends[finite])
        return float(ends[0]), float(ends[1])


@dataclass(frozen=True)
class EpochAccess:
    """How to reach one epoch image's file.

    ``did``: the IVOA id DataLink and SODA take (services; None for the Butler);
    ``url``: DataLink's signed ``#this`` URL, or the Butler's URI (a local path or
    an ``https://`` URL), as it was when the catalogue was made (``expires``, epoch
    seconds, says until when a signed one holds: ask DataLink again past it, e.g.
    with the session's :class:`~._datalink.LinkResolver`); ``cutout``: the SODA sync
    descriptor; ``error``: DataLink's error for the id, if it had one.
    """

    did: str | None = None
    url: str | None = None
    expires: float | None = None
    cutout: SodaService | None = None
    error: str | None = None


@dataclass(frozen=True)
class EpochCatalog:
    """The epoch images a search's targets need, found by one catalogue.

    Attributes
    ----------
    source : str
        ``sia``, ``obscore`` or ``butler``.
    refs : tuple of EpochRef
        The images some target's stamp touches, by time (then type, detector).
    access : mapping of str to EpochAccess
        By dataset id.
    regions : tuple of SearchRegion
        The circles asked for (after any split).
    queries : int
        Catalogue queries sent (SIA requests, TAP queries, ``query_datasets`` calls);
        DataLink requests are in ``links``.
    rows : int
        Rows those queries returned, before the time, band and footprint filters.
    links : int
        DataLink requests made for ``access``.
    """

    source: str
    refs: tuple[EpochRef, ...]
    access: Mapping[str, EpochAccess]
    regions: tuple[SearchRegion, ...]
    queries: int
    rows: int
    links: int = 0

    def __len__(self) -> int:
        return len(self.refs)

    def index(self) -> FootprintIndex:
        """A :class:`~harvester.epochs.FootprintIndex` over :attr:`refs`."""
        return FootprintIndex.from_refs(self.refs)

    def pairs(self, search: EpochSearch) -> Pairs:
        """The search's (target, image) pairs, as a local run would get them."""
        return self.index().query(
            search.ra,
            search.dec,
            size=search.size,
            time=search.time,
            bands=search.bands,
            dataset_types=search.dataset_types,
        )

    def summary(self) -> str:
        """One line for a plan's quote or a log."""
        q = "query" if self.queries == 1 else "queries"
        return (
            f"{self.source}: {len(self.refs):,} epoch images for {len(self.regions)} "
            f"region(s), {self.queries} {q}, {self.rows:,} rows, {self.links} DataLink requests"
        )


class EpochFinder(Protocol):
    """What the engine's remote sources call: one search in, one catalogue out."""

    source: str

    async def find(self, search: EpochSearch) -> EpochCatalog:
        """The epochs the search's targets need (see :class:`EpochCatalog`)."""
        ...


def finish_catalog(
    source: str,
    search: EpochSearch,
    found: Iterable[EpochRef],
    access: Mapping[str, EpochAccess],
    regions: Sequence[SearchRegion],
    queries: int,
    rows: int,
) -> EpochCatalog:
    """The catalogue of the images that some target needs: ``found`` filtered by the
    search's types, bands and time (exactly as ``FootprintIndex.active``) and by the
    targets' footprints (a pair of estimated coverage > 0), in time order (duplicates
    by id dropped)."""
    unique = list({r.id: r for r in found}.values())
    if unique:
        pairs = FootprintIndex.from_refs(unique).query(
            search.ra,
            search.dec,
            size=search.size,
            time=search.time,
            bands=search.bands,
            dataset_types=search.dataset_types,
        )
        # A pair of estimated coverage 0 (let in by the rounding of the centre
        # pixel) is no epoch of its target; the engine drops it as well.
        used = np.unique(pairs.image[pairs.coverage > 0]).tolist()
        unique = [unique[i] for i in used]
    unique.sort(key=lambda r: (r.mjd_tai, r.dataset_type, r.detector, r.id))
    kept = {r.id for r in unique}
    return EpochCatalog(
        source,
        tuple(unique),
        {k: v for k, v in access.items() if k in kept},
        tuple(regions),
        queries,
        rows,
    )
