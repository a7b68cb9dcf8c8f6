"""Filmstrip pages and aperture light curves of a target's epochs (PNG).

Page sizes are worked out here from the geometry ``harvester/sinks/epoch_pictures.py``
documents (inches and dpi), not taken from the code; the light curve's plotted points
are checked against aperture sums done here with numpy at the target's position
through each stamp's own WCS (astropy).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area
from matplotlib.image import imread

from harvester.epochs import EPOCH_COLUMNS, TargetEpochs, align_epochs
from harvester.sinks.epoch_pictures import (
    filmstrip_groups,
    filmstrip_size_px,
    light_curve_figure,
    write_filmstrip,
    write_light_curve,
)
from harvester.skymap import SkyMap

from ._epoch_fakes import TARGET, Epoch, draw_epochs

# The geometry the module's docstring promises, inches and dpi.
DPI = 100
STAMP, GAP, MARGIN, LABEL, TITLE_LINE, HEADER, GROUP_GAP = 1.0, 0.06, 0.12, 0.8, 0.13, 0.42, 0.14
LC_WIDTH, LC_HEADER, LC_PANEL, LC_FOOTER = 8.0, 0.5, 2.4, 0.55
BAD_RGB = (0x8B, 0x00, 0x00)


def _expected_px(shown: list[int], columns: int) -> tuple[int, int]:
    """(height, width) of a filmstrip whose groups show ``shown`` stamps."""
    cols = min(columns, max(shown))
    rows = sum(math.ceil(n / cols) for n in shown)
    width = 2 * MARGIN + LABEL + cols * STAMP + (cols - 1) * GAP
    height = (
        HEADER + rows * (2 * TITLE_LINE + STAMP + GAP) + (len(shown) - 1) * GROUP_GAP + MARGIN - GAP
    )
    return round(height * DPI), round(width * DPI)


def _png(path: Path) -> npt.NDArray[np.float32]:
    return np.asarray(imread(path), dtype=np.float32)


def _epochs(n_g: int = 5, n_r: int = 13, seed: int = 2) -> TargetEpochs:
    """Visit epochs in g and r, then the same times as difference images in g."""
    rng = np.random.default_rng(seed)
    eps = [
        Epoch(
            rng.uniform(0, 360),
            float(rng.uniform(500, 1500)),
            sigma_px=float(rng.uniform(1.6, 2.4)),
            sky_sigma=5.0,
            band=band,
            mjd=60600.0 + 1.7 * k + (0.3 if band == "r" else 0.0),
        )
        for band, n in (("g", n_g), ("r", n_r))
        for k in range(n)
    ]
    te = draw_epochs(eps, 31, source=TARGET, seed=seed)
    diff = te.select(np.flatnonzero(te.band == "g"))
    diff.dataset_type = np.array(["difference_image"] * len(diff))
    both = np.argsort(np.concatenate([te.mjd_tai, diff.mjd_tai]), kind="stable")
    columns: dict[str, Any] = {
        name: np.concatenate([getattr(te, name), getattr(diff, name)])[both]
        for name in EPOCH_COLUMNS
    }
    assert te.mask is not None and diff.mask is not None
    assert te.variance is not None and diff.variance is not None
    return TargetEpochs(
        id=te.id,
        ra=te.ra,
        dec=te.dec,
        image=np.concatenate([te.image, diff.image])[both],
        mask=np.concatenate([te.mask, diff.mask])[both],
        variance=np.concatenate([te.variance, diff.variance])[both],
        wcs=[(te.wcs + diff.wcs)[i] for i in both.tolist()],
        x0=np.concatenate([te.x0, diff.x0])[both],
        y0=np.concatenate([te.y0, diff.y0])[both],
        **columns,
    )


# ---- filmstrip -----------------------------------------------------------------------------


def test_expected_geometry_by_hand() -> None:
    # Columns 5, rows 1 + 2: 0.24 + 0.8 + 5.0 + 0.24 = 6.28 in wide;
    # 0.42 + 3 * 1.32 + 0.14 + 0.06 = 4.58 in high.
    assert _expected_px([5, 7], 5) == (458, 628)
    assert filmstrip_size_px([5, 7], 5) == (628, 458)


@pytest.mark.parametrize(("columns", "max_per_group"), [(12, 48), (4, 48), (6, 6), (1, 3)])
def test_filmstrip_layout(tmp_path: Path, columns: int, max_per_group: int) -> None:
    epochs = _epochs()
    groups = filmstrip_groups(epochs, max_per_group=max_per_group)
    assert [(g.dataset_type, g.band, g.total) for g in groups] == [
        ("visit_image", "g", 5),
        ("difference_image", "g", 5),
        ("visit_image", "r", 13),
    ]
    for g in groups:
        rows = g.rows
        assert len(rows) == min(g.total, max_per_group)
        assert (np.diff(epochs.mjd_tai[rows]) > 0).all()  # time order
        member = np.flatnonzero((epochs.dataset_type == g.dataset_type) & (epochs.band == g.band))
        assert set(rows.tolist()) <= set(member.tolist())
        assert rows[0] == member[0] and rows[-1] == member[-1]  # first and last kept
    path = write_filmstrip(
        epochs, tmp_path / "strips" / "t.png", columns=columns, max_per_group=max_per_group
    )
    shown = [min(n, max_per_group) for n in (5, 5, 13)]
    assert _png(path).shape[:2] == _expected_px(shown, columns)
    assert sorted(p.name for p in (tmp_path / "strips").iterdir()) == ["t.png"]


def test_groups_in_band_order_visits_first() -> None:
    """Groups run u g r i z y (others after, by name), visit before difference images,
    whatever order the epochs came in."""
    epochs = _epochs(3, 3)
    epochs.band = np.where(epochs.band == "g", "z", "N921")
    epochs.band[-1] = "u"
    groups = filmstrip_groups(epochs)
    assert [(g.band, g.dataset_type) for g in groups] == [
        ("u", "visit_image"),
        ("z", "visit_image"),
        ("z", "difference_image"),
        ("N921", "visit_image"),
    ]


def test_filmstrip_shows_nan_and_empty_stamps(tmp_path: Path) -> None:
    epochs = _epochs(n_g=3, n_r=2)
    clean = write_filmstrip(epochs, tmp_path / "clean.png", stretch="asinh")
    epochs.image[1, 5:25, 5:12] = np.nan
    epochs.image[2] = np.nan
    epochs.status = np.array(["ok", "ok", "no_coverage", *(["ok"] * (len(epochs) - 3))])
    holes = write_filmstrip(epochs, tmp_path / "holes.png", stretch="asinh")

    def count(path: Path, rgb: tuple[float, ...]) -> int:
        px = (_png(path)[..., :3] * 255).round()
        return int((np.abs(px - np.array(rgb)).max(axis=-1) < 2).sum())

    assert count(clean, BAD_RGB) == 0
    assert count(holes, BAD_RGB) > 7 * 20 * 9  # the hole, at ~3 screen px a stamp px
    grey = (0.85 * 255,) * 3
    assert count(holes, grey) > count(clean, grey) + 80 * 80  # the empty stamp


def test_filmstrip_of_no_epochs(tmp_path: Path) -> None:
    none = _epochs().select(np.zeros(0, dtype=np.int64))
    path = write_filmstrip(none, tmp_path / "none.png")
    width = 2 * MARGIN + LABEL + STAMP
    assert _png(path).shape[:2] == (round((HEADER + MARGIN) * DPI), round(width * DPI))


def test_filmstrip_refusals(tmp_path: Path) -> None:
    epochs = _epochs(2, 2)
    with pytest.raises(ValueError, match="columns"):
        write_filmstrip(epochs, tmp_path / "a.png", columns=0)
    with pytest.raises(ValueError, match="max_per_group"):
        write_filmstrip(epochs, tmp_path / "a.png", max_per_group=0)
    with pytest.raises(ValueError, match="stretch"):
        write_filmstrip(epochs, tmp_path / "a.png", stretch="log")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


# ---- light curve ---------------------------------------------------------------------------


def _aperture_sums(epochs: TargetEpochs, radius: npt.NDArray[np.float64]) -> Any:
    """(flux, error) per epoch: pixels whose centre is within ``radius`` arcsec of the
    target's position in that stamp's own WCS; NaN if the disk is not all there."""
    flux, err = np.full(len(epochs), np.nan), np.full(len(epochs), np.nan)
    assert epochs.variance is not None
    for i in range(len(epochs)):
        w = WCS(epochs.wcs[i])
        x, y = (float(v[0]) for v in w.all_world2pix([epochs.ra], [epochs.dec], 0))
        scale = math.sqrt(proj_plane_pixel_area(w)) * 3600
        r = radius[i] / scale
        h, wd = epochs.image.shape[1:]
        yy, xx = np.mgrid[0:h, 0:wd]
        disk = (xx - x) ** 2 + (yy - y) ** 2 <= r**2
        inside = min(x, y) - r >= -0.5 and max(x - wd, y - h) + r <= -0.5
        values = epochs.image[i][disk].astype(np.float64)
        if inside and np.isfinite(values).all():
            flux[i] = values.sum()
            err[i] = math.sqrt(epochs.variance[i][disk].astype(np.float64).sum())
    return flux, err


@pytest.mark.parametrize("aligned", [False, True])
def test_light_curve_plots_the_aperture_sums(tmp_path: Path, aligned: bool) -> None:
    epochs = _epochs()
    epochs.image[4, 15, 15] = np.nan  # in the aperture: no flux
    if aligned:
        epochs = align_epochs(epochs, SkyMap()).epochs
    fluxes = write_light_curve(epochs, tmp_path / "lc.png")
    # Default radius: twice the median seeing of each (type, band) group.
    radius = np.empty(len(epochs))
    for kind in ("visit_image", "difference_image"):
        for band in ("g", "r"):
            sel = (epochs.dataset_type == kind) & (epochs.band == band)
            radius[sel] = 2 * np.median(epochs.seeing[sel]) if sel.any() else 0
    flux, err = _aperture_sums(epochs, radius)
    assert np.isnan(flux[4]) and np.isfinite(np.delete(flux, 4)).all()
    np.testing.assert_allclose(fluxes.flux, flux, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(fluxes.flux_err, err, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(fluxes.radius_arcsec, radius)
    # The figure plots exactly those: panels per dataset type, a series per band.
    fig = light_curve_figure(fluxes)
    panels = {ax.get_title(loc="left").split(" ")[0]: ax for ax in fig.axes}
    assert sorted(panels) == ["difference_image", "visit_image"]
    seen = 0
    for kind, ax in panels.items():
        for container in ax.containers:
            band = container.get_label()
            sel = (epochs.dataset_type == kind) & (epochs.band == band) & np.isfinite(flux)
            xy = container.lines[0].get_xydata()
            np.testing.assert_allclose(xy[:, 0], epochs.mjd_tai[sel], rtol=0, atol=1e-9)
            np.testing.assert_allclose(xy[:, 1], flux[sel], rtol=1e-6)
            (bars,) = container.lines[2]
            half = np.array([abs(s[1, 1] - s[0, 1]) / 2 for s in bars.get_segments()])
            np.testing.assert_allclose(half, err[sel], rtol=1e-5)
            seen += int(sel.sum())
        missing = [ln for ln in ax.lines if ln.get_label() == "no aperture data"]
        want = epochs.mjd_tai[(epochs.dataset_type == kind) & np.isnan(flux)]
        got = missing[0].get_xdata() if missing else np.zeros(0)
        np.testing.assert_array_equal(got, want)
    assert seen == int(np.isfinite(flux).sum())
    height = LC_HEADER + 2 * LC_PANEL + LC_FOOTER
    assert _png(tmp_path / "lc.png").shape[:2] == (round(height * DPI), round(LC_WIDTH * DPI))


def test_light_curve_with_a_given_radius(tmp_path: Path) -> None:
    epochs = _epochs(4, 4)
    fluxes = write_light_curve(epochs, tmp_path / "lc.png", radius_arcsec=1.2)
    flux, _ = _aperture_sums(epochs, np.full(len(epochs), 1.2))
    np.testing.assert_allclose(fluxes.flux, flux, rtol=1e-6, equal_nan=True)
    with pytest.raises(ValueError, match="radius_arcsec"):
        write_light_curve(epochs, tmp_path / "x.png", radius_arcsec=0.0)
