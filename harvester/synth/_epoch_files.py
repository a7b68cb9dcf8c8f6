"""FITS files of single-epoch images and templates, laid out and headed as DP1's.

A ``visit_image`` or ``difference_image`` file (afw's ``ExposureF`` layout):

* an empty primary HDU with afw's VisitInfo cards (``EXPID``, ``EXPTIME``,
  ``DARKTIME``, ``DATE-AVG`` in TAI with ``TIMESYS = 'TAI'``, ``MJD-AVG-UT1``,
  ``BORE-RA``/``BORE-DEC``/``BORE-ROTANG``, ``ROTTYPE``, ``OBS-LONG``/``-LAT``/``-ELEV``,
  ``INSTRUMENT``, ``IDNUM``, ``OBSTYPE``, ``PROGRAM``, ``REASON``, ``OBJECT``,
  ``HAS-SIMULATED-CONTENT = T``), the data id (``VISIT``, ``DETECTOR``, ``DETNAME``,
  ``BAND``, ``FILTER`` (the physical filter), ``DAYOBS``), the Butler provenance
  cards as the coadds have them, and the PSF as harvester's synthetic extension
  (``PSFMODEL = 'MOFFAT'``, ``PSFBETA``, ``PSF_FWHM`` in arcsec; DP1 keeps its PSF in
  ``ARCHIVE_DATA`` tables, which these files do not have);
* ``IMAGE`` (float32, nJy), ``MASK`` (int32, ``MP_*`` planes) and ``VARIANCE``
  (float32, nJy^2), each with the detector's header WCS (TAN-SIP), ``LTV1 = LTV2 =
  0`` and the ``A`` (PARENT) WCS, as afw writes them.

Tile-compressed (``RICE_1``, square tiles) with the quantisation step given in
absolute units: 1/16 of the visit's sky noise for the image (the coadds use 1/16 of
the noise each tile measures; a fixed step compresses as well and three times
faster), a thousandth of the sky variance for the variance; the mask losslessly.
A file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from .._version import __version__
from ..epochs._time import iso_tai
from ..masks import mask_header_cards
from ._build import _FILE_DATE, _fixed_gzip_time

__all__ = [
    "detector_wcs_cards",
    "epoch_primary",
    "plane_headers",
    "template_primary",
    "write_exposure",
]

Card = tuple[str, object, str]
#: Rubin Observatory (Cerro Pachon), as in DP1's headers.
OBS_LONG, OBS_LAT, OBS_ELEV = -70.749417, -30.244639, 2663.0
TAI_MINUS_UTC_DAYS = 37.0 / 86_400.0


def _hier(key: str) -> str:
    return key if len(key) <= 8 else f"HIERARCH {key}"


def epoch_primary(
    *,
    dataset_type: str,
    ident: str,
    run: str,
    instrument: str,
    visit: int,
    detector: int,
    detector_name: str,
    band: str,
    physical_filter: str,
    day_obs: int,
    mjd_tai: float,
    exptime: float,
    boresight: tuple[float, float],
    rotation: float,
    seeing: float,
    psf_beta: float,
    seed: int,
    compress: bool,
) -> fits.Header:
    """The primary header of a single-epoch file; see the module docstring."""
    h = fits.Header()
    cards: list[Card] = [
        ("ORIGIN", "harvester synth", "Synthetic Rubin DP1-like single-epoch image"),
        ("DATE", _FILE_DATE, "Fixed, so that a seed gives the same bytes"),
        ("HVERSION", __version__, "harvester version that wrote the file"),
        ("SYNSEED", seed, "Random seed of the synthetic repository"),
        ("TELESCOP", "Rubin:Simonyi", ""),
        ("INSTRUME", instrument, ""),
        ("EXPID", visit, "Exposure ID"),
        ("EXPTIME", exptime, "Exposure time (sec)"),
        ("DARKTIME", exptime + 1.0, "Time from CCD flush to readout (sec)"),
        ("DATE-AVG", iso_tai(mjd_tai), "TAI date at middle of observation"),
        ("TIMESYS", "TAI", ""),
        ("MJD-AVG-UT1", mjd_tai - TAI_MINUS_UTC_DAYS, "UT1 MJD date at ctr of obs (UT1 = UTC)"),
        ("BORE-RA", boresight[0], "ICRS RA (deg) at boresight"),
        ("BORE-DEC", boresight[1], "ICRS Dec (deg) at boresight"),
        ("BORE-ROTANG", rotation, "Rotation angle (deg) at boresight"),
        ("ROTTYPE", "SKY", "Type of rotation angle"),
        ("OBS-LONG", OBS_LONG, "Telescope longitude (+E, deg)"),
        ("OBS-LAT", OBS_LAT, "Telescope latitude (deg)"),
        ("OBS-ELEV", OBS_ELEV, "Telescope elevation (m)"),
        ("INSTRUMENT", instrument, "Short name of the instrument that took this data"),
        ("IDNUM", visit, "identifier of this full focal plane exposure"),
        ("OBSTYPE", "science", "Type of this observation"),
        ("PROGRAM", "synthetic-ECDFS", "observing program"),
        ("REASON", "science", "reason for the observation"),
        ("OBJECT", "ECDFS", "object of interest or field name"),
        ("HAS-SIMULATED-CONTENT", True, "Was any part of this observation simulated?"),
        ("VISIT", visit, ""),
        ("DETECTOR", detector, ""),
        ("DETNAME", detector_name, "Detector name"),
        ("DETSER", "synthetic", "Detector serial number"),
        ("BAND", band, ""),
        ("FILTER", physical_filter, "Physical filter"),
        ("DAYOBS", day_obs, "Observing day (date of TAI - 12 h)"),
        ("BUNIT", "nJy", ""),
        ("FLUXMAG0", 10 ** (0.4 * 31.4), "Flux (nJy) of a magnitude-0 source"),
        ("PSFMODEL", "MOFFAT", "Synthetic PSF (harvester extension)"),
        ("PSFBETA", psf_beta, "Moffat beta"),
        ("PSF_FWHM", seeing, "[arcsec] PSF FWHM (the seeing)"),
        ("COMPRESS", compress, "Pixel HDUs are tile-compressed"),
        ("LSST BUTLER ID", ident, ""),
        ("LSST BUTLER DATASETTYPE", dataset_type, ""),
        ("LSST BUTLER RUN", run, ""),
        ("LSST BUTLER DATAID INSTRUMENT", instrument, ""),
        ("LSST BUTLER DATAID VISIT", visit, ""),
        ("LSST BUTLER DATAID DETECTOR", detector, ""),
        ("LSST BUTLER DATAID BAND", band, ""),
        ("LSST BUTLER DATAID DAY_OBS", day_obs, ""),
        ("LSST BUTLER DATAID PHYSICAL_FILTER", physical_filter, ""),
    ]
    for key, value, comment in cards:
        # HIERARCH cards keep no comment: most would not fit in 80 characters.
        h[_hier(key)] = (value, comment) if comment and len(key) <= 8 else value
    return h


def template_primary(
    *,
    ident: str,
    run: str,
    tract: int,
    patch: int,
    band: str,
    skymap: str,
    seeing: float,
    psf_beta: float,
    seed: int,
    compress: bool,
) -> fits.Header:
    """The primary header of a ``template_coadd`` file (as a ``deep_coadd``'s)."""
    h = fits.Header()
    cards: list[Card] = [
        ("ORIGIN", "harvester synth", "Synthetic Rubin DP1-like template coadd"),
        ("DATE", _FILE_DATE, "Fixed, so that a seed gives the same bytes"),
        ("HVERSION", __version__, "harvester version that wrote the file"),
        ("SYNSEED", seed, "Random seed of the synthetic repository"),
        ("TRACT", tract, ""),
        ("PATCH", patch, ""),
        ("BAND", band, ""),
        ("FILTER", f"{band}_synth", ""),
        ("SKYMAP", skymap, ""),
        ("BUNIT", "nJy", ""),
        ("FLUXMAG0", 10 ** (0.4 * 31.4), "Flux (nJy) of a magnitude-0 source"),
        ("PSFMODEL", "MOFFAT", "Synthetic PSF (harvester extension)"),
        ("PSFBETA", psf_beta, "Moffat beta"),
        ("PSF_FWHM", seeing, "[arcsec] PSF FWHM"),
        ("COMPRESS", compress, "Pixel HDUs are tile-compressed"),
        ("LSST BUTLER ID", ident, ""),
        ("LSST BUTLER DATASETTYPE", "template_coadd", ""),
        ("LSST BUTLER RUN", run, ""),
        ("LSST BUTLER DATAID TRACT", tract, ""),
        ("LSST BUTLER DATAID PATCH", patch, ""),
        ("LSST BUTLER DATAID BAND", band, ""),
        ("LSST BUTLER DATAID SKYMAP", skymap, ""),
    ]
    for key, value, comment in cards:
        # HIERARCH cards keep no comment: most would not fit in 80 characters.
        h[_hier(key)] = (value, comment) if comment and len(key) <= 8 else value
    return h


def plane_headers(wcs_cards: Sequence[Card]) -> tuple[fits.Header, fits.Header, fits.Header]:
    """The IMAGE, MASK and VARIANCE headers (WCS, units, mask planes), built once for
    the files of one detector."""
    out = []
    for name in ("IMAGE", "MASK", "VARIANCE"):
        header = fits.Header()
        header["EXTTYPE"] = name
        header["INHERIT"] = True
        header.extend(list(wcs_cards))
        if name == "MASK":
            header.extend(mask_header_cards())
        else:
            header["BUNIT"] = "nJy" if name == "IMAGE" else "nJy2"
        out.append(header)
    return out[0], out[1], out[2]


def write_exposure(
    path: Path,
    primary: fits.Header,
    planes: tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.float32]],
    headers: tuple[fits.Header, fits.Header, fits.Header],
    *,
    compress: bool,
    steps: tuple[float, float] = (0.0, 0.0),
    tile: int = 400,
    dither_seed: int = 1,
) -> int:
    """Write PRIMARY + IMAGE, MASK, VARIANCE atomically; returns the file size.

    ``headers`` come from :func:`plane_headers`; ``steps`` are the absolute
    quantisation steps of image and variance when compressing.
    """
    hdus: list[fits.hdu.base.ExtensionHDU] = [fits.PrimaryHDU(header=primary)]
    for name, data, header in zip(("IMAGE", "MASK", "VARIANCE"), planes, headers, strict=True):
        if compress:
            lossy = name != "MASK"
            # Four digits: astropy writes the level into a card with a long comment.
            step = float(f"{steps[0] if name == 'IMAGE' else steps[1]:.4g}")
            hdu = fits.CompImageHDU(
                data,
                header=header,
                name=name,
                compression_type="RICE_1",
                tile_shape=(tile, tile),
                # A negative level is an absolute step (cfitsio's convention).
                quantize_level=-abs(step) if lossy else 0.0,
                quantize_method=2 if lossy else -1,
                dither_seed=dither_seed,
            )
        else:
            hdu = fits.ImageHDU(data, header=header, name=name)
        hdus.append(hdu)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _fixed_gzip_time() if compress else contextlib.nullcontext():
            # Our cards are fixed and valid: astropy's verification pass is a third of a
            # small file's time.
            fits.HDUList(hdus).writeto(tmp, overwrite=True, checksum=False, output_verify="ignore")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def detector_wcs_cards(wcs_cards: Sequence[Card]) -> list[Card]:
    """A detector's WCS cards plus ``LTV`` and the ``A`` (PARENT) WCS of a full
    detector image (its first pixel is PARENT (0, 0))."""
    return [
        *wcs_cards,
        ("LTV1", 0, "Image origin offset, PARENT x = local x - LTV1"),
        ("LTV2", 0, "Image origin offset, PARENT y = local y - LTV2"),
        ("WCSNAMEA", "PARENT", "Alternate WCS: PARENT pixel coordinates"),
        ("CTYPE1A", "LINEAR", ""),
        ("CTYPE2A", "LINEAR", ""),
        ("CRPIX1A", 1.0, ""),
        ("CRPIX2A", 1.0, ""),
        ("CRVAL1A", 0.0, "PARENT x of the first pixel"),
        ("CRVAL2A", 0.0, "PARENT y of the first pixel"),
        ("CUNIT1A", "pixel", ""),
        ("CUNIT2A", "pixel", ""),
    ]
