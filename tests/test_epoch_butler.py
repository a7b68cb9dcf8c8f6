"""Single-epoch data in a real DirectButler: the tutorial's time-domain query finds
the same epochs as the footprint index, under the index's dataset ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.time import Time

from harvester.epochs import FootprintIndex
from harvester.repo import Repository
from harvester.synth import AgnList

butler_mod = pytest.importorskip(
    "lsst.daf.butler", reason="lsst-daf-butler is not installed: pip install 'harvester[butler]'"
)
from harvester.butler._build import COLLECTION, build_butler_repository  # noqa: E402
from harvester.butler._lookup import register_skymap  # noqa: E402

from .conftest import TINY  # noqa: E402

register_skymap(TINY)

WHERE = (
    "band.name = :band AND visit.timespan OVERLAPS :t AND "
    "visit_detector_region.region OVERLAPS POINT(:ra, :dec)"
)


@pytest.fixture(scope="module")
def butler(tiny_epochs: Repository, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = build_butler_repository(tiny_epochs, tmp_path_factory.mktemp("eb") / "butler").root
    b = butler_mod.Butler.from_config(str(root), collections=COLLECTION)
    yield b
    b.close()


def _timespan(t0: float, t1: float) -> Any:
    return butler_mod.Timespan(
        Time(t0, format="mjd", scale="tai"), Time(t1, format="mjd", scale="tai")
    )


@pytest.mark.parametrize("dataset_type", ["visit_image", "difference_image"])
def test_tutorial_query_finds_the_index_epochs(
    butler: Any, tiny_epochs: Repository, tiny_agn: AgnList, dataset_type: str
) -> None:
    """For each AGN, band and a window holding part of the schedule: the Butler's
    (visit, detector) set equals the index's (points inside detector polygons)."""
    index = FootprintIndex.from_refs(tiny_epochs.epochs)
    mjds = sorted(v.mjd_tai for v in tiny_epochs.visits)
    # The window starts inside a visit's exposure and ends inside another's.
    t0, t1 = mjds[2], mjds[-3]
    found = 0
    for ident, ra, dec in zip(tiny_agn.ids, tiny_agn.ra, tiny_agn.dec, strict=True):
        for band in ("g", "z"):
            refs = butler.query_datasets(
                dataset_type,
                where=WHERE,
                bind={"band": band, "t": _timespan(t0, t1), "ra": ra, "dec": dec},
                order_by=["visit.timespan.begin"],
                with_dimension_records=True,
            )
            got = {(r.dataId["visit"], r.dataId["detector"]) for r in refs}
            pairs = index.query(
                [ra], [dec], time=(t0, t1), bands=[band], dataset_types=[dataset_type]
            )
            want = {
                (tiny_epochs.epochs[i].visit, tiny_epochs.epochs[i].detector) for i in pairs.image
            }
            assert got == want, (ident, band)
            ids = {tiny_epochs.epochs[i].id for i in pairs.image}
            assert {str(r.id) for r in refs} == ids
            begins = [r.dataId.records["visit"].timespan.begin.tai.mjd for r in refs]
            assert begins == sorted(begins)
            found += len(got)
    assert found >= 20


def test_records_match_the_index(butler: Any, tiny_epochs: Repository) -> None:
    visits = {r.id: r for r in butler.query_dimension_records("visit", explain=False)}
    assert set(visits) == {v.visit for v in tiny_epochs.visits}
    for v in tiny_epochs.visits:
        rec = visits[v.visit]
        assert rec.day_obs == v.day_obs and rec.physical_filter == v.physical_filter
        assert rec.exposure_time == v.exptime
        assert abs(rec.timespan.begin.tai.mjd - v.t_begin) * 86400 < 1e-5
        assert abs(rec.timespan.end.tai.mjd - v.t_end) * 86400 < 1e-5
        # The visit's region holds every one of its detectors (their centres here).
        for corners in v.detectors:
            lon, lat = np.radians(np.array(corners)).T
            xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])
            centre = xyz.sum(axis=1)
            assert rec.region.contains(*(centre / np.linalg.norm(centre))[:, None])[0]
    days = {r.id for r in butler.query_dimension_records("day_obs", explain=False)}
    assert days == {v.day_obs for v in tiny_epochs.visits}
    ids = {str(r.id) for r in butler.query_datasets("visit_image", limit=None)}
    ids |= {str(r.id) for r in butler.query_datasets("difference_image", limit=None)}
    assert ids == {e.id for e in tiny_epochs.epochs}
    ref = butler.query_datasets("visit_image", limit=1)[0]
    path = Path(butler.getURI(ref).ospath)
    assert path.is_file() and path.name.startswith("visit_image_LSSTComCam_")


def test_templates_are_found_by_patch(
    butler: Any, tiny_epochs: Repository, tiny_agn: AgnList, tiny_skymap: Any
) -> None:
    refs = butler.query_datasets("template_coadd", limit=None)
    assert {str(r.id) for r in refs} == {t.id for t in tiny_epochs.templates.values()}
    place = tiny_skymap.locate(np.array(tiny_agn.ra), np.array(tiny_agn.dec))
    for i, (ra, dec) in enumerate(zip(tiny_agn.ra, tiny_agn.dec, strict=True)):
        home = int(place.patch[i])
        if (int(place.tract[i]), home, "g") not in tiny_epochs.templates:
            continue
        refs = butler.query_datasets(
            "template_coadd",
            where="band.name = 'g' AND patch.region OVERLAPS POINT(:ra, :dec)",
            bind={"ra": ra, "dec": dec},
        )
        assert home in {r.dataId["patch"] for r in refs}
