"""The Butler's catalogue of single-epoch images (see :mod:`._epoch_catalogs`).

One ``query_datasets`` per dataset type and search region, the tutorial's query
with the region, bands and time window bound::

    butler.query_datasets("visit_image",
        where="visit_detector_region.region OVERLAPS :region AND band.name IN (:bands) "
              "AND visit.timespan OVERLAPS :t",
        bind={"region": <sphgeom Circle>, "bands": [...], "t": Timespan(TAI ...)},
        with_dimension_records=True)

then the files' URIs: one ``get_many_uris`` for a DirectButler, one ``getURIs`` per
image (several at once) for a RemoteButler, which has no bulk call. Each ref's
expanded data id gives the record: visit, detector, band, physical filter,
``day_obs``, the visit's timespan (TAI) and exposure time, the detector's region
(sphgeom's vertex order, put back in pixel order). A detector's pixel size is not
in the registry: ``detector_size`` gives it per instrument (LSSTComCam's 4072 x 4000
by default).

Dependency rule: numpy, anyio, errors, :mod:`harvester.epochs`,
:mod:`harvester.butler` (errors only) and :mod:`._epoch_records`;
``lsst.daf.butler`` and ``lsst.sphgeom`` lazily.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio

from ..butler._lookup import butler_error
from ..epochs import EpochRef
from ..errors import ConfigError, HarvesterError, TransientError
from ._epoch_records import (
    EpochAccess,
    EpochCatalog,
    EpochSearch,
    SearchRegion,
    finish_catalog,
    pixel_order,
)
from ._fits_header import read_hdus

__all__ = ["DETECTOR_SIZES", "ButlerEpochFinder"]

#: Pixel size of a detector, by instrument (the registry does not hold it).
DETECTOR_SIZES: dict[str, tuple[int, int]] = {"LSSTComCam": (4072, 4000)}
#: ``getURIs`` calls in flight for a Butler without a bulk call (a RemoteButler).
URI_THREADS = 8
_TRIES, _PAUSE = 4, 0.25


def _call(what: str, fn: Any) -> Any:
    """``fn()``, transient failures retried a few times, errors mapped."""
    pause = _PAUSE
    for attempt in range(_TRIES):
        try:
            return fn()
        except HarvesterError:
            raise
        except Exception as exc:
            err = butler_error(exc, what)
            if not isinstance(err, TransientError) or attempt == _TRIES - 1:
                raise err from exc
        time.sleep(pause)
        pause *= 2
    raise AssertionError  # pragma: no cover


class ButlerEpochFinder:
    """Epoch images through a Butler (Direct or Remote): bounded queries.

    Parameters
    ----------
    butler : lsst.daf.butler.Butler
    collections : sequence of str
    detector_size : mapping, optional
        Instrument -> (width, height) in pixels; defaults to :data:`DETECTOR_SIZES`.
    """

    source = "butler"

    def __init__(
        self,
        butler: Any,
        collections: Sequence[str],
        *,
        detector_size: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        self.butler = butler
        self.collections = list(collections)
        self.detector_size = dict(DETECTOR_SIZES if detector_size is None else detector_size)
        self._given = set(self.detector_size) if detector_size is not None else set()
        self.queries = 0
        self.uri_calls = 0
        self._bulk = True
        self._found: dict[str, Any] = {}  # dataset id -> the Butler's ref

    def _query(self, dataset_type: str, search: EpochSearch, region: SearchRegion) -> list[Any]:
        from lsst.daf.butler import Timespan
        from lsst.sphgeom import Angle, Circle, LonLat, UnitVector3d

        where = ["visit_detector_region.region OVERLAPS :region"]
        bind: dict[str, Any] = {
            "region": Circle(
                UnitVector3d(LonLat.fromDegrees(region.ra, region.dec)),
                Angle.fromDegrees(region.radius),
            )
        }
        if search.bands:
            where.append("band.name IN (:bands)")
            bind["bands"] = list(search.bands)
        if search.time is not None:
            from astropy.time import Time

            t0, t1 = (
                Time(t, format="mjd", scale="tai") if math.isfinite(t) else None
                for t in search.time
            )
            where.append("visit.timespan OVERLAPS :t")
            bind["t"] = Timespan(t0, t1)  # None: an open end
        self.queries += 1
        refs: list[Any] = _call(
            f"query_datasets({dataset_type!r}, collections={self.collections})",
            lambda: self.butler.query_datasets(
                dataset_type,
                collections=self.collections,
                where=" AND ".join(where),
                bind=bind,
                with_dimension_records=True,
                limit=None,
                explain=False,
            ),
        )
        return refs

    def _uris(self, refs: list[Any]) -> dict[str, str]:
        """Each ref's file: a local path, or an ``https://`` URL (presigned)."""
        if not refs:
            return {}
        got: dict[Any, Any] | None = None
        if self._bulk:
            self.uri_calls += 1
            try:
                got = self.butler.get_many_uris(refs)
            except (AttributeError, NotImplementedError):
                # A RemoteButler's get_many_uris reaches for a local datastore.
                self._bulk = False
            except Exception as exc:
                raise butler_error(exc, "get_many_uris") from exc
        if got is None:
            self.uri_calls += len(refs)

            def one(ref: Any) -> tuple[Any, Any]:
                return ref, _call(f"getURIs({ref.id})", lambda: self.butler.getURIs(ref))

            with ThreadPoolExecutor(min(URI_THREADS, len(refs))) as pool:
                got = dict(pool.map(one, refs))
        out: dict[str, str] = {}
        for ref, uris in got.items():
            primary = uris.primaryURI
            if primary is None:
                raise ConfigError(f"{ref}: the Butler has no single file for it")
            out[str(ref.id)] = primary.ospath if primary.scheme == "file" else str(primary)
        return out

    def _record(self, ref: Any, uri: str) -> EpochRef:
        d = ref.dataId
        instrument = str(d["instrument"])
        if instrument not in self.detector_size:
            raise ConfigError(
                f"Butler epochs: the pixel size of {instrument}'s detectors is not known "
                f"(known: {', '.join(sorted(self.detector_size))}); pass detector_size"
            )
        width, height = self.detector_size[instrument]
        visit = d.records["visit"]
        begin = float(visit.timespan.begin.tai.mjd)
        end = float(visit.timespan.end.tai.mjd)
        corners = []
        for v in d.region.getVertices():
            from lsst.sphgeom import LonLat

            ll = LonLat(v)
            corners.append((ll.getLon().asDegrees() % 360.0, ll.getLat().asDegrees()))
        local = not uri.startswith(("http://", "https://"))
        return EpochRef(
            id=str(ref.id),
            dataset_type=ref.datasetType.name,
            instrument=instrument,
            visit=int(d["visit"]),
            detector=int(d["detector"]),
            band=str(d["band"]),
            physical_filter=str(d["physical_filter"]),
            day_obs=int(d["day_obs"]),
            mjd_tai=0.5 * (begin + end),
            exptime=float(visit.exposure_time),
            seeing=float("nan"),
            width=width,
            height=height,
            polygon=pixel_order(corners, width, height),
            # The URL without its query: no signature is written down.
            path=uri if local else uri.split("?", 1)[0],
            size=os.path.getsize(uri) if local and os.path.isfile(uri) else 0,
            compressed=False,
        )

    def find_blocking(self, search: EpochSearch) -> EpochCatalog:
        """:meth:`find`, blocking (for a thread, or a notebook)."""
        before = self.queries
        regions = search.regions()
        found: dict[str, Any] = {}
        rows = 0
        for region in regions:
            for dataset_type in search.dataset_types:
                got = self._query(dataset_type, search, region)
                rows += len(got)
                found.update((str(r.id), r) for r in got)
        self._found.update(found)
        self._probe_sizes(found)
        # Records first (no URI needed to filter), URIs for the images kept only.
        draft = {i: self._record(r, "") for i, r in found.items()}
        cat = finish_catalog(
            self.source, search, draft.values(), {}, regions, self.queries - before, rows
        )
        uris = self._uris([found[r.id] for r in cat.refs])
        refs = tuple(self._record(found[r.id], uris[r.id]) for r in cat.refs)
        access = {r.id: EpochAccess(url=uris[r.id]) for r in refs}
        return EpochCatalog(cat.source, refs, access, cat.regions, cat.queries, cat.rows)

    def fresh_uris(self, ids: Sequence[str]) -> dict[str, str]:
        """The files of images found before, asked of the Butler again (a refused or
        expired presigned URL)."""
        return self._uris([self._found[i] for i in ids])

    def _probe_sizes(self, found: Mapping[str, Any]) -> None:
        """Each instrument's detector size from the IMAGE header of one of its files,
        when that file is local and no size was given (the registry has none)."""
        first: dict[str, Any] = {}
        for ref in found.values():
            first.setdefault(str(ref.dataId["instrument"]), ref)
        for instrument, ref in first.items():
            if instrument in self._given:
                continue
            uri = self._uris([ref])[str(ref.id)]
            if uri.startswith(("http://", "https://")):
                continue  # a remote file: DETECTOR_SIZES
            try:
                cards = read_hdus(uri, ["IMAGE"])["IMAGE"].cards
            except (OSError, KeyError):
                continue  # read (and reported) with the unit
            z = "Z" if cards.get("ZIMAGE") else ""
            self.detector_size[instrument] = (
                int(str(cards[f"{z}NAXIS1"])),
                int(str(cards[f"{z}NAXIS2"])),
            )
            self._given.add(instrument)

    async def find(self, search: EpochSearch) -> EpochCatalog:
        """See :class:`~._epoch_catalogs.EpochFinder` (the Butler's calls in a thread)."""
        return await anyio.to_thread.run_sync(self.find_blocking, search)
