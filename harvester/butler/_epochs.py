"""Single-epoch images in the Butler repository: what DP1's registry has for them.

:func:`register_epochs` adds, with the real ``lsst.daf.butler``, what the
tutorials' time-domain queries need, e.g.::

    butler.query_datasets("visit_image", where="band.name = :band AND "
        "visit.timespan OVERLAPS :t AND visit_detector_region.region OVERLAPS POINT(:ra, :dec)",
        bind={...}, order_by=["visit.timespan.begin"])

Tried against the dimension universe (daf_butler 8), this is what it takes:

* ``detector`` records (``full_name`` ``R22_S11`` and so on, raft, purpose);
* ``day_obs`` records with their timespans (a ``visit`` row refers to its
  ``day_obs``: without it the insert fails on a foreign key);
* ``visit`` records: physical filter (the band is implied by it), ``day_obs``,
  ``seq_num``, exposure time, target, the visit's ``timespan`` (TAI, half-open:
  mid-exposure +- half the exposure time) and ``region`` (the convex hull of all its
  detectors, written or not);
* ``visit_detector_region`` records, one per (visit, detector) with a file: the
  detector polygon of ``index.json`` (its pixel box through its header WCS);
* dataset types ``visit_image`` and ``difference_image`` on ``instrument, visit,
  detector`` and ``template_coadd`` on ``band, skymap, tract, patch``, storage
  class ``ExposureF`` as DP1 has them, ingested ``direct`` under the index's ids.

``exposure``, ``group``, ``visit_definition`` and ``visit_system`` records are not
needed by these queries (DP1 has them for its raws) and are not made.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from ..epochs import EPOCH_TYPES, day_obs_start_mjd
from ..repo import Repository

__all__ = ["register_epochs"]

_FORMATTER = "harvester.butler.formatter.AfwFreeCoaddFormatter"


def _polygon(corners: Any) -> Any:
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(float(r), float(d))) for r, d in corners])


def _timespan(begin_mjd: float, end_mjd: float) -> Any:
    from astropy.time import Time
    from lsst.daf.butler import Timespan

    return Timespan(
        Time(begin_mjd, format="mjd", scale="tai"), Time(end_mjd, format="mjd", scale="tai")
    )


def register_epochs(
    butler: Any, repo: Repository, instrument: str, run: str, uri_of: Callable[[str], str] | None
) -> int:
    """Register ``repo``'s visits and ingest its epoch and template files; returns the
    number of datasets ingested. See the module docstring."""
    from lsst.daf.butler import DataCoordinate, DatasetRef, DatasetType, FileDataset

    reg = butler.registry
    universe = butler.dimensions
    filters = {(v.physical_filter, v.band) for v in repo.visits}
    filters |= {(e.physical_filter, e.band) for e in repo.epochs}
    for name, band in sorted(filters):
        reg.syncDimensionData(
            "physical_filter", {"instrument": instrument, "name": name, "band": band}
        )
    n_det = max([len(v.detectors) for v in repo.visits], default=0)
    n_det = max([n_det, *(e.detector + 1 for e in repo.epochs)])
    raft = "R22"
    for d in range(n_det):
        row, col = divmod(d, 3)
        reg.syncDimensionData(
            "detector",
            {
                "instrument": instrument,
                "id": d,
                "full_name": f"{raft}_S{row}{col}",
                "name_in_raft": f"S{row}{col}",
                "raft": raft,
                "purpose": "SCIENCE",
            },
        )
    days = sorted({v.day_obs for v in repo.visits} | {e.day_obs for e in repo.epochs})
    if days:
        reg.insertDimensionData(
            "day_obs",
            *[
                {
                    "instrument": instrument,
                    "id": day,
                    "timespan": _timespan(day_obs_start_mjd(day), day_obs_start_mjd(day) + 1.0),
                }
                for day in days
            ],
        )
    if repo.visits:
        reg.insertDimensionData(
            "visit",
            *[
                {
                    "instrument": instrument,
                    "id": v.visit,
                    "day_obs": v.day_obs,
                    "physical_filter": v.physical_filter,
                    "name": str(v.visit),
                    "seq_num": v.seq_num,
                    "exposure_time": v.exptime,
                    "target_name": "ECDFS",
                    "observation_reason": "science",
                    "science_program": "synthetic-ECDFS",
                    "region": _polygon([c for det in v.detectors for c in det]),
                    "timespan": _timespan(v.t_begin, v.t_end),
                }
                for v in repo.visits
            ],
        )
    regions = {(e.visit, e.detector): e.polygon for e in repo.epochs}
    if regions:
        reg.insertDimensionData(
            "visit_detector_region",
            *[
                {"instrument": instrument, "visit": vis, "detector": det, "region": _polygon(c)}
                for (vis, det), c in sorted(regions.items())
            ],
        )
    for name in EPOCH_TYPES:
        reg.registerDatasetType(
            DatasetType(name, ["instrument", "visit", "detector"], "ExposureF", universe=universe)
        )
    if repo.templates:
        # Their tracts' and patches' records come with the coadds' (_build._register).
        reg.registerDatasetType(
            DatasetType(
                "template_coadd",
                ["band", "skymap", "tract", "patch"],
                "ExposureF",
                universe=universe,
            )
        )
    datasets = []
    for e in repo.epochs:
        dtype = butler.get_dataset_type(e.dataset_type)
        data_id = DataCoordinate.standardize(
            instrument=instrument, visit=e.visit, detector=e.detector, universe=universe
        )
        ref = DatasetRef(dtype, data_id, run=run, id=uuid.UUID(e.id))
        path = uri_of(e.id) if uri_of is not None else str((repo.root / e.path).resolve())
        datasets.append(FileDataset(path=path, refs=[ref], formatter=_FORMATTER))
    if repo.templates:
        dtype = butler.get_dataset_type("template_coadd")
        for t in repo.templates.values():
            data_id = DataCoordinate.standardize(
                band=t.band,
                skymap=repo.skymap.config.name,
                tract=t.tract,
                patch=t.patch,
                universe=universe,
            )
            ref = DatasetRef(dtype, data_id, run=run, id=uuid.UUID(t.id))
            path = uri_of(t.id) if uri_of is not None else str(repo.path_of(t).resolve())
            datasets.append(FileDataset(path=path, refs=[ref], formatter=_FORMATTER))
    if datasets:
        butler.ingest(*datasets, transfer="direct")
    return len(datasets)
