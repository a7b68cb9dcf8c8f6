"""Aligned epochs: stamps warped onto the target's tract grid.

Oracles: a Gaussian source drawn here at a known sky position through each epoch's
own rotated TAN-SIP WCS (so its tract pixel and its flux are known in advance); the
tract WCS built here from the sky map's published numbers (tract 5063's centre and
CRPIX, skymap.md section 9) with astropy; the bilinear weights, nearest pixels and
off-stamp rules worked out here from astropy's ``pixel_to_pixel``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from astropy.wcs import WCS
from astropy.wcs.utils import pixel_to_pixel
from scipy import ndimage  # type: ignore[import-untyped]

from harvester.epochs import AlignedEpochs, TargetEpochs, align_epochs
from harvester.masks import MASK_PLANES, NO_DATA
from harvester.skymap import SkyMap

from ._epoch_fakes import TARGET, Epoch, draw_epochs

FloatArray = npt.NDArray[np.float64]
#: A source 0.3" east-ish and 0.5" south of the stamp centre.
SOURCE = (TARGET[0] + 0.3 / 3600, TARGET[1] - 0.5 / 3600)
CR = 1 << MASK_PLANES["CR"]
SAT = 1 << MASK_PLANES["SAT"]


def _tract_5063() -> WCS:
    """Tract 5063 of lsst_cells_v1 from its published numbers (not from the sky map)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [53.0875576037, -27.5206611570]
    w.wcs.crpix = [15000.0, 15000.0]
    s = 0.2 / 3600
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    w.wcs.set()
    return w


def _box(side: int) -> tuple[int, int]:
    """The (x0, y0) of a ``side`` coadd cutout of TARGET: centre floor(x + 0.5)."""
    x, y = _tract_5063().all_world2pix([TARGET[0]], [TARGET[1]], 0)
    return math.floor(x[0] + 0.5) - side // 2, math.floor(y[0] + 0.5) - side // 2


def _box_wcs(aligned: AlignedEpochs) -> WCS:
    """The test's tract WCS shifted to the aligned box."""
    w = _tract_5063().deepcopy()
    w.wcs.crpix = [15000.0 - aligned.x0, 15000.0 - aligned.y0]
    w.wcs.set()
    return w


def _input_positions(
    aligned: AlignedEpochs, native: TargetEpochs, i: int
) -> tuple[FloatArray, FloatArray]:
    """Each output pixel's position in native stamp ``i`` (astropy, not reproject)."""
    h, w = aligned.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = pixel_to_pixel(_box_wcs(aligned), WCS(native.wcs[i]), xx, yy)
    return np.asarray(u), np.asarray(v)


def _centroid(img: FloatArray, x: float, y: float, r: float = 14.0) -> tuple[float, float]:
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    use = (np.hypot(xx - x, yy - y) < r) & np.isfinite(img)
    return (
        float((img * xx)[use].sum() / img[use].sum()),
        float((img * yy)[use].sum() / img[use].sum()),
    )


# ---- geometry and flux -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rot", "scale", "method"),
    [
        (37.0, 0.2, "bilinear"),
        (0.0, 0.2, "bilinear"),
        (-121.0, 0.2, "bilinear"),
        (37.0, 0.25, "bilinear"),
        (200.0, 0.17, "bilinear"),
        (37.0, 0.2, "exact"),
        (37.0, 0.25, "exact"),
    ],
)
def test_source_lands_on_its_tract_pixel_with_its_flux(
    rot: float, scale: float, method: str
) -> None:
    """The warped source's centroid, read through the tract WCS, is the sky position it
    was drawn at (to 0.01 px); its flux is the drawn flux (to 0.1 %), at equal pixel
    scales and at others (the pixel-area ratio is applied)."""
    native = draw_epochs([Epoch(rot, 1000.0, scale_arcsec=scale)], 64, source=SOURCE)
    aligned = align_epochs(native, SkyMap(), method=method)
    assert (aligned.tract, aligned.patch) == (5063, 33)  # skymap.md, section 9
    assert (aligned.x0, aligned.y0) == _box(64)
    assert aligned.shape == (64, 64)
    ex, ey = _box_wcs(aligned).all_world2pix([SOURCE[0]], [SOURCE[1]], 0)
    img = aligned.epochs.image[0].astype(np.float64)
    cx, cy = _centroid(img, float(ex[0]), float(ey[0]))
    assert abs(cx - ex[0]) < 0.01 and abs(cy - ey[0]) < 0.01
    # The drawn source is whole in the native stamp: its pixels sum to its flux.
    assert float(native.image[0].sum()) == pytest.approx(1000.0, rel=1e-5)
    assert float(np.nansum(img)) == pytest.approx(1000.0, rel=1e-3)
    # The box's WCS cards put the target where the test's tract WCS does.
    tx, ty = WCS(aligned.epochs.wcs[0]).all_world2pix([TARGET[0]], [TARGET[1]], 0)
    ox, oy = _box_wcs(aligned).all_world2pix([TARGET[0]], [TARGET[1]], 0)
    assert (tx[0], ty[0]) == pytest.approx((ox[0], oy[0]), abs=1e-6)
    assert aligned.target_pixel() == pytest.approx((ox[0], oy[0]), abs=1e-6)
    assert aligned.epochs.x0.tolist() == [aligned.x0] and aligned.epochs.y0.tolist() == [aligned.y0]


def test_a_larger_native_stamp_fills_the_box_at_any_rotation() -> None:
    """Native stamps of side ceil(W sqrt 2) + 2 leave no corner of a W box empty."""
    w = 40
    side = math.ceil(w * math.sqrt(2)) + 2
    native = draw_epochs([Epoch(r, 500.0) for r in (0.0, 45.0, 137.0)], side, source=SOURCE)
    aligned = align_epochs(native, SkyMap(), shape=(w, w))
    assert aligned.shape == (w, w) and (aligned.x0, aligned.y0) == _box(w)
    assert np.isfinite(aligned.epochs.image).all()
    assert aligned.epochs.status.tolist() == ["ok"] * 3
    assert aligned.epochs.coverage.tolist() == [1.0] * 3
    same = align_epochs(native, SkyMap(), shape=(w, w))
    np.testing.assert_array_equal(same.epochs.image, aligned.epochs.image)


# ---- NaN, mask, variance -----------------------------------------------------------------


def _support_has_nan(bad: npt.NDArray[np.bool_], u: FloatArray, v: FloatArray) -> Any:
    """Whether each output pixel's bilinear support (after reproject's rule that a
    position within half a pixel outside the stamp sits on its edge) holds a bad
    input pixel, or the pixel lies off the stamp."""
    h, w = bad.shape
    off = (u < -0.5) | (u > w - 0.5) | (v < -0.5) | (v > h - 0.5)
    uc, vc = np.clip(u, 0, w - 1), np.clip(v, 0, h - 1)
    out = off.copy()
    for fx in (np.floor, np.ceil):
        for fy in (np.floor, np.ceil):
            iu = np.clip(fx(uc), 0, w - 1).astype(int)
            iv = np.clip(fy(vc), 0, h - 1).astype(int)
            out |= ~off & bad[iv, iu]
    return out


def test_nan_spreads_over_the_bilinear_support_only() -> None:
    native = draw_epochs([Epoch(37.0, 1000.0, sky_sigma=2.0)], 48, source=SOURCE)
    native.image[0, 20:23, 27:30] = np.nan  # a 3 x 3 hole next to the source
    native.image[0, :, 8] = np.nan  # a bad column
    native.mask[0][np.isnan(native.image[0])] = NO_DATA  # type: ignore[index]
    aligned = align_epochs(native, SkyMap())
    u, v = _input_positions(aligned, native, 0)
    expected = _support_has_nan(np.isnan(native.image[0]), u, v)
    got = np.isnan(aligned.epochs.image[0])
    assert expected.sum() > 100  # the hole, the column and the rotated corners
    np.testing.assert_array_equal(got, expected)
    assert aligned.epochs.variance is not None and aligned.epochs.mask is not None
    np.testing.assert_array_equal(np.isnan(aligned.epochs.variance[0]), expected)
    np.testing.assert_array_equal((aligned.epochs.mask[0] & NO_DATA) != 0, expected)
    covered = 1 - expected.mean()
    assert aligned.epochs.coverage[0] == pytest.approx(covered)
    assert aligned.epochs.status[0] == "partial"


def test_mask_bits_by_nearest_neighbour_grown_by_one_pixel() -> None:
    native = draw_epochs([Epoch(-23.0, 800.0)], 40, source=SOURCE)
    assert native.mask is not None
    native.mask[0, 12, 30] = CR
    native.mask[0, 25:27, 9:11] = SAT
    native.mask[0, 30, 31] = CR | SAT
    aligned = align_epochs(native, SkyMap())
    u, v = _input_positions(aligned, native, 0)
    h, w = native.mask.shape[1:]
    on = (u >= -0.5) & (u <= w - 0.5) & (v >= -0.5) & (v <= h - 0.5)
    iu = np.clip(np.floor(u + 0.5), 0, w - 1).astype(int)
    iv = np.clip(np.floor(v + 0.5), 0, h - 1).astype(int)
    nearest = np.where(on, native.mask[0][iv, iu], 0)
    assert aligned.epochs.mask is not None
    got = aligned.epochs.mask[0]
    for bit in (CR, SAT):
        want = ndimage.binary_dilation((nearest & bit) != 0, structure=np.ones((3, 3)))
        assert want.sum() >= 9 * 2
        np.testing.assert_array_equal((got & bit) != 0, want)
    np.testing.assert_array_equal((got & NO_DATA) != 0, np.isnan(aligned.epochs.image[0]))


def _bilinear_weights(u: FloatArray, v: FloatArray, shape: tuple[int, int]) -> FloatArray:
    """c_i: the total bilinear weight each input pixel gives the output pixels (u, v)."""
    c = np.zeros(shape)
    fu, fv = np.floor(u).astype(int), np.floor(v).astype(int)
    du, dv = u - fu, v - fv
    for ox, wx in ((0, 1 - du), (1, du)):
        for oy, wy in ((0, 1 - dv), (1, dv)):
            np.add.at(c, (fv + oy, fu + ox), wx * wy)
    return c


@pytest.mark.parametrize("rot", [0.0, 37.0, 161.0])
def test_variance_follows_the_image_weights(rot: float) -> None:
    """Summed over an aperture, the warped variance is sum_i c_i var_i (the image's
    bilinear weights applied to the variance, c_i worked out here), and it is within
    a few per cent above the true variance of the aperture sum, sum_i c_i^2 var_i."""
    native = draw_epochs([Epoch(rot, 0.0)], 48, source=TARGET)
    assert native.variance is not None
    yy, xx = np.mgrid[0:48, 0:48]
    native.variance[0] = (4.0 + 0.1 * xx + 0.05 * yy).astype(np.float32)
    aligned = align_epochs(native, SkyMap())
    assert aligned.epochs.variance is not None
    u, v = _input_positions(aligned, native, 0)
    tx, ty = aligned.target_pixel()
    h, w = aligned.shape
    oy, ox = np.mgrid[0:h, 0:w]
    for radius in (6.0, 10.0):
        ap = np.hypot(ox - tx, oy - ty) <= radius
        assert (u[ap] > 0).all() and (u[ap] < 47).all()  # all on the stamp
        c = _bilinear_weights(u[ap], v[ap], (48, 48))
        var_in = native.variance[0].astype(np.float64)
        claimed = float(aligned.epochs.variance[0][ap].astype(np.float64).sum())
        assert claimed == pytest.approx(float((c * var_in).sum()), rel=1e-4)
        exact = float((c**2 * var_in).sum())
        assert 1.0 <= claimed / exact < 1.0 + 0.7 / radius, (radius, claimed / exact)
    # Per pixel: between the true variance and four times it.
    centre = (round(ty), round(tx))
    c = _bilinear_weights(u[centre][None], v[centre][None], (48, 48))
    var_in = native.variance[0].astype(np.float64)
    ratio = float(aligned.epochs.variance[0][centre]) / float((c**2 * var_in).sum())
    assert 1.0 <= ratio <= 4.0 + 1e-6


# ---- statuses, errors, imports ------------------------------------------------------------


def test_statuses_follow_the_aligned_coverage() -> None:
    native = draw_epochs([Epoch(0.0, 1.0, mjd=60650.0 + k) for k in range(4)], 32, source=SOURCE)
    native.image[1] = np.nan  # nothing at all
    native.image[2, :, :5] = np.nan
    native.status = np.array(["ok", "ok", "ok", "failed"])
    native.image[3] = np.nan
    aligned = align_epochs(native, SkyMap())
    statuses = aligned.epochs.status.tolist()
    assert statuses[1:] == ["no_coverage", "partial", "failed"]
    assert aligned.epochs.coverage[1] == 0.0 and 0 < aligned.epochs.coverage[2] < 1
    # Epoch columns are carried over in order.
    np.testing.assert_array_equal(aligned.epochs.mjd_tai, native.mjd_tai)
    np.testing.assert_array_equal(aligned.epochs.visit, native.visit)
    assert "tract 5063" in aligned.epochs.meta["aligned"]


def test_an_epoch_far_from_the_box_is_empty() -> None:
    far = (TARGET[0] + 0.05, TARGET[1])
    native = draw_epochs([Epoch(10.0, 1.0)], 24, target=far)
    native = TargetEpochs(**{**native.__dict__, "ra": TARGET[0], "dec": TARGET[1]})
    aligned = align_epochs(native, SkyMap())
    assert np.isnan(aligned.epochs.image).all()
    assert aligned.epochs.mask is not None
    assert (aligned.epochs.mask & NO_DATA).all()
    assert aligned.epochs.status.tolist() == ["no_coverage"]


def test_refusals_name_what_is_wrong() -> None:
    native = draw_epochs([Epoch(0.0, 1.0)], 16)
    with pytest.raises(ValueError, match="bicubic.*NaN"):
        align_epochs(native, SkyMap(), method="bicubic")
    with pytest.raises(ValueError, match="method must be one of"):
        align_epochs(native, SkyMap(), method="lanczos3")
    with pytest.raises(ValueError, match="shape"):
        align_epochs(native, SkyMap(), shape=(0, 10))
    native.wcs[0] = {"CTYPE1": "PIXEL", "CTYPE2": "PIXEL"}
    with pytest.raises(ValueError, match=r"fake: epoch 0 \(visit 2024120100001, detector 4\)"):
        align_epochs(native, SkyMap())
    empty = native.select(np.zeros(1, dtype=bool))
    assert len(align_epochs(empty, SkyMap())) == 0


def test_no_planes_but_the_image() -> None:
    native = draw_epochs([Epoch(30.0, 100.0)], 24, source=SOURCE)
    bare = TargetEpochs(**{**native.__dict__, "mask": None, "variance": None})
    aligned = align_epochs(bare, SkyMap())
    assert aligned.epochs.mask is None and aligned.epochs.variance is None
    full = align_epochs(native, SkyMap())
    np.testing.assert_array_equal(aligned.epochs.image, full.epochs.image)


def test_importing_harvester_does_not_import_reproject_or_lightkurve() -> None:
    code = (
        "import sys, harvester, harvester.epochs, harvester.sinks.tpf, "
        "harvester.sinks.epoch_pictures\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('reproject', 'lightkurve', 'matplotlib')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
