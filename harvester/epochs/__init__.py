"""Single-epoch images (``visit_image``, ``difference_image``): records, times, coverage.

The data model the time-domain engine builds on:

* :class:`EpochRef` — one epoch image (a detector of a visit, one file), identified
  by ``(dataset_type, visit, detector)`` and its dataset id; ``Repository.epochs``
  lists them (``index.json``'s ``epochs`` section), with each one's band, TAI
  mid-exposure MJD, exposure time, seeing, pixel size and sky polygon.
* :class:`VisitRecord` — one visit: pointing, time, conditions, all its detectors'
  polygons (``index.json``'s ``visits``).
* :class:`FootprintIndex` — which images cover which targets, vectorised:
  ``FootprintIndex.from_refs(repo.epochs).query(ra, dec, size=51, time=(t0, t1),
  bands=["g"], dataset_types=["visit_image"])`` returns :class:`Pairs` (target,
  image, coverage), grouped by image; :meth:`Pairs.units` yields one
  :class:`EpochUnit` (an image and its targets) per file to open.
* :class:`TargetEpochs` — one target's epoch stamps in time order, each with its
  own header WCS: what every per-target output (native FITS, aligned cube,
  pictures) is made from.
* :mod:`._time` — times are MJD TAI (mid-exposure) in memory and on disk,
  ``DATE-AVG`` strings in headers, ``day_obs`` as ``YYYYMMDD``.

Dependency rule: numpy and the standard library; nothing else of harvester but
:mod:`harvester.errors`.
"""

from ._index import FootprintIndex
from ._pairs import EpochUnit, Pairs
from ._refs import EPOCH_TYPES, EpochRef, VisitRecord
from ._stamps import EPOCH_COLUMNS, TargetEpochs
from ._time import day_obs_of, day_obs_start_mjd, iso_tai, mjd_of_iso

__all__ = [
    "EPOCH_COLUMNS",
    "EPOCH_TYPES",
    "EpochRef",
    "EpochUnit",
    "FootprintIndex",
    "Pairs",
    "TargetEpochs",
    "VisitRecord",
    "day_obs_of",
    "day_obs_start_mjd",
    "iso_tai",
    "mjd_of_iso",
]
