"""Build the single-epoch part of a synthetic repository (``harvester synth --epochs``).

For a field (the AGN, and any other positions given), :func:`build_epochs` writes

* ``visit_image`` and ``difference_image`` files for every detector of every visit
  of the schedule (:mod:`._schedule`) whose pixel box, grown by ``margin_px``, holds
  a field position (found with :class:`harvester.epochs.FootprintIndex`): other
  detectors are not written. A visit image is the coadds' static sky drawn with the
  visit's PSF through the detector's WCS (:mod:`._visit_render`), the AGN nuclei at
  their flux at the visit's time (:mod:`._variability`), plus noise: sky noise of
  the visit's depth and the sources' Poisson noise, which the VARIANCE plane
  describes. The difference image is ``visit - template`` as a perfect subtraction
  would leave it: the AGN's ``f(t) - f0`` through the visit's PSF, the visit's own
  noise (the same realisation as the visit image) and the template's, with VARIANCE
  the sum of both. Static sources cancel exactly.
* ``template_coadd`` files on the given patches, laid out as ``deep_coadd``: the
  same sources (AGN at their reference flux ``f0``) drawn with the template's PSF
  (the mean seeing of the best third of the band's visits) and noise (twice the
  deep coadd's sky noise: a template stacks fewer, better visits).

Noise comes from one seeded pool of unit normals per build (twice a detector's
pixels), each image taking a seeded window of it: as good as fresh noise for any
statistic of one image (or of a source across images, whose windows differ), and
twenty times cheaper than drawing 16 million normals per image. Templates take
theirs tile by tile (tiles aligned on the tract grid), so overlapping template
patches agree pixel for pixel, as the deep coadds do. Detector defects (BAD columns
and clusters) are fixed per detector.

Dataset ids are UUIDs of the spec's digest and the data id, so changing anything
that shapes the pixels gives new ids, and an interrupted build resumes: a file
whose header carries the id it should have is kept. Everything is registered in
``index.json`` (sections ``visits``, ``epochs``, ``templates``); the deep coadds'
entries are kept as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..epochs import FootprintIndex
from ..epochs._refs import EpochRef, VisitRecord
from ..errors import RepositoryError
from ..repo import (
    INDEX_NAME,
    DatasetRef,
    Repository,
    load_repository,
    write_index,
)
from ..skymap import SkyMap
from ._epoch_pixels import epoch_task, template_task
from ._epoch_spec import DEMO_VISITS, EpochSpec
from ._schedule import Visit

__all__ = ["DEMO_VISITS", "EpochSpec", "build_epochs"]


def build_epochs(
    root: str | os.PathLike[str],
    spec: EpochSpec,
    jobs: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
) -> Repository:
    """Write the visits' needed detectors and the templates; register them all.

    Parameters
    ----------
    root : path
        The repository (its coadds, if any, must have been built with ``spec.seed``).
    spec : EpochSpec
    jobs : int
        Worker processes.
    progress : callable, optional
        ``progress(done, total, message)`` after each file or file pair.

    Raises
    ------
    RepositoryError
        If the repository's coadds were built with another seed or sky map.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    existing: Repository | None = None
    if (root / INDEX_NAME).is_file():
        # The coadds' entries are kept as they are (the time-domain sections are all
        # written anew below); an index that cannot be read is an error, not an
        # empty repository.
        existing = load_repository(root, check_files=False)
        if existing.seed is not None and existing.seed != spec.seed:
            raise RepositoryError(
                f"{root}: coadds were built with seed {existing.seed}, epochs asked for "
                f"seed {spec.seed}; the static sky must be the same"
            )
        if existing.datasets and existing.skymap.config != spec.skymap:
            raise RepositoryError(f"{root}: coadds are on another sky map than the epochs")
    visits = spec.schedule()
    records, tasks = _plan(spec, visits)
    total = len(tasks) + len(spec.templates)
    epoch_refs: list[EpochRef] = []
    template_refs: list[DatasetRef] = []
    work = [_Work(str(root), spec, visit=v, detector=d) for v, d in tasks]
    work += [_Work(str(root), spec, tract=t, patch=p) for t, p in spec.templates]
    done = 0

    def collect(made: list[EpochRef] | list[DatasetRef], what: str) -> None:
        nonlocal done
        done += 1
        for ref in made:
            if isinstance(ref, EpochRef):
                epoch_refs.append(ref)
            else:
                template_refs.append(ref)
        if progress:
            progress(done, total, what)

    if jobs > 1 and total > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for made, what in pool.map(_run_task, work):
                collect(made, what)
    else:
        for item in work:
            collect(*_run_task(item))
    order = {(t[0].visit, t[1]): i for i, t in enumerate(tasks)}
    epoch_refs.sort(key=lambda r: (order[(r.visit, r.detector)], r.dataset_type != "visit_image"))
    skymap = SkyMap(spec.skymap)
    write_index(
        root,
        skymap,
        existing.datasets.values() if existing is not None else [],
        seed=spec.seed,
        templates=template_refs,
        visits=records,
        epochs=epoch_refs,
    )
    return load_repository(root)


def _plan(
    spec: EpochSpec, visits: list[Visit]
) -> tuple[list[VisitRecord], list[tuple[Visit, int]]]:
    """The visits' records and the (visit, detector) pairs to write."""
    cam = spec.camera
    records = []
    corners: list[tuple[tuple[float, float], ...]] = []
    for v in visits:
        dets = tuple(cam.corners(cam.wcs(v.ra, v.dec, v.rotation, d)) for d in range(cam.detectors))
        corners += dets
        records.append(
            VisitRecord(
                visit=v.visit,
                instrument=cam.name,
                band=v.band,
                physical_filter=v.physical_filter,
                day_obs=v.day_obs,
                seq_num=v.seq_num,
                mjd_tai=v.mjd_tai,
                exptime=v.exptime,
                seeing=v.seeing,
                sky_sigma=v.sky_sigma,
                boresight_ra=v.ra,
                boresight_dec=v.dec,
                rotation=v.rotation,
                detectors=dets,
            )
        )
    field = list(zip(spec.agn.ra, spec.agn.dec, strict=True)) + list(spec.field)
    n = len(corners)
    index = FootprintIndex(corners, np.full(n, cam.width), np.full(n, cam.height))
    pairs = index.query([p[0] for p in field], [p[1] for p in field], size=2 * spec.margin_px + 1)
    needed = sorted(set(pairs.image.tolist()))
    tasks = [(visits[i // cam.detectors], i % cam.detectors) for i in needed]
    return records, tasks


@dataclass(frozen=True)
class _Work:
    """One task for a worker: a detector of a visit, or a patch's templates."""

    root: str
    spec: EpochSpec
    visit: Visit | None = None
    detector: int = 0
    tract: int = 0
    patch: int = 0


def _run_task(work: _Work) -> tuple[list[EpochRef] | list[DatasetRef], str]:
    spec = work.spec
    if work.visit is not None:
        v = work.visit
        made = epoch_task(Path(work.root), spec, v, work.detector)
        return made, f"visit {v.visit} {spec.camera.detector_name(work.detector)} {v.band}"
    made_t = template_task(Path(work.root), spec, work.tract, work.patch)
    return made_t, f"template_coadd tract {work.tract} patch {work.patch}"
