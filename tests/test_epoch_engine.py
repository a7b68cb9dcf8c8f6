"""The engine over single-epoch images, end to end on the tiny epoch repository.

Oracles, none of them harvester's own code: astropy (each visit file's header WCS,
``Time`` for ``DATE-AVG``, the harvested HDUs' WCS), direct numpy slicing of the
visit files (decompressed by astropy for tile-compressed ones), lsst-sphgeom over
the index's detector polygons, and forced PSF photometry written in these tests at
the position each harvested stamp's own header WCS gives, against the injected
light curves (:func:`harvester.synth.agn_flux`).
"""

from __future__ import annotations

import math
import shutil
import sqlite3
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import h5py
import numpy as np
import numpy.typing as npt
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from harvester.cli import main
from harvester.config import RunConfig, TimeWindow, load_config
from harvester.engine import Harvester, run
from harvester.epochs import EpochRef
from harvester.masks import NO_DATA
from harvester.repo import Repository, write_index
from harvester.report import Report
from harvester.skymap import SkyMap
from harvester.synth import AgnList, agn_flux, agn_reference_flux, build_epochs
from harvester.synth._model import agn_catalog

from .conftest import tiny_epoch_spec
from .test_epoch_synth import BAD, _host, _jacobian, _moffat

SIDE = 31
#: Header keywords (first five letters) of a WCS.
_WCS_KEYS = {"CTYPE", "CRPIX", "CRVAL", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "A_ORD", "B_ORD"}
Columns = dict[str, npt.NDArray[Any]]


def _targets(repo: Repository, agn: AgnList, n: int, seed: int) -> Columns:
    """The AGN, then ``n`` random positions over the detectors' bounding box."""
    corners = np.array([r.polygon for r in repo.epochs])
    rng = np.random.default_rng(seed)
    ra = rng.uniform(corners[..., 0].min(), corners[..., 0].max(), n)
    dec = rng.uniform(corners[..., 1].min(), corners[..., 1].max(), n)
    return {
        "id": np.array([*agn.ids, *(f"r{i:03d}" for i in range(n))]),
        "ra": np.concatenate([agn.ra, ra]),
        "dec": np.concatenate([agn.dec, dec]),
    }


def _config(repo: Repository, out: Path | None, **kw: object) -> RunConfig:
    base: dict[str, object] = {
        "repo": repo.root,
        "images": "visit_image,difference_image",
        "bands": "g,z",
        "size": str(SIDE),
        "formats": "fits,stack",
        "batch_size": 16,
    }
    base.update(kw)
    return load_config(None, **base).replace(output=out)


def _pairs(out: Path) -> dict[tuple[str, str], tuple[str, float | None]]:
    """(target, dataset id) -> (status, coverage), from the ledger's view."""
    db = sqlite3.connect(out / "ledger.sqlite")
    try:
        rows = db.execute("SELECT id, dataset_id, status, coverage FROM target_epochs").fetchall()
    finally:
        db.close()
    return {(t, d): (s, c) for t, d, s, c in rows}


class Visit:
    """A visit file read by astropy: header WCS, planes, header time."""

    def __init__(self, repo: Repository, ref: EpochRef) -> None:
        with fits.open(repo.root / ref.path) as hdul:
            self.primary = hdul[0].header.copy()
            self.wcs = WCS(hdul["IMAGE"].header)
            # .data decompresses a tile-compressed HDU through astropy.
            self.planes = {n: np.array(hdul[n].data) for n in ("IMAGE", "MASK", "VARIANCE")}
        self.mjd = Time(self.primary["DATE-AVG"], format="isot", scale="tai").mjd
        self.exptime = float(self.primary["EXPTIME"])


@pytest.fixture(scope="module")
def visits(tiny_epochs: Repository) -> dict[str, Visit]:
    return {r.id: Visit(tiny_epochs, r) for r in tiny_epochs.epochs}


def _expected(
    visits: dict[str, Visit], refs: tuple[EpochRef, ...], t: Columns, side: int
) -> dict[tuple[str, str], tuple[float, float]]:
    """Every (target, image) whose box touches the detector, by astropy and numpy:
    -> (coverage, distance in pixels of the box's reach to the detector's edge, the
    margin within which the index's great-circle polygons may judge otherwise)."""
    out = {}
    for ref in refs:
        v = visits[ref.id]
        h, w = v.planes["IMAGE"].shape
        x, y = v.wcs.all_world2pix(t["ra"], t["dec"], 0)
        cx, cy = np.floor(x + 0.5), np.floor(y + 0.5)
        x0, y0 = cx - side // 2, cy - side // 2
        ox = np.clip(np.minimum(x0 + side, w) - np.maximum(x0, 0), 0, None)
        oy = np.clip(np.minimum(y0 + side, h) - np.maximum(y0, 0), 0, None)
        # How far the position is from where the box stops touching the detector.
        reach = side // 2 + 0.5
        margin = np.minimum.reduce(
            [
                np.abs(x + reach + 0.5),
                np.abs(w - 1 + reach + 0.5 - x),
                np.abs(y + reach + 0.5),
                np.abs(h - 1 + reach + 0.5 - y),
            ]
        )
        for i in np.flatnonzero(ox * oy > 0).tolist():
            out[(str(t["id"][i]), ref.id)] = (float(ox[i] * oy[i]) / side**2, float(margin[i]))
    return out


@pytest.fixture(scope="module")
def harvested(
    tmp_path_factory: pytest.TempPathFactory, tiny_epochs: Repository, tiny_agn: AgnList
) -> tuple[Path, Columns, Report]:
    out = tmp_path_factory.mktemp("epochs_out")
    t = _targets(tiny_epochs, tiny_agn, 40, 3)
    # Units of at most 3 targets: images of more are read in parts (opened once).
    report = run(_config(tiny_epochs, out, batch_size=3), t)
    return out, t, report


def test_epochs_are_every_image_whose_box_touches_the_target(
    harvested: tuple[Path, Columns, Report], tiny_epochs: Repository, visits: dict[str, Visit]
) -> None:
    """The ledger's stamps (ok, partial) are exactly the (target, image) pairs whose box
    touches the detector by astropy's WCS, with the same coverage; none is missed."""
    out, t, report = harvested
    got = {k: v for k, v in _pairs(out).items() if v[0] in ("ok", "partial")}
    want = _expected(visits, tiny_epochs.epochs, t, SIDE)
    sure = {k for k, (_, margin) in want.items() if margin > 1.0}
    assert sure <= set(got), sorted(sure - set(got))[:5]
    assert set(got) <= set(want)
    assert len(got) > 100
    for k, (status, cov) in got.items():
        assert cov == pytest.approx(want[k][0], abs=1e-12)
        assert status == ("ok" if want[k][0] == 1 else "partial")
    assert report.counts.get("failed", 0) == 0 and report.epochs is not None
    assert report.epochs["ok"] + report.epochs["partial"] == len(got)
    # A pair the index let in whose box misses the detector is recorded no_coverage.
    assert all(s == "no_coverage" for k, (s, _) in _pairs(out).items() if k not in want)


def test_epoch_counts_equal_sphgeom_over_the_index_polygons(
    tmp_path: Path, tiny_epochs: Repository, tiny_agn: AgnList, visits: dict[str, Visit]
) -> None:
    """With 1-pixel stamps an epoch is an image whose detector holds the target: per
    target, as many as lsst-sphgeom finds in the index's detector polygons (targets
    within a pixel of an edge left out: there the great-circle polygon and the TAN-SIP
    edge may differ by the distortion's sub-pixel bend)."""
    sphgeom = pytest.importorskip("lsst.sphgeom", reason="lsst-sphgeom is not installed")
    t = _targets(tiny_epochs, tiny_agn, 150, 11)
    run(_config(tiny_epochs, tmp_path, size="1", formats="stack"), t)
    counts: dict[str, int] = {}
    for (tid, _), (status, _) in _pairs(tmp_path).items():
        counts[tid] = counts.get(tid, 0) + (status == "ok")
    lon, lat = np.radians(t["ra"]), np.radians(t["dec"])
    xyz = np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)
    oracle = np.zeros(len(t["id"]), dtype=int)
    near_edge = np.zeros(len(t["id"]), dtype=bool)
    for ref in tiny_epochs.epochs:
        poly = sphgeom.ConvexPolygon(
            [sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(*c)) for c in ref.polygon]
        )
        oracle += np.asarray(poly.contains(*xyz), dtype=int)
        x, y = visits[ref.id].wcs.all_world2pix(t["ra"], t["dec"], 0)
        in_x = (x > -1.5) & (x < ref.width + 0.5)
        in_y = (y > -1.5) & (y < ref.height + 0.5)
        near_edge |= in_y & ((np.abs(x + 0.5) < 1) | (np.abs(x - ref.width + 0.5) < 1))
        near_edge |= in_x & ((np.abs(y + 0.5) < 1) | (np.abs(y - ref.height + 0.5) < 1))
    keep = np.flatnonzero(~near_edge)
    assert len(keep) > 0.7 * len(t["id"])
    mine = np.array([counts.get(str(t["id"][i]), 0) for i in keep])
    np.testing.assert_array_equal(mine, oracle[keep])
    assert mine.sum() > 100


def test_pixels_are_the_visit_files_own(
    harvested: tuple[Path, Columns, Report], tiny_epochs: Repository, visits: dict[str, Visit]
) -> None:
    """Every plane of every epoch HDU equals a numpy slice of its visit file, NaN and
    NO_DATA off the detector; the stack's rows hold the same pixels."""
    out, _, _ = harvested
    refs = {r.id: r for r in tiny_epochs.epochs}
    checked = 0
    stack = h5py.File(out / "stack.h5")
    table = stack["table"][...]
    where = {(r["id"].decode(), r["dataset_id"].decode()): i for i, r in enumerate(table)}
    for path in sorted((out / "fits").glob("*.fits"))[::3]:
        with fits.open(path) as hdul:
            tid = hdul[0].header["OBJECT"]
            for row in hdul["EPOCHS"].data:
                v = visits[row["dataset_id"]]
                x0, y0 = int(row["x0"]), int(row["y0"])
                number = row["hdu"].split("_", 1)[1]
                for plane in ("IMAGE", "MASK", "VARIANCE"):
                    data = hdul[f"{plane}_{number}"].data
                    full = v.planes[plane]
                    h, w = full.shape
                    fill = NO_DATA if plane == "MASK" else np.nan
                    want = np.full((SIDE, SIDE), fill, dtype=full.dtype.newbyteorder("="))
                    ya, yb, xa, xb = max(y0, 0), min(y0 + SIDE, h), max(x0, 0), min(x0 + SIDE, w)
                    want[ya - y0 : yb - y0, xa - x0 : xb - x0] = full[ya:yb, xa:xb]
                    np.testing.assert_array_equal(data, want)
                    i = where[(tid, row["dataset_id"])]
                    np.testing.assert_array_equal(stack[plane.lower()][i, 0], want)
                assert refs[row["dataset_id"]].visit == row["visit"]
                checked += 1
    assert checked > 40


def test_every_epoch_hdu_puts_the_target_at_the_centre(
    harvested: tuple[Path, Columns, Report], visits: dict[str, Visit]
) -> None:
    """astropy, with each epoch HDU's own header WCS: the target's pixel rounds to the
    stamp's centre; and the EPOCHS table's times are the files' DATE-AVG."""
    out, _, _ = harvested
    seen = 0
    for path in sorted((out / "fits").glob("*.fits"))[::3]:
        with fits.open(path) as hdul:
            ra, dec = hdul[0].header["RA"], hdul[0].header["DEC"]
            table = hdul["EPOCHS"].data
            assert list(table["mjd_tai"]) == sorted(table["mjd_tai"])
            assert hdul[0].header["NEPOCHS"] == len(table)
            for row in table:
                image = hdul[row["hdu"]].header
                x, y = WCS(image).all_world2pix(ra, dec, 0)
                assert math.floor(float(x) + 0.5) == SIDE // 2
                assert math.floor(float(y) + 0.5) == SIDE // 2
                for plane in ("MASK", "VARIANCE"):  # the same WCS on every plane
                    other = hdul[row["hdu"].replace("IMAGE", plane)].header
                    assert all(other[k] == image[k] for k in image if k[:5] in _WCS_KEYS)
                v = visits[row["dataset_id"]]
                assert row["mjd_tai"] == pytest.approx(v.mjd, abs=1e-9)
                assert row["exptime"] == v.exptime
                assert row["seeing"] == v.primary["PSF_FWHM"]
                assert (row["visit"], row["detector"]) == (
                    v.primary["VISIT"],
                    v.primary["DETECTOR"],
                )
                assert row["band"] == v.primary["BAND"]
                assert row["dataset_type"] == v.primary["HIERARCH LSST BUTLER DATASETTYPE"]
                assert Time(image["DATE-AVG"], format="isot", scale="tai").mjd == pytest.approx(
                    v.mjd, abs=1e-9
                )
                seen += 1
    assert seen > 100


# ---- forced photometry, written here -------------------------------------------------


def _fit_stamp(
    img: npt.NDArray[Any],
    var: npt.NDArray[Any],
    mask: npt.NDArray[Any],
    x: float,
    y: float,
    radius: float,
    models: list[Any],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    """Weighted least squares of the stamp's pixels within ``radius`` of (x, y) as
    ``sum(a_k model_k) + plane``; None when less than 60 % of the disk has data."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    dx, dy = xx - x, yy - y
    disk = dx**2 + dy**2 <= radius**2
    use = disk & np.isfinite(img) & ((mask & (BAD | NO_DATA)) == 0)
    if use.sum() < 0.6 * math.pi * radius**2:
        return None
    cols = [m(dx[use], dy[use]) for m in models] + [np.ones(use.sum()), dx[use], dy[use]]
    a = np.stack(cols, axis=1)
    wgt = 1.0 / var[use]
    ata = a.T @ (a * wgt[:, None])
    coef = np.linalg.solve(ata, a.T @ (img[use] * wgt))
    return coef, np.linalg.inv(ata)


@pytest.mark.parametrize("kind", ["visit_image", "difference_image"])
def test_forced_photometry_of_harvested_stamps_recovers_the_light_curves(
    harvested: tuple[Path, Columns, Report],
    tiny_agn: AgnList,
    tiny_skymap: SkyMap,
    visits: dict[str, Visit],
    kind: str,
) -> None:
    """PSF photometry at each stamp's own WCS position (astropy) recovers the injected
    light curve (chi^2/dof near 1, no bias); a non-varying AGN is ruled out."""
    out, _, _ = harvested
    rows = []
    homes = dict(zip(tiny_agn.ids, tiny_skymap.find_tract(tiny_agn.ra, tiny_agn.dec), strict=True))
    for i, ident in enumerate(tiny_agn.ids):
        with fits.open(out / "fits" / f"{ident}.fits") as hdul:
            for row in hdul["EPOCHS"].data:
                if row["dataset_type"] != kind:
                    continue
                number = row["hdu"].split("_", 1)[1]
                img = hdul[row["hdu"]].data.astype(float)
                var = hdul[f"VARIANCE_{number}"].data.astype(float)
                mask = hdul[f"MASK_{number}"].data
                wcs = WCS(hdul[row["hdu"]].header)
                x, y = (float(v) for v in wcs.all_world2pix(tiny_agn.ra[i], tiny_agn.dec[i], 0))
                scale = math.sqrt(abs(np.linalg.det(wcs.wcs.cd))) * 3600
                fwhm = row["seeing"] / scale
                beta = visits[row["dataset_id"]].primary["PSFBETA"]
                psf = partial(_moffat, fwhm, beta)
                truth = float(agn_flux(ident, row["band"], row["mjd_tai"], 7))
                still = agn_reference_flux(ident, row["band"], 7)
                if kind == "visit_image":
                    host = agn_catalog([ident], np.zeros(1), np.zeros(1), 7).subset(
                        np.array([False, True])
                    )
                    jac = _jacobian(wcs, tiny_skymap.tract_wcs(int(homes[ident])), x, y)
                    models = [psf, partial(_host, jac, host, fwhm, scale)]
                else:
                    truth, still = truth - still, 0.0
                    models = [psf]
                fit = _fit_stamp(img, var, mask, x, y, 2.5 * fwhm, models)
                if fit is not None:
                    coef, cov = fit
                    rows.append((coef[0], math.sqrt(cov[0, 0]), truth, still))
    r = np.array(rows)
    assert len(r) >= 25
    resid = (r[:, 0] - r[:, 2]) / r[:, 1]
    chi2 = float(np.mean(resid**2))
    assert 0.45 < chi2 < 1.7, chi2
    assert abs(resid.mean()) < 3 / math.sqrt(len(resid))
    still = float(np.mean(((r[:, 0] - r[:, 3]) / r[:, 1]) ** 2))
    assert still > (2.2 if kind == "visit_image" else 10), still


# ---- the stack -----------------------------------------------------------------------


def test_stack_index_groups_each_target_in_time_order(
    harvested: tuple[Path, Columns, Report],
) -> None:
    """``order``/``offsets`` give each target's rows in time order, the same epochs as
    its FITS file; ``targets`` lists them in target-list order."""
    out, t, _ = harvested
    with h5py.File(out / "stack.h5") as f:
        assert f.attrs["kind"] == "epochs"
        table, order, offsets = f["table"][...], f["order"][...], f["offsets"][...]
        targets = f["targets"][...]
        assert f["image"].shape == (len(table), 1, SIDE, SIDE)
        assert offsets[0] == 0 and offsets[-1] == len(table) == len(order)
        assert sorted(order.tolist()) == list(range(len(table)))
        index = {str(v): i for i, v in enumerate(t["id"])}
        assert [index[v.decode()] for v in targets["id"]] == sorted(targets["index"])
        for k, tid in enumerate(targets["id"]):
            rows = table[order[offsets[k] : offsets[k + 1]]]
            assert (rows["id"] == tid).all() and targets["epochs"][k] == len(rows)
            assert list(rows["mjd_tai"]) == sorted(rows["mjd_tai"])
            with fits.open(out / "fits" / f"{tid.decode()}.fits") as hdul:
                ep = hdul["EPOCHS"].data
                assert [r.decode() for r in rows["dataset_id"]] == list(ep["dataset_id"])


# ---- resume, time, opens, errors -------------------------------------------------------


def _fits_content(out: Path, every: int = 1) -> dict[str, Any]:
    """Per file (every ``every``-th): the EPOCHS table and every HDU's pixels (no
    header: DATE differs)."""
    got = {}
    for path in sorted((out / "fits").glob("*.fits"))[::every]:
        with fits.open(path) as hdul:
            got[path.name] = (
                [tuple(r) for r in hdul["EPOCHS"].data],
                [(h.name, None if h.data is None else h.data.tobytes()) for h in hdul[2:]],
            )
    return got


def _stack_rows(out: Path) -> dict[tuple[str, str], bytes]:
    with h5py.File(out / "stack.h5") as f:
        table = f["table"][...]
        planes = [f[p][...] for p in ("image", "mask", "variance")]
        return {
            (r["id"].decode(), r["dataset_id"].decode()): b"".join(p[i].tobytes() for p in planes)
            for i, r in enumerate(table)
        }


def test_resume_after_an_interruption_equals_an_uninterrupted_run(
    tmp_path: Path, tiny_epochs: Repository, tiny_agn: AgnList
) -> None:
    """A run cancelled mid-way (as Ctrl-C does), then run again, gives the ledger,
    files and stack of an uninterrupted run; the second run does only the pairs the
    first did not, and rebuilds the files of the targets that gained epochs."""
    t = _targets(tiny_epochs, tiny_agn, 12, 5)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    full = run(_config(tiny_epochs, whole, batch_size=4, concurrency=1), t)

    async def interrupted() -> None:
        with anyio.CancelScope() as scope:

            def progress(done: int, total: int) -> None:
                if done >= total // 3:
                    scope.cancel()

            config = _config(tiny_epochs, broken, batch_size=4, concurrency=1)
            async with Harvester(config, progress=progress) as h:
                await h.run(t)

    anyio.run(interrupted)
    first = _pairs(broken)
    assert 0 < len(first) < len(_pairs(whole))
    # What the first run finished: files of the targets it had epochs of, so far.
    db = sqlite3.connect(broken / "ledger.sqlite")
    before = dict(db.execute("SELECT id, digest FROM epoch_outputs").fetchall())
    db.close()
    again = run(_config(tiny_epochs, broken, batch_size=4, concurrency=1), t)
    assert again.processed == len(_pairs(whole)) - len(first)
    assert again.skipped == len(first)
    assert _pairs(broken) == _pairs(whole)
    assert _fits_content(broken) == _fits_content(whole)
    assert _stack_rows(broken) == _stack_rows(whole)
    assert again.counts == full.counts
    db = sqlite3.connect(broken / "ledger.sqlite")
    after = dict(db.execute("SELECT id, digest FROM epoch_outputs").fetchall())
    db.close()
    assert any(before.get(k) != v for k, v in after.items())
    assert not list(broken.rglob("*.tmp"))
    # A third run has nothing left to do, and rebuilds nothing.
    third = run(_config(tiny_epochs, broken, batch_size=4, concurrency=1), t)
    assert third.processed == 0 and third.images_opened == 0


def test_time_window_is_half_open_on_the_exposure_spans(
    tmp_path: Path,
    tiny_epochs: Repository,
    tiny_agn: AgnList,
    visits: dict[str, Visit],
    harvested: tuple[Path, Columns, Report],
) -> None:
    """[start, end) against each exposure's [mid - exptime/2, mid + exptime/2): an
    exposure ending at ``start`` or starting at ``end`` is out, one overlapping either
    end is in. The window's ends are set on two exposures' ends exactly (their
    index values); which images are in is checked against the files' headers
    (astropy, to a microsecond)."""
    refs = sorted(tiny_epochs.epochs, key=lambda r: r.mjd_tai)
    a, b = refs[6], refs[-7]
    window = TimeWindow(a.t_end, b.t_begin)  # starts as exposure a ends, ends as b starts
    t = {"id": np.array(tiny_agn.ids), "ra": np.array(tiny_agn.ra), "dec": np.array(tiny_agn.dec)}
    run(_config(tiny_epochs, tmp_path, formats="stack").replace(time=window), t)
    got = {d for (_, d) in _pairs(tmp_path)}
    assert a.id not in got and b.id not in got
    day = 86_400.0
    for d in got:
        v = visits[d]
        assert v.mjd + v.exptime / 2 / day > a.t_end - 1e-6 / day
        assert v.mjd - v.exptime / 2 / day < b.t_begin + 1e-6 / day
    # Every image of an AGN's stamps (any time: the module's run) with its exposure
    # inside the window is there.
    everything = {d for (i, d) in _pairs(harvested[0]) if i in tiny_agn.ids}
    inside = {
        d
        for d in everything
        if visits[d].mjd - visits[d].exptime / 2 / day > a.t_end + 1e-6 / day
        and visits[d].mjd + visits[d].exptime / 2 / day < b.t_begin - 1e-6 / day
    }
    assert inside and inside <= got
    # One exposure overlapping each end is in: a window ending mid-exposure keeps it.
    mid = TimeWindow(None, b.mjd_tai)
    run(_config(tiny_epochs, tmp_path / "mid", formats="stack").replace(time=mid), t)
    assert b.id in {d for (_, d) in _pairs(tmp_path / "mid")} or b.id not in everything
    # The same window in ISO text (TAI), as --time takes it, reads back to the microsecond.
    start, end = (Time(v, format="mjd", scale="tai").isot for v in (a.t_end, b.t_begin))
    parsed = load_config(None, images="visit_image", time=f"{start}..{end}").time
    assert parsed is not None and parsed.start is not None and parsed.end is not None
    assert parsed.start == pytest.approx(a.t_end, abs=1e-3 / day)
    assert parsed.end == pytest.approx(b.t_begin, abs=1e-3 / day)


def test_each_image_is_opened_once(harvested: tuple[Path, Columns, Report]) -> None:
    """Units split for size (3 targets each) still open each image once."""
    out, _, report = harvested
    images = {d for (_, d) in _pairs(out)}
    assert report.images_opened == len(images) > 50


def test_compressed_visit_files_match_astropy_decompression(
    tmp_path: Path, tiny_tract: int, tiny_agn: AgnList
) -> None:
    """Tile-compressed visit files: every stamp equals astropy's decompressed plane."""
    spec = tiny_epoch_spec(tiny_tract, tiny_agn, visits=2, compress=True, templates=())
    repo = build_epochs(tmp_path / "z", spec)
    assert all(r.compressed for r in repo.epochs)
    t = _targets(repo, tiny_agn, 40, 4)
    out = tmp_path / "out"
    run(_config(repo, out, formats="stack"), t)
    vis = {r.id: Visit(repo, r) for r in repo.epochs}
    with h5py.File(out / "stack.h5") as f:
        table = f["table"][...]
        assert len(table) > 20
        for i, row in enumerate(table):
            v = vis[row["dataset_id"].decode()]
            x0, y0 = int(row["x0"]), int(row["y0"])
            for plane in ("IMAGE", "MASK", "VARIANCE"):
                full = v.planes[plane]
                h, w = full.shape
                ya, yb, xa, xb = max(y0, 0), min(y0 + SIDE, h), max(x0, 0), min(x0 + SIDE, w)
                got = f[plane.lower()][i, 0]
                np.testing.assert_array_equal(
                    got[ya - y0 : yb - y0, xa - x0 : xb - x0], full[ya:yb, xa:xb]
                )


IMAGES = ["--images", "visit_image", "--output"]  # + a folder


def test_single_epoch_runs_refuse_what_they_cannot_do(
    tmp_path: Path,
    tiny_epochs: Repository,
    tiny_repo: Repository,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _config(tiny_epochs, tmp_path)
    t = {"id": np.array(["a"]), "ra": np.array([53.3]), "dec": np.array([-27.8])}
    with pytest.raises(Exception, match="has no single-epoch images for run.images"):
        run(_config(tiny_repo, tmp_path / "coadds"), t)
    # A list whose every row is refused plans to nothing and says why, whatever the
    # repository holds (it is not told that the repository lacks epochs).
    bad = tmp_path / "bad.csv"
    bad.write_text("id,ra,dec\na,53.3,-95\n")
    capsys.readouterr()
    code = main(
        [
            "plan",
            "--repo",
            str(tiny_repo.root),
            "--targets",
            str(bad),
            *IMAGES,
            str(tmp_path / "plan"),
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0 and "stamps             0" in out
    assert "row 1, column 'dec': |dec| > 90 degrees (-95)" in out

    async def stream() -> None:
        async with Harvester(config) as h:
            async for _ in h.harvest(t):
                pass

    with pytest.raises(Exception, match=r"use run\(\) and read the outputs"):
        anyio.run(stream)
    with pytest.raises(Exception, match="needs an output folder"):
        run(config.replace(output=None), t)
    with pytest.raises(Exception, match=r"run\.time.*coadds have no time"):
        load_config(None, time="60600..")
    with pytest.raises(Exception, match="coadd types or single-epoch types, not both"):
        load_config(None, images="deep_coadd,visit_image")
    # Settings that shape the per-target files do not change under a folder.
    run(config, t)
    with pytest.raises(Exception, match="images"):
        run(config.replace(images=("visit_image",)), t)
    with pytest.raises(Exception, match="time"):
        run(replace(config, time=TimeWindow(60000.0, None)), t)


# ---- template_coadd: the coadd path ----------------------------------------------------


def test_template_coadds_go_through_the_coadd_path(
    tmp_path: Path, tiny_repo: Repository, tiny_epochs: Repository, tiny_agn: AgnList
) -> None:
    """A coadd run of both types: per target and band a deep and a template cutout,
    each equal to a numpy slice (astropy's WCS of the file) of a file of its type;
    a template-only run names its HDUs as a deep-only one does, with DSTYPE."""
    root = tmp_path / "both"
    shutil.copytree(tiny_repo.root / "deep_coadd", root / "deep_coadd")
    shutil.copytree(tiny_epochs.root / "template_coadd", root / "template_coadd")
    write_index(root, tiny_repo.skymap, tiny_repo, 7, templates=tiny_epochs.templates.values())
    t = {"id": np.array(tiny_agn.ids), "ra": np.array(tiny_agn.ra), "dec": np.array(tiny_agn.dec)}
    side = 24
    files = {
        kind: [(r.band, root / r.path) for r in refs]
        for kind, refs in (
            ("deep_coadd", tiny_repo.datasets.values()),
            ("template_coadd", tiny_epochs.templates.values()),
        )
    }

    def expected(kind: str, band: str, ra: float, dec: float) -> npt.NDArray[Any] | None:
        for b, path in files[kind]:
            if b != band:
                continue
            with fits.open(path) as hdul:
                data = hdul["IMAGE"].data
                x, y = WCS(hdul["IMAGE"].header).all_world2pix(ra, dec, 0)
                x0 = math.floor(float(x) + 0.5) - side // 2
                y0 = math.floor(float(y) + 0.5) - side // 2
                if (
                    x0 >= 0
                    and y0 >= 0
                    and x0 + side <= data.shape[1]
                    and y0 + side <= data.shape[0]
                ):
                    return np.array(data[y0 : y0 + side, x0 : x0 + side])
        return None

    out = tmp_path / "out"
    config = load_config(
        None, repo=root, images="deep_coadd,template_coadd", bands="g,z", size=str(side)
    ).replace(output=out, formats=("fits", "stack"))
    report = run(config, t)
    assert report.counts["ok"] + report.counts.get("partial", 0) == 5
    checked = 0
    for i, ident in enumerate(tiny_agn.ids):
        with fits.open(out / "fits" / f"{ident}.fits") as hdul:
            names = [h.name for h in hdul[1:]]
            assert names[::3] == ["IMAGE_g", "IMAGE_z", "IMAGE_template_g", "IMAGE_template_z"]
            assert hdul[0].header["DSTYPES"] == "deep_coadd,template_coadd"
            for name, kind, band in (
                ("IMAGE_g", "deep_coadd", "g"),
                ("IMAGE_template_z", "template_coadd", "z"),
            ):
                assert hdul[name].header["DSTYPE"] == kind
                want = expected(kind, band, tiny_agn.ra[i], tiny_agn.dec[i])
                if want is not None:
                    np.testing.assert_array_equal(hdul[name].data, want)
                    checked += 1
            # Templates are the sharper, shallower images: not the deep ones.
            assert not np.array_equal(hdul["IMAGE_g"].data, hdul["IMAGE_template_g"].data)
    assert checked >= 4
    with h5py.File(out / "stack.h5") as f:
        assert f["image"].shape[1] == 4 and f.attrs["bands"] == "gzgz"
        assert f.attrs["dataset_types"] == "deep_coadd,deep_coadd,template_coadd,template_coadd"
    only = tmp_path / "only"
    run(config.replace(images=("template_coadd",), bands=("z",), output=only), t)
    with fits.open(only / "fits" / "agn0.fits") as hdul:
        assert [h.name for h in hdul[1:]] == ["IMAGE", "MASK", "VARIANCE"]
        assert hdul["IMAGE"].header["DSTYPE"] == "template_coadd"
        want = expected("template_coadd", "z", tiny_agn.ra[0], tiny_agn.dec[0])
        assert want is not None
        np.testing.assert_array_equal(hdul["IMAGE"].data, want)


def test_cli_flags_plan_and_run(
    tmp_path: Path,
    tiny_epochs: Repository,
    tiny_agn: AgnList,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--images/--time/--align on `harvester plan` and `run`; bad values name the flag."""
    csv = tmp_path / "t.csv"
    rows = zip(tiny_agn.ids, tiny_agn.ra, tiny_agn.dec, strict=True)
    csv.write_text("id,ra,dec\n" + "".join(f"{i},{r},{d}\n" for i, r, d in rows))
    refs = sorted(tiny_epochs.epochs, key=lambda r: r.mjd_tai)
    start = Time(refs[0].t_begin, format="mjd", scale="tai").isot  # ISO, TAI
    base = ["--repo", str(tiny_epochs.root), "--targets", str(csv), "--bands", "g,z"]
    base += ["--size", "25", "--output", str(tmp_path / "out")]
    flags = ["--images", "difference_image", "--time", f"{start}.."]
    assert main(["plan", *base, *flags]) == 0
    quote = capsys.readouterr().out
    assert "image types        difference_image" in quote
    assert "targets            5 (5 with an epoch)" in quote
    stamps = int(quote.split("stamps             ")[1].split()[0])
    assert main(["run", *base, *flags, "--formats", "fits", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"this run    {stamps} stamps harvested, 0 already done" in out
    assert "grid" not in out and "stack " not in out
    assert (tmp_path / "out" / "stack_parts").is_dir()  # the store, kept
    assert not (tmp_path / "out" / "stack.h5").exists()
    with fits.open(tmp_path / "out" / "fits" / "agn0.fits") as hdul:
        assert set(hdul["EPOCHS"].data["dataset_type"]) == {"difference_image"}
    assert main(["run", *base, *flags, "--formats", "fits", "--quiet"]) == 0
    assert f"0 stamps harvested, {stamps} already done" in capsys.readouterr().out
    assert main(["run", *base, "--images", "visit_image", "--time", "60700..60600"]) == 1
    err = capsys.readouterr().err
    assert "--time 60700..60600: wanted a time window" in err and "is not before end" in err
    assert main(["run", *base, "--images", "visit_image", "--time", "2024-11-01T00:00Z.."]) == 1
    assert "has a time zone; times are TAI" in capsys.readouterr().err


def test_dask_engine_runs_the_same_epochs(
    harvested: tuple[Path, Columns, Report], tmp_path: Path, tiny_epochs: Repository
) -> None:
    """--engine dask (two in-process workers, shards of whole images): the same
    ledger pairs, per-target files and stack rows as one process."""
    pytest.importorskip("distributed", reason="dask[distributed] is not installed")
    from harvester.config import DaskConfig

    out, t, _ = harvested
    dask = DaskConfig(processes=False, dashboard="", shard_size=150)
    config = _config(tiny_epochs, tmp_path).replace(engine="dask", dask=dask)
    report = run(config, t)
    assert _pairs(tmp_path) == _pairs(out)
    assert _fits_content(tmp_path, 4) == _fits_content(out, 4)
    assert _stack_rows(tmp_path) == _stack_rows(out)
    assert report.counts.get("pending", 0) == 0 and report.processed == len(_pairs(out))
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    parts = {p for (p,) in db.execute("SELECT stack_part FROM batches") if p}
    db.close()
    assert len({p.split("-")[2].split(".")[0] for p in parts}) > 1  # several shards wrote
