"""The synthetic dp1.Object catalogue against the pixels it claims to describe.

Expected values come from the image files (astropy reads them; a numpy mosaic of
the tract; local maxima, centroids and aperture sums computed here) and from the
files' own WCS, never from the catalogue code.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from harvester.repo import Repository, load_repository
from harvester.skymap import SkyMap
from harvester.synth import SynthSpec, build_repository, read_agn_list
from harvester.synth._catalog import SYNTH_RECORD, ObjectCatalog, object_catalog

from .conftest import TINY

Mosaic = dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]

#: AGN rows: objectId's low 24 bits at or above 2**23.
_AGN = 1 << 23


@pytest.fixture(scope="module")
def catalog(tap_repo: Repository) -> ObjectCatalog:
    return object_catalog(tap_repo)


@pytest.fixture(scope="module")
def mosaic(tap_repo: Repository, tiny_skymap: SkyMap) -> Mosaic:
    """Per band, (image, variance) of the tract over [-border, dim + border)."""
    border = tiny_skymap.config.patch_border
    dim = tiny_skymap.tract_dim + 2 * border
    out: Mosaic = {}
    for band in ("g", "r"):
        image = np.full((dim, dim), np.nan)
        variance = np.full((dim, dim), np.nan)
        for ref in tap_repo:
            if ref.band != band:
                continue
            with fits.open(tap_repo.path_of(ref)) as hdul:
                h = hdul["IMAGE"].header
                x0, y0 = -h["LTV1"] + border, -h["LTV2"] + border
                data = hdul["IMAGE"].data
                image[y0 : y0 + data.shape[0], x0 : x0 + data.shape[1]] = data
                var = hdul["VARIANCE"].data
                variance[y0 : y0 + var.shape[0], x0 : x0 + var.shape[1]] = var
        out[band] = (image, variance)
    return out


def _smooth(
    image: npt.NDArray[np.float64], sigma: float = 2.0
) -> tuple[npt.NDArray[np.float64], float]:
    """Gaussian-smoothed image (a matched filter for the PSF) and its noise gain."""
    r = np.arange(-4, 5)
    k = np.exp(-(r**2) / (2 * sigma**2))
    k /= k.sum()
    out = image.copy()
    for axis in (0, 1):
        padded = np.pad(
            out, [(4, 4) if a == axis else (0, 0) for a in (0, 1)], constant_values=np.nan
        )
        out = sum(
            k[i] * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i in range(9)
        )
    return out, float(np.sqrt((np.outer(k, k) ** 2).sum()))


def _peaks(
    image: npt.NDArray[np.float64], sigma: npt.NDArray[np.float64], nsigma: float
) -> list[tuple[int, int]]:
    """(x, y) of maxima of the smoothed image over 9 x 9 px, ``nsigma`` above its noise,
    6 px from any NaN or edge."""
    smooth, gain = _smooth(image)
    h, w = image.shape
    is_max = np.isfinite(smooth) & (smooth > nsigma * gain * sigma)
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            if dx or dy:
                shifted = np.full_like(smooth, np.inf)
                ys = slice(max(dy, 0), h + min(dy, 0))
                yd = slice(max(-dy, 0), h + min(-dy, 0))
                xs = slice(max(dx, 0), w + min(dx, 0))
                xd = slice(max(-dx, 0), w + min(-dx, 0))
                shifted[yd, xd] = smooth[ys, xs]
                is_max &= ~(shifted > smooth)
    finite = np.isfinite(image)
    out = []
    for y, x in zip(*np.nonzero(is_max), strict=True):
        if 6 <= y < h - 6 and 6 <= x < w - 6 and finite[y - 6 : y + 7, x - 6 : x + 7].all():
            out.append((int(x), int(y)))
    return out


def _home(skymap: SkyMap, tract: int, peaks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The peaks whose position belongs to ``tract`` (findTract): DP1 keeps an
    object once, in its own tract; elsewhere the mosaic shows a neighbour's area."""
    if not peaks:
        return []
    border = skymap.config.patch_border
    x = np.array([p[0] for p in peaks], dtype=float) - border
    y = np.array([p[1] for p in peaks], dtype=float) - border
    ra, dec = skymap.pixel_to_sky(np.full(len(x), tract), x, y)
    home = skymap.find_tract(ra, dec) == tract
    return [p for p, h in zip(peaks, home, strict=True) if h]


def test_every_bright_peak_of_the_images_is_a_row_and_back(
    catalog: ObjectCatalog, mosaic: Mosaic, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    border = tiny_skymap.config.patch_border
    cx = np.asarray(catalog.columns["x"]) + border
    cy = np.asarray(catalog.columns["y"]) + border
    checked_rows = 0
    for band, (image, variance) in mosaic.items():
        sigma = np.sqrt(variance)
        all_peaks = _peaks(image, sigma, 6.0)  # pure noise: ~1e-4 such peaks per mosaic
        peaks = _home(tiny_skymap, tiny_tract, all_peaks)
        assert len(peaks) >= 6 and len(all_peaks) > len(peaks), band
        for x, y in peaks:
            d = np.hypot(cx - x, cy - y)
            assert d.min() <= 3.0, f"{band} peak at mosaic ({x}, {y}) has no row within 3 px"
        # Back: each row bright in this band (S/N > 20 by its own errors) shows a peak.
        snr = np.asarray(catalog.columns[f"{band}_psfFlux"]) / np.asarray(
            catalog.columns[f"{band}_psfFluxErr"]
        )
        h, w = image.shape
        px, py = np.array([p[0] for p in all_peaks]), np.array([p[1] for p in all_peaks])
        for i in np.flatnonzero(snr > 20):
            if not (6 <= cx[i] < w - 6 and 6 <= cy[i] < h - 6):
                continue
            d = np.hypot(px - cx[i], py - cy[i])
            assert d.min() <= 3.0, f"{band} row {catalog.columns['objectId'][i]} shows no peak"
            checked_rows += 1
    assert checked_rows >= 10, checked_rows


def test_positions_and_fluxes_match_the_pixels(
    catalog: ObjectCatalog, mosaic: Mosaic, tap_repo: Repository, tiny_skymap: SkyMap
) -> None:
    """The AGN (isolated by construction): peak, centroid, WCS position, aperture flux."""
    c = catalog.columns
    border = tiny_skymap.config.patch_border
    agn = np.flatnonzero(np.asarray(c["objectId"]) % (1 << 24) >= _AGN)
    assert len(agn) == 5
    ref = next(iter(tap_repo))
    with fits.open(tap_repo.path_of(ref)) as hdul:
        header = hdul["IMAGE"].header
    wcs = WCS(header)
    x0, y0 = -header["LTV1"], -header["LTV2"]
    radius = 20.0
    smoothed = {band: _smooth(image)[0] for band, (image, _) in mosaic.items()}
    for i in agn:
        x, y = float(c["x"][i]), float(c["y"][i])
        # The sky position, through the file's own WCS (astropy), is the painted pixel.
        wx, wy = wcs.world_to_pixel_values(float(c["coord_ra"][i]), float(c["coord_dec"][i]))
        assert wx + x0 == pytest.approx(x, abs=1e-4) and wy + y0 == pytest.approx(y, abs=1e-4)
        mx, my = x + border, y + border
        for band, (image, variance) in mosaic.items():
            iy, ix = math.floor(my + 0.5), math.floor(mx + 0.5)
            win = image[iy - 2 : iy + 3, ix - 2 : ix + 3]
            wy_, wx_ = np.unravel_index(int(np.argmax(win)), win.shape)
            # Neighbouring pixels of the peak differ by less than the noise: within 1 px.
            assert abs(int(wx_) - 2) <= 1 and abs(int(wy_) - 2) <= 1, band
            # Sub-pixel centre: a parabola through the smoothed image's peak, per axis.
            smooth = smoothed[band]
            win = smooth[iy - 2 : iy + 3, ix - 2 : ix + 3]
            sy, sx = np.unravel_index(int(np.argmax(win)), win.shape)
            py, px = iy - 2 + int(sy), ix - 2 + int(sx)
            f0 = smooth[py, px]
            fx = smooth[py, px - 1], smooth[py, px + 1]
            fy = smooth[py - 1, px], smooth[py + 1, px]
            cen_x = px + (fx[1] - fx[0]) / (2 * (2 * f0 - fx[0] - fx[1]))
            cen_y = py + (fy[1] - fy[0]) / (2 * (2 * f0 - fy[0] - fy[1]))
            assert cen_x == pytest.approx(mx, abs=0.1) and cen_y == pytest.approx(my, abs=0.1)
            gy, gx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
            inside = (gx - mx) ** 2 + (gy - my) ** 2 <= radius**2
            assert np.isfinite(image[inside]).all()
            aperture = float(image[inside].sum())
            noise = math.sqrt(float(variance[inside].sum()))
            flux = float(c[f"{band}_cModelFlux"][i])
            # The model's light outside 20 px (Moffat wings, the host's outskirts) < 3 %.
            assert abs(aperture - flux) <= 4 * noise + 0.03 * flux, (band, aperture, flux)
            psf = float(c[f"{band}_psfFlux"][i])
            assert 0.5 * flux < psf < flux  # a point source on an extended host


def test_magnitudes_errors_and_missing_bands(catalog: ObjectCatalog) -> None:
    c = {k: np.asarray(v) for k, v in catalog.columns.items()}
    n = len(catalog)
    assert n >= 15
    assert len(np.unique(c["objectId"])) == n
    for band in ("g", "r"):
        for stem in ("psf", "cModel"):
            flux = c[f"{band}_{stem}Flux"].astype(np.float64)
            err = c[f"{band}_{stem}FluxErr"].astype(np.float64)
            assert np.isfinite(flux).all() and (flux > 0).all() and (err > 0).all()
            mag = -2.5 * np.log10(flux) + 31.4
            np.testing.assert_allclose(c[f"{band}_{stem}Mag"], mag, atol=2e-6 * 30)
            np.testing.assert_allclose(
                c[f"{band}_{stem}MagErr"], 2.5 / np.log(10) * err / flux, rtol=1e-5
            )
        assert (c[f"{band}_psfFlux"] <= c[f"{band}_cModelFlux"] * (1 + 1e-6)).all()
        assert not c[f"{band}_psfFlux_flag"].any()
    for band in ("u", "i", "z", "y"):  # no image of these bands: no measurement
        assert np.isnan(c[f"{band}_cModelFlux"]).all() and np.isnan(c[f"{band}_psfMag"]).all()
        assert c[f"{band}_psfFlux_flag"].all() and c[f"{band}_cModel_flag"].all()
    assert set(c["refBand"]) == {"r"}  # i is first in DP1's order, but there is no i image
    np.testing.assert_array_equal(c["refExtendedness"], c["r_extendedness"])


def _copy_without_record(repo: Repository, dest: Path) -> Repository:
    shutil.copytree(repo.root, dest)
    (dest / SYNTH_RECORD).unlink()
    return load_repository(dest)


@pytest.mark.parametrize("planted", [True, False])
def test_a_repository_without_its_record_gets_the_same_rows(
    tmp_path: Path, tiny_skymap: SkyMap, planted: bool
) -> None:
    """Repositories built before synth.json: the ECDFS AGN are recognised by their pixels."""
    from importlib.resources import files

    agn = read_agn_list(str(files("harvester") / "data" / "ecdfs_agn.csv"))
    ra, dec = agn.ra[3], agn.dec[3]  # id 11: in the test tract, patch 11
    tract = int(tiny_skymap.find_tract(ra, dec)[0])
    patches = ((tract, 5), (tract, 6), (tract, 10), (tract, 11))  # inside the tract's own area
    spec = SynthSpec(
        patches=patches, bands=("r",), seed=3, agn=agn if planted else None, skymap=TINY
    )
    repo = build_repository(tmp_path / "with", spec)
    doc: dict[str, Any] = json.loads((repo.root / SYNTH_RECORD).read_text())
    assert len(doc["agn"]["ids"]) == (len(agn.ids) if planted else 0)
    with_record = object_catalog(repo)
    without = object_catalog(_copy_without_record(repo, tmp_path / "without"))
    assert len(with_record) == len(without) > 0
    for name, values in with_record.columns.items():
        np.testing.assert_array_equal(values, without.columns[name], err_msg=name)
    has_agn = (np.asarray(with_record.columns["objectId"]) % (1 << 24) >= _AGN).any()
    assert has_agn == planted
