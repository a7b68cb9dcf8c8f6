"""Catalogues of single-epoch images, for planning a remote harvest over epochs.

A local run finds its epochs in the repository's index
(:attr:`~harvester.repo.Repository.epochs`); a remote run asks the service's
metadata instead, and gets the same :class:`~harvester.epochs.EpochRef` records:

* **SIA v2** (:class:`SiaEpochFinder`): ``POS=CIRCLE``, ``DPSUBTYPE`` and ``CALIB``
  of the wanted types, ``BAND`` per band, ``TIME`` (MJD UTC), as the DP1 tutorial
  asks (``search(pos=..., calib_level=2, dpsubtype='lsst.visit_image', band=...,
  time=(t1, t2))``). SIA's ``TIME`` constrains levels 1 and 2 only, so difference
  images (level 3) come back for every time and are filtered here by their own
  ``t_min``/``t_max``.
* **ObsCore over TAP** (:class:`ObsCoreEpochFinder`): one ADQL query per region,
  ``dataproduct_subtype``, ``lsst_band`` and ``t_min``/``t_max`` in the WHERE
  clause and the region as ``CONTAINS(POINT('ICRS', s_ra, s_dec), CIRCLE(...)) = 1``
  on the images' centres, widened by their largest radius (the RSP's TAP has no
  ``INTERSECTS``; the tutorial's ``CONTAINS(POINT(ra, dec), s_region)`` is one
  query per target).
* **The Butler** (:class:`~._epoch_butler.ButlerEpochFinder`):
  ``query_datasets(type, where="visit_detector_region.region OVERLAPS :region AND
  band.name IN (:bands) AND visit.timespan OVERLAPS :t")``, a DirectButler or a
  RemoteButler.

**Bounded queries.** The targets of an :class:`EpochSearch` are grouped into cells
of ``cell_deg`` (1 degree: a few DP1 fields' worth of detectors) and each cell is
asked once, as a circle around its targets grown by the stamp's half-size
(:meth:`EpochSearch.regions`): the number of queries grows with the sky the
targets cover, never with their number. SIA's OVERFLOW (more rows than MAXREC)
splits a circle's targets in four (:meth:`EpochSearch.split`) and asks again.

**What comes back** (:class:`EpochCatalog`): the epoch images at least one target's
stamp touches (the catalogue's rows put through a
:class:`~harvester.epochs.FootprintIndex` with the search's targets, time window
and bands: exactly the images a local run would open), in time order, and for each
how to reach its file (:class:`EpochAccess`): the IVOA id and DataLink's signed
``#this`` URL, size and SODA descriptor, or the Butler's URI. Fields the metadata
does not hold are filled as follows: ``seeing`` NaN (neither ObsCore nor the
Butler's visit records carry it), ``compressed`` False (the reader learns it from
the headers), ``size`` DataLink's ``content_length`` (0 for a remote Butler's
URLs), ``path`` the IVOA id (services) or the URI without its query (Butler).
Times are MJD **TAI** (ObsCore's UTC ``t_min``/``t_max`` are converted with
astropy); a polygon's corners are put back in pixel order (:func:`pixel_order`:
the Butler and the RSP's ObsCore give sphgeom's vertex order).

Dependency rule: numpy, astropy (lazily), anyio, :mod:`harvester.epochs`,
config, errors, limits, :mod:`harvester._tap` / :mod:`harvester._tap_pages` (lazily,
ObsCore) and the sources' client, DataLink and VOTable modules.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import numpy as np
import numpy.typing as npt

from ..epochs import EPOCH_TYPES, EpochRef, FootprintIndex, Pairs, day_obs_of
from ..epochs._sphere import Grid, normalize, unit
from ..errors import UsageError
from ..limits import RetryPolicy
from ._client import ServiceClient, safe_url
from ._datalink import LinkResolver, SodaService
from ._repository import _uuid_of
from ._votable import fault, parse_votable

if TYPE_CHECKING:
    from .._tap import TapClient
    from ..config import TapConfig

__all__ = [
    "CATALOG_RETRY",
    "EPOCH_LEVELS",
    "SPECTRAL_RANGES",
    "EpochAccess",
    "EpochCatalog",
    "EpochFinder",
    "EpochSearch",
    "ObsCoreEpochFinder",
    "SearchRegion",
    "SiaEpochFinder",
    "finish_catalog",
    "pixel_order",
    "tai_of_utc",
    "utc_of_tai",
]

log = logging.getLogger("harvester.sources")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Corners = tuple[tuple[float, float], ...]

#: ObsCore ``calib_level`` of each epoch image type (``dp1.yaml``).
EPOCH_LEVELS = {"visit_image": 2, "difference_image": 3}
#: Retries of one catalogue query (SIA has a quota of 70 a minute: wait, not fail).
CATALOG_RETRY = RetryPolicy(attempts=6, base=0.5, cap=30.0, total=300.0)
#: Times a region is split on SIA OVERFLOW before giving up.
MAX_SPLITS = 6
#: The farthest an image's edge may be from its centre, degrees: more than an
#: LSSTComCam detector's half-diagonal (0.16) and a patch's (0.19).
IMAGE_RADIUS_DEG = 0.3


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
        ``OVERLAPS``; ``FootprintIndex.active``). None: all times.
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
        """The window in MJD UTC (what SIA's TIME and ObsCore's times use)."""
        if self.time is None:
            return None
        lo, hi = utc_of_tai(self.time).tolist()
        return float(lo), float(hi)


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


# ---- ObsCore rows (SIA and TAP answer the same columns) -----------------------------------

#: The ObsCore columns an epoch record is made from.
COLUMNS = (
    "obs_publisher_did",
    "dataproduct_subtype",
    "instrument_name",
    "lsst_visit",
    "lsst_detector",
    "lsst_band",
    "lsst_filter",
    "t_min",
    "t_max",
    "t_exptime",
    "s_xel1",
    "s_xel2",
    "s_fov",
    "s_region",
)


def _region_corners(s_region: str) -> list[tuple[float, float]]:
    nums: list[float] = []
    for word in s_region.split():
        try:
            nums.append(float(word))
        except ValueError:
            continue  # POLYGON, ICRS
    return list(zip(nums[0::2], nums[1::2], strict=False))


def refs_of_rows(rows: Sequence[Mapping[str, Any]], where: str) -> list[EpochRef]:
    """:class:`EpochRef` records of ObsCore rows of epoch images (other rows skipped).

    Raises
    ------
    UsageError
        A row lacks a column an epoch image must have (named with ``where``).
    """
    picked = [
        r
        for r in rows
        if str(r.get("dataproduct_subtype") or "").removeprefix("lsst.") in EPOCH_TYPES
    ]
    if not picked:
        return []
    try:
        begin = tai_of_utc([float(r["t_min"]) for r in picked])
        end = tai_of_utc([float(r["t_max"]) for r in picked])
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{where}: an epoch image's row has no t_min/t_max: {exc}") from exc
    out: list[EpochRef] = []
    for i, r in enumerate(picked):
        did = str(r.get("obs_publisher_did") or "")
        try:
            width, height = int(r["s_xel1"]), int(r["s_xel2"])
            mjd = 0.5 * (float(begin[i]) + float(end[i]))
            exptime = r.get("t_exptime")
            band = str(r["lsst_band"]).strip()
            out.append(
                EpochRef(
                    id=_uuid_of(did),
                    dataset_type=str(r["dataproduct_subtype"]).removeprefix("lsst."),
                    instrument=str(r.get("instrument_name") or ""),
                    visit=int(r["lsst_visit"]),
                    detector=int(r["lsst_detector"]),
                    band=band,
                    physical_filter=str(r.get("lsst_filter") or band).strip(),
                    day_obs=day_obs_of(mjd),
                    mjd_tai=mjd,
                    exptime=float(exptime)
                    if exptime not in (None, "")
                    else (float(end[i]) - float(begin[i])) * 86_400.0,
                    seeing=math.nan,
                    width=width,
                    height=height,
                    polygon=pixel_order(_region_corners(str(r["s_region"])), width, height),
                    path=did,
                    size=0,
                    compressed=False,
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{where}: row of {did or 'an image'} is malformed: {exc}") from exc
    return out


async def _with_links(
    links: LinkResolver | None, refs: Sequence[EpochRef]
) -> tuple[list[EpochRef], dict[str, EpochAccess], int]:
    """DataLink's ``#this`` URL, size and SODA descriptor of each ref (batched)."""
    if links is None or not refs:
        return list(refs), {r.id: EpochAccess(did=r.path) for r in refs}, 0
    before = links.posts
    got = await links.resolve([r.path for r in refs])
    out: list[EpochRef] = []
    access: dict[str, EpochAccess] = {}
    for r in refs:
        lk = got[r.path]
        out.append(replace(r, size=lk.size or 0))
        access[r.id] = EpochAccess(
            did=r.path, url=lk.url, expires=lk.expires, cutout=lk.cutout, error=lk.error
        )
    return out, access, links.posts - before


async def _retrying(policy: RetryPolicy, what: str, call: Any) -> Any:
    """``await call()``, retried as ``policy`` says (transient errors only)."""
    start = anyio.current_time()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            waited = anyio.current_time() - start
            if not policy.retryable(exc) or attempt >= policy.attempts or waited >= policy.total:
                raise
            delay = policy.delay(attempt, exc)
            log.warning(f"{what}: {exc}; again in {delay:.1f} s")
            await anyio.sleep(delay)


# ---- SIA ----------------------------------------------------------------------------------


#: Band -> (em_min, em_max) in metres, DP1's ``spectral_ranges`` (``dp1.yaml``; the
#: service's table, :data:`harvester.service._obscore.SPECTRAL_RANGES`, is the same:
#: a test says so).
SPECTRAL_RANGES: dict[str, tuple[float, float]] = {
    "u": (300.0e-9, 393.2e-9),
    "g": (402.6e-9, 548.3e-9),
    "r": (551.0e-9, 689.1e-9),
    "i": (693.6e-9, 818.8e-9),
    "z": (819.2e-9, 920.1e-9),
    "y": (927.8e-9, 1100.0e-9),
}


def _band_middle(band: str) -> float:
    if band not in SPECTRAL_RANGES:
        raise ValueError(f"band {band!r} has no spectral range (known: {sorted(SPECTRAL_RANGES)})")
    lo, hi = SPECTRAL_RANGES[band]
    return 0.5 * (lo + hi)


class SiaEpochFinder:
    """Epoch images through SIA v2: one query per region (see the module docstring).

    Parameters
    ----------
    client : ServiceClient
        The run's client (its SIA rate limit applies).
    url : str
        The SIA query URL (``Endpoints.sia``).
    links : LinkResolver, optional
        Resolves the found images' ids through DataLink (the session's, to share its
        cache); None leaves :class:`EpochAccess` with the ids only.
    maxrec : int
        MAXREC sent (the RSP's default and cap is 60,000).
    """

    source = "sia"

    def __init__(
        self,
        client: ServiceClient,
        url: str,
        links: LinkResolver | None = None,
        *,
        maxrec: int = 60_000,
        retry: RetryPolicy = CATALOG_RETRY,
    ) -> None:
        self.client = client
        self.url = url
        self.links = links
        self.maxrec = maxrec
        self.retry = retry
        self.queries = 0

    def params(self, search: EpochSearch, region: SearchRegion) -> list[tuple[str, str]]:
        """The query's parameters for one region (what the tutorial's pyvo call sends)."""
        params = [("POS", f"CIRCLE {region.ra!r} {region.dec!r} {region.radius!r}")]
        params += [("DPSUBTYPE", f"lsst.{t}") for t in search.dataset_types]
        levels = sorted({EPOCH_LEVELS[t] for t in search.dataset_types})
        params += [("CALIB", str(level)) for level in levels]
        # One wavelength per band, its range's middle: DP1's ranges do not overlap.
        params += [("BAND", repr(_band_middle(b))) for b in search.bands or ()]
        window = search.time_utc()
        if window is not None:
            params.append(("TIME", f"{window[0]!r} {window[1]!r}"))
        params.append(("MAXREC", str(self.maxrec)))
        return params

    async def _ask(
        self, search: EpochSearch, region: SearchRegion
    ) -> tuple[list[dict[str, str | None]], bool]:
        where = f"SIA {safe_url(self.url)}"

        async def once() -> Any:
            self.queries += 1
            return await self.client.request(
                "GET", self.url, service="sia", params=self.params(search, region)
            )

        r = await _retrying(self.retry, where, once)
        doc = await anyio.to_thread.run_sync(parse_votable, r.body)
        if doc.status == "ERROR":
            raise fault(where, doc.status_text)
        return doc.rows, doc.status == "OVERFLOW"

    async def _region(
        self,
        search: EpochSearch,
        region: SearchRegion,
        depth: int,
        rows: list[dict[str, str | None]],
        asked: list[SearchRegion],
    ) -> None:
        got, overflow = await self._ask(search, region)
        if not overflow:
            rows += got
            asked.append(region)
            return
        parts = search.split(region) if depth < MAX_SPLITS else []
        if not parts:
            raise UsageError(
                f"SIA {safe_url(self.url)}: more than MAXREC {self.maxrec:,} rows for the "
                f"circle {region.ra:.5f} {region.dec:.5f} {region.radius:.5f} "
                f"({region.targets.size} targets), which cannot be split further; narrow "
                "the time window or the bands"
            )
        for sub in parts:
            await self._region(search, sub, depth + 1, rows, asked)

    async def find(self, search: EpochSearch) -> EpochCatalog:
        """See :class:`EpochFinder` (one SIA query per region; DataLink in batches)."""
        before = self.queries
        rows: list[dict[str, str | None]] = []
        asked: list[SearchRegion] = []
        for region in search.regions():
            await self._region(search, region, 0, rows, asked)
        refs = await anyio.to_thread.run_sync(refs_of_rows, rows, f"SIA {safe_url(self.url)}")
        cat = finish_catalog(self.source, search, refs, {}, asked, self.queries - before, len(rows))
        found, access, posts = await _with_links(self.links, cat.refs)
        return replace(cat, refs=tuple(found), access=access, links=posts)


# ---- ObsCore over TAP ---------------------------------------------------------------------


class ObsCoreEpochFinder:
    """Epoch images through ADQL on ``ivoa.ObsCore``: one query per region.

    Parameters
    ----------
    tap : harvester._tap.TapClient
        Blocking (pyvo); queries run in a worker thread.
    tap_config : TapConfig
        How queries run (sync or async, paging).
    links : LinkResolver, optional
        As for :class:`SiaEpochFinder`.
    image_radius_deg : float
        The largest distance from an image's centre to its edge: the region's
        circle is widened by it to catch every image whose centre lies outside
        it. An answer holding a larger image (``s_fov / 2``) is asked again with
        that radius.
    """

    source = "obscore"

    def __init__(
        self,
        tap: TapClient,
        tap_config: TapConfig,
        links: LinkResolver | None = None,
        *,
        image_radius_deg: float = IMAGE_RADIUS_DEG,
    ) -> None:
        import dataclasses

        from ..config import TapConfig as _TapConfig

        self.tap = tap
        # A lookup is never truncated: a target query's row limit is not its.
        self.tap_config = dataclasses.replace(
            tap_config, maxrec=_TapConfig().maxrec, allow_truncated=False
        )
        self.links = links
        self.image_radius_deg = image_radius_deg

    @property
    def queries(self) -> int:
        return int(self.tap.queries)

    def adql(self, search: EpochSearch, region: SearchRegion, image_radius: float) -> str:
        """The query of one region."""
        types = ", ".join(f"'lsst.{t}'" for t in search.dataset_types)
        terms = [
            f"dataproduct_subtype IN ({types})",
            f"CONTAINS(POINT('ICRS', s_ra, s_dec), CIRCLE('ICRS', {region.ra!r}, "
            f"{region.dec!r}, {region.radius + image_radius!r})) = 1",
        ]
        if search.bands:
            terms.append(f"lsst_band IN ({', '.join(repr(b) for b in search.bands)})")
        window = search.time_utc()
        if window is not None:
            terms.append(f"t_min < {window[1]!r} AND t_max > {window[0]!r}")
        return f"SELECT {', '.join(COLUMNS)} FROM ivoa.ObsCore WHERE {' AND '.join(terms)}"

    def _rows(self, query: str) -> list[dict[str, Any]]:
        from .._tap_pages import fetch_query

        table = fetch_query(self.tap, query, self.tap_config, "obs_publisher_did").table
        out: list[dict[str, Any]] = []
        for row in table:
            out.append(
                {name: None if np.ma.is_masked(row[name]) else row[name] for name in table.colnames}
            )
        return out

    def find_blocking(self, search: EpochSearch) -> tuple[list[EpochRef], list[SearchRegion], int]:
        """The rows' records of every region (blocking), the regions and the row count."""
        where = f"TAP {self.tap.url}"
        refs: list[EpochRef] = []
        regions = search.regions()
        n = 0
        for region in regions:
            radius = self.image_radius_deg
            rows = self._rows(self.adql(search, region, radius))
            widest = max((float(r["s_fov"]) / 2 for r in rows if r.get("s_fov")), default=0.0)
            if widest > radius:
                log.warning(
                    f"{where}: an image reaches {widest:.3f} degrees from its centre, more "
                    f"than the {radius:.3f} assumed; asking again"
                )
                rows = self._rows(self.adql(search, region, widest))
            n += len(rows)
            refs += refs_of_rows(rows, where)
        return refs, regions, n

    async def find(self, search: EpochSearch) -> EpochCatalog:
        """See :class:`EpochFinder` (one ADQL query per region; DataLink in batches)."""
        before = self.queries
        refs, regions, n = await anyio.to_thread.run_sync(self.find_blocking, search)
        cat = finish_catalog(self.source, search, refs, {}, regions, self.queries - before, n)
        found, access, posts = await _with_links(self.links, cat.refs)
        return replace(cat, refs=tuple(found), access=access, links=posts)
