"""A real DirectButler repository over a harvester repository's ``deep_coadd`` files.

:func:`build_butler_repository` does what a Rubin data release does for its
coadds, with the real ``lsst.daf.butler``:

* ``Butler.makeRepo`` (SQLite registry, file datastore);
* the instrument ``LSSTComCam`` with one physical filter per band (in the
  dimension universe a ``band`` is a view of ``physical_filter``; bands cannot be
  inserted on their own);
* the sky map's ``skymap``, ``tract`` and ``patch`` records, with regions from
  harvester's own :class:`~harvester.skymap.SkyMap`: a tract's region is its
  pixel box, a patch's its *outer* box (the coadd's PARENT box), as
  ``lsst.skymap`` registers them, so a spatial query can return a patch whose
  border holds the point;
* the dataset type ``deep_coadd`` (``band, skymap, tract, patch``) with the
  storage class ``ExposureF``, as DP1 has it, and every file ingested with
  ``transfer="direct"`` (the registry points at the files where they are; nothing
  is copied) under its harvester dataset id, so ids agree with ``index.json``;
* the run collection :data:`RUN`, and the chained collection :data:`COLLECTION`
  (``LSSTComCam/DP1``) that the tutorials name;
* when the repository has single-epoch data: its visits, detectors and
  ``visit_image``, ``difference_image`` and ``template_coadd`` datasets
  (:mod:`._epochs`).

The repository is built in a temporary folder and renamed into place, so an
interrupted build leaves no half-made repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..repo import Repository
from ..skymap import SkyMap
from . import require_butler
from ._epochs import register_epochs

__all__ = [
    "COLLECTION",
    "DATASET_TYPE",
    "INSTRUMENT",
    "RUN",
    "BuiltButler",
    "build_butler_repository",
    "patch_region",
    "skymap_hash",
    "tract_region",
]

#: The collection the DP1 tutorials query.
COLLECTION = "LSSTComCam/DP1"
#: The run the files are ingested into (``COLLECTION`` chains to it).
RUN = "LSSTComCam/runs/DP1/synthetic"
INSTRUMENT = "LSSTComCam"
DATASET_TYPE = "deep_coadd"
#: Where ``harvester synth`` puts the Butler repository, under the repository root.
BUTLER_DIR = "butler"
_FORMATTER = "harvester.butler.formatter.AfwFreeCoaddFormatter"


@dataclass(frozen=True)
class BuiltButler:
    """What :func:`build_butler_repository` made."""

    root: Path
    datasets: int
    seconds: float


def skymap_hash(skymap: SkyMap) -> bytes:
    """A digest of the sky map's geometry (the ``skymap`` record's ``hash``)."""
    return hashlib.sha1(json.dumps(asdict(skymap.config), sort_keys=True).encode()).digest()


def _polygon(ra: np.ndarray, dec: np.ndarray) -> object:
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    return ConvexPolygon(
        [
            UnitVector3d(LonLat.fromDegrees(float(r), float(d)))
            for r, d in zip(ra.tolist(), dec.tolist(), strict=True)
        ]
    )


def tract_region(skymap: SkyMap, tract: int) -> object:
    """The tract's pixel box ``[0, tract_dim)`` on the sky (a ConvexPolygon)."""
    edge = skymap.tract_dim - 0.5
    x = np.array([-0.5, edge, edge, -0.5])
    y = np.array([-0.5, -0.5, edge, edge])
    ra, dec = skymap.pixel_to_sky(np.full(4, tract), x, y)
    return _polygon(ra, dec)


def patch_region(skymap: SkyMap, tract: int, patch: int) -> object:
    """The patch's outer box on the sky (a ConvexPolygon), as lsst.skymap registers it."""
    corners = skymap.patch_sky_polygon(tract, patch)
    return _polygon(corners[:, 0], corners[:, 1])


def build_butler_repository(
    repo: Repository,
    where: str | os.PathLike[str] | None = None,
    *,
    uri_of: Callable[[str], str] | None = None,
    bands: Sequence[str] | None = None,
) -> BuiltButler:
    """Make a DirectButler repository over ``repo``'s files; see the module docstring.

    Parameters
    ----------
    repo : Repository
        The harvester repository whose ``deep_coadd`` files are ingested.
    where : path, optional
        The Butler repository folder (default ``<repo.root>/butler``); replaced if
        it exists.
    uri_of : callable, optional
        Maps a dataset id to the URI to ingest (default: the file's absolute path).
        An ``http://`` URI makes a repository whose datastore points at a file
        server, as a Butler server needs (it cannot sign ``file://`` URLs).
    bands : sequence of str, optional
        Physical filters to define (default: the repository's bands).

    Returns
    -------
    BuiltButler
    """
    butler_mod = require_butler()
    Butler, CollectionType = butler_mod.Butler, butler_mod.CollectionType
    t0 = time.perf_counter()
    final = Path(where) if where is not None else repo.root / BUTLER_DIR
    # No dot in the name: the Butler reads a suffix as a config file's format.
    tmp = final.with_name(final.name.replace(".", "_") + "_building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        Butler.makeRepo(str(tmp))
        butler = Butler.from_config(str(tmp), writeable=True, run=RUN)
        try:
            _register(butler, repo, list(bands or repo.bands))
            _ingest(butler, repo, uri_of)
            extra = register_epochs(butler, repo, INSTRUMENT, RUN, uri_of)
            butler.collections.register(COLLECTION, CollectionType.CHAINED)
            butler.collections.redefine_chain(COLLECTION, [RUN])
        finally:
            butler.close()
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuiltButler(final, len(repo) + extra, time.perf_counter() - t0)


def _register(butler: object, repo: Repository, bands: list[str]) -> None:
    from lsst.daf.butler import DatasetType

    sm = repo.skymap
    reg = butler.registry  # type: ignore[attr-defined]
    reg.insertDimensionData(
        "instrument",
        {
            "name": INSTRUMENT,
            "visit_max": 2**30,
            "visit_system": 0,
            "exposure_max": 2**30,
            "detector_max": 9,
            # Only ever a string to the registry; lsst.obs.lsst is not imported.
            "class_name": "lsst.obs.lsst.LsstComCam",
        },
    )
    reg.insertDimensionData(
        "physical_filter",
        *[{"instrument": INSTRUMENT, "name": f"{b}_synthetic", "band": b} for b in bands],
    )
    name = sm.config.name
    n = sm.num_patches
    reg.insertDimensionData(
        "skymap",
        {
            "name": name,
            "hash": skymap_hash(sm),
            "tract_max": sm.num_tracts,
            "patch_nx_max": n,
            "patch_ny_max": n,
        },
    )
    tracts = sorted({ref.tract for ref in repo} | {t.tract for t in repo.templates.values()})
    reg.insertDimensionData(
        "tract", *[{"skymap": name, "id": t, "region": tract_region(sm, t)} for t in tracts]
    )
    # Every patch of every tract with data, as a real sky map registers them all.
    patches = []
    for t in tracts:
        for p in range(n * n):
            cx, cy = sm.patch_index(p)
            patches.append(
                {
                    "skymap": name,
                    "tract": t,
                    "id": p,
                    "cell_x": cx,
                    "cell_y": cy,
                    "region": patch_region(sm, t, p),
                }
            )
    reg.insertDimensionData("patch", *patches)
    dtype = DatasetType(
        DATASET_TYPE,
        ["band", "skymap", "tract", "patch"],
        "ExposureF",
        universe=butler.dimensions,  # type: ignore[attr-defined]
    )
    reg.registerDatasetType(dtype)


def _ingest(butler: object, repo: Repository, uri_of: Callable[[str], str] | None) -> None:
    from lsst.daf.butler import DataCoordinate, DatasetRef, FileDataset

    dtype = butler.get_dataset_type(DATASET_TYPE)  # type: ignore[attr-defined]
    name = repo.skymap.config.name
    datasets = []
    for ref in repo:
        data_id = DataCoordinate.standardize(
            band=ref.band,
            skymap=name,
            tract=ref.tract,
            patch=ref.patch,
            universe=dtype.dimensions.universe,
        )
        bref = DatasetRef(dtype, data_id, run=RUN, id=uuid.UUID(ref.id))
        path = uri_of(ref.id) if uri_of is not None else str(repo.path_of(ref).resolve())
        datasets.append(FileDataset(path=path, refs=[bref], formatter=_FORMATTER))
    butler.ingest(*datasets, transfer="direct")  # type: ignore[attr-defined]
