"""Synthetic single-epoch data: DP1's layout, WCS, photometry, schedule, determinism.

Oracles: astropy (each file's own header WCS, ``Time`` for ``DATE-AVG``), lsst-sphgeom
(which detectors hold which AGN), and forced photometry written here in numpy at
the position the header WCS gives, against the sky model's light curves
(:func:`harvester.synth.agn_flux`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from astropy.io import fits
from astropy.time import Time, TimeDelta
from astropy.wcs import WCS

from harvester.epochs import EpochRef
from harvester.errors import RepositoryError
from harvester.masks import MASK_PLANES
from harvester.repo import Repository
from harvester.skymap import SkyMap
from harvester.synth import AgnList, agn_flux, agn_reference_flux, build_epochs
from harvester.synth._model import agn_catalog

from .conftest import TINY_CAMERA, tiny_epoch_spec

FloatArray = npt.NDArray[np.float64]
BAD = (1 << MASK_PLANES["BAD"]) | (1 << MASK_PLANES["SAT"])


def _open(repo: Repository, ref: EpochRef) -> tuple[fits.Header, WCS, Any, Any, Any]:
    with fits.open(repo.root / ref.path) as hdul:
        img = hdul["IMAGE"]
        return (
            hdul[0].header,
            WCS(img.header),
            img.data.astype(float),
            hdul["VARIANCE"].data.astype(float),
            hdul["MASK"].data,
        )


def test_files_are_laid_out_as_dp1(tiny_epochs: Repository) -> None:
    visits = {v.visit: v for v in tiny_epochs.visits}
    for ref in tiny_epochs.epochs[:6]:
        with fits.open(tiny_epochs.root / ref.path) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
            h = hdul[0].header
            assert hdul[0].data is None
            assert Time(h["DATE-AVG"], format="isot", scale="tai").mjd == pytest.approx(
                ref.mjd_tai, abs=1e-9
            )
            assert h["TIMESYS"] == "TAI" and h["EXPTIME"] == ref.exptime == 30.0
            assert (h["VISIT"], h["DETECTOR"], h["BAND"]) == (ref.visit, ref.detector, ref.band)
            assert (h["FILTER"], h["DAYOBS"]) == (ref.physical_filter, ref.day_obs)
            assert h["INSTRUMENT"] == "LSSTComCam" and h["ROTTYPE"] == "SKY"
            v = visits[ref.visit]
            assert (h["BORE-RA"], h["BORE-DEC"], h["BORE-ROTANG"]) == (
                v.boresight_ra,
                v.boresight_dec,
                v.rotation,
            )
            assert h["PSF_FWHM"] == ref.seeing == v.seeing
            assert h["HIERARCH LSST BUTLER ID"] == ref.id
            assert h["HIERARCH LSST BUTLER DATASETTYPE"] == ref.dataset_type
            assert h["HAS-SIMULATED-CONTENT"] is True
            for name, dtype in (("IMAGE", ">f4"), ("MASK", ">i4"), ("VARIANCE", ">f4")):
                plane = hdul[name]
                assert plane.data.dtype == np.dtype(dtype)
                assert plane.data.shape == (TINY_CAMERA.height, TINY_CAMERA.width)
                assert plane.header["CTYPE1"] == "RA---TAN-SIP"
                assert (plane.header["LTV1"], plane.header["LTV2"]) == (0, 0)
                assert plane.header["CRVAL1A"] == 0.0 and plane.header["CTYPE1A"] == "LINEAR"
            assert WCS(hdul["IMAGE"].header).sip is not None
            assert (hdul["VARIANCE"].data > 0).all()


def test_polygons_are_the_pixel_box_through_the_header_wcs(tiny_epochs: Repository) -> None:
    w, h = TINY_CAMERA.width, TINY_CAMERA.height
    x = np.array([-0.5, w - 0.5, w - 0.5, -0.5])
    y = np.array([-0.5, -0.5, h - 0.5, h - 0.5])
    visits = {v.visit: v for v in tiny_epochs.visits}
    for ref in tiny_epochs.epochs:
        wcs = _open(tiny_epochs, ref)[1]
        ra, dec = wcs.all_pix2world(x, y, 0)
        got = np.array(ref.polygon)
        np.testing.assert_allclose((got[:, 0] - ra + 180) % 360 - 180, 0, atol=1e-9)
        np.testing.assert_allclose(got[:, 1], dec, atol=1e-9)
        assert visits[ref.visit].detectors[ref.detector] == ref.polygon


def test_distortion_is_there_and_sub_pixel(tiny_epochs: Repository) -> None:
    """The SIP terms move pixels by a fraction of a pixel (the raft's corner most)."""
    worst = 0.0
    for ref in tiny_epochs.epochs[::2]:
        wcs = _open(tiny_epochs, ref)[1]
        yy, xx = np.mgrid[0 : TINY_CAMERA.height : 9, 0 : TINY_CAMERA.width : 9]
        ra, dec = wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
        x0, y0 = wcs.wcs_world2pix(ra, dec, 0)
        worst = max(worst, float(np.hypot(x0 - xx.ravel(), y0 - yy.ravel()).max()))
    assert 0.05 < worst < 1.0


# ---- forced photometry, written here --------------------------------------------------


def _moffat(fwhm: float, beta: float, dx: FloatArray, dy: FloatArray) -> FloatArray:
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    out: FloatArray = (beta - 1) / (math.pi * alpha**2) * (1 + (dx**2 + dy**2) / alpha**2) ** -beta
    return out


def _host(
    jac: FloatArray, host: Any, fwhm: float, scale: float, dx: FloatArray, dy: FloatArray
) -> FloatArray:
    """The AGN host's profile: a Sersic of the sky model's shape (defined in its tract's
    pixels, ``jac`` maps detector pixel offsets there), effective radius broadened by
    the PSF as the model documents, ``hypot(r_eff, 0.6 FWHM)``."""
    tx = jac[0, 0] * dx + jac[0, 1] * dy
    ty = jac[1, 0] * dx + jac[1, 1] * dy
    c, s = math.cos(host.pa_rad[0]), math.sin(host.pa_rad[0])
    u = tx * c + ty * s
    v = (-tx * s + ty * c) / host.axis_ratio[0]
    re = math.hypot(host.r_eff_arcsec[0] / scale, 0.6 * fwhm)
    n = host.sersic_n[0]
    bn = 2 * n - 1 / 3 + 4 / (405 * n)
    out: FloatArray = np.exp(-bn * ((np.hypot(u, v) / re) ** (1 / n) - 1))
    return out


def _jacobian(det: WCS, tract: WCS, x: float, y: float) -> FloatArray:
    """d(tract pixel) / d(detector pixel), through both WCSs (astropy)."""
    cols = []
    for ddx, ddy in ((0.5, 0.0), (0.0, 0.5)):
        ra, dec = det.all_pix2world([x + ddx, x - ddx], [y + ddy, y - ddy], 0)
        tx, ty = tract.all_world2pix(ra, dec, 0)
        cols.append([tx[0] - tx[1], ty[0] - ty[1]])
    return np.array(cols).T


def _fit(
    img: FloatArray,
    var: FloatArray,
    mask: Any,
    x: float,
    y: float,
    radius: float,
    models: list[Any],
) -> tuple[FloatArray, FloatArray] | None:
    """Weighted least squares of img = sum(a_k model_k) + plane in a disk; None if the
    disk leaves the image. Returns (coefficients, their covariance)."""
    h, w = img.shape
    if not (radius <= x <= w - 1 - radius and radius <= y <= h - 1 - radius):
        return None
    yy, xx = np.mgrid[0:h, 0:w]
    dx, dy = xx - x, yy - y
    use = (dx**2 + dy**2 <= radius**2) & ((mask & BAD) == 0)
    # A sloped background takes up the far wings of neighbouring galaxies.
    cols = [m(dx[use], dy[use]) for m in models] + [np.ones(use.sum()), dx[use], dy[use]]
    a = np.stack(cols, axis=1)
    wgt = 1.0 / var[use]
    ata = a.T @ (a * wgt[:, None])
    coef = np.linalg.solve(ata, a.T @ (img[use] * wgt))
    return coef, np.linalg.inv(ata)


def _photometry(
    repo: Repository, agn: AgnList, skymap: SkyMap, kind: str
) -> list[tuple[float, float, float, float]]:
    """(measured, error, truth, no-variability truth) of every AGN in every ``kind``
    image it fits in."""
    out = []
    ra, dec = np.array(agn.ra), np.array(agn.dec)
    homes = skymap.find_tract(ra, dec)
    for ref in repo.epochs:
        if ref.dataset_type != kind:
            continue
        header, wcs, img, var, mask = _open(repo, ref)
        scale = math.sqrt(abs(np.linalg.det(wcs.wcs.cd))) * 3600
        fwhm = header["PSF_FWHM"] / scale
        beta = header["PSFBETA"]
        xs, ys = wcs.all_world2pix(ra, dec, 0)
        for i, ident in enumerate(agn.ids):
            x, y = float(xs[i]), float(ys[i])
            psf = partial(_moffat, fwhm, beta)
            mjd = Time(header["DATE-AVG"], format="isot", scale="tai").mjd
            truth = float(agn_flux(ident, ref.band, mjd, 7))
            still = agn_reference_flux(ident, ref.band, 7)
            if kind == "visit_image":
                host = agn_catalog([ident], np.zeros(1), np.zeros(1), 7).subset(
                    np.array([False, True])
                )
                jac = _jacobian(wcs, skymap.tract_wcs(int(homes[i])), x, y)
                gal = partial(_host, jac, host, fwhm, scale)
                fit = _fit(img, var, mask, x, y, 2.5 * fwhm, [psf, gal])
            else:
                truth, still = truth - still, 0.0
                fit = _fit(img, var, mask, x, y, 2.5 * fwhm, [psf])
            if fit is not None:
                coef, cov = fit
                out.append((float(coef[0]), float(math.sqrt(cov[0, 0])), truth, still))
    return out


@pytest.mark.parametrize("kind", ["visit_image", "difference_image"])
def test_forced_photometry_recovers_the_light_curves(
    tiny_epochs: Repository, tiny_agn: AgnList, tiny_skymap: SkyMap, kind: str
) -> None:
    """chi^2/dof near 1 against the injected light curves, no bias; and the curves
    do vary (a constant flux is ruled out), so the test sees the variability."""
    rows = np.array(_photometry(tiny_epochs, tiny_agn, tiny_skymap, kind))
    assert len(rows) >= 25
    resid = (rows[:, 0] - rows[:, 2]) / rows[:, 1]
    chi2 = float(np.mean(resid**2))
    assert 0.45 < chi2 < 1.7, chi2
    assert abs(resid.mean()) < 3 / math.sqrt(len(resid))
    if kind == "visit_image":
        assert np.median(rows[:, 0] / rows[:, 1]) > 5  # a real detection each time
    # Against an AGN that does not vary, the same measurements fail (on visit images
    # the free host amplitude triples the errors; differences have no host).
    still = np.mean(((rows[:, 0] - rows[:, 3]) / rows[:, 1]) ** 2)
    assert still > (2.2 if kind == "visit_image" else 10), still


def test_sources_sit_where_the_header_wcs_puts_them(
    tiny_epochs: Repository, tiny_agn: AgnList
) -> None:
    """The AGN's light-weighted centre in each visit image is at astropy's pixel
    position of its RA/Dec (the host is centred on the nucleus)."""
    ra, dec = np.array(tiny_agn.ra), np.array(tiny_agn.dec)
    offsets = []
    for ref in tiny_epochs.epochs:
        if ref.dataset_type != "visit_image":
            continue
        _, wcs, img, _, _ = _open(tiny_epochs, ref)
        xs, ys = wcs.all_world2pix(ra, dec, 0)
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            r = 7
            if not (r + 1 <= x <= img.shape[1] - r - 2 and r + 1 <= y <= img.shape[0] - r - 2):
                continue
            cx, cy = round(x), round(y)
            win = img[cy - r : cy + r + 1, cx - r : cx + r + 1]
            win = win - np.median(img)
            yy, xx = np.mgrid[cy - r : cy + r + 1, cx - r : cx + r + 1]
            # Weighted by a circular window centred on the prediction: unbiased for a
            # source there, pulled towards any offset.
            wgt = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2)) * win
            offsets.append(((wgt * xx).sum() / wgt.sum() - x, (wgt * yy).sum() / wgt.sum() - y))
    off = np.array(offsets)
    assert len(off) >= 15
    assert np.abs(off).max() < 0.25
    assert np.abs(off.mean(axis=0)).max() < 0.05


def test_only_the_detectors_the_field_needs_are_written(
    tiny_epochs: Repository, tiny_agn: AgnList
) -> None:
    """Every detector holding an AGN (sphgeom on the visit's detector polygons) has
    its files; every written detector has an AGN within the margin (its own WCS)."""
    sphgeom = pytest.importorskip("lsst.sphgeom", reason="lsst-sphgeom is not installed")
    written = {(e.visit, e.detector) for e in tiny_epochs.epochs}
    assert {
        (e.visit, e.detector) for e in tiny_epochs.epochs if e.dataset_type == "visit_image"
    } == {(e.visit, e.detector) for e in tiny_epochs.epochs if e.dataset_type == "difference_image"}
    lon, lat = np.radians(tiny_agn.ra), np.radians(tiny_agn.dec)
    x, y, z = np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)
    holding = set()
    for v in tiny_epochs.visits:
        for d, corners in enumerate(v.detectors):
            poly = sphgeom.ConvexPolygon(
                [sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(*c)) for c in corners]
            )
            if np.asarray(poly.contains(x, y, z)).any():
                holding.add((v.visit, d))
    assert holding and holding <= written
    assert len(written) < 9 * len(tiny_epochs.visits)  # some detectors were left out
    m = 10
    for e in tiny_epochs.epochs:
        if e.dataset_type != "visit_image":
            continue
        xs, ys = _open(tiny_epochs, e)[1].all_world2pix(tiny_agn.ra, tiny_agn.dec, 0)
        near = (xs > -0.5 - m - 1) & (xs < e.width - 0.5 + m + 1)
        near &= (ys > -0.5 - m - 1) & (ys < e.height - 0.5 + m + 1)
        assert near.any(), (e.visit, e.detector)


def test_schedule_follows_dp1_conventions(tiny_epochs: Repository) -> None:
    visits = tiny_epochs.visits
    assert [v.band for v in visits].count("g") > [v.band for v in visits].count("z") > 0
    mjds = [v.mjd_tai for v in visits]
    assert mjds == sorted(mjds)
    for v in visits:
        assert v.visit == v.day_obs * 100_000 + v.seq_num
        t = Time(v.mjd_tai, format="mjd", scale="tai")
        assert int((t - TimeDelta(0.5, format="jd")).strftime("%Y%m%d")) == v.day_obs
        assert v.exptime == 30.0 and 0 <= v.rotation < 360
        assert 0.5 < v.seeing < 2.5 and v.physical_filter == f"{v.band}_synthetic"
    assert len({v.day_obs for v in visits}) >= 2


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.fits"))
    } | {"index.json": hashlib.sha256((root / "index.json").read_bytes()).hexdigest()}


def test_same_seed_same_bytes_compressed_and_resumable(
    tmp_path: Path, tiny_tract: int, tiny_agn: AgnList
) -> None:
    spec = tiny_epoch_spec(
        tiny_tract, tiny_agn, visits=1, compress=True, templates=((tiny_tract, 5),)
    )
    a = build_epochs(tmp_path / "a", spec)
    build_epochs(tmp_path / "b", spec, jobs=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert all(e.compressed for e in a.epochs) and len(a.epochs) >= 2
    with fits.open(a.root / a.epochs[0].path) as hdul:
        assert isinstance(hdul["IMAGE"], fits.CompImageHDU)
    # A rebuild keeps every file (same ids in the headers) and leaves no temporary.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.fits")}
    build_epochs(tmp_path / "a", spec)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.fits")} == mtimes
    assert not list(tmp_path.rglob("*.tmp"))
    # Compression is lossy only within a sixteenth of the visit's noise.
    plain = build_epochs(tmp_path / "p", replace(spec, compress=False))
    for zref, pref in zip(a.epochs, plain.epochs, strict=True):
        assert zref.key == pref.key
        with fits.open(a.root / zref.path) as z, fits.open(plain.root / pref.path) as p:
            np.testing.assert_array_equal(z["MASK"].data, p["MASK"].data)
            sigma = np.sqrt(p["VARIANCE"].data.min())
            assert np.abs(z["IMAGE"].data - p["IMAGE"].data).max() <= sigma / 16 * 0.51
            np.testing.assert_allclose(z["VARIANCE"].data, p["VARIANCE"].data, rtol=1e-3)
    other = build_epochs(tmp_path / "c", replace(spec, seed=8, templates=()))
    assert {e.id for e in other.epochs}.isdisjoint({e.id for e in a.epochs})


def test_templates_are_laid_out_as_deep_coadds(
    tiny_epochs: Repository, tiny_repo: Repository, tiny_agn: AgnList, tiny_skymap: SkyMap
) -> None:
    """Same patch grid and WCS as the deep coadd; AGN at their reference flux; a
    sharper PSF than the visits' median."""
    seeing = {b: np.median([v.seeing for v in tiny_epochs.visits if v.band == b]) for b in "gz"}
    measured = []
    for key, tref in tiny_epochs.templates.items():
        deep = tiny_repo.get(*key)
        assert deep is not None and tref.dataset_type == "template_coadd"
        with fits.open(tiny_epochs.path_of(tref)) as t, fits.open(tiny_repo.path_of(deep)) as d:
            assert [h.name for h in t] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
            for card in ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "LTV1", "LTV2"):
                assert t["IMAGE"].header[card] == d["IMAGE"].header[card]
            assert t[0].header["HIERARCH LSST BUTLER DATASETTYPE"] == "template_coadd"
            assert t[0].header["PSF_FWHM"] < seeing[tref.band]
            assert t["IMAGE"].data.shape == d["IMAGE"].data.shape
            wcs = WCS(t["IMAGE"].header)
            img = t["IMAGE"].data.astype(float)
            var = t["VARIANCE"].data.astype(float)
            mask = t["MASK"].data
            fwhm = t[0].header["PSF_FWHM"] / 0.2
            xs, ys = wcs.all_world2pix(tiny_agn.ra, tiny_agn.dec, 0)
            tract_wcs = tiny_skymap.tract_wcs(tref.tract)
            for i, ident in enumerate(tiny_agn.ids):
                x, y = float(xs[i]), float(ys[i])
                host = agn_catalog([ident], np.zeros(1), np.zeros(1), 7).subset(
                    np.array([False, True])
                )
                jac = _jacobian(wcs, tract_wcs, x, y)
                fit = _fit(
                    img,
                    var,
                    mask,
                    x,
                    y,
                    2.5 * fwhm,
                    [partial(_moffat, fwhm, 3.0), partial(_host, jac, host, fwhm, 0.2)],
                )
                if fit is not None:
                    f0 = agn_reference_flux(ident, tref.band, 7)
                    measured.append((fit[0][0] - f0) / math.sqrt(fit[1][0, 0]))
    res = np.array(measured)
    assert len(res) >= 4
    assert np.mean(res**2) < 3.0
    # Template patches are windows on one tract image: overlaps agree exactly.
    a, b = tiny_skymap.patch_outer_box(5), tiny_skymap.patch_outer_box(6)
    x0, x1, y0, y1 = max(a.x0, b.x0), min(a.x1, b.x1), max(a.y0, b.y0), min(a.y1, b.y1)
    ta = tiny_epochs.templates[(next(iter(tiny_epochs.templates))[0], 5, "z")]
    tb = tiny_epochs.templates[(ta.tract, 6, "z")]
    for hdu in ("IMAGE", "MASK", "VARIANCE"):
        da = fits.getdata(tiny_epochs.path_of(ta), hdu)
        db = fits.getdata(tiny_epochs.path_of(tb), hdu)
        np.testing.assert_array_equal(
            da[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0],
            db[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0],
        )


def test_epochs_refuse_another_seed_than_the_coadds(
    tiny_repo: Repository, tiny_tract: int, tiny_agn: AgnList
) -> None:
    with pytest.raises(RepositoryError, match="seed 7, epochs asked for seed 3"):
        build_epochs(tiny_repo.root, tiny_epoch_spec(tiny_tract, tiny_agn, seed=3, visits=1))
