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

The records (search, catalogue, access) are :mod:`._epoch_records`'s, re-exported
here: this module and :mod:`._epoch_butler` are what a remote source imports.

Dependency rule: numpy, anyio, :mod:`harvester.epochs`, config, errors, limits,
:mod:`harvester._tap` / :mod:`harvester._tap_pages` (lazily, ObsCore) and the
sources' client, DataLink, VOTable and epoch-record modules.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from ..epochs import EPOCH_TYPES, EpochRef, day_obs_of
from ..errors import UsageError
from ..limits import RetryPolicy
from ._client import ServiceClient, safe_url
from ._datalink import LinkResolver
from ._epoch_records import (
    EPOCH_LEVELS,
    EpochAccess,
    EpochCatalog,
    EpochFinder,
    EpochSearch,
    SearchRegion,
    finish_catalog,
    pixel_order,
    tai_of_utc,
    utc_of_tai,
)
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
    "refs_of_rows",
    "tai_of_utc",
    "utc_of_tai",
]

log = logging.getLogger("harvester.sources")

#: Retries of one catalogue query (SIA has a quota of 70 a minute: wait, not fail).
CATALOG_RETRY = RetryPolicy(attempts=6, base=0.5, cap=30.0, total=300.0)
#: Times a region is split on SIA OVERFLOW before giving up.
MAX_SPLITS = 6
#: The farthest an image's edge may be from its centre, degrees: more than an
#: LSSTComCam detector's half-diagonal (0.16) and a patch's (0.19).
IMAGE_RADIUS_DEG = 0.3


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


def _dali(t: float) -> str:
    """A number as DALI writes it (infinities ``-Inf``, ``+Inf``: an open end)."""
    return repr(t) if math.isfinite(t) else ("+Inf" if t > 0 else "-Inf")


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
            params.append(("TIME", " ".join(_dali(t) for t in window)))
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
        if window is not None and math.isfinite(window[1]):
            terms.append(f"t_min < {window[1]!r}")
        if window is not None and math.isfinite(window[0]):
            terms.append(f"t_max > {window[0]!r}")
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
