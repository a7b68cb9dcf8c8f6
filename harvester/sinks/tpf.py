"""Target pixel files: a target's aligned epochs as a Kepler-shaped TPF table.

One file per target, dataset type and band, ``<stem>.<dataset_type>.<band>.fits``
(:func:`tpf_filename`): a target pixel file holds *one* cadence list on *one* pixel
grid, and a light curve mixing bands, or visit and difference images taken at the
same times, would be meaningless. ``lightkurve.KeplerTargetPixelFile(path)`` reads
every file (with a warning that the header is not Kepler's or TESS's).

Layout (Kepler's TPF, as lightkurve reads it):

* HDU 0, primary, no data: ``ORIGIN = 'harvester'``, ``CREATOR`` (harvester and
  its version), ``TELESCOP = 'Rubin:Simonyi'`` (what DP1's files say; honest, so
  ``lightkurve.read()`` refuses the file, see below), ``INSTRUME`` when known,
  ``OBJECT`` (the target id), ``RA_OBJ``/``DEC_OBJ``, ``TRACT``, ``PATCH``,
  ``SKYMAP``, ``BAND``, ``FILTER``, ``DATATYPE`` (the dataset type), ``ALIGN``
  (the warp), ``NEPOCHS``, ``HVERSION``, ``DATE``.
* HDU 1, ``TARGETTABLES``: one row per epoch (cadence), in time order, columns
  ``TIME`` (D: **full JD in TAI** at mid-exposure, ``BJDREFI = 0``, ``BJDREFF = 0``,
  ``TIMESYS = 'TAI'``, ``TIMEREF = 'TOPOCENT'``: not barycentric),
  ``TIMECORR`` (E, 0), ``CADENCENO`` (J, the epoch's row in the target's
  ``EPOCHS`` table), ``PIXEL_MASK`` (J, H x W: the aligned mask bits, ``MP_*``
  cards give the planes), ``FLUX`` (E, H x W, nJy: column 5, as lightkurve's WCS
  keywords ``1CTYP5``... require), ``FLUX_ERR`` (E, sqrt of the aligned variance),
  ``FLUX_BKG`` and ``FLUX_BKG_ERR`` (E, 0: the images are sky-subtracted),
  ``QUALITY`` (J, below), ``POS_CORR1/2`` (E, 0), then the epoch's ``VISIT``,
  ``DETECTOR``, ``MJD_TAI``, ``EXPTIME``, ``SEEING``, ``COVERAGE``, ``STATUS`` and
  ``DATASET_ID``. Every image column carries the box's sky WCS (``1CTYPn``,
  ``1CRPXn``, ``1CRVLn``, ``1CDLTn``, ``11PCn``...: the tract's TAN WCS shifted to
  the box) and the physical WCS ``1CRVnP``/``2CRVnP`` = the box's PARENT origin
  (``lightkurve``'s ``tpf.column``/``tpf.row``), as Kepler's CCD column and row.
* HDU 2, ``APERTURE`` (int32, H x W, the box's WCS): bit 1 = the pixel has data in
  some epoch, bit 2 = the default aperture (a disk of twice the median seeing
  around the target), which lightkurve's ``pipeline_mask`` and the default of
  ``to_lightcurve()`` use.

``QUALITY`` uses two of Kepler's bits, so lightkurve's bitmasks act sensibly:
65536 (Kepler's *NoData*, which the ``'default'`` bitmask drops) when a pixel of
the default aperture has no data in that epoch (lightkurve sums apertures with
``nansum``: a missing pixel would count as zero flux), and 512 (unused by
Kepler; no lightkurve bitmask drops it) when only other pixels are missing.

Why ``lightkurve.read()`` refuses the file: it recognises target pixel files by
``TELESCOP`` (``Kepler`` or ``TESS``) plus ``CREATOR`` containing
``TargetPixel``; anything else with those keywords is "not recognized as a
supported data product". Writing ``TELESCOP = 'TESS'`` would make it read, and be
false (lightkurve would then treat times, quality bits and pixel units as TESS's);
the generic ``TargetPixelFile`` class has no quality mask. So the file says what
it is, and ``KeplerTargetPixelFile(path)`` is the way in.

Writes are atomic (a temporary file in the folder, renamed over the final name).

Dependency rule: astropy, numpy, :mod:`harvester.epochs`, :mod:`harvester.masks`,
:mod:`harvester.sinks.fits` (file names). lightkurve is never imported.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from .._version import __version__
from ..epochs import AlignedEpochs, default_aperture_arcsec, epoch_groups
from ..masks import NO_DATA, mask_header_cards
from .fits import safe_filename

__all__ = [
    "JD_MJD_OFFSET",
    "QUALITY_NO_DATA",
    "QUALITY_PARTIAL",
    "target_pixel_file",
    "tpf_filename",
    "tpf_groups",
    "write_target_pixel_files",
]

#: JD = MJD + this (days).
JD_MJD_OFFSET = 2400000.5
#: QUALITY bit: a pixel of the default aperture has no data (Kepler's NoData).
QUALITY_NO_DATA = 65536
#: QUALITY bit: some pixel of the box, outside the default aperture, has no data.
QUALITY_PARTIAL = 512
#: APERTURE bits: the pixel has data in some epoch; the pixel is in the default aperture.
APERTURE_COLLECTED = 1
APERTURE_OPTIMAL = 2
#: What DP1's files say in ``TELESCOP``.
TELESCOPE = "Rubin:Simonyi"

_NAME_PART = re.compile(r"[^A-Za-z0-9_-]")
#: Image columns whose WCS keywords are written (column number: name).
_IMAGE_COLUMNS = (4, 5, 6, 7, 8)


def tpf_groups(aligned: AlignedEpochs) -> list[tuple[str, str]]:
    """The (dataset type, band) pairs present (:func:`harvester.epochs.epoch_groups`)."""
    return epoch_groups(aligned.epochs.dataset_type, aligned.epochs.band)


def tpf_filename(target_id: str, dataset_type: str, band: str) -> str:
    """``<safe_filename(id)>.<dataset_type>.<band>.fits``.

    Dataset type and band keep only ``[A-Za-z0-9_-]`` (anything else becomes
    ``_``), so they hold no dot and the name splits back unambiguously from the
    right.
    """
    kind = _NAME_PART.sub("_", dataset_type) or "_"
    return f"{safe_filename(target_id)}.{kind}.{_NAME_PART.sub('_', band) or '_'}.fits"


def write_target_pixel_files(
    aligned: AlignedEpochs,
    folder: Path,
    *,
    telescope: str = TELESCOPE,
    instrument: str | None = None,
    aperture_arcsec: float | None = None,
) -> list[Path]:
    """Write one target pixel file per (dataset type, band) of a target's aligned epochs.

    Parameters
    ----------
    aligned : AlignedEpochs
        The target's epochs on its tract box (:func:`harvester.epochs.align_epochs`).
    folder : Path
        Where the files go (created if missing), named by :func:`tpf_filename`.
    telescope, instrument : str
        ``TELESCOP`` and ``INSTRUME`` (the latter written only when given).
    aperture_arcsec : float, optional
        Radius of the default aperture; default twice the group's median seeing.

    Returns
    -------
    list of Path
        The files written, in :func:`tpf_groups` order (none for no epochs).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset_type, band in tpf_groups(aligned):
        hdul = target_pixel_file(
            aligned,
            dataset_type,
            band,
            telescope=telescope,
            instrument=instrument,
            aperture_arcsec=aperture_arcsec,
        )
        path = folder / tpf_filename(aligned.epochs.id, dataset_type, band)
        _write_atomic(hdul, path)
        paths.append(path)
    return paths


def _write_atomic(hdul: fits.HDUList, path: Path) -> None:
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        hdul.writeto(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def target_pixel_file(
    aligned: AlignedEpochs,
    dataset_type: str,
    band: str,
    *,
    telescope: str = TELESCOPE,
    instrument: str | None = None,
    aperture_arcsec: float | None = None,
) -> fits.HDUList:
    """The target pixel file of one (dataset type, band) of a target, in memory.

    Raises
    ------
    ValueError
        If the target has no epoch of that dataset type and band, or
        ``aperture_arcsec`` is not a positive number.
    """
    e = aligned.epochs
    rows = np.flatnonzero((e.dataset_type == dataset_type) & (e.band == band))
    if not len(rows):
        raise ValueError(f"{e.id}: no {dataset_type} epoch in band {band!r}")
    if aperture_arcsec is not None and not (math.isfinite(aperture_arcsec) and aperture_arcsec > 0):
        raise ValueError(f"aperture_arcsec must be a positive number, got {aperture_arcsec!r}")
    radius = aperture_arcsec or default_aperture_arcsec(e.seeing[rows])
    height, width = aligned.shape
    image = e.image[rows]
    finite = np.isfinite(image)
    aperture = _aperture(aligned, radius, np.asarray(finite.any(axis=0), dtype=bool))
    in_aperture = (aperture & APERTURE_OPTIMAL) != 0
    quality = np.zeros(len(rows), dtype=np.int32)
    missing = ~finite
    quality[missing.reshape(len(rows), -1).any(axis=1)] |= QUALITY_PARTIAL
    quality[missing[:, in_aperture].any(axis=1)] = QUALITY_NO_DATA
    if e.mask is not None:
        pixel_mask = e.mask[rows].astype(np.int32)
    else:
        pixel_mask = np.where(finite, 0, NO_DATA).astype(np.int32)
    if e.variance is not None:
        with np.errstate(invalid="ignore"):
            flux_err = np.sqrt(e.variance[rows].astype(np.float32))
    else:
        flux_err = np.full(image.shape, np.nan, dtype=np.float32)
    zeros = np.zeros(image.shape, dtype=np.float32)
    n = len(rows)
    dim = f"({width},{height})"
    columns = [
        fits.Column("TIME", "D", unit="d", array=e.mjd_tai[rows] + JD_MJD_OFFSET),
        fits.Column("TIMECORR", "E", unit="d", array=np.zeros(n, dtype=np.float32)),
        fits.Column("CADENCENO", "J", array=rows.astype(np.int32) + 1),
        fits.Column("PIXEL_MASK", f"{height * width}J", dim=dim, array=pixel_mask),
        fits.Column("FLUX", f"{height * width}E", unit="nJy", dim=dim, array=image),
        fits.Column("FLUX_ERR", f"{height * width}E", unit="nJy", dim=dim, array=flux_err),
        fits.Column("FLUX_BKG", f"{height * width}E", unit="nJy", dim=dim, array=zeros),
        fits.Column("FLUX_BKG_ERR", f"{height * width}E", unit="nJy", dim=dim, array=zeros),
        fits.Column("QUALITY", "J", array=quality),
        fits.Column("POS_CORR1", "E", unit="pixel", array=np.zeros(n, dtype=np.float32)),
        fits.Column("POS_CORR2", "E", unit="pixel", array=np.zeros(n, dtype=np.float32)),
        fits.Column("VISIT", "K", array=e.visit[rows]),
        fits.Column("DETECTOR", "J", array=e.detector[rows].astype(np.int32)),
        fits.Column("MJD_TAI", "D", unit="d", array=e.mjd_tai[rows]),
        fits.Column("EXPTIME", "D", unit="s", array=e.exptime[rows]),
        fits.Column("SEEING", "D", unit="arcsec", array=e.seeing[rows]),
        fits.Column("COVERAGE", "D", array=e.coverage[rows]),
        _text_column("STATUS", e.status[rows]),
        _text_column("DATASET_ID", e.dataset_id[rows]),
    ]
    table = fits.BinTableHDU.from_columns(columns, name="TARGETTABLES")
    _table_header(table.header, aligned, e.mjd_tai[rows], e.exptime[rows])
    primary = fits.PrimaryHDU()
    _primary_header(primary.header, aligned, dataset_type, band, telescope, instrument, n)
    ap = fits.ImageHDU(aperture, name="APERTURE")
    for key, value, comment in aligned.window_cards():
        ap.header[key] = (value, comment)
    ap.header["APRADIUS"] = (radius, "[arcsec] Radius of the default aperture (bit 2)")
    return fits.HDUList([primary, table, ap])


def _text_column(name: str, values: npt.NDArray[np.str_]) -> fits.Column:
    text = [str(v) for v in values.tolist()]
    width = max([1, *(len(t.encode("utf-8")) for t in text)])
    return fits.Column(name, f"{width}A", array=np.array(text, dtype=f"S{width}"))


def _aperture(
    aligned: AlignedEpochs, radius_arcsec: float, collected: npt.NDArray[np.bool_]
) -> npt.NDArray[np.int32]:
    """The APERTURE image: bit 1 where some epoch has data, bit 2 the default disk."""
    height, width = aligned.shape
    tx, ty = aligned.target_pixel()
    r = radius_arcsec / (aligned.tract_wcs.scale_deg * 3600.0)
    yy, xx = np.mgrid[0:height, 0:width]
    disk = (xx - tx) ** 2 + (yy - ty) ** 2 <= r * r
    out = np.where(collected, APERTURE_COLLECTED, 0) | np.where(disk, APERTURE_OPTIMAL, 0)
    return np.asarray(out, dtype=np.int32)


def _primary_header(
    h: fits.Header,
    aligned: AlignedEpochs,
    dataset_type: str,
    band: str,
    telescope: str,
    instrument: str | None,
    n: int,
) -> None:
    e = aligned.epochs
    h["ORIGIN"] = ("harvester", "Cutout harvester")
    h["CREATOR"] = (f"harvester {__version__} aligned epochs", "TPF-shaped table, not Kepler")
    h["TELESCOP"] = (telescope, "Telescope")
    if instrument:
        h["INSTRUME"] = (instrument, "Instrument")
    h["OBJECT"] = (e.id, "Target id")
    h["RA_OBJ"] = (float(e.ra), "[deg] Target RA (ICRS)")
    h["DEC_OBJ"] = (float(e.dec), "[deg] Target Dec (ICRS)")
    h["RADESYS"] = "ICRS"
    h["TRACT"] = (aligned.tract, "Home tract: the pixel grid of the cube")
    h["PATCH"] = (aligned.patch, "Home patch of the target")
    h["SKYMAP"] = (aligned.skymap, "Sky map of the tract")
    h["BAND"] = (band, "Band of every cadence")
    h["FILTER"] = (band, "Band of every cadence")
    h["DATATYPE"] = (dataset_type, "Dataset type of every cadence")
    h["ALIGN"] = (aligned.method, "Warp onto the tract grid (reproject)")
    h["NEPOCHS"] = (n, "Cadences (epochs) in the table")
    h["HVERSION"] = (__version__, "harvester version that wrote the file")
    h["DATE"] = (datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"), "UTC time the file was written")
    h["COMMENT"] = "Read with lightkurve.KeplerTargetPixelFile(path); lightkurve.read() refuses"
    h["COMMENT"] = "it: it accepts only TELESCOP Kepler or TESS, and this is not either."


def _table_header(
    h: fits.Header,
    aligned: AlignedEpochs,
    mjd: npt.NDArray[np.float64],
    exptime: npt.NDArray[np.float64],
) -> None:
    h["TIMEREF"] = ("TOPOCENT", "Times at the observatory, not barycentric")
    h["TASSIGN"] = ("OBSERVATORY", "Where times are assigned")
    h["TIMESYS"] = ("TAI", "Time scale of TIME")
    h["BJDREFI"] = (0, "TIME is full JD: no reference offset")
    h["BJDREFF"] = (0.0, "TIME is full JD: no reference offset")
    h["TIMEUNIT"] = ("d", "Unit of TIME")
    h["TIMEPIXR"] = (0.5, "TIME is mid-exposure")
    if len(mjd):
        half = exptime / 2 / 86400.0
        h["TSTART"] = (float(np.min(mjd - half)) + JD_MJD_OFFSET, "[d] JD (TAI), first start")
        h["TSTOP"] = (float(np.max(mjd + half)) + JD_MJD_OFFSET, "[d] JD (TAI), last end")
    h["INHERIT"] = True
    h["RA_OBJ"] = (float(aligned.epochs.ra), "[deg] Target RA (ICRS)")
    h["DEC_OBJ"] = (float(aligned.epochs.dec), "[deg] Target Dec (ICRS)")
    w = aligned.tract_wcs
    s = w.scale_deg
    for k in _IMAGE_COLUMNS:
        cards: Iterable[tuple[str, object, str]] = [
            (f"1CTYP{k}", "RA---TAN", "Gnomonic projection (tract WCS)"),
            (f"2CTYP{k}", "DEC--TAN", "Gnomonic projection (tract WCS)"),
            (f"1CRPX{k}", w.crpix0 + 1.0 - aligned.x0, "Tract centre, box pixel"),
            (f"2CRPX{k}", w.crpix0 + 1.0 - aligned.y0, "Tract centre, box pixel"),
            (f"1CRVL{k}", w.crval_ra, "[deg] Tract centre RA"),
            (f"2CRVL{k}", w.crval_dec, "[deg] Tract centre Dec"),
            (f"1CUNI{k}", "deg", ""),
            (f"2CUNI{k}", "deg", ""),
            (f"1CDLT{k}", -s, "[deg/pixel]"),
            (f"2CDLT{k}", s, "[deg/pixel]"),
            (f"11PC{k}", 1.0, ""),
            (f"12PC{k}", 0.0, ""),
            (f"21PC{k}", 0.0, ""),
            (f"22PC{k}", 1.0, ""),
            (f"WCSN{k}P", "PARENT", "Physical WCS: tract PARENT pixels"),
            (f"WCAX{k}P", 2, ""),
            (f"1CTY{k}P", "LINEAR", ""),
            (f"2CTY{k}P", "LINEAR", ""),
            (f"1CUN{k}P", "pixel", ""),
            (f"2CUN{k}P", "pixel", ""),
            (f"1CRV{k}P", aligned.x0, "PARENT x of the first pixel"),
            (f"2CRV{k}P", aligned.y0, "PARENT y of the first pixel"),
            (f"1CDL{k}P", 1.0, ""),
            (f"2CDL{k}P", 1.0, ""),
            (f"1CRP{k}P", 1, ""),
            (f"2CRP{k}P", 1, ""),
        ]
        for key, value, comment in cards:
            h[key] = (value, comment)
    for card in mask_header_cards():
        h.append(card)
