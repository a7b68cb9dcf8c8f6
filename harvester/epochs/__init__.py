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
* :func:`align_epochs` — ``--align tract``: a target's epochs warped onto its home
  tract's grid (the box its ``deep_coadd`` cutout has) with reproject, as
  :class:`AlignedEpochs`, what the target pixel files are written from.
* :func:`aperture_photometry` — simple aperture fluxes of every epoch at the
  target's position through each stamp's own WCS (the light-curve pictures);
  :func:`epoch_groups` — the (dataset type, band) groups in the order the outputs
  show them.
* :class:`EpochSpec` / :class:`EpochBatch` — a unit of the engine's work (an
  image and its targets) and its read (stamps, exact coverage, the image's WCS).
* :class:`TimeWindow` — ``run.time``: ``[start, end)`` in MJD TAI, open ends allowed.
* :mod:`._time` — times are MJD TAI (mid-exposure) in memory and on disk,
  ``DATE-AVG`` strings in headers, ``day_obs`` as ``YYYYMMDD``.

Dependency rule: numpy and the standard library; nothing else of harvester but
:mod:`harvester.errors`. Two modules go further: :mod:`._photometry` reads WCS with
astropy, and :mod:`._align` also uses :mod:`harvester.skymap`, :mod:`harvester.masks`
and :mod:`harvester.wcsheader`, importing ``reproject`` (the ``align`` extra) only
when it warps.
"""

from ._align import ALIGN_METHODS, AlignedEpochs, align_epochs
from ._batch import STAMP_STATUSES, EpochBatch, EpochSpec, concat_epoch_batches
from ._index import FootprintIndex
from ._pairs import EpochUnit, Pairs
from ._photometry import (
    ApertureFluxes,
    aperture_photometry,
    default_aperture_arcsec,
    epoch_groups,
)
from ._refs import EPOCH_TYPES, EpochRef, VisitRecord
from ._stamps import EPOCH_COLUMNS, TargetEpochs
from ._time import day_obs_of, day_obs_start_mjd, iso_tai, mjd_of_iso
from ._window import TimeWindow, read_time_window

__all__ = [
    "ALIGN_METHODS",
    "EPOCH_COLUMNS",
    "EPOCH_TYPES",
    "STAMP_STATUSES",
    "AlignedEpochs",
    "ApertureFluxes",
    "EpochBatch",
    "EpochRef",
    "EpochSpec",
    "EpochUnit",
    "FootprintIndex",
    "Pairs",
    "TargetEpochs",
    "TimeWindow",
    "VisitRecord",
    "align_epochs",
    "aperture_photometry",
    "concat_epoch_batches",
    "day_obs_of",
    "day_obs_start_mjd",
    "default_aperture_arcsec",
    "epoch_groups",
    "iso_tai",
    "mjd_of_iso",
    "read_time_window",
]
