"""Target pixel files of aligned epochs, read back with lightkurve.

Oracles: lightkurve itself (``KeplerTargetPixelFile``: its times, fluxes, WCS and
aperture light curves), the injected light curves (``agn_flux``: drawn into
stamps here, or rendered by ``harvester synth --epochs``), the tract WCS and box
worked out in ``test_epoch_align`` from the sky map's published numbers, and astropy
reading the files directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits

from harvester.epochs import AlignedEpochs, align_epochs
from harvester.repo import Repository
from harvester.sinks.tpf import (
    QUALITY_NO_DATA,
    QUALITY_PARTIAL,
    target_pixel_file,
    tpf_filename,
    write_target_pixel_files,
)
from harvester.skymap import SkyMap
from harvester.synth import AgnList, agn_flux, agn_reference_flux

from ._epoch_fakes import TARGET, Epoch, draw_epochs, epochs_from_files
from .test_epoch_align import _box, _box_wcs

lk = pytest.importorskip(
    "lightkurve", reason="lightkurve is a test dependency: pip install -e '.[test]'"
)

AGN = "ECDFS_agn_fake"
SEED = 7


@contextmanager
def _open_tpf(path: Path, **kwargs: Any) -> Iterator[Any]:
    """``KeplerTargetPixelFile(path)``, asserting its one warning (not Kepler/TESS)."""
    with pytest.warns(lk.LightkurveWarning, match="not recognized as Kepler or TESS"):
        tpf = lk.KeplerTargetPixelFile(str(path), **kwargs)
    try:
        yield tpf
    finally:
        tpf.hdu.close()


@pytest.fixture(scope="module")
def aligned() -> AlignedEpochs:
    """60 epochs in g and r of a varying point source at the target: each epoch its own
    rotation, seeing and time; sky noise 10 nJy a pixel; 41-px stamps."""
    rng = np.random.default_rng(11)
    epochs = []
    for band in ("g", "r"):
        for k in range(30):
            mjd = 60600.0 + 2.3 * k + rng.uniform(0.0, 1.0)
            epochs.append(
                Epoch(
                    rot_deg=rng.uniform(0.0, 360.0),
                    flux=float(agn_flux(AGN, band, mjd, SEED)),
                    sigma_px=rng.uniform(1.5, 2.5),
                    sky_sigma=10.0,
                    band=band,
                    mjd=mjd,
                )
            )
    return align_epochs(draw_epochs(epochs, 41, target_id="agn/1"), SkyMap())


@pytest.fixture(scope="module")
def files(aligned: AlignedEpochs, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_target_pixel_files(aligned, tmp_path_factory.mktemp("tpf"))


def test_one_file_per_dataset_type_and_band(aligned: AlignedEpochs, files: list[Path]) -> None:
    assert [p.name for p in files] == [
        tpf_filename("agn/1", "visit_image", "g"),
        tpf_filename("agn/1", "visit_image", "r"),
    ]
    assert files[0].name.startswith("agn_1-") and files[0].name.endswith(".visit_image.g.fits")
    assert sorted(p.name for p in files[0].parent.iterdir()) == sorted(p.name for p in files)


@pytest.mark.parametrize("band", ["g", "r"])
def test_lightkurve_reads_times_fluxes_and_wcs(
    aligned: AlignedEpochs, files: list[Path], band: str
) -> None:
    e = aligned.epochs
    rows = np.flatnonzero(e.band == band)
    path = files["gr".index(band)]
    with _open_tpf(path, quality_bitmask="none") as tpf:
        assert tpf.shape == (30, 41, 41)
        # Times: full JD in TAI, the epochs' own times.
        assert tpf.time.scale == "tai" and tpf.time.format == "jd"
        np.testing.assert_array_equal(tpf.time.jd, e.mjd_tai[rows] + 2400000.5)
        np.testing.assert_allclose(tpf.time.mjd, e.mjd_tai[rows], rtol=0, atol=1e-8)
        assert abs(tpf.time[0].utc.mjd - e.mjd_tai[rows[0]]) * 86400 == pytest.approx(37, abs=0.01)
        # Pixels: the aligned image, its error the square root of the aligned variance.
        assert e.variance is not None
        np.testing.assert_array_equal(tpf.flux.value, e.image[rows])
        np.testing.assert_array_equal(tpf.flux_err.value, np.sqrt(e.variance[rows]))
        # WCS: the target at its tract pixel minus the box origin (test's own WCS).
        ox, oy = _box_wcs(aligned).all_world2pix([TARGET[0]], [TARGET[1]], 0)
        x, y = tpf.wcs.world_to_pixel(SkyCoord(TARGET[0], TARGET[1], unit="deg"))
        assert (float(x), float(y)) == pytest.approx((ox[0], oy[0]), abs=1e-6)
        assert (tpf.column, tpf.row) == _box(41)
        assert (
            tpf.get_keyword("OBJECT") == "agn/1" and tpf.get_keyword("TELESCOP") == "Rubin:Simonyi"
        )
        assert "harvester" in tpf.get_keyword("CREATOR")
        assert tpf.hdu[1].header["BJDREFI"] == 0 and tpf.hdu[1].header["TIMESYS"] == "TAI"
        np.testing.assert_array_equal(tpf.cadenceno, rows + 1)


@pytest.mark.parametrize("band", ["g", "r"])
def test_aperture_light_curve_tracks_the_injected_one(
    aligned: AlignedEpochs, files: list[Path], band: str
) -> None:
    """lightkurve's aperture sums (a 12-px disk: all of a 2.5-px Gaussian) against
    ``agn_flux``: chi^2/dof near 1 with lightkurve's own errors, no bias; a constant
    flux is ruled out; the default (pipeline) aperture does as well."""
    with _open_tpf(files["gr".index(band)]) as tpf:
        truth = agn_flux(AGN, band, tpf.time.tai.mjd, SEED)
        tx, ty = tpf.wcs.world_to_pixel(SkyCoord(TARGET[0], TARGET[1], unit="deg"))
        yy, xx = np.mgrid[0:41, 0:41]
        disk = np.hypot(xx - tx, yy - ty) <= 12
        for mask in (disk, "default"):
            lc = tpf.to_lightcurve(aperture_mask=mask)
            resid = (lc.flux.value - truth) / lc.flux_err.value
            assert len(resid) == 30 and np.isfinite(resid).all()
            assert 0.4 < float(np.mean(resid**2)) < 1.9
            assert abs(float(resid.mean())) < 3 / math.sqrt(30)
            flat = (lc.flux.value - np.median(lc.flux.value)) / lc.flux_err.value
            assert float(np.mean(flat**2)) > 10
        assert tpf.pipeline_mask.sum() > 100


def test_quality_flags_drop_epochs_with_holes_in_the_aperture(aligned: AlignedEpochs) -> None:
    e = aligned.epochs
    e2 = e.select(np.flatnonzero(e.band == "g")[:4])
    e2.image[np.isnan(e2.image)] = 0.0  # the rotations' empty corners filled
    e2.image[1, 20, 20] = np.nan  # in the default aperture
    e2.image[2, 0, :] = np.nan  # away from it
    cut = AlignedEpochs(**{**aligned.__dict__, "epochs": e2})
    hdul = target_pixel_file(cut, "visit_image", "g")
    quality = hdul["TARGETTABLES"].data["QUALITY"]
    assert quality.tolist() == [0, QUALITY_NO_DATA, QUALITY_PARTIAL, 0]
    aperture = hdul["APERTURE"].data
    assert aperture[20, 20] & 2 and not aperture[0, 0] & 2
    assert (aperture & 1).all()


def test_lightkurve_default_bitmask_drops_the_no_data_epoch(
    aligned: AlignedEpochs, tmp_path: Path
) -> None:
    e = aligned.epochs
    e2 = e.select(np.flatnonzero(e.band == "r")[:5])
    e2.image[3, 20, 20] = np.nan
    e2.image[0, 40, :] = np.nan
    paths = write_target_pixel_files(AlignedEpochs(**{**aligned.__dict__, "epochs": e2}), tmp_path)
    with _open_tpf(paths[0]) as tpf:
        np.testing.assert_array_equal(tpf.time.jd, e2.mjd_tai[[0, 1, 2, 4]] + 2400000.5)
    with _open_tpf(paths[0], quality_bitmask="none") as tpf:
        assert len(tpf.time) == 5


def test_lightkurve_read_refuses_it(files: list[Path]) -> None:
    """lightkurve.read() knows target pixel files only by TELESCOP Kepler/TESS."""
    with pytest.raises(
        lk.utils.LightkurveError, match="Not recognized as a supported data product"
    ):
        lk.read(str(files[0]))


def test_file_layout_read_with_astropy(aligned: AlignedEpochs, files: list[Path]) -> None:
    with fits.open(files[1]) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "TARGETTABLES", "APERTURE"]
        names = hdul[1].columns.names
        assert names[:5] == ["TIME", "TIMECORR", "CADENCENO", "PIXEL_MASK", "FLUX"]
        assert {"FLUX_ERR", "QUALITY", "VISIT", "DETECTOR", "MJD_TAI", "DATASET_ID"} <= set(names)
        h = hdul[1].header
        assert (h["1CRV5P"], h["2CRV5P"]) == _box(41)
        assert (h["TUNIT5"], h["TIMEREF"]) == ("nJy", "TOPOCENT")
        rows = np.flatnonzero(aligned.epochs.band == "r")
        assert aligned.epochs.mask is not None
        np.testing.assert_array_equal(hdul[1].data["PIXEL_MASK"], aligned.epochs.mask[rows])
        np.testing.assert_array_equal(hdul[1].data["VISIT"], aligned.epochs.visit[rows])
        assert hdul[0].header["TRACT"] == 5063 and hdul[0].header["DATATYPE"] == "visit_image"
        from astropy.wcs import WCS

        x, y = WCS(hdul["APERTURE"].header).all_world2pix([TARGET[0]], [TARGET[1]], 0)
        ox, oy = _box_wcs(aligned).all_world2pix([TARGET[0]], [TARGET[1]], 0)
        assert (x[0], y[0]) == pytest.approx((ox[0], oy[0]), abs=1e-6)


def test_a_failed_write_leaves_nothing(
    aligned: AlignedEpochs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: fits.HDUList, name: Any, **kwargs: Any) -> None:
        Path(name).write_bytes(b"SIMPLE  =                    T")
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", broken)
    with pytest.raises(OSError, match="disk full"):
        write_target_pixel_files(aligned, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_refusals(aligned: AlignedEpochs) -> None:
    with pytest.raises(ValueError, match="no difference_image epoch in band 'g'"):
        target_pixel_file(aligned, "difference_image", "g")
    with pytest.raises(ValueError, match="aperture_arcsec"):
        target_pixel_file(aligned, "visit_image", "g", aperture_arcsec=-1.0)


def test_synthetic_difference_images_end_to_end(
    tiny_epochs: Repository, tiny_agn: AgnList, tmp_path: Path
) -> None:
    """``harvester synth --epochs`` difference images, cut, aligned on the tiny tract
    grid and written as TPFs: lightkurve's aperture sums (a disk of 3 x the median
    seeing) recover f(t) - f0 times the Moffat (beta 3) light in the disk, chi^2/dof
    near 1 over all five AGN and both bands; a flat curve is ruled out."""
    targets = list(zip(tiny_agn.ids, tiny_agn.ra, tiny_agn.dec, strict=True))
    resid, flat = [], []
    for native in epochs_from_files(tiny_epochs, targets, 41, ("difference_image",)):
        al = align_epochs(native, tiny_epochs.skymap)
        for path in write_target_pixel_files(al, tmp_path):
            band = path.name.split(".")[-2]
            with _open_tpf(path) as tpf:
                seeing = tpf.hdu[1].data["SEEING"][tpf.quality_mask]
                scale = 3600 * abs(tpf.hdu[1].header["2CDLT5"])
                tx, ty = tpf.wcs.world_to_pixel(SkyCoord(al.epochs.ra, al.epochs.dec, unit="deg"))
                yy, xx = np.mgrid[0:41, 0:41]
                disk = np.hypot(xx - tx, yy - ty) <= 3 * np.median(seeing) / scale
                lc = tpf.to_lightcurve(aperture_mask=disk)
                mjd = tpf.time.tai.mjd
            r_eff = math.sqrt(disk.sum() / math.pi)
            alpha = seeing / scale / (2 * math.sqrt(2 ** (1 / 3) - 1))
            inside = 1 - (1 + r_eff**2 / alpha**2) ** -2.0
            truth = agn_flux(native.id, band, mjd, SEED) - agn_reference_flux(native.id, band, SEED)
            resid += ((lc.flux.value - inside * truth) / lc.flux_err.value).tolist()
            flat += (lc.flux.value / lc.flux_err.value).tolist()
    res = np.array(resid)
    assert len(res) >= 25 and np.isfinite(res).all()
    assert 0.5 < float(np.mean(res**2)) < 1.7, float(np.mean(res**2))
    assert abs(float(res.mean())) < 3 / math.sqrt(len(res))
    assert float(np.mean(np.square(flat))) > 2.5
