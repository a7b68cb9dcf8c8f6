"""Simple aperture photometry of a target's epochs, through each stamp's own WCS.

What the light-curve pictures plot and the target pixel files' default aperture
is drawn from. Deliberately plain, so a reader can redo it by hand:

* the target's position in each stamp is its RA/Dec through that stamp's own header
  WCS (astropy ``all_world2pix``, SIP included), so native stamps (each on its own
  detector grid) and aligned ones (all on the tract grid) are measured alike;
* the aperture is every pixel whose centre lies within ``radius`` of that position,
  the radius in arcseconds turned into pixels with the stamp's pixel scale
  (``sqrt(|det CD|)``); by default it is twice the median seeing (FWHM) of the
  group's epochs, one radius for every epoch of a (dataset type, band) group, so
  the epochs of a light curve are measured alike;
* flux is the plain sum of the aperture's pixels (nJy; the images are
  sky-subtracted, so no background is taken off), its error the square root of the
  sum of their variances;
* an epoch whose aperture holds a NaN pixel, or reaches past the stamp's edge, has
  no flux (NaN), never a sum over fewer pixels.

Dependency rule: numpy and astropy, and :mod:`._stamps`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._stamps import TargetEpochs

__all__ = [
    "ApertureFluxes",
    "aperture_photometry",
    "default_aperture_arcsec",
    "epoch_groups",
    "stamp_wcs",
]

FloatArray = npt.NDArray[np.float64]
#: The default aperture radius, in units of the median seeing (FWHM).
APERTURE_FWHM = 2.0
#: The radius used when no epoch has a usable seeing, arcseconds.
FALLBACK_APERTURE_ARCSEC = 2.0


def _band_order(band: str) -> tuple[int, str]:
    """Rubin's bands in wavelength order (ugrizy), any others after them by name."""
    return ("ugrizy".index(band), "") if len(band) == 1 and band in "ugrizy" else (6, band)


def _group_order(key: tuple[str, str]) -> tuple[tuple[int, str], int, str]:
    kind, band = key
    rank = {"visit_image": 0, "difference_image": 1}.get(kind, 2)
    return _band_order(band), rank, kind


def epoch_groups(
    dataset_type: npt.NDArray[np.str_], band: npt.NDArray[np.str_]
) -> list[tuple[str, str]]:
    """The (dataset type, band) pairs present, in the order every output shows them:
    bands in wavelength order (ugrizy, then others by name), and within a band visit
    images, then difference images, then other types by name."""
    keys = zip(dataset_type.tolist(), band.tolist(), strict=True)
    return sorted(dict.fromkeys(keys), key=_group_order)


def default_aperture_arcsec(seeing: npt.ArrayLike) -> float:
    """Twice the median of the finite, positive seeing values (FWHM, arcsec), or 2″."""
    values = np.asarray(seeing, dtype=np.float64)
    good = values[np.isfinite(values) & (values > 0)]
    if not len(good):
        return FALLBACK_APERTURE_ARCSEC
    return APERTURE_FWHM * float(np.median(good))


@dataclass(frozen=True)
class ApertureFluxes:
    """Aperture fluxes of one target's epochs (``E`` values each, in the epochs' order).

    Attributes
    ----------
    id : str
        The target's id.
    dataset_type, band, status : ndarray of str
    mjd_tai : ndarray of float64
        Mid-exposure MJD (TAI).
    flux, flux_err : ndarray of float64
        nJy; NaN where the aperture is not whole (a NaN pixel, or past the stamp).
    npix : ndarray of int64
        Pixels in the aperture.
    x, y : ndarray of float64
        The target's position in each stamp (0-based pixels).
    radius_arcsec : ndarray of float64
        The aperture radius used for each epoch.
    """

    id: str
    dataset_type: npt.NDArray[np.str_]
    band: npt.NDArray[np.str_]
    status: npt.NDArray[np.str_]
    mjd_tai: FloatArray
    flux: FloatArray
    flux_err: FloatArray
    npix: npt.NDArray[np.int64]
    x: FloatArray
    y: FloatArray
    radius_arcsec: FloatArray

    def __len__(self) -> int:
        return len(self.flux)


def stamp_wcs(cards: Mapping[str, Any]) -> Any:
    """An astropy WCS from a stamp's header cards."""
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    with warnings.catch_warnings():
        # Cards cut from real files may lack DATE-OBS/MJD-OBS; astropy's "fixes"
        # for that are noise here.
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def aperture_photometry(
    epochs: TargetEpochs, *, radius_arcsec: float | None = None
) -> ApertureFluxes:
    """Aperture fluxes of every epoch, at the target's position through each stamp's WCS.

    Parameters
    ----------
    epochs : TargetEpochs
        Native or aligned epoch stamps.
    radius_arcsec : float, optional
        Aperture radius; default :func:`default_aperture_arcsec` of each
        (dataset type, band) group's seeing.

    Returns
    -------
    ApertureFluxes

    Raises
    ------
    ValueError
        If ``radius_arcsec`` is not a positive number, or an epoch's WCS cannot be
        read (the message names the target and the epoch).
    """
    if radius_arcsec is not None and not (math.isfinite(radius_arcsec) and radius_arcsec > 0):
        raise ValueError(f"radius_arcsec must be a positive number, got {radius_arcsec!r}")
    n = len(epochs)
    radius = np.empty(n, dtype=np.float64)
    groups = list(zip(epochs.dataset_type.tolist(), epochs.band.tolist(), strict=True))
    for group in epoch_groups(epochs.dataset_type, epochs.band):
        members = np.array([g == group for g in groups], dtype=bool)
        radius[members] = (
            radius_arcsec
            if radius_arcsec is not None
            else default_aperture_arcsec(epochs.seeing[members])
        )
    flux = np.full(n, np.nan)
    flux_err = np.full(n, np.nan)
    npix = np.zeros(n, dtype=np.int64)
    xs, ys = np.full(n, np.nan), np.full(n, np.nan)
    if n:
        h, w = epochs.image.shape[1:]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    last: tuple[Mapping[str, Any] | None, Any] = (None, None)
    for i in range(n):
        cards = epochs.wcs[i]
        if last[0] is None or cards != last[0]:
            try:
                last = (cards, stamp_wcs(cards))
            except Exception as exc:
                raise ValueError(
                    f"{epochs.id}: epoch {i} (visit {int(epochs.visit[i])}): its WCS cards "
                    f"cannot be read: {exc}"
                ) from exc
        wcs = last[1]
        px, py = wcs.all_world2pix([epochs.ra], [epochs.dec], 0)
        x, y = float(px[0]), float(py[0])
        scale = math.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0
        r = radius[i] / scale
        xs[i], ys[i] = x, y
        inside = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
        npix[i] = int(inside.sum())
        whole = x - r >= -0.5 and y - r >= -0.5 and x + r <= w - 0.5 and y + r <= h - 0.5
        values = epochs.image[i][inside].astype(np.float64)
        if not whole or not npix[i] or not np.isfinite(values).all():
            continue
        flux[i] = float(values.sum())
        if epochs.variance is not None:
            flux_err[i] = math.sqrt(float(epochs.variance[i][inside].astype(np.float64).sum()))
    return ApertureFluxes(
        id=epochs.id,
        dataset_type=epochs.dataset_type.copy(),
        band=epochs.band.copy(),
        status=epochs.status.copy(),
        mjd_tai=epochs.mjd_tai.astype(np.float64),
        flux=flux,
        flux_err=flux_err,
        npix=npix,
        x=xs,
        y=ys,
        radius_arcsec=radius,
    )
